"""A Keras 3 model as a plain graph of layers, and where it splits into featurizer and head."""

from __future__ import annotations

from dataclasses import dataclass

import keras


class UnsupportedModelError(ValueError):
    """The model (or one layer of it) cannot become an accelerator program; says which and why."""


@dataclass(frozen=True)
class Node:
    """One layer call: its output tensor is named after the layer."""

    layer: keras.layers.Layer
    inputs: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.layer.name


@dataclass(frozen=True)
class Graph:
    nodes: dict[str, Node]  # topological order
    inputs: tuple[str, ...]
    output: str

    def ancestors(self, name: str) -> set[str]:
        seen, stack = set(), [name]
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(self.nodes[current].inputs)
        return seen

    def consumers(self, name: str) -> list[str]:
        return [n.name for n in self.nodes.values() if name in n.inputs]


def model_graph(model: keras.Model) -> Graph:
    """Walk a functional (or built Sequential) model; shared layers and multi-output layers are
    refused because the accelerator program names each tensor after one layer call."""
    functional = (
        getattr(model, "_functional", None) if isinstance(model, keras.Sequential) else model
    )
    if functional is None or not hasattr(functional, "outputs"):
        raise UnsupportedModelError(
            "the model has no graph yet: build a Sequential model with keras.Input first"
        )
    if len(functional.outputs) != 1:
        raise UnsupportedModelError(f"the model has {len(functional.outputs)} outputs; need one")
    # Keys of the layer calls that belong to this model's graph (Keras's own node naming).
    own_calls = functional._nodes
    nodes: dict[str, Node] = {}
    for layer in functional.layers:
        if isinstance(layer, keras.layers.InputLayer):
            nodes[layer.name] = Node(layer, ())
            continue
        calls = [
            call
            for index, call in enumerate(layer._inbound_nodes)
            if f"{id(layer)}_ib-{index}" in own_calls
        ]
        if len(calls) != 1:
            raise UnsupportedModelError(
                f"layer {layer.name!r} is called {len(calls)} times in the model; "
                "shared layers are not supported"
            )
        call = calls[0]
        if len(call.output_tensors) != 1:
            raise UnsupportedModelError(f"layer {layer.name!r} has several outputs")
        inputs = tuple(t._keras_history.operation.name for t in call.input_tensors)
        nodes[layer.name] = Node(layer, inputs)
    model_inputs = tuple(t._keras_history.operation.name for t in functional.inputs)
    output = functional.outputs[0]._keras_history.operation.name
    return Graph(nodes, model_inputs, output)


def _activation_name(layer: keras.layers.Layer) -> str | None:
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", None)


def _is_classifier(layer: keras.layers.Layer) -> bool:
    if isinstance(layer, keras.layers.Dense):
        return True
    return isinstance(layer, keras.layers.Conv2D) and tuple(layer.input.shape[1:3]) == (1, 1)


def _is_passthrough(layer: keras.layers.Layer) -> bool:
    if isinstance(layer, keras.layers.Activation):
        return _activation_name(layer) in ("softmax", "linear")
    return isinstance(layer, keras.layers.Dropout | keras.layers.Reshape | keras.layers.Softmax)


def find_cut(graph: Graph) -> str:
    """Brainwave's split: the head is the final classifier layer (one Dense, or a 1x1 conv on a
    1x1 map) with the softmax, reshape and dropout around it; the featurizer is everything
    before. A model without such a classifier is all featurizer."""
    current, classifier_seen = graph.output, False
    while True:
        node = graph.nodes[current]
        if len(node.inputs) != 1:
            break
        if _is_passthrough(node.layer):
            pass
        elif _is_classifier(node.layer) and not classifier_seen:
            classifier_seen = True
        else:
            break
        current = node.inputs[0]
    return current if classifier_seen else graph.output


def _copy_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
    """A fresh layer with the same config and weights, so building the head leaves the user's
    model untouched (calling the original would add a second call to its graph)."""
    copy = type(layer).from_config(layer.get_config())
    copy.build(layer.input.shape)
    copy.set_weights(layer.get_weights())
    return copy


def build_head(model: keras.Model, graph: Graph, cut: str) -> keras.Model | None:
    """The layers after ``cut`` as a Keras model of their own (run on the CPU), or None."""
    if cut == graph.output:
        return None
    wanted = graph.ancestors(graph.output) - graph.ancestors(cut)
    cut_layer = graph.nodes[cut].layer
    start = keras.Input(shape=tuple(cut_layer.output.shape[1:]), name=f"{cut}_features")
    tensors = {cut: start}
    for name, node in graph.nodes.items():
        if name not in wanted:
            continue
        missing = [i for i in node.inputs if i not in tensors]
        if missing:
            raise UnsupportedModelError(
                f"layer {name!r} after the cut also reads {missing[0]!r} from the featurizer; "
                "choose a cut that separates the head"
            )
        args = [tensors[i] for i in node.inputs]
        tensors[name] = _copy_layer(node.layer)(args[0] if len(args) == 1 else args)
    return keras.Model(start, tensors[graph.output], name=f"{model.name}_head")
