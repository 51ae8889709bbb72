"""Scalar reference of docs/datapath.md: slow, plain, obviously correct.

Every value is an exact rational (``Fraction``) until the spec says to round, and rounding is
written out with integers. Nothing here is vectorised or shared with the emulator, so agreement
between the two is evidence, not tautology. Section numbers refer to docs/datapath.md.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

NAN = float("nan")
FLT_MIN = Fraction(1, 2**126)
BIAS = 127


def exact(value: float) -> Fraction:
    return Fraction(float(value))


def rne(value: Fraction) -> int:
    """Round a non-negative rational to the nearest integer, ties to even."""
    whole = value.numerator // value.denominator
    rest = value - whole
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and whole % 2 == 1):
        whole += 1
    return whole


def floor_log2(value: Fraction) -> int:
    """floor(log2(value)) of a positive rational, exactly."""
    guess = value.numerator.bit_length() - value.denominator.bit_length()
    while Fraction(2) ** guess > value:
        guess -= 1
    while Fraction(2) ** (guess + 1) <= value:
        guess += 1
    return guess


def to_float32(value: Fraction) -> float:
    """fl32: IEEE RNE to float32 with gradual underflow and overflow to +-Inf."""
    if value == 0:
        return 0.0
    sign = -1.0 if value < 0 else 1.0
    magnitude = abs(value)
    # Significand step: 2^(e - 23) for normals, 2^-149 in the subnormal range.
    step_exponent = max(floor_log2(magnitude) - 23, -149)
    units = rne(magnitude / Fraction(2) ** step_exponent)
    result = Fraction(units) * Fraction(2) ** step_exponent
    if result >= Fraction(2) ** 128:
        return sign * math.inf
    return sign * float(result)


def canon(value: float) -> float:
    """Section 5.1."""
    if math.isnan(value):
        return NAN
    if abs(value) < FLT_MIN:
        return 0.0
    return value


def op_add(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)):
        return canon(a + b)  # IEEE special cases, exact in Python's double
    return canon(to_float32(exact(a) + exact(b)))


def op_mul(a: float, b: float) -> float:
    if not (math.isfinite(a) and math.isfinite(b)):
        return canon(a * b)
    return canon(to_float32(exact(a) * exact(b)))


# --- Section 3: quantization ------------------------------------------------------------------


def quantize(x: np.ndarray, block: int, mantissa_bits: int, window: int):
    """Quantize along the last axis, windows per index of axis 0. Returns (mantissas, codes)."""
    x = np.asarray(x, dtype=np.float32)
    groups = x.reshape(x.shape[0], -1, x.shape[-1])
    length = x.shape[-1]
    blocks_per_row = -(-length // block)
    mantissas = np.zeros(groups.shape, dtype=np.int64)
    codes = np.zeros((*groups.shape[:2], blocks_per_row), dtype=np.int64)
    for g in range(groups.shape[0]):
        raw = {}
        for r in range(groups.shape[1]):
            for b in range(blocks_per_row):
                values = [float(v) for v in groups[g, r, b * block : (b + 1) * block]]
                if any(not math.isfinite(v) for v in values):
                    raw[r, b] = None  # NaN block, 3.1
                    continue
                amax = max(abs(exact(v)) for v in values)
                raw[r, b] = -127 if amax == 0 else max(floor_log2(amax), -127)
        finite = [e for e in raw.values() if e is not None]
        anchor = max(finite) if finite else -127
        for (r, b), e in raw.items():
            if e is None:
                codes[g, r, b] = 255
                continue
            shared = max(e, anchor - window)  # 3.2
            codes[g, r, b] = shared + BIAS
            for i in range(b * block, min((b + 1) * block, length)):
                v = exact(groups[g, r, i])
                m = min(
                    rne(abs(v) * Fraction(2) ** (mantissa_bits - 1 - shared)), 2**mantissa_bits - 1
                )
                mantissas[g, r, i] = -m if v < 0 else m
    shape_codes = (*x.shape[:-1], blocks_per_row)
    return mantissas.reshape(x.shape), codes.reshape(shape_codes)


def dequantize_element(mantissa: int, code: int, mantissa_bits: int):
    """Exact value of one element, or None for a NaN block."""
    if code == 255:
        return None
    return Fraction(int(mantissa)) * Fraction(2) ** (int(code) - BIAS - (mantissa_bits - 1))


# --- Section 4: matrix unit -------------------------------------------------------------------


def conv2d(x, w_mantissas, w_codes, fmt, kernel, strides, dilation, padding, groups):
    """Section 4.1/4.3 with exact sums; x is NHWC float32, weights (F, KH*KW*Cg) quantized."""
    block, mbits, window = fmt
    n_, h_, w_, c_ = x.shape
    a_m, a_c = quantize(x, block, mbits, window)
    filters = w_mantissas.shape[0]
    cg = c_ // groups
    kh_, kw_ = kernel
    top, bottom, left, right = padding
    out_h = (h_ + top + bottom - dilation[0] * (kh_ - 1) - 1) // strides[0] + 1
    out_w = (w_ + left + right - dilation[1] * (kw_ - 1) - 1) // strides[1] + 1
    out = np.zeros((n_, out_h, out_w, filters), dtype=np.float32)
    for n in range(n_):
        for i in range(out_h):
            for j in range(out_w):
                for o in range(filters):
                    group = o // (filters // groups)
                    total, is_nan = Fraction(0), False
                    for kh in range(kh_):
                        for kw in range(kw_):
                            y = i * strides[0] + kh * dilation[0] - top
                            xx = j * strides[1] + kw * dilation[1] - left
                            if not (0 <= y < h_ and 0 <= xx < w_):
                                continue  # zero padding
                            for c in range(cg):
                                channel = group * cg + c
                                a = dequantize_element(
                                    a_m[n, y, xx, channel], a_c[n, y, xx, channel // block], mbits
                                )
                                r = (kh * kw_ + kw) * cg + c
                                wv = dequantize_element(
                                    w_mantissas[o, r], w_codes[o, r // block], mbits
                                )
                                if a is None or wv is None:
                                    is_nan = True
                                else:
                                    total += a * wv
                    out[n, i, j, o] = NAN if is_nan else canon(to_float32(total))
    return out


# --- Section 5: vector unit -------------------------------------------------------------------


def relu(v: float) -> float:
    if math.isnan(v):
        return NAN
    return v if v > 0 else 0.0


def relu6(v: float) -> float:
    r = relu(v)
    return 6.0 if r > 6.0 else r


def elementwise(function, *arrays) -> np.ndarray:
    flat = [np.asarray(a, dtype=np.float32).ravel() for a in arrays]
    out = [function(*(float(a[i]) for a in flat)) for i in range(flat[0].size)]
    return np.array(out, dtype=np.float32).reshape(np.shape(arrays[0]))


def reciprocal(n: int) -> float:
    return to_float32(Fraction(1, n))


def pool(x, kind, pool_size, strides, padding):
    """max_pool / avg_pool over in-range positions, row-major order (section 5.2)."""
    n_, h_, w_, c_ = x.shape
    top, bottom, left, right = padding
    out_h = (h_ + top + bottom - pool_size[0]) // strides[0] + 1
    out_w = (w_ + left + right - pool_size[1]) // strides[1] + 1
    out = np.zeros((n_, out_h, out_w, c_), dtype=np.float32)
    for n in range(n_):
        for i in range(out_h):
            for j in range(out_w):
                for c in range(c_):
                    values = []
                    for ph in range(pool_size[0]):
                        for pw in range(pool_size[1]):
                            y = i * strides[0] + ph - top
                            xx = j * strides[1] + pw - left
                            if 0 <= y < h_ and 0 <= xx < w_:
                                values.append(float(x[n, y, xx, c]))
                    if kind == "max":
                        result = NAN if any(math.isnan(v) for v in values) else max(values)
                    else:
                        acc = values[0]
                        for v in values[1:]:
                            acc = op_add(acc, v)
                        result = op_mul(acc, reciprocal(len(values)))
                    out[n, i, j, c] = result
    return out
