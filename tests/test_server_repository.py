"""The model repository: versions appear, change, break and disappear under a running server."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import GatedDevice, channel, eventually, jpeg, metrics, running, tiny_archive
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)
from test_server import predict_request

from fpgaserve.hal.emulator.device import EmulatorDevice
from fpgaserve.server import BatchingConfig, ModelRepository, ServerConfig, VersionPolicy
from fpgaserve.server.repository import Candidate

State = get_model_status_pb2.ModelVersionStatus


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[int, Path]:
    folder = tmp_path_factory.mktemp("versions")
    return {seed: tiny_archive(folder / f"v{seed}.zip", seed=seed) for seed in (1, 2)}


def place(root: Path, version: int | str, source: Path | bytes, name: str = "tiny") -> None:
    folder = root / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.zip"
    if isinstance(source, bytes):
        target.write_bytes(source)
    else:
        shutil.copy(source, target.with_suffix(".tmp"))
        target.with_suffix(".tmp").rename(target)  # how to publish: write, then rename


def statuses(ch, name="tiny") -> dict[int, tuple[int, str]]:
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    reply = model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus(request, timeout=10)
    return {s.version: (s.state, s.status.error_message) for s in reply.model_version_status}


def served_version(ch, **spec) -> int:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
    return stub.Predict(predict_request([jpeg()], **spec), timeout=30).model_spec.version.value


def test_versions_come_and_go_and_broken_ones_never_take_over(archives, tmp_path):
    root = tmp_path / "models"
    place(root, 1, archives[1])
    config = ServerConfig(model_repository=root, poll_seconds=0.2)
    with running(config) as server, channel(server) as ch:
        assert served_version(ch) == 1

        place(root, 2, archives[2])
        eventually(lambda: statuses(ch) == {2: (State.AVAILABLE, "")})
        assert served_version(ch) == 2
        ready = 'fpgaserve_model_ready{model="tiny",version="%d"} 1.0'
        eventually(lambda: ready % 1 not in metrics(server))  # unloaded: no stale gauge
        assert ready % 2 in metrics(server)

        place(root, 3, b"this is not a zip archive")
        settled = (State.AVAILABLE, State.END)  # version 3 shows LOADING while it is tried
        eventually(lambda: statuses(ch).get(3, (State.UNKNOWN, ""))[0] in settled)
        state, error = statuses(ch)[3]
        assert state == State.END and "not a readable zip archive" in error
        assert "tiny/3/model.zip" in error and str(tmp_path) not in error  # no server paths
        assert statuses(ch)[2] == (State.AVAILABLE, "")
        assert served_version(ch) == 2  # the broken version never took over
        with pytest.raises(grpc.RpcError) as info:  # not retryable: the archive needs fixing
            served_version(ch, version=3)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "failed to load" in info.value.details()

        place(root, 3, archives[1])  # fixed: the new file is retried
        eventually(lambda: statuses(ch) == {3: (State.AVAILABLE, "")})
        place(root, 3, b"a broken replacement")  # version 3 keeps serving, and says why
        eventually(lambda: statuses(ch)[3][1] != "")
        state, error = statuses(ch)[3]
        assert state == State.AVAILABLE and error.startswith("still serving the previous file")
        assert served_version(ch, version=3) == 3
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "tiny"
        reply = model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus(request, timeout=10)
        assert reply.model_version_status[0].status.error_code == 0  # OK: it is serving

        place(root, 7, b"broken, then deleted")
        eventually(lambda: 7 in statuses(ch))
        shutil.rmtree(root / "tiny" / "7")  # a deleted failure is forgotten
        eventually(lambda: 7 not in statuses(ch))

        labels = {"stable": 3, "old": 2}  # version 2 is on disk, but the policy serves 3 only
        (root / "tiny" / "version_labels.json").write_text(json.dumps(labels))
        eventually(lambda: served_version(ch, version_label="stable") == 3)
        error = eventually(lambda: _not_found(ch, version_label="old"))
        assert "version 2 (label 'old') is not available" in error
        assert "left out by the version policy latest" in error

        shutil.rmtree(root / "tiny")  # the clean unload
        error = eventually(lambda: _not_found(ch))
        assert "not served here" in error
        gauges = re.compile(r'^fpgaserve_(model_ready|in_flight_images)\{model="tiny"', re.M)
        eventually(lambda: not gauges.search(metrics(server)))


def test_a_new_file_of_the_same_size_and_time_counts_as_changed(tmp_path):
    """Reproducible builds fix mtimes; a file published by rename is still a new one."""
    target, staged = tmp_path / "model.zip", tmp_path / "model.tmp"
    target.write_bytes(b"version A")
    before = Candidate.of(target)
    staged.write_bytes(b"version B")
    stat = target.stat()
    os.utime(staged, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    staged.rename(target)
    assert target.stat().st_size == stat.st_size and target.stat().st_mtime_ns == stat.st_mtime_ns
    assert Candidate.of(target) != before


# Found by review: these layout mistakes left the server NOT_SERVING without a log line.
def test_layout_mistakes_are_logged_once_each(tmp_path, caplog):
    root = tmp_path / "models"
    place(root, "v1", b"a version folder is a number", name="named")
    place(root, "1", b"not read by a scan", name="unversioned")
    (root / "unversioned" / "1" / "model.zip").rename(root / "unversioned" / "model.zip")
    (root / "loose.zip").write_bytes(b"")
    (root / "README.md").write_text("notes")  # not a mistake
    (root / "..data").mkdir()  # a mounted ConfigMap's: not a mistake
    repository = ModelRepository(EmulatorDevice(), BatchingConfig(), root=root)
    for _ in range(2):
        assert repository.scan() == {}
    logged = sorted(r.getMessage() for r in caplog.records if "ignoring" in r.getMessage())
    assert len(logged) == 3, logged
    assert f"{root / 'loose.zip'}: archives go in <model name>/<version>/model.zip" in logged[0]
    assert "named: no version folder in it holds a model; expected named/<number>/" in logged[1]
    assert "unversioned: no version folder" in logged[2]


def test_folders_naming_the_same_version_serve_the_plainest_and_say_so(tmp_path, caplog):
    root = tmp_path / "models"
    for folder in ("001", "1", "01", "2"):
        place(root, folder, b"not read by a scan")
    repository = ModelRepository(EmulatorDevice(), BatchingConfig(), root=root)
    for _ in range(2):
        found = repository.scan()
    assert {v: c.path.parent.name for v, c in found["tiny"].items()} == {1: "1", 2: "2"}
    ignored = [r.getMessage() for r in caplog.records if "same version number" in r.getMessage()]
    assert len(ignored) == 2  # 01 and 001, once each however often the folder is scanned
    assert all("tiny/1/model.zip has the same version number" in m for m in ignored)


def without_member(source: Path, member: str) -> bytes:
    """``source`` without ``member``, its manifest's list and checksums still consistent, so
    that validation passes and loading fails in TensorFlow."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(buffer, "w") as out:
        manifest = json.loads(archive.read("manifest.json"))
        del manifest["members"][member]
        out.writestr("manifest.json", json.dumps(manifest))
        for info in archive.infolist():
            if info.filename not in ("manifest.json", member):
                out.writestr(info.filename, archive.read(info.filename))
    return buffer.getvalue()


def test_load_errors_never_show_the_servers_paths(archives, tmp_path):
    """Found in review: TensorFlow's errors quoted the temporary folder the archive was
    extracted to."""
    root = tmp_path / "models"
    member = "stages/2-classifier/variables/variables.index"
    place(root, 1, without_member(archives[1], member))
    with running(ServerConfig(model_repository=root)) as server, channel(server) as ch:
        state, error = statuses(ch)[1]
    assert state == State.END and "stages/2-classifier/variables/variables" in error
    assert tempfile.gettempdir() not in error and str(tmp_path) not in error, error


def _not_found(ch, **spec) -> str | None:
    try:
        served_version(ch, **spec)
    except grpc.RpcError as exc:
        return exc.details() if exc.code() == grpc.StatusCode.NOT_FOUND else None
    return None


def test_policy_all_serves_every_version(archives, tmp_path):
    root = tmp_path / "models"
    place(root, 1, archives[1])
    place(root, 2, archives[2])
    config = ServerConfig(model_repository=root, version_policy=VersionPolicy.parse("all"))
    with running(config) as server, channel(server) as ch:
        assert served_version(ch, version=1) == 1
        assert served_version(ch, version=2) == 2
        assert served_version(ch) == 2


def test_health_watch_sends_a_status_only_when_it_changes(archives, tmp_path):
    """Found in review: every rescan of the repository sent SERVING again to every watcher."""
    root = tmp_path / "models"
    place(root, 1, archives[1])
    config = ServerConfig(model_repository=root, poll_seconds=0.1)
    with running(config) as server, channel(server) as ch:
        request = health_pb2.HealthCheckRequest(service="tiny")
        stream = health_pb2_grpc.HealthStub(ch).Watch(request, timeout=1.5)  # 15 rescans
        seen = []
        with pytest.raises(grpc.RpcError) as ended:
            seen.extend(reply.status for reply in stream)
    assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert seen == [health_pb2.HealthCheckResponse.SERVING]


def test_health_is_not_serving_while_loading(archives, tmp_path):
    device = GatedDevice()
    device.gate.clear()  # warmup cannot finish
    config = ServerConfig(archives=[archives[1]])
    with running(config, device, wait=False) as server, channel(server) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        check = health_pb2.HealthCheckRequest
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        assert health.Check(check(), timeout=10).status == not_serving
        # The model's own status is known (not NOT_FOUND) from the moment it starts loading.
        eventually(lambda: health.Check(check(service="tiny"), timeout=10).status == not_serving)
        for spec in ({}, {"version": 1}):
            with pytest.raises(grpc.RpcError) as info:
                served_version(ch, **spec)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "loading" in info.value.details()
        device.gate.set()
        eventually(
            lambda: (
                health.Check(check(service="tiny"), timeout=10).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        )
        assert served_version(ch) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [("newest", "use latest, all"), ("0,1", "start at 1")],
)
def test_bad_version_policies(text, message):
    with pytest.raises(ValueError, match=message):
        VersionPolicy.parse(text)


# Found by review: a device fault during a version's warmup (a board still starting) marked
# the version failed until its file changed, so it was never served, and "fix or replace its
# archive" pointed at the wrong culprit.
def test_a_device_fault_while_loading_is_tried_again(archive):
    device = GatedDevice()
    device.failing.set()
    config = ServerConfig(archives=[archive], poll_seconds=0.2)
    with running(config, device) as server, channel(server) as ch:
        with pytest.raises(grpc.RpcError) as info:
            served_version(ch)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # clients retry this
        assert "failed on the device" in info.value.details()
        state, error = statuses(ch)[1]
        assert state == State.END and "the accelerator failed" in error
        assert "tried again every 0.2 s" in error
        device.failing.clear()  # the board is up
        assert eventually(lambda: served_version(ch)) == 1
