"""Batching, admission, deadlines, device faults and draining, on the real server. A gated
emulator holds the device so that queues can be filled deterministically."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import GatedDevice, channel, eventually, jpeg, requests_counted, running
from tensorflow_serving.apis import prediction_service_pb2_grpc
from test_server import predict_request

from fpgaserve.pipeline import Pipeline
from fpgaserve.server import BatchingConfig, ServerConfig
from fpgaserve.server.core import SERVER_TIMING, parse_server_timing
from fpgaserve.server.errors import Cancelled, InvalidArgument, ServingError
from fpgaserve.server.scheduler import Job, Scheduler, StageSpec


def stub_of(ch):
    return prediction_service_pb2_grpc.PredictionServiceStub(ch)


def wait_for_runs(scheduler, in_flight: int) -> None:
    eventually(lambda: scheduler.in_flight == in_flight, timeout=30)


def held_requests(pool: ThreadPoolExecutor, ch, scheduler, count: int) -> list:
    """``count`` Predict calls in flight behind a closed device gate, accepted by the server."""
    futures = [
        pool.submit(stub_of(ch).Predict, predict_request([jpeg(i)]), timeout=60)
        for i in range(count)
    ]
    wait_for_runs(scheduler, count)
    return futures


def test_queued_requests_share_a_device_batch_and_get_their_own_bits(archive):
    device = GatedDevice()
    config = ServerConfig(archives=[archive], batching=BatchingConfig(max_batch_size=8))
    with running(config, device) as server, channel(server) as ch, ThreadPoolExecutor(8) as pool:
        model = server.repository.get("tiny")
        device.gate.clear()
        runs_before = device.runs
        futures = [pool.submit(stub_of(ch).Predict, predict_request([jpeg(i)]), timeout=60)
                   for i in range(5)]  # fmt: skip
        wait_for_runs(model.scheduler, 5)
        time.sleep(0.2)  # let the preprocess stage hand everything to the device queue
        device.gate.set()
        results = [tf.make_ndarray(f.result().outputs["output_alias"]) for f in futures]
        # The first request ran alone (the device was idle); the other four waited together.
        assert device.runs - runs_before == 2
    with Pipeline.load(archive) as pipeline:
        for i, result in enumerate(results):
            expected = pipeline.run({"images": [jpeg(i)]})["probabilities"]
            np.testing.assert_array_equal(result, expected)


def test_overload_is_refused_at_once_and_bounded(archive):
    device = GatedDevice()
    batching = BatchingConfig(max_batch_size=2, max_queue_size=4)
    config = ServerConfig(archives=[archive], batching=batching)
    with running(config, device) as server, channel(server) as ch, ThreadPoolExecutor(4) as pool:
        model = server.repository.get("tiny")
        device.gate.clear()
        futures = held_requests(pool, ch, model.scheduler, 4)
        with pytest.raises(grpc.RpcError) as info:
            stub_of(ch).Predict(predict_request([jpeg()]), timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "overloaded" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub_of(ch).Predict(predict_request([jpeg()] * 5), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # can never fit
        device.gate.set()
        assert all(f.result().outputs["output_alias"].float_val for f in futures)
        eventually(lambda: model.scheduler.in_flight == 0)


def test_deadlines_and_cancellation_free_their_place_and_are_counted_once(archive, caplog):
    """Each call is counted (metrics, access log) after its answer is sent, by gRPC's
    end-of-call callback; one whose client left first is counted when the server gives up."""
    caplog.set_level(logging.INFO, logger="fpgaserve.access")
    device = GatedDevice()
    with running(ServerConfig(archives=[archive]), device) as server, channel(server) as ch:
        model = server.repository.get("tiny")
        device.gate.clear()
        with pytest.raises(grpc.RpcError) as info:
            stub_of(ch).Predict(predict_request([jpeg()]), timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        call = stub_of(ch).Predict.future(predict_request([jpeg(1)]), timeout=60)
        wait_for_runs(model.scheduler, 2)
        call.cancel()
        device.gate.set()
        eventually(lambda: model.scheduler.in_flight == 0)
        assert stub_of(ch).Predict(predict_request([jpeg()]), timeout=60).outputs
        codes = ["DEADLINE_EXCEEDED", "CANCELLED", "OK"]
        eventually(lambda: all(requests_counted(server, "Predict", code) for code in codes))
        assert [requests_counted(server, "Predict", code) for code in codes] == [1, 1, 1]
    access = [r for r in caplog.records if getattr(r, "method", None) == "Predict"]
    assert sorted(r.code for r in access) == sorted(codes)
    assert len({r.request_id for r in access}) == 3


def test_a_lone_request_never_waits_for_a_batch(archive):
    # A 30 s batching delay applies only while other requests are on their way.
    batching = BatchingConfig(max_batch_size=8, max_queue_delay_s=30.0)
    config = ServerConfig(archives=[archive], batching=batching)
    with running(config) as server, channel(server) as ch:
        assert stub_of(ch).Predict(predict_request([jpeg()]), timeout=10).outputs


def test_device_fault_flips_health_and_recovers_without_restart(archive):
    device = GatedDevice()
    with running(ServerConfig(archives=[archive]), device) as server, channel(server) as ch:
        health = health_pb2_grpc.HealthStub(ch)

        def status(service=""):
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

        device.failing.set()
        with pytest.raises(grpc.RpcError) as info:
            stub_of(ch).Predict(predict_request([jpeg()]), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "retry" in info.value.details()
        assert status("tiny") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
        device.failing.clear()  # the board is back: the server's own probe notices
        eventually(lambda: status("tiny") == health_pb2.HealthCheckResponse.SERVING)
        assert status() == health_pb2.HealthCheckResponse.SERVING
        assert stub_of(ch).Predict(predict_request([jpeg()]), timeout=30).outputs


def test_stop_drains_accepted_requests(archive):
    device = GatedDevice()
    config = ServerConfig(archives=[archive], drain_seconds=30)
    with running(config, device) as server, channel(server) as ch, ThreadPoolExecutor(4) as pool:
        model = server.repository.get("tiny")
        device.gate.clear()
        futures = held_requests(pool, ch, model.scheduler, 3)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        eventually(lambda: server.core.draining)
        with pytest.raises(grpc.RpcError) as info:  # new work is refused while draining
            stub_of(ch).Predict(predict_request([jpeg()]), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        device.gate.set()
        assert all(f.result().outputs["output_alias"].float_val for f in futures)  # none lost
        stopper.join(30)
        assert not stopper.is_alive()


def test_server_timing_trailer_adds_up(archive):
    with running(ServerConfig(archives=[archive])) as server, channel(server) as ch:
        _, call = stub_of(ch).Predict.with_call(predict_request([jpeg()]), timeout=60)
    (timing,) = [value for key, value in call.trailing_metadata() if key == SERVER_TIMING]
    seconds = parse_server_timing(timing)
    assert set(seconds) >= {"queue", "preprocess", "device", "classify", "total"}
    assert all(value >= 0 for value in seconds.values())
    stages = seconds["preprocess"] + seconds["device"] + seconds["classify"]
    assert seconds["total"] >= stages - 3e-6  # each figure is rounded to the microsecond


def test_waiting_for_a_busy_device_counts_as_queue_time(archive):
    """Found in review: only the wait before the first stage was counted, so under load the
    queue histogram stayed near 0 while total grew."""
    device = GatedDevice()
    with running(ServerConfig(archives=[archive]), device) as server, channel(server) as ch, \
            ThreadPoolExecutor(2) as pool:  # fmt: skip
        scheduler = server.repository.get("tiny").scheduler
        device.gate.clear()
        first = pool.submit(stub_of(ch).Predict, predict_request([jpeg(0)]), timeout=60)
        wait_for_runs(scheduler, 1)
        second = pool.submit(stub_of(ch).Predict.with_call, predict_request([jpeg(1)]), timeout=60)
        wait_for_runs(scheduler, 2)
        time.sleep(0.5)  # the second request is preprocessed and waits for the device
        device.gate.set()
        first.result()
        _, call = second.result()
    (timing,) = [value for key, value in call.trailing_metadata() if key == SERVER_TIMING]
    seconds = parse_server_timing(timing)
    assert seconds["queue"] >= 0.4
    parts = sum(seconds[name] for name in ("queue", "preprocess", "device", "classify"))
    assert parts == pytest.approx(seconds["total"], abs=0.02)  # where the time went, all of it


# -- the scheduler on its own: which thread runs what ----------------------------------------


class Stages:
    """Three stages adding 1, 10 and 100, recording (stage, batch size, thread) per run; the
    middle one waits while ``gate`` is closed."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.runs: list[tuple[int, int, int]] = []

    def stage(self, index: int) -> StageSpec:
        def run(batch):
            self.runs.append((index, len(batch), threading.get_ident()))
            if index == 1:
                assert self.gate.wait(30)
            return batch + 10**index

        return StageSpec(("preprocess", "device", "classify")[index], f"out{index}", run)

    def scheduler(self, device_inline: bool = True, **batching) -> Scheduler:
        stages = [self.stage(i) for i in range(3)]
        stages[1] = replace(stages[1], inline=device_inline)
        return Scheduler("test", stages, 1, BatchingConfig(**batching))


def job(value: float, **extra) -> Job:
    return Job(np.array([value]), 1, 0, 2, frozenset({"out2"}), **extra)


def test_a_lone_job_runs_every_stage_on_its_callers_thread():
    stages = Stages()
    scheduler = stages.scheduler()
    try:
        done = scheduler.submit(job(1.0))
        assert done.future.done()  # no hand-off to a worker thread
        np.testing.assert_array_equal(done.future.result()["out2"], [112.0])
        me = threading.get_ident()
        assert stages.runs == [(0, 1, me), (1, 1, me), (2, 1, me)]
    finally:
        scheduler.close(10)


def test_a_busy_stage_hands_jobs_to_its_worker_which_batches_them():
    stages = Stages()
    scheduler = stages.scheduler(max_batch_size=8)
    pool = ThreadPoolExecutor(1)
    try:
        stages.gate.clear()
        first = pool.submit(scheduler.submit, job(1.0))  # holds the device stage
        eventually(lambda: len(stages.runs) == 2, timeout=30)
        # The device is busy: these two pass the idle preprocess stage on this thread, then
        # queue for the device instead of blocking their caller.
        waiting = [scheduler.submit(job(2.0)), scheduler.submit(job(3.0))]
        assert not any(j.future.done() for j in waiting)
        stages.gate.set()
        results = [first.result(30).future.result(30)] + [j.future.result(30) for j in waiting]
        assert [r["out2"][0] for r in results] == [112.0, 113.0, 114.0]
        me, caller = threading.get_ident(), stages.runs[0][2]
        device_runs = [(size, thread) for index, size, thread in stages.runs if index == 1]
        assert device_runs[0] == (1, caller)
        ((size, worker),) = device_runs[1:]  # one batch of both, on the stage's own thread
        assert size == 2 and worker not in (me, caller)
        assert [thread for index, _, thread in stages.runs if index == 0] == [caller, me, me]
    finally:
        stages.gate.set()
        pool.shutdown()
        scheduler.close(10)


def test_a_thread_bound_device_stage_runs_only_on_its_worker():
    stages = Stages()
    scheduler = stages.scheduler(device_inline=False)
    try:
        done = scheduler.submit(job(1.0))
        np.testing.assert_array_equal(done.future.result(30)["out2"], [112.0])
        me = threading.get_ident()
        (_, _, preprocess), (_, _, device), (_, _, classify) = stages.runs
        assert preprocess == me and device != me
        assert classify != me  # the device worker hands on; it never runs a CPU stage
    finally:
        scheduler.close(10)


def test_a_job_whose_caller_left_is_dropped_before_its_next_stage():
    stages = Stages()
    scheduler = stages.scheduler()
    try:
        gone = threading.Event()
        stages.gate.clear()
        threading.Timer(0.2, lambda: (gone.set(), stages.gate.set())).start()
        dropped = scheduler.submit(job(1.0, caller_gone=gone.is_set))
        with pytest.raises(Cancelled):
            dropped.future.result(30)
        assert [index for index, _, _ in stages.runs] == [0, 1]  # classify never ran
        assert scheduler.in_flight == 0
    finally:
        scheduler.close(10)


@pytest.mark.parametrize(
    ("output", "refused"),
    [
        (np.full((1, 4), 3e38, np.float32), False),  # finite, though its sum overflows float32
        (np.full((1, 4), 1e308), False),  # and float64
        (np.array([[np.nan]]), True),
        (np.array([[1.0, np.nan]], np.float32), True),
        (np.array([[1.0, -np.inf]], np.float32), True),
    ],
)
def test_an_answer_that_is_not_finite_is_refused_and_only_that(output, refused):
    stage = StageSpec("classify", "out", lambda batch: output)
    scheduler = Scheduler("test", [stage], 0, BatchingConfig())
    try:
        done = scheduler.submit(Job(np.array([0.0]), 1, 0, 0, frozenset({"out"})))
        if refused:
            with pytest.raises(InvalidArgument, match="not finite"):
                done.future.result(30)
        else:
            np.testing.assert_array_equal(done.future.result(30)["out"], output)
    finally:
        scheduler.close(10)


def test_a_stage_that_answers_the_wrong_number_of_items_fails_every_job_it_ran():
    """A batch's answer is cut into its jobs' rows: a stage that answered more or fewer items
    than it was given would hand jobs other jobs' rows, so each job fails instead, alone or in
    a batch of several."""
    gate, sizes = threading.Event(), []

    def run(batch):
        sizes.append(len(batch))
        assert gate.wait(30)
        return np.concatenate([batch, batch])

    scheduler = Scheduler("test", [StageSpec("classify", "out", run)], 0, BatchingConfig())
    pool = ThreadPoolExecutor(1)
    try:
        first = pool.submit(scheduler.submit, Job(np.array([0.0]), 1, 0, 0, frozenset({"out"})))
        eventually(lambda: sizes == [1], timeout=30)  # holds the stage; the next two queue
        queued = [
            scheduler.submit(Job(np.array([float(i)]), 1, 0, 0, frozenset({"out"}))) for i in (1, 2)
        ]
        gate.set()
        for done in [first.result(30), *queued]:
            with pytest.raises(ServingError, match="answered 2 items for 1"):
                done.future.result(30)
        assert sizes == [1, 2, 1, 1]  # the batch of two failed, then each of its jobs alone
        assert scheduler.in_flight == 0
    finally:
        gate.set()
        pool.shutdown()
        scheduler.close(10)
