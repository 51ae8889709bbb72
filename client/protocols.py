"""The two wire protocols a client can speak, as request builders and response readers.

``TfServingProtocol`` is TensorFlow Serving's Predict (the protocol Azure's client spoke); it
needs the ``tensorflow-serving-api`` package. ``V2Protocol`` is KServe v2 ModelInfer and needs
only grpcio, protobuf and NumPy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fpgaserve.wire import from_tensor_proto, from_v2, to_tensor_proto, to_v2


class TfServingProtocol:
    method = "/tensorflow.serving.PredictionService/Predict"

    def __init__(self) -> None:
        from tensorflow_serving.apis import predict_pb2

        self._messages = predict_pb2
        self.serialize = predict_pb2.PredictRequest.SerializeToString
        self.deserialize = predict_pb2.PredictResponse.FromString

    def build(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None
    ) -> Any:
        request = self._messages.PredictRequest()
        if model:  # Azure's client names no model; a server of one model answers anyway
            request.model_spec.name = model
        for name, value in inputs.items():
            to_tensor_proto(value, request.inputs[name])
        request.output_filter.extend(outputs or ())
        return request

    def read(self, response: Any) -> dict[str, np.ndarray]:
        return {name: from_tensor_proto(name, t) for name, t in response.outputs.items()}


class V2Protocol:
    method = "/inference.GRPCInferenceService/ModelInfer"

    def __init__(self) -> None:
        from fpgaserve.protos import grpc_predict_v2_pb2

        self._messages = grpc_predict_v2_pb2
        self.serialize = grpc_predict_v2_pb2.ModelInferRequest.SerializeToString
        self.deserialize = grpc_predict_v2_pb2.ModelInferResponse.FromString

    def build(
        self, model: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None
    ) -> Any:
        request = self._messages.ModelInferRequest(model_name=model)
        for name, value in inputs.items():
            datatype, shape, raw = to_v2(value)
            request.inputs.add(name=name, datatype=datatype, shape=shape)
            request.raw_input_contents.append(raw)
        for name in outputs or ():
            request.outputs.add(name=name)
        return request

    def read(self, response: Any) -> dict[str, np.ndarray]:
        raw = list(response.raw_output_contents)
        return {
            tensor.name: from_v2(tensor, raw[index] if raw else None)
            for index, tensor in enumerate(response.outputs)
        }
