"""The HAL device interface on the emulator: lifecycle, whole programs, typed errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import assert_same_bits
from fpgaserve.hal import (
    DeviceClosedError,
    DeviceNotFoundError,
    InvalidInputError,
    InvalidProgramError,
    Op,
    Program,
    UnknownProgramError,
    get_format,
    list_devices,
    open_device,
    quantize,
)
from fpgaserve.hal.emulator import vector_unit as vu
from fpgaserve.hal.emulator.matrix_unit import Geometry, conv2d, dense, prepare_weights

RNG = np.random.default_rng(11)


def weight(fmt_name: str, filters: int, reduction: int):
    w = (RNG.standard_normal((filters, reduction)) * 0.2).astype(np.float32)
    fmt = get_format(fmt_name)
    return quantize(w, fmt) if fmt.quantized else w


def channel(n: int) -> np.ndarray:
    return RNG.standard_normal(n).astype(np.float32)


def small_net(fmt: str = "msfp16") -> Program:
    """Every op kind once: conv+BN+ReLU, pools, depthwise, concat, add, DenseNet-style BN-ReLU;
    a depthwise and a dense convolution read the same tensor (quantized once, shared)."""
    conv = {"kernel": [3, 3], "strides": [1, 1], "dilation": [1, 1], "padding": [1, 1, 1, 1]}
    ops = [
        Op("conv2d", "conv1", ("image",), "c1",
           {**conv, "groups": 1, "filters": 16, "activation": "relu"},
           {"weight": weight(fmt, 16, 27), "bias": channel(16),
            "scale": channel(16), "shift": channel(16)}),
        Op("max_pool", "pool1", ("c1",), "p1",
           {"pool": [3, 3], "strides": [2, 2], "padding": [1, 1, 1, 1]}),
        Op("zero_pad", "pad", ("p1",), "z1", {"padding": [1, 1, 1, 1]}),
        Op("conv2d", "dw", ("z1",), "d1",
           {**conv, "padding": [0, 0, 0, 0], "groups": 16, "filters": 16, "activation": "relu6"},
           {"weight": weight(fmt, 16, 9)}),
        Op("conv2d", "proj", ("z1",), "j1",
           {**conv, "padding": [0, 0, 0, 0], "groups": 1, "filters": 16, "activation": "linear"},
           {"weight": weight(fmt, 16, 144), "bias": channel(16)}),
        Op("add", "join", ("d1", "j1"), "dj"),
        Op("avg_pool", "pool2", ("c1",), "a1",
           {"pool": [2, 2], "strides": [2, 2], "padding": [0, 0, 0, 0]}),
        Op("concat", "cat", ("dj", "a1"), "cat1"),
        Op("scale_shift", "bn", ("cat1",), "b1", {}, {"scale": channel(32), "shift": channel(32)}),
        Op("relu", "relu", ("b1",), "r1"),
        Op("add", "residual", ("r1", "cat1"), "s1", {"activation": "relu"}),
        Op("bias", "bias", ("s1",), "s2", {}, {"bias": channel(32)}),
        Op("relu6", "relu6", ("s2",), "s3"),
        Op("global_max_pool", "gmp", ("s3",), "g1"),
        Op("global_avg_pool", "gap", ("s3",), "g2"),
        Op("flatten", "flat", ("s3",), "f1"),
        Op("dense", "fc", ("f1",), "features", {"units": 10, "activation": "linear"},
           {"weight": weight(fmt, 10, 4 * 4 * 32)}),
    ]  # fmt: skip
    return Program(fmt, {"image": (8, 8, 3)}, ("features", "g1", "g2"), ops)


def run_by_hand(program: Program, image: np.ndarray) -> np.ndarray:
    ops = {op.name: op for op in program.ops}
    p = lambda name: ops[name].params  # noqa: E731
    c1 = conv2d(image, prepare_weights(p("conv1")["weight"], 1), Geometry((3, 3), padding=(1,) * 4))
    c1 = vu.epilogue(c1, p("conv1"), "relu")
    p1 = vu.max_pool(c1, (3, 3), (2, 2), (1, 1, 1, 1))
    z1 = vu.zero_pad(p1, (1, 1, 1, 1))
    d1 = conv2d(z1, prepare_weights(p("dw")["weight"], 16), Geometry((3, 3), groups=16))
    j1 = conv2d(z1, prepare_weights(p("proj")["weight"], 1), Geometry((3, 3)))
    dj = vu.add(vu.relu6(d1), vu.epilogue(j1, p("proj"), "linear"))
    cat1 = vu.concat([dj, vu.avg_pool(c1, (2, 2), (2, 2), (0, 0, 0, 0))])
    r1 = vu.relu(vu.scale_shift(cat1, p("bn")["scale"], p("bn")["shift"]))
    s3 = vu.relu6(vu.bias(vu.relu(vu.add(r1, cat1)), p("bias")["bias"]))
    return dense(vu.flatten(s3), prepare_weights(p("fc")["weight"], 1))


@pytest.mark.parametrize("fmt", ["msfp16", "msfp12", "mxint8", "fp32"])
def test_program_equals_ops_run_by_hand(fmt):
    program = small_net(fmt)
    image = RNG.standard_normal((3, 8, 8, 3)).astype(np.float32)
    with open_device() as device:
        handle = device.load(program)
        out = device.run(handle, {"image": image})
    assert set(out) == {"features", "g1", "g2"}
    assert out["features"].shape == (3, 10) and out["g1"].shape == (3, 32)
    assert_same_bits(out["features"], run_by_hand(program, image))


def test_samples_do_not_depend_on_their_batch():
    program = small_net()
    images = RNG.standard_normal((4, 8, 8, 3)).astype(np.float32)
    images[2] *= 1e6  # a loud neighbour must not change anyone else's exponents
    with open_device() as device:
        handle = device.load(program)
        batch = device.run(handle, {"image": images})["features"]
        for i in range(4):
            alone = device.run(handle, {"image": images[i : i + 1]})["features"]
            assert_same_bits(batch[i : i + 1], alone)


def test_concurrent_runs_agree():
    program = small_net()
    image = RNG.standard_normal((2, 8, 8, 3)).astype(np.float32)
    results = []
    with open_device() as device:
        handle = device.load(program)
        expected = device.run(handle, {"image": image})["features"]

        def work():
            results.append(device.run(handle, {"image": image})["features"])

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 4
    for r in results:
        assert_same_bits(r, expected)


def test_lifecycle_errors():
    device = open_device("emulator")
    handle = device.load(small_net())
    device.unload(handle)
    with pytest.raises(UnknownProgramError):
        device.run(handle, {"image": np.zeros((1, 8, 8, 3), np.float32)})
    with pytest.raises(UnknownProgramError):
        device.unload(handle)
    device.close()
    device.close()
    with pytest.raises(DeviceClosedError):
        device.load(small_net())
    with pytest.raises(DeviceNotFoundError, match="available: emulator"):
        open_device("no-such-board")


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({}, "takes inputs"),
        ({"image": np.zeros((1, 8, 8, 3), np.float64)}, "must be float32"),
        ({"image": np.zeros((1, 8, 8, 4), np.float32)}, r"shape \(batch, 8, 8, 3\)"),
        ({"image": np.zeros((8, 8, 3), np.float32)}, r"shape \(batch, 8, 8, 3\)"),
        ({"image": np.zeros((0, 8, 8, 3), np.float32)}, "batch size of at least 1"),
        ({"image": np.zeros((1, 8, 8, 3), np.float32), "extra": np.zeros(1)}, "takes inputs"),
    ],
)
def test_bad_inputs_are_rejected_clearly(inputs, message):
    with open_device() as device:
        handle = device.load(small_net())
        with pytest.raises(InvalidInputError, match=message):
            device.run(handle, inputs)


def broken(mutate) -> Program:
    program = small_net()
    mutate(program)
    return program


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: setattr(p, "format", "fp8"), "unknown number format 'fp8'"),
        (lambda p: setattr(p, "datapath_version", 2), "datapath version 2"),
        (lambda p: setattr(p.ops[0], "kind", "swish"), "'conv1': kind 'swish' is not supported"),
        (lambda p: setattr(p.ops[1], "inputs", ("nowhere",)), "'pool1' reads 'nowhere'"),
        (lambda p: setattr(p.ops[1], "output", "c1"), "'pool1' overwrites"),
        (lambda p: setattr(p, "outputs", ("missing",)), "'missing' is never produced"),
        (lambda p: p.ops[0].attrs.update(groups=2), "groups=2 must divide"),
        (lambda p: p.ops[0].attrs.update(activation="gelu"), "activation 'gelu'"),
        (lambda p: p.ops[0].attrs.update(kernel=[0, 3]), "'kernel' must be 2 integers >= 1"),
        (lambda p: p.ops[0].params.update(weight=np.zeros((16, 27), np.float32)),
         "quantized to msfp16"),
        (lambda p: p.ops[0].params.update(weight=weight("mxint8", 16, 27)), "quantized to msfp16"),
        (lambda p: p.ops[0].params.update(bias=np.zeros(3, np.float32)), "'bias' must be float32"),
        (lambda p: p.ops[0].params.update(shift=np.full(16, np.nan, np.float32)), "NaN or Inf"),
        (lambda p: p.ops[0].params.pop("shift"), "needs both 'scale' and 'shift'"),
        (lambda p: p.ops[1].attrs.update(padding=[3, 0, 0, 0]), "smaller than the pool window"),
        (lambda p: p.ops[7].__setattr__("inputs", ("dj", "c1")), "equal height and width"),
        (lambda p: p.ops[10].__setattr__("inputs", ("r1", "dj")), "two inputs of equal shape"),
        (lambda p: p.ops[0].attrs.update(kernel=[11, 11], padding=[0, 0, 0, 0]),
         "does not fit"),
        (lambda p: p.ops[0].attrs.pop("strides"), "'strides'"),
    ],
)  # fmt: skip
def test_invalid_programs_name_the_op_and_reason(mutate, message):
    with open_device() as device, pytest.raises(InvalidProgramError, match=message):
        device.load(broken(mutate))


def test_reduction_longer_than_the_accumulator_is_rejected():
    fmt = get_format("msfp16")
    w = quantize(np.zeros((2, 40000), np.float32), fmt)
    program = Program(
        "msfp16",
        {"x": (40000,)},
        ("y",),
        [Op("dense", "fc6", ("x",), "y", {"units": 2}, {"weight": w})],
    )
    with open_device() as device, pytest.raises(InvalidProgramError, match=r"fc6.*32768"):
        device.load(program)


def test_devices_are_listed():
    infos = list_devices()
    assert infos[0].name == "emulator" and "msfp16" in infos[0].formats
