"""Vector unit (datapath section 5): emulator against the scalar reference, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import reference as ref
from conftest import assert_same_bits
from fpgaserve.hal import canonicalize
from fpgaserve.hal.emulator import vector_unit as vu

# Canonical inputs only, as the datapath guarantees: specials, huge and tiny values included.
values = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1.0, -1.0, 6.0, 2.0**-126, 3.0e38, -3.0e38, 2.0**-125]),
)


def canonical_arrays(shape):
    return hnp.arrays(np.float32, shape, elements=values).map(canonicalize)


@given(x=canonical_arrays((2, 3, 3, 4)), p=canonical_arrays((3, 4)))
def test_elementwise_ops_match_reference(x, p):
    b, s, t = p
    assert_same_bits(vu.bias(x, b), ref.elementwise(ref.op_add, x, np.broadcast_to(b, x.shape)))
    expected = ref.elementwise(
        lambda v, sv, tv: ref.op_add(ref.op_mul(v, sv), tv),
        x,
        np.broadcast_to(s, x.shape),
        np.broadcast_to(t, x.shape),
    )
    assert_same_bits(vu.scale_shift(x, s, t), expected)
    assert_same_bits(vu.relu(x), ref.elementwise(ref.relu, x))
    assert_same_bits(vu.relu6(x), ref.elementwise(ref.relu6, x))
    y = x[::-1]
    assert_same_bits(vu.add(x, y), ref.elementwise(ref.op_add, x, y))


def test_scale_shift_is_two_roundings_not_fma():
    # x * s = 1 + 2^-23 + 2^-46 exactly; rounded to 1 + 2^-23, then - (1 + 2^-23) = 0.
    # An FMA would keep 2^-46 instead.
    x = np.array([[1 + 2.0**-23]], np.float32)
    s = np.array([1 + 2.0**-23], np.float32)
    t = np.array([-(1 + 2.0**-22)], np.float32)
    out = vu.scale_shift(x, s, t)
    assert out.view(np.uint32)[0, 0] == 0


def test_results_below_flt_min_flush_to_positive_zero():
    x = np.array([[1.5 * 2.0**-126]], np.float32)
    out = vu.add(x, np.array([[-1.0 * 2.0**-126]], np.float32))  # 0.5 * 2^-126: subnormal
    assert out.view(np.uint32)[0, 0] == 0
    out = vu.add(np.array([[1.0]], np.float32), np.array([[-1.0]], np.float32))
    assert out.view(np.uint32)[0, 0] == 0


@st.composite
def pool_cases(draw):
    pool = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (
        draw(st.integers(0, pool[0] - 1)),
        draw(st.integers(0, pool[0] - 1)),
        draw(st.integers(0, pool[1] - 1)),
        draw(st.integers(0, pool[1] - 1)),
    )
    height = draw(st.integers(max(1, pool[0] - padding[0] - padding[1]), 6))
    width = draw(st.integers(max(1, pool[1] - padding[2] - padding[3]), 6))
    x = draw(canonical_arrays((2, height, width, 3)))
    return x, pool, strides, padding


@settings(max_examples=60)
@given(case=pool_cases())
def test_pools_match_reference(case):
    x, pool, strides, padding = case
    assert_same_bits(
        vu.max_pool(x, pool, strides, padding), ref.pool(x, "max", pool, strides, padding)
    )
    assert_same_bits(
        vu.avg_pool(x, pool, strides, padding), ref.pool(x, "avg", pool, strides, padding)
    )


@given(x=canonical_arrays((2, 4, 5, 3)))
def test_global_pools_match_reference(x):
    whole = ((4, 5), (1, 1), (0, 0, 0, 0))
    assert_same_bits(vu.global_avg_pool(x), ref.pool(x, "avg", *whole).reshape(2, 3))
    assert_same_bits(vu.global_max_pool(x), ref.pool(x, "max", *whole).reshape(2, 3))


def test_average_uses_the_count_of_in_range_positions():
    x = np.ones((1, 2, 2, 1), np.float32) * 3
    out = vu.avg_pool(x, (3, 3), (1, 1), (1, 1, 1, 1))
    np.testing.assert_array_equal(out, np.full((1, 2, 2, 1), 3, np.float32))


def test_layout_ops_copy_bits():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    b = rng.standard_normal((2, 3, 4, 2)).astype(np.float32)
    assert vu.concat([a, b]).shape == (2, 3, 4, 7)
    padded = vu.zero_pad(a, (1, 0, 2, 1))
    assert padded.shape == (2, 4, 7, 5) and not padded[:, 0].any()
    np.testing.assert_array_equal(vu.flatten(a)[1, :5], a[1, 0, 0])  # channels fastest


@pytest.mark.parametrize("name", ["linear", "relu", "relu6"])
def test_activation_dispatch(name):
    x = np.array([[-2.0, 3.0, 9.0]], np.float32)
    expected = {"linear": [-2, 3, 9], "relu": [0, 3, 9], "relu6": [0, 3, 6]}[name]
    np.testing.assert_array_equal(vu.activation(x, name), np.array([expected], np.float32))
