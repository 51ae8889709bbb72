"""Triton's extensions of the v2 protocol against the real server, with this project's v2 stubs:
streaming, model configuration, statistics and the repository index (Triton's own client runs
them too, in test_triton_client.py)."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np
import pytest
from servers import channel, eventually, jpeg, requests_counted, running, tiny_archive
from test_server import error_of

from fpgaserve.protos import grpc_predict_v2_pb2 as v2
from fpgaserve.protos import grpc_predict_v2_pb2_grpc as v2_grpc
from fpgaserve.server import BatchingConfig, ServerConfig, VersionPolicy
from fpgaserve.wire import to_v2

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


@pytest.fixture(scope="module")
def server(archive):
    batching = BatchingConfig(max_batch_size=4, max_queue_delay_s=0.002, max_queue_size=32)
    with running(ServerConfig(archives=[archive], batching=batching)) as server:
        yield server


@pytest.fixture(scope="module")
def stub(server):
    with channel(server) as ch:
        yield v2_grpc.GRPCInferenceServiceStub(ch)


def infer_request(*images: bytes, model: str = "tiny", id: str = "") -> v2.ModelInferRequest:
    datatype, shape, raw = to_v2(np.array(images, dtype=object))
    request = v2.ModelInferRequest(model_name=model, id=id, raw_input_contents=[raw])
    request.inputs.add(name="images", datatype=datatype, shape=shape)
    request.outputs.add(name="probabilities")
    return request


def probabilities(response: v2.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(-1, 10)


def code_of(call, request) -> tuple[str, str]:
    error = error_of(call, request)
    return error.code().name, error.details()


def test_model_config_describes_the_model_and_its_batching(stub):
    config = stub.ModelConfig(v2.ModelConfigRequest(name="tiny"), timeout=10).config
    assert (config.name, config.platform, config.backend) == ("tiny", "fpgaserve", "fpgaserve")
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    # A request may carry up to the queue's size; the device batches up to max_batch_size.
    assert config.max_batch_size == 32
    assert list(config.dynamic_batching.preferred_batch_size) == [4]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert config.version_policy.latest.num_versions == 1
    # The service input, without the batch dimension: what ModelMetadata lists (Triton's tools
    # refuse a configuration naming an input the metadata does not).
    inputs = [(i.name, v2.DataType.Name(i.data_type), list(i.dims)) for i in config.input]
    assert inputs == [("images", "TYPE_STRING", [])]
    metadata = stub.ModelMetadata(v2.ModelMetadataRequest(name="tiny"), timeout=10)
    assert [i.name for i in metadata.inputs] == [i.name for i in config.input]
    assert [o.name for o in metadata.outputs] == [o.name for o in config.output]
    outputs = [(o.name, v2.DataType.Name(o.data_type), list(o.dims)) for o in config.output]
    assert outputs == [("features", "TYPE_FP32", [8]), ("probabilities", "TYPE_FP32", [10])]
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (v2.ModelInstanceGroup.KIND_MODEL, 1)
    ]
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters["device"] == "emulator" and parameters["format"] == "msfp16"
    # No name: the only model; a version must be served.
    assert stub.ModelConfig(v2.ModelConfigRequest(), timeout=10).config.name == "tiny"
    one = stub.ModelConfig(v2.ModelConfigRequest(name="tiny", version="1"), timeout=10)
    assert one.config == config
    assert code_of(stub.ModelConfig, v2.ModelConfigRequest(name="nope"))[0] == "NOT_FOUND"
    assert code_of(stub.ModelConfig, v2.ModelConfigRequest(name="tiny", version="2"))[0] == (
        "NOT_FOUND"
    )
    assert code_of(stub.ModelConfig, v2.ModelConfigRequest(name="tiny", version="x"))[0] == (
        "INVALID_ARGUMENT"
    )


def test_statistics_count_the_clients_requests_exactly(archive):
    """A fresh server: warmup is not counted; then every answered image, request, device batch
    and failure is."""
    with running(ServerConfig(archives=[archive])) as server, channel(server) as ch:
        stub = v2_grpc.GRPCInferenceServiceStub(ch)

        def stats() -> v2.ModelStatistics:
            request = v2.ModelStatisticsRequest(name="tiny")
            (model,) = stub.ModelStatistics(request, timeout=10).model_stats
            return model

        fresh = stats()
        assert (fresh.name, fresh.version) == ("tiny", "1")
        assert fresh.inference_count == fresh.execution_count == fresh.last_inference == 0
        assert not fresh.inference_stats.success.count and not fresh.batch_stats

        before = time.time() * 1e3
        for images in ([jpeg(0)], [jpeg(1), jpeg(2)], [jpeg(3)]):
            stub.ModelInfer(infer_request(*images), timeout=30)
        # Admitted, then refused by the model: its answer overflows (a failure, counted).
        huge = v2.ModelInferRequest(model_name="tiny")
        huge.inputs.add(name="preprocessed", datatype="FP32", shape=[1, 224, 224, 3])
        huge.raw_input_contents.append(np.full((1, 224, 224, 3), 1e37, "<f4").tobytes())
        assert code_of(stub.ModelInfer, huge)[0] == "INVALID_ARGUMENT"
        # Refused before any model admits it: not the model's statistics.
        assert code_of(stub.ModelInfer, infer_request(jpeg(0), model="nope"))[0] == "NOT_FOUND"

        # Counted before each answer was sent: all there now.
        model = stats()
        infer = model.inference_stats
        assert infer.fail.count == 1
        assert model.inference_count == 4  # images answered
        assert infer.success.count == 3 and infer.success.ns > 0
        assert infer.fail.ns > 0
        for part in (infer.queue, infer.compute_input, infer.compute_infer, infer.compute_output):
            assert part.count == 3
        assert infer.compute_infer.ns > 0 and infer.compute_input.ns > 0
        assert before <= model.last_inference <= time.time() * 1e3 + 1
        # Device batches: every image of every request, the failed one's included.
        by_size = {b.batch_size: b for b in model.batch_stats}
        device_batches = sum(b.compute_infer.count for b in by_size.values())
        assert model.execution_count == device_batches
        assert sum(size * b.compute_infer.count for size, b in by_size.items()) == 5
        # Preprocessing ran for the three JPEG requests only.
        assert sum(size * b.compute_input.count for size, b in by_size.items()) == 4

        everything = stub.ModelStatistics(v2.ModelStatisticsRequest(), timeout=10).model_stats
        assert [(m.name, m.version) for m in everything] == [("tiny", "1")]
        one = v2.ModelStatisticsRequest(name="tiny", version="1")
        assert stub.ModelStatistics(one, timeout=10).model_stats[0].inference_count == 4
        bad = [
            (v2.ModelStatisticsRequest(name="tiny", version="2"), "NOT_FOUND"),
            (v2.ModelStatisticsRequest(name="nope"), "NOT_FOUND"),
            (v2.ModelStatisticsRequest(version="1"), "INVALID_ARGUMENT"),
        ]
        for request, code in bad:
            assert code_of(stub.ModelStatistics, request)[0] == code


def test_repository_index_and_model_control(tmp_path):
    root = tmp_path / "models"
    (root / "tiny" / "1").mkdir(parents=True)
    tiny_archive(root / "tiny" / "1" / "model.zip")
    (root / "tiny" / "2").mkdir()
    (root / "tiny" / "2" / "model.zip").write_bytes(b"not a zip archive")
    config = ServerConfig(model_repository=root, version_policy=VersionPolicy.parse("all"))
    with running(config) as server, channel(server) as ch:
        stub = v2_grpc.GRPCInferenceServiceStub(ch)
        index = stub.RepositoryIndex(v2.RepositoryIndexRequest(), timeout=10).models
        rows = {(m.name, m.version): (m.state, m.reason) for m in index}
        assert rows[("tiny", "1")] == ("READY", "")
        state, reason = rows[("tiny", "2")]
        assert state == "UNAVAILABLE" and "zip" in reason, reason
        ready = stub.RepositoryIndex(v2.RepositoryIndexRequest(ready=True), timeout=10).models
        assert [(m.name, m.version) for m in ready] == [("tiny", "1")]
        other = v2.RepositoryIndexRequest(repository_name="elsewhere")
        assert code_of(stub.RepositoryIndex, other)[0] == "NOT_FOUND"

        # Loading and unloading are the repository's files' job; the answer says how.
        for call, request in (
            (stub.RepositoryModelLoad, v2.RepositoryModelLoadRequest(model_name="tiny")),
            (stub.RepositoryModelUnload, v2.RepositoryModelUnloadRequest(model_name="tiny")),
        ):
            code, message = code_of(call, request)
            assert code == "FAILED_PRECONDITION"
            assert f"{root}/<name>/<version>/model.zip" in message, message
        eventually(lambda: requests_counted(server, "RepositoryModelLoad", "FAILED_PRECONDITION"))


def test_model_control_on_fixed_archives_points_to_a_repository(stub):
    code, message = code_of(stub.RepositoryModelLoad, v2.RepositoryModelLoadRequest())
    assert code == "FAILED_PRECONDITION" and "--model-repository" in message


def test_a_stream_answers_each_request_in_order_and_survives_bad_ones(server, expected):
    with channel(server) as ch:
        call = ch.stream_stream(
            STREAM,
            request_serializer=lambda raw: raw,
            response_deserializer=v2.ModelStreamInferResponse.FromString,
        )
        sent = [
            infer_request(jpeg(0), id="first").SerializeToString(),
            infer_request(jpeg(0), model="nope", id="second").SerializeToString(),
            b"\xff\xff\xff",  # not a message at all
            infer_request(jpeg(0), jpeg(1), id="fourth").SerializeToString(),
        ]
        answers = list(call(iter(sent), timeout=60))
    assert [a.infer_response.id for a in answers] == ["first", "second", "", "fourth"]
    assert [bool(a.error_message) for a in answers] == [False, True, True, False]
    assert "'nope' is not served" in answers[1].error_message
    assert "not a valid inference.ModelInferRequest" in answers[2].error_message
    np.testing.assert_array_equal(
        probabilities(answers[0].infer_response), expected["probabilities"][:1]
    )
    np.testing.assert_array_equal(
        probabilities(answers[3].infer_response), expected["probabilities"]
    )
    # Each request is counted as a call of its own, logged as <the stream's id>/<n>.
    eventually(lambda: requests_counted(server, "ModelStreamInfer", "OK") >= 2)
    eventually(lambda: requests_counted(server, "ModelStreamInfer", "NOT_FOUND", "unknown") >= 1)


def test_an_open_stream_holds_a_call_slot(archive):
    """A stream holds one of gRPC's threads for its whole life, so it counts against
    --max-concurrent-calls like a call: past the limit, streams and calls are refused at once
    and health checks keep their threads."""
    with (
        running(ServerConfig(archives=[archive], max_concurrent_calls=1)) as server,
        channel(server) as ch,
    ):
        stub = v2_grpc.GRPCInferenceServiceStub(ch)
        requests: queue.Queue = queue.Queue()
        stream = stub.ModelStreamInfer(iter(requests.get, None), timeout=60)
        requests.put(infer_request(jpeg(0), id="held"))
        assert next(stream).infer_response.id == "held"  # the stream is open and answered

        code, message = code_of(stub.ModelInfer, infer_request(jpeg(0)))
        assert code == "RESOURCE_EXHAUSTED" and "1 calls, its limit" in message
        second = stub.ModelStreamInfer(iter([infer_request(jpeg(0))]), timeout=30)
        with pytest.raises(grpc.RpcError) as refused:
            next(second)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        stream.cancel()  # the client leaves: the slot is free again
        answer = eventually(lambda: stub.ModelInfer(infer_request(jpeg(0)), timeout=30))
        assert answer.outputs[0].name == "probabilities"


def test_several_streams_at_once_each_get_their_own_answers(server, expected):
    """Streams from several threads at once (tritonclient's async_stream_infer): each gets its
    own answers, in its own order, while the scheduler may batch them together."""
    errors: list[BaseException] = []

    def one_stream(n: int) -> None:
        try:
            with channel(server) as ch:
                stub = v2_grpc.GRPCInferenceServiceStub(ch)
                sent = [infer_request(jpeg(i % 2), id=f"{n}-{i}") for i in range(4)]
                answers = list(stub.ModelStreamInfer(iter(sent), timeout=120))
            assert [a.infer_response.id for a in answers] == [f"{n}-{i}" for i in range(4)]
            for i, answer in enumerate(answers):
                assert not answer.error_message, answer.error_message
                got = probabilities(answer.infer_response)[0]
                np.testing.assert_array_equal(got, expected["probabilities"][i % 2])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=one_stream, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors, errors


def test_a_stream_returns_its_request_id(stub):
    """Its requests are logged as <id>/<n>: the client learns the id to quote."""
    sent = [infer_request(jpeg(0), id="only")]
    answers = stub.ModelStreamInfer(iter(sent), timeout=30, metadata=[("x-request-id", "abc-9")])
    assert [a.infer_response.id for a in answers] == ["only"]
    assert ("x-request-id", "abc-9") in answers.trailing_metadata()


@pytest.mark.parametrize(
    ("method", "advice"),
    [
        ("SystemSharedMemoryRegister", "send tensors in the request"),
        ("CudaSharedMemoryStatus", "send tensors in the request"),
        ("TraceSetting", "server-timing trailer"),
        ("LogSettings", "--log-format"),
    ],
)
def test_triton_rpcs_not_served_say_what_to_do_instead(server, stub, method, advice):
    request = getattr(v2, f"{method}Request")()
    code, message = code_of(getattr(stub, method), request)
    assert code == "UNIMPLEMENTED" and advice in message, message
    eventually(lambda: requests_counted(server, method, "UNIMPLEMENTED", "unknown"))


def _attempts(stub) -> tuple[int, int]:
    """(succeeded, failed) requests the model has run, from its statistics."""
    (model,) = stub.ModelStatistics(v2.ModelStatisticsRequest(name="tiny"), timeout=10).model_stats
    return model.inference_stats.success.count, model.inference_stats.fail.count


# Found by review: an input in shared memory was read as an empty inline tensor ("0 values do
# not fill shape"), an output asked into shared memory was answered inline without a word, and
# an invalid classification parameter was refused only after the model had run.
@pytest.mark.parametrize("where", ["input", "output", "classification"])
def test_tensor_parameters_that_cannot_be_honoured_are_refused_before_the_model_runs(stub, where):
    request = infer_request(jpeg(0))
    if where == "input":
        tensor = request.inputs.add(name="preprocessed", datatype="FP32", shape=[1, 224, 224, 3])
        del request.inputs[0], request.raw_input_contents[:]
    else:
        tensor = request.outputs[0]
    if where == "classification":
        tensor.parameters["classification"].string_param = "3"
        expected = "parameter 'classification' must be an int64"
    else:
        tensor.parameters["shared_memory_region"].string_param = "region0"
        tensor.parameters["shared_memory_byte_size"].int64_param = 602112
        expected = f"{where} {tensor.name!r} is in shared-memory region 'region0'"
    before = _attempts(stub)
    code, message = code_of(stub.ModelInfer, request)
    assert code == "INVALID_ARGUMENT" and expected in message, message
    assert _attempts(stub) == before
