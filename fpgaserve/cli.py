"""The ``fpgaserve`` command."""

from __future__ import annotations

import argparse
import json
import sys

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
