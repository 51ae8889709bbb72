"""Matrix unit of the emulator (docs/datapath.md, section 4).

Quantized formats: activations and weights enter one float64 GEMM as their exact quantized
values. Section 4.2 bounds every partial sum of an output to an integer multiple of
``2^(La + Lw - 2(M-1))`` below 2^53 such units, so float64 holds each one exactly and the GEMM
is exact whatever order or FMA use BLAS picks; casting the sums to float32 is then the single RNE
rounding the spec asks for, with no scaling pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..formats import FORMATS, BlockFormat, NumberFormat
from ..numerics import BlockTensor, canonicalize, flush_to_zero, quantized_values
from ..program import Geometry

_FP32 = FORMATS["fp32"]


@dataclass(frozen=True)
class PreparedWeights:
    """Weights laid out for the GEMM once per loaded program: (groups, R, F/groups) exact
    values (float64 for block formats; NaN-block weights are 0) and ``Lw`` per filter."""

    values: np.ndarray
    floor: np.ndarray | None
    format: NumberFormat


def prepare_weights(weight: BlockTensor | np.ndarray, groups: int) -> PreparedWeights:
    if isinstance(weight, BlockTensor):
        (terms, floor), fmt = weight.integer_terms(), weight.format
        unit = np.ldexp(1.0, floor - (fmt.mantissa_bits - 1))  # m * 2^(X - L) -> m * 2^(X - (M-1))
        values = terms.astype(np.float64) * unit[:, None]
    else:
        values, floor, fmt = canonicalize(weight), None, _FP32
    filters, reduction = values.shape
    grouped = values.reshape(groups, filters // groups, reduction).transpose(0, 2, 1)
    return PreparedWeights(np.ascontiguousarray(grouped), floor, fmt)


def _padded(x: np.ndarray, geometry: Geometry) -> np.ndarray:
    top, bottom, left, right = geometry.padding
    if any(geometry.padding):
        return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    return np.ascontiguousarray(x)


def _patches(x: np.ndarray, geometry: Geometry, out_hw: tuple[int, int]) -> np.ndarray:
    """View (N, Ho, Wo, KH, KW, C) of the zero-padded input: im2col without copying yet."""
    x = _padded(x, geometry)
    s_n, s_h, s_w, s_c = x.strides
    (sh, sw), (dh, dw), (kh, kw) = geometry.strides, geometry.dilation, geometry.kernel
    return as_strided(
        x,
        shape=(x.shape[0], *out_hw, kh, kw, x.shape[3]),
        strides=(s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c),
        writeable=False,
    )


def _columns(x: np.ndarray, geometry: Geometry, out_hw: tuple[int, int], dtype) -> np.ndarray:
    """(groups, N*Ho*Wo, KH*KW*Cg) in the weight's (kh, kw, c) order, cast while copying."""
    n, c, g = x.shape[0], x.shape[3], geometry.groups
    rows = n * out_hw[0] * out_hw[1]
    (kh, kw), (sh, sw) = geometry.kernel, geometry.strides
    if geometry.kernel == (1, 1) and not any(geometry.padding) and g == 1:
        return np.ascontiguousarray(x[:, ::sh, ::sw, :], dtype=dtype).reshape(1, rows, c)
    if g == 1 and geometry.dilation[1] == 1:
        # One kernel row's (kw, c) values are contiguous in NHWC: copy them as one run.
        padded = _padded(x, geometry)
        s_n, s_h, s_w, s_c = padded.strides
        rows_view = as_strided(
            padded,
            shape=(n, *out_hw, kh, kw * c),
            strides=(s_n, s_h * sh, s_w * sw, s_h * geometry.dilation[0], s_c),
            writeable=False,
        )
        columns = np.empty((1, rows, kh * kw * c), dtype=dtype)
        columns.reshape(n, *out_hw, kh, kw * c)[...] = rows_view
        return columns
    patches = _patches(x, geometry, out_hw).reshape(n, *out_hw, kh, kw, g, c // g)
    columns = np.empty((g, rows, kh * kw * (c // g)), dtype=dtype)
    columns.reshape(g, n, *out_hw, kh, kw, c // g)[...] = patches.transpose(5, 0, 1, 2, 3, 4, 6)
    return columns


def _depthwise(x: np.ndarray, weights: PreparedWeights, geometry: Geometry, out_hw) -> np.ndarray:
    """Groups with one input channel each: a multiply-add per kernel position, exact in float64."""
    patches = _patches(x, geometry, out_hw)
    kh, kw = geometry.kernel
    per_group = weights.values.shape[2]
    acc = np.zeros((*patches.shape[:3], x.shape[3], per_group), dtype=weights.values.dtype)
    for i in range(kh):
        for j in range(kw):
            tap = weights.values[:, i * kw + j, :]
            acc += patches[:, :, :, i, j, :, None] * tap
    return acc.reshape(*acc.shape[:3], -1)


def _nan_outputs(nan: np.ndarray, geometry: Geometry, out_hw, filters: int) -> np.ndarray:
    """Outputs whose terms include a NaN element (section 4.1)."""
    c, g = nan.shape[3], geometry.groups
    per_group = nan.reshape(*nan.shape[:3], g, c // g).any(axis=-1).astype(np.uint8)
    window = _patches(per_group, geometry, out_hw).any(axis=(3, 4))
    return np.repeat(window, filters // g, axis=-1)


def _round_to_float32(
    acc: np.ndarray, act_floor: np.ndarray, weight_floor: np.ndarray, mantissa_bits: int
) -> np.ndarray:
    """Section 4.1's one rounding of the exact sums, then FTZ.

    A nonzero sum is at least its unit ``2^(La + Lw - 2(M-1))``, so when no unit reaches below
    2^-126 no result can be subnormal, and FTZ reduces to turning -0.0 into +0.0 (adding +0.0
    does that).
    """
    with np.errstate(over="ignore"):  # +-Inf is the defined result of overflow (section 4.1)
        out = acc.astype(np.float32)
    unit = act_floor.min() + weight_floor.min() - 2 * (mantissa_bits - 1)
    if unit >= -126:
        return np.add(out, np.float32(0.0), out=out)
    return flush_to_zero(out)


@dataclass(frozen=True)
class MatrixInput:
    """Activations as the matrix unit reads them: exact quantized values and ``L`` per sample
    (section 4.2) for a block format, else the float32 values; NaN elements zeroed and marked.

    Quantization depends only on the tensor and the format, so convolutions that read the same
    tensor in the same format (a residual block's first convolution and its projection) can
    share one.
    """

    values: np.ndarray
    floor: np.ndarray | None
    nan: np.ndarray | None
    format: NumberFormat


def matrix_input(x: np.ndarray, fmt: NumberFormat) -> MatrixInput:
    if isinstance(fmt, BlockFormat):
        return MatrixInput(*quantized_values(x, fmt), fmt)
    nan_mask = np.isnan(x)
    if not nan_mask.any():
        return MatrixInput(x, None, None, fmt)
    return MatrixInput(np.where(nan_mask, np.float32(0.0), x), None, nan_mask, fmt)


def conv2d(x: np.ndarray | MatrixInput, weights: PreparedWeights, geometry: Geometry) -> np.ndarray:
    """Matrix-unit convolution of canonical NHWC float32 input: section 4 exactly."""
    fmt = weights.format
    if not isinstance(x, MatrixInput):
        x = matrix_input(x, fmt)
    elif x.format != fmt:
        raise ValueError(f"activations quantized to {x.format.name}, weights are {fmt.name}")
    values, act_floor, nan = x.values, x.floor, x.nan
    dtype = np.float32 if act_floor is None else np.float64
    n, height, width, _ = values.shape
    out_hw = geometry.output_size(height, width)

    groups, _, per_group = weights.values.shape
    filters = groups * per_group
    if groups > 1 and values.shape[3] == groups:
        acc = _depthwise(values.astype(dtype), weights, geometry, out_hw)
    else:
        columns = _columns(values, geometry, out_hw, dtype)
        acc = np.matmul(columns, weights.values)  # (groups, rows, F/groups)
        acc = acc.transpose(1, 0, 2).reshape(n, *out_hw, filters)

    if act_floor is None:  # fp32: BLAS sums may hold NaN (Inf - Inf), so full canonicalization
        with np.errstate(over="ignore", invalid="ignore"):
            out = canonicalize(acc.astype(np.float32))
    else:
        out = _round_to_float32(acc, act_floor, weights.floor, fmt.mantissa_bits)
    if nan is not None:
        out[_nan_outputs(nan, geometry, out_hw, filters)] = np.nan
        out = canonicalize(out)
    return out


def dense(x: np.ndarray, weights: PreparedWeights) -> np.ndarray:
    out = conv2d(x.reshape(x.shape[0], 1, 1, x.shape[1]), weights, Geometry())
    return out.reshape(x.shape[0], -1)
