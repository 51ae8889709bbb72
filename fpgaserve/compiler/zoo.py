"""The quantized model zoo: Keras applications, cut where Brainwave cut them.

``compiler.graph.find_cut`` finds the cuts: ResNet-50/152 and DenseNet-121 after global average
pooling (2048 / 1024 features), VGG-16 after fc7 (Keras's ``fc2``, 4096), MobileNet after global
pooling (1024 * alpha). The tests check each.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from .compile import CompiledModel, compile_model


class WeightsUnavailableError(RuntimeError):
    """The requested weights could not be obtained; the message says what to pass instead."""


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[..., keras.Model]
    preprocess: str  # keras.applications.imagenet_utils mode: "caffe", "torch" or "tf"
    features: int


def _mobilenet(alpha: float) -> Callable[..., keras.Model]:
    def build(weights: str | None) -> keras.Model:
        return keras.applications.MobileNet(alpha=alpha, weights=weights)

    return build


_APPS = keras.applications
ZOO: dict[str, ZooModel] = {
    "resnet50": ZooModel("resnet50", lambda w: _APPS.ResNet50(weights=w), "caffe", 2048),
    "resnet152": ZooModel("resnet152", lambda w: _APPS.ResNet152(weights=w), "caffe", 2048),
    "densenet121": ZooModel("densenet121", lambda w: _APPS.DenseNet121(weights=w), "torch", 1024),
    "vgg16": ZooModel("vgg16", lambda w: _APPS.VGG16(weights=w), "caffe", 4096),
    **{
        name: ZooModel(name, _mobilenet(alpha), "tf", int(1024 * alpha))
        for name, alpha in (
            ("mobilenet", 1.0),
            ("mobilenet_0.75", 0.75),
            ("mobilenet_0.5", 0.5),
            ("mobilenet_0.25", 0.25),
        )
    },
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class RandomWeightsWarning(UserWarning):
    """ImageNet weights could not be had and random ones were used instead."""


def build_zoo_model(name: str, weights: str = "imagenet", seed: int = 0) -> tuple[keras.Model, str]:
    """The Keras model and a provenance string for its weights.

    ``weights``: "imagenet" (Keras's download and cache), "random" (explicit, seeded), "auto"
    (ImageNet when Keras can get them, else random with a loud warning: what `make serve` uses on
    machines without internet), or a path to a weights file. Random weights are never chosen
    silently: the provenance says "random" and lands in the program's metadata.
    """
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {', '.join(ZOO)}")
    entry = ZOO[name]
    if weights == "auto":
        try:
            return build_zoo_model(name, "imagenet", seed)
        except WeightsUnavailableError as exc:
            warnings.warn(
                f"{exc}. FALLING BACK TO RANDOM WEIGHTS: the model's predictions are meaningless",
                RandomWeightsWarning,
                stacklevel=2,
            )
            return build_zoo_model(name, "random", seed)
    if weights == "random":
        keras.utils.set_random_seed(seed)
        return entry.build(None), f"random (seed {seed})"
    if weights == "imagenet":
        try:
            return entry.build("imagenet"), "imagenet (keras.applications)"
        except Exception as exc:  # Keras raises many kinds for a failed download
            raise WeightsUnavailableError(
                f"could not get ImageNet weights for {name} ({type(exc).__name__}: {exc}); "
                "on a machine without internet pass a weights file path, or 'random'"
            ) from exc
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights {weights!r} are neither 'imagenet', 'random' nor an existing file"
        )
    return entry.build(str(path)), f"file {path.name} sha256:{_sha256(path)}"


def compile_zoo_model(
    name: str,
    weights: str = "imagenet",
    format: str = "msfp16",
    progress: bool = True,
    calibration: np.ndarray | None = None,
) -> tuple[CompiledModel, keras.Model]:
    """Build and compile a zoo model; returns the compiled model and the Keras original.

    ``calibration``: preprocessed images for bias correction (see compiler/calibrate.py).
    """
    model, provenance = build_zoo_model(name, weights)
    compiled = compile_model(
        model,
        format=format,
        progress=progress,
        metadata={"zoo_model": name, "weights": provenance, "preprocess": ZOO[name].preprocess},
        calibration=calibration,
    )
    return compiled, model
