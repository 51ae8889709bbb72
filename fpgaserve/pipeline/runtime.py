"""Run a service definition in-process: ``Pipeline.load(FILE, device=...)`` then ``run``."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from fpgaserve.hal import Device, HalError, load_program, open_device

from .archive import DEFAULT_LIMITS, LABELS, ArchiveError, Limits, extract
from .stages import DTYPES, AcceleratorStage, TensorSpec


class _TensorflowRunner:
    def __init__(self, folder: Path, input: TensorSpec, output: TensorSpec) -> None:
        self.function = tf.saved_model.load(str(folder)).signatures["serving_default"]
        self.input, self.output = input, output
        inputs, outputs = (
            self.function.structured_input_signature[1],
            self.function.structured_outputs,
        )
        for spec, stored in ((input, inputs.get(input.name)), (output, outputs.get(output.name))):
            if (
                stored is None
                or stored.dtype != DTYPES[spec.dtype]
                or not tf.TensorShape(spec.shape).is_compatible_with(stored.shape)
            ):
                raise ArchiveError(
                    f"its SavedModel has no {spec.dtype} tensor {spec.name!r} of shape "
                    f"{list(spec.shape)}"
                )

    def __call__(self, value: Any) -> np.ndarray:
        result = self.function(**{self.input.name: tf.constant(value)})
        return result[self.output.name].numpy()


class _AcceleratorRunner:
    def __init__(self, folder: Path, device: Device, input: TensorSpec, output: TensorSpec) -> None:
        try:
            self.program = load_program(folder / AcceleratorStage.PROGRAM_FILE)
            shapes = self.program.shapes()
        except Exception as exc:  # whatever a damaged file raises, it is the archive's fault
            raise ArchiveError(f"its program cannot be read: {type(exc).__name__}: {exc}") from None
        # The stage's tensors carry service names ("features"); the program's, Keras layer
        # names. One input, one output, and the shapes must agree.
        if len(self.program.inputs) != 1 or len(self.program.outputs) != 1:
            raise ArchiveError("its program must have exactly one input and one output")
        (self.input_name,), (self.output_name,) = tuple(self.program.inputs), self.program.outputs
        for spec, name in ((input, self.input_name), (output, self.output_name)):
            if shapes[name] != tuple(spec.shape[1:]):
                raise ArchiveError(
                    f"its program's {name!r} has shape {shapes[name]}, the manifest's "
                    f"{spec.name!r} {list(spec.shape[1:])}"
                )
        self.device = device
        self.handle = device.load(self.program)

    def __call__(self, value: np.ndarray) -> np.ndarray:
        outputs = self.device.run(self.handle, {self.input_name: np.asarray(value, np.float32)})
        return outputs[self.output_name]


def _runner(stage: dict[str, Any], root: Path, device: Device) -> Any:
    """A stage's runner, checked against its manifest entry. The manifest is validated but no
    checksum covers what it says the stored stages are: any mismatch is the archive's error."""
    try:
        if stage["kind"] == "accelerator":
            return _AcceleratorRunner(root / stage["path"], device, stage["input"], stage["output"])
        return _TensorflowRunner(root / stage["path"], stage["input"], stage["output"])
    except (HalError, ArchiveError) as exc:
        if not isinstance(exc, ArchiveError):
            raise  # the device's answer (a fault, a format it cannot run), not the archive's
        raise ArchiveError(f"stage {stage['name']!r}: {exc}") from None
    except Exception as exc:  # TensorFlow's many errors for a damaged SavedModel
        raise ArchiveError(
            f"stage {stage['name']!r} cannot be loaded: {type(exc).__name__}: {exc}"
        ) from None


def _labels(path: Path, output: TensorSpec) -> list[str] | None:
    if not path.exists():
        return None
    try:
        labels = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArchiveError(f"{LABELS} is not valid JSON: {exc}") from None
    classes = output.shape[-1]
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ArchiveError(f"{LABELS} must be a JSON list of class names")
    if classes is not None and len(labels) != classes:
        raise ArchiveError(f"{LABELS} names {len(labels)} classes; the model outputs {classes}")
    return labels


# An archive is extracted to a temporary folder named so (the server hides these paths from
# clients).
EXTRACTED_PREFIX = "fpgaserve-"


class Pipeline:
    """The stages of an archive, ready to run on a device. Close it (or use ``with``)."""

    def __init__(self, manifest: dict[str, Any], folder: tempfile.TemporaryDirectory,
                 device: Device, owns_device: bool) -> None:  # fmt: skip
        self.manifest, self._folder, self.device = manifest, folder, device
        self._owns_device = owns_device
        root = Path(folder.name)
        self.stages = manifest["stages"]
        # One callable per stage (a batch in, a batch out): the server schedules them itself.
        self.runners: list[Any] = []
        try:
            for stage in self.stages:
                self.runners.append(_runner(stage, root, device))
            self.labels = _labels(root / LABELS, self.stages[-1]["output"])
        except BaseException:
            self._unload()
            raise

    @classmethod
    def load(cls, path: str | Path, device: str | Device = "emulator",
             limits: Limits = DEFAULT_LIMITS) -> Pipeline:  # fmt: skip
        folder = tempfile.TemporaryDirectory(prefix=EXTRACTED_PREFIX)
        try:
            manifest = extract(path, Path(folder.name), limits)
            owns = isinstance(device, str)
            return cls(manifest, folder, open_device(device) if owns else device, owns)
        except BaseException:
            folder.cleanup()
            raise

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def input_name(self) -> str:
        return self.manifest["input"]

    def run(self, inputs: dict[str, Sequence[bytes] | np.ndarray],
            outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:  # fmt: skip
        """Feed the service input through every stage. Returns the last stage's output, plus any
        earlier stage outputs named in ``outputs`` (e.g. "features")."""
        if set(inputs) != {self.input_name}:
            raise KeyError(
                f"the pipeline takes one input {self.input_name!r}, got {sorted(inputs)}"
            )
        wanted = set(outputs or [self.stages[-1]["output"].name])
        known = {s["output"].name for s in self.stages}
        if wanted - known:
            raise KeyError(f"unknown outputs {sorted(wanted - known)}; available: {sorted(known)}")
        value: Any = inputs[self.input_name]
        results = {}
        for stage, runner in zip(self.stages, self.runners, strict=True):
            value = runner(value)
            if stage["output"].name in wanted:
                results[stage["output"].name] = value
        return results

    def _unload(self) -> None:
        for runner in self.runners:
            if isinstance(runner, _AcceleratorRunner):
                runner.device.unload(runner.handle)

    def close(self) -> None:
        self._unload()
        if self._owns_device:
            self.device.close()
        self._folder.cleanup()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
