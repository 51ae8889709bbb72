"""kernels/datapath.cl reproduces every golden vector bit for bit on a real OpenCL device.

The device is PoCL (CPU OpenCL from pip) unless $FPGASERVE_OPENCL_DEVICE names another by
a substring of "platform: device" (a GPU's or a board's platform), so the same suite checks
any device. The device each run used is printed with -s / in the test report.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_matrix_unit import conv_cases

from conftest import assert_same_bits
from fpgaserve.hal import BlockTensor, get_format, quantize
from fpgaserve.hal.emulator.matrix_unit import Geometry, conv2d, prepare_weights

cl = pytest.importorskip("pyopencl")
from fpgaserve.hal.opencl.kernels import DatapathKernels, find_device  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"
CASES = json.loads((GOLDEN / "vectors.json").read_text())["cases"]


def decode(entry: dict) -> np.ndarray:
    dtype = np.dtype(entry["dtype"]).newbyteorder("<")
    data = np.frombuffer(bytes.fromhex(entry["hex"]), dtype=dtype)
    return data.astype(dtype.newbyteorder("=")).reshape(entry["shape"])


@pytest.fixture(scope="module")
def kernels() -> DatapathKernels:
    try:
        device = find_device()
    except (LookupError, cl.Error) as exc:
        pytest.fail(f"no usable OpenCL device ({exc}); `make test` installs PoCL from pip")
    built = DatapathKernels(device)
    print(f"OpenCL device under test: {built.name}")
    return built


def run_case(kernels: DatapathKernels, case: dict) -> dict[str, np.ndarray]:
    inputs = {k: decode(v) for k, v in case["inputs"].items()}
    params = {k: decode(v) for k, v in case.get("params", {}).items()}
    attrs, op, x = case.get("attrs", {}), case["op"], inputs["x"]
    if op == "quantize":
        mantissas, codes, _ = kernels.quantize(x, get_format(case["format"]))
        return {"mantissas": mantissas, "codes": codes}
    if op == "conv2d":
        weight = BlockTensor(params["weight_mantissas"], params["weight_codes"],
                             get_format(case["format"]))  # fmt: skip
        geometry = Geometry(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in attrs.items() if k != "filters"})  # fmt: skip
        return {"y": kernels.conv2d(x, kernels.upload_weight(weight, geometry), geometry)}
    if op in ("max_pool", "avg_pool"):
        return {"y": kernels.pool(x, op == "avg_pool", attrs["pool"], attrs["strides"],
                                  attrs["padding"])}  # fmt: skip
    if op.startswith("global_"):
        whole = (x.shape[1], x.shape[2])
        out = kernels.pool(x, op == "global_avg_pool", whole, (1, 1), (0, 0, 0, 0))
        return {"y": out.reshape(x.shape[0], -1)}
    if op in ("bias", "scale_shift"):
        return {"y": kernels.elementwise(op, x, *params.values())}
    if op == "add":
        return {"y": kernels.elementwise("add", x, inputs["y"])}
    return {"y": kernels.elementwise(op, x)}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_kernels_reproduce_golden_vector(kernels, case):
    outputs = run_case(kernels, case)
    for name, entry in case["expected"].items():
        expected = decode(entry)
        if expected.dtype == np.float32:
            assert_same_bits(outputs[name], expected)
        else:
            np.testing.assert_array_equal(outputs[name], expected)


@pytest.mark.parametrize("name", ["msfp16", "msfp12", "mxint8"])
@settings(max_examples=10)
@given(case=conv_cases())
def test_kernels_match_emulator_on_random_convolutions(kernels, name, case):
    x, w, geometry = case
    weight = quantize(w, get_format(name))
    expected = conv2d(x, prepare_weights(weight, geometry.groups), geometry)
    assert_same_bits(kernels.conv2d(x, kernels.upload_weight(weight, geometry), geometry), expected)


@pytest.mark.parametrize("name", ["msfp16", "msfp12", "mxint8"])
@settings(max_examples=10)
@given(case=conv_cases(aligned=True))
def test_block_matrix_unit_matches_emulator(kernels, name, case):
    """conv2d_blocks (int8 block dot products, shifted into 64 bits): the layers with one group
    and whole blocks of channels, most of every zoo model. Partial filter tiles, NaN blocks,
    padding, strides and dilation included."""
    x, w, geometry = case
    weight = quantize(w, get_format(name))
    on_device = kernels.upload_weight(weight, geometry)
    assert on_device.blocked
    expected = conv2d(x, prepare_weights(weight, geometry.groups), geometry)
    assert_same_bits(kernels.conv2d(x, on_device, geometry), expected)


@pytest.mark.parametrize("name", ["msfp16", "msfp12", "mxint8"])
@given(x=hnp.arrays(np.float32, (3, 4, 37), elements=st.floats(width=32)))
def test_kernels_match_emulator_on_random_quantization(kernels, name, x):
    expected = quantize(x, get_format(name))
    mantissas, codes, _ = kernels.quantize(x, get_format(name))
    np.testing.assert_array_equal(mantissas, expected.mantissas)
    np.testing.assert_array_equal(codes, expected.codes)
