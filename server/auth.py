"""Optional bearer-token authentication as Azure's clients send it: ``authorization: Bearer KEY``.

Keys come from a file (one per line) and/or ``FPGASERVE_AUTH_KEYS`` (comma-separated). They are
compared in constant time and never logged. Health checks stay open so that orchestrators'
probes (kubelet's gRPC probe sends no metadata) work; every other RPC, metadata and model status
included, needs a key.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from pathlib import Path

import grpc

from .core import ServingCore
from .errors import Unauthenticated

OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
KEYS_ENV = "FPGASERVE_AUTH_KEYS"


def load_keys(path: Path | None, environ: dict[str, str] | None = None) -> list[bytes]:
    """Keys from ``path`` (blank lines and ``#`` comments ignored) and the environment."""
    environ = os.environ if environ is None else environ
    keys = [key.strip() for key in environ.get(KEYS_ENV, "").split(",")]
    if path is not None:
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()  # a BOM is no key
        except UnicodeDecodeError:
            raise ValueError(f"auth keys file {path} is not UTF-8 text: one key a line") from None
        keys += [line.strip() for line in lines if not line.lstrip().startswith("#")]
    keys = [key for key in keys if key]
    # Asked for authentication but given no key: refuse to start rather than serve openly.
    if path is not None and not keys:
        raise ValueError(f"auth keys file {path} holds no keys")
    if KEYS_ENV in environ and not keys:
        raise ValueError(f"{KEYS_ENV} is set but holds no keys; unset it to serve without auth")
    return [key.encode() for key in keys]


UNAUTHENTICATED_MESSAGE = (
    "missing or invalid credentials: send the metadata 'authorization: Bearer <key>' with a key "
    "this server accepts"
)


def _refusing(
    handler: grpc.RpcMethodHandler, core: ServingCore, method: str
) -> grpc.RpcMethodHandler:
    """A handler that refuses the call, counted and logged by ``core`` (failed logins show in
    the metrics and the access log). It takes a request stream whatever the method, so that
    gRPC runs it at once: for a unary method, a thread would wait for a request body that a
    client without a token may never send, and 72 such calls took every thread, the health
    checks' included. The wire does not tell the kinds apart."""

    def refuse(requests, context: grpc.ServicerContext):
        core.refuse(context, method, Unauthenticated(UNAUTHENTICATED_MESSAGE))

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    return grpc.stream_unary_rpc_method_handler(refuse)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    def __init__(self, keys: Iterable[bytes], core: ServingCore) -> None:
        self._keys, self._core = list(keys), core
        if not self._keys:
            raise ValueError("bearer-token authentication needs at least one key")

    def _authorized(self, metadata: Iterable[tuple[str, str | bytes]]) -> bool:
        values = [value for key, value in metadata if key == "authorization"]
        if len(values) != 1:
            return False
        value = values[0].encode() if isinstance(values[0], str) else values[0]
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        # Compare against every key, without stopping early, so timing says nothing.
        return any([hmac.compare_digest(token.strip(), key) for key in self._keys])

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method in OPEN_METHODS:
            return handler
        if self._authorized(handler_call_details.invocation_metadata or ()):
            return handler
        method = handler_call_details.method.rpartition("/")[2]  # a served method: a known name
        return _refusing(handler, self._core, method)
