"""The generated protocol modules are what protos/generate.py makes from the .proto files, and the
client-facing modules load side by side with TensorFlow Serving's in one process."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

# Lines that name the generator's version: they change with grpcio-tools, not with the protocol.
VERSION_LINES = re.compile(r"^.*(Protobuf Python Version|_runtime_version\.|GRPC_GENERATED_VERSION|"
                           r"^\s+\d+,\s*$|^\s+'',\s*$).*$", re.MULTILINE)  # fmt: skip


def normalise(text: str) -> str:
    return VERSION_LINES.sub("", text)


def test_generated_modules_are_up_to_date(tmp_path: Path):
    # protoc runs in its own process: grpc_tools' protobuf and TensorFlow's do not share one.
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for fresh in map(Path, result.stdout.split()):
        committed = ROOT / "protos" / fresh.name
        assert committed.exists(), f"run `make protos`: {fresh.name} is missing"
        assert normalise(committed.read_text()) == normalise(fresh.read_text()), (
            f"protos/{fresh.name} is stale: run `make protos`"
        )


def test_server_and_protocol_modules_import_in_one_process():
    code = (
        "import tensorflow_serving.apis.prediction_service_pb2_grpc\n"
        "from fpgaserve.protos import grpc_predict_v2_pb2_grpc\n"
        "import fpgaserve.server\n"
        "print(grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub.__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "GRPCInferenceServiceStub"
