"""ResNet-50 featurizer (msfp16, random weights): OpenCL device vs emulator vs TensorFlow
float32, same run, same input, best of N. Checks the OpenCL and emulator bits are identical.

Usage: python bench/opencl_resnet50.py [--device opencl] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os

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
    parser.add_argument("--device", default="opencl")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, _ = build_zoo_model("resnet50", "random")
    compiled = compile_model(model, "msfp16", progress=False)
    featurizer = keras.Model(model.input, model.get_layer(compiled.cut).output)
    tf_call = tf.function(lambda x: featurizer(x, training=False))
    x = np.random.default_rng(0).uniform(-120, 150, (1, 224, 224, 3)).astype(np.float32)
    (name,) = compiled.program.inputs
    results, times = {}, {}
    for device_name in ("emulator", args.device):
        with open_device(device_name) as device:
            handle = device.load(compiled.program)
            results[device_name] = device.run(handle, {name: x})[compiled.cut]
            times[device_name] = best_time(lambda: device.run(handle, {name: x}), args.repeats)  # noqa: B023
            description = device.info.description
    times["tensorflow"] = best_time(lambda: tf_call(tf.constant(x)).numpy(), args.repeats)
    same = np.array_equal(results["emulator"].view(np.uint32), results[args.device].view(np.uint32))
    print(
        f"ResNet-50 featurizer, msfp16, batch 1, best of {args.repeats}; {args.device} = "
        f"{description}"
    )
    print(
        f"  {args.device:<10} {times[args.device] * 1e3:8.1f} ms   "
        f"x{times[args.device] / times['emulator']:.2f} the emulator (goal <= 2.0)"
    )
    print(f"  {'emulator':<10} {times['emulator'] * 1e3:8.1f} ms")
    print(f"  {'tensorflow':<10} {times['tensorflow'] * 1e3:8.1f} ms (float32)")
    print(f"  bits identical to the emulator: {same}")


if __name__ == "__main__":
    main()
