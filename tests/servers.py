"""Helpers for tests that run the real server: a small real model, images, certificates, and
devices with injected behaviour (a gate that holds runs, a switch that makes them fail)."""

from __future__ import annotations

import contextlib
import datetime
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import keras
import numpy as np
import tensorflow as tf

from fpgaserve.hal import DeviceFaultError
from fpgaserve.hal.emulator.device import EmulatorDevice
from fpgaserve.pipeline import ImagePreprocessing, ModelDefinition, QuantizedKerasModel
from fpgaserve.server import FpgaServer, ServerConfig

CLASSES = [f"class{i}" for i in range(10)]


def tiny_archive(
    path: Path, name: str = "tiny", seed: int = 0, classes: list[str] = CLASSES
) -> Path:
    """A real (small) CNN through the whole toolchain: compile, quantize (msfp16), archive."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((224, 224, 3))
    x = keras.layers.Conv2D(8, 3, strides=4, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(classes), activation="softmax")(x)
    model = QuantizedKerasModel(keras.Model(inputs, outputs), "msfp16", progress=False)
    stages = [ImagePreprocessing(preset="tf"), model.featurizer(), model.default_classifier()]
    return ModelDefinition(name, stages, classes).save(path)


def jpeg(seed: int = 0, size: tuple[int, int] = (240, 320)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    return tf.io.encode_jpeg(pixels).numpy()


class GatedDevice(EmulatorDevice):
    """The emulator, but runs wait while ``gate`` is closed and fail while ``failing`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.failing = threading.Event()
        self.runs = 0
        self.open()

    def _run(self, loaded, inputs):
        self.gate.wait()
        self.runs += 1
        if self.failing.is_set():
            raise DeviceFaultError("injected fault: the board stopped answering")
        return super()._run(loaded, inputs)


@contextlib.contextmanager
def running(config: ServerConfig, device=None, wait: bool = True) -> Iterator[FpgaServer]:
    """A started server on free ports; stopped (drained) on exit."""
    config.port, config.metrics_port = 0, 0
    config.host = "localhost"
    server = FpgaServer(config, device).start()
    try:
        if wait:
            assert server.repository.wait_loaded(120), "models did not load"
        yield server
    finally:
        server.stop(5)


def channel(server: FpgaServer, **options) -> grpc.Channel:
    return grpc.insecure_channel(f"localhost:{server.port}", options=list(options.items()))


# -- certificates ------------------------------------------------------------------------------


def _certificate(subject: str, issuer_key, issuer_name, key, ca: bool, dns: str | None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(folder: Path, name: str = "test") -> dict[str, Path]:
    """A CA, a server certificate for ``localhost`` and a client certificate, as PEM files."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def key_pem(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(f"{name} CA", ca_key, None, ca_key, True, None)
    files = {"ca": folder / f"{name}-ca.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, dns in (("server", "localhost"), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"{name} {role}", ca_key, ca.subject, key, False, dns)
        files[role] = folder / f"{name}-{role}.pem"
        files[f"{role}_key"] = folder / f"{name}-{role}-key.pem"
        files[role].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{role}_key"].write_bytes(key_pem(key))
    return files


# -- load, fuzz and hostile suites -------------------------------------------------------------


def rss_bytes() -> int:
    """This process's resident set size (the in-process server included), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def png(width: int, height: int, seed: int | None = None) -> bytes:
    """A real PNG; zeros (it compresses to almost nothing: a decompression bomb) unless seeded."""
    if seed is None:
        pixels = np.zeros((height, width, 3), np.uint8)
    else:
        pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return tf.io.encode_png(pixels).numpy()


def status_of(call, request, **kwargs) -> tuple[grpc.StatusCode, str, object]:
    """(code, details, response or None) of one unary call; never raises for an RPC error."""
    kwargs.setdefault("timeout", 60)
    try:
        return grpc.StatusCode.OK, "", call(request, **kwargs)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None


def metrics(server: FpgaServer) -> str:
    """The server's /metrics page, as Prometheus scrapes it."""
    url = f"http://localhost:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def requests_counted(server: FpgaServer, method: str, code: str, model: str = "tiny") -> float:
    """The server's own count of answered requests (fpgaserve_requests_total)."""
    labels = {"model": model, "method": method, "code": code}
    value = server.metrics.registry.get_sample_value("fpgaserve_requests_total", labels)
    return value or 0.0


def eventually(check, timeout: float = 60.0):
    """Poll ``check`` until it returns a truthy value, and return that value: for what the server
    does in the background (the repository rescans; each call is counted in the metrics and the
    access log once its answer has been sent)."""
    end = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except grpc.RpcError:
            pass
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {timeout} s: {check}")
        time.sleep(0.1)
