"""The HAL device interface: open, describe, load a program, run a batch, unload, close.

Backends subclass ``Device`` and implement ``_load`` and ``_run``; the base class owns the
lifecycle, the handle table and input validation, so every backend rejects bad input the same way.
"""

from __future__ import annotations

import itertools
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DeviceClosedError, InvalidInputError, UnknownProgramError
from .numerics import canonicalize
from .program import Program, Shape


@dataclass(frozen=True)
class DeviceInfo:
    """What ``fpgaserve devices`` lists for one device."""

    name: str
    backend: str
    kind: str
    description: str
    formats: tuple[str, ...]
    memory_bytes: int | None = None
    compiles_from_source: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": self.backend,
            "kind": self.kind,
            "description": self.description,
            "formats": list(self.formats),
            "memory_bytes": self.memory_bytes,
            "compiles_from_source": self.compiles_from_source,
        }


@dataclass(frozen=True)
class LoadedProgram:
    """A program accepted by a device, with its validated tensor shapes."""

    handle: int
    program: Program
    shapes: dict[str, Shape]
    state: Any


class Device(ABC):
    """One accelerator (or its emulation). Thread-safe: a server runs batches from many threads."""

    # True for a backend that keeps state per calling thread (command queues, memory pools): a
    # server then runs it from one worker thread per model, never from its request threads.
    thread_bound = False

    def __init__(self, info: DeviceInfo) -> None:
        self.info = info
        self._programs: dict[int, LoadedProgram] = {}
        self._handles = itertools.count(1)
        self._lock = threading.Lock()
        self._open = False

    def __enter__(self) -> Device:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._open

    def open(self) -> None:
        self._open = True

    def close(self) -> None:
        """Release every loaded program; closing twice is harmless."""
        with self._lock:
            self._programs.clear()
            self._open = False

    def load(self, program: Program) -> int:
        """Validate ``program`` and place it (weights included) on the device; returns a handle."""
        self._require_open()
        shapes = program.shapes()
        state = self._load(program, shapes)
        with self._lock:
            handle = next(self._handles)
            self._programs[handle] = LoadedProgram(handle, program, shapes, state)
        return handle

    def unload(self, handle: int) -> None:
        with self._lock:
            if self._programs.pop(handle, None) is None:
                raise UnknownProgramError(f"no program with handle {handle} is loaded")

    def run(self, handle: int, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch: every input is float32 (N, *shape) with the same N >= 1."""
        self._require_open()
        with self._lock:
            loaded = self._programs.get(handle)
        if loaded is None:
            raise UnknownProgramError(f"no program with handle {handle} is loaded")
        return self._run(loaded, self._check_inputs(loaded, inputs))

    def last_kernel_seconds(self) -> float | None:
        """On-device time of the calling thread's last ``run``, from the backend's profiling
        (None where there is none, e.g. the emulator). The server records it as a metric."""
        return None

    def _require_open(self) -> None:
        if not self._open:
            raise DeviceClosedError(f"device {self.info.name!r} is not open")

    @staticmethod
    def _check_inputs(
        loaded: LoadedProgram, inputs: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        expected = loaded.program.inputs
        if set(inputs) != set(expected):
            raise InvalidInputError(
                f"program takes inputs {sorted(expected)}, got {sorted(inputs)}"
            )
        batch = None
        checked = {}
        for name, value in inputs.items():
            array = np.asarray(value)
            if array.dtype != np.float32:
                raise InvalidInputError(
                    f"input {name!r} must be float32, got {array.dtype}; convert it first"
                )
            want = loaded.shapes[name]
            if array.ndim != len(want) + 1 or tuple(array.shape[1:]) != want:
                raise InvalidInputError(
                    f"input {name!r} must have shape (batch, {', '.join(map(str, want))}), "
                    f"got {array.shape}"
                )
            if array.shape[0] < 1 or (batch is not None and array.shape[0] != batch):
                raise InvalidInputError("inputs need one common batch size of at least 1")
            batch = array.shape[0]
            checked[name] = canonicalize(array)
        return checked

    @abstractmethod
    def _load(self, program: Program, shapes: dict[str, Shape]) -> Any:
        """Backend part of ``load``: upload weights, build kernels; returns backend state."""

    @abstractmethod
    def _run(self, loaded: LoadedProgram, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Backend part of ``run``: inputs are validated and canonical."""
