"""The accelerator program file: safetensors with the op graph as JSON metadata.

One portable file, no pickle, readable without TensorFlow (safetensors and NumPy only). Layout:

* tensors ``<op index>.<param>`` (float32) and, for quantized weights,
  ``<op index>.<param>.mantissas`` (int8) and ``<op index>.<param>.codes`` (uint8), little-endian;
* metadata key ``fpgaserve.program``: JSON ``{"schema_version", "datapath_version", "format",
  "inputs", "outputs", "ops", "metadata"}`` where each op is ``{"kind", "name", "inputs",
  "output", "attrs", "params": {name: "float32" | "block"}}``.

Loading checks the schema version, every tensor reference and then the whole program
(``Program.shapes``), so a damaged or foreign file is one clear ``InvalidProgramError``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from .errors import InvalidProgramError
from .formats import BlockFormat, get_format
from .numerics import BlockTensor
from .program import Op, Program

SCHEMA_VERSION = 1
METADATA_KEY = "fpgaserve.program"


def save_program(program: Program, path: str | Path) -> None:
    """Validate and write ``program``; the file is written whole or not at all."""
    program.shapes()
    tensors: dict[str, np.ndarray] = {}
    ops = []
    for index, op in enumerate(program.ops):
        kinds = {}
        for name, value in op.params.items():
            key = f"{index}.{name}"
            if isinstance(value, BlockTensor):
                tensors[f"{key}.mantissas"] = value.mantissas
                tensors[f"{key}.codes"] = value.codes
                kinds[name] = "block"
            else:
                tensors[key] = np.ascontiguousarray(value, dtype=np.float32)
                kinds[name] = "float32"
        ops.append(
            {
                "kind": op.kind,
                "name": op.name,
                "inputs": list(op.inputs),
                "output": op.output,
                "attrs": op.attrs,
                "params": kinds,
            }
        )
    header = {
        "schema_version": SCHEMA_VERSION,
        "datapath_version": program.datapath_version,
        "format": program.format,
        "inputs": {name: list(shape) for name, shape in program.inputs.items()},
        "outputs": list(program.outputs),
        "ops": ops,
        "metadata": program.metadata,
    }
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={METADATA_KEY: json.dumps(header)})
    partial.replace(path)


def load_program(path: str | Path) -> Program:
    """Read and fully validate a program file."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidProgramError(f"{path}: not a readable program file ({exc})") from None
    if METADATA_KEY not in metadata:
        raise InvalidProgramError(f"{path}: safetensors file without an fpgaserve program")
    try:
        header = json.loads(metadata[METADATA_KEY])
        program = _program_from(header, tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidProgramError(f"{path}: malformed program header ({exc!r})") from None
    program.shapes()
    return program


def _program_from(header: dict[str, Any], tensors: dict[str, np.ndarray]) -> Program:
    if header["schema_version"] != SCHEMA_VERSION:
        raise InvalidProgramError(
            f"program file schema {header['schema_version']} is not supported (this build reads "
            f"schema {SCHEMA_VERSION}); rebuild the program with this fpgaserve"
        )
    fmt = get_format(header["format"])
    used: set[str] = set()
    ops = []
    for index, entry in enumerate(header["ops"]):
        params = {}
        for name, kind in entry["params"].items():
            key = f"{index}.{name}"
            if kind == "block":
                if not isinstance(fmt, BlockFormat):
                    raise InvalidProgramError(f"op {entry['name']!r}: quantized weights in fp32")
                parts = (f"{key}.mantissas", f"{key}.codes")
                params[name] = BlockTensor(tensors[parts[0]], tensors[parts[1]], fmt)
                used.update(parts)
            elif kind == "float32":
                params[name] = tensors[key]
                used.add(key)
            else:
                raise InvalidProgramError(f"op {entry['name']!r}: unknown parameter kind {kind!r}")
        ops.append(
            Op(
                kind=entry["kind"],
                name=entry["name"],
                inputs=tuple(entry["inputs"]),
                output=entry["output"],
                attrs=dict(entry["attrs"]),
                params=params,
            )
        )
    extra = set(tensors) - used
    if extra:
        raise InvalidProgramError(f"program file holds tensors no op uses: {sorted(extra)[:5]}")
    return Program(
        format=header["format"],
        inputs={name: tuple(shape) for name, shape in header["inputs"].items()},
        outputs=tuple(header["outputs"]),
        ops=ops,
        datapath_version=header["datapath_version"],
        metadata=dict(header.get("metadata", {})),
    )
