"""Accuracy of a compiled featurizer + float head against the float Keras model, on labelled
ImageNet photos (file names start with the synset id, as in shared/data/imagenet)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from fpgaserve.compiler import CompiledModel, compile_model
from fpgaserve.hal import Device
from fpgaserve.preprocessing import preprocess


@dataclass
class LabelledImages:
    inputs: np.ndarray  # (N, 224, 224, 3) preprocessed float32
    labels: np.ndarray  # (N,) class index
    names: list[str]


def load_labelled_images(folder: Path, mode: str, limit: int | None = None) -> LabelledImages:
    index = json.loads((folder / "imagenet_class_index.json").read_text())
    by_synset = {synset: int(i) for i, (synset, _) in index.items()}
    files = sorted((folder / "images").glob("*.JPEG"))[:limit]
    labels = np.array([by_synset[f.name.split("_")[0]] for f in files])
    inputs = np.asarray(preprocess([f.read_bytes() for f in files], mode), dtype=np.float32)
    return LabelledImages(inputs, labels, [f.name for f in files])


@dataclass
class Scores:
    top1: float
    top5: float
    predictions: np.ndarray  # (N,) top-1 class

    @classmethod
    def from_probabilities(cls, probabilities: np.ndarray, labels: np.ndarray) -> Scores:
        top5 = np.argsort(-probabilities, axis=1)[:, :5]
        return cls(
            top1=float(np.mean(top5[:, 0] == labels)),
            top5=float(np.mean((top5 == labels[:, None]).any(axis=1))),
            predictions=top5[:, 0],
        )


def run_compiled(
    compiled: CompiledModel, device: Device, inputs: np.ndarray, batch: int = 16
) -> np.ndarray:
    """Featurize on ``device`` in batches, classify with the float head on the CPU."""
    handle = device.load(compiled.program)
    (input_name,) = compiled.program.inputs
    try:
        features = np.concatenate(
            [
                device.run(handle, {input_name: inputs[i : i + batch]})[compiled.cut]
                for i in range(0, len(inputs), batch)
            ]
        )
    finally:
        device.unload(handle)
    return np.asarray(compiled.head.predict(features, verbose=0, batch_size=64))


def run_float(model: keras.Model, inputs: np.ndarray) -> np.ndarray:
    return np.asarray(model.predict(inputs, verbose=0, batch_size=32))


def cross_calibrated(
    model: keras.Model, fmt: str, device: Device, inputs: np.ndarray, per_fold: int
) -> np.ndarray:
    """Probabilities from bias-corrected programs, two-fold: the program calibrated on the
    even-numbered inputs scores the odd ones and vice versa, so no input scores itself."""
    probabilities = None
    index = np.arange(len(inputs))
    for calibrate, score in ((index % 2 == 0, index % 2 == 1), (index % 2 == 1, index % 2 == 0)):
        compiled = compile_model(model, fmt, progress=False,
                                 calibration=inputs[calibrate][:per_fold])  # fmt: skip
        scored = run_compiled(compiled, device, inputs[score])
        if probabilities is None:
            probabilities = np.zeros((len(inputs), scored.shape[1]), scored.dtype)
        probabilities[score] = scored
    return probabilities
