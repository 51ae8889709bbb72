"""Calls a server with NVIDIA's own Triton client (``tritonclient.grpc``), unchanged, and prints
what it got as JSON. Run in its own process by ``test_triton_client.py``: Triton's generated
protos define the same ``inference.*`` messages as this project's, and one process's protobuf
descriptor pool cannot hold both.

Usage: python triton_calls.py PORT IMAGE.jpg [IMAGE.jpg ...]
"""

from __future__ import annotations

import json
import queue
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

TIMEOUT = 60.0  # seconds a call may take before it fails instead of hanging


def error(call) -> dict[str, str]:
    """The status and message of a call that must fail."""
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": exc.message()}
    raise AssertionError("the call succeeded")


def main(port: str, paths: list[str]) -> None:
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
    }
    client.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
