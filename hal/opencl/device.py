"""The OpenCL HAL device: runs accelerator programs through kernels/datapath.cl.

First version: the matrix and vector ops run as kernels (one command queue per calling thread),
layout ops (zero_pad, concat, flatten) are bit copies on the host, and tensors travel through
host memory between ops; weights stay on the device from load to unload. Device-resident
tensors and a faster convolution are the rest of Step 6.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyopencl as cl

from ..device import Device, DeviceInfo, LoadedProgram
from ..errors import DeviceFaultError, DeviceNotFoundError, InvalidProgramError
from ..formats import FORMATS, BlockFormat, get_format
from ..program import MATRIX_OPS, Geometry, Program, Shape
from .kernels import DatapathKernels

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
        # Weights go to the device once, when the program is loaded.
        return [
            self._kernels.upload_weight(op.params["weight"]) if op.kind in MATRIX_OPS else None
            for op in program.ops
        ]

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
        tensors = dict(inputs)
        try:
            self._kernels.take_kernel_seconds()  # forget what earlier runs left on this thread
            if self._faulted:
                with self._recovery_lock:
                    if self._faulted:
                        self._recover()
                loaded = self._programs[loaded.handle]
            for op, weight in zip(loaded.program.ops, loaded.state, strict=True):
                args = [tensors[name] for name in op.inputs]
                tensors[op.output] = self._op(op, args, weight)
        except cl.Error as exc:
            self._faulted = True
            raise DeviceFaultError(
                f"{self.info.name}: OpenCL error, request failed; the device re-initialises "
                f"on the next request ({exc})"
            ) from exc
        return {name: tensors[name] for name in loaded.program.outputs}

    def _epilogue(self, x: np.ndarray, op) -> np.ndarray:
        k, params, channels = self._kernels, op.params, x.shape[-1]
        if "bias" in params:
            x = k.elementwise("bias", x, params["bias"], channels=channels)
        if "scale" in params:
            x = k.elementwise("scale_shift", x, params["scale"], params["shift"], channels=channels)
        activation = op.attrs.get("activation", "linear")
        return x if activation == "linear" else k.elementwise(activation, x)

    def _op(self, op, args: list[np.ndarray], weight) -> np.ndarray:
        k, kind, a, x = self._kernels, op.kind, op.attrs, args[0]
        channels = x.shape[-1]
        if kind == "conv2d":
            return self._epilogue(k.conv2d(x, weight, Geometry.from_attrs(a)), op)
        if kind == "dense":
            out = k.conv2d(x.reshape(x.shape[0], 1, 1, -1), weight, Geometry())
            return self._epilogue(out.reshape(x.shape[0], -1), op)
        if kind == "bias":
            return k.elementwise("bias", x, op.params["bias"], channels=channels)
        if kind == "scale_shift":
            p = op.params
            return k.elementwise("scale_shift", x, p["scale"], p["shift"], channels=channels)
        if kind in ("relu", "relu6"):
            return k.elementwise(kind, x)
        if kind == "add":
            total = k.elementwise("add", x, args[1])
            activation = a.get("activation", "linear")
            return total if activation == "linear" else k.elementwise(activation, total)
        if kind in ("max_pool", "avg_pool"):
            return k.pool(x, kind == "avg_pool", a["pool"], a["strides"], a["padding"])
        if kind in ("global_avg_pool", "global_max_pool"):
            out = k.pool(x, kind == "global_avg_pool", x.shape[1:3], (1, 1), (0, 0, 0, 0))
            return out if a.get("keepdims", False) else out.reshape(x.shape[0], -1)
        # Layout ops copy bits (section 5.2); they run on the host in this first version.
        if kind == "concat":
            return np.concatenate(args, axis=-1)
        if kind == "zero_pad":
            top, bottom, left, right = a["padding"]
            return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
        return x.reshape(x.shape[0], -1)
