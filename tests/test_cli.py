"""The installed ``fpgaserve`` console command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def fpgaserve(*args: str) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).parent / "fpgaserve")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def test_devices_lists_the_emulator_as_json():
    result = fpgaserve("devices", "--json")
    assert result.returncode == 0, result.stderr
    devices = json.loads(result.stdout)
    assert devices[0]["name"] == "emulator" and devices[0]["kind"] == "EMULATOR"
    assert "msfp16" in devices[0]["formats"]


def test_devices_table_and_usage_errors():
    table = fpgaserve("devices")
    assert table.returncode == 0 and "emulator" in table.stdout and "NAME" in table.stdout
    bare = fpgaserve()
    assert bare.returncode == 2 and "devices" in bare.stderr
    wrong = fpgaserve("frobnicate")
    assert wrong.returncode == 2 and "invalid choice" in wrong.stderr


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help(flag):
    result = fpgaserve(flag)
    assert result.returncode == 0 and "fpgaserve" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("predict", "photo.jpg", "--top", "-3"),
        ("predict", "photo.jpg", "--timeout", "0"),
        ("health", "--timeout", "nan"),
        ("build", "resnet50", "-o", "x.zip", "--calibration-count", "many"),
    ],
)
def test_counts_and_timeouts_must_be_above_zero(args):
    result = fpgaserve(*args)
    assert result.returncode == 2 and f"argument {args[-2]}" in result.stderr, result.stderr
