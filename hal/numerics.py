"""Vectorised quantization and canonicalization (docs/datapath.md, sections 3 and 5.1).

Shared by the compiler (weights, once) and the emulator (activations, per op). Exponents come
from the float32 bit patterns with integer operations, as hardware computes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import EXP_BIAS, NAN_CODE, BlockFormat

FLT_MIN = np.float32(2.0**-126)
CANONICAL_NAN = np.uint32(0x7FC00000).view(np.float32)
_ABS_MASK = np.uint32(0x7FFFFFFF)
_INF_BITS = np.uint32(0x7F800000)
_FRACTION_MASK = np.uint32(0x007FFFFF)


def canonicalize(x: np.ndarray) -> np.ndarray:
    """Section 5.1: NaN -> 0x7FC00000, |x| < FLT_MIN (subnormals, -0.0) -> +0.0."""
    return canonicalize_in_place(np.array(x, dtype=np.float32))


def canonicalize_in_place(x: np.ndarray) -> np.ndarray:
    """``canonicalize`` on an array the caller owns (float32): two passes in the common case."""
    np.copyto(x, np.float32(0.0), where=np.abs(x) < FLT_MIN)
    with np.errstate(invalid="ignore", over="ignore"):
        if np.isnan(x.sum(dtype=np.float32)):  # NaN, or Inf - Inf: then look element-wise
            np.copyto(x, CANONICAL_NAN, where=np.isnan(x))
    return x


@dataclass(frozen=True)
class BlockTensor:
    """A tensor quantized along its last axis; windows are taken per index of axis 0.

    ``mantissas`` holds sign * m as int8 (unpadded, same shape as the source); ``codes`` holds the
    E8M0 exponent code of each block (255 = NaN block).
    """

    mantissas: np.ndarray
    codes: np.ndarray
    format: BlockFormat

    def __post_init__(self) -> None:
        length = self.mantissas.shape[-1]
        blocks = -(-length // self.format.block_size)
        if self.mantissas.dtype != np.int8 or self.codes.dtype != np.uint8:
            raise ValueError("BlockTensor needs int8 mantissas and uint8 exponent codes")
        if self.codes.shape != (*self.mantissas.shape[:-1], blocks):
            raise ValueError(
                f"exponent codes of shape {self.codes.shape} do not match mantissas "
                f"{self.mantissas.shape} in blocks of {self.format.block_size}"
            )
        if np.any(np.abs(self.mantissas.astype(np.int16)) > self.format.max_mantissa):
            raise ValueError(f"mantissas exceed the {self.format.mantissa_bits}-bit magnitude")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.mantissas.shape

    def element_exponents(self) -> np.ndarray:
        """Shared exponent X of every element (int16), NaN blocks included as 128."""
        exponents = self.codes.astype(np.int16) - EXP_BIAS
        return np.repeat(exponents, self.format.block_size, axis=-1)[..., : self.shape[-1]]

    def nan_elements(self) -> np.ndarray:
        nan_blocks = self.codes == NAN_CODE
        return np.repeat(nan_blocks, self.format.block_size, axis=-1)[..., : self.shape[-1]]

    def dequantize(self) -> np.ndarray:
        """Exact float32 values (section 3.3); NaN blocks give NaN."""
        shift = self.element_exponents() - (self.format.mantissa_bits - 1)
        values = np.ldexp(self.mantissas.astype(np.float64), shift).astype(np.float32)
        values[self.nan_elements()] = np.nan
        return values

    def _exponents_and_anchor(self) -> tuple[np.ndarray, np.ndarray]:
        """Block exponents X (NaN blocks as -127: their mantissas are 0) and G per group."""
        exponents = self.codes.astype(np.int32) - EXP_BIAS
        exponents[self.codes == NAN_CODE] = -EXP_BIAS
        return exponents, exponents.reshape(exponents.shape[0], -1).max(axis=1)

    def integer_terms(self) -> tuple[np.ndarray, np.ndarray]:
        """Section 4.2: per element ``m * 2^(X - L)`` (exact float32), ``L`` per group (axis 0).

        NaN-block elements contribute 0 here; callers track NaN separately.
        """
        exponents, anchor = self._exponents_and_anchor()
        mantissas = _blocks(self.mantissas.astype(np.float32), self.format.block_size)
        return _shifted_terms(mantissas, exponents, anchor, self.format, self.shape[-1])

    def block_shifts(self) -> tuple[np.ndarray, np.ndarray]:
        """Section 4.2: per block the shift ``s = X - L`` (int32), ``L`` per group (axis 0)."""
        exponents, anchor = self._exponents_and_anchor()
        floor = anchor - self.format.window
        return exponents - floor.reshape((-1,) + (1,) * (exponents.ndim - 1)), floor


def _pow2(exponents: np.ndarray) -> np.ndarray:
    """Exact float32 powers of two for integer exponents in the normal range."""
    return np.ldexp(np.float32(1.0), exponents.astype(np.int32))


def _blocks(x: np.ndarray, block: int) -> np.ndarray:
    """View the last axis as (blocks, block); a lone partial block stays short, others are padded.

    Zero padding never changes a block's exponent or a dot product (section 2.1), so a tensor
    with fewer channels than a block (an RGB image) is one block of its own width.
    """
    length = x.shape[-1]
    if length <= block:
        return x.reshape(*x.shape[:-1], 1, length)
    pad = -length % block
    if pad:
        x = np.concatenate([x, np.zeros((*x.shape[:-1], pad), dtype=x.dtype)], axis=-1)
    return x.reshape(*x.shape[:-1], -1, block)


def _block_max_bits(bits: np.ndarray) -> np.ndarray:
    """Largest |x| bit pattern per block, by pairwise maxima of interleaved halves.

    Many times faster in NumPy than ``max(axis=-1)`` over a short axis.
    """
    while bits.shape[-1] > 1:
        if bits.shape[-1] % 2:
            bits = np.concatenate([bits, np.zeros((*bits.shape[:-1], 1), bits.dtype)], axis=-1)
        bits = np.maximum(bits[..., 0::2], bits[..., 1::2])
    return bits[..., 0]


@dataclass(frozen=True)
class _Blocks:
    """Sections 3.1-3.2: the blocks of a tensor, their shared exponents and NaN flags."""

    blocks: np.ndarray  # (..., blocks, B) float32 view of the source, zero-padded
    max_bits: np.ndarray  # (..., blocks) uint32 bit pattern of the largest |x|
    raw: np.ndarray  # (..., blocks) int32 Xraw, the block's own exponent (-127 for NaN blocks)
    exponent: np.ndarray  # (..., blocks) int32 shared exponent X
    anchor: np.ndarray  # (groups,) int32 G
    nonfinite: np.ndarray  # (..., blocks) bool: NaN blocks


def _block_exponents(x: np.ndarray, fmt: BlockFormat) -> _Blocks:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim < 2:
        raise ValueError("quantize needs a leading group axis and a block axis")
    blocks = _blocks(x, fmt.block_size)
    max_bits = _block_max_bits(blocks.view(np.uint32) & _ABS_MASK)
    nonfinite = max_bits >= _INF_BITS
    # Section 3.1: unbiased exponent of amax, clamped at -127 (zero and subnormals land there).
    raw = (max_bits >> np.uint32(23)).astype(np.int32) - EXP_BIAS
    raw[nonfinite] = -EXP_BIAS
    anchor = raw.reshape(raw.shape[0], -1).max(axis=1)
    exponent = np.maximum(raw, (anchor - fmt.window).reshape((-1,) + (1,) * (raw.ndim - 1)))
    return _Blocks(blocks, max_bits, raw, exponent, anchor, nonfinite)


def _scaled_blocks(b: _Blocks, fmt: BlockFormat) -> np.ndarray:
    """Section 3.3 up to rounding: ``x * 2^k``, signed and exact. k may reach 133, beyond
    float32's 2^127, so scale twice."""
    k = (fmt.mantissa_bits - 1) - b.exponent
    first = np.minimum(k, 64)
    with np.errstate(over="ignore", invalid="ignore"):  # NaN blocks, zeroed by the callers
        scaled = b.blocks * _pow2(first)[..., None]
        rest = k - first
        if np.any(rest):
            scaled *= _pow2(rest)[..., None]
    return scaled


def _round_mantissas(scaled: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """RNE then saturation, in place: rint is symmetric, so the sign rides along."""
    np.rint(scaled, out=scaled)
    limit = np.float32(fmt.max_mantissa)
    return np.clip(scaled, -limit, limit, out=scaled)


def quantize(x: np.ndarray, fmt: BlockFormat) -> BlockTensor:
    """Quantize along the last axis into ``fmt`` blocks, windows per index of axis 0 (section 3)."""
    b = _block_exponents(x, fmt)
    mantissa = _round_mantissas(_scaled_blocks(b, fmt), fmt)
    mantissa[b.nonfinite] = 0
    codes = np.where(b.nonfinite, NAN_CODE, b.exponent + EXP_BIAS).astype(np.uint8)
    length = np.shape(x)[-1]
    mantissas = mantissa.astype(np.int8).reshape(*np.shape(x)[:-1], -1)[..., :length]
    return BlockTensor(np.ascontiguousarray(mantissas), codes, fmt)


def quantized_values(x: np.ndarray, fmt: BlockFormat) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize and return every element's exact value ``m * 2^(X - (M-1))`` in one sweep.

    The emulator's hot path for activations: ``quantize(x, fmt).dequantize()`` without the
    BlockTensor, in float32 (exact: M significant bits, subnormal only for blocks below 2^-120),
    with NaN-block elements as 0. Also returns ``L = G - W`` per group (section 4.2) and a
    NaN-element mask (None when there is no NaN block).
    """
    b = _block_exponents(x, fmt)
    unit = b.exponent - (fmt.mantissa_bits - 1)  # the exponent of one mantissa step
    if unit.max() <= 127 - 24:
        values = _round_to_grid(b, unit, fmt)
    else:  # the rounding constant would overflow: scale, round and scale back
        mantissa = _round_mantissas(_scaled_blocks(b, fmt), fmt)
        values = np.multiply(mantissa, _pow2(unit)[..., None], out=mantissa)
    has_nan = bool(b.nonfinite.any())
    if has_nan:
        values[b.nonfinite] = 0
    length = np.shape(x)[-1]
    values = values.reshape(*b.exponent.shape[:-1], -1)[..., :length]
    nan = np.repeat(b.nonfinite, fmt.block_size, axis=-1)[..., :length] if has_nan else None
    return values, b.anchor - fmt.window, nan


def _round_to_grid(b: _Blocks, unit: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """Section 3.3 in two float32 additions: ``(x + C) - C`` with ``C = 1.5 * 2^(unit + 23)``
    rounds x to a multiple of ``2^unit`` with RNE (|x| < 2^(unit + M) is far below C's spacing
    limit), and the subtraction is exact. No scaling, no rint pass; saturation, which only a
    block whose largest element rounds up to ``2^M`` units needs, is fixed for those blocks."""
    magic = np.repeat(1.5 * _pow2(unit + 23), b.blocks.shape[-1], axis=-1)  # float32, normal
    magic = magic.reshape(b.blocks.shape)  # repeated once: two contiguous passes beat broadcasts
    values = np.add(b.blocks, magic)
    values -= magic
    # A block saturates when amax >= (2^M - 1/2) units: its own exponent (not raised by the
    # window) and the fraction of amax at least 1 - 2^-M (normal and subnormal alike).
    own = b.raw == b.exponent
    top = (b.max_bits & _FRACTION_MASK) >= (1 << 23) - (1 << (23 - fmt.mantissa_bits))
    saturated = np.flatnonzero(own & top & ~b.nonfinite)
    if saturated.size:
        flat = values.reshape(-1, values.shape[-1])
        limit = (fmt.max_mantissa * _pow2(unit.reshape(-1)[saturated]))[:, None]
        flat[saturated] = np.clip(flat[saturated], -limit, limit)
    return values


def _shifted_terms(
    mantissa: np.ndarray, exponent: np.ndarray, anchor: np.ndarray, fmt: BlockFormat, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """``m * 2^(X - L)`` with ``L = G - W`` per group: below 2^19, so exact in float32."""
    floor = anchor - fmt.window
    shift = exponent - floor.reshape((-1,) + (1,) * (exponent.ndim - 1))
    terms = np.multiply(mantissa, _pow2(shift)[..., None], out=mantissa)
    return terms.reshape(*exponent.shape[:-1], -1)[..., :length], floor


def flush_to_zero(x: np.ndarray) -> np.ndarray:
    """FTZ alone, in place, for results that cannot be NaN (matrix-unit sums of finite terms)."""
    np.copyto(x, np.float32(0.0), where=np.abs(x) < FLT_MIN)
    return x


def reciprocal(count: int) -> np.float32:
    """r(n) of section 5.2, the float32 nearest to 1/n.

    1/n is never within float64's error of a float32 midpoint for n < 2^28 (its distance from
    one is at least 2^-25/n relative), so rounding through float64 is correct.
    """
    if not 1 <= count < 1 << 28:
        raise ValueError(f"pooling count {count} is outside [1, 2^28)")
    return np.float32(1.0 / count)
