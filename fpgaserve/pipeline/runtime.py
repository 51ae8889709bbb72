"""Run a service definition in-process: ``Pipeline.load(FILE, device=...)`` then ``run``."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from fpgaserve.hal import Device, load_program, open_device

from .archive import DEFAULT_LIMITS, LABELS, Limits, extract
from .stages import AcceleratorStage, TensorSpec


class _TensorflowRunner:
    def __init__(self, folder: Path, input: TensorSpec, output: TensorSpec) -> None:
        self.function = tf.saved_model.load(str(folder)).signatures["serving_default"]
        self.input, self.output = input, output

    def __call__(self, value: Any) -> np.ndarray:
        result = self.function(**{self.input.name: tf.constant(value)})
        return result[self.output.name].numpy()


class _AcceleratorRunner:
    def __init__(self, folder: Path, device: Device) -> None:
        self.program = load_program(folder / AcceleratorStage.PROGRAM_FILE)
        self.device = device
        self.handle = device.load(self.program)
        (self.input_name,) = self.program.inputs
        (self.output_name,) = self.program.outputs

    def __call__(self, value: np.ndarray) -> np.ndarray:
        outputs = self.device.run(self.handle, {self.input_name: np.asarray(value, np.float32)})
        return outputs[self.output_name]


class Pipeline:
    """The stages of an archive, ready to run on a device. Close it (or use ``with``)."""

    def __init__(self, manifest: dict[str, Any], folder: tempfile.TemporaryDirectory,
                 device: Device, owns_device: bool) -> None:  # fmt: skip
        self.manifest, self._folder, self.device = manifest, folder, device
        self._owns_device = owns_device
        root = Path(folder.name)
        self.stages = manifest["stages"]
        # One callable per stage (a batch in, a batch out): the server schedules them itself.
        self.runners = [
            _AcceleratorRunner(root / s["path"], device)
            if s["kind"] == "accelerator"
            else _TensorflowRunner(root / s["path"], s["input"], s["output"])
            for s in self.stages
        ]
        labels = root / LABELS
        self.labels: list[str] | None = json.loads(labels.read_text()) if labels.exists() else None

    @classmethod
    def load(cls, path: str | Path, device: str | Device = "emulator",
             limits: Limits = DEFAULT_LIMITS) -> Pipeline:  # fmt: skip
        folder = tempfile.TemporaryDirectory(prefix="fpgaserve-")
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

    def close(self) -> None:
        for runner in self.runners:
            if isinstance(runner, _AcceleratorRunner):
                runner.device.unload(runner.handle)
        if self._owns_device:
            self.device.close()
        self._folder.cleanup()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
