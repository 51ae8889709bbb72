"""Calls a server with NVIDIA's own Triton client (``tritonclient.grpc``), unchanged, and prints
what it got as JSON. Run in its own process by ``test_triton_client.py``: Triton's generated
protos define the same ``inference.*`` messages as this project's, and one process's protobuf
descriptor pool cannot hold both.

It also compares this project's protocol declarations (a serialized FileDescriptorProto) with
Triton's, field by field: the wire contract both sides must share.

Usage: python triton_calls.py PORT OURS.pb IMAGE.jpg [IMAGE.jpg ...]
"""

from __future__ import annotations

import json
import queue
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from google.protobuf import descriptor_pb2, descriptor_pool
from tritonclient.utils import InferenceServerException

Field = descriptor_pb2.FieldDescriptorProto

TIMEOUT = 60.0  # seconds a call may take before it fails instead of hanging


def error(call) -> dict[str, str]:
    """The status and message of a call that must fail."""
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": exc.message()}
    raise AssertionError("the call succeeded")


def _field(field) -> tuple:
    """What a field is on the wire, from either descriptor kind."""
    if isinstance(field, Field):
        kind = field.type_name.lstrip(".")
        return field.number, field.type, field.label == Field.LABEL_REPEATED, kind
    kind = (field.message_type or field.enum_type or field).full_name if field.type in (
        Field.TYPE_MESSAGE, Field.TYPE_ENUM) else ""  # fmt: skip
    return field.number, field.type, field.is_repeated, kind if kind != field.full_name else ""


def wire_differences(ours: bytes) -> list[str]:
    """Every field, enum value and method of our declarations that Triton's differs on."""
    theirs = descriptor_pool.Default()
    proto = descriptor_pb2.FileDescriptorProto.FromString(ours)
    differences = []

    def messages(message, prefix):
        name = f"{prefix}.{message.name}"
        triton_message = theirs.FindMessageTypeByName(name)
        for field in message.field:
            other = triton_message.fields_by_name.get(field.name)
            if other is None or _field(other) != _field(field):
                differences.append(f"{name}.{field.name}: ours {_field(field)}, Triton's "
                                   f"{other and _field(other)}")  # fmt: skip
        for nested in message.nested_type:
            messages(nested, name)
        for enum in message.enum_type:
            enums(enum, name)

    def enums(enum, prefix):
        values = theirs.FindEnumTypeByName(f"{prefix}.{enum.name}").values_by_name
        for value in enum.value:
            if value.name not in values or values[value.name].number != value.number:
                differences.append(f"{prefix}.{enum.name}.{value.name} = {value.number}")

    for message in proto.message_type:
        messages(message, proto.package)
    for enum in proto.enum_type:
        enums(enum, proto.package)
    for service in proto.service:
        methods = theirs.FindServiceByName(f"{proto.package}.{service.name}").methods_by_name
        for method in service.method:
            other = methods.get(method.name)
            shape = (method.input_type.lstrip("."), method.output_type.lstrip("."),
                     method.client_streaming, method.server_streaming)  # fmt: skip
            if other is None or shape != (
                other.input_type.full_name,
                other.output_type.full_name,
                other.client_streaming,
                other.server_streaming,
            ):
                differences.append(f"rpc {method.name}")
    return differences


def main(port: str, ours: str, paths: list[str]) -> None:
    client = triton.InferenceServerClient(f"localhost:{port}")
    images = triton.InferInput("images", [len(paths)], "BYTES")
    images.set_data_from_numpy(np.array([Path(p).read_bytes() for p in paths], dtype=np.object_))

    everything = client.infer("tiny", [images], request_id="triton-1", client_timeout=TIMEOUT)
    top = client.infer(
        "tiny",
        [images],
        outputs=[triton.InferRequestedOutput("probabilities", class_count=3)],
        client_timeout=TIMEOUT,
    )
    answers: queue.Queue = queue.Queue()
    # Triton's client passes the callback's arguments by name.
    client.async_infer(
        "tiny",
        [images],
        callback=lambda result, error: answers.put((result, error)),
        client_timeout=TIMEOUT,
    )
    later, failure = answers.get(timeout=2 * TIMEOUT)
    assert failure is None, failure
    floats = triton.InferInput("images", [1, 2], "FP32")
    floats.set_data_from_numpy(np.zeros((1, 2), np.float32))
    report = {
        "live": client.is_server_live(client_timeout=TIMEOUT),
        "ready": client.is_server_ready(client_timeout=TIMEOUT),
        "model_ready": client.is_model_ready("tiny", client_timeout=TIMEOUT),
        "unknown_model_ready": client.is_model_ready("nope", client_timeout=TIMEOUT),
        "server": client.get_server_metadata(as_json=True, client_timeout=TIMEOUT),
        "model": client.get_model_metadata("tiny", as_json=True, client_timeout=TIMEOUT),
        "id": everything.get_response().id,
        "outputs": [o.name for o in everything.get_response().outputs],
        "probabilities": everything.as_numpy("probabilities").tobytes().hex(),
        "features": everything.as_numpy("features").tobytes().hex(),
        "top3": [[e.decode() for e in row] for row in top.as_numpy("probabilities")],
        "async_probabilities": later.as_numpy("probabilities").tobytes().hex(),
        "unknown_model": error(lambda: client.infer("nope", [images], client_timeout=TIMEOUT)),
        "float_images": error(lambda: client.infer("tiny", [floats], client_timeout=TIMEOUT)),
        "config": client.get_model_config("tiny", as_json=True, client_timeout=TIMEOUT),
        # Counted before each answer was sent.
        "statistics": client.get_inference_statistics("tiny", as_json=True, client_timeout=TIMEOUT),
        "index": client.get_model_repository_index(as_json=True, client_timeout=TIMEOUT),
        "load": error(lambda: client.load_model("tiny", client_timeout=TIMEOUT)),
        "stream": stream(client, images),
        "wire_differences": wire_differences(Path(ours).read_bytes()),
    }
    client.close()
    print(json.dumps(report))


def stream(client, images) -> list[dict]:
    """Three requests on one stream, the second for a model that is not served: what the
    callback got for each, in order."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for model, request_id in (("tiny", "s1"), ("nope", "s2"), ("tiny", "s3")):
        client.async_stream_infer(model, [images], request_id=request_id)
    got = []
    for _ in range(3):
        result, failure = answers.get(timeout=2 * TIMEOUT)
        if failure is not None:
            got.append({"error": failure.message()})
        else:
            response = result.get_response()
            got.append({"id": response.id, "probabilities": result.as_numpy("probabilities")
                        .tobytes().hex()})  # fmt: skip
    client.stop_stream()
    return got


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
