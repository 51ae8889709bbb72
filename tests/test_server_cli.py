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


# A server whose device hangs once loaded: the gate closes after warmup and never reopens.
HUNG_DEVICE_SERVER = """
import sys, threading
from pathlib import Path
sys.path.insert(0, {tests!r})
from servers import GatedDevice
from fpgaserve.cli import serve_until_signalled
from fpgaserve.server import FpgaServer, ServerConfig
from fpgaserve.server.logs import configure

class Device(GatedDevice):
    thread_bound = {thread_bound}  # True: runs on the model's worker, not the call's thread

configure("json")
device = Device()
config = ServerConfig(archives=[Path({archive!r})], host="localhost", port={port},
                      metrics_port=None, drain_seconds=2)
server = FpgaServer(config, device)

def hang_once_loaded():
    server.repository.wait_loaded(120)
    device.gate.clear()
    print("loaded", flush=True)

threading.Thread(target=hang_once_loaded, daemon=True).start()
sys.exit(serve_until_signalled(server))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("thread_bound", "client_timeout", "codes"),
    [(False, 120, ("UNAVAILABLE", "CANCELLED")), (True, 0.5, ("DEADLINE_EXCEEDED",))],
    ids=["run on the call's thread", "run on the model's worker, caller gone"],
)
def test_sigterm_with_a_hung_device_exits_after_the_drain_time(
    tmp_path, thread_bound, client_timeout, codes
):
    """A device run that never returns must not keep the process alive past --drain-seconds:
    Kubernetes would otherwise wait out its grace period and kill it without logs. Found in
    review: with the run on the model's worker and its caller gone, the stop waited twice the
    drain time per model and then exited 0."""
    archive, port = tiny_archive(tmp_path / "tiny.zip"), free_port()
    script = HUNG_DEVICE_SERVER.format(
        tests=str(Path(__file__).parent), archive=str(archive), port=port,
        thread_bound=thread_bound,
    )  # fmt: skip
    server = subprocess.Popen(
        [sys.executable, "-c", script], env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout.readline() == "loaded\n", server.stderr.read()
        with grpc.insecure_channel(f"localhost:{port}") as ch, ThreadPoolExecutor(1) as pool:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            call = pool.submit(stub.Predict, predict_request([jpeg()]), timeout=client_timeout)
            time.sleep(1.0)  # the call is in the device
            server.send_signal(signal.SIGTERM)
            started = time.monotonic()
            assert server.wait(30) == 3  # EXIT_DRAIN_TIMED_OUT
            assert time.monotonic() - started < 10  # 2 s of drain, 1 s for gRPC, start-up
            with pytest.raises(grpc.RpcError) as failed:
                call.result(30)
            assert failed.value.code().name in codes
    finally:
        if server.poll() is None:
            server.kill()
    logs = [json.loads(line) for line in server.stderr.read().splitlines() if line.startswith("{")]
    assert any("timed out" in entry["message"] for entry in logs if entry["level"] == "error")
    assert logs[-1]["message"] == "stopped"


def test_serve_reports_configuration_errors_in_one_line(tmp_path):
    missing = subprocess.run(
        [*FPGASERVE, "serve", str(tmp_path / "nope.zip"), "--port", str(free_port())],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 1
    assert "fpgaserve serve: error:" in missing.stderr and "Traceback" not in missing.stderr

    nothing = subprocess.run([*FPGASERVE, "serve"], capture_output=True, text=True, timeout=120)
    assert nothing.returncode == 1 and "nothing to serve" in nothing.stderr

    no_calls = subprocess.run(
        [*FPGASERVE, "serve", "--max-concurrent-calls", "0", "x.zip"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert no_calls.returncode == 1 and "--max-concurrent-calls" in no_calls.stderr


# Found by review: out-of-range ports wrapped around (--port 70000 listened on 4464), a poll of 0
# spun a CPU and one of inf killed the repository thread, a message limit of 0 failed every
# call, health included; a bad number or device ended in a traceback; FPGASERVE_LOG_FORMAT=JSON
# silently gave text logs; archives were silently never served under --version-policy 2.
@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        (["--port", "70000"], {}, "port (--port) must be 0-65535, not 70000"),
        (["--metrics-port", "70000"], {}, "--metrics-port) must be 0-65535"),
        (["--port", "abc"], {}, "--port (or FPGASERVE_PORT) must be a whole number, not 'abc'"),
        ([], {"FPGASERVE_POLL_SECONDS": "inf"}, "--poll-seconds) must be a finite number"),
        (["--poll-seconds", "0"], {}, "--poll-seconds) must be a finite number of at least 0.1"),
        (["--max-message-mb", "0"], {}, "--max-message-mb) must be a finite number"),
        (["--max-image-pixels", "0"], {}, "--max-image-pixels) must be a finite number"),
        (["--drain-seconds", "0"], {}, "--drain-seconds) must be a finite number of at least 1"),
        (["--version-policy", "2"], {}, "served as version 1, which version policy 2 leaves out"),
        ([], {"FPGASERVE_LOG_FORMAT": "JSON"}, "FPGASERVE_LOG_FORMAT must be one of"),
        (["--device", "bogus"], {}, "device 'bogus'"),
        (["--tls-cert", "/no/cert.pem", "--tls-key", "/no/key.pem"], {}, "/no/cert.pem is not a"),
    ],
)
def test_serve_refuses_bad_settings_at_start_in_one_line(tmp_path, args, env, fragment):
    archive = tmp_path / "tiny.zip"  # not read: every setting here is refused before that
    archive.write_bytes(b"")
    result = subprocess.run(
        [*FPGASERVE, "serve", str(archive), "--metrics-port", "-1", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, **env},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr, result.stderr


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

    keys.write_bytes(b"\xff\xfe\x00k")  # UTF-16, say
    result = subprocess.run(
        [*FPGASERVE, "serve", "--auth-keys-file", str(keys), "x.zip"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and f"auth keys file {keys} is not UTF-8" in result.stderr
