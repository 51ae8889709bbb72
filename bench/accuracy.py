"""Top-1/top-5 of TensorFlow float vs the emulated program in every format, on real ImageNet
photos with ImageNet-trained MobileNet (alpha 0.75) weights from shared/data/imagenet.

Each quantized format is measured plainly and with bias correction. Bias correction is
calibrated by two-fold cross-calibration so no photo is scored by a program calibrated on it:
programs calibrated on the even-numbered photos score the odd ones and vice versa.
Usage: python bench/accuracy.py [--data ../shared/data/imagenet] [--limit N] [--calibration 100]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from fpgaserve.compiler import compile_model
from fpgaserve.compiler.zoo import ZOO, build_zoo_model
from fpgaserve.evaluation import Scores, cross_calibrated, load_labelled_images, run_compiled
from fpgaserve.hal import FORMATS, open_device

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--calibration", type=int, default=100, help="photos per fold")
    parser.add_argument("--json", type=Path, help="also write the table here (for report_plots)")
    args = parser.parse_args()
    weights = args.data / "mobilenet_0.75_224_imagenet.h5"
    images = load_labelled_images(args.data, ZOO["mobilenet_0.75"].preprocess, args.limit)
    model, provenance = build_zoo_model("mobilenet_0.75", str(weights))
    reference = Scores.from_probabilities(
        np.asarray(model.predict(images.inputs, verbose=0)), images.labels
    )
    print(f"MobileNet 0.75, {provenance}, {len(images.labels)} labelled photos")
    print(f"{'TensorFlow float':<30} top-1 {reference.top1:6.1%}  top-5 {reference.top5:6.1%}")
    rows = [{"path": "float", "top1": reference.top1, "top5": reference.top5, "agree": 1.0}]
    with open_device("emulator") as device:
        for fmt in FORMATS:
            variants = (
                {"": None} if fmt == "fp32" else {"": None, " + bias corr.": args.calibration}
            )
            for label, calibration in variants.items():
                start = time.perf_counter()
                if calibration is None:
                    compiled = compile_model(model, fmt, progress=False)
                    probabilities = run_compiled(compiled, device, images.inputs)
                else:
                    probabilities = cross_calibrated(model, fmt, device, images.inputs, calibration)
                seconds = time.perf_counter() - start
                scores = Scores.from_probabilities(probabilities, images.labels)
                agree = (scores.predictions == reference.predictions).mean()
                rows.append({"path": fmt + label, "top1": scores.top1, "top5": scores.top5,
                             "agree": float(agree)})  # fmt: skip
                print(
                    f"{'emulator ' + fmt + label:<30} top-1 {scores.top1:6.1%}  "
                    f"top-5 {scores.top5:6.1%}  change {100 * (scores.top1 - reference.top1):+5.1f}"
                    f" pts  agrees with float {agree:6.1%}  ({seconds:.0f} s)"
                )
    if args.json:
        args.json.write_text(json.dumps({"photos": len(images.labels), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
