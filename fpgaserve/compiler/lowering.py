"""Keras layers -> accelerator ops (docs/datapath.md section 7), then fusion.

Each supported layer becomes one or more float ops; unsupported layers or configurations raise
``UnsupportedModelError`` naming the layer. Fusion then folds batch norm into the preceding
convolution's weights and bias, and activations into the op before them, where that op's
output has no other reader.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from fpgaserve.hal import Op

from .graph import Node, UnsupportedModelError

Shape = tuple[int, ...]
CONV_DEFAULTS = {"strides": [1, 1], "dilation": [1, 1], "padding": [0, 0, 0, 0]}


def _f32(value) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(value, dtype=np.float32))


def _same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's SAME: the odd pixel goes after (bottom/right)."""
    effective = dilation * (kernel - 1) + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _padding(layer, shape: Shape, kernel, strides, dilation=(1, 1)) -> list[int]:
    if layer.padding == "valid":
        return [0, 0, 0, 0]
    if layer.padding != "same":
        raise UnsupportedModelError(f"layer {layer.name!r}: padding {layer.padding!r}")
    top, bottom = _same_padding(shape[0], kernel[0], strides[0], dilation[0])
    left, right = _same_padding(shape[1], kernel[1], strides[1], dilation[1])
    return [top, bottom, left, right]


def _activation_ops(layer, name: str, output: str) -> list[Op]:
    activation = getattr(layer.activation, "__name__", str(layer.activation))
    if activation == "linear":
        return []
    if activation in ("relu", "relu6"):
        return [Op(activation, f"{layer.name}/{activation}", (name,), output)]
    raise UnsupportedModelError(
        f"layer {layer.name!r}: activation {activation!r} does not run on the accelerator "
        "(supported: linear, relu, relu6); cut the model before it"
    )


def _with_activation(layer, op: Op) -> list[Op]:
    """``op`` writes the layer's output, unless an activation op follows and writes it."""
    follow = _activation_ops(layer, f"{layer.name}/pre", layer.name)
    if follow:
        op.output = f"{layer.name}/pre"
    return [op, *follow]


def _conv_op(node: Node, shapes: dict[str, Shape], weight: np.ndarray, groups: int) -> list[Op]:
    """A conv2d op for a Keras convolution whose weight is already (filters, kh * kw * cg)."""
    layer, shape = node.layer, shapes[node.inputs[0]]
    if len(shape) != 3:
        raise UnsupportedModelError(f"layer {layer.name!r}: conv needs an HxWxC input")
    kh, kw = layer.kernel_size
    attrs = {
        "kernel": [kh, kw],
        "strides": list(layer.strides),
        "dilation": list(layer.dilation_rate),
        "padding": _padding(layer, shape, (kh, kw), layer.strides, layer.dilation_rate),
        "groups": groups,
        "filters": weight.shape[0],
        "activation": "linear",
    }
    params = {"weight": _f32(weight)}
    if layer.use_bias:
        params["bias"] = _f32(layer.bias.numpy())
    return _with_activation(layer, Op("conv2d", layer.name, node.inputs, layer.name, attrs, params))


def _conv2d(node: Node, shapes: dict[str, Shape]) -> list[Op]:
    kernel = node.layer.kernel.numpy()  # (kh, kw, cin / groups, filters)
    weight = kernel.transpose(3, 0, 1, 2).reshape(kernel.shape[3], -1)
    return _conv_op(node, shapes, weight, int(getattr(node.layer, "groups", 1)))


def _depthwise(node: Node, shapes: dict[str, Shape]) -> list[Op]:
    kernel = node.layer.kernel.numpy()  # (kh, kw, channels, multiplier)
    channels, multiplier = kernel.shape[2:]
    weight = kernel.transpose(2, 3, 0, 1).reshape(channels * multiplier, -1)
    return _conv_op(node, shapes, weight, channels)


def _dense(node: Node, shapes: dict[str, Shape]) -> list[Op]:
    layer, shape = node.layer, shapes[node.inputs[0]]
    kernel = layer.kernel.numpy()  # (K, units)
    params = {"weight": _f32(kernel.T)}
    if layer.use_bias:
        params["bias"] = _f32(layer.bias.numpy())
    if len(shape) == 1:
        attrs = {"units": kernel.shape[1], "activation": "linear"}
        op = Op("dense", layer.name, node.inputs, layer.name, attrs, params)
    elif len(shape) == 3:  # Dense on the channel axis of a map is a 1x1 convolution
        attrs = {"kernel": [1, 1], **CONV_DEFAULTS, "groups": 1, "filters": kernel.shape[1]}
        op = Op("conv2d", layer.name, node.inputs, layer.name, {**attrs, "activation": "linear"},
                params)  # fmt: skip
    else:
        raise UnsupportedModelError(f"layer {layer.name!r}: Dense on a rank-{len(shape)} input")
    return _with_activation(layer, op)


def _batch_norm(node: Node, shapes: dict[str, Shape]) -> list[Op]:
    layer = node.layer
    if layer.axis not in (-1, len(shapes[node.inputs[0]])):
        raise UnsupportedModelError(f"layer {layer.name!r}: batch norm must be on channels")
    mean = layer.moving_mean.numpy().astype(np.float64)
    variance = layer.moving_variance.numpy().astype(np.float64)
    gamma = layer.gamma.numpy().astype(np.float64) if layer.scale else 1.0
    beta = layer.beta.numpy().astype(np.float64) if layer.center else 0.0
    scale = gamma / np.sqrt(variance + layer.epsilon)
    params = {"scale": _f32(scale), "shift": _f32(beta - mean * scale)}
    return [Op("scale_shift", layer.name, node.inputs, layer.name, {}, params)]


def _relu(node: Node, shapes: dict[str, Shape]) -> list[Op]:
    layer = node.layer
    if layer.negative_slope or layer.threshold:
        raise UnsupportedModelError(
            f"layer {layer.name!r}: leaky or thresholded ReLU is not supported"
        )
    if layer.max_value is None:
        return [Op("relu", layer.name, node.inputs, layer.name)]
    if float(layer.max_value) == 6.0:
        return [Op("relu6", layer.name, node.inputs, layer.name)]
    raise UnsupportedModelError(f"layer {layer.name!r}: ReLU max_value {layer.max_value}")


def _activation(node: Node, shapes: dict[str, Shape]) -> list[Op]:
    ops = _activation_ops(node.layer, node.inputs[0], node.name)
    return ops or [_alias(node)]


def _add(node: Node, shapes: dict[str, Shape]) -> list[Op]:
    inputs, ops = list(node.inputs), []
    while len(inputs) > 2:  # a + b + c as (a + b) + c
        partial = f"{node.name}/sum{len(ops)}"
        ops.append(Op("add", partial, tuple(inputs[:2]), partial, {"activation": "linear"}))
        inputs[:2] = [partial]
    ops.append(Op("add", node.name, tuple(inputs), node.name, {"activation": "linear"}))
    return ops


def _pool(kind: str) -> Callable[[Node, dict[str, Shape]], list[Op]]:
    def lower(node: Node, shapes: dict[str, Shape]) -> list[Op]:
        layer, shape = node.layer, shapes[node.inputs[0]]
        pool, strides = tuple(layer.pool_size), tuple(layer.strides)
        attrs = {"pool": list(pool), "strides": list(strides),
                 "padding": _padding(layer, shape, pool, strides)}  # fmt: skip
        return [Op(kind, node.name, node.inputs, node.name, attrs)]

    return lower


def _global_pool(kind: str) -> Callable[[Node, dict[str, Shape]], list[Op]]:
    def lower(node: Node, shapes: dict[str, Shape]) -> list[Op]:
        attrs = {"keepdims": bool(node.layer.keepdims)}
        return [Op(kind, node.name, node.inputs, node.name, attrs)]

    return lower


def _zero_pad(node: Node, shapes: dict[str, Shape]) -> list[Op]:
    (top, bottom), (left, right) = node.layer.padding
    attrs = {"padding": [int(top), int(bottom), int(left), int(right)]}
    return [Op("zero_pad", node.name, node.inputs, node.name, attrs)]


def _concat(node: Node, shapes: dict[str, Shape]) -> list[Op]:
    rank = len(shapes[node.inputs[0]])
    if node.layer.axis not in (-1, rank):
        raise UnsupportedModelError(f"layer {node.name!r}: concatenation must be on channels")
    return [Op("concat", node.name, node.inputs, node.name)]


def _flatten(node: Node, shapes: dict[str, Shape]) -> list[Op]:
    return [Op("flatten", node.name, node.inputs, node.name)]


def _reshape(node: Node, shapes: dict[str, Shape]) -> list[Op]:
    if len(node.layer.target_shape) != 1:
        raise UnsupportedModelError(f"layer {node.name!r}: only reshapes to a vector are supported")
    return _flatten(node, shapes)


def _alias(node: Node) -> Op:
    """Layers that compute nothing at inference (Dropout, linear Activation)."""
    return Op("alias", node.name, node.inputs, node.name)


RULES: list[tuple[type, Callable[[Node, dict[str, Shape]], list[Op]]]] = [
    (keras.layers.DepthwiseConv2D, _depthwise),
    (keras.layers.Conv2D, _conv2d),
    (keras.layers.Dense, _dense),
    (keras.layers.BatchNormalization, _batch_norm),
    (keras.layers.ReLU, _relu),
    (keras.layers.Activation, _activation),
    (keras.layers.Add, _add),
    (keras.layers.MaxPooling2D, _pool("max_pool")),
    (keras.layers.AveragePooling2D, _pool("avg_pool")),
    (keras.layers.GlobalAveragePooling2D, _global_pool("global_avg_pool")),
    (keras.layers.GlobalMaxPooling2D, _global_pool("global_max_pool")),
    (keras.layers.ZeroPadding2D, _zero_pad),
    (keras.layers.Concatenate, _concat),
    (keras.layers.Flatten, _flatten),
    (keras.layers.Reshape, _reshape),
    (keras.layers.Dropout, lambda node, shapes: [_alias(node)]),
]


def lower_node(node: Node, shapes: dict[str, Shape]) -> list[Op]:
    layer = node.layer
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise UnsupportedModelError(f"layer {layer.name!r}: only channels_last is supported")
    for kind, rule in RULES:
        if isinstance(layer, kind):
            return rule(node, shapes)
    raise UnsupportedModelError(
        f"layer {layer.name!r} ({type(layer).__name__}) has no accelerator equivalent; "
        "supported: "
        + ", ".join(sorted({k.__name__ for k, _ in RULES}))
        + ". Cut the model before it (cut=...)"
    )


def _rename(ops: list[Op], old: str, new: str) -> None:
    for op in ops:
        op.inputs = tuple(new if name == old else name for name in op.inputs)


def resolve_aliases(ops: list[Op], outputs: list[str]) -> list[Op]:
    """Drop alias ops, pointing readers at their source."""
    kept = []
    for op in ops:
        if op.kind == "alias":
            _rename(ops, op.output, op.inputs[0])
            outputs[:] = [op.inputs[0] if name == op.output else name for name in outputs]
        else:
            kept.append(op)
    return kept


def fuse(ops: list[Op], outputs: tuple[str, ...]) -> list[Op]:
    """Fold scale_shift into a preceding conv/dense, and activations into conv/dense/add."""

    def readers(name: str) -> int:
        return sum(op.inputs.count(name) for op in ops) + outputs.count(name)

    producers = {op.output: op for op in ops}
    fused = []
    for op in ops:
        source = producers.get(op.inputs[0]) if op.inputs else None
        single = source is not None and readers(source.output) == 1
        if (
            op.kind == "scale_shift"
            and single
            and source.kind in ("conv2d", "dense")
            and source.attrs["activation"] == "linear"
            and "scale" not in source.params
        ):
            scale, shift = op.params["scale"].astype(np.float64), op.params["shift"]
            weight = source.params["weight"].astype(np.float64) * scale[:, None]
            bias = source.params.get("bias", np.zeros_like(shift)).astype(np.float64)
            source.params["weight"] = _f32(weight)
            source.params["bias"] = _f32(bias * scale + shift)
        elif (
            op.kind in ("relu", "relu6")
            and single
            and source.kind in ("conv2d", "dense", "add")
            and source.attrs.get("activation") == "linear"
        ):
            source.attrs["activation"] = op.kind
        else:
            fused.append(op)
            continue
        producers[op.output] = source  # the fused op now writes this op's output
        del producers[source.output]
        source.output = op.output
    return fused
