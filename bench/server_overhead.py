"""What the gRPC server adds, and how close it gets to its slowest stage.

Part 1, overhead: the default pipeline (ResNet-50 msfp16; random weights, speed does not depend
on them) with a device stand-in that answers instantly, so the figure is the server's own cost.
Client-observed latency of a batch-1 224x224 JPEG over TensorFlow Serving Predict minus the
pipeline time of the same request, p50 and p99, two ways:

* per request, minus the stage times the server measured for it (its ``server-timing`` trailer):
  the client does nothing else, and the machine's drift hits both figures alike; back to back,
  and again with the client idle for 20 ms before each call (a lone request on a quiet server);
* minus an in-process ``Pipeline.run`` in the client, alternating with the calls. That also
  counts what the client's own TensorFlow run between calls costs the call after it (caches on
  a 2-CPU machine).

Then the per-request figure again, measured by a lean native client (``bench/native_client.cc``,
gRPC's C++ library; built when g++, pkg-config and libgrpc++-dev are present, else skipped with
the reason): grpcio's Python client adds its own thread hand-offs and Python to what it
observes, and that share is the client's, not the server's.

Then the floor, measured alongside: a bare grpcio server in its own process that runs the same
three stages and nothing else, measured in turns with the served model (rounds of back-to-back
calls to each, both clients). Its overhead is what gRPC's Python server and the stages' own
Python leave on this machine, which no server on grpcio's sync server goes below; the served
model's figure minus it is this server's own request path (request ids, admission, checks,
scheduler, metrics, logs).

Then throughput with 1, 4 and 16 concurrent clients.

For reading those figures on the machine at hand, the run starts with ``bench/wakeup.py``: how
long waking a process blocked on another CPU takes there. Every thread hand-off in the client's
and the server's gRPC costs about that much, whatever the server's own code does.

Part 2, pipelining: the emulator as device. Throughput with 16 concurrent batch-1 clients vs the
slowest stage's own rate, with the default max queue delay (0: the device never waits) and with
``--queue-delay-ms``. Both rates are sustained means measured the same way: the stage runs
back-to-back batches alone, in-process, right before and after each served run (the machine
drifts), and the served rate counts whole cycles of completions (a device batch answers 8
clients at once, so a fixed window would cut a batch).

Usage: python bench/server_overhead.py [--requests 300] [--seconds 10] [--queue-delay-ms 20]
       [--skip-emulator] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from fpgaserve.hal import Device, DeviceInfo, open_device
from fpgaserve.pipeline import ImagePreprocessing, ModelDefinition, Pipeline, QuantizedZooModel
from fpgaserve.server import BatchingConfig, FpgaServer, ServerConfig
from fpgaserve.server.core import SERVER_TIMING, parse_server_timing, server_timing
from fpgaserve.server.logs import configure as configure_logs
from fpgaserve.server.tfserving import DEFAULT_OUTPUT_ALIAS
from fpgaserve.wire import from_tensor_proto, to_tensor_proto

BATCH = 8
ROOT = Path(__file__).resolve().parents[1]
WAKEUP = ROOT / "bench" / "wakeup.py"
PREDICT_SERVICE = "tensorflow.serving.PredictionService"
PREDICT = f"/{PREDICT_SERVICE}/Predict"
STAGE_ROLES = ("preprocess", "device", "classify")
# A lone request on a quiet server: long enough for the server's threads to go idle.
IDLE_S = 0.02


class InstantDevice(Device):
    """A device stand-in that answers at once with zeros of the right shape."""

    def __init__(self) -> None:
        super().__init__(
            DeviceInfo("instant", "bench", "STAND-IN", "answers instantly", ("msfp16",))
        )
        self.open()

    def _load(self, program, shapes):
        return None

    def _run(self, loaded, inputs):
        batch = next(iter(inputs.values())).shape[0]
        return {
            name: np.zeros((batch, *loaded.shapes[name]), np.float32)
            for name in loaded.program.outputs
        }


def photo() -> bytes:
    """A 224x224 JPEG: a real ImageNet photo when the shared assets are present, else a smooth
    synthetic picture (random noise would make an unrealistically large file)."""
    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet" / "images"
    folder = Path(os.environ.get("FPGASERVE_IMAGENET_DIR", folder.parent)) / "images"
    files = sorted(folder.glob("*.JPEG"))
    if files:
        pixels = tf.io.decode_jpeg(files[0].read_bytes(), channels=3)
    else:
        y, x = np.mgrid[0:224, 0:224]
        pixels = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)
    pixels = tf.cast(tf.image.resize(pixels, (224, 224)), tf.uint8)
    return tf.io.encode_jpeg(pixels, quality=90).numpy()


def request(image: bytes) -> predict_pb2.PredictRequest:
    message = predict_pb2.PredictRequest()
    message.model_spec.name = "resnet50"
    message.inputs["images"].CopyFrom(tf.make_tensor_proto([image]))
    return message


def default_archive(folder: Path) -> Path:
    """The default model's service definition (ResNet-50 msfp16, random weights: speed does not
    depend on them), saved in ``folder``."""
    model = QuantizedZooModel("resnet50", "random", "msfp16", progress=False)
    stages = [ImagePreprocessing(preset="caffe"), model.featurizer(), model.default_classifier()]
    return ModelDefinition("resnet50", stages).save(folder / "resnet50.zip")


def percentiles(samples: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 99))


def _serve_child(archive: Path, device: str, delay_s: float, ports, stop) -> None:
    with open(archive.with_suffix(".log"), "w") as log:
        configure_logs("json", stream=log)  # an access log line per request, as deployed
        chosen = InstantDevice() if device == "instant" else open_device(device)
        server = serve(archive, chosen, delay_s)
        ports.put(server.port)
        stop.wait()
        server.stop(30)


def bare_predict(
    runners: list, message: predict_pb2.PredictRequest, context: grpc.ServicerContext
) -> predict_pb2.PredictResponse:
    """Predict as the three stages and nothing else (no request id, admission, input checks,
    scheduler, deadline, metrics, statistics or log line), answering what the served model
    answers: the floor's request path."""
    value, timings = from_tensor_proto("images", message.inputs["images"]), {}
    for role, runner in zip(STAGE_ROLES, runners, strict=True):
        start = time.perf_counter()
        value = runner(value)
        timings[role] = time.perf_counter() - start
    answer = predict_pb2.PredictResponse()
    answer.model_spec.CopyFrom(message.model_spec)
    to_tensor_proto(value, answer.outputs[DEFAULT_OUTPUT_ALIAS], typed=True)
    context.set_trailing_metadata([(SERVER_TIMING, server_timing(timings))])
    return answer


def _bare_child(archive: Path, ports, stop) -> None:
    """The floor for any server on grpcio's sync server: that server running ``bare_predict``."""
    with Pipeline.load(archive, InstantDevice()) as pipeline:
        method = grpc.unary_unary_rpc_method_handler(
            functools.partial(bare_predict, pipeline.runners),
            request_deserializer=predict_pb2.PredictRequest.FromString,
            response_serializer=predict_pb2.PredictResponse.SerializeToString,
        )
        server = grpc.server(
            ThreadPoolExecutor(4),
            handlers=[grpc.method_handlers_generic_handler(PREDICT_SERVICE, {"Predict": method})],
        )
        ports.put(server.add_insecure_port("localhost:0"))
        server.start()
        stop.wait()
        server.stop(5)


@contextlib.contextmanager
def _in_child(target, *args):
    """``target(*args, ports, stop)`` in its own process, as in production: the client does
    not share its GIL. Yields the port it serves on."""
    context = multiprocessing.get_context("spawn")
    ports, stop = context.Queue(), context.Event()
    child = context.Process(target=target, args=(*args, ports, stop))
    child.start()
    try:
        yield ports.get(timeout=600)
    finally:
        stop.set()
        child.join(60)


def serve_in_child(archive: Path, device: str, delay_s: float = 0.0):
    """The server in its own process. It logs as ``fpgaserve serve`` does (JSON, a line per
    request) to a file by the archive."""
    return _in_child(_serve_child, archive, device, delay_s)


def bare_in_child(archive: Path):
    """The bare grpcio server (``_bare_child``) in its own process."""
    return _in_child(_bare_child, archive)


def serve(archive: Path, device: Device, delay_s: float = 0.0) -> FpgaServer:
    config = ServerConfig(
        archives=[archive], host="localhost", port=0, metrics_port=None,
        batching=BatchingConfig(
            max_batch_size=BATCH, max_queue_size=256, max_queue_delay_s=delay_s
        ),
    )  # fmt: skip
    server = FpgaServer(config, device).start()
    server.repository.wait_loaded(600)
    return server


def interleaved(pipeline: Pipeline, port: int, image: bytes, count: int):
    """In-process runs and gRPC calls of the same request, alternating, so that drift in the
    machine's speed hits both alike. Returns (in-process times, client-observed times)."""
    message = request(image)
    local, remote = [], []
    with grpc.insecure_channel(f"localhost:{port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for index in range(count + 10):
            start = time.perf_counter()
            pipeline.run({"images": [image]})
            middle = time.perf_counter()
            stub.Predict(message, timeout=60)
            end = time.perf_counter()
            if index >= 10:  # warm-up
                local.append(middle - start)
                remote.append(end - middle)
    return local, remote


def pipeline_seconds(timing: str) -> float:
    """A request's pipeline time (preprocess + device + classify) from its ``server-timing``."""
    stages = parse_server_timing(timing)
    return sum(stages[role] for role in STAGE_ROLES)


Timed = tuple[list[float], list[float]]  # each call's client-observed and pipeline seconds


def per_request(port: int, message, count: int, idle: float = 0.0) -> Timed:
    """Client-observed latency of each call and the same request's pipeline time as the server
    measured it, from its ``server-timing`` trailer. The client waits ``idle`` seconds before
    each call (0: back to back)."""
    latencies, pipeline = [], []
    with grpc.insecure_channel(f"localhost:{port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for index in range(count + 10):
            time.sleep(idle)
            start = time.perf_counter()
            _, call = stub.Predict.with_call(message, timeout=60)
            end = time.perf_counter()
            (timing,) = [v for k, v in call.trailing_metadata() if k == SERVER_TIMING]
            if index >= 10:  # warm-up
                latencies.append(end - start)
                pipeline.append(pipeline_seconds(timing))
    return latencies, pipeline


def machine_wakeups() -> str:
    """What ``bench/wakeup.py`` prints, indented: how fast this machine wakes a blocked process
    on another CPU, the unit of every thread hand-off in gRPC's path. It runs in a process of its
    own, as it forks and TensorFlow's threads are running here."""
    done = subprocess.run([sys.executable, str(WAKEUP)], capture_output=True, text=True)
    lines = (done.stdout if done.returncode == 0 else f"failed: {done.stderr}").splitlines()
    return "\n".join(f"  {line}" for line in lines)


def build_native_client() -> tuple[Path | None, str]:
    """``bench/native_client.cc`` compiled (again when the source is newer) into ``build/``, or
    None and why not."""
    source, binary = ROOT / "bench" / "native_client.cc", ROOT / "build" / "bench" / "native_client"
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary, ""
    compiler, pkg_config = shutil.which("g++"), shutil.which("pkg-config")
    if compiler is None or pkg_config is None:
        return None, "g++ or pkg-config is missing"
    flags = subprocess.run(
        [pkg_config, "--cflags", "--libs", "grpc++"], capture_output=True, text=True
    )
    if flags.returncode != 0:
        return None, "gRPC's C++ library is missing (Debian/Ubuntu: apt install libgrpc++-dev)"
    binary.parent.mkdir(parents=True, exist_ok=True)
    built = subprocess.run(
        [compiler, "-O2", "-std=c++17", str(source), *flags.stdout.split(), "-o", str(binary)],
        capture_output=True, text=True,
    )  # fmt: skip
    if built.returncode != 0:
        return None, f"it did not compile: {built.stderr.strip()[-500:]}"
    return binary, ""


def per_request_native(binary: Path, port: int, message, count: int, idle: float = 0.0) -> Timed:
    """``per_request``, measured by the native client."""
    with tempfile.NamedTemporaryFile(suffix=".bin") as raw:
        raw.write(message.SerializeToString())
        raw.flush()
        command = [binary, f"localhost:{port}", PREDICT, raw.name, count + 10, round(idle * 1e3)]
        done = subprocess.run([str(arg) for arg in command], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the native client failed: {done.stderr.strip()}")
    latencies, pipeline = [], []
    for line in done.stdout.splitlines()[10:]:  # after the warm-up calls
        microseconds, timing = line.split("\t")
        latencies.append(float(microseconds) / 1e6)
        pipeline.append(pipeline_seconds(timing))
    return latencies, pipeline


def overhead(
    latencies: list[float], pipeline: list[float]
) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
    """(p50, p99) of the latencies, of the pipeline times, and of each request's difference."""
    added = [c - p for c, p in zip(latencies, pipeline, strict=True)]
    return percentiles(latencies), percentiles(pipeline), percentiles(added)


FLOOR_ROUNDS = 6


def floor(archive: Path, port: int, message, count: int, native: Path | None) -> dict:
    """The served model's overhead next to the bare grpcio server's (``_bare_child``), measured
    in turns (``FLOOR_ROUNDS`` rounds of back-to-back calls to each) so that the machine's drift
    hits both alike. What the served model adds over the bare server is this server's own
    request path; the bare server's figure is what gRPC's Python server and the stages' own
    Python leave on this machine (the floor)."""
    print("  against a bare grpcio server that runs the same stages and nothing else (the floor),")
    print(f"  in {FLOOR_ROUNDS} rounds of back-to-back calls to each server in turn:")
    block = max(1, count // FLOOR_ROUNDS)
    clients = {"python": functools.partial(per_request, message=message, count=block)}
    if native is not None:
        clients["native"] = functools.partial(
            per_request_native, native, message=message, count=block
        )
    figures = {}
    with bare_in_child(archive) as bare:
        for client, measure in clients.items():
            timed: dict[int, Timed] = {server: ([], []) for server in (port, bare)}
            for _ in range(FLOOR_ROUNDS):
                for server, (latencies, pipeline) in timed.items():
                    more_latencies, more_pipeline = measure(server)
                    latencies += more_latencies
                    pipeline += more_pipeline
            served, bare_p50 = (overhead(*timed[server])[2][0] for server in (port, bare))
            print(
                f"    {client:<6} client: served p50 {served * 1e3:6.3f} ms, bare p50 "
                f"{bare_p50 * 1e3:6.3f} ms: the server's own path "
                f"{(served - bare_p50) * 1e3:6.3f} ms (x{served / bare_p50:.2f} of the floor)"
            )
            figures[client] = {"served_p50": served * 1e3, "bare_p50": bare_p50 * 1e3}
    return figures


def throughput(port: int, message, clients: int, seconds: float) -> tuple[float, list[float]]:
    """Requests per second with ``clients`` threads, each on its own channel, for about
    ``seconds``, and the latencies of the requests made meanwhile. The rate is taken over a
    whole number of rounds (``clients`` completions each) between two completions, so that
    answers arriving in bursts (a device batch) are not cut at the window's edges."""
    stop = threading.Event()
    latencies: list[float] = []
    finished: list[float] = []

    def client() -> None:
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            stub.Predict(message, timeout=120)
            while not stop.is_set():
                start = time.perf_counter()
                stub.Predict(message, timeout=120)
                finished.append(end := time.perf_counter())
                latencies.append(end - start)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(2)  # every client has connected and warmed up
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    times = sorted(t for t in finished if t >= start)
    rounds = (len(times) - 1) // clients * clients
    if rounds == 0:
        raise RuntimeError(f"fewer than {clients + 1} answers in {seconds} s: run longer")
    return rounds / (times[rounds] - times[0]), latencies


def stage_rate(runner, value: np.ndarray, seconds: float) -> float:
    """Images per second of one stage alone, back-to-back batches for about ``seconds``
    (at least three), after one warm-up batch."""
    runner(value)
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < seconds:
        runner(value)
        runs += 1
    return runs * len(value) / (time.perf_counter() - start)


def stage_inputs(pipeline: Pipeline, image: bytes) -> list[np.ndarray]:
    """What each stage takes, at a batch of BATCH."""
    values = [np.array([image] * BATCH, dtype=object)]
    for runner in pipeline.runners[:-1]:
        values.append(runner(values[-1]))
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--emulator-seconds", type=float, default=30.0)
    parser.add_argument("--queue-delay-ms", type=float, default=20.0)
    parser.add_argument("--skip-emulator", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the overhead figures here")
    args = parser.parse_args()
    image = photo()
    message = request(image)
    with tempfile.TemporaryDirectory() as folder:
        archive = default_archive(Path(folder))

        print(
            f"Server overhead: ResNet-50 pipeline, batch-1 {len(image) // 1024} KiB JPEG, device "
            f"stand-in answering instantly; {args.requests} requests; {os.cpu_count()} CPUs; "
            "server and client in separate processes"
        )
        print(machine_wakeups())
        with serve_in_child(archive, "instant") as port:
            timed = per_request(port, message, args.requests)
            (c50, c99), (p50, p99), (a50, a99) = overhead(*timed)
            print("  per request, against the server's own stage times (server-timing):")
            print(f"    client over gRPC        p50 {c50 * 1e3:7.3f} ms   p99 {c99 * 1e3:7.3f} ms")
            print(f"    pipeline in the server  p50 {p50 * 1e3:7.3f} ms   p99 {p99 * 1e3:7.3f} ms")
            print(
                f"    server overhead         p50 {a50 * 1e3:7.3f} ms   p99 {a99 * 1e3:7.3f} ms"
                "   (goal: p50 <= 1 ms)"
            )
            _, (ip50, _), (i50, i99) = overhead(*per_request(port, message, args.requests, IDLE_S))
            print(f"  the same, each call after {IDLE_S * 1e3:.0f} ms idle:")
            print(f"    pipeline in the server  p50 {ip50 * 1e3:7.3f} ms")
            print(f"    server overhead         p50 {i50 * 1e3:7.3f} ms   p99 {i99 * 1e3:7.3f} ms")
            native, why_not = build_native_client()
            native_figures = {}
            if native is None:
                print(f"  the native client is skipped: {why_not}")
            else:
                print("  the same, measured by the native client (bench/native_client.cc):")
                for key, idle in (("back_to_back", 0.0), ("after_idle", IDLE_S)):
                    timed = per_request_native(native, port, message, args.requests, idle)
                    _, _, (n50, n99) = overhead(*timed)
                    print(
                        f"    server overhead, {key.replace('_', ' '):<12} "
                        f"p50 {n50 * 1e3:7.3f} ms   p99 {n99 * 1e3:7.3f} ms"
                    )
                    native_figures[key] = {"p50": n50 * 1e3, "p99": n99 * 1e3}
            floor_figures = floor(archive, port, message, args.requests, native)
            with Pipeline.load(archive, InstantDevice()) as pipeline:
                local, remote = interleaved(pipeline, port, image, args.requests)
            (l50, l99), (r50, r99) = percentiles(local), percentiles(remote)
            print("  against in-process Pipeline.run in the client, alternating:")
            print(f"    in-process Pipeline.run p50 {l50 * 1e3:7.3f} ms   p99 {l99 * 1e3:7.3f} ms")
            print(f"    client over gRPC        p50 {r50 * 1e3:7.3f} ms   p99 {r99 * 1e3:7.3f} ms")
            print(
                f"    difference              p50 {(r50 - l50) * 1e3:7.3f} ms   "
                f"p99 {(r99 - l99) * 1e3:7.3f} ms"
            )
            one, report = None, {
                "overhead_ms": {"p50": a50 * 1e3, "p99": a99 * 1e3},
                "overhead_after_idle_ms": {"p50": i50 * 1e3, "p99": i99 * 1e3},
                "vs_in_process_ms": {"p50": (r50 - l50) * 1e3, "p99": (r99 - l99) * 1e3},
                "concurrency": [],
            }  # fmt: skip
            if native_figures:
                report["native_client_overhead_ms"] = native_figures
            report["floor_ms"] = floor_figures
            for clients in (1, 4, 16):
                rate, latencies = throughput(port, message, clients, args.seconds)
                one = one or rate
                p50, p99 = percentiles(latencies)
                print(
                    f"  {clients:>2} clients: {rate:8.1f} requests/s   x{rate / one:.2f} of one"
                    f"   latency p50 {p50 * 1e3:6.2f} ms  p99 {p99 * 1e3:6.2f} ms"
                )
                report["concurrency"].append(
                    {"clients": clients, "requests_per_s": rate, "p50_ms": p50 * 1e3,
                     "p99_ms": p99 * 1e3}
                )  # fmt: skip

        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        if args.skip_emulator:
            return 0
        print(f"\nPipelining: the same pipeline with the emulator as device, max batch {BATCH}")
        with open_device("emulator") as emulator, Pipeline.load(archive, emulator) as pipeline:
            values = stage_inputs(pipeline, image)
            rates = {
                stage["name"]: stage_rate(runner, value, seconds=3)
                for stage, runner, value in zip(
                    pipeline.stages, pipeline.runners, values, strict=True
                )
            }
            for name, rate in rates.items():
                print(f"  stage {name:<12} alone: {rate:8.2f} images/s (batch {BATCH})")
            slowest = min(rates, key=rates.get)
            index = [stage["name"] for stage in pipeline.stages].index(slowest)
            own = [rates[slowest]]
            for delay_ms in (0.0, args.queue_delay_ms):
                with serve_in_child(archive, "emulator", delay_ms / 1e3) as port:
                    rate, _ = throughput(port, message, 16, args.emulator_seconds)
                own.append(stage_rate(pipeline.runners[index], values[index], seconds=6))
                baseline = (own[-2] + own[-1]) / 2
                print(
                    f"  16 clients, max queue delay {delay_ms:g} ms: {rate:8.2f} images/s = "
                    f"{rate / baseline:.1%} of {slowest} alone before and after "
                    f"({own[-2]:.2f}, {own[-1]:.2f} images/s; goal >= 90%)"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
