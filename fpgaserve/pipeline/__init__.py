"""Service definitions: author a pipeline of stages, save it as one archive, run it."""

from .archive import ArchiveError, Limits, ModelDefinition, read_manifest
from .authoring import (
    ImagePreprocessing,
    QuantizedDenseNet121,
    QuantizedKerasModel,
    QuantizedMobileNet,
    QuantizedModel,
    QuantizedResnet50,
    QuantizedResnet152,
    QuantizedVgg16,
    QuantizedZooModel,
)
from .runtime import Pipeline
from .stages import AcceleratorStage, KerasStage, TensorflowStage, TensorSpec

__all__ = [
    "AcceleratorStage",
    "ArchiveError",
    "ImagePreprocessing",
    "KerasStage",
    "Limits",
    "ModelDefinition",
    "Pipeline",
    "QuantizedDenseNet121",
    "QuantizedKerasModel",
    "QuantizedMobileNet",
    "QuantizedModel",
    "QuantizedResnet50",
    "QuantizedResnet152",
    "QuantizedVgg16",
    "QuantizedZooModel",
    "TensorSpec",
    "TensorflowStage",
    "read_manifest",
]
