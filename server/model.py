"""One served model version: its pipeline on the device, its scheduler, its state and health.

Lifecycle (KServe's load / predict, TensorFlow Serving's version states): LOADING (archive
validated, stages loaded, warmup) -> AVAILABLE -> UNLOADING (drain) -> END. A failed load ends in
END with the error kept for ``GetModelStatus``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from fpgaserve.hal import Device
from fpgaserve.pipeline import Pipeline, TensorSpec

from .errors import InvalidArgument, Unavailable
from .images import DEFAULT_MAX_PIXELS, check_images
from .scheduler import BatchingConfig, Job, Scheduler, StageSpec, check_request_size
from .statistics import ModelStatistics

log = logging.getLogger("fpgaserve.server")

LOADING, AVAILABLE, UNLOADING, END = "LOADING", "AVAILABLE", "UNLOADING", "END"


@dataclass(frozen=True)
class Signature:
    """What a client may send and ask for: inputs are the tensors a request may enter with
    (the service input, or the featurizer's input); outputs are the featurizer's output and
    everything after it. ``default_output`` is what Predict returns without an output filter."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    default_output: str
    stage_of: dict[str, int]  # output name -> the stage that produces it


def _roles(stages: Sequence[dict[str, Any]]) -> tuple[list[str], int]:
    kinds = [stage["kind"] for stage in stages]
    device = kinds.index("accelerator")
    roles = ["preprocess" if i < device else "classify" for i in range(len(stages))]
    roles[device] = "device"
    return roles, device


def _warmup_value(spec: TensorSpec, batch: int) -> Any:
    """A valid input of ``batch`` items for ``spec``: a grey JPEG for images, zeros otherwise."""
    if spec.dtype == "string":
        jpeg = tf.io.encode_jpeg(tf.fill((256, 256, 3), tf.constant(128, tf.uint8))).numpy()
        return np.array([jpeg] * batch, dtype=object)
    return np.zeros((batch, *spec.shape[1:]), np.float32)


class ServedModel:
    """A model version the server can route requests to once ``state`` is AVAILABLE."""

    def __init__(
        self,
        name: str,
        version: int,
        path: Path,
        batching: BatchingConfig,
        on_health: Callable[[], None] = lambda: None,
        stamp: tuple[int, ...] = (),
    ) -> None:
        self.name, self.version, self.path, self.batching = name, version, path, batching
        self.stamp = stamp  # `Candidate.stamp` of the archive this instance was loaded from
        self.max_image_pixels = DEFAULT_MAX_PIXELS
        self.state, self.error = LOADING, ""
        self.device_healthy = True
        self._on_health = on_health
        self.pipeline: Pipeline | None = None
        self.scheduler: Scheduler | None = None
        self.signature: Signature | None = None
        self.labels: list[str] | None = None
        self.on_batch: Callable[[str, int], None] = lambda role, size: None
        self.statistics = ModelStatistics()
        self._probe_lock = threading.Lock()

    def load(self, device: Device, warmup: bool = True) -> None:
        """Validate and load the archive, start the stage threads, warm up. Raises on failure
        with the state END and the reason in ``error``."""
        try:
            self.pipeline = Pipeline.load(self.path, device)
            if self.pipeline.name != self.name:
                log.info(
                    "archive %s holds model %r; serving it as %r",
                    self.path,
                    self.pipeline.name,
                    self.name,
                )
            stages = self.pipeline.stages
            roles, device_index = _roles(stages)
            self.signature = Signature(
                # A tensor entering stage i is named as stage i-1's output ("preprocessed").
                inputs=(stages[0]["input"], *(s["output"] for s in stages[:device_index])),
                outputs=tuple(stage["output"] for stage in stages[device_index:]),
                default_output=stages[-1]["output"].name,
                stage_of={stage["output"].name: i for i, stage in enumerate(stages)},
            )
            self.labels = self.pipeline.labels
            specs = [
                StageSpec(role, stage["output"].name, runner)
                for role, stage, runner in zip(roles, stages, self.pipeline.runners, strict=True)
            ]
            specs[device_index] = replace(
                specs[device_index], profile=self._kernel_time, inline=not device.thread_bound
            )
            self.scheduler = Scheduler(
                f"{self.name!r} version {self.version}",
                specs,
                device_index,
                self.batching,
                on_batch=self._batch_ran,
                on_fault=self._device_fault,
                on_success=self._device_ok,
            )
            if warmup:
                self._warmup()
        except BaseException as exc:
            self.state, self.error = END, str(exc)
            self._release()
            raise
        self.state = AVAILABLE
        self._on_health()

    def _batch_ran(self, role: str, jobs: list[Job], seconds: float) -> None:
        self.on_batch(role, sum(job.size for job in jobs))
        clients = sum(job.size for job in jobs if not job.internal)
        if clients:
            self.statistics.observe_batch(role, clients, seconds)

    def _kernel_time(self) -> dict[str, float]:
        seconds = self.pipeline.device.last_kernel_seconds()
        return {} if seconds is None else {"device_kernels": seconds}

    @property
    def ready(self) -> bool:
        return self.state == AVAILABLE and self.device_healthy

    def submit(
        self,
        inputs: dict[str, Any],
        outputs: Sequence[str] | None,
        deadline: float | None,
        caller_gone: Callable[[], bool] = lambda: False,
        internal: bool = False,
    ) -> Job:
        """Check a request against the signature and admit it; the result comes on the job's
        future as {output name: array}. Stages that are idle run on the calling thread."""
        scheduler = self.scheduler
        if scheduler is None or self.state in (UNLOADING, END):
            raise Unavailable(
                f"model {self.name!r} version {self.version} is being unloaded; retry"
            )
        if len(inputs) != 1:
            raise InvalidArgument(
                f"model {self.name!r} takes exactly one input, one of "
                f"{[spec.name for spec in self.signature.inputs]}; got {sorted(inputs)}"
            )
        ((name, value),) = inputs.items()
        spec, start = self._input(name)
        value = _conform(spec, value)
        self.check_items(len(value))  # before any per-image work
        if spec.dtype == "string" and not internal:  # the warmup's 256x256 image is ours
            check_images(value.ravel(), self.max_image_pixels)
        wanted = list(outputs) if outputs else [self.signature.default_output]
        known = [spec.name for spec in self.signature.outputs]
        unknown = sorted(set(wanted) - set(known))
        if unknown:
            raise InvalidArgument(
                f"model {self.name!r} has no outputs {unknown}; choose from {known}"
            )
        job = Job(
            value=value,
            size=len(value),
            start=start,
            last=max(self.signature.stage_of[name] for name in wanted),
            wanted=frozenset(wanted),
            deadline=deadline,
            caller_gone=caller_gone,
            internal=internal,
        )
        return scheduler.submit(job)

    def check_items(self, count: int) -> None:
        """Refuse a request of more items (images) than this model admits at once."""
        check_request_size(count, self.batching)

    def max_elements(self, name: str) -> int:
        """The most elements input ``name`` may hold in one request: adapters refuse a larger
        tensor before decoding it."""
        spec, _ = self._input(name)
        return self.batching.max_queue_size * math.prod(size or 1 for size in spec.shape[1:])

    def _input(self, name: str) -> tuple[TensorSpec, int]:
        for index, spec in enumerate(self.signature.inputs):
            if spec.name == name:
                return spec, index
        raise InvalidArgument(
            f"model {self.name!r} has no input {name!r}; send one of "
            f"{[spec.name for spec in self.signature.inputs]}"
        )

    def unload(self, timeout: float | None = None) -> bool:
        """Drain in-flight requests, then release the device, within ``timeout`` seconds. False
        when a request or a stage was still running then."""
        if self.state in (UNLOADING, END):
            return True
        self.state = UNLOADING
        self._on_health()
        clean = self._release(timeout)
        self.state = END
        self._on_health()
        return clean

    def _release(self, timeout: float | None = None) -> bool:
        clean = self.scheduler is None or self.scheduler.close(timeout)
        if self.pipeline is not None:
            self.pipeline.close()
        self.scheduler = self.pipeline = None
        return clean

    def _warmup(self) -> None:
        """Trace every TensorFlow function and touch the device once at batch 1 and at the
        largest batch, so the first client request is not the slow one."""
        spec = self.signature.inputs[0]
        largest = min(self.batching.max_batch_size, self.batching.max_queue_size)
        for batch in sorted({1, largest}):
            job = self.submit({spec.name: _warmup_value(spec, batch)}, None, None, internal=True)
            job.future.result()

    def _device_fault(self, exc: BaseException) -> None:
        log.error("model %s version %d: device fault: %s", self.name, self.version, exc)
        self.device_healthy = False
        self._on_health()
        threading.Thread(target=self._probe, name=f"{self.name}:recover", daemon=True).start()

    def _device_ok(self) -> None:
        if not self.device_healthy:
            log.info("model %s version %d: device recovered", self.name, self.version)
            self.device_healthy = True
            self._on_health()

    def _probe(self) -> None:
        """While the device is marked failed no traffic arrives (health is NOT_SERVING), so the
        recovery run is made here: retry a warmup batch with backoff until it succeeds."""
        if not self._probe_lock.acquire(blocking=False):
            return
        try:
            delay = 0.1
            while not self.device_healthy and self.state == AVAILABLE:
                time.sleep(delay)
                spec = self.signature.inputs[-1]  # the featurizer input: the device alone
                try:
                    job = self.submit(
                        {spec.name: _warmup_value(spec, 1)},
                        [self.signature.outputs[0].name],
                        None,
                        internal=True,
                    )
                    job.future.result()
                except Exception as exc:
                    log.warning("model %s: device still failing: %s", self.name, exc)
                delay = min(delay * 2, 10.0)
        finally:
            self._probe_lock.release()


# The type as each protocol's clients know it.
_TYPE_NAMES = {
    "string": "string (TF Serving DT_STRING, v2 BYTES)",
    "float32": "float32 (TF Serving DT_FLOAT, v2 FP32)",
}


def _conform(spec: TensorSpec, value: Any) -> Any:
    """Check a decoded request tensor against ``spec`` (dtype, rank, fixed dims, batch >= 1)."""
    array = np.asarray(value)
    want = "string" if spec.dtype == "string" else "float32"
    got = "string" if array.dtype == object or array.dtype.kind in "SU" else str(array.dtype)
    if got != want:
        raise InvalidArgument(f"input {spec.name!r} must be {_TYPE_NAMES[want]}, got {got}")
    if array.ndim != len(spec.shape):
        raise InvalidArgument(
            f"input {spec.name!r} must have shape {_shape(spec.shape)}, got {list(array.shape)}"
        )
    for size, fixed in zip(array.shape, spec.shape, strict=True):
        if fixed is not None and size != fixed:
            raise InvalidArgument(
                f"input {spec.name!r} must have shape {_shape(spec.shape)}, got {list(array.shape)}"
            )
    if array.shape[0] < 1:
        raise InvalidArgument(f"input {spec.name!r} is an empty batch; send at least one item")
    if want == "float32" and not np.isfinite(array).all():
        raise InvalidArgument(f"input {spec.name!r} holds NaN or infinite values")
    return array


def _shape(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("N" if size is None else str(size) for size in shape) + "]"
