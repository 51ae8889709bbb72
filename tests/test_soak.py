"""Load and faults on the real server over real sockets: a soak at and beyond saturation, a device
that fails mid-request, model versions published under load, and clients that cancel or run out
of time. Every answer is checked: its status must be one the situation allows, and every OK
answer must carry exactly the bits the pipeline computes in-process for its images (batching
never changes a request's bits), from the version that says it answered.

The soak runs ``FPGASERVE_SOAK_SECONDS`` (default 10) split between "at saturation" and "beyond
saturation"; set it to hours for a real soak. p99 latencies are printed, never asserted (run with
``-s`` to see them). SIGTERM under load is in test_server_cli.py.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import (
    GatedDevice,
    channel,
    eventually,
    jpeg,
    requests_counted,
    rss_bytes,
    running,
    status_of,
    tiny_archive,
)
from tensorflow_serving.apis import get_model_status_pb2, prediction_service_pb2_grpc
from test_server import predict_request
from test_server_repository import place, statuses

from fpgaserve.pipeline import Pipeline
from fpgaserve.protos import grpc_predict_v2_pb2 as v2
from fpgaserve.protos import grpc_predict_v2_pb2_grpc as v2_grpc
from fpgaserve.server import BatchingConfig, ServerConfig

SOAK_SECONDS = float(os.environ.get("FPGASERVE_SOAK_SECONDS", "10"))
OK = grpc.StatusCode.OK
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
INVALID = grpc.StatusCode.INVALID_ARGUMENT
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE

IMAGES = [jpeg(i, size=(48 + 8 * i, 64)) for i in range(4)]
# The header is intact (it passes the pixel check), the data is not: refused by the decoder in
# the preprocess stage, inside a batch with other clients' good images.
POISON = jpeg(9, size=(48, 64))[:400]


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[int, Path]:
    folder = tmp_path_factory.mktemp("soak")
    return {seed: tiny_archive(folder / f"seed{seed}.zip", seed=seed) for seed in (0, 1, 2, 3)}


@pytest.fixture(scope="module")
def expected(archives) -> dict[int, np.ndarray]:
    """Per archive (seed): the probabilities of each of IMAGES, computed in-process one by one."""
    table = {}
    for seed, path in archives.items():
        with Pipeline.load(path) as pipeline:
            table[seed] = np.concatenate(
                [pipeline.run({"images": [image]})["probabilities"] for image in IMAGES]
            )
    return table


# -- the load generator ------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    started: float
    finished: float
    protocol: str
    images: int
    poisoned: bool = False
    version: int | None = None
    seeds: frozenset[int] = frozenset()  # archives whose bits the answer matches


@dataclass
class Traffic:
    """What the clients send: requests of 1..max_images images drawn from IMAGES, some with one
    poisoned image, over both protocols, with a deadline and sometimes a cancellation."""

    max_images: int = 2
    poison_rate: float = 0.0
    timeouts: tuple[float, ...] = (60.0,)
    cancel_rate: float = 0.0


class Load:
    """Client threads, each on its own connection, calling the server back to back until
    stopped; every answer is recorded as an Outcome."""

    def __init__(self, server, clients: int, traffic: Traffic, expected: dict[int, np.ndarray]):
        self.server, self.traffic, self.expected = server, traffic, expected
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), name=f"load-client-{i}", daemon=True)
            for i in range(clients)
        ]
        self.errors: list[BaseException] = []

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)
            assert not thread.is_alive(), "a client never got an answer"
        assert not self.errors, self.errors
        return self.outcomes

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def _client(self, index: int) -> None:
        rng = random.Random(index)
        try:
            with channel(self.server) as ch:
                tf_stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
                v2_stub = v2_grpc.GRPCInferenceServiceStub(ch)
                while not self._stop.is_set():
                    outcome = self._call(rng, tf_stub, v2_stub)
                    with self._lock:
                        self.outcomes.append(outcome)
        except BaseException as exc:  # reported by stop(), in the test's thread
            self.errors.append(exc)

    def _call(self, rng: random.Random, tf_stub, v2_stub) -> Outcome:
        traffic = self.traffic
        chosen = [rng.randrange(len(IMAGES)) for _ in range(rng.randint(1, traffic.max_images))]
        images = [IMAGES[i] for i in chosen]
        poisoned = rng.random() < traffic.poison_rate
        if poisoned:
            images[rng.randrange(len(images))] = POISON
        protocol = rng.choice(["tf", "v2"])
        if protocol == "tf":
            method, request = tf_stub.Predict, predict_request(images)
        else:
            method, request = v2_stub.ModelInfer, v2.ModelInferRequest(model_name="tiny")
            tensor = request.inputs.add(name="images", datatype="BYTES", shape=[len(images)])
            tensor.contents.bytes_contents.extend(images)
            request.outputs.add(name="probabilities")
        timeout = rng.choice(traffic.timeouts)
        started = time.monotonic()
        if rng.random() < traffic.cancel_rate:
            future = method.future(request, timeout=timeout)
            time.sleep(rng.uniform(0, 0.05))
            future.cancel()
            try:
                code, details, reply = OK, "", future.result()
            except grpc.FutureCancelledError:
                code, details, reply = grpc.StatusCode.CANCELLED, "cancelled by the client", None
            except grpc.RpcError as exc:
                code, details, reply = exc.code(), exc.details() or "", None
        else:
            code, details, reply = status_of(method, request, timeout=timeout)
        outcome = Outcome(code, details, started, time.monotonic(), protocol, len(images), poisoned)
        if reply is not None:
            if protocol == "tf":
                outcome.version = reply.model_spec.version.value
                probabilities = tf.make_ndarray(reply.outputs["output_alias"])
            else:
                outcome.version = int(reply.model_version)
                probabilities = np.frombuffer(reply.raw_output_contents[0], "<f4")
            probabilities = probabilities.reshape(len(images), -1)
            outcome.seeds = frozenset(
                seed
                for seed, table in self.expected.items()
                if np.array_equal(probabilities, table[chosen])
            )
        return outcome


class InFlightSampler:
    """Reads every served version's ``scheduler.in_flight`` every millisecond or so."""

    def __init__(self, server) -> None:
        self.server = server
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="in-flight-sampler", daemon=True)

    def __enter__(self) -> InFlightSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            for model in self.server.repository.served():
                scheduler = model.scheduler
                if scheduler is not None:
                    self.peak = max(self.peak, scheduler.in_flight)
            self.samples += 1
            time.sleep(0.001)


def p99_ms(outcomes: list[Outcome]) -> float:
    latencies = [o.finished - o.started for o in outcomes if o.code == OK]
    return float(np.percentile(latencies, 99)) * 1e3 if latencies else float("nan")


def report(title: str, outcomes: list[Outcome], seconds: float) -> None:
    codes = Counter(o.code.name for o in outcomes)
    images = sum(o.images for o in outcomes if o.code == OK)
    print(
        f"\n{title}: {len(outcomes)} requests in {seconds:.1f} s, {dict(codes)}, "
        f"{images / seconds:.1f} images/s answered, p99 latency (OK) {p99_ms(outcomes):.1f} ms"
    )


def health_of(server, service: str = "") -> int:
    with channel(server) as ch:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(ch).Check(request, timeout=10).status


def assert_still_serving(server) -> None:
    eventually(lambda: health_of(server) == SERVING and health_of(server, "tiny") == SERVING)
    with channel(server) as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        code, details, _ = status_of(stub.Predict, predict_request([IMAGES[0]]))
    assert code == OK, details


def check_bits(outcomes: list[Outcome], seeds: set[int]) -> None:
    """Every OK answer carries exactly one of ``seeds``' bits for its images."""
    wrong = [o for o in outcomes if o.code == OK and not (o.seeds & seeds)]
    assert not wrong, f"{len(wrong)} answers with wrong bits, e.g. {wrong[0]}"


def unexpected(outcomes: list[Outcome], allowed: set[grpc.StatusCode]) -> list[Outcome]:
    """Answers outside ``allowed``; a poisoned request must be refused INVALID_ARGUMENT and a
    clean one never is."""
    bad = [o for o in outcomes if o.code not in allowed and o.code != INVALID]
    bad += [o for o in outcomes if o.poisoned and o.code == OK]
    bad += [o for o in outcomes if o.code == INVALID and not o.poisoned]
    return bad


# -- the soak ----------------------------------------------------------------------------------

METHODS = {"tf": "Predict", "v2": "ModelInfer"}


@pytest.mark.slow
def test_soak_at_and_beyond_saturation(archives, expected):
    """At saturation (clients x images = queue size) every clean request is answered OK; beyond
    it, OK or RESOURCE_EXHAUSTED at once. Poisoned requests (a corrupt image in a batch with
    other clients' good ones) are refused INVALID_ARGUMENT without touching their batch mates.
    The queue stays within max_queue_size, memory stays flat, the server's own request counts
    match the clients'."""
    queue = 8
    batching = BatchingConfig(max_batch_size=4, max_queue_size=queue)
    config = ServerConfig(archives=[archives[0]], batching=batching)
    table = {0: expected[0]}
    phases = [
        ("warm-up", 4, Traffic(max_images=2, poison_rate=0.1), min(2.0, SOAK_SECONDS / 4)),
        ("at saturation", 4, Traffic(max_images=2, poison_rate=0.1), SOAK_SECONDS / 2),
        ("beyond saturation", 12, Traffic(max_images=3, poison_rate=0.1), SOAK_SECONDS / 2),
    ]
    with running(config) as server, InFlightSampler(server) as sampler:
        results = {}
        for title, clients, traffic, seconds in phases:
            if title == "at saturation":
                rss_before = rss_bytes()
            with Load(server, clients, traffic, table) as load:
                time.sleep(seconds)
            results[title] = load.outcomes
            report(title, load.outcomes, seconds)
        rss_growth = rss_bytes() - rss_before
        # Every call of every phase (the server takes no others): a call is counted once its
        # answer has been sent, so a snapshot between phases could miss the last ones.
        clients = Counter(
            (METHODS[o.protocol], o.code.name) for outcomes in results.values() for o in outcomes
        )

        def server_counts() -> Counter:
            return +Counter(_counts(server))

        with contextlib.suppress(AssertionError):
            eventually(lambda: server_counts() == clients, timeout=10)
        counted = server_counts()
        eventually(lambda: server.repository.get("tiny").scheduler.in_flight == 0)
        assert_still_serving(server)
    print(f"peak in flight {sampler.peak} (limit {queue}, {sampler.samples} samples), "
          f"RSS growth {rss_growth / 2**20:.1f} MiB")  # fmt: skip

    at, beyond = results["at saturation"], results["beyond saturation"]
    assert not unexpected(at, {OK}), unexpected(at, {OK})[:3]
    assert not unexpected(beyond, {OK, EXHAUSTED}), unexpected(beyond, {OK, EXHAUSTED})[:3]
    assert any(o.code == EXHAUSTED for o in beyond), "the load never went past saturation"
    assert all("overloaded" in o.details for o in beyond if o.code == EXHAUSTED)
    assert sum(o.code == OK for o in at) > 10 and sum(o.code == OK for o in beyond) > 10
    for outcomes in (at, beyond):
        check_bits(outcomes, {0})
    assert 0 < sampler.peak <= queue and sampler.samples > 100
    assert rss_growth < 200 << 20, f"RSS grew {rss_growth / 2**20:.0f} MiB"
    assert counted == clients, f"server counted {dict(counted)}, clients saw {dict(clients)}"


def _counts(server) -> dict[tuple[str, str], float]:
    return {
        (method, code): requests_counted(server, method, code)
        for method in METHODS.values()
        for code in ("OK", "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "UNAVAILABLE", "INTERNAL")
    }


# -- faults under load -------------------------------------------------------------------------


def test_device_failure_mid_request_under_load(archives, expected):
    """The device fails for a while under load: the requests it was running fail UNAVAILABLE
    (retry), health turns NOT_SERVING, and once the device is back everything is OK again
    without a restart."""
    device = GatedDevice()
    queue = 16
    config = ServerConfig(archives=[archives[0]], batching=BatchingConfig(4, 0.0, queue))
    with (
        running(config, device) as server,
        InFlightSampler(server) as sampler,
        Load(server, 6, Traffic(max_images=2), {0: expected[0]}) as load,
    ):
        eventually(lambda: sum(o.code == OK for o in load.snapshot()) >= 10)
        device.failing.set()
        eventually(lambda: health_of(server, "tiny") == NOT_SERVING)
        eventually(lambda: sum(o.code == UNAVAILABLE for o in load.snapshot()) >= 3)
        assert health_of(server) == NOT_SERVING
        device.failing.clear()
        repaired = time.monotonic()
        eventually(lambda: health_of(server) == SERVING and health_of(server, "tiny") == SERVING)
        recovered = len(load.snapshot())
        eventually(lambda: sum(o.code == OK for o in load.snapshot()[recovered:]) >= 20)
        outcomes = load.stop()
        eventually(lambda: server.repository.get("tiny").scheduler.in_flight == 0)
        assert_still_serving(server)
    report("device fault under load", outcomes, outcomes[-1].finished - outcomes[0].started)
    assert not unexpected(outcomes, {OK, UNAVAILABLE}), unexpected(outcomes, {OK, UNAVAILABLE})[:3]
    failed = [o for o in outcomes if o.code == UNAVAILABLE]
    assert all("retry" in o.details for o in failed), failed[0]
    assert not [o for o in failed if o.started > repaired], "failures after the repair"
    check_bits(outcomes, {0})
    assert sampler.peak <= queue


def test_versions_published_under_load(archives, expected, tmp_path):
    """Clients hammer a model while version 2 is published next to version 1, and then
    version 2's archive is replaced in place: no request fails (a request routed to a version
    just as it retires may be told to retry), every answer carries the bits of the version that
    says it answered, and once a swap is seen every later request gets the new version."""
    root = tmp_path / "models"
    place(root, 1, archives[1])
    config = ServerConfig(model_repository=root, poll_seconds=0.2,
                          batching=BatchingConfig(4, 0.0, 16))  # fmt: skip
    table = {seed: expected[seed] for seed in (1, 2, 3)}
    with (
        running(config) as server,
        channel(server) as ch,
        InFlightSampler(server) as sampler,
        Load(server, 4, Traffic(max_images=2), table) as load,
    ):
        eventually(lambda: sum(o.code == OK for o in load.snapshot()) >= 10)
        place(root, 2, archives[2])  # written under another name, then renamed
        eventually(lambda: statuses(ch) == {2: (AVAILABLE, "")}, timeout=120)
        v1_gone = time.monotonic()
        count = len(load.snapshot())
        eventually(lambda: sum(o.code == OK for o in load.snapshot()[count:]) >= 10)

        place(root, 2, archives[3])  # the same version, new content
        eventually(lambda: any(3 in o.seeds for o in load.snapshot()), timeout=120)
        first_new = min(o.finished for o in load.snapshot() if 3 in o.seeds)
        count = len(load.snapshot())
        eventually(lambda: sum(o.code == OK for o in load.snapshot()[count:]) >= 10)
        outcomes = load.stop()
    report("versions published under load", outcomes, outcomes[-1].finished - outcomes[0].started)

    retried = [o for o in outcomes if o.code == UNAVAILABLE]
    assert all("retry" in o.details for o in retried), retried[0]  # draining or unloaded
    assert not unexpected(outcomes, {OK, UNAVAILABLE}), unexpected(outcomes, {OK, UNAVAILABLE})[:3]
    answered = [o for o in outcomes if o.code == OK]
    check_bits(answered, {1, 2, 3})
    assert all(o.seeds <= ({1} if o.version == 1 else {2, 3}) for o in answered)
    late = [o for o in answered if o.started > v1_gone]
    assert late and all(o.version == 2 for o in late)
    latest = [o for o in answered if o.started > first_new]
    assert latest and all(o.seeds == {3} for o in latest)
    assert sampler.peak <= 16


# Found by this test: a request routed to a version that was unloaded before it was submitted failed
# ServedModel.submit's 'assert self.scheduler is not None': INTERNAL.
def test_a_request_routed_to_a_version_that_retires_is_told_to_retry(archives, tmp_path):
    root = tmp_path / "models"
    place(root, 1, archives[1])
    config = ServerConfig(model_repository=root, poll_seconds=0.2)
    with running(config) as server, channel(server) as ch:
        routed, release = threading.Event(), threading.Event()
        route = server.repository.get

        def slow_route(*args, **kwargs):  # the handler thread loses the CPU right after routing
            model = route(*args, **kwargs)
            if threading.current_thread().name.startswith("grpc") and not release.is_set():
                routed.set()
                release.wait(60)
            return model

        server.repository.get = slow_route
        old = route("tiny")
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        call = stub.Predict.future(predict_request([IMAGES[0]]), timeout=120)
        assert routed.wait(30)
        place(root, 2, archives[2])
        eventually(lambda: old.state == "END", timeout=120)  # version 1 retired and unloaded
        release.set()
        try:
            call.result()
            code, details = OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
        assert code in (OK, UNAVAILABLE), f"{code.name}: {details}"


def test_cancellations_and_deadlines_under_load(archives, expected):
    """Clients give up (deadlines from 10 ms) or cancel while the device stalls now and then:
    only OK, DEADLINE_EXCEEDED, CANCELLED or RESOURCE_EXHAUSTED come back, the queue drains to
    zero and the server stays healthy."""
    device = GatedDevice()
    queue = 12
    config = ServerConfig(archives=[archives[0]], batching=BatchingConfig(4, 0.0, queue))
    traffic = Traffic(max_images=2, timeouts=(0.01, 0.05, 0.1, 0.3, 30.0), cancel_rate=0.3)
    stalls = threading.Event()

    def stall_now_and_then():
        while not stalls.is_set():
            device.gate.clear()
            time.sleep(0.08)
            device.gate.set()
            time.sleep(0.08)

    with running(config, device) as server, InFlightSampler(server) as sampler:
        staller = threading.Thread(target=stall_now_and_then, daemon=True)
        staller.start()
        try:
            with Load(server, 8, traffic, {0: expected[0]}) as load:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    codes = Counter(o.code for o in load.snapshot())
                    kinds = (OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)
                    if all(codes[kind] >= 10 for kind in kinds):
                        break
                    time.sleep(0.2)
        finally:
            stalls.set()
            staller.join(10)
            device.gate.set()
        outcomes = load.outcomes
        eventually(lambda: server.repository.get("tiny").scheduler.in_flight == 0)
        assert_still_serving(server)
        server_deadlines = eventually(
            lambda: (
                requests_counted(server, "Predict", "DEADLINE_EXCEEDED")
                + requests_counted(server, "ModelInfer", "DEADLINE_EXCEEDED")
            ),
            timeout=10,
        )
    report("cancellations and deadlines", outcomes, outcomes[-1].finished - outcomes[0].started)
    allowed = {OK, EXHAUSTED, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert not unexpected(outcomes, allowed), unexpected(outcomes, allowed)[:3]
    codes = Counter(o.code for o in outcomes)
    assert codes[OK] >= 10 and codes[grpc.StatusCode.CANCELLED] >= 10, codes
    assert codes[grpc.StatusCode.DEADLINE_EXCEEDED] >= 10, codes
    assert server_deadlines > 0  # the server itself gave up on some, not only the clients
    check_bits(outcomes, {0})
    assert sampler.peak <= queue
