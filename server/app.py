"""The server process: one gRPC port for every protocol, health, reflection, metrics, TLS, auth,
and a drain on shutdown that answers every request already accepted."""

from __future__ import annotations

import functools
import logging
import math
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2

from fpgaserve.hal import Device, open_device
from fpgaserve.protos import grpc_predict_v2_pb2 as v2

from .auth import BearerTokenInterceptor
from .core import ServingCore, parsing_handler
from .images import DEFAULT_MAX_PIXELS
from .kserve import InferenceService
from .metrics import Metrics
from .model import ServedModel
from .reflection import enable_reflection
from .repository import ModelRepository, VersionPolicy
from .scheduler import BatchingConfig, remaining
from .tfserving import ModelService, PredictionService

log = logging.getLogger("fpgaserve.server")

RESERVED_THREADS = 8  # for health checks and reflection: never taken by model calls
REFLECTION_STREAMS = RESERVED_THREADS // 2  # the others stay free for health checks
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_NAMES = (
    "tensorflow.serving.PredictionService",
    "tensorflow.serving.ModelService",
    v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
)


@dataclass
class TlsConfig:
    """Server certificate and key (PEM); with ``client_ca`` clients must present a certificate
    signed by it (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def check(self) -> None:
        """Say which file is wrong: gRPC would only fail to bind the port, naming none."""
        for path in (self.cert, self.key, self.client_ca):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS: {path} is not a file")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:  # the password callback keeps OpenSSL from prompting for an encrypted key's
            context.load_cert_chain(self.cert, self.key, password=lambda: b"")
        except ssl.SSLError as exc:
            raise ValueError(
                f"TLS: {self.cert} and {self.key} must be a PEM certificate and its own, "
                f"unencrypted private key ({exc.reason or exc})"
            ) from None
        if self.client_ca is not None:
            try:
                context.load_verify_locations(self.client_ca)
            except ssl.SSLError as exc:
                raise ValueError(
                    f"TLS: {self.client_ca} must hold PEM CA certificates ({exc.reason or exc})"
                ) from None

    def credentials(self) -> grpc.ServerCredentials:
        self.check()
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.client_ca.read_bytes() if self.client_ca else None,
            require_client_auth=self.client_ca is not None,
        )


@dataclass
class ServerConfig:
    """Everything ``fpgaserve serve`` can set. Ports 0 pick free ones (tests)."""

    archives: list[Path] = field(default_factory=list)
    model_repository: Path | None = None
    host: str = "0.0.0.0"
    port: int = 8500
    metrics_port: int | None = 8501  # None: no metrics endpoint
    device: str = "emulator"
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    poll_seconds: float = 5.0
    max_message_bytes: int = 64 * 2**20
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_concurrent_calls: int = 64  # inference calls; more get RESOURCE_EXHAUSTED at once
    tls: TlsConfig | None = None
    auth_keys: list[bytes] = field(default_factory=list)
    drain_seconds: float = 30.0
    # Clients reconnect after this long, so that new replicas behind a headless Service get
    # traffic (gRPC keeps one connection per backend). 0: never.
    max_connection_age_s: float = 0.0
    warmup: bool = True

    def __post_init__(self) -> None:
        """Refuse at start what would fail every call later, or quietly do something else."""
        ports = [("port (--port)", self.port), ("metrics_port (--metrics-port)", self.metrics_port)]
        for what, port in ports:
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{what} must be 0-65535, not {port}")
        minimums = [
            ("max_concurrent_calls (--max-concurrent-calls)", self.max_concurrent_calls, 1),
            ("max_message_bytes (--max-message-mb)", self.max_message_bytes, 4096),
            ("max_image_pixels (--max-image-pixels)", self.max_image_pixels, 1),
            ("poll_seconds (--poll-seconds)", self.poll_seconds, 0.1),
            ("drain_seconds (--drain-seconds)", self.drain_seconds, 1),
            ("max_connection_age_s (--max-connection-age-seconds)", self.max_connection_age_s, 0),
        ]
        for what, value, least in minimums:
            if not (math.isfinite(value) and value >= least):
                raise ValueError(f"{what} must be a finite number of at least {least}, not {value}")
        if self.tls is not None:  # before minutes of model loading
            self.tls.check()
        if self.archives and 1 not in self.version_policy.select({1}):
            raise ValueError(
                f"archives named on the command line are served as version 1, which version "
                f"policy {self.version_policy} leaves out; the policy is for a model repository"
            )


class FpgaServer:
    """``start()`` serves at once (health NOT_SERVING while models load); ``stop()`` drains."""

    def __init__(self, config: ServerConfig, device: Device | None = None) -> None:
        self.config = config
        self._owns_device = device is None
        self.device = open_device(config.device) if device is None else device
        self.metrics = Metrics()
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._health_lock = threading.Lock()
        self._known_models: set[str] = set()
        self._health_sent: dict[str, int] = {}  # service -> the status last set
        self._gauged: set[tuple[str, str]] = set()  # (model, version) with a ready gauge
        try:
            self.repository = ModelRepository(
                self.device,
                config.batching,
                archives=config.archives,
                root=config.model_repository,
                policy=config.version_policy,
                warmup=config.warmup,
                on_change=self._update_health,
                on_new_model=self._configure_model,
            )
        except BaseException:
            self._close_device()
            raise
        self.core = ServingCore(
            self.repository, self.metrics, config.max_concurrent_calls, config.max_message_bytes
        )
        self.grpc = self._build_grpc()
        self.port = self._bind()
        self.metrics_port: int | None = None
        self._stopped = threading.Event()

    def _build_grpc(self) -> grpc.Server:
        limit = self.config.max_message_bytes
        age = [
            ("grpc.max_connection_age_ms", int(self.config.max_connection_age_s * 1e3)),
            ("grpc.max_connection_age_grace_ms", int(self.config.drain_seconds * 1e3)),
        ]
        age = age if self.config.max_connection_age_s > 0 else []
        interceptors = (
            [BearerTokenInterceptor(self.config.auth_keys, self.core)]
            if self.config.auth_keys
            else []
        )
        threads = self.config.max_concurrent_calls + RESERVED_THREADS
        server = grpc.server(
            ThreadPoolExecutor(threads, thread_name_prefix="grpc"),
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
                *age,
            ],
            # A hard bound; model calls are refused earlier (ServingCore, at
            # max_concurrent_calls), so that health checks and reflection keep
            # RESERVED_THREADS of their own under any load.
            maximum_concurrent_rpcs=threads,
        )
        server.add_generic_rpc_handlers((
            parsing_handler(PredictionService(self.core), prediction_service_pb2),
            parsing_handler(ModelService(self.core), model_service_pb2),
            parsing_handler(InferenceService(self.core), v2),
        ))  # fmt: skip
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        enable_reflection(server, (*SERVICE_NAMES, health.SERVICE_NAME), REFLECTION_STREAMS)
        return server

    def _bind(self) -> int:
        host = self.config.host
        if ":" in host and not host.startswith("["):  # an IPv6 address such as ::
            host = f"[{host}]"
        address = f"{host}:{self.config.port}"
        if self.config.tls is not None:
            port = self.grpc.add_secure_port(address, self.config.tls.credentials())
        else:
            port = self.grpc.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot listen on {address}: is the port in use?")
        return port

    def _configure_model(self, model: ServedModel) -> None:
        model.max_image_pixels = self.config.max_image_pixels
        model.on_batch = lambda role, size: self.metrics.observe_batch(model.name, role, size)

    def _update_health(self) -> None:
        """Per-model and overall status: SERVING only when ready and not draining."""
        with self._health_lock:
            names = set(self.repository.names())
            draining = self.core.draining
            for name in names | self._known_models:
                ok = name in names and self.repository.model_ready(name) and not draining
                self._set_health(name, SERVING if ok else NOT_SERVING)
            self._known_models = names
            ready = self.repository.ready() and not draining
            for service in ("", *SERVICE_NAMES):
                self._set_health(service, SERVING if ready else NOT_SERVING)
            served = self.repository.served()
            gauged = {(model.name, str(model.version)) for model in served}
            for model in served:
                self.metrics.model_ready.labels(model.name, str(model.version)).set(model.ready)
            for gone in self._gauged - gauged:  # unloaded: no stale "ready" left behind
                self.metrics.model_ready.remove(*gone)
            served_names = {name for name, _ in gauged}
            for name in served_names:
                self.metrics.in_flight.labels(name).set_function(
                    functools.partial(self._images_in_flight, name)
                )
            for name in {name for name, _ in self._gauged} - served_names:
                self.metrics.in_flight.remove(name)
            self._gauged = gauged

    def _set_health(self, service: str, status: int) -> None:
        """Only changes: every set reaches every Watch stream, and the health protocol sends
        a status when it changes."""
        if self._health_sent.get(service) != status:
            self._health_sent[service] = status
            self.health.set(service, status)

    def _images_in_flight(self, name: str) -> int:
        """Over every served version of ``name``."""
        return sum(
            model.scheduler.in_flight
            for model in self.repository.served()
            if model.name == name and model.scheduler is not None
        )

    def start(self) -> FpgaServer:
        self._update_health()
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.host)
        self.grpc.start()
        self.repository.start(self.config.poll_seconds)
        log.info(
            "serving on port %d (metrics on %s), device %s",
            self.port,
            self.metrics_port,
            self.device.info.name,
            extra={
                "port": self.port,
                "metrics_port": self.metrics_port,
                "device": self.device.info.name,
            },
        )
        return self

    def stop(self, grace: float | None = None) -> bool:
        """Report NOT_SERVING, refuse new RPCs, let accepted ones finish, then unload every model
        and release the device, all within ``grace`` seconds (and 1 s for gRPC to close).
        False when some call or model stage was still running then: its thread is stuck (in
        a device run that never returned, say) and only ending the process frees it."""
        if self._stopped.is_set():
            return True
        self._stopped.set()
        grace = self.config.drain_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        self.core.draining = True
        self._update_health()
        log.info("draining: finishing accepted requests (up to %.0f s)", grace)
        drained = self.core.drain(grace)
        if not drained:
            log.error(
                "drain timed out after %.0f s with %d calls still running; cancelling them",
                grace,
                self.core.active,
            )
        self.grpc.stop(1.0).wait()
        unloaded = self.repository.close(remaining(deadline))
        if drained and not unloaded:  # a stage still running for a caller that already left
            log.error("stop timed out after %.0f s with a model stage still running", grace)
        self.metrics.close()
        self._close_device()
        log.info("stopped")
        return drained and unloaded

    def _close_device(self) -> None:
        if self._owns_device:
            self.device.close()

    def wait(self) -> None:
        self.grpc.wait_for_termination()

    def __enter__(self) -> FpgaServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
