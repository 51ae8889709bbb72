"""The OpenCL HAL device runs whole programs bit-identically to the emulator (on PoCL here,
or on the device $FPGASERVE_OPENCL_DEVICE names)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from test_device import small_net

from conftest import MOBILENET_WEIGHTS, assert_same_bits
from fpgaserve.hal import DeviceNotFoundError, InvalidProgramError, list_devices, open_device

pytest.importorskip("pyopencl")
OPENCL = os.environ.get("FPGASERVE_OPENCL_DEVICE") or "opencl"


def run(device_name: str, program, inputs):
    with open_device(device_name) as device:
        return device.run(device.load(program), inputs)


def test_opencl_devices_are_listed():
    infos = [info for info in list_devices() if info.backend == "opencl"]
    assert infos, "no OpenCL device: `make test` installs PoCL from pip"
    assert infos[0].name == "opencl:0" and infos[0].kind in ("CPU", "GPU", "ACCELERATOR")
    assert "msfp16" in infos[0].formats and "fp32" not in infos[0].formats


@pytest.mark.parametrize("fmt", ["msfp16", "msfp12", "mxint8"])
def test_every_op_kind_matches_the_emulator(fmt):
    program = small_net(fmt)
    image = np.random.default_rng(5).standard_normal((3, 8, 8, 3)).astype(np.float32)
    image[1, 2, 3, 1] = np.nan  # NaN handling too
    ours = run(OPENCL, program, {"image": image})
    expected = run("emulator", program, {"image": image})
    for name in program.outputs:
        assert_same_bits(ours[name], expected[name])


def test_fp32_programs_are_refused():
    with pytest.raises(InvalidProgramError, match="runs on the emulator"), open_device(OPENCL) as d:
        d.load(small_net("fp32"))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mobilenet_0.75", "resnet50"])
def test_whole_featurizers_are_bit_identical(model, imagenet):
    from fpgaserve.compiler.zoo import ZOO, compile_zoo_model
    from fpgaserve.evaluation import load_labelled_images

    weights = str(MOBILENET_WEIGHTS) if model == "mobilenet_0.75" else "random"
    compiled, _ = compile_zoo_model(model, weights, "msfp16", progress=False)
    images = load_labelled_images(imagenet, ZOO[model].preprocess, limit=1).inputs
    (name,) = compiled.program.inputs
    ours = run(OPENCL, compiled.program, {name: images})[compiled.cut]
    expected = run("emulator", compiled.program, {name: images})[compiled.cut]
    assert_same_bits(ours, expected)


def test_kernels_load_from_a_precompiled_binary(tmp_path):
    """What FPGA platforms need (no compiler): a board manifest names the binary per device."""
    import json

    from fpgaserve.hal.opencl.device import OpenCLDevice
    from fpgaserve.hal.opencl.kernels import DatapathKernels, find_device

    cl_device = find_device()
    binary = DatapathKernels(cl_device).program.binaries[0]
    (tmp_path / "datapath.bin").write_bytes(binary)
    manifest = tmp_path / "board.json"
    name = cl_device.name
    manifest.write_text(json.dumps({"binaries": [{"device": name, "path": "datapath.bin"}]}))
    device = OpenCLDevice(0, cl_device, board_manifest=manifest)
    device.open()
    try:
        assert device.kernel_source == "binary"
        program = small_net("msfp16")
        image = np.random.default_rng(6).standard_normal((2, 8, 8, 3)).astype(np.float32)
        ours = device.run(device.load(program), {"image": image})["features"]
    finally:
        device.close()
    assert_same_bits(ours, run("emulator", program, {"image": image})["features"])
    manifest.write_text("{not json")
    with pytest.raises(DeviceNotFoundError, match="board manifest"):
        OpenCLDevice(0, cl_device, board_manifest=manifest).open()


def test_a_fault_fails_the_request_then_the_device_recovers():
    """Fault injection: the device's context goes away under the loaded program (as when a
    board resets): its command queue now belongs to a fresh context, so every launch fails
    with CL_INVALID_CONTEXT."""
    import pyopencl as cl

    from fpgaserve.hal import DeviceFaultError

    program = small_net("msfp16")
    image = np.random.default_rng(7).standard_normal((1, 8, 8, 3)).astype(np.float32)
    expected = run("emulator", program, {"image": image})["features"]
    with open_device(OPENCL) as device:
        handle = device.load(program)
        assert_same_bits(device.run(handle, {"image": image})["features"], expected)
        kernels = device._kernels  # this thread's queue moves to a foreign context
        kernels._local.queue = cl.CommandQueue(cl.Context([kernels.device]))
        with pytest.raises(DeviceFaultError, match="re-initialises on the next request"):
            device.run(handle, {"image": image})
        assert not device.healthy
        assert_same_bits(device.run(handle, {"image": image})["features"], expected)
        assert device.healthy and device.recoveries == 1


def test_concurrent_runs_use_their_own_queues_and_agree():
    import threading

    program = small_net("mxint8")
    image = np.random.default_rng(8).standard_normal((2, 8, 8, 3)).astype(np.float32)
    expected = run("emulator", program, {"image": image})["features"]
    results, errors = [], []
    with open_device(OPENCL) as device:
        handle = device.load(program)

        def work():
            try:
                for _ in range(3):
                    results.append(device.run(handle, {"image": image})["features"])
            except Exception as exc:  # collected: a thread's failure must fail the test
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors and len(results) == 12
    for result in results:
        assert_same_bits(result, expected)


def test_profiling_events_time_the_kernels_and_reach_the_server_metrics(tmp_path):
    from servers import channel, eventually, jpeg, running, tiny_archive
    from tensorflow_serving.apis import prediction_service_pb2_grpc
    from test_server import predict_request

    from fpgaserve.server import ServerConfig

    program = small_net("msfp16")
    image = np.random.default_rng(5).standard_normal((2, 8, 8, 3)).astype(np.float32)
    with open_device(OPENCL) as device:
        handle = device.load(program)
        device.run(handle, {"image": image})
        seconds = device.last_kernel_seconds()
        assert seconds is not None and seconds > 0
        assert device.last_kernel_seconds() == 0  # taken: nothing ran since
    with open_device("emulator") as emulator:
        assert emulator.last_kernel_seconds() is None

    archive = tiny_archive(tmp_path / "tiny.zip")
    with running(ServerConfig(archives=[archive], device=OPENCL)) as server:
        with channel(server) as ch:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            assert stub.Predict(predict_request([jpeg()]), timeout=60).outputs
        scheduler = server.repository.get("tiny").scheduler
        # Per-thread queues and pools: the device runs on its worker, never a request thread.
        assert not scheduler.stages[scheduler.device_stage].inline

        def stage_sums() -> dict[str, float] | None:
            """Seconds per stage, once the call is counted (after its answer was sent)."""
            sums = {
                sample.labels["stage"]: sample.value
                for metric in server.metrics.registry.collect()
                if metric.name == "fpgaserve_stage_seconds"
                for sample in metric.samples
                if sample.name.endswith("_sum")
            }
            return sums if "device_kernels" in sums else None

        samples = eventually(stage_sums)
    assert 0 < samples["device_kernels"] <= samples["device"]
