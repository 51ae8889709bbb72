"""The server's own Python per request, measured hot and in-process, against the floor's.

The end-to-end overhead (``bench/server_overhead.py``) drifts with the machine's phase by more
than any one change to the server; the Python that the server runs for a request does not. Here
the served model's Predict and the floor's (``bare_predict``: the stages and nothing else) run in
one process, with each stage replaced by a replay of its real output, so that only the request
path's own work is timed. Each call includes parsing the request and serializing the answer, as
gRPC would; the served model's accounting (metrics and the access log line, which gRPC runs once
the answer is sent) is timed on its own.

Both are timed twice: hot, back to back; and after the real stages, which run (untimed)
before each call, as a served request's Python runs right after its milliseconds of TensorFlow,
with the caches full of other data. The served path slows there and the floor's does not, so a
microsecond saved hot is worth more in the server. The end-to-end figure is slower again (gRPC's
threads, the VM waking idle CPUs); the ratio to the floor is what carries over.

Usage: python bench/request_path.py [--calls 2000] [--cold-calls 300] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import grpc
from server_overhead import (
    PREDICT,
    InstantDevice,
    bare_predict,
    default_archive,
    photo,
    request,
    serve,
)
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2

from fpgaserve.server import FpgaServer
from fpgaserve.server.core import parsing_handler
from fpgaserve.server.logs import configure as configure_logs
from fpgaserve.server.tfserving import PredictionService
from fpgaserve.wire import from_tensor_proto


class _Details(NamedTuple):
    method: str
    invocation_metadata: tuple


class _Context:
    """What a handler asks of grpcio's servicer context, for a call with a 60 s deadline that
    stays active; the callbacks it registers are kept to run as gRPC would, after the answer."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], None]] = []

    def invocation_metadata(self) -> tuple:
        return ()

    def time_remaining(self) -> float:
        return 60.0

    def is_active(self) -> bool:
        return True

    def set_trailing_metadata(self, metadata: Any) -> None:
        self.trailing = metadata

    def send_initial_metadata(self, metadata: Any) -> None:
        self.initial = metadata

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self.callbacks.append(callback)
        return True

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"the benchmark's request was refused: {code.name}: {details}")


def _replayed(run: Callable[[Any], Any], value: Any) -> tuple[Callable[[Any], Any], Any]:
    """A stage function that answers ``run(value)`` at once, and that answer."""
    output = run(value)
    return (lambda _value: output), output


def _median_us(
    function: Callable[[], object], calls: int, before: Callable[[], object] | None = None
) -> float:
    """The median time of ``calls`` calls of ``function``, each after ``before`` (untimed)."""
    times = []
    for _ in range(calls):
        if before is not None:
            before()
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--cold-calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    raw = request(photo()).SerializeToString()
    with tempfile.TemporaryDirectory() as folder:
        archive = default_archive(Path(folder))
        with open(Path(folder) / "access.log", "w") as log:
            configure_logs("json", stream=log)  # an access log line per request, as deployed
            server = serve(archive, InstantDevice())
            try:
                figures = _measure(server, raw, args.rounds, args.calls, args.cold_calls)
            finally:
                server.stop(5)
    print(
        f"Request path, in-process: batch-1 Predict, stages replayed; medians of {args.rounds} "
        f"rounds of {args.calls} calls hot and {args.cold_calls} after the real stages"
    )
    print(f"  {'':11s} {'hot':>7s}    {'after the stages':>16s}")
    columns = {key: statistics.median(f[key] for f in figures) for key in figures[0]}
    for name, what in (
        ("floor", "the stages and nothing else (bare_predict)"),
        ("served", "Predict as the server runs it, up to the answer"),
        ("accounting", "then metrics and access line, after the answer"),
    ):
        hot, cold = columns[(name, "hot")], columns[(name, "cold")]
        print(f"  {name:11s} {hot:7.1f} us {cold:13.1f} us   {what}")
    for mode in ("hot", "cold"):
        served, bare = columns[("served", mode)], columns[("floor", mode)]
        own = served - bare
        print(f"  {mode:>4s}: served / floor x{served / bare:.2f}; its own path {own:.1f} us")
    return 0


def _measure(
    server: FpgaServer, raw: bytes, rounds: int, calls: int, cold_calls: int
) -> list[dict[tuple[str, str], float]]:
    """Per round, microseconds per call of the floor, the served path and its accounting, each
    hot and after the real stages ("cold"); the stages of the served model are replaced by
    replays of their real outputs first."""
    (model,) = server.repository.served()
    message = predict_pb2.PredictRequest.FromString(raw)
    value = from_tensor_proto("images", message.inputs["images"])
    stages = functools.partial(model.pipeline.run, {"images": value})  # the real ones
    scheduler = model.scheduler
    for index, spec in enumerate(scheduler.stages):
        run, value = _replayed(spec.run, value)
        scheduler.stages[index] = dataclasses.replace(spec, run=run)
    runners = [spec.run for spec in scheduler.stages]
    handler = parsing_handler(PredictionService(server.core), prediction_service_pb2)
    method = handler.service(_Details(PREDICT, ()))
    pending: list[Callable[[], None]] = []

    def served() -> bytes:
        context = _Context()
        answer = method.response_serializer(method.unary_unary(raw, context))
        pending.extend(context.callbacks)
        return answer

    def bare() -> bytes:
        parsed = predict_pb2.PredictRequest.FromString(raw)
        return bare_predict(runners, parsed, _Context()).SerializeToString()

    def account() -> None:
        pending.pop()()

    figures = []
    for _ in range(rounds):
        figure = {}
        for mode, count, before in (("hot", calls, None), ("cold", cold_calls, stages)):
            figure["served", mode] = _median_us(served, count, before)
            figure["floor", mode] = _median_us(bare, count, before)
            figure["accounting", mode] = _median_us(account, count, before)
            pending.clear()
        figures.append(figure)
    return figures


if __name__ == "__main__":
    raise SystemExit(main())
