"""The real server on real sockets, called with the official TensorFlow Serving stubs, the KServe
v2 stubs, and the gRPC health and reflection clients."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from servers import (
    CLASSES,
    channel,
    eventually,
    jpeg,
    metrics,
    requests_counted,
    running,
    tiny_archive,
)
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from fpgaserve.pipeline import Pipeline
from fpgaserve.protos import grpc_predict_v2_pb2 as v2
from fpgaserve.protos import grpc_predict_v2_pb2_grpc as v2_grpc
from fpgaserve.server import ServerConfig
from fpgaserve.server.metrics import Metrics
from fpgaserve.wire import from_v2


@pytest.fixture(scope="module")
def server(archive):
    with running(ServerConfig(archives=[archive])) as server:
        yield server


@pytest.fixture(scope="module")
def stub(server):
    with channel(server) as ch:
        yield prediction_service_pb2_grpc.PredictionServiceStub(ch)


@pytest.fixture(scope="module")
def v2_stub(server):
    with channel(server) as ch:
        yield v2_grpc.GRPCInferenceServiceStub(ch)


def predict_request(images, model="tiny", **spec) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    return request


def error_of(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=30, **kwargs)
    return info.value


# -- TensorFlow Serving ------------------------------------------------------------------------


def test_predict_returns_only_the_probabilities_bit_exact(stub, expected):
    request = predict_request([jpeg(0), jpeg(1)], signature_name="serving_default")
    # Azure's client sends a routing header the server does not use: it must be ignored.
    response = stub.Predict(
        request, timeout=30, metadata=[("x-ms-aml-grpc-service-route", "/api/v1/service/x")]
    )
    assert list(response.outputs) == ["output_alias"]  # Brainwave's name for its one output
    probabilities = tf.make_ndarray(response.outputs["output_alias"])
    np.testing.assert_array_equal(probabilities, expected["probabilities"])
    assert response.model_spec.name == "tiny" and response.model_spec.version.value == 1
    # In the typed field, as TensorFlow Serving answers: `np.array(t.float_val)` clients work.
    values = np.array(response.outputs["output_alias"].float_val, np.float32)
    np.testing.assert_array_equal(values, expected["probabilities"].ravel())


def test_output_filter_and_featurizer_input(stub, expected, archive):
    request = predict_request([jpeg(0), jpeg(1)], version=1)
    request.output_filter.extend(["features", "probabilities", "output_alias"])
    response = stub.Predict(request, timeout=30)
    assert sorted(response.outputs) == ["features", "output_alias", "probabilities"]
    features = tf.make_ndarray(response.outputs["features"])
    np.testing.assert_array_equal(features, expected["features"])
    for alias in ("probabilities", "output_alias"):
        np.testing.assert_array_equal(
            tf.make_ndarray(response.outputs[alias]), expected["probabilities"]
        )

    # Float tensors enter at the featurizer ("preprocessed"), skipping JPEG decoding.
    with Pipeline.load(archive) as pipeline:
        preprocessed = pipeline.run({"images": [jpeg(0)]}, outputs=["preprocessed"])
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tiny"
    request.inputs["preprocessed"].CopyFrom(tf.make_tensor_proto(preprocessed["preprocessed"]))
    response = stub.Predict(request, timeout=30)
    np.testing.assert_array_equal(
        tf.make_ndarray(response.outputs["output_alias"]), expected["probabilities"][:1]
    )
    assert response.model_spec.signature_name == "preprocessed"  # the signature that ran


BAD_PREDICTS = [
    ("unknown model", lambda: predict_request([jpeg()], model="nope"), "NOT_FOUND", "nope"),
    ("unknown version", lambda: predict_request([jpeg()], version=7), "NOT_FOUND", "version 7"),
    ("unknown label", lambda: predict_request([jpeg()], version_label="stable"), "NOT_FOUND",
     "label"),
    ("unknown signature", lambda: predict_request([jpeg()], signature_name="x"),
     "FAILED_PRECONDITION", "signature"),
    ("not an image", lambda: predict_request([b"\xff\xd8 not a jpeg"]), "INVALID_ARGUMENT", ""),
    ("empty batch", lambda: predict_request(np.array([], dtype=object).astype(bytes)),
     "INVALID_ARGUMENT", "empty"),
    ("wrong dtype", lambda: _with_input("images", tf.make_tensor_proto(np.zeros(3, np.int32))),
     "INVALID_ARGUMENT", "DT_INT32"),
    ("wrong shape", lambda: _with_input("preprocessed", tf.make_tensor_proto(np.zeros((1, 5, 5, 3),
     np.float32))), "INVALID_ARGUMENT", "[N, 224, 224, 3]"),
    ("NaN input", lambda: _with_input("preprocessed", tf.make_tensor_proto(np.full((1, 224, 224, 3),
     np.nan, np.float32))), "INVALID_ARGUMENT", "NaN"),
    ("input overflowing the model", lambda: _with_input("preprocessed", tf.make_tensor_proto(
     np.full((2, 224, 224, 3), 1e37, np.float32))), "INVALID_ARGUMENT", "not finite"),
    ("unknown input", lambda: _with_input("pixels", tf.make_tensor_proto([b"x"])),
     "INVALID_ARGUMENT", "no input 'pixels'"),
    ("unknown output", lambda: _with_filter("logits"), "INVALID_ARGUMENT", "logits"),
    ("output named twice", lambda: _with_filter("features", "features"), "INVALID_ARGUMENT",
     "'features' twice"),
    ("content too short", lambda: _with_input("preprocessed", _short_tensor()), "INVALID_ARGUMENT",
     "bytes"),
]  # fmt: skip


def _with_input(name, tensor):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tiny"
    request.inputs[name].CopyFrom(tensor)
    return request


def _with_filter(*names):
    request = predict_request([jpeg()])
    request.output_filter.extend(names)
    return request


def _short_tensor():
    tensor = tf.make_tensor_proto(np.zeros((1, 224, 224, 3), np.float32))
    tensor.tensor_content = tensor.tensor_content[:-4]
    return tensor


@pytest.mark.parametrize("case", BAD_PREDICTS, ids=[case[0] for case in BAD_PREDICTS])
def test_bad_predicts_get_the_right_status_and_the_server_keeps_serving(stub, case):
    _, make, code, fragment = case
    error = error_of(stub.Predict, make())
    assert error.code().name == code, error.details()
    assert fragment in error.details()
    assert stub.Predict(predict_request([jpeg()]), timeout=30).outputs["output_alias"].float_val


def test_metadata_status_and_classify(server):
    with channel(server) as ch:
        prediction = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = "tiny"
        response = prediction.GetModelMetadata(request, timeout=30)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        default = signatures.signature_def["serving_default"]
        assert list(default.inputs) == ["images"]
        assert default.inputs["images"].dtype == tf.string.as_datatype_enum
        assert sorted(default.outputs) == ["features", "output_alias", "probabilities"]
        assert default.outputs["output_alias"] == default.outputs["probabilities"]
        assert [d.size for d in default.outputs["probabilities"].tensor_shape.dim] == [-1, 10]
        assert list(signatures.signature_def["preprocessed"].inputs) == ["preprocessed"]

        status_request = get_model_status_pb2.GetModelStatusRequest()
        status_request.model_spec.name = "tiny"
        models = model_service_pb2_grpc.ModelServiceStub(ch)
        (status,) = models.GetModelStatus(status_request, timeout=30).model_version_status
        available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        assert (status.version, status.state) == (1, available)

        classify = classification_pb2.ClassificationRequest()
        classify.model_spec.name = "tiny"
        example = classify.input.example_list.examples.add()
        example.features.feature["images"].bytes_list.value.append(jpeg(0))
        (result,) = prediction.Classify(classify, timeout=30).result.classifications
        scores = [c.score for c in result.classes]
        assert len(scores) == len(CLASSES) and scores == sorted(scores, reverse=True)
        assert {c.label for c in result.classes} == set(CLASSES)

        # With a context, as TensorFlow Serving merges it: an example's own image wins.
        shared = classification_pb2.ClassificationRequest()
        shared.model_spec.name = "tiny"
        listed = shared.input.example_list_with_context
        listed.context.features.feature["images"].bytes_list.value.append(jpeg(0))
        listed.examples.add()  # the context's image
        listed.examples.add().features.feature["images"].bytes_list.value.append(jpeg(1))
        first, second = prediction.Classify(shared, timeout=30).result.classifications
        assert first == result
        classify.input.example_list.examples[0].features.feature["images"].bytes_list.value[0] = (
            jpeg(1)
        )
        (alone,) = prediction.Classify(classify, timeout=30).result.classifications
        assert second == alone and alone != result

        classify.model_spec.signature_name = "preprocessed"  # a tensor signature (review)
        error = error_of(prediction.Classify, classify)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "signature 'preprocessed' takes a tensor: call Predict" in error.details()


def test_calls_without_a_request_id_get_a_fresh_one_each(server, stub):
    ids = []
    for _ in range(3):
        _, call = stub.Predict.with_call(predict_request([jpeg(0)]), timeout=30)
        ids.append(dict(call.trailing_metadata())["x-request-id"])
    assert len(set(ids)) == 3
    assert all(len(rid) == 32 and int(rid, 16) >= 0 for rid in ids)  # 32 hex digits


def test_methods_not_served_say_what_to_use_and_are_counted(server, stub):
    regress = regression_pb2.RegressionRequest()
    regress.model_spec.name = "tiny"
    error = error_of(stub.Regress, regress)
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "use Predict or Classify" in error.details()
    assert dict(error.trailing_metadata())["x-request-id"]
    with channel(server) as ch:
        reload = model_management_pb2.ReloadConfigRequest()
        error = error_of(
            model_service_pb2_grpc.ModelServiceStub(ch).HandleReloadConfigRequest, reload
        )
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED and "repository" in error.details()
    eventually(lambda: requests_counted(server, "Regress", "UNIMPLEMENTED"))  # model "tiny"


# -- KServe v2 ---------------------------------------------------------------------------------


def test_v2_server_and_model_calls(v2_stub, expected):
    assert v2_stub.ServerLive(v2.ServerLiveRequest(), timeout=10).live
    assert v2_stub.ServerReady(v2.ServerReadyRequest(), timeout=10).ready
    assert v2_stub.ModelReady(v2.ModelReadyRequest(name="tiny"), timeout=10).ready
    assert not v2_stub.ModelReady(v2.ModelReadyRequest(name="tiny", version="9"), timeout=10).ready
    assert v2_stub.ServerMetadata(v2.ServerMetadataRequest(), timeout=10).name == "fpgaserve"
    metadata = v2_stub.ModelMetadata(v2.ModelMetadataRequest(name="tiny"), timeout=10)
    assert metadata.versions == ["1"]
    # The service input only: v2 clients send every input the metadata lists.
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("images", "BYTES", [-1])
    ]  # fmt: skip
    # Readiness of what is not served is a boolean, as Triton answers; no name: the only model.
    assert not v2_stub.ModelReady(v2.ModelReadyRequest(name="nope"), timeout=10).ready
    assert v2_stub.ModelReady(v2.ModelReadyRequest(), timeout=10).ready

    # Raw BYTES: each element is a 4-byte little-endian length, then its bytes.
    images = [jpeg(0), jpeg(1)]
    raw = b"".join(len(image).to_bytes(4, "little") + image for image in images)
    request = v2.ModelInferRequest(model_name="tiny", id="req-7", raw_input_contents=[raw])
    request.inputs.add(name="images", datatype="BYTES", shape=[2])
    response = v2_stub.ModelInfer(request, timeout=30)
    assert response.id == "req-7" and response.model_version == "1"
    assert [o.name for o in response.outputs] == ["features", "probabilities"]
    probabilities = np.frombuffer(response.raw_output_contents[1], "<f4").reshape(2, 10)
    np.testing.assert_array_equal(probabilities, expected["probabilities"])

    # Typed contents, one requested output.
    request = v2.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="images", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        images[1]
    )
    request.outputs.add(name="probabilities")
    (content,) = v2_stub.ModelInfer(request, timeout=30).raw_output_contents
    np.testing.assert_array_equal(np.frombuffer(content, "<f4"), expected["probabilities"][1])

    # Triton's classification extension (tritonclient's class_count): the top classes, labelled.
    request.outputs[0].parameters["classification"].int64_param = 3
    response = v2_stub.ModelInfer(request, timeout=30)
    (output,) = response.outputs
    assert (output.datatype, list(output.shape)) == ("BYTES", [1, 3])
    entries = from_v2(output, response.raw_output_contents[0])[0]
    scores = expected["probabilities"][1]
    best = np.argsort(-scores, kind="stable")[:3]
    assert [e.decode() for e in entries] == [f"{scores[i]:f}:{i}:class{i}" for i in best]
    request.outputs.add(name="features").parameters["classification"].int64_param = 2
    response = v2_stub.ModelInfer(request, timeout=30)  # not class scores: no labels
    assert from_v2(response.outputs[1], response.raw_output_contents[1])[0][0].count(b":") == 1
    del request.outputs[1]
    request.outputs[0].parameters["classification"].string_param = "3"
    assert error_of(v2_stub.ModelInfer, request).code() == grpc.StatusCode.INVALID_ARGUMENT


def _v2_request(**fields):
    request = v2.ModelInferRequest(model_name=fields.pop("model", "tiny"), **fields)
    return request


BAD_V2 = [
    ("unknown model", lambda: _v2_request(model="nope"), "NOT_FOUND"),
    ("bad version", lambda: _v2_request(model_version="one"), "INVALID_ARGUMENT"),
    ("no inputs", lambda: _v2_request(), "INVALID_ARGUMENT"),
    ("INT64 input", lambda: _v2_input("images", "INT64", [1], b"\0" * 8), "INVALID_ARGUMENT"),
    ("truncated BYTES", lambda: _v2_input("images", "BYTES", [1], b"\x10\0\0\0abc"),
     "INVALID_ARGUMENT"),
    ("FP32 size", lambda: _v2_input("preprocessed", "FP32", [1, 224, 224, 3], b"\0" * 12),
     "INVALID_ARGUMENT"),
    ("negative dim", lambda: _v2_input("images", "BYTES", [-1], b""), "INVALID_ARGUMENT"),
]  # fmt: skip


def _v2_input(name, datatype, shape, raw):
    request = _v2_request(raw_input_contents=[raw])
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    return request


@pytest.mark.parametrize("case", BAD_V2, ids=[case[0] for case in BAD_V2])
def test_bad_v2_requests(v2_stub, case):
    _, make, code = case
    error = error_of(v2_stub.ModelInfer, make())
    assert error.code().name == code, error.details()


# -- health, reflection, metrics ---------------------------------------------------------------


def _scrape(server, *lines: str) -> str:
    """The server's /metrics page, or "" while it does not hold all of ``lines`` yet."""
    text = metrics(server)
    return text if all(line in text for line in lines) else ""


def test_health_reflection_and_metrics(server, stub):
    with channel(server) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "tiny", "tensorflow.serving.PredictionService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service

        database = ProtoReflectionDescriptorDatabase(ch)
        services = set(database.get_services())
        assert {
            "tensorflow.serving.PredictionService",
            "tensorflow.serving.ModelService",
            "inference.GRPCInferenceService",
            "grpc.health.v1.Health",
        } <= services
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("inference.GRPCInferenceService").methods_by_name
        assert "ModelInfer" in method

    stub.Predict(predict_request([jpeg()]), timeout=30)
    unknown = predict_request([jpeg()])
    unknown.model_spec.name = "no-such-model"
    assert error_of(stub.Predict, unknown).code() == grpc.StatusCode.NOT_FOUND
    # A call is counted once its answer has been sent: the scrape may have to wait for it.
    text = eventually(
        lambda: _scrape(
            server,
            'fpgaserve_requests_total{code="OK",method="Predict",model="tiny"}',
            'fpgaserve_requests_total{code="NOT_FOUND",method="Predict",model="unknown"}',
        )
    )
    for stage in ("queue", "preprocess", "device", "classify", "total"):
        assert f'fpgaserve_stage_seconds_bucket{{le="0.1",model="tiny",stage="{stage}"}}' in text
    # Found in review: every other path answered with the metrics too.
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://localhost:{server.metrics_port}/")
    assert info.value.code == 404 and b"/metrics" in info.value.read()


def test_a_busy_metrics_port_is_named_at_start():
    """Found in review: the error was a bare '[Errno 98] Address already in use'."""
    with socket.socket() as taken:
        taken.bind(("localhost", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            OSError, match=f"cannot serve metrics on localhost:{port} .*--metrics-port"
        ):
            Metrics().serve(port, "localhost")


def test_message_size_limit(archive):
    config = ServerConfig(archives=[archive], max_message_bytes=256 * 1024)
    with running(config) as server, channel(server) as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        big = jpeg(0, size=(600, 600))
        assert len(big) > 256 * 1024
        error = error_of(stub.Predict, predict_request([big]))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in error.details()
        assert stub.Predict(predict_request([jpeg()]), timeout=30).outputs["output_alias"].float_val


def test_an_answer_over_the_message_size_limit_is_refused_and_counted_as_such(tmp_path):
    wide = tiny_archive(tmp_path / "wide.zip", "wide", classes=[f"c{i}" for i in range(3000)])
    config = ServerConfig(archives=[wide], max_message_bytes=16 * 1024)  # 12 KB a reply
    with running(config) as server, channel(server) as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        small = jpeg(0, size=(32, 32))
        assert len(stub.Predict(predict_request([small], "wide"), timeout=30).outputs) == 1
        error = error_of(stub.Predict, predict_request([small] * 2, "wide"))  # 24 KB of answer
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-message-mb" in error.details()
        eventually(lambda: requests_counted(server, "Predict", "RESOURCE_EXHAUSTED", "wide") == 1)
        assert requests_counted(server, "Predict", "OK", "wide") == 1


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height``: a decompression bomb's calling card."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)))  # fmt: skip


@pytest.mark.parametrize(
    ("image", "fragment"),
    [
        (_png_header(100_000, 100_000), "100000x100000 pixels"),
        (b"GIF89a" + b"\0" * 20, "not a readable JPEG or PNG"),
        (b"", "empty"),
        (jpeg(0)[:200], "could not be processed"),  # truncated: the header is intact
    ],
    ids=["huge declared size", "gif", "empty", "truncated jpeg"],
)
def test_hostile_images_are_refused_before_decoding(stub, image, fragment):
    error = error_of(stub.Predict, predict_request([jpeg(1), image, jpeg(0)]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The message names the image, also when only the decoder refuses it (found by review).
    assert fragment in error.details() and "image 1" in error.details(), error.details()


# Found by review: the warmup's own 256x256 image was held to --max-image-pixels, so a limit
# below 65536 pixels (e.g. "224x224 images only") kept every model from loading.
def test_a_pixel_limit_below_the_warmups_image_still_serves(archive):
    config = ServerConfig(archives=[archive], metrics_port=None, max_image_pixels=224 * 224)
    with running(config) as server, channel(server) as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        reply = stub.Predict(predict_request([jpeg(0, size=(224, 224))]), timeout=30)
        assert len(reply.outputs["output_alias"].float_val) == len(CLASSES)
        error = error_of(stub.Predict, predict_request([jpeg(0)]))  # 320x240: over the limit
        assert "the limit is 50176 pixels" in error.details()


def brainwave_score_file(stub, data: bytes) -> np.ndarray:
    """What Brainwave's PredictionClient.score_file does, step by step: one DT_STRING image,
    no model name; the answer is ``outputs["output_alias"]``, without its batch dimension. A
    failed call's id is read from its initial metadata before anything else (KeyError if absent)
    and the call is retried unless it was INVALID_ARGUMENT."""
    request = predict_pb2.PredictRequest()
    request.inputs["images"].string_val.append(data)
    request.inputs["images"].dtype = tf.string.as_datatype_enum
    request.inputs["images"].tensor_shape.dim.add(size=1)
    try:
        result = stub.Predict(request, 10.0)
    except grpc.RpcError as error:
        error.request_id = dict(error.initial_metadata())["request_id"].upper()
        raise
    return tf.make_ndarray(result.outputs["output_alias"])[0]


def test_brainwaves_prediction_client_works_unchanged(stub, expected):
    np.testing.assert_array_equal(brainwave_score_file(stub, jpeg(0)), expected["probabilities"][0])
    with pytest.raises(grpc.RpcError) as info:
        brainwave_score_file(stub, b"not an image")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # not retried by the client
    trailers = dict(info.value.trailing_metadata())
    assert info.value.request_id == trailers["x-request-id"].upper()


def test_azure_style_requests_without_a_model_name(server, stub, tmp_path):
    """Brainwave's PredictionClient leaves model_spec empty and always sends these headers."""
    request = predict_pb2.PredictRequest()
    request.inputs["images"].CopyFrom(tf.make_tensor_proto([jpeg()]))
    azure = [("authorization", "Bearer "), ("x-ms-aml-grpc-service-route", "/api/v1/service/x")]
    response = stub.Predict(request, timeout=30, metadata=azure)
    assert response.model_spec.name == "tiny" and list(response.outputs) == ["output_alias"]

    second = tiny_archive(tmp_path / "other.zip", name="other", seed=3)
    config = ServerConfig(archives=[second, server.config.archives[0]])
    with running(config) as two, channel(two) as ch:
        error = error_of(prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "['other', 'tiny']" in error.details()
