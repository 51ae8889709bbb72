"""Compile the .proto files in this folder with grpcio-tools into importable modules.

protoc writes ``import x_pb2`` in the gRPC module, which only works from the folder itself; the
import is rewritten to a relative one so the modules work as ``fpgaserve.protos``. Run
``python protos/generate.py`` after editing a .proto; a test fails while the output is stale.
"""

from __future__ import annotations

import re
import sys
import tempfile
from importlib.resources import files
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent


def generate(target: Path) -> list[Path]:
    """Write the generated modules for every .proto here into ``target``; returns them."""
    include = str(files("grpc_tools") / "_proto")
    written = []
    for proto in sorted(HERE.glob("*.proto")):
        args = ["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={target}",
                f"--pyi_out={target}", f"--grpc_python_out={target}", proto.name]  # fmt: skip
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto.name}")
        stem = proto.stem
        grpc_module = target / f"{stem}_pb2_grpc.py"
        text = re.sub(rf"^import {stem}_pb2 as", f"from . import {stem}_pb2 as",
                      grpc_module.read_text(), flags=re.MULTILINE)  # fmt: skip
        grpc_module.write_text(text)
        written += [target / f"{stem}_pb2.py", target / f"{stem}_pb2.pyi", grpc_module]
    return written


def main(argv: list[str]) -> int:
    """``generate.py``: update this folder. ``generate.py --out DIR``: write into DIR only."""
    if argv[:1] == ["--out"]:
        for path in generate(Path(argv[1])):
            print(path)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        for path in generate(Path(scratch)):
            (HERE / path.name).write_bytes(path.read_bytes())
            print(f"wrote protos/{path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
