"""fpgaserve: image models served over gRPC with the featurizer on an FPGA, or its emulator."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fpgaserve")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
