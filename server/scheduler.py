"""Stage pipelining and dynamic batching for one model version.

Each pipeline stage has its own worker thread and queue, so while the device featurizes one batch
the CPU preprocesses the next and classifies the previous one: throughput approaches the slowest
stage, not the sum. A worker takes everything already waiting (up to the batch limit) and runs it
as one batch; it never waits for company when nothing is on its way, so a lone batch-1 request pays
nothing for batching. A request whose next stage is idle with nothing queued runs that stage on
its caller's own thread, so a lone request does not pay a thread hand-off (about 60 us each)
either; under load the stages are busy and their workers batch as before. Admission is bounded:
past ``max_queue_size`` images in flight a request is refused at once with RESOURCE_EXHAUSTED
instead of growing memory without bound.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    ServingError,
    Unavailable,
    as_serving_error,
)


@dataclass(frozen=True)
class BatchingConfig:
    """Per-model batching limits (``fpgaserve serve --max-batch-size`` etc.)."""

    max_batch_size: int = 8
    # How long the device stage may hold a partial batch for requests already in earlier
    # stages. Never spent when nothing is upstream.
    max_queue_delay_s: float = 0.0
    max_queue_size: int = 64

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue_size < 1 or self.max_queue_delay_s < 0:
            raise ValueError(
                "batching needs max_batch_size >= 1, max_queue_size >= 1, max_queue_delay >= 0"
            )


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (time.monotonic), never negative; None: no deadline."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def check_request_size(size: int, config: BatchingConfig) -> None:
    """More items than the queue holds could never be admitted: the client's error."""
    if size > config.max_queue_size:
        raise InvalidArgument(
            f"a request may carry at most {config.max_queue_size} images; got {size}: split it "
            "into smaller requests"
        )


@dataclass(frozen=True)
class StageSpec:
    """One stage as the scheduler sees it: a batch function and where its time is reported."""

    role: str  # "preprocess", "device" or "classify": the metric label
    output: str
    run: Callable[[Any], np.ndarray]
    batches: bool = True  # False: one request per call (the stage's function is not batch-safe)
    # False: always run on the stage's worker thread, never on a request's (a device that keeps
    # state per thread would otherwise build it on every request thread).
    inline: bool = True
    # Extra timings of the batch just run, read on the same thread (e.g. the device's own
    # kernel time from OpenCL profiling events), recorded for every job in the batch.
    profile: Callable[[], dict[str, float]] = dict


@dataclass(eq=False)
class Job:
    """One request: ``size`` images entering at stage ``start`` and leaving after ``last``."""

    value: Any
    size: int
    start: int
    last: int
    wanted: frozenset[str]
    deadline: float | None = None  # time.monotonic() seconds
    # Asked before each stage (e.g. whether the gRPC call is still active): True drops the job.
    caller_gone: Callable[[], bool] = lambda: False
    internal: bool = False  # the server's own (warmup, device probe): not a client's request
    future: Future = field(default_factory=Future)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    submitted: float = field(default_factory=time.perf_counter)
    # When the job became ready for its next stage: the wait from here on counts as "queue".
    ready_since: float = field(init=False)
    _cancelled: bool = False

    def __post_init__(self) -> None:
        self.ready_since = self.submitted

    def cancel(self) -> None:
        """The caller stopped waiting; the job is dropped before its next stage."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled or self.caller_gone()

    def add_time(self, role: str, seconds: float) -> None:
        self.timings[role] = self.timings.get(role, 0.0) + seconds


class _StageQueue:
    def __init__(self, lock: threading.Lock) -> None:
        self.jobs: deque[Job] = deque()
        self.ready = threading.Condition(lock)  # the scheduler's one lock
        self.running = False  # a batch of this stage is running, on its worker or inline


class Scheduler:
    """Runs jobs through ``stages`` (index order) on one thread per stage."""

    def __init__(
        self,
        name: str,
        stages: Sequence[StageSpec],
        device_stage: int,
        config: BatchingConfig,
        on_batch: Callable[[str, list[Job], float], None] = lambda role, jobs, seconds: None,
        on_fault: Callable[[BaseException], None] = lambda exc: None,
        on_success: Callable[[], None] = lambda: None,
    ) -> None:
        self.name, self.stages, self.config = name, list(stages), config
        self.device_stage = device_stage
        self._on_batch, self._on_fault, self._on_success = on_batch, on_fault, on_success
        # One lock for admission and every stage's queue: claiming a stage takes no second lock
        # for the upstream counts, and those counts are read under the lock that changes them.
        self._lock = threading.Lock()
        self._queues = [_StageQueue(self._lock) for _ in self.stages]
        self._in_flight = 0  # images admitted and not yet resolved
        # Jobs that will reach each stage and have not been taken by it yet.
        self._upstream = [0] * len(self.stages)
        self._accepting = True
        self._idle = threading.Condition(self._lock)
        self._threads = [
            threading.Thread(target=self._work, args=(i,), name=f"{name}:{s.role}", daemon=True)
            for i, s in enumerate(self.stages)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, job: Job) -> Job:
        """Admit ``job`` or refuse it at once; the answer arrives on ``job.future``. The stages
        that are idle when the job reaches them run on the calling thread."""
        check_request_size(job.size, self.config)
        with self._lock:
            if not self._accepting:
                raise Unavailable(f"model {self.name} is shutting down; retry on another replica")
            if self._in_flight + job.size > self.config.max_queue_size:
                raise ResourceExhausted(
                    f"model {self.name} is overloaded ({self._in_flight} images in flight, "
                    f"limit {self.config.max_queue_size}); retry with backoff"
                )
            self._in_flight += job.size
            for index in range(job.start + 1, job.last + 1):
                self._upstream[index] += 1
        self._drive(job)
        return job

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new jobs and wait until every admitted one is answered."""
        with self._idle:
            self._accepting = False
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Drain, then stop the worker threads, all within ``timeout`` seconds. False when a
        job or a worker was still running then (stuck in a device run, say)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        drained = self.drain(timeout)
        for queue in self._queues:
            with queue.ready:
                queue.jobs.append(None)  # type: ignore[arg-type]  # the stop signal
                queue.ready.notify()
        for thread in self._threads:
            thread.join(remaining(deadline))
        return drained and not any(thread.is_alive() for thread in self._threads)

    # -- the caller's thread -----------------------------------------------------------------

    def _drive(self, job: Job) -> None:
        """Run ``job``'s stages on this thread while each is idle with nothing queued; hand it
        to the worker of the first stage that is busy."""
        index = job.start
        while self._claim_or_enqueue(index, job):
            try:
                moving = self._run_stage(index, [job])
            finally:
                self._release(index)
            if not moving:
                return
            index += 1

    def _claim_or_enqueue(self, index: int, job: Job) -> bool:
        """Mark stage ``index`` running for ``job`` alone (True), or queue the job for the
        stage's worker (False): when the stage is busy, has jobs waiting, runs only on its
        worker, or is the device stage and may wait for requests still upstream to fill a
        batch."""
        queue, entered = self._queues[index], job.start < index
        with self._lock:
            gathering = (
                index == self.device_stage
                and self.config.max_queue_delay_s > 0
                and self._upstream[index] > entered
            )
            if queue.running or queue.jobs or gathering or not self.stages[index].inline:
                queue.jobs.append(job)
                queue.ready.notify()
                return False
            queue.running = True
            self._upstream[index] -= entered
            return True

    def _release(self, index: int) -> None:
        queue = self._queues[index]
        with self._lock:
            queue.running = False
            if queue.jobs:  # queued while the stage ran: its worker takes them now
                queue.ready.notify()

    # -- workers ---------------------------------------------------------------------------

    def _enqueue(self, index: int, job: Job) -> None:
        queue = self._queues[index]
        with self._lock:
            queue.jobs.append(job)
            queue.ready.notify()

    def _take(self, index: int) -> list[Job] | None:
        """Block for one job and a free stage, then add what is already waiting, up to the
        batch limit."""
        queue, limit = self._queues[index], self.config.max_batch_size
        with queue.ready:
            queue.ready.wait_for(lambda: queue.jobs and not queue.running)
            if queue.jobs[0] is None:
                return None
            batch = [queue.jobs.popleft()]
            queue.running = True
            if not self.stages[index].batches:
                return self._taken(index, batch)
            wait_until = None
            if index == self.device_stage and self.config.max_queue_delay_s > 0:
                wait_until = time.monotonic() + self.config.max_queue_delay_s
            while sum(job.size for job in batch) < limit:
                if queue.jobs and queue.jobs[0] is not None:
                    if sum(job.size for job in batch) + queue.jobs[0].size > limit:
                        break
                    batch.append(queue.jobs.popleft())
                    continue
                # Wait only for requests that are already in earlier stages.
                remaining = (wait_until or 0) - time.monotonic()
                coming = self._upstream[index] - len(queue.jobs) - self._counted(index, batch)
                if remaining <= 0 or coming <= 0:
                    break
                queue.ready.wait(remaining)
            return self._taken(index, batch)

    def _counted(self, index: int, batch: list[Job]) -> int:
        return sum(1 for job in batch if job.start < index)

    def _taken(self, index: int, batch: list[Job]) -> list[Job]:
        """``batch`` leaves the jobs still to reach stage ``index``; called with the lock held."""
        self._upstream[index] -= self._counted(index, batch)
        return batch

    def _work(self, index: int) -> None:
        while (batch := self._take(index)) is not None:
            try:
                moving = self._run_stage(index, batch)
            finally:
                self._release(index)
            for job in moving:
                self._enqueue(index + 1, job)

    def _run_stage(self, index: int, batch: list[Job]) -> list[Job]:
        """Run stage ``index`` on the jobs of ``batch`` still wanted; returns those that go on
        to the next stage."""
        started = time.perf_counter()
        live = [job for job in batch if self._still_wanted(job, index, started)]
        if not live:
            return []
        return self._run_batch(index, self.stages[index], live)

    def _still_wanted(self, job: Job, index: int, now: float) -> bool:
        job.add_time("queue", now - job.ready_since)  # before any stage, not only the first
        # The deadline first: a call past it has ended too, but not because its client left.
        if job.deadline is not None and time.monotonic() > job.deadline:
            self._finish(
                job,
                index,
                DeadlineExceeded(
                    "the deadline passed while the request waited for the "
                    f"{self.stages[index].role} stage; allow more time or reduce load"
                ),
            )
            return False
        if job.cancelled:
            self._finish(job, index, Cancelled("the client cancelled the request"))
            return False
        return True

    def _run_batch(self, index: int, stage: StageSpec, jobs: list[Job]) -> list[Job]:
        started = time.perf_counter()
        alone = len(jobs) == 1
        try:
            merged = jobs[0].value if alone else np.concatenate([job.value for job in jobs])
            result = stage.run(merged)
            if len(result) != len(merged):  # each job's rows would be someone else's
                raise RuntimeError(
                    f"the {stage.role} stage answered {len(result)} items for {len(merged)}"
                )
        except Exception as exc:
            if len(jobs) > 1:  # find whose input failed: each job alone
                failed_attempt = time.perf_counter() - started
                for job in jobs:  # that attempt was this stage's time too
                    job.add_time(stage.role, failed_attempt)
                return [moving for job in jobs for moving in self._run_batch(index, stage, [job])]
            error = as_serving_error(exc)
            if index == self.device_stage:
                self._on_fault(exc)
            elif isinstance(error, InvalidArgument) and jobs[0].size > 1:
                error = _naming_the_row(stage, jobs[0].value, error)
            self._finish(jobs[0], index, error)
            return []
        if index == self.device_stage:
            self._on_success()
        finished = time.perf_counter()
        elapsed = finished - started
        extra = stage.profile()
        self._on_batch(stage.role, jobs, elapsed)
        offset, moving = 0, []
        for job in jobs:
            # A slice is a NumPy call per job and stage, slow in a request's cold path.
            part = result if alone else result[offset : offset + job.size]
            offset += job.size
            job.add_time(stage.role, elapsed)
            for name, seconds in extra.items():
                job.add_time(name, seconds)
            if stage.output in job.wanted:
                job.outputs[stage.output] = part
            if index == job.last:
                self._finish(job, index, None)
            else:
                job.value, job.ready_since = part, finished
                moving.append(job)
        return moving

    def _finish(self, job: Job, index: int, error: ServingError | None) -> None:
        job.timings["total"] = time.perf_counter() - job.submitted
        with self._lock:
            self._in_flight -= job.size
            for later in range(index + 1, job.last + 1):
                self._upstream[later] -= 1
            if self._in_flight == 0 and not self._accepting:  # a drain is waiting
                self._idle.notify_all()
        error = error or _not_finite(job.outputs)
        if error is None:
            job.future.set_result(job.outputs)
        else:
            job.future.set_exception(error)


def _naming_the_row(stage: StageSpec, value: Any, error: InvalidArgument) -> InvalidArgument:
    """``error`` prefixed with the first row of ``value`` that ``stage`` refuses alone (a CPU
    stage's message, e.g. TensorFlow's JPEG decoder's, names none). Tried only once the whole
    request failed, so it costs a valid request nothing."""
    for row in range(len(value)):
        try:
            stage.run(value[row : row + 1])
        except Exception:
            kind = "image" if value.dtype == object else "row"
            return InvalidArgument(f"{kind} {row}: {error}")
    return error


def _not_finite(outputs: dict[str, np.ndarray]) -> InvalidArgument | None:
    """NaN or infinity in an answer: finite inputs far outside the range the model expects
    overflowed float32 inside it. Answering those values would be a silent wrong answer."""
    for name, value in outputs.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            items = sorted({int(i) for i in np.nonzero(~np.isfinite(value))[0]})
            return InvalidArgument(
                f"output {name!r} is not finite (NaN or infinity) for items {items[:10]} of the "
                "request: their values overflowed float32 inside the model; send inputs in the "
                "range the model's preprocessing produces"
            )
    return None
