"""TensorFlow Serving's ``PredictionService`` and ``ModelService``, on the official wire types of
the ``tensorflow-serving-api`` package, so existing TF Serving and Azure/Brainwave clients work
unchanged.

Predict without an ``output_filter`` returns exactly one output, the class probabilities, as
Brainwave's service did; the features (and any other output) come when named in the filter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
from tensorflow.core.framework import tensor_shape_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    status_pb2,
)

from fpgaserve.wire import from_tensor_proto, tf_dtype, to_tensor_proto

from .core import ServingCore
from .errors import FailedPrecondition, InvalidArgument, ServingError, Unimplemented
from .model import END, ServedModel

DEFAULT_SIGNATURE = "serving_default"
# Brainwave's service answered Predict with one output under this alias, and its clients (Python,
# C#, C++) read ``outputs["output_alias"]``; it names the model's default output.
DEFAULT_OUTPUT_ALIAS = "output_alias"
PREDICT_METHOD = "tensorflow/serving/predict"
_STATE = get_model_status_pb2.ModelVersionStatus.State
_UNKNOWN_ERROR = 2  # tensorflow.error.Code UNKNOWN: a version that failed to load


def _model(core: ServingCore, spec: model_pb2.ModelSpec) -> ServedModel:
    # Azure's Brainwave PredictionClient sends no model name: a server of one model answers it.
    name = spec.name or core.repository.only_model()
    version = spec.version.value if spec.HasField("version") else None
    return core.repository.get(name, version, spec.version_label or None)


def _signature_taking(model: ServedModel, input_name: str) -> str:
    """One signature per accepted input: ``serving_default`` takes the service input (images);
    the others are named after their input (e.g. ``preprocessed``, the featurizer input)."""
    assert model.signature is not None
    return DEFAULT_SIGNATURE if input_name == model.signature.inputs[0].name else input_name


def _signatures(model: ServedModel) -> dict[str, Any]:
    return {_signature_taking(model, spec.name): spec for spec in model.signature.inputs}


def _signature(model: ServedModel, name: str, inputs: dict[str, Any]) -> str:
    """The signature a request runs: the one it names, checked against its input, or without a
    name the one that takes its input (so the reply names what ran)."""
    if not name:
        return _signature_taking(model, next(iter(inputs), model.signature.inputs[0].name))
    signatures = _signatures(model)
    if name not in signatures:
        raise FailedPrecondition(
            f"serving signature {name!r} not found; model {model.name!r} has {sorted(signatures)}"
        )
    expected = signatures[name].name
    if set(inputs) != {expected}:
        raise InvalidArgument(f"signature {name!r} takes input {expected!r}, got {sorted(inputs)}")
    return name


def _aliases(model: ServedModel, output_filter: Sequence[str]) -> dict[str, str]:
    """{response key: model output} for Predict: the filter's names, ``output_alias`` standing
    for the default output; without a filter, only the default output, as ``output_alias``."""
    default = model.signature.default_output
    if not output_filter:
        return {DEFAULT_OUTPUT_ALIAS: default}
    aliases: dict[str, str] = {}
    for alias in output_filter:
        if alias in aliases:
            raise InvalidArgument(f"output_filter names {alias!r} twice; name each output once")
        aliases[alias] = default if alias == DEFAULT_OUTPUT_ALIAS else alias
    return aliases


def _tensor_info(spec) -> meta_graph_pb2.TensorInfo:
    return meta_graph_pb2.TensorInfo(
        name=f"{spec.name}:0",
        dtype=tf_dtype(spec.dtype),
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[
                tensor_shape_pb2.TensorShapeProto.Dim(size=-1 if size is None else size)
                for size in spec.shape
            ]
        ),
    )


def _reply_spec(
    model: ServedModel, signature: str, into: model_pb2.ModelSpec | None = None
) -> model_pb2.ModelSpec:
    """The version that answered; written into ``into`` (a response's field) when given."""
    spec = model_pb2.ModelSpec() if into is None else into
    spec.name, spec.signature_name = model.name, signature
    spec.version.value = model.version
    return spec


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, core: ServingCore) -> None:
        self.core = core

    def Predict(self, request: predict_pb2.PredictRequest, context) -> predict_pb2.PredictResponse:
        def handle(record: dict[str, Any]) -> predict_pb2.PredictResponse:
            model = _model(self.core, request.model_spec)
            inputs = {
                name: from_tensor_proto(name, tensor, model.max_elements(name))
                for name, tensor in request.inputs.items()
            }
            signature = _signature(model, request.model_spec.signature_name, inputs)
            aliases = _aliases(model, request.output_filter)
            wanted = list(dict.fromkeys(aliases.values()))
            outputs = self.core.infer(context, record, model, inputs, wanted)
            response = predict_pb2.PredictResponse()
            _reply_spec(model, signature, response.model_spec)
            for alias, name in aliases.items():
                to_tensor_proto(outputs[name], response.outputs[alias], typed=True)
            return response

        return self.core.call(context, "Predict", request.model_spec.name, handle)

    def Classify(
        self, request: classification_pb2.ClassificationRequest, context
    ) -> classification_pb2.ClassificationResponse:
        """Each tf.Example carries one image as a bytes feature named like the service input
        (``images``), or takes it from the list's context as TensorFlow Serving merges them; the
        answer lists every class, most likely first, with its label."""

        def handle(record: dict[str, Any]) -> classification_pb2.ClassificationResponse:
            model = _model(self.core, request.model_spec)
            key = model.signature.inputs[0].name
            named, images = request.model_spec.signature_name, _signature_taking(model, key)
            if named in _signatures(model) and named != images:
                raise InvalidArgument(
                    f"Classify runs signature {images!r} (images in tf.Examples); signature "
                    f"{named!r} takes a tensor: call Predict for it"
                )
            signature = _signature(model, named, {key: None})
            if request.input.WhichOneof("kind") == "example_list_with_context":
                listed = request.input.example_list_with_context
                examples, common = listed.examples, listed.context.features.feature
            else:
                examples, common = request.input.example_list.examples, {}
            if not examples:
                raise InvalidArgument("the request carries no examples; send one per image")
            model.check_items(len(examples))
            images = []
            for index, example in enumerate(examples):
                own = example.features.feature  # an example's own feature wins over the context's
                feature = own[key] if key in own else common.get(key)
                values = feature.bytes_list.value if feature is not None else ()
                if len(values) != 1:
                    raise InvalidArgument(
                        f"example {index} needs exactly one image in bytes feature {key!r}"
                    )
                images.append(values[0])
            images_array = np.empty(len(images), dtype=object)
            images_array[:] = images
            (scores,) = self.core.infer(context, record, model, {key: images_array}, None).values()
            labels = model.labels or [str(i) for i in range(scores.shape[1])]
            result = classification_pb2.ClassificationResult()
            for row in scores:
                classes = result.classifications.add().classes
                for index in np.argsort(-row, kind="stable"):
                    classes.add(label=labels[index], score=float(row[index]))
            return classification_pb2.ClassificationResponse(
                model_spec=_reply_spec(model, signature), result=result
            )

        return self.core.call(context, "Classify", request.model_spec.name, handle)

    def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        def handle(record: dict[str, Any]) -> get_model_metadata_pb2.GetModelMetadataResponse:
            if set(request.metadata_field) != {"signature_def"}:
                raise InvalidArgument(
                    "metadata_field must be ['signature_def'], the only metadata served"
                )
            model = _model(self.core, request.model_spec)
            outputs = {spec.name: _tensor_info(spec) for spec in model.signature.outputs}
            outputs[DEFAULT_OUTPUT_ALIAS] = outputs[model.signature.default_output]
            signatures = get_model_metadata_pb2.SignatureDefMap()
            for name, spec in _signatures(model).items():
                signatures.signature_def[name].CopyFrom(
                    meta_graph_pb2.SignatureDef(
                        inputs={spec.name: _tensor_info(spec)},
                        outputs=outputs,
                        method_name=PREDICT_METHOD,
                    )
                )
            response = get_model_metadata_pb2.GetModelMetadataResponse(
                model_spec=_reply_spec(model, DEFAULT_SIGNATURE)
            )
            response.metadata["signature_def"].Pack(signatures)
            return response

        return self.core.call(
            context, "GetModelMetadata", request.model_spec.name, handle, inference=False
        )

    def Regress(self, request, context):
        self.core.refuse(
            context,
            "Regress",
            Unimplemented(
                "Regress is not served: fpgaserve models classify; use Predict or Classify"
            ),
            request.model_spec.name,
        )

    def MultiInference(self, request, context):
        self.core.refuse(
            context,
            "MultiInference",
            Unimplemented("MultiInference is not served; send one Predict or Classify per task"),
        )


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, core: ServingCore) -> None:
        self.core = core

    def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context
    ) -> get_model_status_pb2.GetModelStatusResponse:
        def handle(record: dict[str, Any]) -> get_model_status_pb2.GetModelStatusResponse:
            spec = request.model_spec
            if not spec.name:
                raise InvalidArgument("model_spec.name is required: name the model to ask about")
            rows = self.core.repository.versions(spec.name)
            if spec.HasField("version"):
                rows = [row for row in rows if row[0] == spec.version.value]
                if not rows:
                    raise ServingError(
                        f"model {spec.name!r} has no version {spec.version.value}",
                        grpc.StatusCode.NOT_FOUND,
                    )
            response = get_model_status_pb2.GetModelStatusResponse()
            for version, state, error in rows:
                # An AVAILABLE version with an error is fine: its replacement failed.
                failed = error and state == END
                status = status_pb2.StatusProto(
                    error_code=_UNKNOWN_ERROR if failed else 0, error_message=error
                )
                response.model_version_status.add(
                    version=version, state=_STATE.Value(state), status=status
                )
            return response

        return self.core.call(
            context, "GetModelStatus", request.model_spec.name, handle, inference=False
        )

    def HandleReloadConfigRequest(self, request, context):
        self.core.refuse(
            context,
            "HandleReloadConfigRequest",
            Unimplemented("reload by changing the model repository directory; it is watched"),
        )
