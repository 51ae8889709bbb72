"""The ``fpgaserve`` command."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    from .server import FpgaServer


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


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse type for a count or a time: a finite number above zero. A negative --top
    would silently print all but the last classes, a negative timeout fail every call."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
        return value

    return parse


def _read_labels(path: Path) -> list[str]:
    """A JSON list of class names, or Keras's class index ({"0": ["n01440764", "tench"]})."""
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        return [data[str(i)][1] for i in range(len(data))]
    return [str(name) for name in data]


# Keras's own ImageNet class index (what keras.applications' decode_predictions downloads).
IMAGENET_CLASS_INDEX = (
    "https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json",
    "c2c37ea517e94d9795004a39431a14cb",
)


def _imagenet_labels() -> list[str] | None:
    """ImageNet class names through Keras's download cache; None (with a note) offline."""
    import keras

    url, md5 = IMAGENET_CLASS_INDEX
    try:
        path = keras.utils.get_file("imagenet_class_index.json", url, file_hash=md5)
    except Exception as exc:  # Keras raises many kinds for a failed download
        print(f"note: no ImageNet class names ({exc}); pass --labels FILE to add them")
        return None
    return _read_labels(Path(path))


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
        print("*" * 78 + "\nWARNING: RANDOM WEIGHTS: this model's predictions are meaningless "
              "(metadata\nrecords weights: random). Use --weights imagenet or a weights file.\n"
              + "*" * 78, file=sys.stderr)  # fmt: skip
    definition = ModelDefinition(
        args.name or (args.model if args.model in ZOO else Path(args.model).stem),
        [ImagePreprocessing(preset=preset), model.featurizer(), model.default_classifier()],
        _read_labels(args.labels)
        if args.labels
        else _imagenet_labels()
        if args.model in ZOO
        else None,
    )
    path = definition.save(args.output)
    print(
        f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): {definition.name}, "
        f"{model.format}, weights {weights}"
    )
    return 0


def _env(flag: str, default=None):
    """Every serve flag can come from FPGASERVE_<FLAG> (containers are configured that way)."""
    return os.environ.get("FPGASERVE_" + flag.upper().replace("-", "_"), default)


LOG_FORMATS = ("json", "text")


def _number(args: argparse.Namespace, option: str, kind: type[int] | type[float] = int):
    """An option's value, from the command line or FPGASERVE_<OPTION>, as ``kind``; a bad one
    is named (int() alone would say only "invalid literal")."""
    text = getattr(args, option.replace("-", "_"))
    try:
        return kind(text)
    except (TypeError, ValueError):
        variable = "FPGASERVE_" + option.upper().replace("-", "_")
        whole = "a whole number" if kind is int else "a number"
        raise ValueError(f"--{option} (or {variable}) must be {whole}, not {text!r}") from None


def _serve(args: argparse.Namespace) -> int:
    from .hal import HalError
    from .server import BatchingConfig, FpgaServer, ServerConfig, TlsConfig, VersionPolicy
    from .server.auth import load_keys
    from .server.logs import configure

    if args.log_format not in LOG_FORMATS:  # argparse checks only what the command line gave
        raise ValueError(
            f"FPGASERVE_LOG_FORMAT must be one of {LOG_FORMATS}, not {args.log_format!r}"
        )
    configure(args.log_format)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    if args.tls_client_ca and not args.tls_cert:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    metrics_port = _number(args, "metrics-port")  # below 0: no metrics endpoint
    config = ServerConfig(
        archives=[Path(p) for p in args.archives],
        model_repository=Path(args.model_repository) if args.model_repository else None,
        host=args.host,
        port=_number(args, "port"),
        metrics_port=None if metrics_port < 0 else metrics_port,
        device=args.device,
        batching=BatchingConfig(
            max_batch_size=_number(args, "max-batch-size"),
            max_queue_delay_s=_number(args, "max-queue-delay-ms", float) / 1e3,
            max_queue_size=_number(args, "max-queue-size"),
        ),
        version_policy=VersionPolicy.parse(args.version_policy),
        poll_seconds=_number(args, "poll-seconds", float),
        max_concurrent_calls=_number(args, "max-concurrent-calls"),
        max_message_bytes=int(_number(args, "max-message-mb", float) * 2**20),
        max_image_pixels=_number(args, "max-image-pixels"),
        tls=TlsConfig(Path(args.tls_cert), Path(args.tls_key),
                      Path(args.tls_client_ca) if args.tls_client_ca else None)
        if args.tls_cert else None,
        auth_keys=load_keys(Path(args.auth_keys_file) if args.auth_keys_file else None),
        drain_seconds=_number(args, "drain-seconds", float),
        max_connection_age_s=_number(args, "max-connection-age-seconds", float),
    )  # fmt: skip
    try:
        server = FpgaServer(config)
    except HalError as exc:  # no such device, or it cannot be opened: the user's to fix
        raise ValueError(f"device {config.device!r}: {exc}") from None
    return serve_until_signalled(server)


# The drain ran out of time with calls still running (their threads cannot be interrupted).
EXIT_DRAIN_TIMED_OUT = 3


def serve_until_signalled(server: FpgaServer) -> int:
    """Start ``server``, drain it on SIGTERM or SIGINT, and return 0. If the drain times out,
    end the process at once with EXIT_DRAIN_TIMED_OUT: a call stuck in a device run holds a
    thread that Python would otherwise wait for at exit, forever."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    stop.wait()
    if not server.stop():
        logging.shutdown()  # flush the logs; os._exit skips every exit handler
        os._exit(EXIT_DRAIN_TIMED_OUT)
    return 0


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if args.tls_ca:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(args.tls_ca).read_bytes(),
            private_key=Path(args.tls_key).read_bytes() if args.tls_key else None,
            certificate_chain=Path(args.tls_cert).read_bytes() if args.tls_cert else None,
        )
        options = [("grpc.ssl_target_name_override", args.tls_server_name)]
        channel = grpc.secure_channel(
            args.address, credentials, options if args.tls_server_name else None
        )
    else:
        channel = grpc.insecure_channel(args.address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service),
                               timeout=args.timeout)  # fmt: skip
        except grpc.RpcError as exc:
            print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address} {args.service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _predict(args: argparse.Namespace) -> int:
    from .client import PredictionError, V2PredictionClient, top_k

    client_class = V2PredictionClient
    if args.protocol == "tfserving":
        from .client import PredictionClient as client_class
    if bool(args.cert) != bool(args.key):
        raise ValueError("mutual TLS needs both --cert and --key")
    client = client_class(
        args.address, use_ssl=bool(args.ssl or args.ca or args.cert), access_token=args.token or "",
        model_name=args.model, root_certificates=Path(args.ca).read_bytes() if args.ca else None,
        certificate_chain=Path(args.cert).read_bytes() if args.cert else None,
        private_key=Path(args.key).read_bytes() if args.key else None,
        timeout=args.timeout,
    )  # fmt: skip
    results = {}
    with client:
        for image in args.images:
            try:
                scores = client.score_file(image)
            except PredictionError as exc:
                print(f"fpgaserve predict: {image}: {exc}", file=sys.stderr)
                return 1
            results[image] = top_k(scores, args.top)
    if args.json:
        print(json.dumps({image: [{"class": name, "confidence": p} for name, p in best]
                          for image, best in results.items()}, indent=2))  # fmt: skip
        return 0
    for image, best in results.items():
        print(image)
        for name, confidence in best:
            print(f"  {confidence:7.2%}  {name}")
    return 0


def _add_predict(commands) -> None:
    predict = commands.add_parser("predict", help="classify images with a running server")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG or PNG files")
    predict.add_argument("--address", default=_env("address", "localhost:8500"))
    predict.add_argument("--model", default="", help="model name (needed if several are served)")
    predict.add_argument("--top", type=_positive(int), default=5, help="how many classes to print")
    predict.add_argument("--json", action="store_true", help="print JSON")
    predict.add_argument(
        "--protocol",
        choices=["v2", "tfserving"],
        default="v2",
        help="KServe v2 (default; no TensorFlow needed) or TF Serving",
    )
    predict.add_argument("--ssl", action="store_true", help="TLS with the system's CAs")
    predict.add_argument("--ca", help="TLS with this CA certificate (PEM)")
    predict.add_argument("--cert", help="client certificate for mutual TLS (PEM; needs --key)")
    predict.add_argument("--key", help="the client certificate's private key (PEM)")
    predict.add_argument("--token", default=_env("token"), help="bearer token (FPGASERVE_TOKEN)")
    predict.add_argument("--timeout", type=_positive(float), default=30.0, help="seconds per image")
    predict.set_defaults(handler=_predict)


def _add_serve(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve archives over gRPC (TF Serving, KServe v2, health, reflection)",
        description="Every option can also be set by an environment variable "
        "FPGASERVE_<OPTION>, e.g. FPGASERVE_MODEL_REPOSITORY; bearer keys also by "
        "FPGASERVE_AUTH_KEYS (comma-separated).",
    )
    serve.add_argument("archives", nargs="*", metavar="ARCHIVE", help="service definition archives")
    serve.add_argument(
        "--model-repository",
        default=_env("model-repository"),
        help="folder of <name>/<version>/model.zip, watched for changes",
    )
    serve.add_argument("--host", default=_env("host", "0.0.0.0"))
    serve.add_argument("--port", default=_env("port", 8500), help="gRPC port (default 8500)")
    serve.add_argument(
        "--metrics-port",
        default=_env("metrics-port", 8501),
        help="Prometheus /metrics port (default 8501; -1 turns it off)",
    )
    serve.add_argument(
        "--device",
        default=_env("device", "emulator"),
        help="emulator, opencl, opencl:N or a device name (see `fpgaserve devices`)",
    )
    serve.add_argument("--max-batch-size", default=_env("max-batch-size", 8))
    serve.add_argument(
        "--max-queue-delay-ms",
        default=_env("max-queue-delay-ms", 0),
        help="wait this long to fill a device batch, only while requests are "
        "already on their way (default 0)",
    )
    serve.add_argument(
        "--max-queue-size",
        default=_env("max-queue-size", 64),
        help="images in flight per model before RESOURCE_EXHAUSTED (default 64)",
    )
    serve.add_argument(
        "--max-concurrent-calls",
        default=_env("max-concurrent-calls", 64),
        help="inference calls handled at once, all models together, before RESOURCE_EXHAUSTED "
        "(default 64; each holds a thread)",
    )
    serve.add_argument(
        "--max-message-mb",
        default=_env("max-message-mb", 64),
        help="largest request or response in MiB (default 64)",
    )
    serve.add_argument(
        "--max-image-pixels",
        default=_env("max-image-pixels", 40_000_000),
        help="largest image (width x height) accepted; its header is checked before decoding",
    )
    serve.add_argument(
        "--version-policy",
        default=_env("version-policy", "latest"),
        help="latest, all, or versions like 1,3",
    )
    serve.add_argument(
        "--poll-seconds",
        default=_env("poll-seconds", 5),
        help="how often the model repository is rescanned",
    )
    serve.add_argument("--tls-cert", default=_env("tls-cert"), help="server certificate (PEM)")
    serve.add_argument("--tls-key", default=_env("tls-key"), help="server private key (PEM)")
    serve.add_argument(
        "--tls-client-ca",
        default=_env("tls-client-ca"),
        help="CA that client certificates must chain to (mutual TLS)",
    )
    serve.add_argument(
        "--auth-keys-file",
        default=_env("auth-keys-file"),
        help="file of accepted bearer keys, one per line",
    )
    serve.add_argument(
        "--drain-seconds",
        default=_env("drain-seconds", 30),
        help="on SIGTERM, how long accepted requests may take to finish",
    )
    serve.add_argument(
        "--max-connection-age-seconds",
        default=_env("max-connection-age-seconds", 0),
        help="close client connections after this long so they rebalance over new replicas "
        "(default 0: never)",
    )
    serve.add_argument("--log-format", default=_env("log-format", "json"), choices=LOG_FORMATS)
    serve.set_defaults(handler=_serve)
    health = commands.add_parser(
        "health", help="ask a server's gRPC health service (exit 0 if SERVING)"
    )
    health.add_argument("--address", default="localhost:8500")
    health.add_argument("--service", default="", help="a model name; empty for the whole server")
    health.add_argument("--timeout", type=_positive(float), default=3.0)
    health.add_argument("--tls-ca", default=_env("health-tls-ca"), help="CA of a TLS server (PEM)")
    health.add_argument(
        "--tls-cert", default=_env("health-tls-cert"), help="client certificate (mTLS)"
    )
    health.add_argument("--tls-key", default=_env("health-tls-key"), help="client key (mTLS)")
    health.add_argument(
        "--tls-server-name",
        default=_env("health-tls-server-name"),
        help="name in the server certificate, if not the host",
    )
    health.set_defaults(handler=_health)


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
    build.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet, random, auto (imagenet if it can be downloaded, else random), or a path",
    )
    build.add_argument("--format", default="msfp16", help="msfp16, msfp12, mxint8 or fp32")
    build.add_argument("-o", "--output", required=True, type=Path, help="archive to write")
    build.add_argument("--name", help="service name (default: the model name)")
    build.add_argument("--preprocess", choices=["tf", "torch", "caffe"],
                       help="input normalisation (zoo models know theirs)")  # fmt: skip
    build.add_argument("--calibration", type=Path, help="folder of images for bias correction")
    build.add_argument("--calibration-count", type=_positive(int), default=64)
    build.add_argument("--labels", type=Path, help="class names: JSON list or Keras class index")
    build.set_defaults(handler=_build)
    _add_serve(commands)
    _add_predict(commands)
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
    except ModuleNotFoundError as exc:  # a light install (the client only) running a server command
        print(f"fpgaserve {args.command}: needs {exc.name!r}, part of the server install: "
              "pip install 'fpgaserve[server]'", file=sys.stderr)  # fmt: skip
        return 1
    except (ValueError, RuntimeError, OSError, KeyError) as exc:
        # Every error we raise on purpose says what to fix; no traceback for users.
        print(f"fpgaserve {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
