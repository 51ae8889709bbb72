"""NVIDIA's Triton client (``tritonclient.grpc``), unchanged, against the real server: the KServe
v2 protocol as the most used v2 client speaks it (raw BYTES contents, ``class_count``, the
asynchronous call), not only as this project's own stubs do."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from servers import jpeg, running

from fpgaserve.protos import grpc_predict_v2_pb2 as v2
from fpgaserve.server import ServerConfig

CALLS = Path(__file__).with_name("triton_calls.py")

if importlib.util.find_spec("tritonclient") is None:
    pytest.skip(
        "tritonclient is not installed; make installs it: pip install --no-deps tritonclient",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def report(archive, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("images")
    paths = [folder / f"{seed}.jpg" for seed in (0, 1)]
    for seed, path in enumerate(paths):
        path.write_bytes(jpeg(seed))
    ours = folder / "ours.pb"  # our declarations, to compare with Triton's field by field
    ours.write_bytes(v2.DESCRIPTOR.serialized_pb)
    with running(ServerConfig(archives=[archive])) as server:
        try:
            done = subprocess.run(
                [sys.executable, str(CALLS), str(server.port), str(ours), *map(str, paths)],
                capture_output=True,
                text=True,
                timeout=300,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"the Triton client hung; its stderr: {exc.stderr!r}"[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def floats(hex_bytes: str, shape) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(hex_bytes), np.float32).reshape(shape)


def test_health_and_metadata(report):
    assert report["live"] and report["ready"] and report["model_ready"]
    assert not report["unknown_model_ready"]
    assert report["server"]["name"] == "fpgaserve"
    model = report["model"]
    assert model["name"] == "tiny" and model["versions"] == ["1"]
    assert [(i["name"], i["datatype"]) for i in model["inputs"]] == [("images", "BYTES")]
    assert [o["name"] for o in model["outputs"]] == ["features", "probabilities"]


def test_inference_is_bit_exact(report, expected):
    assert report["id"] == "triton-1"
    assert report["outputs"] == ["features", "probabilities"]
    probabilities = expected["probabilities"]
    np.testing.assert_array_equal(floats(report["probabilities"], (2, 10)), probabilities)
    np.testing.assert_array_equal(floats(report["features"], (2, 8)), expected["features"])
    np.testing.assert_array_equal(floats(report["async_probabilities"], (2, 10)), probabilities)


def test_class_count_gives_the_top_classes_labelled(report, expected):
    for row, scores in zip(report["top3"], expected["probabilities"], strict=True):
        best = np.argsort(-scores, kind="stable")[:3]
        assert row == [f"{scores[i]:f}:{i}:class{i}" for i in best]


def test_errors_reach_the_client_with_their_status(report):
    assert report["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert "'nope' is not served" in report["unknown_model"]["message"]
    assert report["float_images"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "must be string (TF Serving DT_STRING, v2 BYTES)" in report["float_images"]["message"]


def test_our_declarations_match_tritons_on_the_wire(report):
    assert report["wire_differences"] == []


def test_model_config_statistics_and_index(report):
    config = report["config"]["config"]
    assert (config["name"], config["max_batch_size"]) == ("tiny", 64)
    assert [(i["name"], i["data_type"]) for i in config["input"]] == [("images", "TYPE_STRING")]
    assert config["dynamic_batching"]["preferred_batch_size"] == [8]
    (stats,) = report["statistics"]["model_stats"]
    # Taken after the client's inferences above: 2 images each, three answered calls.
    assert (stats["name"], stats["version"]) == ("tiny", "1")
    assert stats["inference_count"] == "6" and stats["inference_stats"]["success"]["count"] == "3"
    assert report["index"]["models"] == [{"name": "tiny", "version": "1", "state": "READY"}]
    assert report["load"]["status"] == "StatusCode.FAILED_PRECONDITION"
    assert "--model-repository" in report["load"]["message"]


def test_streaming(report, expected):
    first, second, third = report["stream"]
    assert first["id"] == "s1" and third["id"] == "s3"
    for answer in (first, third):
        got = floats(answer["probabilities"], (2, 10))
        np.testing.assert_array_equal(got, expected["probabilities"])
    assert "'nope' is not served" in second["error"]
