"""Compile a Keras CNN into an accelerator program plus the Keras head that runs after it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import keras
import numpy as np
from tqdm import tqdm

from fpgaserve import __version__
from fpgaserve.hal import MATRIX_OPS, Program, get_format, quantize

from .calibrate import correct_biases
from .graph import UnsupportedModelError, build_head, find_cut, model_graph
from .lowering import fuse, lower_node, resolve_aliases


@dataclass
class CompiledModel:
    """The accelerated part (``program``) and the CPU part (``head``, None if there is none)."""

    program: Program
    head: keras.Model | None
    cut: str


def load_keras_model(source: keras.Model | str | Path) -> keras.Model:
    """A model object as is, or a ``.keras`` file loaded in Keras's safe mode (no code)."""
    if isinstance(source, keras.Model):
        return source
    path = Path(source)
    if path.suffix != ".keras" or not path.is_file():
        raise UnsupportedModelError(f"{path}: expected an existing .keras model file")
    return keras.models.load_model(path, compile=False, safe_mode=True)


def compile_model(
    source: keras.Model | str | Path,
    format: str = "msfp16",
    cut: str | None = None,
    progress: bool = True,
    metadata: dict[str, str] | None = None,
    calibration: np.ndarray | None = None,
) -> CompiledModel:
    """Lower, fuse and quantize; ``cut`` names the last layer of the featurizer.

    ``calibration`` (a batch of preprocessed inputs) enables bias correction of quantized
    formats (compiler/calibrate.py); it only changes float biases.
    """
    fmt = get_format(format)
    model = load_keras_model(source)
    graph = model_graph(model)
    if cut is None:
        cut = find_cut(graph)
    elif cut not in graph.nodes:
        raise UnsupportedModelError(f"cut layer {cut!r} is not in model {model.name!r}")
    keep = graph.ancestors(cut)
    inputs = {}
    for name in graph.inputs:
        if name in keep:
            shape = tuple(graph.nodes[name].layer.output.shape[1:])
            if any(d is None for d in shape):
                raise UnsupportedModelError(
                    f"input {name!r} has shape {shape}: give the model a fixed input size"
                )
            inputs[name] = shape
    shapes = {name: tuple(node.layer.output.shape[1:]) for name, node in graph.nodes.items()}
    ops = []
    for name, node in graph.nodes.items():
        if name in keep and name not in inputs:
            ops.extend(lower_node(node, shapes))
    outputs = [cut]
    ops = fuse(resolve_aliases(ops, outputs), tuple(outputs))
    info: dict[str, str] = {}
    calibrate = calibration is not None and fmt.quantized
    # Bias correction compares against the float program, so keep a copy before quantizing.
    float_ops = [replace(op, params=dict(op.params)) for op in ops] if calibrate else []
    if fmt.quantized:
        matrix_ops = [op for op in ops if op.kind in MATRIX_OPS]
        for op in tqdm(matrix_ops, desc=f"quantizing to {fmt.name}", unit="layer",
                       disable=not progress):  # fmt: skip
            op.params["weight"] = quantize(op.params["weight"], fmt)
    if calibrate:
        (input_name,) = inputs
        float_program = Program("fp32", inputs, tuple(outputs), float_ops)
        quantized = Program(fmt.name, inputs, tuple(outputs), ops)
        correct_biases(float_program, quantized, {input_name: calibration}, progress)
        info["bias_correction"] = f"{len(calibration)} calibration inputs"
    info = {
        "model": model.name,
        "cut": cut,
        "fpgaserve_version": __version__,
        "keras_version": keras.__version__,
        **info,
        **(metadata or {}),
    }
    program = Program(fmt.name, inputs, tuple(outputs), ops, metadata=info)
    produced = program.shapes()[outputs[0]]
    if produced != shapes[cut]:
        raise UnsupportedModelError(
            f"internal shape mismatch at {cut!r}: program {produced}, Keras {shapes[cut]}"
        )
    return CompiledModel(program, build_head(model, graph, cut), cut)
