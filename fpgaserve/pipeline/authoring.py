"""The authoring API, shaped like Azure ML's Brainwave one, in TensorFlow 2.

model = QuantizedResnet50(weights="imagenet", format="msfp16")
definition = ModelDefinition("resnet50")
definition.pipeline.append(model.preprocessing())      # TensorflowStage: bytes -> 224x224
definition.pipeline.append(model.featurizer())         # AcceleratorStage
definition.pipeline.append(model.default_classifier()) # KerasStage: dense + softmax
definition.save("resnet50.zip")
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from fpgaserve.compiler import CompiledModel, compile_model
from fpgaserve.compiler.zoo import ZOO, compile_zoo_model
from fpgaserve.preprocessing import CROP, decode_and_crop

from .stages import AcceleratorStage, KerasStage, TensorflowStage, TensorSpec

SERVICE_INPUT = "images"
# keras.applications.imagenet_utils modes as explicit parameters.
PRESETS = {
    "tf": {"channel_order": "RGB", "scale": 1 / 127.5, "mean": (1.0, 1.0, 1.0), "std": (1, 1, 1)},
    "torch": {
        "channel_order": "RGB",
        "scale": 1 / 255,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    },
    "caffe": {
        "channel_order": "BGR",
        "scale": 1.0,
        "mean": (103.939, 116.779, 123.68),
        "std": (1, 1, 1),
    },
}


def ImagePreprocessing(
    channel_order: str = "RGB",
    scale: float = 1.0,
    mean: Sequence[float] = (0.0, 0.0, 0.0),
    std: Sequence[float] = (1.0, 1.0, 1.0),
    preset: str | None = None,
    name: str = "preprocess",
) -> TensorflowStage:
    """JPEG/PNG bytes (any batch) -> decoded, shorter side resized to 256 (aspect kept),
    centre-cropped to 224x224, ``channel_order`` applied, then ``(x * scale - mean) / std``.
    ``preset`` ("tf", "torch", "caffe") fills the rest as keras.applications does."""
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        return ImagePreprocessing(**PRESETS[preset], name=name)
    if channel_order not in ("RGB", "BGR"):
        raise ValueError(f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}")
    mean_t = tf.constant(np.asarray(mean, np.float32))
    std_t = tf.constant(np.asarray(std, np.float32))

    def preprocess(images: tf.Tensor) -> tf.Tensor:
        pixels = tf.map_fn(
            decode_and_crop, images, fn_output_signature=tf.TensorSpec((CROP, CROP, 3), tf.float32)
        )
        if channel_order == "BGR":
            pixels = pixels[..., ::-1]
        return (pixels * scale - mean_t) / std_t

    return TensorflowStage(
        name,
        preprocess,
        TensorSpec(SERVICE_INPUT, "string", (None,)),
        TensorSpec("preprocessed", "float32", (None, CROP, CROP, 3)),
    )


class QuantizedModel:
    """A compiled featurizer with its head and preprocessing, ready to become stages."""

    def __init__(self, compiled: CompiledModel, preset: str | None) -> None:
        self.compiled, self.preset = compiled, preset

    @property
    def format(self) -> str:
        return self.compiled.program.format

    def preprocessing(self) -> TensorflowStage:
        if self.preset is None:
            raise ValueError("a custom model has no preset: build ImagePreprocessing(...) yourself")
        return ImagePreprocessing(preset=self.preset)

    def featurizer(self) -> AcceleratorStage:
        return AcceleratorStage("featurizer", self.compiled.program)

    def default_classifier(self) -> KerasStage:
        if self.compiled.head is None:
            raise ValueError("the model has no head after its cut: add your own KerasStage")
        return KerasStage("classifier", self.compiled.head)


def QuantizedZooModel(
    name: str, weights="imagenet", format="msfp16", calibration=None, progress=True
) -> QuantizedModel:
    """Any zoo model by name (fpgaserve.compiler.zoo.ZOO)."""
    compiled, _ = compile_zoo_model(name, weights, format, progress, calibration)
    return QuantizedModel(compiled, ZOO[name].preprocess)


def QuantizedResnet50(weights="imagenet", format="msfp16", calibration=None, progress=True):
    return QuantizedZooModel("resnet50", weights, format, calibration, progress)


def QuantizedResnet152(weights="imagenet", format="msfp16", calibration=None, progress=True):
    return QuantizedZooModel("resnet152", weights, format, calibration, progress)


def QuantizedDenseNet121(weights="imagenet", format="msfp16", calibration=None, progress=True):
    return QuantizedZooModel("densenet121", weights, format, calibration, progress)


def QuantizedVgg16(weights="imagenet", format="msfp16", calibration=None, progress=True):
    return QuantizedZooModel("vgg16", weights, format, calibration, progress)


def QuantizedMobileNet(
    alpha=1.0, weights="imagenet", format="msfp16", calibration=None, progress=True
):
    name = "mobilenet" if alpha == 1.0 else f"mobilenet_{alpha:g}"
    return QuantizedZooModel(name, weights, format, calibration, progress)


def QuantizedKerasModel(
    model: keras.Model, format="msfp16", cut=None, calibration=None, progress=True
) -> QuantizedModel:
    """Any Keras CNN built from supported layers (docs/datapath.md section 7)."""
    return QuantizedModel(
        compile_model(model, format, cut, progress, calibration=calibration), None
    )
