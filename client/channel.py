"""How a client connects: address, TLS, bearer token, message limits, deadline and retries.

Retries are gRPC's own (a service config retry policy): UNAVAILABLE only, exponential backoff
with jitter, never for INVALID_ARGUMENT or any other status. Message limits default to the
server's (64 MiB both ways): gRPC's 4 MiB default would refuse a batch of large photos.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import grpc

DEFAULT_MAX_MESSAGE_MB = 64  # fpgaserve serve --max-message-mb
DEFAULT_TIMEOUT_S = 30.0
MAX_ATTEMPTS = 5  # gRPC caps a retry policy at 5 attempts


def target(address: str, port: int | None, use_ssl: bool) -> str:
    """``host:port``. Without ``port``: the one in ``address``, else 443 (TLS) or 80, as Azure's
    client does; pass port=8500 (or "host:8500") for a server reached directly."""
    if port is not None:
        return f"{address}:{port}"
    host, _, maybe_port = address.rpartition(":")
    if host and maybe_port.isdigit() and (address.startswith("[") or ":" not in host):
        return address
    return f"{address}:{443 if use_ssl else 80}"


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


@dataclass(frozen=True)
class ChannelSettings:
    address: str
    use_ssl: bool = False
    root_certificates: bytes | None = None  # PEM of a custom CA; None: the system's roots
    certificate_chain: bytes | None = None  # client certificate for mutual TLS
    private_key: bytes | None = None
    access_token: str = ""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_MB * 2**20
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_attempts: int = MAX_ATTEMPTS
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    extra_metadata: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        # Certificates without TLS would be ignored, and a token sent in the clear.
        tls_files = (self.root_certificates, self.certificate_chain, self.private_key)
        if any(tls_files) and not self.use_ssl:
            raise ValueError("certificates or a key are given but use_ssl is False; set it")
        if bool(self.certificate_chain) != bool(self.private_key):
            raise ValueError("mutual TLS needs both the client certificate and its key")
        if self.max_attempts < 1:
            raise ValueError(
                f"max_attempts must be at least 1 (1: no retries), not {self.max_attempts}"
            )

    @classmethod
    def from_files(
        cls,
        address: str,
        ca: str | Path | None = None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        **kwargs,
    ) -> ChannelSettings:
        """Settings from PEM files; giving any of them turns TLS on."""
        kwargs.setdefault("use_ssl", any((ca, cert, key)))
        return cls(
            address,
            root_certificates=_read(ca),
            certificate_chain=_read(cert),
            private_key=_read(key),
            **kwargs,
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        token = (("authorization", f"Bearer {self.access_token}"),) if self.access_token else ()
        return (*token, *self.extra_metadata)

    def options(self) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            # Also gRPC's transparent retry of a call that never reached the server (a
            # connection closing as the call starts), whatever max_attempts says.
            ("grpc.enable_retries", 1),
            # A request is retried only if it fits the retry buffer: make every request fit.
            ("grpc.per_rpc_retry_buffer_size", self.max_message_bytes),
            ("grpc.retry_buffer_size", 4 * self.max_message_bytes),
        ]
        if self.max_attempts > 1:  # gRPC refuses a retry policy of fewer than 2 attempts
            retry = {
                "maxAttempts": min(self.max_attempts, MAX_ATTEMPTS),
                "initialBackoff": f"{self.initial_backoff_s}s",
                "maxBackoff": f"{self.max_backoff_s}s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            }
            config = {"methodConfig": [{"name": [{}], "retryPolicy": retry}]}
            options.append(("grpc.service_config", json.dumps(config)))
        return options

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.root_certificates, self.private_key, self.certificate_chain
        )

    def open(self) -> grpc.Channel:
        if self.use_ssl:
            return grpc.secure_channel(self.address, self._credentials(), self.options())
        return grpc.insecure_channel(self.address, self.options())

    def open_async(self) -> grpc.aio.Channel:
        if self.use_ssl:
            return grpc.aio.secure_channel(self.address, self._credentials(), self.options())
        return grpc.aio.insecure_channel(self.address, self.options())
