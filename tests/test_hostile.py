"""Hostile clients and a hostile model repository, on the real server over real sockets: bearer
tokens on every RPC, names and versions that try to reach outside the repository, repository
folders and links that must not be served, echoed input, concurrency limits and images that are
small on the wire and huge in memory.

TLS and mutual TLS refusals, and the served key never being logged, are in
test_server_security.py; this file adds what it does not cover. Tests of bugs this suite found say
so in a comment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import resource
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from servers import GatedDevice, channel, eventually, jpeg, metrics, png, running, status_of
from tensorflow.core.framework import tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
)
from test_server import predict_request
from test_server_cli import FPGASERVE, free_port

from fpgaserve.protos import grpc_predict_v2_pb2 as v2
from fpgaserve.protos import grpc_predict_v2_pb2_grpc as v2_grpc
from fpgaserve.server import BatchingConfig, ServerConfig
from fpgaserve.server.app import REFLECTION_STREAMS, RESERVED_THREADS

KEY = "hostile-test-key-5f0c2b"
OK = grpc.StatusCode.OK
NOT_FOUND = grpc.StatusCode.NOT_FOUND
INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
SMALL_JPEG = jpeg(11, size=(24, 32))


# -- bearer tokens on every RPC ----------------------------------------------------------------


def _classify() -> classification_pb2.ClassificationRequest:
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "tiny"
    example = request.input.example_list.examples.add()
    example.features.feature["images"].bytes_list.value.append(SMALL_JPEG)
    return request


def _infer() -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="images", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(SMALL_JPEG)
    return request


def _status() -> get_model_status_pb2.GetModelStatusRequest:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "tiny"
    return request


def _metadata() -> get_model_metadata_pb2.GetModelMetadataRequest:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "tiny"
    return request


# Requests that succeed with a good token, so that a refusal can only be the token's doing.
# Every other method is called with its empty request message.
USEFUL_REQUESTS = {
    "/tensorflow.serving.PredictionService/Predict": lambda: predict_request([SMALL_JPEG]),
    "/tensorflow.serving.PredictionService/Classify": _classify,
    "/tensorflow.serving.PredictionService/GetModelMetadata": _metadata,
    "/tensorflow.serving.ModelService/GetModelStatus": _status,
    "/inference.GRPCInferenceService/ModelInfer": _infer,
    "/inference.GRPCInferenceService/ModelReady": lambda: v2.ModelReadyRequest(name="tiny"),
    "/inference.GRPCInferenceService/ModelMetadata": lambda: v2.ModelMetadataRequest(name="tiny"),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": lambda: (
        reflection_pb2.ServerReflectionRequest(list_services="")
    ),
    "/grpc.health.v1.Health/Check": lambda: health_pb2.HealthCheckRequest(),
    "/grpc.health.v1.Health/Watch": lambda: health_pb2.HealthCheckRequest(),
}
SERVICES = {
    service.full_name: service
    for module in (prediction_service_pb2, model_service_pb2, v2, health_pb2, reflection_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
}
OPEN = {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}


def served_methods(ch, metadata) -> list:
    """Every method of every service the server lists through reflection."""
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = stub.ServerReflectionInfo(iter([request]), timeout=30, metadata=metadata)
    names = [service.name for service in reply.list_services_response.service]
    unknown = sorted(set(names) - set(SERVICES))
    assert not unknown, f"services this test does not know: {unknown}; add their modules"
    return [method for name in names for method in SERVICES[name].methods]


def call_method(ch, method, metadata) -> tuple[grpc.StatusCode, str]:
    """One call of ``method`` (any streaming kind) with ``metadata``: (code, details)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    request = USEFUL_REQUESTS.get(path, message_factory.GetMessageClass(method.input_type))()
    response = message_factory.GetMessageClass(method.output_type)
    kinds = (method.client_streaming, method.server_streaming)
    make = {(False, False): ch.unary_unary, (False, True): ch.unary_stream,
            (True, False): ch.stream_unary, (True, True): ch.stream_stream}[kinds]  # fmt: skip
    call = make(path, request_serializer=type(request).SerializeToString,
                response_deserializer=response.FromString)  # fmt: skip
    try:
        if method.client_streaming:
            result = call(iter([request]), timeout=30, metadata=metadata)
        else:
            result = call(request, timeout=30, metadata=metadata)
        if method.server_streaming:
            next(iter(result))  # Watch never ends: its first answer is enough
            result.cancel()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return OK, ""


def bad_credentials() -> list[list[tuple[str, str]]]:
    return [
        [],
        [("authorization", "Bearer wrong-key")],
        [("authorization", KEY)],  # no scheme
        [("authorization", f"Basic {KEY}")],
        [("authorization", f"Bearer {KEY[:-1]}")],  # a prefix of the key
        [("authorization", f"Bearer {KEY}x")],  # the key and more
        [("authorization", "Bearer")],
        [("authorization", "Bearer ")],
        [("authorization", f"Bearer {KEY}"), ("authorization", "Bearer wrong-key")],
        [("x-api-key", KEY)],
        [("authorization-bin", KEY.encode())],
    ]


def test_every_rpc_but_health_needs_a_token(archive, caplog):
    """Every method the server lists (KServe v2 ModelInfer, ModelReady, ServerMetadata, ...,
    TF Serving Classify, GetModelMetadata, ..., reflection) refuses a missing, wrong, partial
    or misplaced token with UNAUTHENTICATED and never echoes it; health stays open."""
    caplog.set_level(logging.INFO, logger="fpgaserve")
    good = [("authorization", f"Bearer {KEY}")]
    config = ServerConfig(archives=[archive], auth_keys=[KEY.encode()])
    with running(config) as server, channel(server) as ch:
        methods = served_methods(ch, good)
        paths = {f"/{m.containing_service.full_name}/{m.name}" for m in methods}
        assert set(USEFUL_REQUESTS) <= paths  # the calls above really are served
        assert len(methods) >= 17, sorted(paths)
        for method in methods:
            path = f"/{method.containing_service.full_name}/{method.name}"
            code, details = call_method(ch, method, good)
            assert code != UNAUTHENTICATED, (path, details)
            if path in USEFUL_REQUESTS:
                assert code == OK, (path, code, details)
            for metadata in bad_credentials():
                code, details = call_method(ch, method, metadata)
                if path in OPEN:
                    assert code == OK, (path, metadata, code, details)
                    continue
                assert code == UNAUTHENTICATED, (path, metadata, code, details)
                assert "Bearer <key>" in details and KEY not in details
                assert "wrong-key" not in details
        (predict,) = [m for m in methods if m.full_name.endswith("PredictionService.Predict")]
        assert call_method(ch, predict, [("authorization", f"bearer  {KEY} ")])[0] == OK
    records = [f"{r.getMessage()} {vars(r)}" for r in caplog.records]
    assert records, "the server logs requests"
    assert not [r for r in records if KEY[:-1] in r or "wrong-key" in r]


def test_refused_logins_and_unparsable_requests_are_counted_logged_and_given_their_id(
    archive, caplog
):
    """Found in review: calls refused before they reached a model (by the token check, or a
    message that does not parse) were missing from the metrics and the access log, and a
    refused login lost its request id."""
    caplog.set_level(logging.INFO, logger="fpgaserve.access")
    config = ServerConfig(archives=[archive], auth_keys=[KEY.encode()])
    with running(config) as server, channel(server) as ch:
        path = "/tensorflow.serving.PredictionService/Predict"
        calls = {
            "rid-login": ([], predict_request([jpeg()]).SerializeToString()),
            "rid-bytes": ([("authorization", f"Bearer {KEY}")], b"\xff\xff not a message"),
        }
        for rid, (metadata, data) in calls.items():
            with pytest.raises(grpc.RpcError) as refused:
                ch.unary_unary(path)(data, timeout=30, metadata=[*metadata, ("x-request-id", rid)])
            assert ("x-request-id", rid) in refused.value.trailing_metadata()
            assert ("request_id", rid) in refused.value.initial_metadata()  # Brainwave's clients
        counted = 'fpgaserve_requests_total{code="%s",method="Predict",model="unknown"} 1.0'
        codes = ("UNAUTHENTICATED", "INVALID_ARGUMENT")
        eventually(lambda: all(counted % code in metrics(server) for code in codes))
    lines = {r.request_id: r.code for r in caplog.records if r.name == "fpgaserve.access"}
    assert lines["rid-login"] == "UNAUTHENTICATED" and lines["rid-bytes"] == "INVALID_ARGUMENT"


# -- names, versions and the repository --------------------------------------------------------


def place(root: Path, name: str, version: str, archive: Path) -> Path:
    folder = root / name / version
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(archive, folder / "model.zip")
    return folder


ODD_FOLDERS = ["x y", ".hidden", "...", "-dash", "_under", "ünï", "a" * 129, "tiny;rm", "tiny\\x"]
ODD_VERSIONS = ["-1", "0", "1.0", "+1", "1 ", "latest", "..."]
LINKS = ["linked-model", "linked-version", "linked-archive"]


@pytest.fixture(scope="module")
def repository(tmp_path_factory, archive) -> Path:
    """A model repository with one plain model and every kind of folder it must ignore, next to
    a model outside it that links and names try to reach."""
    base = tmp_path_factory.mktemp("repository")
    root, outside = base / "models", base / "outside"
    place(root, "tiny", "1", archive)
    evil = place(outside, "evil", "1", archive)
    for name in ODD_FOLDERS:
        place(root, name, "1", archive)
    for i, version in enumerate(ODD_VERSIONS):
        place(root, f"odd{i}", version, archive)
    (root / "directory-archive" / "1" / "model.zip").mkdir(parents=True)
    (root / "plain-file").write_bytes(archive.read_bytes())
    (root / LINKS[0]).symlink_to(outside / "evil", target_is_directory=True)
    (root / LINKS[1]).mkdir()
    (root / LINKS[1] / "1").symlink_to(evil, target_is_directory=True)
    (root / LINKS[2] / "1").mkdir(parents=True)
    (root / LINKS[2] / "1" / "model.zip").symlink_to(evil / "model.zip")
    return root


@pytest.fixture(scope="module")
def repository_server(repository):
    with running(ServerConfig(model_repository=repository, poll_seconds=0.5)) as server:
        yield server


@pytest.fixture(scope="module")
def ch(repository_server):
    with channel(repository_server) as ch:
        yield ch


def test_odd_folders_in_the_repository_are_not_served(repository_server):
    served = set(repository_server.repository.names()) - set(LINKS)
    assert served == {"tiny"}


# Found by this test: server/repository.py scan() followed symbolic links, so a linked model folder,
# version folder or model.zip pointing outside --model-repository was served.
@pytest.mark.parametrize("name", LINKS)
def test_links_out_of_the_repository_are_not_served(ch, name):
    assert_not_served(ch, name)


def assert_not_served(ch, name: str) -> None:
    """Every RPC that names the model answers NOT_FOUND; ModelReady, not ready (as Triton)."""
    for call, request in _routing_calls(name):
        code, details, reply = status_of(call(ch), request)
        if isinstance(request, v2.ModelReadyRequest):
            assert code == OK and not reply.ready, (name, code, details)
        else:
            assert code == NOT_FOUND, (name, type(request).__name__, code, details)


def _routing_calls(name: str, version: str = "", label: str = "") -> list:
    """(stub method, request) for every RPC that names a model."""
    predict = predict_request([SMALL_JPEG], model=name)
    classify, metadata, status = _classify(), _metadata(), _status()
    for request in (predict, classify, metadata, status):
        request.model_spec.name = name
        if label:
            request.model_spec.version_label = label
    infer = _infer()
    infer.model_name, infer.model_version = name, version
    tf = prediction_service_pb2_grpc.PredictionServiceStub
    return [
        (lambda ch: tf(ch).Predict, predict),
        (lambda ch: tf(ch).Classify, classify),
        (lambda ch: tf(ch).GetModelMetadata, metadata),
        (lambda ch: model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus, status),
        (lambda ch: v2_grpc.GRPCInferenceServiceStub(ch).ModelInfer, infer),
        (lambda ch: v2_grpc.GRPCInferenceServiceStub(ch).ModelMetadata,
         v2.ModelMetadataRequest(name=name, version=version)),
        (lambda ch: v2_grpc.GRPCInferenceServiceStub(ch).ModelReady,
         v2.ModelReadyRequest(name=name, version=version)),
        (lambda ch: v2_grpc.GRPCInferenceServiceStub(ch).ModelConfig,
         v2.ModelConfigRequest(name=name, version=version)),
        (lambda ch: v2_grpc.GRPCInferenceServiceStub(ch).ModelStatistics,
         v2.ModelStatisticsRequest(name=name, version=version)),
    ]  # fmt: skip


TRAVERSALS = [
    "../outside/evil", "..", ".", "/", "//", "a/b", "tiny/", "./tiny", "tiny/../tiny",
    "tiny/1", "tiny/1/model.zip", "%2e%2e", "%2e%2e%2foutside%2fevil", "..%2foutside%2fevil",
    "\\..\\outside\\evil", "TINY", " tiny", "tiny ", "tiny\0", "evil", "outside", "~", "$HOME",
    "x y", ".hidden", "...", "plain-file", "directory-archive", "odd0", "a" * 1000, "é" * 300,
]  # fmt: skip


@pytest.mark.parametrize("name", TRAVERSALS, ids=[repr(n[:24]) for n in TRAVERSALS])
def test_names_cannot_reach_outside_the_repository(ch, name):
    """No RPC that names a model finds one for names that are paths, encodings of
    paths, near misses of a served name, or folders the repository ignores."""
    assert_not_served(ch, name)


@pytest.mark.parametrize(
    ("version", "label", "expected"),
    [
        ("2", "", NOT_FOUND),
        ("99999999999999999999", "", NOT_FOUND),
        ("-1", "", INVALID),
        ("0", "", INVALID),
        ("+1", "", INVALID),
        ("1.0", "", INVALID),
        (" 1", "", INVALID),
        ("0x1", "", INVALID),
        ("../1", "", INVALID),
        ("1/..", "", INVALID),
        ("%31", "", INVALID),
        ("1\0", "", INVALID),
        ("", "../stable", NOT_FOUND),
        ("", "stable/../../x", NOT_FOUND),
        ("", "version_labels.json", NOT_FOUND),
    ],
)
def test_versions_and_labels_cannot_traverse(ch, version, label, expected):
    """KServe v2 version strings and TF Serving labels (TF Serving's numeric versions are in
    the test below)."""
    calls = _routing_calls("tiny", version, label)
    v2_calls = calls[4:] if version else []
    tf_calls = calls[:3] if label else []
    for call, request in v2_calls + tf_calls:
        code, details, reply = status_of(call(ch), request)
        if isinstance(request, v2.ModelReadyRequest) and expected == NOT_FOUND:
            assert code == OK and not reply.ready, details  # an unknown version is not ready
        else:
            assert code == expected, (type(request).__name__, code, details)


@pytest.mark.parametrize("version", [-(2**63), -1, 0, 2, 2**31, 2**63 - 1])
def test_tf_serving_versions_out_of_range(ch, version):
    for call, request in _routing_calls("tiny")[:4]:
        request.model_spec.version.value = version
        code, details, _ = status_of(call(ch), request)
        assert code == NOT_FOUND, (type(request).__name__, code, details)


LONG = "n" * 20_000


# Found by this test: error messages quoted client-supplied names in full; past 16 KiB (1400
# accented characters: percent-encoding takes 6 bytes each) clients saw RESOURCE_EXHAUSTED 'received
# metadata size exceeds hard limit' instead of the real status, and between 8 and 16 KiB at random.
@pytest.mark.parametrize(
    "where",
    ["model name", "accented model name", "version label", "signature", "input name",
     "output filter", "v2 model name", "v2 datatype", "v2 input name"],
)  # fmt: skip
def test_long_names_get_their_real_status(ch, where):
    tf = prediction_service_pb2_grpc.PredictionServiceStub(ch)
    v2_stub = v2_grpc.GRPCInferenceServiceStub(ch)
    request = predict_request([SMALL_JPEG])
    expected = INVALID
    if where == "model name":
        request.model_spec.name, expected = LONG, NOT_FOUND
    elif where == "accented model name":  # 3000 characters: 18 KB once percent-encoded
        request.model_spec.name, expected = "é" * 3000, NOT_FOUND
    elif where == "version label":
        request.model_spec.version_label, expected = LONG, NOT_FOUND
    elif where == "signature":
        request.model_spec.signature_name, expected = LONG, grpc.StatusCode.FAILED_PRECONDITION
    elif where == "input name":
        request.inputs[LONG].CopyFrom(request.inputs.pop("images"))
    elif where == "output filter":
        request.output_filter.append(LONG)
    if not where.startswith("v2"):
        code, details, _ = status_of(tf.Predict, request)
    else:
        request = _infer()
        if where == "v2 model name":
            request.model_name, expected = LONG, NOT_FOUND
        elif where == "v2 datatype":
            request.inputs[0].datatype = LONG
        else:
            request.inputs[0].name = LONG
        code, details, _ = status_of(v2_stub.ModelInfer, request)
    assert code == expected, f"{code.name}: {details[:200]}"


def _poller_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "model-repository"}


# Found by this test, one bug per folder name: '²' passes isdigit() but int('²') raised ValueError
# in scan() and sync() caught only OSError, so the polling thread died on its first pass (nothing
# was ever served); '٢' (Arabic-Indic two) was served as version 2; a version past int64 became
# the latest and every Predict and GetModelStatus failed INTERNAL ('Value out of range').
@pytest.mark.parametrize(
    "folder", ["²", "٢", "99999999999999999999"], ids=["superscript two", "arabic-indic two",
                                                     "past int64"]
)  # fmt: skip
def test_odd_version_folders_are_ignored(tmp_path, archive, folder):
    root = tmp_path / "models"
    place(root, "tiny", "1", archive)
    place(root, "tiny", folder, archive)
    before = _poller_threads()
    config = ServerConfig(model_repository=root, poll_seconds=0.2)
    with running(config, wait=False) as server, channel(server) as ch:
        poller = _poller_threads() - before
        deadline = time.monotonic() + 120
        while not server.repository.wait_loaded(0.2):
            assert poller and all(t.is_alive() for t in poller), "the repository poller died"
            assert time.monotonic() < deadline, "the first load never finished"
        tf = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        code, details, reply = status_of(tf.Predict, predict_request([SMALL_JPEG]))
        assert code == OK, details
        assert reply.model_spec.version.value == 1
        code, details, reply = status_of(
            model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus, _status()
        )
        assert code == OK, details
        assert [s.version for s in reply.model_version_status] == [1]


# -- echoed metadata, concurrency, images that are huge in memory -----------------------------


@pytest.fixture(scope="module")
def plain_server(archive):
    with running(ServerConfig(archives=[archive])) as server:
        yield server


def _declaring(name: str, dims: list[int], **content) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tiny"
    tensor = request.inputs[name]
    tensor.dtype = types_pb2.DT_STRING if name == "images" else types_pb2.DT_FLOAT
    tensor.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims)
    for field, values in content.items():
        getattr(tensor, field).extend(values)
    return request


def _contextual_images(count: int) -> classification_pb2.ClassificationRequest:
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = "tiny"
    for _ in range(count):
        request.input.example_list_with_context.examples.add()  # 2 bytes each, no image
    return request


# Found in review: each of these requests is a few bytes (or, for the last two, packs millions of
# items into the message limit), and each cost the server seconds of CPU and hundreds of MiB
# before the item limit refused it: the tensor was expanded or decoded, and every image header
# parsed, first. They are now refused from their declared size, before anything is decoded.
HUGE_DECLARATIONS = [
    ("compact images", lambda: _declaring("images", [2**24], string_val=[SMALL_JPEG]),
     "more than one request may carry (64)"),
    ("compact floats", lambda: _declaring("preprocessed", [111, 224, 224, 3], float_val=[0.5]),
     "more than one request may carry (9633792)"),
    ("empty strings", lambda: _declaring("images", [10**6], string_val=[b""] * 10**6),
     "more than one request may carry (64)"),
    ("v2 raw BYTES", lambda: v2.ModelInferRequest(
        model_name="tiny", inputs=[v2.ModelInferRequest.InferInputTensor(
            name="images", datatype="BYTES", shape=[10**6])],
        raw_input_contents=[b"\0\0\0\0" * 10**6]),
     "more than one request may carry (64)"),
    ("examples sharing nothing", lambda: _contextual_images(65), "at most 64 images; got 65"),
]  # fmt: skip


@pytest.mark.parametrize("case", HUGE_DECLARATIONS, ids=[case[0] for case in HUGE_DECLARATIONS])
def test_requests_declaring_huge_tensors_are_refused_before_decoding(plain_server, case):
    _, make, fragment = case
    request = make()
    with channel(plain_server) as ch:
        if isinstance(request, v2.ModelInferRequest):
            call = v2_grpc.GRPCInferenceServiceStub(ch).ModelInfer
        elif isinstance(request, classification_pb2.ClassificationRequest):
            call = prediction_service_pb2_grpc.PredictionServiceStub(ch).Classify
        else:
            call = prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict
        code, details, _ = status_of(call, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and fragment in details, details


@pytest.mark.parametrize(
    ("sent", "echoed"),
    [("client-id-42", True), ("a b", True), ("x" * 128, True), ("x" * 129, False), ("", False)],
)
def test_request_ids_are_echoed_only_when_sane(plain_server, caplog, sent, echoed):
    """gRPC itself refuses control characters in metadata; the server bounds the rest."""
    caplog.set_level(logging.INFO, logger="fpgaserve")
    with channel(plain_server) as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        _, call = stub.Predict.with_call(
            predict_request([SMALL_JPEG]), timeout=30, metadata=[("x-request-id", sent)]
        )
    (request_id,) = [v for k, v in call.trailing_metadata() if k == "x-request-id"]
    assert (request_id == sent) == echoed
    assert request_id.isprintable() and 0 < len(request_id) <= 128
    access = eventually(
        lambda: [r for r in caplog.records if getattr(r, "method", None) == "Predict"]
    )
    assert [r.request_id for r in access] == [request_id]


@contextlib.contextmanager
def every_call_slot_held(archive):
    """A server with ``max_concurrent_calls=4`` whose four call slots are all held at a closed
    device gate; yields (channel, stub, scheduler, device, held calls); the gate opens and every
    held call is answered on the way out."""
    device = GatedDevice()
    config = ServerConfig(
        archives=[archive], max_concurrent_calls=4, batching=BatchingConfig(max_queue_size=8)
    )
    with (
        running(config, device) as server,
        channel(server) as ch,
        ThreadPoolExecutor(4) as pool,
    ):
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        scheduler = server.repository.get("tiny").scheduler
        device.gate.clear()
        held = [pool.submit(stub.Predict, predict_request([SMALL_JPEG]), timeout=60)
                for _ in range(4)]  # fmt: skip
        try:
            eventually(lambda: scheduler.in_flight == 4, timeout=30)
            yield ch, stub, scheduler, device, held
        finally:
            device.gate.set()
            for future in held:
                future.result()


def test_concurrent_call_limit_refuses_at_once_and_recovers(archive):
    """More concurrent calls than ``threads``: RESOURCE_EXHAUSTED at once, not a queue that
    grows; every accepted call is answered once the device catches up."""
    with every_call_slot_held(archive) as (_, stub, scheduler, device, held):
        started = time.monotonic()
        code, details, _ = status_of(stub.Predict, predict_request([SMALL_JPEG]), timeout=30)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert time.monotonic() - started < 20  # refused, not queued behind the held calls
        device.gate.set()
        assert all(len(f.result().outputs["output_alias"].float_val) == 10 for f in held)
        eventually(lambda: scheduler.in_flight == 0)
        code, details, _ = status_of(stub.Predict, predict_request([SMALL_JPEG]))
        assert code == OK, details


# Found by this test: maximum_concurrent_rpcs (ServerConfig.threads) counted health checks too, so
# with `threads` calls in progress Health/Check was refused RESOURCE_EXHAUSTED and the Kubernetes
# liveness probe (deploy/) failed under sustained load.
# Likewise readiness and metadata calls: KServe's readiness probe asks ModelReady.
def test_health_readiness_and_metadata_are_answered_while_every_call_slot_is_busy(archive):
    with every_call_slot_held(archive) as (ch, *_):
        check = health_pb2_grpc.HealthStub(ch).Check
        code, details, reply = status_of(check, health_pb2.HealthCheckRequest(), timeout=10)
        assert code == OK, f"{code.name}: {details}"
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        v2_stub = v2_grpc.GRPCInferenceServiceStub(ch)
        code, details, reply = status_of(v2_stub.ModelReady, v2.ModelReadyRequest(name="tiny"))
        assert code == OK and reply.ready, f"{code.name}: {details}"
        questions = [
            (v2_stub.ModelMetadata, v2.ModelMetadataRequest(name="tiny")),
            (prediction_service_pb2_grpc.PredictionServiceStub(ch).GetModelMetadata,
             get_model_metadata_pb2.GetModelMetadataRequest(
                 model_spec=model_pb2.ModelSpec(name="tiny"), metadata_field=["signature_def"])),
            (model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus,
             get_model_status_pb2.GetModelStatusRequest(
                 model_spec=model_pb2.ModelSpec(name="tiny"))),
        ]  # fmt: skip
        for call, request in questions:
            code, details, _ = status_of(call, request)
            assert code == OK, f"{type(request).__name__}: {code.name}: {details}"


# Found by review: reflection streams are not inference calls, so --max-concurrent-calls did not
# count them, yet each open one held a thread: with every call slot busy, 8 idle reflection
# streams (grpcurl-like tools left open) took the threads kept for health checks, and
# Health/Check was refused RESOURCE_EXHAUSTED.
def test_idle_reflection_streams_cannot_take_the_health_checks_threads(archive):
    with every_call_slot_held(archive) as (ch, *_), ThreadPoolExecutor(1) as pool:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        streams, refused = [], []
        for _ in range(RESERVED_THREADS):
            requests: queue.Queue = queue.Queue()
            answers = stub.ServerReflectionInfo(iter(requests.get, None), timeout=60)
            requests.put(ask)
            try:
                next(answers)  # the stream is open and idle, as a tool leaves it
                streams.append((requests, answers))
            except grpc.RpcError as exc:
                refused.append((exc.code(), exc.details()))
        assert _serving(ch)  # health keeps its threads
        assert len(streams) == REFLECTION_STREAMS < RESERVED_THREADS
        code, details = refused[0]
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "close one" in details, details

        requests, answers = streams.pop()
        answers.cancel()  # a client leaves: its slot is free again
        answers = eventually(lambda: _reflection_stream(stub, ask))
        assert answers.list_services_response.service
        for requests, answers in streams:
            requests.put(None)
            assert pool.submit(list, answers).result(timeout=30) == []


def _reflection_stream(stub, ask) -> reflection_pb2.ServerReflectionResponse:
    return next(stub.ServerReflectionInfo(iter([ask]), timeout=30))


def _serving(ch) -> bool:
    check = health_pb2_grpc.HealthStub(ch).Check
    code, _, reply = status_of(check, health_pb2.HealthCheckRequest(), timeout=5)
    return code == OK and reply.status == health_pb2.HealthCheckResponse.SERVING


def _capped_memory() -> None:  # runs in the server's child process before exec
    resource.setrlimit(resource.RLIMIT_AS, (5 << 30, 5 << 30))


# Found by this test: the pixel limit did not bound the aspect ratio and preprocessing resizes the
# shorter side to 256 before cropping: an 8000 x 1 PNG of 100 bytes became 256 x 2 048 000 floats (6
# GB); uncapped, a 4000 x 1 PNG took 4.6 GB and 6 s, and a few at once got the server OOM-killed;
# capped, the call failed INTERNAL (OOM).
@pytest.mark.slow
def test_tiny_images_with_extreme_aspect_ratios_cost_little(archive):
    """Run in a separate, memory-capped server process: in this one the bug would take the
    whole test run down."""
    port = free_port()
    env = {**os.environ, "FPGASERVE_PORT": str(port), "FPGASERVE_METRICS_PORT": "-1",
           "TF_CPP_MIN_LOG_LEVEL": "3"}  # fmt: skip
    server = subprocess.Popen(
        [*FPGASERVE, "serve", str(archive), "--host", "localhost"],
        env=env, stderr=subprocess.DEVNULL, preexec_fn=_capped_memory,
    )  # fmt: skip
    try:
        with grpc.insecure_channel(f"localhost:{port}") as ch:
            deadline = time.monotonic() + 120
            while not _serving(ch):
                assert server.poll() is None, "the capped server did not start"
                assert time.monotonic() < deadline, "the server never became SERVING"
                time.sleep(0.2)
            stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            code, details, _ = status_of(stub.Predict, predict_request([SMALL_JPEG]))
            assert code == OK, details  # the cap leaves room for ordinary work
            image = png(8000, 1)  # (1, 8000) too; each failing call takes TF's 10 s OOM retry
            assert len(image) < 1000
            code, details, _ = status_of(stub.Predict, predict_request([image]))
            assert code in (OK, INVALID), f"{code.name}: {details}"
            code, details, _ = status_of(stub.Predict, predict_request([SMALL_JPEG]))
            assert code == OK, details
    finally:
        server.kill()
        server.wait(30)
