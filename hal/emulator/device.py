"""The NumPy emulator device: the default HAL device when no board is present."""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

import numpy as np

from ..device import Device, DeviceInfo, LoadedProgram
from ..formats import FORMATS
from ..program import MATRIX_OPS, Geometry, Op, Program, Shape
from . import vector_unit as vu
from .heap import retain_freed_memory
from .matrix_unit import MatrixInput, conv2d, dense, matrix_input, prepare_weights

Kernel = Callable[[Op, list[np.ndarray], Any], np.ndarray]


def _conv2d(op: Op, args: list[np.ndarray], weights: Any) -> np.ndarray:
    out = conv2d(args[0], weights, Geometry.from_attrs(op.attrs))
    return vu.epilogue(out, op.params, op.attrs.get("activation", "linear"))


def _dense(op: Op, args: list[np.ndarray], weights: Any) -> np.ndarray:
    out = dense(args[0], weights)
    return vu.epilogue(out, op.params, op.attrs.get("activation", "linear"))


def _add(op: Op, args: list[np.ndarray], _: Any) -> np.ndarray:
    total = vu.add(args[0], args[1])
    return vu.activation(total, op.attrs.get("activation", "linear"), out=total)


def _pool(function: Callable) -> Kernel:
    def run(op: Op, args: list[np.ndarray], _: Any) -> np.ndarray:
        a = op.attrs
        return function(args[0], tuple(a["pool"]), tuple(a["strides"]), tuple(a["padding"]))

    return run


def _global(function: Callable) -> Kernel:
    def run(op: Op, args: list[np.ndarray], _: Any) -> np.ndarray:
        out = function(args[0])
        return out.reshape(-1, 1, 1, out.shape[1]) if op.attrs.get("keepdims", False) else out

    return run


_KERNELS: dict[str, Kernel] = {
    "conv2d": _conv2d,
    "dense": _dense,
    "bias": lambda op, args, _: vu.bias(args[0], op.params["bias"]),
    "scale_shift": lambda op, args, _: vu.scale_shift(
        args[0], op.params["scale"], op.params["shift"]
    ),
    "relu": lambda op, args, _: vu.relu(args[0]),
    "relu6": lambda op, args, _: vu.relu6(args[0]),
    "add": _add,
    "max_pool": _pool(vu.max_pool),
    "avg_pool": _pool(vu.avg_pool),
    "global_avg_pool": _global(vu.global_avg_pool),
    "global_max_pool": _global(vu.global_max_pool),
    "concat": lambda op, args, _: vu.concat(args),
    "zero_pad": lambda op, args, _: vu.zero_pad(args[0], tuple(op.attrs["padding"])),
    "flatten": lambda op, args, _: vu.flatten(args[0]),
}


class EmulatorDevice(Device):
    """Bit-accurate emulation of docs/datapath.md in vectorised NumPy."""

    def __init__(self) -> None:
        super().__init__(
            DeviceInfo(
                name="emulator",
                backend="emulator",
                kind="EMULATOR",
                description=f"NumPy {np.__version__} emulation of datapath 1 "
                f"on {platform.machine()}",
                formats=tuple(FORMATS),
            )
        )

    def open(self) -> None:
        retain_freed_memory()
        super().open()

    def _load(self, program: Program, shapes: dict[str, Shape]) -> Any:
        """Lay weights out for the GEMM once, and note when each tensor can be freed."""
        weights = [
            prepare_weights(op.params["weight"], int(op.attrs.get("groups", 1)))
            if op.kind in MATRIX_OPS
            else None
            for op in program.ops
        ]
        return weights, program.releases(), _shared_conv_inputs(program, weights)

    def _run(self, loaded: LoadedProgram, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        weights, releases, shared = loaded.state
        tensors: dict[str, np.ndarray] = dict(inputs)
        quantized: dict[str, MatrixInput] = {}
        for index, op in enumerate(loaded.program.ops):
            args: list[Any] = [tensors[name] for name in op.inputs]
            if op.inputs[0] in shared and op.kind == "conv2d":
                name = op.inputs[0]
                if name not in quantized:
                    quantized[name] = matrix_input(args[0], weights[index].format)
                args[0] = quantized[name]
            tensors[op.output] = _KERNELS[op.kind](op, args, weights[index])
            for name in releases[index]:
                del tensors[name]
                quantized.pop(name, None)
        return {name: tensors[name] for name in loaded.program.outputs}


def _shared_conv_inputs(program: Program, weights: list[Any]) -> frozenset[str]:
    """Tensors that several convolutions read in one format: quantized once per run."""
    formats: dict[str, list[str]] = {}
    for op, prepared in zip(program.ops, weights, strict=True):
        if op.kind == "conv2d":
            formats.setdefault(op.inputs[0], []).append(prepared.format.name)
    return frozenset(
        name for name, used in formats.items() if len(used) > 1 and len(set(used)) == 1
    )
