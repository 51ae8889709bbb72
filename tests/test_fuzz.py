"""Fuzzing: malformed requests against the real server (both protocols, real sockets) and
damaged service definition archives against the Step 3 loader.

Every malformed request must get its documented status (docs/serving.md, "Errors") and the server
must keep serving with flat memory; the loader must refuse a damaged archive with
``ArchiveError`` or load it correctly, and never write outside the folder it extracts to.

Bugs these tests found keep their smallest reproduction as an ``@example`` (explicit examples
run first, whatever the search does) and a comment that says what went wrong. A bug found and not
yet fixed is a strict xfail whose reason names it.

Atheris (coverage-guided) runs the image header and raw BYTES parsers when it is installed:
``python tests/test_fuzz.py --atheris -runs=N`` is what the test starts in a subprocess.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from servers import channel, jpeg, png, rss_bytes, running, status_of
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from test_server import predict_request

from fpgaserve.pipeline import ArchiveError, Pipeline, read_manifest
from fpgaserve.pipeline.archive import extract
from fpgaserve.protos import grpc_predict_v2_pb2 as v2
from fpgaserve.protos import grpc_predict_v2_pb2_grpc as v2_grpc
from fpgaserve.server import ServerConfig
from fpgaserve.server.images import image_size

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
# What the server answers on purpose; INTERNAL and UNKNOWN mean a bug (docs/serving.md).
DOCUMENTED = {
    OK,
    INVALID,
    NOT_FOUND,
    PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}

MAX_PIXELS = 1_000_000  # lower than the default so that a real decodable bomb stays small
QUEUE = 64  # the default max_queue_size: a request may carry at most this many images
OUTPUTS = ("features", "probabilities")
PIXELS = (224, 224, 3)
RELAXED = settings(
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ]
)


# -- the server under fuzz ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(archive):
    with running(ServerConfig(archives=[archive], max_image_pixels=MAX_PIXELS)) as server:
        yield server


@pytest.fixture(scope="module")
def ch(server):
    with channel(server) as ch:
        yield ch


@pytest.fixture(scope="module")
def tf_stub(ch):
    return prediction_service_pb2_grpc.PredictionServiceStub(ch)


@pytest.fixture(scope="module")
def v2_stub(ch):
    return v2_grpc.GRPCInferenceServiceStub(ch)


SMALL_JPEG = jpeg(7, size=(24, 32))


def assert_still_serving(tf_stub) -> None:
    code, details, reply = status_of(tf_stub.Predict, predict_request([SMALL_JPEG]))
    assert code == OK, f"the server stopped serving: {code.name} {details}"
    assert reply.outputs["output_alias"].tensor_shape.dim[1].size == 10


# -- images --------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` (RGB, 8 bit), with ``idat`` as its data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = _chunk(b"IHDR", ihdr) + (_chunk(b"IDAT", idat) if idat else b"")
    return b"\x89PNG\r\n\x1a\n" + chunks + _chunk(b"IEND", b"")


def with_declared_size(image: bytes, width: int, height: int) -> bytes:
    """The same image bytes with the size in its header (PNG IHDR, JPEG SOF0) rewritten."""
    data = bytearray(image)
    if image.startswith(b"\x89PNG"):
        struct.pack_into(">II", data, 16, width, height)
        struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
        return bytes(data)
    offset = 2
    while image[offset + 1] not in (0xC0, 0xC1, 0xC2):  # walk the segments to the frame header
        (length,) = struct.unpack_from(">H", image, offset + 2)
        offset += 2 + length
    struct.pack_into(">HH", data, offset + 5, height, width)
    return bytes(data)


def with_extraneous_bytes(image: bytes, junk: bytes) -> bytes:
    """``image`` (a JPEG) with ``junk`` after its first segment, bytes 0xFF left out (libjpeg
    reads a 0xFF as a marker): what some cameras and editors write."""
    cut = 4 + struct.unpack_from(">H", image, 4)[0]
    return image[:cut] + junk.replace(b"\xff", b"") + image[cut:]


GOOD_IMAGES = (SMALL_JPEG, png(20, 12, seed=2), jpeg(3, size=(300, 200)))
BAD_IMAGES = (
    b"",
    b"GIF89a" + b"\0" * 20,
    b"\xff\xd8\xff",
    png_declaring(100_000, 100_000),
    with_declared_size(SMALL_JPEG, 65535, 65535),
    png(1001, 1000),  # a real decompression bomb (3 KB -> 3 MB) just over the pixel limit
    jpeg(1)[:200],  # the header is intact, the data is not
    b"\x89PNG\r\n\x1a\n",
)


# -- wire tensors: one protocol-neutral description, an oracle, and both encodings -------------

TF_FLOATS = {types_pb2.DT_FLOAT: "<f4", types_pb2.DT_DOUBLE: "<f8", types_pb2.DT_HALF: "<f2"}
V2_FLOATS = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2"}
TF_OTHER = sorted(set(types_pb2.DataType.values()) - {types_pb2.DT_STRING, *TF_FLOATS})
V2_OTHER = ["INT8", "INT16", "INT32", "INT64", "UINT8", "UINT64", "BOOL", "BF16", "fp32", "bytes"]


@dataclass
class Wire:
    """One request tensor as the fuzzer chose it."""

    name: str
    kind: str  # "bytes", "float" or "other"
    dtype: int | str  # TF DataType or v2 datatype
    dims: list[int] | None  # None: unknown rank (TF only)
    items: list[bytes] = field(default_factory=list)  # bytes tensors
    values: np.ndarray | None = None  # float tensors: the flat values sent, in the wire dtype
    raw: bool = True  # TF tensor_content / v2 raw_input_contents, else typed values
    junk: bytes = b""  # "other" tensors: their content

    def count(self) -> int | None:
        if self.dims is None or any(d < 0 for d in self.dims):
            return None
        return math.prod(self.dims)


@dataclass
class Case:
    tensors: list[Wire]
    outputs: list[str]
    extra_raw: bool = False  # v2: one raw_input_contents entry more than inputs


def finite_as_float32(values: np.ndarray) -> bool:
    with np.errstate(over="ignore"):  # FP64 past float32's range becomes inf: refused
        return bool(np.isfinite(values.astype(np.float32)).all())


def acceptable(case: Case, protocol: str) -> bool:
    """What docs/serving.md promises: OK only for one well-formed input of a known name, with
    every image a JPEG/PNG that decodes and every float finite; INVALID_ARGUMENT otherwise."""
    if len(case.tensors) != 1 or case.extra_raw or not set(case.outputs) <= set(OUTPUTS):
        return False
    if len(set(case.outputs)) != len(case.outputs):  # an output named twice
        return False
    (t,) = case.tensors
    count = t.count()
    if count is None or t.kind == "other":
        return False
    # TensorFlow's compact encoding: typed values may stop early, the last one repeats.
    compact = protocol == "tf" and (t.kind == "bytes" or not t.raw)
    sent = len(t.items) if t.kind == "bytes" else len(t.values)
    filled = 0 < sent <= count if compact else sent == count
    if t.kind == "bytes":
        return (
            t.name == "images"
            and len(t.dims) == 1
            and filled
            and 1 <= count <= QUEUE
            and all(item in GOOD_IMAGES for item in t.items)
        )
    if protocol == "v2" and t.dtype == "FP16" and not t.raw:
        return False  # FP16 travels only as raw contents
    return (
        t.name == "preprocessed"
        and filled
        and len(t.dims) == 4
        and tuple(t.dims[1:]) == PIXELS
        and 1 <= t.dims[0] <= QUEUE
        and finite_as_float32(t.values)
    )


def tf_request(case: Case) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tiny"
    request.output_filter.extend(case.outputs)
    for t in case.tensors:
        tensor = tensor_pb2.TensorProto(dtype=t.dtype)
        if t.dims is None:
            tensor.tensor_shape.unknown_rank = True
        else:
            tensor.tensor_shape.dim.extend(
                tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in t.dims
            )
        if t.kind == "bytes":
            tensor.string_val.extend(t.items)
        elif t.kind == "other":
            tensor.tensor_content = t.junk
        elif t.raw:
            tensor.tensor_content = t.values.tobytes()
        elif t.dtype == types_pb2.DT_HALF:
            tensor.half_val.extend(t.values.view("<u2").astype(int).tolist())
        elif t.dtype == types_pb2.DT_DOUBLE:
            tensor.double_val.extend(t.values.tolist())
        else:
            tensor.float_val.extend(t.values.tolist())
        request.inputs[t.name].CopyFrom(tensor)
    return request


def v2_request(case: Case) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name="tiny")
    for name in case.outputs:
        request.outputs.add(name=name)
    raws = []
    for t in case.tensors:
        tensor = request.inputs.add(name=t.name, datatype=t.dtype, shape=t.dims or [])
        if t.kind == "bytes":
            if t.raw:
                raws.append(b"".join(struct.pack("<I", len(i)) + i for i in t.items))
            else:
                tensor.contents.bytes_contents.extend(t.items)
        elif t.kind == "other":
            raws.append(t.junk)
        elif t.raw:
            raws.append(t.values.tobytes())
        elif t.dtype == "FP64":
            tensor.contents.fp64_contents.extend(t.values.tolist())
        else:
            tensor.contents.fp32_contents.extend(t.values.astype("<f4").tolist())
    if case.extra_raw:
        raws.append(b"")  # one entry more than the inputs that take raw contents
    request.raw_input_contents.extend(raws)
    return request


MODERATE_DIMS = st.lists(
    st.one_of(st.sampled_from([0, 1, 2, 3, 224]), st.integers(-2, 70)), max_size=5
)
# What a case may get wrong. A case starts well formed and breaks up to two of these, or breaks
# everything at once (random tensors): both the refusals and the answers get exercised.
FLAWS = ["kind", "name", "dims", "fill", "content", "raw", "count", "outputs", "extra raw"]


@st.composite
def flaws(draw) -> set[str]:
    if draw(st.integers(0, 3)) == 0:
        return set(FLAWS)
    return set(draw(st.lists(st.sampled_from(FLAWS), max_size=2)))


@st.composite
def wire_tensor(draw, protocol: str, broken: set[str]) -> Wire:
    kinds = ["bytes", "float", "other"] if "kind" in broken else ["bytes", "float"]
    kind = draw(st.sampled_from(kinds))
    if "name" in broken:
        names = ["images", "preprocessed", "pixels", "", "IMAGES"]
        name = draw(st.one_of(st.sampled_from(names), st.text(max_size=8)))
    else:
        name = "images" if kind == "bytes" else "preprocessed"
    if kind == "bytes":
        dtype = types_pb2.DT_STRING if protocol == "tf" else "BYTES"
    elif kind == "float":
        dtype = draw(st.sampled_from(sorted(TF_FLOATS) if protocol == "tf" else sorted(V2_FLOATS)))
    elif protocol == "tf":
        dtype = draw(st.sampled_from(TF_OTHER))  # unnamed enum values: a test of their own
    else:
        dtype = draw(st.one_of(st.sampled_from(V2_OTHER), st.text(max_size=6)))
        assume(dtype not in ("BYTES", *V2_FLOATS))

    n = draw(st.sampled_from([1, 2, 3, 0, QUEUE + 1] if "dims" in broken else [1, 2, 3]))
    canonical = [n] if kind == "bytes" else [n, *PIXELS]
    if "dims" not in broken:
        dims = canonical
    elif protocol == "tf" and draw(st.integers(0, 9)) == 0:
        dims = None
    else:
        dims = draw(st.one_of(st.just(canonical), MODERATE_DIMS))
    count = 0 if dims is None or any(d < 0 for d in dims) else math.prod(dims)
    size = count + (draw(st.sampled_from([-1, 1, -count])) if "fill" in broken else 0)
    raw = draw(st.booleans())
    if protocol == "v2" and dtype == "FP16" and "raw" not in broken:
        raw = True
    wire = Wire(name, kind, dtype, dims, raw=raw)
    if kind == "bytes":
        size = max(size, 0) if size <= 8 else draw(st.integers(0, 3))
        pool = GOOD_IMAGES + BAD_IMAGES if "content" in broken else GOOD_IMAGES
        wire.items = [draw(st.sampled_from(pool)) for _ in range(size)]
    elif kind == "float":
        size = max(size, 0) if size <= 3 * math.prod(PIXELS) else draw(st.integers(0, 64))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        scales = [1.0, 3.0, 1e5, 1e39] if "content" in broken else [1.0, 3.0]
        values = rng.standard_normal(size) * draw(st.sampled_from(scales))
        poisons = [None, np.nan, np.inf, -np.inf] if "content" in broken else [None]
        poison = draw(st.sampled_from(poisons))
        if poison is not None and size:
            values[rng.integers(0, size, draw(st.integers(1, 3)))] = poison
        wide = {**TF_FLOATS, **V2_FLOATS}[dtype]
        with np.errstate(over="ignore"):
            wire.values = values.astype(wide)
    else:
        wire.junk = draw(st.binary(max_size=64))
    return wire


@st.composite
def wire_case(draw, protocol: str) -> Case:
    broken = draw(flaws())
    count = draw(st.sampled_from([0, 1, 2])) if "count" in broken else 1
    tensors = [draw(wire_tensor(protocol, broken)) for _ in range(count)]
    if protocol == "tf":  # inputs is a map: the last tensor of a name wins
        tensors = list({t.name: t for t in tensors}.values())
    if "outputs" in broken:
        names = st.one_of(st.sampled_from(OUTPUTS), st.text(max_size=6))
    else:
        names = st.sampled_from(OUTPUTS)
    outputs = draw(st.lists(names, max_size=2))
    extra_raw = protocol == "v2" and "extra raw" in broken and draw(st.booleans())
    return Case(tensors, outputs, extra_raw)


def check_answer(code, details, case: Case, protocol: str, reply) -> None:
    expected = OK if acceptable(case, protocol) else INVALID
    event(f"answered {code.name}")
    assert code == expected, f"{code.name} ({details}); expected {expected.name}"
    if code != OK:
        return
    (t,) = case.tensors
    batch = t.dims[0]
    wanted = case.outputs or (["output_alias"] if protocol == "tf" else list(OUTPUTS))
    if protocol == "tf":
        shapes = {k: [d.size for d in v.tensor_shape.dim] for k, v in reply.outputs.items()}
    else:
        shapes = {o.name: list(o.shape) for o in reply.outputs}
    widths = {"features": 8, "probabilities": 10, "output_alias": 10}
    assert shapes == {name: [batch, widths[name]] for name in wanted}


# The server's own FP64 -> float32 cast warns before the non-finite result is refused.
OVERFLOW_WARNING = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


@OVERFLOW_WARNING
@RELAXED
@given(case=wire_case("tf"))
def test_tf_serving_tensors(tf_stub, case):
    """Wrong dtypes, shapes, ranks, element counts, NaN/Inf, empty batches, unknown inputs and
    outputs, bad images: INVALID_ARGUMENT each, OK for what is well formed."""
    code, details, reply = status_of(tf_stub.Predict, tf_request(case))
    check_answer(code, details, case, "tf", reply)
    assert_still_serving(tf_stub)


@OVERFLOW_WARNING
@RELAXED
@given(case=wire_case("v2"))
def test_kserve_v2_tensors(tf_stub, v2_stub, case):
    request = v2_request(case)
    code, details, reply = status_of(v2_stub.ModelInfer, request)
    check_answer(code, details, case, "v2", reply)
    assert_still_serving(tf_stub)


# Found by this test: an empty tensor whose other dimensions multiply past int64 (shape [0, 2**62,
# 2**62]) made numpy's reshape raise ValueError in fpgaserve/wire.py: INTERNAL.
@RELAXED
@example(dims=[0, 2**62, 2**62], protocol="tf", kind="float")
@example(dims=[0, 2**63 - 1, 2**63 - 1], protocol="v2", kind="bytes")
@given(
    dims=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=6),
    protocol=st.sampled_from(["tf", "v2"]),
    kind=st.sampled_from(["bytes", "float"]),
)
def test_extreme_dimensions_are_invalid_arguments(tf_stub, v2_stub, dims, protocol, kind):
    """Declared shapes anywhere in int64 with little or no content: never a valid tensor."""
    name = "images" if kind == "bytes" else "preprocessed"
    dtype = {("tf", "bytes"): types_pb2.DT_STRING, ("tf", "float"): types_pb2.DT_FLOAT,
             ("v2", "bytes"): "BYTES", ("v2", "float"): "FP32"}[protocol, kind]  # fmt: skip
    wire = Wire(name, kind, dtype, dims, raw=False, values=np.zeros(0, "<f4"))
    case = Case([wire], [])
    if protocol == "tf":
        code, details, _ = status_of(tf_stub.Predict, tf_request(case))
    else:
        code, details, _ = status_of(v2_stub.ModelInfer, v2_request(case))
    assert code == INVALID, f"{code.name}: {details}"
    assert_still_serving(tf_stub)


NAMED_DTYPES = set(types_pb2.DataType.values())


# Found by this test: a dtype that is no named DataType (proto3 enums are open: -1 parses) made
# wire.py's error message call DataType.Name(), which raised ValueError: INTERNAL.
@RELAXED
@example(dtype=-1)
@given(dtype=st.integers(-(2**31), 2**31 - 1).filter(lambda d: d not in NAMED_DTYPES))
def test_unnamed_tf_dtypes_are_invalid_arguments(tf_stub, dtype):
    wire = Wire("images", "other", dtype, [1], junk=b"\0" * 8)
    code, details, _ = status_of(tf_stub.Predict, tf_request(Case([wire], [])))
    assert code == INVALID, f"{code.name}: {details}"
    assert_still_serving(tf_stub)


# -- routing: model names, versions, labels, signatures ---------------------------------------

NAMES = st.one_of(
    st.sampled_from(["", "tiny", "tiny", "Tiny", "tiny ", "../tiny"]), st.text(max_size=64)
)


def routed(name: str, version: int | None, label: str) -> grpc.StatusCode:
    """TF Serving's model_spec: the one model answers an empty name."""
    if name not in ("", "tiny") or label or (version is not None and version != 1):
        return NOT_FOUND
    return OK


@RELAXED
@given(
    name=NAMES,
    version=st.one_of(st.none(), st.just(1), st.integers(-(2**63), 2**63 - 1)),
    label=st.one_of(st.just(""), st.text(max_size=16)),
    signature=st.one_of(
        st.sampled_from(["", "serving_default", "preprocessed"]), st.text(max_size=16)
    ),
    method=st.sampled_from(["Predict", "Classify", "GetModelMetadata", "GetModelStatus"]),
)
def test_tf_serving_routing(ch, tf_stub, name, version, label, signature, method):
    if version is not None:
        label = ""  # version and version_label are one oneof: the version set last wins
    spec = {"name": name, "signature_name": signature, "version_label": label}
    expected = routed(name, version, label)
    if method == "Predict":
        request = predict_request([SMALL_JPEG], model=name, signature_name=signature)
    elif method == "Classify":
        request = classification_pb2.ClassificationRequest()
        request.input.example_list.examples.add().features.feature[
            "images"
        ].bytes_list.value.append(SMALL_JPEG)
    elif method == "GetModelMetadata":
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    else:
        request = get_model_status_pb2.GetModelStatusRequest()
        spec = {"name": name}  # a status call reads the name and the version only
        expected = routed(name, version, "")
        if not name:
            expected = INVALID  # a status call names its model
    for key, value in spec.items():
        setattr(request.model_spec, key, value)
    if version is not None:
        request.model_spec.version.value = version
    if expected == OK and method in ("Predict", "Classify"):
        if signature not in ("", "serving_default", "preprocessed"):
            expected = PRECONDITION
        elif signature == "preprocessed":
            expected = INVALID  # that signature takes the float input, not images
    if method == "GetModelStatus":
        call = model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus
    else:
        call = getattr(tf_stub, method)
    code, details, _ = status_of(call, request)
    event(f"answered {code.name}")
    assert code == expected, f"{method}: {code.name} ({details}); expected {expected.name}"
    assert_still_serving(tf_stub)


def v2_routed(name: str, version: str) -> grpc.StatusCode:
    """The version string is read first (ASCII digits, a value of 1 or more), then the name (an
    empty one: the only model). Compared as text: int() refuses more than 4300 digits."""
    if version and not (version.isascii() and version.isdigit() and version.strip("0")):
        return INVALID
    if name not in ("", "tiny"):
        return NOT_FOUND
    return OK if not version or version.lstrip("0") == "1" else NOT_FOUND


ASCII_VERSIONS = st.one_of(
    st.sampled_from(["", "1", "01", "2", "0", "-1", " 1", "1 ", "1.0", "+1", "0x1", "1e0"]),
    st.integers(-(10**30), 10**30).map(str),
    st.text(alphabet="0123456789 -+.", max_size=24),
)


def check_v2_routing(tf_stub, v2_stub, name: str, version: str, method: str) -> None:
    expected = v2_routed(name, version)
    if method == "ModelInfer":
        request = v2.ModelInferRequest(model_name=name, model_version=version)
        tensor = request.inputs.add(name="images", datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(SMALL_JPEG)
    elif method == "ModelMetadata":
        request = v2.ModelMetadataRequest(name=name, version=version)
    else:
        request = v2.ModelReadyRequest(name=name, version=version)
        if expected == NOT_FOUND:
            expected = OK  # an unknown model or version is simply not ready, as Triton answers
    code, details, reply = status_of(getattr(v2_stub, method), request)
    event(f"answered {code.name}")
    assert code == expected, f"{method}: {code.name} ({details}); expected {expected.name}"
    if method == "ModelReady" and code == OK:
        assert reply.ready == (v2_routed(name, version) == OK)
    assert_still_serving(tf_stub)


@RELAXED
@given(
    name=NAMES,
    version=ASCII_VERSIONS,
    method=st.sampled_from(["ModelInfer", "ModelMetadata", "ModelReady"]),
)
def test_kserve_v2_routing(tf_stub, v2_stub, name, version, method):
    check_v2_routing(tf_stub, v2_stub, name, version, method)


# Found by this test: '²' passes str.isdigit() but int('²') raised ValueError (INTERNAL), so did a
# version of more than 4300 digits (Python's int-string limit), and '١' was taken as version 1.
@RELAXED
@example(version="²", method="ModelMetadata")
@example(version="9" * 5000, method="ModelInfer")
@example(version="١", method="ModelReady")
@example(version="0" * 30 + "1", method="ModelMetadata")
@given(
    version=st.one_of(ASCII_VERSIONS, st.text(max_size=8)),
    method=st.sampled_from(["ModelInfer", "ModelMetadata", "ModelReady"]),
)
def test_kserve_v2_version_strings(tf_stub, v2_stub, version, method):
    check_v2_routing(tf_stub, v2_stub, "tiny", version, method)


# Found by this test: a zero-padded v2 version past 4300 characters raised ValueError in
# int() (INTERNAL).
@RELAXED
@example(zeros=5000, one=False, method="ModelInfer")
@example(zeros=5000, one=True, method="ModelMetadata")
@given(
    zeros=st.integers(4300, 20_000),
    one=st.booleans(),
    method=st.sampled_from(["ModelInfer", "ModelMetadata", "ModelReady"]),
)
def test_kserve_v2_zero_padded_versions(tf_stub, v2_stub, zeros, one, method):
    check_v2_routing(tf_stub, v2_stub, "tiny", "0" * zeros + ("1" if one else ""), method)


# -- bytes that are not a message at all -------------------------------------------------------


def _raw_call(ch, method: str):
    return ch.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)


def _non_utf8(message, field_value: str) -> bytes:
    """``message`` serialized with ``field_value`` (ASCII) replaced by invalid UTF-8."""
    data = message.SerializeToString()
    assert data.count(field_value.encode()) == 1
    return data.replace(field_value.encode(), field_value.encode()[:-1] + b"\xff")


PREDICT_BYTES = predict_request([SMALL_JPEG], model="tinx").SerializeToString()
INFER = v2.ModelInferRequest(model_name="tinx")
INFER.inputs.add(name="images", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
    SMALL_JPEG
)
INFER_BYTES = INFER.SerializeToString()
RAW_METHODS = {
    "predict": "/tensorflow.serving.PredictionService/Predict",
    "infer": "/inference.GRPCInferenceService/ModelInfer",
}


# Found by this test: a request that does not parse (corrupt bytes, a model name that is not UTF-8)
# was answered INTERNAL 'Exception deserializing request!' by grpcio.
@RELAXED
@example(target="predict", data=_non_utf8(predict_request([SMALL_JPEG], model="tinx"), "tinx"))
@example(target="infer", data=_non_utf8(INFER, "tinx"))
@given(
    target=st.sampled_from(sorted(RAW_METHODS)),
    data=st.one_of(
        st.binary(max_size=256),
        st.tuples(
            st.sampled_from([PREDICT_BYTES, INFER_BYTES]),
            st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=4),
            st.floats(0, 1),
        ).map(lambda args: _mutate(*args)),
    ),
)
def test_bytes_that_are_not_a_request(ch, tf_stub, target, data):
    code, details, _ = status_of(_raw_call(ch, RAW_METHODS[target]), data)
    assert code in DOCUMENTED, f"{code.name}: {details}"
    assert_still_serving(tf_stub)


def _mutate(data: bytes, flips: list[tuple[float, int]], keep: float) -> bytes:
    mutated = bytearray(data)
    for where, mask in flips:
        mutated[int(where * len(mutated))] ^= mask
    return bytes(mutated[: max(1, int(keep * len(mutated)))])


# -- images: truncated, corrupt, lying headers, bombs ------------------------------------------


def affordable(image: bytes) -> bool:
    """Whether decoding and resizing ``image`` stays cheap. Past the pixel limit or the aspect
    ratio limit the header check refuses it; an extreme aspect ratio used to cost gigabytes in
    the resize (test_hostile.py::test_tiny_images_with_extreme_aspect_ratios_cost_little checks
    it in a memory-capped process). Should that regress, this in-process fuzz must not take the
    test run down with it: such images are left out here."""
    size = image_size(image)
    if size is None or size[0] * size[1] > MAX_PIXELS or 0 in size:
        return True
    return max(size) <= 32 * min(size)


@st.composite
def hostile_image(draw) -> tuple[bytes, bool | None]:
    """(image, valid): valid True/False when known, None when either answer is right (a
    corrupt image may still decode)."""
    base = draw(st.sampled_from(GOOD_IMAGES))
    how = draw(
        st.sampled_from(["flip", "truncate", "declare", "prefix", "extraneous", "known bad"])
    )
    if how == "known bad":
        return draw(st.sampled_from(BAD_IMAGES)), False
    if how == "extraneous":  # bytes between two JPEG segments: libjpeg skips them and decodes
        return with_extraneous_bytes(SMALL_JPEG, draw(st.binary(min_size=1, max_size=8))), True
    if how == "flip":
        data = bytearray(base)
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        assume(affordable(bytes(data)))
        return bytes(data), None
    if how == "truncate":
        cut = draw(st.integers(0, len(base) - 1))
        return base[:cut], False if cut < 8 else None
    if how == "prefix":
        data = draw(st.binary(min_size=1, max_size=16)) + base
        assume(affordable(data))
        return data, None
    width = draw(st.one_of(st.integers(0, 65535), st.sampled_from([0, 1, 1000, 1001])))
    height = draw(st.one_of(st.integers(0, 65535), st.sampled_from([0, 1, 1000])))
    too_big = width * height > MAX_PIXELS or 0 in (width, height)
    data = with_declared_size(base, width, height)
    assume(affordable(data))
    return data, False if too_big else None


# Found by review: the header check gave up at the first byte that was not a marker and refused
# JPEGs with extraneous bytes between segments, which libjpeg (and so TF Serving) decodes.
@RELAXED
@given(image=hostile_image())
def test_the_header_check_reads_the_size_the_decoder_decodes(image):
    """The pixel limit holds only if the header check finds the frame the decoder decodes:
    whatever it accepts and TensorFlow decodes has the size it read."""
    import tensorflow as tf

    data, _ = image
    size = image_size(data)
    assume(size is not None and 0 < size[0] * size[1] <= MAX_PIXELS)
    try:
        decoded = tf.io.decode_image(data, channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError:
        return
    assert size == (decoded.shape[1], decoded.shape[0])


@RELAXED
@given(image=hostile_image(), position=st.integers(0, 2), protocol=st.sampled_from(["tf", "v2"]))
def test_hostile_images(tf_stub, v2_stub, image, position, protocol):
    """Truncated or corrupt JPEG/PNG, huge declared dimensions, bombs: INVALID_ARGUMENT, or OK
    when the damage still decodes, alone or among good images."""
    data, valid = image
    images = [GOOD_IMAGES[0], GOOD_IMAGES[1]]
    images.insert(position, data)
    if protocol == "tf":
        code, details, reply = status_of(tf_stub.Predict, predict_request(images))
    else:
        request = v2.ModelInferRequest(model_name="tiny")
        tensor = request.inputs.add(name="images", datatype="BYTES", shape=[len(images)])
        tensor.contents.bytes_contents.extend(images)
        code, details, reply = status_of(v2_stub.ModelInfer, request)
    allowed = {OK, INVALID} if valid is None else {OK if valid else INVALID}
    event(f"answered {code.name}")
    assert code in allowed, f"{code.name}: {details}"
    if code == OK:
        if protocol == "tf":
            assert [d.size for d in reply.outputs["output_alias"].tensor_shape.dim] == [3, 10]
        else:
            probabilities = np.frombuffer(reply.raw_output_contents[1], "<f4").reshape(3, 10)
            np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-4)
    assert_still_serving(tf_stub)


def test_decompression_bombs_cost_neither_memory_nor_an_error(tf_stub):
    """A PNG that declares 16 x 16 pixels but carries 64 MiB of zeros in its data, and real bombs
    past the pixel limit: refused from the header or decoded without inflating everything."""
    lying = png_declaring(16, 16, zlib.compress(b"\0" * (64 << 20), 9))
    assert len(lying) < 100_000
    before = rss_bytes()
    for image, allowed in [
        (lying, {OK, INVALID}),
        (png(1001, 1000), {INVALID}),
        (png_declaring(2**31 - 1, 2**31 - 1), {INVALID}),
        (with_declared_size(GOOD_IMAGES[0], 65535, 65535), {INVALID}),
    ]:
        code, details, _ = status_of(tf_stub.Predict, predict_request([image]))
        assert code in allowed, f"{code.name}: {details}"
        assert code == OK or "pixels" in details or "could not be processed" in details
    assert rss_bytes() - before < 48 << 20
    assert_still_serving(tf_stub)


def test_memory_stays_flat_under_malformed_requests(tf_stub, v2_stub):
    """About 200 MB of refused payload: a leak of one request's bytes shows up as 100+ MiB."""
    nan = np.zeros((1, *PIXELS), np.float32)
    nan[0, 100, 100, 1] = np.nan
    junk_image = b"\xff\xd8" + os.urandom(1 << 20)
    corrupt = with_declared_size(jpeg(5, size=(900, 1000)), 1000, 900)[:-5000]

    def round_of_bad_requests():
        for request, call in [
            (_float_request(nan), tf_stub.Predict),
            (predict_request([junk_image]), tf_stub.Predict),
            (predict_request([corrupt]), tf_stub.Predict),
            (_v2_float_request(nan), v2_stub.ModelInfer),
        ]:
            code, details, _ = status_of(call, request)
            assert code == INVALID, f"{code.name}: {details}"

    for _ in range(15):  # warm-up: allocator pools, TensorFlow's caches, gRPC buffers
        round_of_bad_requests()
    before = rss_bytes()
    for _ in range(60):
        round_of_bad_requests()
    growth = rss_bytes() - before
    print(f"RSS growth over 240 malformed requests: {growth / 2**20:.1f} MiB")
    assert growth < 96 << 20, f"RSS grew {growth / 2**20:.0f} MiB"
    assert_still_serving(tf_stub)


def _float_request(array: np.ndarray) -> predict_pb2.PredictRequest:
    case = Case([Wire("preprocessed", "float", types_pb2.DT_FLOAT, list(array.shape))], [])
    case.tensors[0].values = array.astype("<f4").ravel()
    return tf_request(case)


def _v2_float_request(array: np.ndarray) -> v2.ModelInferRequest:
    case = Case([Wire("preprocessed", "float", "FP32", list(array.shape))], [])
    case.tensors[0].values = array.astype("<f4").ravel()
    return v2_request(case)


# -- the archive loader --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(archive) -> dict[str, bytes]:
    """The tiny archive's members, manifest first, as the loader's input to mutate."""
    with zipfile.ZipFile(archive) as z:
        return {info.filename: z.read(info) for info in z.infolist()}


def build_zip(members: dict[str, bytes], link: str | None = None) -> bytes:
    """A deflated zip of ``members``; ``link`` names one to mark as a symbolic link."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            if name == link:
                info.external_attr = 0o120777 << 16
            z.writestr(info, data)
    return buffer.getvalue()


def with_manifest(members: dict[str, bytes], manifest: dict | str) -> dict[str, bytes]:
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    return {**members, "manifest.json": text.encode()}


def edited(members: dict[str, bytes], path: tuple, value) -> dict[str, bytes]:
    manifest = json.loads(members["manifest.json"])
    apply_edit(manifest, path, value)
    return with_manifest(members, manifest)


def resigned(members: dict[str, bytes]) -> dict[str, bytes]:
    """Members with the manifest's checksums recomputed: damage that a careless or hostile
    build tool would ship."""
    manifest = json.loads(members["manifest.json"])
    manifest["members"] = {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        for name, data in members.items()
        if name != "manifest.json"
    }
    return with_manifest(members, manifest)


class Sandbox:
    """A scratch folder for one archive: the archive, the extraction target three levels down
    (so that ``../`` names land inside the sandbox), and an ``outside`` folder that absolute
    member names point at. Anything written outside the target is found afterwards."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.archive = root / "model.zip"
        self.target = root / "a" / "b" / "target"
        self.outside = root / "outside"
        self.target.parent.mkdir(parents=True)

    def name(self, pattern: str) -> str:
        return pattern.replace("{ABS}", str(self.outside))

    def assert_contained(self) -> None:
        allowed = {self.archive, self.target, self.target.parent, self.target.parent.parent}
        stray = [
            path
            for path in self.root.rglob("*")
            if path not in allowed and self.target not in path.parents
        ]
        assert not stray, f"files written outside the extraction folder: {stray[:5]}"
        links = [path for path in self.target.rglob("*") if path.is_symlink()]
        assert not links, f"extraction made symbolic links: {links[:5]}"


def sample_for(spec) -> object:
    """A batch of one for a stage input: a JPEG for strings, zeros for floats."""
    if spec.dtype == "string":
        return [SMALL_JPEG]
    return np.zeros((1, *[d if isinstance(d, int) else 1 for d in spec.shape[1:]]), np.float32)


def check_loader(data: bytes, pipeline_too: bool = True) -> str:
    """The loader's contract on one archive: ``read_manifest``, ``extract`` and
    ``Pipeline.load`` each refuse it with ArchiveError or succeed, nothing is written outside
    the target folder, and what loads runs and answers what its manifest declares."""
    with tempfile.TemporaryDirectory() as scratch:
        sandbox = Sandbox(Path(scratch))
        sandbox.archive.write_bytes(data)
        try:
            try:
                read_manifest(sandbox.archive)
            except ArchiveError:
                with pytest.raises(ArchiveError):  # extract checks all read_manifest does
                    extract(sandbox.archive, sandbox.target)
                return "refused"
            try:
                extract(sandbox.archive, sandbox.target)
            except ArchiveError:
                return "refused"
        finally:
            sandbox.assert_contained()
        if not pipeline_too:
            return "extracted"
        try:
            pipeline = Pipeline.load(sandbox.archive)
        except ArchiveError:
            return "refused"
        with pipeline:
            first, last = pipeline.stages[0]["input"], pipeline.stages[-1]["output"]
            outputs = pipeline.run({pipeline.input_name: sample_for(first)})
            result = outputs[last.name]
            assert result.dtype == np.float32 and result.shape[0] == 1
            assert len(result.shape) == len(last.shape), (result.shape, last.shape)
            fixed = [(a, b) for a, b in zip(result.shape[1:], last.shape[1:], strict=True) if b]
            assert all(a == b for a, b in fixed), (result.shape, last.shape)
            labels = pipeline.labels
            assert labels is None or (
                isinstance(labels, list)
                and all(isinstance(label, str) for label in labels)
                and len(labels) == result.shape[-1]
            ), f"labels.json holds {labels!r}"
        return "loaded"


def member_spans(data: bytes) -> dict[str, tuple[int, int, int]]:
    """Each member's (local header offset, data start, data end) in the zip."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        spans = {}
        for info in z.infolist():
            name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
            start = info.header_offset + 30 + name_length + extra_length
            spans[info.filename] = (info.header_offset, start, start + info.compress_size)
        return spans


def central_directory(data: bytes) -> int:
    end = data.rindex(b"PK\x05\x06")
    (start,) = struct.unpack_from("<I", data, end + 16)
    return start


def flipped(data: bytes, flips: list[tuple[float, int]], start: int = 0, end: int | None = None):
    """``data`` with bytes XORed at fractions of [start, end)."""
    mutated = bytearray(data)
    end = len(mutated) if end is None else end
    for where, mask in flips:
        mutated[start + int(where * (end - start))] ^= mask
    return bytes(mutated)


FLIPS = st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4
)


def test_the_pristine_archive_loads(pristine):
    """The harness itself: an unmodified rebuild loads, runs and passes every check."""
    assert check_loader(build_zip(pristine)) == "loaded"
    assert check_loader(build_zip(resigned(pristine))) == "loaded"


@RELAXED
@example(keep=0.0)
@example(keep=0.999)
@given(keep=st.floats(0, 1, exclude_max=True))
def test_truncated_archives_are_refused(archive, keep):
    data = archive.read_bytes()
    assert check_loader(data[: int(keep * len(data))], pipeline_too=False) == "refused"


REGIONS = ["anywhere", "manifest.json", "labels.json", "local header", "central directory"]


# Found by this test: damaged bytes made read_manifest/extract raise zipfile.BadZipFile (bad CRC,
# local and central names differ, bad magic), zlib.error, NotImplementedError (unknown compression
# method), RuntimeError (the 'encrypted' flag) or EOFError.
@RELAXED
@example(region="manifest.json", flips=[(0.5, 0xFF)])
@given(region=st.sampled_from(REGIONS), flips=FLIPS)
def test_damaged_archives_are_refused(pristine, region, flips):
    """Byte flips anywhere, in one member's compressed data, in a local header or in the central
    directory (sizes, offsets, names, compression methods, attributes)."""
    data = build_zip(pristine)
    spans = member_spans(data)
    if region in spans:
        _, start, end = spans[region]
    elif region == "local header":
        start, end = 0, 30
    elif region == "central directory":
        start, end = central_directory(data), len(data)
    else:
        start, end = 0, len(data)
    check_loader(flipped(data, flips, start, end))


def _manifest_paths() -> list[tuple]:
    paths: list[tuple] = [("schema_version",), ("name",), ("input",), ("stages",), ("members",)]
    for i in range(3):
        paths.append(("stages", i))
        for key in ("name", "kind", "path", "input", "output"):
            paths.append(("stages", i, key))
        for side in ("input", "output"):
            for key in ("name", "dtype", "shape"):
                paths.append(("stages", i, side, key))
            paths += [("stages", i, side, "shape", j) for j in range(4)]
    for m in range(10):
        paths += [("members", m), ("members", m, "size"), ("members", m, "sha256")]
    return paths


DELETE = "<delete>"
MANIFEST_WORDS = [
    "accelerator", "tensorflow", "keras", "float32", "string", "images", "features",
    "preprocessed", "stages/0-preprocess", "stages/1-featurizer", "stages/2-classifier",
    "../escape", "../../../escape", "{ABS}", ".", "", "stages/../..", "manifest.json", -1, 0,
    2**63,
]  # fmt: skip
JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.sampled_from(MANIFEST_WORDS),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def apply_edit(manifest: dict, path: tuple, value) -> None:
    """Set (or delete) the value at ``path``; integer keys pick among a dict's keys."""
    node = manifest
    for key in path[:-1]:
        if isinstance(node, dict) and node:
            node = node.get(sorted(node)[key % len(node)] if isinstance(key, int) else key)
        elif isinstance(node, list) and node and isinstance(key, int):
            node = node[key % len(node)]
        else:
            return
    key = path[-1]
    if isinstance(node, dict) and (node or not isinstance(key, int)):
        key = sorted(node)[key % len(node)] if isinstance(key, int) else key
        if value == DELETE:
            node.pop(key, None)
        else:
            node[key] = value
    elif isinstance(node, list) and node and isinstance(key, int):
        if value == DELETE:
            del node[key % len(node)]
        else:
            node[key % len(node)] = value


# Found by this test: the manifest (no checksum covers it) was trusted past validation: a stage kind
# changed to 'accelerator' raised InvalidProgramError, a member size of 1e400 OverflowError, a stage
# path '.' IndexError; stage paths, tensor names or shapes that do not match the stored stages
# loaded, then failed on the first run.
# ... and the top-level "input" was not checked (KeyError / TypeError on the first run).
@RELAXED
@example(edits=[(("stages", 0, "kind"), "accelerator")])
@example(edits=[(("input",), DELETE)])
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(_manifest_paths()), st.one_of(JSON_VALUES, st.just(DELETE))),
        min_size=1,
        max_size=3,
    )
)
def test_manifest_mutations_are_refused_or_load_correctly(pristine, edits):
    with tempfile.TemporaryDirectory() as scratch:
        outside = Path(scratch) / "outside"
        manifest = json.loads(pristine["manifest.json"])
        for path, value in edits:
            apply_edit(manifest, path, str(outside) if value == "{ABS}" else value)
        check_loader(build_zip(with_manifest(pristine, manifest)))
        assert not outside.exists()


HOSTILE_NAMES = [
    "../escape", "../../escape", "../../../escape", "{ABS}/escape", "a/../../../escape",
    "stages/../../../escape", "C:\\escape", "c:/escape", "\\\\host\\share\\escape", "./x",
    "x//y", ".", "..", "x/", "stages/0-preprocess/saved_model.pb/..", "manifest.json",
    "labels.json", "x" * 300, "%2e%2e/escape", "..\\escape", "ünïcødé/名前", "nul\0byte",
    "stages/1-featurizer/program.fpgaprog",
]  # fmt: skip
NAME = st.one_of(st.sampled_from(HOSTILE_NAMES), st.text(min_size=1, max_size=40))


def renamed(members: dict[str, bytes], index: int, name: str, in_stage: bool) -> dict:
    """One member (or one stage's folder) renamed in the zip and the manifest alike."""
    manifest = json.loads(members["manifest.json"])
    if in_stage:
        stage = manifest["stages"][index % len(manifest["stages"])]
        old, stage["path"] = stage["path"], name
        files = {
            (name + key[len(old) :] if key.startswith(old + "/") else key): data
            for key, data in members.items()
        }
    else:
        old = sorted(set(members) - {"manifest.json"})[index % (len(members) - 1)]
        files = {(name if key == old else key): data for key, data in members.items()}
    return resigned(with_manifest(files, manifest))


# Renaming a member onto another one's name is part of the test: zipfile warns about it.
DUPLICATES = pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")


# Found by this test: a member named '.' raised IndexError in _safe_name; a member that is also
# another member's folder raised FileExistsError, a 300-character name OSError (File name too long);
# renaming a SavedModel's own files raised TensorFlow errors at load.
@DUPLICATES
@RELAXED
@example(index=2, name=".", in_stage=False)
@given(index=st.integers(0, 10), name=NAME, in_stage=st.booleans())
def test_member_names_are_refused_or_load_correctly(pristine, index, name, in_stage):
    """Traversal (relative, absolute, drive letters, backslashes), odd and duplicate names:
    refused with ArchiveError, and harmless names load."""
    with tempfile.TemporaryDirectory() as scratch:
        outside = Path(scratch) / "outside"
        check_loader(build_zip(renamed(pristine, index, name.replace("{ABS}", str(outside)),
                                       in_stage)))  # fmt: skip
        assert not outside.exists()


# Found by this test: broken members with matching checksums were not refused with ArchiveError:
# labels.json not JSON (JSONDecodeError, UnicodeDecodeError) or of the wrong type or length (loaded;
# Classify then failed INTERNAL), damaged variables (TensorFlow DataLossError, IndexError,
# RuntimeError), a damaged program (InvalidProgramError).
@RELAXED
@example(index=0, how="labels", flips=[(0.5, 1)], keep=1.0, labels=b"not json")
@given(
    index=st.integers(0, 10),
    how=st.sampled_from(["flip", "truncate", "labels"]),
    flips=FLIPS,
    keep=st.floats(0, 1),
    labels=st.one_of(
        st.sampled_from([b"[]", b"null", b'{"a": 1}', b"[1, 2]", b'["x"]', b"\xff\xfe"]),
        st.binary(max_size=40),
        JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    ),
)
def test_resigned_member_damage_is_refused_or_loads_correctly(
    pristine, index, how, flips, keep, labels
):
    files = dict(pristine)
    if how == "labels":
        files["labels.json"] = labels
    else:
        name = sorted(set(files) - {"manifest.json"})[index % (len(files) - 1)]
        data = flipped(files[name], flips) if how == "flip" else files[name]
        files[name] = data[: int(keep * len(data))] if how == "truncate" else data
    check_loader(build_zip(resigned(files)))


@DUPLICATES
@RELAXED
@given(
    index=st.integers(0, 10),
    name=NAME,
    in_stage=st.booleans(),
    link=st.booleans(),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=2),
    edits=st.lists(st.tuples(st.sampled_from(_manifest_paths()), JSON_VALUES), max_size=2),
)
def test_extraction_never_writes_outside_its_folder(
    pristine, index, name, in_stage, link, flips, edits
):
    """Whatever the loader makes of a hostile archive (a refusal, or today sometimes another
    exception), it writes nothing outside the folder it extracts to and makes no links."""
    with tempfile.TemporaryDirectory() as scratch:
        sandbox = Sandbox(Path(scratch))
        members = renamed(pristine, index, sandbox.name(name), in_stage)
        manifest = json.loads(members["manifest.json"])
        for path, value in edits:
            apply_edit(manifest, path, sandbox.name(value) if isinstance(value, str) else value)
        members = with_manifest(members, manifest)
        victim = sorted(members)[index % len(members)] if link else None
        sandbox.archive.write_bytes(flipped(build_zip(members, victim), flips))
        for step in (read_manifest, lambda path: extract(path, sandbox.target)):
            with contextlib.suppress(Exception):  # which exception: the tests above
                step(sandbox.archive)
            sandbox.assert_contained()
        assert not sandbox.outside.exists()


def _local_name_differs(data: bytes) -> bytes:
    """A member's name in its local header no longer matches the central directory."""
    header, _, _ = member_spans(data)["labels.json"]
    return flipped(data, [(0.0, 0x20)], header + 30, header + 31)


def _unknown_method(data: bytes) -> bytes:
    """labels.json's compression method set to 99 in the central directory."""
    mutated = bytearray(data)
    entry = central_directory(data)
    while True:
        (name_length,) = struct.unpack_from("<H", data, entry + 28)
        if data[entry + 46 : entry + 46 + name_length] == b"labels.json":
            struct.pack_into("<H", mutated, entry + 10, 99)
            return bytes(mutated)
        entry = data.index(b"PK\x01\x02", entry + 4)


# One reproduction of each loader bug the tests above found (all fixed since).
LOADER_BUGS = {
    "manifest.json damaged inside the zip: zipfile.BadZipFile (Bad CRC-32)": lambda m: flipped(
        build_zip(m), [(0.5, 0xFF)], *member_spans(build_zip(m))["manifest.json"][1:]
    ),
    "local header name differs from the central directory: BadZipFile": lambda m: (
        _local_name_differs(build_zip(m))
    ),
    "unknown compression method: NotImplementedError": lambda m: _unknown_method(build_zip(m)),
    "member size 1e400 in the manifest: OverflowError": lambda m: build_zip(
        with_manifest(
            m, re.sub(r'"size": \d+', '"size": 1e400', m["manifest.json"].decode(), count=1)
        )
    ),
    "stage kind tensorflow -> accelerator: InvalidProgramError": lambda m: build_zip(
        edited(m, ("stages", 0, "kind"), "accelerator")
    ),
    "stage path '.': IndexError": lambda m: build_zip(edited(m, ("stages", 0, "path"), ".")),
    "a member named with 300 characters: OSError (File name too long)": lambda m: build_zip(
        renamed(m, 0, "x" * 300, in_stage=False)
    ),
    "a member is also another member's folder: FileExistsError": lambda m: build_zip(
        renamed(m, 0, "stages/1-featurizer/program.fpgaprog", in_stage=True)
    ),
    "stage 0 path is the classifier's SavedModel: loads, first run TypeError": lambda m: build_zip(
        edited(m, ("stages", 0, "path"), "stages/2-classifier")
    ),
    "stage 0 output renamed in the manifest: loads, first run KeyError": lambda m: build_zip(
        edited(edited(m, ("stages", 0, "output", "name"), "x"), ("stages", 1, "input", "name"), "x")
    ),
    "labels.json not JSON (checksums recomputed): JSONDecodeError": lambda m: build_zip(
        resigned({**m, "labels.json": b"not json"})
    ),
    "labels.json a dict (checksums recomputed): loads": lambda m: build_zip(
        resigned({**m, "labels.json": b'{"a": 1}'})
    ),
    "classifier variables damaged (checksums recomputed): DataLossError": lambda m: build_zip(
        resigned({**m, VARIABLES: flipped(m[VARIABLES], [(0.5, 0xFF)])})
    ),
    "manifest without 'input': loads, Pipeline.input_name raises KeyError": lambda m: build_zip(
        edited(m, ("input",), DELETE)
    ),
}
VARIABLES = "stages/2-classifier/variables/variables.data-00000-of-00001"


@pytest.mark.parametrize(
    "make",
    [pytest.param(make, id=bug) for bug, make in LOADER_BUGS.items()],
)
def test_loader_bug_reproductions(pristine, tmp_path, make):
    """Each id names what the loader did with that archive before the fix; now each one is
    refused with ArchiveError when the pipeline loads."""
    path = tmp_path / "case.zip"
    path.write_bytes(make(pristine))
    with pytest.raises(ArchiveError), Pipeline.load(path) as pipeline:
        pipeline.run({pipeline.input_name: [SMALL_JPEG]})
        labels = pipeline.labels
        assert labels is None or isinstance(labels, list), "labels.json must be a list"


# -- atheris: coverage-guided fuzzing of the byte parsers --------------------------------------


def _atheris_one_input(data: bytes) -> None:
    import atheris

    from fpgaserve.server.errors import InvalidArgument
    from fpgaserve.server.images import check_images, image_size
    from fpgaserve.wire import WireError, from_v2

    provider = atheris.FuzzedDataProvider(data)
    choice = provider.ConsumeIntInRange(0, 2)
    payload = provider.ConsumeBytes(provider.remaining_bytes())
    if choice == 0:  # image headers: JPEG segment walk, PNG IHDR
        size = image_size(payload)
        assert size is None or all(0 <= side < 2**32 for side in size)
        try:
            check_images([payload], MAX_PIXELS)
        except InvalidArgument:
            return
        width, height = size
        assert 0 < width * height <= MAX_PIXELS
    else:  # raw BYTES framing: 4-byte little-endian lengths, then the bytes
        count = payload.count(b"\0") % 5 if choice == 1 else 1
        tensor = v2.ModelInferRequest().inputs.add(name="images", datatype="BYTES", shape=[count])
        try:
            array = from_v2(tensor, payload)
        except WireError:
            return
        assert array.shape == (count,)
        rebuilt = b"".join(struct.pack("<I", len(item)) + item for item in array)
        assert rebuilt == payload


def test_atheris_byte_parsers(tmp_path):
    """Coverage-guided fuzzing (atheris, when installed) of the parsers that see raw client bytes
    first: image headers and the KServe v2 BYTES framing. Runs in a subprocess because libFuzzer
    ends its process."""
    pytest.importorskip("atheris")
    runs = int(os.environ.get("FPGASERVE_ATHERIS_RUNS", "20000"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate([SMALL_JPEG[:400], GOOD_IMAGES[1][:64], b"\x03\0\0\0abc"]):
        (corpus / f"seed{i}").write_bytes(b"\0" + seed)
    command = [
        sys.executable, __file__, "--atheris", f"-runs={runs}", "-seed=1", "-max_len=4096",
        f"-artifact_prefix={tmp_path}/", str(corpus),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"Done {runs} runs" in result.stderr, result.stderr[-2000:]


if __name__ == "__main__" and "--atheris" in sys.argv:
    import atheris

    with atheris.instrument_imports():
        import fpgaserve.server.images
        import fpgaserve.wire  # noqa: F401
    sys.argv.remove("--atheris")
    atheris.Setup(sys.argv, _atheris_one_input)
    atheris.Fuzz()
