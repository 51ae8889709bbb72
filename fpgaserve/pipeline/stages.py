"""Pipeline stages: each takes one named tensor and produces one, in order.

``TensorflowStage`` and ``KerasStage`` run on the CPU and are stored as TensorFlow SavedModels
(signature ``serving_default``, named input and output); ``AcceleratorStage`` is a compiled
program that runs on a HAL device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from fpgaserve.hal import Program, save_program

DTYPES = {"string": tf.string, "float32": tf.float32}


@dataclass(frozen=True)
class TensorSpec:
    """A stage's input or output: name, dtype ("string" or "float32"), shape with None batch."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        if data["dtype"] not in DTYPES:
            raise ValueError(f"tensor {data['name']!r}: unsupported dtype {data['dtype']!r}")
        return cls(str(data["name"]), data["dtype"], tuple(data["shape"]))

    def tf_spec(self) -> tf.TensorSpec:
        return tf.TensorSpec(self.shape, DTYPES[self.dtype], name=self.name)


class Stage:
    """One step of a pipeline. ``kind`` names it in the manifest."""

    kind = "stage"

    def __init__(self, name: str, input: TensorSpec, output: TensorSpec) -> None:
        self.name, self.input, self.output = name, input, output

    def save(self, folder: Path) -> None:
        raise NotImplementedError


class TensorflowStage(Stage):
    """A TensorFlow function of one tensor, e.g. JPEG decoding; stored as a SavedModel."""

    kind = "tensorflow"

    def __init__(self, name: str, function, input: TensorSpec, output: TensorSpec) -> None:
        super().__init__(name, input, output)
        self.module = tf.Module()
        self.module.serve = tf.function(
            lambda tensor: {output.name: function(tensor)}, input_signature=[input.tf_spec()]
        )

    def save(self, folder: Path) -> None:
        signatures = {"serving_default": self.module.serve}
        tf.saved_model.save(self.module, str(folder), signatures=signatures)


class KerasStage(Stage):
    """A Keras model of one input (a classifier head, say); stored as a SavedModel."""

    kind = "keras"

    def __init__(self, name: str, model: keras.Model, output_name: str = "probabilities") -> None:
        shape = tuple(model.input.shape)
        super().__init__(
            name,
            TensorSpec(f"{name}_input", "float32", shape),
            TensorSpec(output_name, "float32", tuple(model.output.shape)),
        )
        self.model = model

    def save(self, folder: Path) -> None:
        archive = keras.export.ExportArchive()
        archive.track(self.model)
        archive.add_endpoint(
            name="serve",
            fn=lambda tensor: {self.output.name: self.model(tensor, training=False)},
            input_signature=[self.input.tf_spec()],
        )
        archive.write_out(str(folder), verbose=False)


class AcceleratorStage(Stage):
    """The featurizer: an accelerator program, run by the HAL on the chosen device."""

    kind = "accelerator"
    PROGRAM_FILE = "program.fpgaprog"

    def __init__(self, name: str, program: Program, output_name: str = "features") -> None:
        shapes = program.shapes()
        (input_name,) = program.inputs
        (output_tensor,) = program.outputs
        super().__init__(
            name,
            TensorSpec(input_name, "float32", (None, *program.inputs[input_name])),
            TensorSpec(output_name, "float32", (None, *shapes[output_tensor])),
        )
        self.program = program

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_program(self.program, folder / self.PROGRAM_FILE)
