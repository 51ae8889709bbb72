"""KServe v2 / Open Inference Protocol ``inference.GRPCInferenceService`` (what KServe, Triton and
their clients speak). Outputs are returned as ``raw_output_contents``, as Triton does; without
requested outputs every model output is returned, as the protocol says. Triton's classification
extension (an output's ``classification`` parameter) answers the top classes with their labels;
its streaming, model configuration, statistics and repository index extensions are served too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import numpy as np

from fpgaserve import __version__
from fpgaserve.protos import grpc_predict_v2_pb2 as v2
from fpgaserve.protos import grpc_predict_v2_pb2_grpc as v2_grpc
from fpgaserve.wire import V2_DATATYPES, from_v2, to_v2, v2_shape

from .core import MAX_LOGGED_NAME, ServingCore, parse
from .errors import FailedPrecondition, InvalidArgument, NotFound, ServingError, Unimplemented
from .model import AVAILABLE, ServedModel
from .triton import PLATFORM, model_config, model_statistics, repository_index

# ServerMetadata's extensions: Triton's names for what this adapter serves beyond the protocol.
EXTENSIONS = ["classification", "model_configuration", "statistics", "model_repository"]


def _version(text: str) -> int | None:
    if not text:
        return None
    if not (text.isascii() and text.isdigit()):
        raise InvalidArgument(f"model version {text!r} must be a positive integer, or empty")
    digits = text.lstrip("0") or "0"
    if len(digits) > 18:  # past int64: no such version can exist
        raise NotFound(f"model version {text[:20]}... is not served")
    if int(digits) < 1:
        raise InvalidArgument(f"model version {text!r} must be a positive integer, or empty")
    return int(digits)


def _metadata(spec) -> v2.ModelMetadataResponse.TensorMetadata:
    return v2.ModelMetadataResponse.TensorMetadata(
        name=spec.name,
        datatype=V2_DATATYPES[spec.dtype],
        shape=v2_shape(spec.shape),
    )


def _class_count(output: v2.ModelInferRequest.InferRequestedOutputTensor) -> int:
    """Triton's classification extension: ``parameters["classification"]`` (tritonclient's
    ``class_count``) asks for the top classes instead of the scores; 0 when not asked."""
    if "classification" not in output.parameters:
        return 0
    parameter = output.parameters["classification"]
    if parameter.WhichOneof("parameter_choice") != "int64_param" or parameter.int64_param < 1:
        raise InvalidArgument(
            f"output {output.name!r}: parameter 'classification' must be an int64 of 1 or more "
            "(the number of top classes)"
        )
    return parameter.int64_param


def _top_classes(scores: np.ndarray, count: int, labels: Sequence[str] | None) -> np.ndarray:
    """Triton's classification answer: per item the ``count`` best as ``score:index:label``
    (``score:index`` without labels), best first, as BYTES."""
    flat = scores.reshape(len(scores), -1)
    labels = labels if labels and len(labels) == flat.shape[1] else None  # class scores only
    best = np.argsort(-flat, axis=1, kind="stable")[:, :count]
    entries = [
        [(f"{row[i]:f}:{i}" + (f":{labels[i]}" if labels else "")).encode() for i in indices]
        for row, indices in zip(flat, best, strict=True)
    ]
    return np.array(entries, dtype=object)


SHARED_MEMORY = (
    "shared-memory tensors are not served (clients and server may be on different machines): "
    "send tensors in the request (raw_input_contents or contents)"
)


def _refuse_shared_memory(tensor: Any, kind: str) -> None:
    """Triton's shared-memory parameters on a tensor of a request: read as an inline tensor,
    an input would be refused for its element count, an output answered where the client does
    not look."""
    if "shared_memory_region" in tensor.parameters:
        region = tensor.parameters["shared_memory_region"].string_param
        where = "send it in the request" if kind == "input" else "read it from the response"
        raise InvalidArgument(
            f"{kind} {tensor.name!r} is in shared-memory region {region!r}, and shared-memory "
            f"tensors are not served: leave out its shared_memory parameters and {where}"
        )


def _unimplemented(method: str, advice: str) -> Callable[..., NoReturn]:
    """A Triton RPC this server refuses, counted and logged like any call, with ``advice``."""

    def refuse(self: InferenceService, request, context) -> NoReturn:
        self.core.refuse(context, method, Unimplemented(advice))

    return refuse


class InferenceService(v2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: ServingCore) -> None:
        self.core = core

    def _model(self, name: str, version: str, field: str = "name") -> ServedModel:
        name = name or self.core.repository.only_model(field)
        return self.core.repository.get(name, _version(version))

    def ServerLive(self, request, context) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context) -> v2.ServerReadyResponse:
        ready = self.core.repository.ready() and not self.core.draining
        return v2.ServerReadyResponse(ready=ready)

    def ModelReady(self, request: v2.ModelReadyRequest, context) -> v2.ModelReadyResponse:
        def handle(record: dict[str, Any]) -> v2.ModelReadyResponse:
            try:
                model = self._model(request.name, request.version)
            except InvalidArgument:  # no name on a server of several models; a bad version
                raise
            except ServingError:  # unknown, loading or failed: not ready, as Triton answers
                return v2.ModelReadyResponse(ready=False)
            return v2.ModelReadyResponse(ready=model.ready and not self.core.draining)

        return self.core.call(context, "ModelReady", request.name, handle, inference=False)

    def ServerMetadata(self, request, context) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(name=PLATFORM, version=__version__, extensions=EXTENSIONS)

    def ModelMetadata(self, request: v2.ModelMetadataRequest, context) -> v2.ModelMetadataResponse:
        def handle(record: dict[str, Any]) -> v2.ModelMetadataResponse:
            model = self._model(request.name, request.version)
            versions = [
                str(v)
                for v, state, _ in self.core.repository.versions(model.name)
                if state == "AVAILABLE"
            ]
            return v2.ModelMetadataResponse(
                name=model.name,
                versions=versions,
                platform=PLATFORM,
                # The service input only: the protocol reads every listed input as required.
                # The featurizer's input (``preprocessed``) is accepted instead; see the docs.
                inputs=[_metadata(model.signature.inputs[0])],
                outputs=[_metadata(spec) for spec in model.signature.outputs],
            )

        return self.core.call(context, "ModelMetadata", request.name, handle, inference=False)

    def ModelInfer(self, request: v2.ModelInferRequest, context) -> v2.ModelInferResponse:
        return self.core.call(
            context,
            "ModelInfer",
            request.model_name,
            lambda record: self._infer(request, context, record),
        )

    def ModelStreamInfer(
        self, requests: Iterator[bytes], context
    ) -> Iterator[v2.ModelStreamInferResponse]:
        """Triton's streaming: each request is answered in order, as its own call would be; a
        failed one gets its error in the stream, which goes on. Open several streams (or call
        ModelInfer concurrently) to keep the device's batches full."""
        with self.core.stream(context, "ModelStreamInfer") as calls:
            for raw in requests:
                request = v2.ModelInferRequest()
                handle = functools.partial(self._infer_raw, raw, request, context)
                answer, error, account = calls.answer(handle)
                if answer is None:  # the failed request's id, for the client to match
                    answer = v2.ModelInferResponse(
                        model_name=request.model_name,
                        model_version=request.model_version,
                        id=request.id,
                    )
                try:
                    yield v2.ModelStreamInferResponse(error_message=error, infer_response=answer)
                finally:
                    account()

    def _infer_raw(
        self, raw: bytes, request: v2.ModelInferRequest, context, record: dict[str, Any]
    ) -> v2.ModelInferResponse:
        """Parse ``raw`` into ``request`` (left empty when it is not a valid one), then infer."""
        request.CopyFrom(parse(v2.ModelInferRequest, raw))
        record["model"] = request.model_name[:MAX_LOGGED_NAME]
        return self._infer(request, context, record)

    def _infer(
        self, request: v2.ModelInferRequest, context, record: dict[str, Any]
    ) -> v2.ModelInferResponse:
        model = self._model(request.model_name, request.model_version, "model_name")
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise InvalidArgument(
                f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} "
                "inputs; give one per input, in order"
            )
        inputs = {}
        for index, tensor in enumerate(request.inputs):
            if tensor.name in inputs:
                raise InvalidArgument(f"input {tensor.name!r} is given twice")
            _refuse_shared_memory(tensor, "input")
            limit = model.max_elements(tensor.name)
            inputs[tensor.name] = from_v2(tensor, raw[index] if raw else None, limit)
        wanted = [output.name for output in request.outputs] or [
            spec.name for spec in model.signature.outputs
        ]
        if len(set(wanted)) != len(wanted):
            raise InvalidArgument(f"outputs name {wanted}: name each output once")
        for output in request.outputs:
            _refuse_shared_memory(output, "output")
        counts = {output.name: _class_count(output) for output in request.outputs}  # before a run
        results = self.core.infer(context, record, model, inputs, wanted)
        response = v2.ModelInferResponse(
            model_name=model.name, model_version=str(model.version), id=request.id
        )
        for name in wanted:
            value = results[name]
            if counts.get(name):
                value = _top_classes(value, counts[name], model.labels)
            datatype, shape, content = to_v2(value)
            response.outputs.add(name=name, datatype=datatype, shape=shape)
            response.raw_output_contents.append(content)
        return response

    def ModelConfig(self, request: v2.ModelConfigRequest, context) -> v2.ModelConfigResponse:
        def handle(record: dict[str, Any]) -> v2.ModelConfigResponse:
            model = self._model(request.name, request.version)
            config = model_config(model, self.core.repository.policy)
            return v2.ModelConfigResponse(config=config)

        return self.core.call(context, "ModelConfig", request.name, handle, inference=False)

    def ModelStatistics(
        self, request: v2.ModelStatisticsRequest, context
    ) -> v2.ModelStatisticsResponse:
        """Every available version of the named model (of every model without a name), or the
        one version asked for."""

        def handle(record: dict[str, Any]) -> v2.ModelStatisticsResponse:
            if request.version and not request.name:
                raise InvalidArgument("a version needs a model name; give both, or neither")
            version = _version(request.version)
            models = [
                model
                for model in self.core.repository.served()
                if model.state == AVAILABLE
                and request.name in ("", model.name)
                and version in (None, model.version)
            ]
            if request.name and not models:
                self.core.repository.get(request.name, version)  # raises why none is served
            models.sort(key=lambda model: (model.name, model.version))
            stats = [model_statistics(model) for model in models]
            return v2.ModelStatisticsResponse(model_stats=stats)

        return self.core.call(context, "ModelStatistics", request.name, handle, inference=False)

    def RepositoryIndex(
        self, request: v2.RepositoryIndexRequest, context
    ) -> v2.RepositoryIndexResponse:
        def handle(record: dict[str, Any]) -> v2.RepositoryIndexResponse:
            if request.repository_name:
                raise NotFound(
                    f"no repository {request.repository_name[:100]!r}: this server has one "
                    "model repository; leave repository_name empty"
                )
            return repository_index(self.core.repository, request.ready)

        return self.core.call(context, "RepositoryIndex", "", handle, inference=False)

    def RepositoryModelLoad(self, request: v2.RepositoryModelLoadRequest, context) -> NoReturn:
        self._refuse_model_control(context, "RepositoryModelLoad", request.model_name)

    def RepositoryModelUnload(self, request: v2.RepositoryModelUnloadRequest, context) -> NoReturn:
        self._refuse_model_control(context, "RepositoryModelUnload", request.model_name)

    SystemSharedMemoryStatus = _unimplemented("SystemSharedMemoryStatus", SHARED_MEMORY)
    SystemSharedMemoryRegister = _unimplemented("SystemSharedMemoryRegister", SHARED_MEMORY)
    SystemSharedMemoryUnregister = _unimplemented("SystemSharedMemoryUnregister", SHARED_MEMORY)
    CudaSharedMemoryStatus = _unimplemented("CudaSharedMemoryStatus", SHARED_MEMORY)
    CudaSharedMemoryRegister = _unimplemented("CudaSharedMemoryRegister", SHARED_MEMORY)
    CudaSharedMemoryUnregister = _unimplemented("CudaSharedMemoryUnregister", SHARED_MEMORY)
    TraceSetting = _unimplemented(
        "TraceSetting",
        "tracing is not served: every answer's server-timing trailer gives its stage times, "
        "and /metrics their histograms",
    )
    LogSettings = _unimplemented(
        "LogSettings",
        "log settings are fixed when the server starts (fpgaserve serve --log-format)",
    )

    def _refuse_model_control(self, context, method: str, name: str) -> NoReturn:
        """Triton's explicit model control has no place here: the repository's files are the
        one source of truth (as with Triton's polling mode), so a reload cannot undo a load."""
        root = self.core.repository.root
        if root is None:
            how = (
                "this server serves fixed archives (--model); serve a directory "
                "(--model-repository) to add and remove models while it runs"
            )
        else:
            how = (
                f"to load a model, put its archive at {root}/<name>/<version>/model.zip; to "
                "unload it, remove that folder"
            )
        error = FailedPrecondition(f"models are loaded from the model repository itself: {how}")
        self.core.refuse(context, method, error, name)
