"""Quantization (datapath section 3): emulator against the scalar reference, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import reference as ref
from fpgaserve.hal import BlockTensor, canonicalize, get_format, quantize
from fpgaserve.hal.numerics import quantized_values

FORMATS = ["msfp16", "msfp12", "mxint8"]


def check(x: np.ndarray, name: str) -> BlockTensor:
    fmt = get_format(name)
    q = quantize(x, fmt)
    mantissas, codes = ref.quantize(x, fmt.block_size, fmt.mantissa_bits, fmt.window)
    np.testing.assert_array_equal(q.mantissas, mantissas)
    np.testing.assert_array_equal(q.codes, codes)
    # The emulator's fused path for activations gives the same values, NaN blocks as 0.
    values, floor, nan = quantized_values(x, fmt)
    nan_elements = q.nan_elements()
    np.testing.assert_array_equal(values, np.where(nan_elements, 0, q.dequantize()))
    np.testing.assert_array_equal(nan_elements, False if nan is None else nan)
    np.testing.assert_array_equal(floor, q.block_shifts()[1])
    return q


finite_floats = st.floats(width=32, allow_nan=False, allow_infinity=False)
any_floats = st.floats(width=32)


@pytest.mark.parametrize("name", FORMATS)
@given(data=st.data())
def test_random_tensors_match_reference(name, data):
    shape = data.draw(hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=40))
    x = data.draw(hnp.arrays(np.float32, shape, elements=finite_floats))
    check(x, name)


@pytest.mark.parametrize("name", FORMATS)
@given(data=st.data())
def test_special_values_match_reference(name, data):
    x = data.draw(hnp.arrays(np.float32, (2, 3, 35), elements=any_floats))
    check(x, name)


@pytest.mark.parametrize("name", FORMATS)
@given(
    exponents=hnp.arrays(np.int32, (2, 4, 16), elements=st.integers(-149, 127)),
    signs=hnp.arrays(np.bool_, (2, 4, 16)),
)
def test_wide_dynamic_range_matches_reference(name, exponents, signs):
    x = np.where(signs, -1, 1) * np.ldexp(np.float32(1.5), exponents).astype(np.float32)
    check(x.astype(np.float32), name)


def test_all_zeros_use_the_minimum_exponent():
    q = check(np.zeros((2, 40), np.float32), "msfp16")
    assert np.all(q.codes == 0) and not q.mantissas.any()


def test_negative_zero_has_no_sign():
    q = check(np.array([[-0.0, 0.0, 1.0]], np.float32), "msfp16")
    assert q.mantissas.tolist() == [[0, 0, 64]]


def test_ties_round_to_even():
    # Block max 64 gives X = 6, so the element grid is 1.0 (M = 7): 2.5 -> 2, 3.5 -> 4, -5.5 -> -6.
    q = check(np.array([[64.0, 2.5, 3.5, -5.5, 0.5, 1.5]], np.float32), "msfp16")
    assert q.mantissas.tolist() == [[64, 2, 4, -6, 0, 2]]


def test_block_maximum_saturates_instead_of_overflowing():
    # 127.5 * 2^-6 * 2^6 rounds to 128 = 2^M: clamped to 127, exponent unchanged.
    q = check(np.array([[127.5, 1.0]], np.float32), "msfp16")
    assert q.mantissas.tolist() == [[127, 1]] and q.codes.tolist() == [[6 + 127]]


def test_max_magnitude_and_subnormals():
    big = np.finfo(np.float32).max
    tiny = np.float32(1e-45)  # the smallest subnormal
    q = check(np.array([[big, -big, 1.0], [tiny, -tiny, 1e-40]], np.float32), "msfp16")
    assert q.codes[0, 0] == 127 + 127  # exponent 127: no overflow
    assert q.mantissas[0].tolist() == [127, -127, 0]
    # Subnormals share X = -127, grid 2^-133: 1e-45 rounds to 0, 1e-40 to one step.
    assert q.codes[1, 0] == 0 and q.mantissas[1].tolist() == [0, 0, 1]


def test_partial_block_is_padded_and_ignored():
    x = np.arange(1, 21, dtype=np.float32).reshape(1, 20)
    q = check(x, "msfp16")
    assert q.codes.shape == (1, 2) and q.mantissas.shape == (1, 20)
    assert int(q.codes[0, 1]) - 127 == 4  # the partial block [17..20] has its own exponent


def test_nan_and_inf_make_a_nan_block():
    x = np.ones((1, 48), np.float32)
    x[0, 3], x[0, 20] = np.nan, -np.inf
    q = check(x, "msfp16")
    assert q.codes.tolist() == [[255, 255, 127]]
    assert not q.mantissas[0, :32].any()
    assert np.isnan(q.dequantize()[0, :32]).all() and (q.dequantize()[0, 32:] == 1).all()


def test_window_floors_small_blocks():
    # Block 1 is 2^-20 of block 0: its exponent is raised to 0 - 12 and it loses its low bits.
    x = np.concatenate([np.full(16, 1.0), np.full(16, 1.5 * 2.0**-20)]).astype(np.float32)
    q = check(x.reshape(1, 32), "msfp16")
    assert (q.codes[0].astype(int) - 127).tolist() == [0, -12]
    assert (q.mantissas[0, 16:] == 0).all()  # 1.5 * 2^-20 < half the grid step 2^-18


def test_windows_are_per_sample():
    small = np.full((1, 16), 1e-10, np.float32)
    alone = quantize(small, get_format("msfp16"))
    together = quantize(
        np.concatenate([small, np.full((1, 16), 1e10, np.float32)]), get_format("msfp16")
    )
    np.testing.assert_array_equal(alone.mantissas[0], together.mantissas[0])
    np.testing.assert_array_equal(alone.codes[0], together.codes[0])


def test_dequantize_is_exact_and_close():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    q = quantize(x, get_format("msfp16"))
    deq = q.dequantize()
    # Within one block the error is at most half a grid step: 2^(X - 7).
    step = np.exp2(q.element_exponents().astype(np.float64) - 6)
    assert np.all(np.abs(deq.astype(np.float64) - x) <= step / 2)


def test_canonicalize_flushes_and_canonicalizes():
    x = np.array([-0.0, 1e-40, -1e-40, np.nan, -np.inf, 2.0], np.float32)
    x[3] = np.uint32(0xFFC00001).view(np.float32)  # a negative NaN with a payload
    out = canonicalize(x).view(np.uint32)
    assert out.tolist() == [0, 0, 0, 0x7FC00000, 0xFF800000, 0x40000000]


def test_block_tensor_rejects_inconsistent_parts():
    fmt = get_format("msfp16")
    with pytest.raises(ValueError, match="exponent codes"):
        BlockTensor(np.zeros((2, 20), np.int8), np.zeros((2, 1), np.uint8), fmt)
    with pytest.raises(ValueError, match="magnitude"):
        BlockTensor(np.full((1, 4), -128, np.int8), np.zeros((1, 1), np.uint8), fmt)
