"""Matrix unit (datapath section 4): emulator against the scalar reference, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from conftest import assert_same_bits
from fpgaserve.hal import get_format, quantize
from fpgaserve.hal.emulator.matrix_unit import Geometry, conv2d, dense, prepare_weights

FORMATS = ["msfp16", "msfp12", "mxint8"]


@st.composite
def conv_cases(draw, aligned: bool = False):
    """Random convolutions; ``aligned``: one group, channels a multiple of every block size
    (the OpenCL block matrix unit's case), NaN and Inf elements now and then."""
    kind = "aligned" if aligned else draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if kind == "aligned":
        groups, channels = 1, 32 * draw(st.integers(1, 2))
    elif kind == "depthwise":
        channels = groups = draw(st.integers(1, 12))
    elif kind == "grouped":
        groups = draw(st.integers(2, 3))
        channels = groups * draw(st.integers(1, 5))
    else:
        groups, channels = 1, draw(st.integers(1, 20))
    # 8 and 16 filters per group: the OpenCL kernels' whole tiles of filters.
    per_group = st.integers(1, 20) if aligned else st.sampled_from([1, 2, 3, 8, 16])
    filters = groups * draw(per_group)
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    geometry = Geometry(
        kernel=kernel,
        strides=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        padding=tuple(draw(st.integers(0, 2)) for _ in range(4)),
        groups=groups,
    )
    top, bottom, left, right = geometry.padding
    min_h = max(1, geometry.dilation[0] * (kernel[0] - 1) + 1 - top - bottom)
    min_w = max(1, geometry.dilation[1] * (kernel[1] - 1) + 1 - left - right)
    height = draw(st.integers(min_h, min_h + 3))
    width = draw(st.integers(min_w, min_w + 3))
    batch = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = np.exp2(rng.integers(-8, 8, size=(batch, height, width, channels)))
    x = (rng.standard_normal((batch, height, width, channels)) * scale).astype(np.float32)
    if aligned and draw(st.booleans()):
        x.flat[rng.integers(0, x.size)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    reduction = kernel[0] * kernel[1] * (channels // groups)
    w = (rng.standard_normal((filters, reduction)) * 0.3).astype(np.float32)
    return x, w, geometry


def run_both(x, w, geometry, name):
    fmt = get_format(name)
    wq = quantize(w, fmt)
    ours = conv2d(x, prepare_weights(wq, geometry.groups), geometry)
    theirs = ref.conv2d(
        x,
        wq.mantissas,
        wq.codes,
        (fmt.block_size, fmt.mantissa_bits, fmt.window),
        geometry.kernel,
        geometry.strides,
        geometry.dilation,
        geometry.padding,
        geometry.groups,
    )
    assert_same_bits(ours, theirs)
    return ours


@pytest.mark.parametrize("name", FORMATS)
@settings(max_examples=15)
@given(case=conv_cases())
def test_random_convolutions_match_reference(name, case):
    run_both(*case, name)


def test_dense_matches_reference_and_conv():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 70)).astype(np.float32)
    w = rng.standard_normal((5, 70)).astype(np.float32)
    fmt = get_format("msfp16")
    out = dense(x, prepare_weights(quantize(w, fmt), 1))
    as_conv = run_both(x.reshape(3, 1, 1, 70), w, Geometry(), "msfp16")
    assert_same_bits(out, as_conv.reshape(3, 5))


def single_term_conv(a_values, w_values, name="msfp16"):
    x = np.array(a_values, np.float32).reshape(1, 1, 1, -1)
    w = np.array(w_values, np.float32).reshape(1, -1)
    return run_both(x, w, Geometry(), name).ravel()


def test_final_rounding_is_a_single_rne():
    # 1 + 2^-24 is a tie between 1 and 1 + 2^-23: even wins. 1 + 3 * 2^-24 ties up to 1 + 2^-22.
    pad = [0.0] * 15
    tie_down = single_term_conv([1.0, *pad, 2.0**-12], [1.0, *pad, 2.0**-12])
    tie_up = single_term_conv([1.0, *pad, 3 * 2.0**-12], [1.0, *pad, 2.0**-12])
    assert tie_down[0] == 1.0 and tie_up[0] == np.float32(1 + 2.0**-22)


def test_overflow_gives_infinity_and_underflow_flushes():
    big = single_term_conv([2.0**100], [2.0**100])
    tiny = single_term_conv([2.0**-70], [2.0**-70])
    negative_big = single_term_conv([-(2.0**100)], [2.0**100])
    assert big[0] == np.inf and negative_big[0] == -np.inf
    assert tiny.view(np.uint32)[0] == 0  # +0.0: below FLT_MIN, flushed


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("exponent", [-131, -128, -118, 60, 125])
def test_extreme_activation_magnitudes_stay_exact(name, exponent):
    """The emulator carries activations as their quantized values: float32 subnormals for the
    tiniest blocks, up to just below 2^128 for the largest. Weights scaled the other way keep
    the sums normal, so the test sees those values rather than a flushed zero."""
    rng = np.random.default_rng(exponent + 200)
    x = (rng.standard_normal((2, 5, 5, 24)) * 2.0**exponent).astype(np.float32)
    scale = 2.0 ** (np.clip(-exponent - 10, -120, 120) + rng.integers(-4, 2, (8, 1)))
    w = (rng.standard_normal((8, 3 * 3 * 24)) * scale).astype(np.float32)
    out = run_both(x, w, Geometry(kernel=(3, 3), padding=(1, 1, 1, 1)), name)
    assert np.count_nonzero(out) > 0 and np.isfinite(out).all()


def test_nan_inputs_poison_only_their_outputs():
    x = np.ones((2, 4, 4, 3), np.float32)
    x[0, 0, 0, 1] = np.nan
    x[1, 3, 3, 0] = np.inf
    w = np.full((4, 3 * 3 * 3), 0.5, np.float32)
    out = run_both(x, w, Geometry(kernel=(3, 3), padding=(1, 1, 1, 1)), "msfp16")
    assert np.isnan(out[0, :2, :2]).all() and not np.isnan(out[0, 2:, 2:]).any()
    assert np.isnan(out[1, 2:, 2:]).all() and not np.isnan(out[1, :2, :2]).any()


def test_depthwise_nan_stays_in_its_channel():
    x = np.ones((1, 3, 3, 4), np.float32)
    x[0, 1, 1, 2] = np.nan  # its block (all four channels) becomes NaN
    w = np.ones((4, 9), np.float32)
    out = run_both(x, w, Geometry(kernel=(3, 3), padding=(1, 1, 1, 1), groups=4), "msfp16")
    assert np.isnan(out).all()  # the NaN block covers every channel of that pixel
    x = np.ones((1, 3, 3, 20), np.float32)
    x[0, 1, 1, 18] = np.nan  # channels 16..19 share a block
    out = run_both(
        x,
        np.ones((20, 9), np.float32),
        Geometry(kernel=(3, 3), padding=(1, 1, 1, 1), groups=20),
        "msfp16",
    )
    assert np.isnan(out[..., 16:]).all() and not np.isnan(out[..., :16]).any()


def test_long_reductions_stay_exact():
    # R = 4608 (ResNet's widest 3x3) with a wide spread of block exponents.
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((1, 1, 1, 4608)) * np.exp2(rng.integers(-14, 3, 4608))).astype(
        np.float32
    )
    w = (rng.standard_normal((3, 4608)) * np.exp2(rng.integers(-14, 0, (3, 4608)))).astype(
        np.float32
    )
    run_both(x, w, Geometry(), "msfp16")


def test_fp32_matches_tensorflow():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 9, 9, 16)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, 4, 8)).astype(np.float32)  # groups = 4
    geometry = Geometry(kernel=(3, 3), strides=(2, 2), padding=(1, 1, 1, 1), groups=4)
    weight = kernel.transpose(3, 0, 1, 2).reshape(8, -1)
    ours = conv2d(x, prepare_weights(weight, 4), geometry)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    theirs = tf.nn.conv2d(padded, kernel, strides=2, padding="VALID").numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
