"""The ``fpgaserve`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__


def _devices(args: argparse.Namespace) -> int:
    from .hal import list_devices

    infos = list_devices()
    if args.json:
        print(json.dumps([info.as_dict() for info in infos], indent=2))
        return 0
    print(f"{'NAME':<12} {'KIND':<12} {'MEMORY':>10}  {'SOURCE':<6}  FORMATS / DESCRIPTION")
    for info in infos:
        memory = f"{info.memory_bytes / 2**30:.1f} GiB" if info.memory_bytes else "host"
        source = "yes" if info.compiles_from_source else "no"
        print(
            f"{info.name:<12} {info.kind:<12} {memory:>10}  {source:<6}  "
            f"{','.join(info.formats)} / {info.description}"
        )
    return 0


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def _read_labels(path: Path) -> list[str]:
    """A JSON list of class names, or Keras's class index ({"0": ["n01440764", "tench"]})."""
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        return [data[str(i)][1] for i in range(len(data))]
    return [str(name) for name in data]


def _calibration_images(folder: Path, preset: str, count: int):
    from .preprocessing import preprocess

    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not files:
        raise ValueError(f"no .jpg/.jpeg/.png images in {folder}")
    return preprocess([f.read_bytes() for f in files], preset).numpy()


def _build(args: argparse.Namespace) -> int:
    from .compiler.zoo import ZOO
    from .pipeline import (
        ImagePreprocessing,
        ModelDefinition,
        QuantizedKerasModel,
        QuantizedZooModel,
    )

    if args.model not in ZOO and not args.model.endswith(".keras"):
        raise ValueError(f"MODEL must be a zoo name ({', '.join(ZOO)}) or a .keras file")
    preset = args.preprocess or (ZOO[args.model].preprocess if args.model in ZOO else None)
    if preset is None:
        raise ValueError("a .keras model needs --preprocess tf|torch|caffe")
    calibration = None
    if args.calibration:
        calibration = _calibration_images(args.calibration, preset, args.calibration_count)
        print(f"calibrating bias correction on {len(calibration)} images from {args.calibration}")
    if args.model in ZOO:
        model = QuantizedZooModel(args.model, args.weights, args.format, calibration)
    else:
        model = QuantizedKerasModel(args.model, args.format, calibration=calibration)
    weights = model.compiled.program.metadata.get("weights", "from the .keras file")
    if weights.startswith("random"):
        print("WARNING: random weights: predictions will be meaningless", file=sys.stderr)
    definition = ModelDefinition(
        args.name or (args.model if args.model in ZOO else Path(args.model).stem),
        [ImagePreprocessing(preset=preset), model.featurizer(), model.default_classifier()],
        _read_labels(args.labels) if args.labels else None,
    )
    path = definition.save(args.output)
    print(
        f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): {definition.name}, "
        f"{model.format}, weights {weights}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fpgaserve",
        description="Deploy image models as gRPC services with the featurizer on an FPGA.",
    )
    parser.add_argument("--version", action="version", version=f"fpgaserve {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    devices = commands.add_parser("devices", help="list the HAL devices this machine can use")
    devices.add_argument("--json", action="store_true", help="print JSON instead of a table")
    devices.set_defaults(handler=_devices)
    build = commands.add_parser("build", help="compile a model into a service definition archive")
    build.add_argument("model", metavar="MODEL", help="a zoo name (resnet50, ...) or a .keras file")
    build.add_argument("--weights", default="imagenet", help="imagenet, random, or a file path")
    build.add_argument("--format", default="msfp16", help="msfp16, msfp12, mxint8 or fp32")
    build.add_argument("-o", "--output", required=True, type=Path, help="archive to write")
    build.add_argument("--name", help="service name (default: the model name)")
    build.add_argument("--preprocess", choices=["tf", "torch", "caffe"],
                       help="input normalisation (zoo models know theirs)")  # fmt: skip
    build.add_argument("--calibration", type=Path, help="folder of images for bias correction")
    build.add_argument("--calibration-count", type=int, default=64)
    build.add_argument("--labels", type=Path, help="class names: JSON list or Keras class index")
    build.set_defaults(handler=_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's startup chatter
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.handler(args)
    except (ValueError, RuntimeError, OSError, KeyError) as exc:
        # Every error we raise on purpose says what to fix; no traceback for users.
        print(f"fpgaserve {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
