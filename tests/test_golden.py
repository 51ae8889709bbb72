"""Golden vectors (tests/golden/vectors.json): the emulator reproduces every one, bit for bit.

The OpenCL kernels replay the same file. The file itself must still be what the scalar reference
produces, so it cannot drift from docs/datapath.md unnoticed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_same_bits
from fpgaserve.hal import BlockTensor, get_format, quantize
from fpgaserve.hal.emulator import vector_unit as vu
from fpgaserve.hal.emulator.matrix_unit import Geometry, conv2d, prepare_weights

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
import generate  # noqa: E402

CASES = json.loads((GOLDEN / "vectors.json").read_text())["cases"]


def run_case(case: dict) -> dict[str, np.ndarray]:
    inputs = {k: generate.decode(v) for k, v in case["inputs"].items()}
    params = {k: generate.decode(v) for k, v in case.get("params", {}).items()}
    attrs = case.get("attrs", {})
    op, x = case["op"], inputs["x"]
    if op == "quantize":
        q = quantize(x, get_format(case["format"]))
        return {"mantissas": q.mantissas, "codes": q.codes}
    if op == "conv2d":
        weight = BlockTensor(
            params["weight_mantissas"], params["weight_codes"], get_format(case["format"])
        )
        geometry = Geometry(
            **{
                k: tuple(v) if isinstance(v, list) else v
                for k, v in attrs.items()
                if k != "filters"
            }
        )
        return {"y": conv2d(x, prepare_weights(weight, geometry.groups), geometry)}
    if op in ("max_pool", "avg_pool"):
        pool = getattr(vu, op)
        return {
            "y": pool(x, tuple(attrs["pool"]), tuple(attrs["strides"]), tuple(attrs["padding"]))
        }
    if op == "add":
        return {"y": vu.add(x, inputs["y"])}
    function = getattr(vu, op)
    return {"y": function(x, *params.values())}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_emulator_reproduces_golden_vector(case):
    outputs = run_case(case)
    for name, entry in case["expected"].items():
        expected = generate.decode(entry)
        if expected.dtype == np.float32:
            assert_same_bits(outputs[name], expected)
        else:
            np.testing.assert_array_equal(outputs[name], expected)


def test_golden_file_is_what_the_reference_produces():
    assert generate.build()["cases"] == CASES, "vectors.json is stale: rerun generate.py"


def test_golden_vectors_cover_every_op_and_format():
    ops = {c["op"] for c in CASES}
    assert ops >= {
        "quantize",
        "conv2d",
        "bias",
        "scale_shift",
        "relu",
        "relu6",
        "add",
        "max_pool",
        "avg_pool",
        "global_avg_pool",
        "global_max_pool",
    }
    assert {c["format"] for c in CASES if c["op"] == "conv2d"} == {"msfp16", "msfp12", "mxint8"}
