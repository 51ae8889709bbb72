"""Triton's extensions of the v2 protocol, as messages: a model's configuration, its statistics
and the repository's index. Triton's own clients (``tritonclient``, perf_analyzer) read these
to size batches, check inputs and split latency into queue and compute.
"""

from __future__ import annotations

from fpgaserve.protos import grpc_predict_v2_pb2 as v2
from fpgaserve.wire import V2_DATATYPES, v2_shape

from .errors import NotFound, Unavailable
from .model import AVAILABLE, LOADING, UNLOADING, ServedModel
from .repository import ModelRepository, VersionPolicy
from .statistics import COMPUTE, Duration

PLATFORM = "fpgaserve"
# Repository states in Triton's words; END (failed or unloaded) is UNAVAILABLE with its reason.
STATES = {AVAILABLE: "READY", LOADING: "LOADING", UNLOADING: "UNLOADING"}


def _data_type(dtype: str) -> int:
    datatype = V2_DATATYPES[dtype]
    return v2.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def _version_policy(policy: VersionPolicy) -> v2.ModelVersionPolicy:
    if policy.kind == "all":
        return v2.ModelVersionPolicy(all=v2.ModelVersionPolicy.All())
    if policy.kind == "specific":
        versions = sorted(policy.versions)
        return v2.ModelVersionPolicy(specific=v2.ModelVersionPolicy.Specific(versions=versions))
    return v2.ModelVersionPolicy(latest=v2.ModelVersionPolicy.Latest(num_versions=1))


def _dims(shape) -> list[int]:
    """Without the batch dimension: Triton's dims when ``max_batch_size`` > 0."""
    return v2_shape(shape)[1:]


def model_config(model: ServedModel, policy: VersionPolicy) -> v2.ModelConfig:
    """``max_batch_size`` is the most images one request may carry (``--max-queue-size``); the
    device's batch limit (``--max-batch-size``) is the dynamic batcher's preferred size. The
    input is the service input alone, as ModelMetadata lists it: Triton's tools refuse a
    configuration naming an input the metadata does not."""
    pipeline = model.pipeline  # None once the version unloads
    if pipeline is None:
        raise Unavailable(f"model {model.name!r} version {model.version} is being unloaded")
    batching, signature = model.batching, model.signature
    provenance = pipeline.manifest.get("provenance", {})
    parameters = {
        "device": pipeline.device.info.name,
        "format": provenance.get("format", ""),
        "weights": provenance.get("program", {}).get("weights", ""),
    }
    service_input = signature.inputs[0]
    return v2.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend=PLATFORM,
        version_policy=_version_policy(policy),
        max_batch_size=batching.max_queue_size,
        input=[
            v2.ModelInput(
                name=service_input.name,
                data_type=_data_type(service_input.dtype),
                dims=_dims(service_input.shape),
            )
        ],
        output=[
            v2.ModelOutput(name=spec.name, data_type=_data_type(spec.dtype), dims=_dims(spec.shape))
            for spec in signature.outputs
        ],
        dynamic_batching=v2.ModelDynamicBatching(
            preferred_batch_size=[min(batching.max_batch_size, batching.max_queue_size)],
            max_queue_delay_microseconds=round(batching.max_queue_delay_s * 1e6),
        ),
        instance_group=[
            v2.ModelInstanceGroup(name=f"{model.name}_device", kind="KIND_MODEL", count=1)
        ],
        parameters={k: v2.ModelParameter(string_value=str(v)) for k, v in parameters.items() if v},
    )


def _duration(duration: Duration | None) -> v2.StatisticDuration | None:
    return v2.StatisticDuration(count=duration.count, ns=duration.ns) if duration else None


def model_statistics(model: ServedModel) -> v2.ModelStatistics:
    snapshot = model.statistics.snapshot()
    requests = snapshot.requests
    names = ("success", "fail", "queue", *COMPUTE.values())
    return v2.ModelStatistics(
        name=model.name,
        version=str(model.version),
        last_inference=snapshot.last_inference_ms,
        inference_count=snapshot.inference_count,
        execution_count=snapshot.execution_count,
        inference_stats=v2.InferStatistics(**{n: _duration(requests.get(n)) for n in names}),
        batch_stats=[
            v2.InferBatchStatistics(
                batch_size=size, **{n: _duration(stages.get(n)) for n in COMPUTE.values()}
            )
            for size, stages in snapshot.batches.items()
        ],
    )


def _state(state: str, error: str, model: ServedModel | None) -> tuple[str, str]:
    if state == AVAILABLE and model is not None and not model.device_healthy:
        return "UNAVAILABLE", "the device is failing its health checks"
    return STATES.get(state, "UNAVAILABLE"), error


def repository_index(repository: ModelRepository, ready_only: bool) -> v2.RepositoryIndexResponse:
    """Every version the server knows, loaded or not (``ready_only``: the READY ones), with
    the reason a version is not ready."""
    served = {(model.name, model.version): model for model in repository.served()}
    response = v2.RepositoryIndexResponse()
    for name in repository.names():
        try:
            versions = repository.versions(name)
        except NotFound:  # gone since names() was read
            continue
        for version, state, error in versions:
            state, reason = _state(state, error, served.get((name, version)))
            if not ready_only or state == "READY":
                response.models.add(name=name, version=str(version), state=state, reason=reason)
    return response
