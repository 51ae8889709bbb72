"""Whole ResNet-50 featurizer (up to avg_pool): emulator in msfp16 vs TensorFlow float32.

Same run, same random weights, batch 1 and 8, best of N. TensorFlow runs the Keras featurizer as
a compiled tf.function (its fastest inference path); the emulator runs the compiled program
through the HAL device interface, as the server will.
Usage: python bench/resnet50_model.py [--format msfp16] [--batch 1 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from timing import best_time

from fpgaserve.compiler import compile_model
from fpgaserve.compiler.zoo import build_zoo_model
from fpgaserve.hal import open_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", default="msfp16")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, provenance = build_zoo_model("resnet50", "random")
    start = time.perf_counter()
    compiled = compile_model(model, args.format, progress=False)
    print(
        f"ResNet-50 featurizer, {provenance} weights, compiled to {args.format} in "
        f"{time.perf_counter() - start:.1f} s; {len(compiled.program.ops)} ops"
    )
    featurizer = keras.Model(model.input, model.get_layer(compiled.cut).output)
    tf_call = tf.function(lambda x: featurizer(x, training=False), jit_compile=False)
    rng = np.random.default_rng(0)
    with open_device("emulator") as device:
        handle = device.load(compiled.program)
        (input_name,) = compiled.program.inputs
        for batch in args.batch:
            x = rng.uniform(-120, 150, (batch, 224, 224, 3)).astype(np.float32)  # caffe range
            tensor = tf.constant(x)
            emu = best_time(lambda: device.run(handle, {input_name: x}), args.repeats)  # noqa: B023
            ref = best_time(lambda: tf_call(tensor).numpy(), args.repeats)  # noqa: B023
            print(
                f"batch {batch}: emulator {emu * 1e3:8.1f} ms  TensorFlow float32 "
                f"{ref * 1e3:7.1f} ms  ratio {emu / ref:.2f}  (goal <= 3.0 at batch 1)"
            )


if __name__ == "__main__":
    main()
