"""Write tests/golden/vectors.json from the scalar reference (tests/reference.py).

Run ``python tests/golden/generate.py`` only when docs/datapath.md changes (a new datapath
version); tests/test_golden.py checks that the file still equals what this script produces.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import reference as ref  # noqa: E402

FORMATS = {"msfp16": (16, 7, 12), "msfp12": (16, 3, 12), "mxint8": (32, 7, 12)}
OUTPUT = HERE / "vectors.json"


def encode(array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array)
    little = array.astype(array.dtype.newbyteorder("<"))
    return {"dtype": array.dtype.name, "shape": list(array.shape), "hex": little.tobytes().hex()}


def decode(entry: dict) -> np.ndarray:
    dtype = np.dtype(entry["dtype"]).newbyteorder("<")
    flat = np.frombuffer(bytes.fromhex(entry["hex"]), dtype=dtype)
    return flat.astype(dtype.newbyteorder("=")).reshape(entry["shape"])


def _specials(rng: np.random.Generator, shape) -> np.ndarray:
    x = (rng.standard_normal(shape) * np.exp2(rng.integers(-20, 20, shape))).astype(np.float32)
    flat = x.reshape(-1)
    picks = rng.choice(flat.size, size=min(6, flat.size), replace=False)
    flat[picks] = [np.nan, np.inf, -np.inf, 1e-40, 3.4e38, 0.0][: len(picks)]
    return x


def quantize_cases(rng: np.random.Generator) -> list[dict]:
    edge = {
        "zeros": np.zeros((2, 40), np.float32),
        "ties": np.array([[64.0, 2.5, 3.5, -5.5, 0.5, 1.5, 127.5, -126.5]], np.float32),
        "max_and_subnormal": np.array([[3.4028235e38, -1e-45, 1e-40, 1.0]], np.float32),
        "nan_inf": np.array([[1.0] * 3 + [np.nan] + [1.0] * 30 + [np.inf, -2.0]], np.float32),
        "window": np.concatenate([np.ones(16), np.full(16, 3 * 2.0**-17)]).reshape(1, 32),
        "random_wide": (
            rng.standard_normal((3, 4, 37)) * np.exp2(rng.integers(-40, 40, (3, 4, 37)))
        ),
    }
    cases = []
    for name, params in FORMATS.items():
        for label, x in edge.items():
            x = np.asarray(x, np.float32)
            mantissas, codes = ref.quantize(x, *params)
            cases.append(
                {
                    "name": f"quantize/{name}/{label}",
                    "op": "quantize",
                    "format": name,
                    "inputs": {"x": encode(x)},
                    "expected": {
                        "mantissas": encode(mantissas.astype(np.int8)),
                        "codes": encode(codes.astype(np.uint8)),
                    },
                }
            )
    return cases


CONVS = {
    "3x3_same": dict(
        shape=(2, 5, 5, 20),
        filters=6,
        kernel=(3, 3),
        strides=(1, 1),
        dilation=(1, 1),
        padding=(1, 1, 1, 1),
        groups=1,
    ),
    "stem_7x7_s2_c3": dict(
        shape=(1, 9, 9, 3),
        filters=4,
        kernel=(7, 7),
        strides=(2, 2),
        dilation=(1, 1),
        padding=(3, 3, 3, 3),
        groups=1,
    ),
    "1x1_s2": dict(
        shape=(1, 6, 6, 40),
        filters=5,
        kernel=(1, 1),
        strides=(2, 2),
        dilation=(1, 1),
        padding=(0, 0, 0, 0),
        groups=1,
    ),
    "dilated": dict(
        shape=(1, 7, 7, 17),
        filters=3,
        kernel=(3, 3),
        strides=(1, 1),
        dilation=(2, 2),
        padding=(2, 2, 2, 2),
        groups=1,
    ),
    "grouped": dict(
        shape=(1, 5, 5, 12),
        filters=6,
        kernel=(3, 3),
        strides=(1, 1),
        dilation=(1, 1),
        padding=(0, 1, 0, 1),
        groups=3,
    ),
    "depthwise": dict(
        shape=(2, 6, 6, 24),
        filters=24,
        kernel=(3, 3),
        strides=(2, 2),
        dilation=(1, 1),
        padding=(0, 1, 0, 1),
        groups=24,
    ),
    "dense": dict(
        shape=(3, 1, 1, 100),
        filters=7,
        kernel=(1, 1),
        strides=(1, 1),
        dilation=(1, 1),
        padding=(0, 0, 0, 0),
        groups=1,
    ),
}


def conv_cases(rng: np.random.Generator) -> list[dict]:
    cases = []
    for name, params in FORMATS.items():
        for label, spec in CONVS.items():
            shape = spec["shape"]
            x = (
                _specials(rng, shape)
                if label == "3x3_same"
                else (rng.standard_normal(shape) * np.exp2(rng.integers(-6, 6, shape))).astype(
                    np.float32
                )
            )
            reduction = spec["kernel"][0] * spec["kernel"][1] * shape[3] // spec["groups"]
            w = (rng.standard_normal((spec["filters"], reduction)) * 0.2).astype(np.float32)
            w_m, w_c = ref.quantize(w, *params)
            attrs = {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in spec.items()
                if k not in ("shape",)
            }
            y = ref.conv2d(
                x,
                w_m,
                w_c,
                params,
                spec["kernel"],
                spec["strides"],
                spec["dilation"],
                spec["padding"],
                spec["groups"],
            )
            cases.append(
                {
                    "name": f"conv2d/{name}/{label}",
                    "op": "conv2d",
                    "format": name,
                    "attrs": attrs,
                    "inputs": {"x": encode(x)},
                    "params": {
                        "weight_mantissas": encode(w_m.astype(np.int8)),
                        "weight_codes": encode(w_c.astype(np.uint8)),
                    },
                    "expected": {"y": encode(y)},
                }
            )
    return cases


def vector_cases(rng: np.random.Generator) -> list[dict]:
    x = ref.elementwise(ref.canon, _specials(rng, (2, 4, 5, 3)))
    other = ref.elementwise(ref.canon, _specials(rng, (2, 4, 5, 3)))
    p = ref.elementwise(ref.canon, _specials(rng, (3, 3)))
    b, s, t = p
    full = lambda v: np.broadcast_to(v, x.shape)  # noqa: E731
    cases = [
        ("bias", {"x": x}, {"bias": b}, {}, ref.elementwise(ref.op_add, x, full(b))),
        (
            "scale_shift",
            {"x": x},
            {"scale": s, "shift": t},
            {},
            ref.elementwise(
                lambda v, sv, tv: ref.op_add(ref.op_mul(v, sv), tv), x, full(s), full(t)
            ),
        ),
        ("relu", {"x": x}, {}, {}, ref.elementwise(ref.relu, x)),
        ("relu6", {"x": x}, {}, {}, ref.elementwise(ref.relu6, x)),
        ("add", {"x": x, "y": other}, {}, {}, ref.elementwise(ref.op_add, x, other)),
    ]
    for kind in ("max", "avg"):
        for label, geo in {
            "3x3_s2_same": ((3, 3), (2, 2), (1, 1, 1, 1)),
            "2x2_s2": ((2, 2), (2, 2), (0, 0, 0, 0)),
        }.items():
            attrs = {"pool": list(geo[0]), "strides": list(geo[1]), "padding": list(geo[2])}
            cases.append((f"{kind}_pool", {"x": x}, {}, attrs, ref.pool(x, kind, *geo), label))
        whole = ((4, 5), (1, 1), (0, 0, 0, 0))
        cases.append(
            (f"global_{kind}_pool", {"x": x}, {}, {}, ref.pool(x, kind, *whole).reshape(2, 3))
        )
    out = []
    for case in cases:
        op, inputs, params, attrs, expected = case[:5]
        label = case[5] if len(case) > 5 else "specials"
        out.append(
            {
                "name": f"{op}/{label}",
                "op": op,
                "format": "any",
                "attrs": attrs,
                "inputs": {k: encode(v) for k, v in inputs.items()},
                "params": {k: encode(np.asarray(v, np.float32)) for k, v in params.items()},
                "expected": {"y": encode(expected)},
            }
        )
    return out


def build() -> dict:
    rng = np.random.default_rng(20261124)
    return {
        "datapath_version": 1,
        "generated_by": "tests/golden/generate.py from tests/reference.py",
        "encoding": "each array is {dtype, shape, hex}: little-endian bytes, C order",
        "cases": quantize_cases(rng) + conv_cases(rng) + vector_cases(rng),
    }


if __name__ == "__main__":
    OUTPUT.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {OUTPUT}")
