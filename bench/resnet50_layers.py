"""Emulate every conv and dense layer of ResNet-50 (Keras shapes, random data) against TensorFlow.

For each layer the emulator runs the matrix unit in the chosen format (activation quantization,
exact accumulation, output rounding) and TensorFlow runs float32 conv2d / matmul of the same
shape, in the same process, interleaved, best of N repeats. Prints the total ratio, the worst
layers and peak memory. Usage: python bench/resnet50_layers.py [--format msfp16] [--batch 1]
"""

from __future__ import annotations

import argparse
import os
import resource
import tracemalloc
from dataclasses import dataclass

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from timing import best_time

from fpgaserve.hal import get_format, open_device, quantize
from fpgaserve.hal.emulator.matrix_unit import Geometry, conv2d, prepare_weights


@dataclass
class Layer:
    name: str
    input_shape: tuple[int, ...]
    kernel: tuple[int, int]
    strides: tuple[int, int]
    padding: str
    filters: int
    dense: bool


def resnet50_layers() -> list[Layer]:
    model = tf.keras.applications.ResNet50(weights=None)
    layers = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.Conv2D):
            layers.append(
                Layer(
                    layer.name,
                    tuple(layer.input.shape[1:]),
                    tuple(layer.kernel_size),
                    tuple(layer.strides),
                    layer.padding,
                    layer.filters,
                    False,
                )
            )
        elif isinstance(layer, tf.keras.layers.Dense):
            layers.append(
                Layer(
                    layer.name,
                    tuple(layer.input.shape[1:]),
                    (1, 1),
                    (1, 1),
                    "valid",
                    layer.units,
                    True,
                )
            )
    return layers


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def time_layer(layer: Layer, fmt, batch: int, repeats: int, rng) -> tuple[float, float]:
    """Best-of-N seconds for the emulator and for TensorFlow on one layer's shape."""
    x = np.maximum(rng.standard_normal((batch, *layer.input_shape)), 0).astype(np.float32)
    x4 = x.reshape(batch, 1, 1, -1) if layer.dense else x
    kh, kw = layer.kernel
    cin = x4.shape[3]
    w = (rng.standard_normal((kh, kw, cin, layer.filters)) * 0.05).astype(np.float32)
    flat = np.ascontiguousarray(w.transpose(3, 0, 1, 2).reshape(layer.filters, -1))
    weights = prepare_weights(quantize(flat, fmt) if fmt.quantized else flat, 1)
    pads = (0, 0, 0, 0)
    if layer.padding == "same":
        pads = (
            *same_padding(x4.shape[1], kh, layer.strides[0]),
            *same_padding(x4.shape[2], kw, layer.strides[1]),
        )
    geometry = Geometry(kernel=layer.kernel, strides=layer.strides, padding=pads)
    tx = tf.constant(x)
    if layer.dense:
        tw = tf.constant(w.reshape(cin, layer.filters))

        def tf_run():
            return tf.matmul(tx, tw).numpy()
    else:
        tw = tf.constant(w)

        def tf_run():
            return tf.nn.conv2d(tx, tw, layer.strides, layer.padding.upper()).numpy()

    emu = best_time(lambda: conv2d(x4, weights, geometry), repeats)
    return emu, best_time(tf_run, repeats)


def report(rows: list, fmt_name: str, batch: int, repeats: int) -> None:
    emu_total = sum(r[3] for r in rows)
    tf_total = sum(r[4] for r in rows)
    print(
        f"ResNet-50 conv/dense layers: {len(rows)}, format {fmt_name}, batch {batch}, "
        f"best of {repeats}"
    )
    print(f"emulator total   {emu_total * 1e3:8.1f} ms")
    print(f"TensorFlow total {tf_total * 1e3:8.1f} ms (float32)")
    print(f"ratio emulator / TensorFlow = {emu_total / tf_total:.2f}  (goal <= 3.0 at batch 1)")
    for title, key, count in (
        ("worst layers by ratio", lambda r: r[3] / r[4], 5),
        ("largest layers by emulator time", lambda r: r[3], 3),
    ):
        print(f"{title}:")
        for name, shape, kernel, emu, ref in sorted(rows, key=key)[-count:][::-1]:
            print(
                f"  {name:<22} in {shape!s:<20} k{kernel[0]}x{kernel[1]}  "
                f"emu {emu * 1e3:6.2f} ms  tf {ref * 1e3:6.2f} ms  x{emu / ref:.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", default="msfp16")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    fmt = get_format(args.format)
    open_device("emulator")  # applies the heap settings the emulator device uses when opened
    rng = np.random.default_rng(0)
    layers = resnet50_layers()
    tracemalloc.start()
    for batch in args.batch:
        rows = []
        for layer in layers:
            emu, ref = time_layer(layer, fmt, batch, args.repeats, rng)
            rows.append((layer.name, (batch, *layer.input_shape), layer.kernel, emu, ref))
        report(rows, fmt.name, batch, args.repeats)
    _, peak_traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"peak NumPy allocations (tracemalloc) {peak_traced / 2**20:.1f} MiB; "
        f"peak process RSS {rss:.0f} MiB (includes TensorFlow)"
    )


if __name__ == "__main__":
    main()
