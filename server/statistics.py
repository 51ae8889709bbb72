"""Cumulative per-version counts and durations, as Triton's statistics extension reports them
(perf_analyzer reads them to split latency into queue and compute). Prometheus holds the same
information as histograms for scraping; these are exact totals a client can difference between
two calls.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

# The server's stage roles in Triton's terms.
COMPUTE = {"preprocess": "compute_input", "device": "compute_infer", "classify": "compute_output"}


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += round(seconds * 1e9)


@dataclass
class Snapshot:
    """A consistent copy of one version's statistics."""

    last_inference_ms: int
    inference_count: int
    execution_count: int
    requests: dict[str, Duration]  # success, fail, queue, compute_input/infer/output
    batches: dict[int, dict[str, Duration]]  # batch size -> compute_input/infer/output


@dataclass
class ModelStatistics:
    """Thread-safe; one per served model version, gone with it."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _last_inference_ms: int = 0
    _inference_count: int = 0
    _execution_count: int = 0
    _requests: defaultdict[str, Duration] = field(default_factory=lambda: defaultdict(Duration))
    _batches: defaultdict[int, defaultdict[str, Duration]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(Duration))
    )

    def observe_request(
        self, ok: bool, seconds: float, timings: dict[str, float], items: int
    ) -> None:
        """A request the model answered (``ok``) or failed after admission. Queue and compute
        times count for answered requests only, as Triton counts them; a request that entered
        after a stage counts zero time for it."""
        with self._lock:
            self._last_inference_ms = time.time_ns() // 1_000_000
            self._requests["success" if ok else "fail"].add(seconds)
            if not ok:
                return
            self._inference_count += items
            self._requests["queue"].add(timings.get("queue", 0.0))
            for role, name in COMPUTE.items():
                self._requests[name].add(timings.get(role, 0.0))

    def observe_batch(self, role: str, size: int, seconds: float) -> None:
        """A batch of ``size`` items that stage ``role`` ran; a device batch is an execution."""
        with self._lock:
            self._execution_count += role == "device"
            self._batches[size][COMPUTE[role]].add(seconds)

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot(
                self._last_inference_ms,
                self._inference_count,
                self._execution_count,
                {name: Duration(d.count, d.ns) for name, d in self._requests.items()},
                {
                    size: {name: Duration(d.count, d.ns) for name, d in stages.items()}
                    for size, stages in sorted(self._batches.items())
                },
            )
