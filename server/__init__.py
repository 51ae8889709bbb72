"""The gRPC predict server: protocol adapters (TensorFlow Serving, KServe v2, health,
reflection) -> model repository -> per-model scheduler -> pipeline stages -> HAL device."""

from .app import FpgaServer, ServerConfig, TlsConfig
from .repository import ModelRepository, VersionPolicy
from .scheduler import BatchingConfig

__all__ = [
    "BatchingConfig",
    "FpgaServer",
    "ModelRepository",
    "ServerConfig",
    "TlsConfig",
    "VersionPolicy",
]
