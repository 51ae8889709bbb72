"""`fpgaserve serve` and `fpgaserve health` as separate processes: configuration from the
environment, JSON logs, and SIGTERM under load (no accepted request lost)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from servers import jpeg, tiny_archive
from tensorflow_serving.apis import prediction_service_pb2_grpc
from test_server import predict_request

FPGASERVE = [sys.executable, "-m", "fpgaserve.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def health(port: int, service: str = "") -> subprocess.CompletedProcess:
    command = [*FPGASERVE, "health", "--address", f"localhost:{port}", "--service", service]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_sigterm_under_load_answers_every_accepted_request(tmp_path):
    archive = tiny_archive(tmp_path / "tiny.zip")
    port = free_port()
    env = {**os.environ, "FPGASERVE_PORT": str(port), "FPGASERVE_METRICS_PORT": "-1",
           "FPGASERVE_MAX_BATCH_SIZE": "4", "TF_CPP_MIN_LOG_LEVEL": "3"}  # fmt: skip
    server = subprocess.Popen(
        [*FPGASERVE, "serve", str(archive), "--host", "localhost"],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while health(port).returncode != 0:
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "the server never became SERVING"
            time.sleep(0.5)
        assert "tiny: SERVING" in health(port, "tiny").stdout

        with grpc.insecure_channel(f"localhost:{port}") as ch, ThreadPoolExecutor(6) as pool:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            batch = [jpeg(i) for i in range(12)]  # ~0.3 s of emulator time per request
            calls = [pool.submit(stub.Predict, predict_request(batch), timeout=120)
                     for _ in range(4)]  # fmt: skip
            time.sleep(0.5)
            server.send_signal(signal.SIGTERM)
            answered = [call.result() for call in calls]  # raises if any was lost
            assert all(len(r.outputs["output_alias"].float_val) == 12 * 10
                       for r in answered)  # fmt: skip
        assert server.wait(60) == 0
    finally:
        if server.poll() is None:
            server.kill()
    logs = [json.loads(line) for line in server.stderr.read().splitlines() if line.startswith("{")]
    messages = [entry["message"] for entry in logs]
    assert any("draining" in m for m in messages) and messages[-1] == "stopped"
    requests = [entry for entry in logs if entry.get("method") == "Predict"]
    assert len(requests) == 4 and all(r["code"] == "OK" and r["request_id"] for r in requests)


def test_serve_reports_configuration_errors_in_one_line(tmp_path):
    missing = subprocess.run(
        [*FPGASERVE, "serve", str(tmp_path / "nope.zip"), "--port", str(free_port())],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 1
    assert "fpgaserve serve: error:" in missing.stderr and "Traceback" not in missing.stderr

    nothing = subprocess.run([*FPGASERVE, "serve"], capture_output=True, text=True, timeout=120)
    assert nothing.returncode == 1 and "nothing to serve" in nothing.stderr


def test_health_of_an_absent_server_fails_cleanly():
    result = health(free_port())
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr


def test_auth_keys_file_must_not_be_empty(tmp_path: Path):
    keys = tmp_path / "keys"
    keys.write_text("\n")
    result = subprocess.run(
        [*FPGASERVE, "serve", "--auth-keys-file", str(keys), "x.zip"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and "holds no keys" in result.stderr
