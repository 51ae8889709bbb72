"""Top-1/top-5 of TensorFlow float vs the emulated program in every format, on real ImageNet
photos with ImageNet-trained MobileNet (alpha 0.75) weights from shared/data/imagenet.

Usage: python bench/accuracy.py [--data ../shared/data/imagenet] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fpgaserve.compiler.zoo import ZOO, compile_zoo_model
from fpgaserve.evaluation import Scores, load_labelled_images, run_compiled, run_float
from fpgaserve.hal import FORMATS, open_device

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    weights = args.data / "mobilenet_0.75_224_imagenet.h5"
    images = load_labelled_images(args.data, ZOO["mobilenet_0.75"].preprocess, args.limit)
    print(f"MobileNet 0.75, ImageNet weights, {len(images.labels)} labelled photos")
    reference = None
    with open_device("emulator") as device:
        for fmt in FORMATS:
            compiled, model = compile_zoo_model("mobilenet_0.75", str(weights), fmt, progress=False)
            if reference is None:
                reference = Scores.from_probabilities(
                    run_float(model, images.inputs), images.labels
                )
                print(
                    f"{'TensorFlow float':<18} top-1 {reference.top1:6.1%}  "
                    f"top-5 {reference.top5:6.1%}"
                )
            start = time.perf_counter()
            probabilities = run_compiled(compiled, device, images.inputs)
            seconds = time.perf_counter() - start
            scores = Scores.from_probabilities(probabilities, images.labels)
            agree = (scores.predictions == reference.predictions).mean()
            print(
                f"{'emulator ' + fmt:<18} top-1 {scores.top1:6.1%}  top-5 {scores.top5:6.1%}  "
                f"top-1 change {100 * (scores.top1 - reference.top1):+5.1f} pts  "
                f"agrees with float {agree:6.1%}  ({seconds:.1f} s)"
            )


if __name__ == "__main__":
    main()
