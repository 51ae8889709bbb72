"""The fp32 reference format agrees with TensorFlow's float layers within float32 tolerance."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")

from fpgaserve.hal.emulator import vector_unit as vu  # noqa: E402
from fpgaserve.hal.emulator.matrix_unit import Geometry, conv2d, dense, prepare_weights  # noqa: E402

RNG = np.random.default_rng(2)
TOLERANCE = {"rtol": 2e-5, "atol": 2e-5}


def keras_conv(layer, x: np.ndarray) -> np.ndarray:
    return layer(tf.constant(x)).numpy()


@pytest.mark.parametrize(
    "kernel, strides, dilation, padding",
    [
        (3, 1, 1, "same"),
        (7, 2, 1, "valid"),
        (1, 2, 1, "valid"),
        (3, 1, 2, "same"),
        (3, 2, 1, "same"),
    ],
)
def test_conv2d_matches_keras(kernel, strides, dilation, padding):
    x = RNG.standard_normal((2, 15, 15, 8)).astype(np.float32)
    layer = tf.keras.layers.Conv2D(
        6, kernel, strides=strides, dilation_rate=dilation, padding=padding, use_bias=False
    )
    expected = keras_conv(layer, x)
    w = layer.kernel.numpy()
    flat = np.ascontiguousarray(w.transpose(3, 0, 1, 2).reshape(6, -1))
    pads = (0, 0, 0, 0)
    if padding == "same":  # TensorFlow puts the odd pixel at the bottom/right
        effective = dilation * (kernel - 1) + 1
        total = max((-(-15 // strides) - 1) * strides + effective - 15, 0)
        pads = (total // 2, total - total // 2) * 2
        pads = (pads[0], pads[1], pads[0], pads[1])
    geometry = Geometry((kernel, kernel), (strides, strides), (dilation, dilation), pads)
    ours = conv2d(x, prepare_weights(flat, 1), geometry)
    np.testing.assert_allclose(ours, expected, **TOLERANCE)


def test_depthwise_matches_keras():
    x = RNG.standard_normal((2, 9, 9, 12)).astype(np.float32)
    layer = tf.keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)
    expected = keras_conv(layer, x)
    w = layer.kernel.numpy()  # (3, 3, 12, 1)
    flat = np.ascontiguousarray(w[..., 0].transpose(2, 0, 1).reshape(12, 9))
    ours = conv2d(x, prepare_weights(flat, 12), Geometry((3, 3), padding=(1, 1, 1, 1), groups=12))
    np.testing.assert_allclose(ours, expected, **TOLERANCE)


def test_dense_matches_keras():
    x = RNG.standard_normal((3, 300)).astype(np.float32)
    layer = tf.keras.layers.Dense(20, use_bias=False)
    expected = layer(tf.constant(x)).numpy()
    ours = dense(x, prepare_weights(np.ascontiguousarray(layer.kernel.numpy().T), 1))
    np.testing.assert_allclose(ours, expected, **TOLERANCE)


def test_pools_and_batch_norm_match_keras():
    x = RNG.standard_normal((2, 9, 9, 5)).astype(np.float32)
    same = (1, 1, 1, 1)
    layers = tf.keras.layers
    cases = [
        (layers.MaxPooling2D(3, 2, padding="same"), vu.max_pool(x, (3, 3), (2, 2), same)),
        (layers.AveragePooling2D(3, 2, padding="same"), vu.avg_pool(x, (3, 3), (2, 2), same)),
        (layers.AveragePooling2D(2, 2), vu.avg_pool(x, (2, 2), (2, 2), (0, 0, 0, 0))),
        (layers.GlobalAveragePooling2D(), vu.global_avg_pool(x)),
        (layers.GlobalMaxPooling2D(), vu.global_max_pool(x)),
    ]
    for layer, ours in cases:
        np.testing.assert_allclose(ours, layer(tf.constant(x)).numpy(), **TOLERANCE)
    bn = layers.BatchNormalization(epsilon=1e-3)
    bn.build(x.shape)
    bn.set_weights([RNG.uniform(0.5, 2, 5).astype(np.float32) for _ in range(4)])
    gamma, beta, mean, var = bn.get_weights()
    scale = (gamma / np.sqrt(var + 1e-3)).astype(np.float32)
    shift = (beta - mean * scale).astype(np.float32)
    expected = bn(tf.constant(x), training=False).numpy()
    np.testing.assert_allclose(vu.scale_shift(x, scale, shift), expected, rtol=1e-5, atol=1e-5)
