"""For every zoo model: compile time per format, and the fp32 program on the emulator against
TensorFlow's float featurizer on real photos (cosine similarity, max relative error).

Usage: python bench/zoo_fidelity.py [--data ../shared/data/imagenet] [--images 4]
Weights: MobileNet 0.75 uses the real ImageNet weights from the data folder, the others random
weights (this machine cannot download Keras's ImageNet weights).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from fpgaserve.compiler import compile_model
from fpgaserve.compiler.zoo import ZOO, build_zoo_model
from fpgaserve.evaluation import load_labelled_images
from fpgaserve.hal import open_device

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    print(
        f"{'model':<15} {'weights':<8} {'cut':<26} {'features':>8} {'compile msfp16':>15} "
        f"{'min cosine':>11} {'max rel err':>12}"
    )
    with open_device("emulator") as device:
        for name, entry in ZOO.items():
            real = name == "mobilenet_0.75"
            weights = str(args.data / "mobilenet_0.75_224_imagenet.h5") if real else "random"
            model, _ = build_zoo_model(name, weights)
            start = time.perf_counter()
            compile_model(model, "msfp16", progress=False)
            compile_seconds = time.perf_counter() - start
            compiled = compile_model(model, "fp32", progress=False)
            images = load_labelled_images(args.data, entry.preprocess, args.images).inputs
            featurizer = keras.Model(model.input, model.get_layer(compiled.cut).output)
            expected = featurizer.predict(images, verbose=0).reshape(len(images), -1)
            (input_name,) = compiled.program.inputs
            handle = device.load(compiled.program)
            ours = device.run(handle, {input_name: images})[compiled.cut].reshape(len(images), -1)
            device.unload(handle)
            a, b = ours.astype(np.float64), expected.astype(np.float64)
            cosine = ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min()
            relative = np.abs(a - b).max() / np.abs(b).max()
            print(
                f"{name:<15} {'imagenet' if real else 'random':<8} {compiled.cut:<26} "
                f"{a.shape[1]:>8} {compile_seconds:>13.1f} s {cosine:>11.7f} {relative:>12.2e}"
            )


if __name__ == "__main__":
    main()
