"""The OpenCL HAL device: runs accelerator programs through kernels/datapath.cl.

Every op runs as a kernel on one command queue per calling thread, and activations stay in
device memory from the program's inputs to its outputs: a run uploads its inputs once and
fetches its outputs once. Weights and per-channel parameters go to the device when a program is
loaded and stay there until it is unloaded. A matrix op's bias, folded batch norm and
activation are fused into its kernel (the same roundings in the same order).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyopencl as cl

from ..device import Device, DeviceInfo, LoadedProgram
from ..errors import DeviceFaultError, DeviceNotFoundError, InvalidProgramError
from ..formats import FORMATS, BlockFormat, get_format
from ..program import Geometry, Op, Program, Shape
from .kernels import DatapathKernels, DeviceTensor, DeviceWeight, Epilogue

MANIFEST_ENV = "FPGASERVE_BOARD_MANIFEST"
KINDS = {
    cl.device_type.ACCELERATOR: "ACCELERATOR",
    cl.device_type.GPU: "GPU",
    cl.device_type.CPU: "CPU",
}


def device_info(index: int, device: cl.Device) -> DeviceInfo:
    kind = next((name for flag, name in KINDS.items() if device.type & flag), "OTHER")
    return DeviceInfo(
        name=f"opencl:{index}",
        backend="opencl",
        kind=kind,
        description=f"{device.platform.name}: {device.name}",
        formats=tuple(name for name, fmt in FORMATS.items() if isinstance(fmt, BlockFormat)),
        memory_bytes=int(device.global_mem_size),
        compiles_from_source=bool(device.compiler_available),
    )


def board_binary(manifest: Path | None, description: str) -> bytes | None:
    """The binary a board manifest names for this device, if any.

    Manifest (JSON): ``{"binaries": [{"device": "<substring of 'platform: device'>",
    "path": "datapath.aocx"}]}``; relative paths are relative to the manifest.
    """
    if manifest is None:
        return None
    try:
        entries = json.loads(manifest.read_text())["binaries"]
        for entry in entries:
            if str(entry["device"]).lower() in description.lower():
                return (manifest.parent / entry["path"]).read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DeviceNotFoundError(f"board manifest {manifest}: {exc}") from None
    return None


class OpenCLDevice(Device):
    """One OpenCL device; programs in the quantized formats run bit-exact with the emulator."""

    thread_bound = True  # a command queue and a memory pool per thread

    def __init__(self, index: int, device: cl.Device, board_manifest: Path | None = None) -> None:
        super().__init__(device_info(index, device))
        self._cl_device = device
        self._board_manifest = board_manifest or (
            Path(os.environ[MANIFEST_ENV]) if os.environ.get(MANIFEST_ENV) else None
        )
        self._kernels: DatapathKernels | None = None
        self._recovery_lock = threading.Lock()
        self._faulted = False
        self.recoveries = 0

    @property
    def kernel_source(self) -> str:
        """Where the kernels came from: "binary" or "OpenCL C source"."""
        return self._kernels.source if self._kernels else "not open"

    def open(self) -> None:
        """A board manifest's binary wins; otherwise compile from source where possible."""
        binary = board_binary(self._board_manifest, self.info.description)
        if binary is None and not self._cl_device.compiler_available:
            raise DeviceNotFoundError(
                f"{self.info.description} cannot compile OpenCL C and no board manifest "
                f"(${MANIFEST_ENV}) names a binary for it; build one with aoc or v++ "
                "(kernels/README.md)"
            )
        try:
            self._kernels = DatapathKernels(self._cl_device, binary)
        except cl.Error as exc:
            raise DeviceFaultError(f"{self.info.name}: could not build the kernels: {exc}") from exc
        super().open()

    def _load(self, program: Program, shapes: dict[str, Shape]) -> Any:
        if not isinstance(get_format(program.format), BlockFormat):
            raise InvalidProgramError(
                f"{self.info.name} runs the quantized formats; the {program.format} reference "
                "format runs on the emulator"
            )
        return _Plan(program, self._kernels)

    @property
    def healthy(self) -> bool:
        """False between a fault and the recovery that the next run performs."""
        return not self._faulted

    def _recover(self) -> None:
        """Re-create the context and re-upload every loaded program's weights: a lost device
        or a failed command queue heals without restarting the server."""
        self._kernels = DatapathKernels(
            self._cl_device, board_binary(self._board_manifest, self.info.description)
        )
        with self._lock:
            for handle, loaded in list(self._programs.items()):
                state = self._load(loaded.program, loaded.shapes)
                self._programs[handle] = replace(loaded, state=state)
        self._faulted = False
        self.recoveries += 1

    def last_kernel_seconds(self) -> float | None:
        return self._kernels.take_kernel_seconds()

    def _run(self, loaded: LoadedProgram, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            self._kernels.take_kernel_seconds()  # forget what earlier runs left on this thread
            if self._faulted:
                with self._recovery_lock:
                    if self._faulted:
                        self._recover()
                loaded = self._programs[loaded.handle]
            return loaded.state.run(self._kernels, inputs)
        except cl.Error as exc:
            self._faulted = True
            raise DeviceFaultError(
                f"{self.info.name}: OpenCL error, request failed; the device re-initialises "
                f"on the next request ({exc})"
            ) from exc


@dataclass(frozen=True)
class _Step:
    """One op as the device runs it: its constants on the device, and the tensors whose last
    use it is (dropped after it, so their buffers go back to the pool)."""

    op: Op
    weight: DeviceWeight | None
    epilogue: Epilogue
    last_uses: tuple[str, ...]


class _Plan:
    """A loaded program: constants uploaded once, tensor lifetimes worked out once."""

    def __init__(self, program: Program, kernels: DatapathKernels) -> None:
        self.program = program
        self.steps = [
            _Step(op, _weight(kernels, op), _epilogue(kernels, op), released)
            for op, released in zip(program.ops, program.releases(), strict=True)
        ]

    def run(self, kernels: DatapathKernels, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {name: kernels.upload(value) for name, value in inputs.items()}
        for step in self.steps:
            args = [tensors[name] for name in step.op.inputs]
            tensors[step.op.output] = _execute(kernels, step, args)
            for name in step.last_uses:
                del tensors[name]
        return {name: kernels.download(tensors[name]) for name in self.program.outputs}


def _weight(kernels: DatapathKernels, op: Op) -> DeviceWeight | None:
    if op.kind == "conv2d":
        return kernels.upload_weight(op.params["weight"], Geometry.from_attrs(op.attrs))
    if op.kind == "dense":
        return kernels.upload_weight(op.params["weight"], Geometry())
    return None


def _epilogue(kernels: DatapathKernels, op: Op) -> Epilogue:
    """Per-channel constants of matrix ops and of bias / scale_shift / relu / relu6 ops."""
    params = {
        name: kernels.constant(np.asarray(op.params[name], np.float32))
        for name in ("bias", "scale", "shift")
        if name in op.params
    }
    activation = op.kind if op.kind in ("relu", "relu6") else op.attrs.get("activation", "linear")
    return Epilogue(**params, activation=activation)


def _execute(kernels: DatapathKernels, step: _Step, args: list[DeviceTensor]) -> DeviceTensor:
    op, x = step.op, args[0]
    kind, a = op.kind, op.attrs
    if kind == "conv2d":
        return kernels.conv(x, step.weight, Geometry.from_attrs(a), step.epilogue)
    if kind == "dense":
        image = x.reshape(x.shape[0], 1, 1, x.size // x.shape[0])
        out = kernels.conv(image, step.weight, Geometry(), step.epilogue)
        return out.reshape(x.shape[0], out.shape[-1])
    if kind in ("bias", "scale_shift", "relu", "relu6"):
        return kernels.channel_ops(x, step.epilogue)
    if kind == "add":
        return kernels.add(x, args[1], step.epilogue.activation)
    if kind in ("max_pool", "avg_pool"):
        return kernels.pool_op(x, kind == "avg_pool", a["pool"], a["strides"], a["padding"])
    if kind in ("global_avg_pool", "global_max_pool"):
        out = kernels.pool_op(x, kind == "global_avg_pool", x.shape[1:3], (1, 1), (0, 0, 0, 0))
        return out if a.get("keepdims", False) else out.reshape(x.shape[0], x.shape[-1])
    if kind == "concat":
        return kernels.concat(args)
    if kind == "zero_pad":
        return kernels.zero_pad(x, a["padding"])
    return x.reshape(x.shape[0], x.size // x.shape[0])  # flatten
