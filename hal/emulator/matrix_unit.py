"""Matrix unit of the emulator (docs/datapath.md, section 4).

Quantized formats: activations and weights become the integer terms of section 4.2 (exact in
float32), and one float64 GEMM sums them. Every partial sum is an integer below 2^53, so the GEMM
is exact whatever order or FMA use BLAS picks; one float64 -> float32 conversion then gives the
single RNE rounding the spec asks for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..formats import FORMATS, BlockFormat, NumberFormat
from ..numerics import BlockTensor, canonicalize, flush_to_zero, integer_terms
from ..program import Geometry

_FP32 = FORMATS["fp32"]


@dataclass(frozen=True)
class PreparedWeights:
    """Weights laid out for the GEMM once per loaded program: (groups, R, F/groups)."""

    terms: np.ndarray
    floor: np.ndarray | None
    format: NumberFormat


def prepare_weights(weight: BlockTensor | np.ndarray, groups: int) -> PreparedWeights:
    if isinstance(weight, BlockTensor):
        (terms, floor), fmt = weight.integer_terms(), weight.format
        terms = terms.astype(np.float64)
    else:
        terms, floor, fmt = canonicalize(weight), None, _FP32
    filters, reduction = terms.shape
    grouped = terms.reshape(groups, filters // groups, reduction).transpose(0, 2, 1)
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
    per_group = weights.terms.shape[2]
    acc = np.zeros((*patches.shape[:3], x.shape[3], per_group), dtype=weights.terms.dtype)
    for i in range(kh):
        for j in range(kw):
            tap = weights.terms[:, i * kw + j, :]
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
    """Section 4.1's one rounding of ``acc * 2^(La + Lw - 2(M-1))``, then FTZ.

    The scaling is exact in float64 (|exponent| < 300) and fused with the cast into one pass.
    A nonzero integer sum is at least 2^exponent, so when no exponent reaches below -126 no
    result can be subnormal, and FTZ reduces to turning -0.0 into +0.0 (adding +0.0 does that).
    """
    exponent = act_floor[:, None] + weight_floor[None, :] - 2 * (mantissa_bits - 1)
    scale = np.ldexp(1.0, exponent)[:, None, None, :]
    out = np.empty(acc.shape, dtype=np.float32)
    with np.errstate(over="ignore"):  # +-Inf is the defined result of overflow (section 4.1)
        np.multiply(acc, scale, out=out, casting="same_kind")
    if exponent.min() >= -126:
        return np.add(out, np.float32(0.0), out=out)
    return flush_to_zero(out)


def conv2d(x: np.ndarray, weights: PreparedWeights, geometry: Geometry) -> np.ndarray:
    """Matrix-unit convolution of canonical NHWC float32 input: section 4 exactly."""
    n, height, width, _ = x.shape
    out_hw = geometry.output_size(height, width)
    fmt = weights.format
    if isinstance(fmt, BlockFormat):
        values, act_floor, nan = integer_terms(x, fmt)
        dtype = np.float64
    else:
        act_floor, dtype = None, np.float32
        nan_mask = np.isnan(x)
        nan = nan_mask if nan_mask.any() else None
        values = x if nan is None else np.where(nan_mask, np.float32(0.0), x)

    groups, _, per_group = weights.terms.shape
    filters = groups * per_group
    if groups > 1 and x.shape[3] == groups:
        acc = _depthwise(values.astype(dtype), weights, geometry, out_hw)
    else:
        columns = _columns(values, geometry, out_hw, dtype)
        acc = np.matmul(columns, weights.terms)  # (groups, rows, F/groups)
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
