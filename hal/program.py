"""The accelerator program: the op graph a HAL device runs (docs/datapath.md, section 7).

A program is data only. ``Program.shapes()`` validates it completely before any device sees it,
so a bad program is one clear error naming the op, never a failure deep inside a backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InvalidProgramError
from .formats import R_MAX, BlockFormat, get_format
from .numerics import BlockTensor

DATAPATH_VERSION = 1
ACTIVATIONS = ("linear", "relu", "relu6")
MATRIX_OPS = ("conv2d", "dense")
Shape = tuple[int, ...]
Param = np.ndarray | BlockTensor


@dataclass
class Op:
    """One node: ``kind`` from section 7, named after the model layer it came from."""

    kind: str
    name: str
    inputs: tuple[str, ...]
    output: str
    attrs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Param] = field(default_factory=dict)


@dataclass
class Program:
    """Ops in execution order over named tensors; shapes are per sample (HWC or K)."""

    format: str
    inputs: dict[str, Shape]
    outputs: tuple[str, ...]
    ops: list[Op]
    datapath_version: int = DATAPATH_VERSION
    metadata: dict[str, str] = field(default_factory=dict)  # provenance: model, weights, versions

    def shapes(self) -> dict[str, Shape]:
        """Validate every op and return the per-sample shape of every tensor."""
        if self.datapath_version != DATAPATH_VERSION:
            raise InvalidProgramError(
                f"program targets datapath version {self.datapath_version}; this HAL implements "
                f"version {DATAPATH_VERSION}: rebuild the program"
            )
        try:
            fmt = get_format(self.format)
        except ValueError as exc:
            raise InvalidProgramError(str(exc)) from None
        shapes: dict[str, Shape] = {}
        for name, shape in self.inputs.items():
            if not shape or any(int(d) < 1 for d in shape):
                raise InvalidProgramError(f"program input {name!r} has invalid shape {shape}")
            shapes[name] = tuple(int(d) for d in shape)
        for op in self.ops:
            rule = _SHAPE_RULES.get(op.kind)
            if rule is None:
                raise InvalidProgramError(
                    f"op {op.name!r}: kind {op.kind!r} is not supported by the datapath "
                    f"(supported: {', '.join(sorted(_SHAPE_RULES))})"
                )
            missing = [t for t in op.inputs if t not in shapes]
            if missing:
                raise InvalidProgramError(
                    f"op {op.name!r} reads {missing[0]!r}, which no earlier op or input produces"
                )
            if op.output in shapes:
                raise InvalidProgramError(f"op {op.name!r} overwrites tensor {op.output!r}")
            try:
                shapes[op.output] = rule(op, [shapes[t] for t in op.inputs], fmt)
            except (KeyError, TypeError, ValueError) as exc:
                raise InvalidProgramError(f"op {op.name!r} ({op.kind}): {exc}") from None
        for name in self.outputs:
            if name not in shapes:
                raise InvalidProgramError(f"program output {name!r} is never produced")
        return shapes

    def releases(self) -> list[tuple[str, ...]]:
        """Per op, the tensors nothing later reads (program outputs excepted): a backend frees
        them right after that op, so a run holds only live activations."""
        last_use = {name: index for index, op in enumerate(self.ops) for name in op.inputs}
        freed: list[list[str]] = [[] for _ in self.ops]
        for name, index in last_use.items():
            if name not in self.outputs:
                freed[index].append(name)
        return [tuple(names) for names in freed]


def conv_output_size(size: int, kernel: int, stride: int, dilation: int, pad: int) -> int:
    """Section 4.3: output length along one spatial axis (padding ``pad`` = both sides)."""
    return (size + pad - dilation * (kernel - 1) - 1) // stride + 1


@dataclass(frozen=True)
class Geometry:
    """Section 4.3; ``dense`` is the 1x1 case on a 1x1 image."""

    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    groups: int = 1

    @classmethod
    def from_attrs(cls, attrs: dict) -> Geometry:
        return cls(
            kernel=tuple(attrs["kernel"]),
            strides=tuple(attrs["strides"]),
            dilation=tuple(attrs["dilation"]),
            padding=tuple(attrs["padding"]),
            groups=int(attrs["groups"]),
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        top, bottom, left, right = self.padding
        return (
            conv_output_size(
                height, self.kernel[0], self.strides[0], self.dilation[0], top + bottom
            ),
            conv_output_size(
                width, self.kernel[1], self.strides[1], self.dilation[1], left + right
            ),
        )


def _pairs(op: Op, key: str, count: int = 2, minimum: int = 1) -> tuple[int, ...]:
    values = tuple(int(v) for v in op.attrs[key])
    if len(values) != count or any(v < minimum for v in values):
        raise ValueError(f"attribute {key!r} must be {count} integers >= {minimum}, got {values}")
    return values


def _expect_inputs(inputs: list[Shape], count: int, rank: int) -> None:
    if len(inputs) != count:
        raise ValueError(f"takes {count} input(s), got {len(inputs)}")
    for shape in inputs:
        if len(shape) != rank:
            raise ValueError(f"needs rank-{rank} inputs per sample, got shape {shape}")


def _check_channel_param(op: Op, key: str, channels: int) -> None:
    value = op.params[key]
    if not isinstance(value, np.ndarray) or value.dtype != np.float32 or value.shape != (channels,):
        raise ValueError(f"parameter {key!r} must be float32 of shape ({channels},)")
    if not np.all(np.isfinite(value)):
        raise ValueError(f"parameter {key!r} has NaN or Inf values")


def _check_epilogue(op: Op, channels: int) -> None:
    activation = op.attrs.get("activation", "linear")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    if "bias" in op.params:
        _check_channel_param(op, "bias", channels)
    if ("scale" in op.params) != ("shift" in op.params):
        raise ValueError("scale_shift needs both 'scale' and 'shift'")
    if "scale" in op.params:
        _check_channel_param(op, "scale", channels)
        _check_channel_param(op, "shift", channels)


def _check_weight(op: Op, fmt: BlockFormat | Any, filters: int, reduction: int) -> None:
    if reduction > R_MAX:
        raise ValueError(
            f"reduction length {reduction} exceeds the matrix unit's limit of {R_MAX} terms "
            "(datapath section 4.2); reduce the input channels or pool before this layer"
        )
    weight = op.params["weight"]
    if weight.shape != (filters, reduction):
        raise ValueError(f"weight must have shape ({filters}, {reduction}), got {weight.shape}")
    if isinstance(fmt, BlockFormat):
        if not isinstance(weight, BlockTensor) or weight.format != fmt:
            raise ValueError(f"weight must be quantized to {fmt.name}")
        if np.any(weight.codes == 255):
            raise ValueError("weight has NaN blocks")
    elif not isinstance(weight, np.ndarray) or weight.dtype != np.float32:
        raise ValueError("weight must be float32 for the fp32 format")
    elif not np.all(np.isfinite(weight)):
        raise ValueError("weight has NaN or Inf values")


def _conv2d(op: Op, inputs: list[Shape], fmt: Any) -> Shape:
    _expect_inputs(inputs, 1, 3)
    height, width, channels = inputs[0]
    kh, kw = _pairs(op, "kernel")
    sh, sw = _pairs(op, "strides")
    dh, dw = _pairs(op, "dilation")
    top, bottom, left, right = _pairs(op, "padding", 4, 0)
    groups, filters = int(op.attrs["groups"]), int(op.attrs["filters"])
    if groups < 1 or channels % groups or filters % groups:
        raise ValueError(
            f"groups={groups} must divide both the {channels} input channels and the "
            f"{filters} filters"
        )
    out_h = conv_output_size(height, kh, sh, dh, top + bottom)
    out_w = conv_output_size(width, kw, sw, dw, left + right)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"kernel {kh}x{kw} does not fit the padded {height}x{width} input")
    _check_weight(op, fmt, filters, kh * kw * (channels // groups))
    _check_epilogue(op, filters)
    return (out_h, out_w, filters)


def _dense(op: Op, inputs: list[Shape], fmt: Any) -> Shape:
    _expect_inputs(inputs, 1, 1)
    units = int(op.attrs["units"])
    _check_weight(op, fmt, units, inputs[0][0])
    _check_epilogue(op, units)
    return (units,)


def _channelwise(op: Op, inputs: list[Shape], fmt: Any) -> Shape:
    if len(inputs) != 1:
        raise ValueError("takes 1 input")
    channels = inputs[0][-1]
    for key in {"bias": ("bias",), "scale_shift": ("scale", "shift")}.get(op.kind, ()):
        _check_channel_param(op, key, channels)
    return inputs[0]


def _add(op: Op, inputs: list[Shape], fmt: Any) -> Shape:
    if len(inputs) != 2 or inputs[0] != inputs[1]:
        raise ValueError(f"needs two inputs of equal shape, got {inputs}")
    _check_epilogue(op, inputs[0][-1])
    return inputs[0]


def _pool(op: Op, inputs: list[Shape], fmt: Any) -> Shape:
    _expect_inputs(inputs, 1, 3)
    height, width, channels = inputs[0]
    ph, pw = _pairs(op, "pool")
    sh, sw = _pairs(op, "strides")
    top, bottom, left, right = _pairs(op, "padding", 4, 0)
    if max(top, bottom) >= ph or max(left, right) >= pw:
        raise ValueError("padding must be smaller than the pool window on each side")
    out_h = conv_output_size(height, ph, sh, 1, top + bottom)
    out_w = conv_output_size(width, pw, sw, 1, left + right)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"pool {ph}x{pw} does not fit the {height}x{width} input")
    return (out_h, out_w, channels)


def _global_pool(op: Op, inputs: list[Shape], fmt: Any) -> Shape:
    _expect_inputs(inputs, 1, 3)
    return (1, 1, inputs[0][2]) if op.attrs.get("keepdims", False) else (inputs[0][2],)


def _concat(op: Op, inputs: list[Shape], fmt: Any) -> Shape:
    if len(inputs) < 2 or any(len(s) != 3 or s[:2] != inputs[0][:2] for s in inputs):
        raise ValueError(f"needs two or more HWC inputs of equal height and width, got {inputs}")
    return (*inputs[0][:2], sum(s[2] for s in inputs))


def _zero_pad(op: Op, inputs: list[Shape], fmt: Any) -> Shape:
    _expect_inputs(inputs, 1, 3)
    top, bottom, left, right = _pairs(op, "padding", 4, 0)
    height, width, channels = inputs[0]
    return (height + top + bottom, width + left + right, channels)


def _flatten(op: Op, inputs: list[Shape], fmt: Any) -> Shape:
    if len(inputs) != 1:
        raise ValueError("takes 1 input")
    return (int(np.prod(inputs[0])),)


_SHAPE_RULES = {
    "conv2d": _conv2d,
    "dense": _dense,
    "bias": _channelwise,
    "scale_shift": _channelwise,
    "relu": _channelwise,
    "relu6": _channelwise,
    "add": _add,
    "max_pool": _pool,
    "avg_pool": _pool,
    "global_avg_pool": _global_pool,
    "global_max_pool": _global_pool,
    "concat": _concat,
    "zero_pad": _zero_pad,
    "flatten": _flatten,
}
