"""Empirical bias correction (Nagel et al., "Data-Free Quantization", ICCV 2019, section 4.2).

Round-to-nearest is unbiased per value, but a layer's weights are rounded once and for all, and
post-ReLU activations pile up below half a grid step: both shift each output channel's mean by a
fixed amount that the next layers amplify. On a few calibration inputs, each matrix op is run in
float (fp32 program, float inputs) and quantized (quantized program, the quantized path's inputs,
so drift from earlier layers is corrected too); the mean difference of the pre-activation output
per channel is subtracted from that op's bias. Only float biases change: the datapath and the
quantized weights stay as they are.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from fpgaserve.hal import MATRIX_OPS, Device, Op, Program, open_device


def _linear(op: Op) -> Op:
    """The op without its activation: the pre-activation output is what the bias shifts."""
    return Op(op.kind, op.name, op.inputs, op.output, {**op.attrs, "activation": "linear"},
              op.params)  # fmt: skip


def _run_op(device: Device, fmt: str, op: Op, args: list[np.ndarray]) -> np.ndarray:
    feeds = {f"in{i}": arg for i, arg in enumerate(args)}
    single = Op(op.kind, op.name, tuple(feeds), "out", op.attrs, op.params)
    program = Program(fmt, {n: a.shape[1:] for n, a in feeds.items()}, ("out",), [single])
    handle = device.load(program)
    try:
        return device.run(handle, feeds)["out"]
    finally:
        device.unload(handle)


def correct_biases(
    float_program: Program, quantized: Program, inputs: dict[str, np.ndarray], progress: bool
) -> None:
    """Adjust ``quantized``'s matrix-op biases in place; both programs have the same op list."""
    readers: dict[str, int] = {name: 0 for name in quantized.outputs}
    for op in quantized.ops:
        for name in op.inputs:
            readers[name] = readers.get(name, 0) + 1
    float_tensors, quant_tensors = dict(inputs), dict(inputs)
    pairs = list(zip(float_program.ops, quantized.ops, strict=True))
    with open_device("emulator") as device:
        for float_op, quant_op in tqdm(pairs, desc="bias correction", unit="op",
                                       disable=not progress):  # fmt: skip
            float_args = [float_tensors[n] for n in float_op.inputs]
            quant_args = [quant_tensors[n] for n in quant_op.inputs]
            if quant_op.kind in MATRIX_OPS:
                reference = _run_op(device, float_program.format, _linear(float_op), float_args)
                measured = _run_op(device, quantized.format, _linear(quant_op), quant_args)
                channels = measured.shape[-1]
                drift = (measured - reference).reshape(-1, channels).astype(np.float64).mean(0)
                if "scale" in quant_op.params:  # the bias sits before a fused scale_shift
                    scale = quant_op.params["scale"].astype(np.float64)
                    drift = np.divide(drift, scale, out=np.zeros_like(drift), where=scale != 0)
                bias = quant_op.params.get("bias", np.zeros(channels, np.float32))
                quant_op.params["bias"] = (bias - drift).astype(np.float32)
            float_tensors[float_op.output] = _run_op(
                device, float_program.format, float_op, float_args
            )
            quant_tensors[quant_op.output] = _run_op(device, quantized.format, quant_op, quant_args)
            for name in quant_op.inputs:
                readers[name] -= 1
                if readers[name] == 0:
                    float_tensors.pop(name, None)
                    quant_tensors.pop(name, None)
