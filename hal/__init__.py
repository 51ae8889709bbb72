"""Hardware abstraction layer: one device interface over the emulator and OpenCL boards."""

from .device import Device, DeviceInfo
from .errors import (
    DeviceClosedError,
    DeviceFaultError,
    DeviceNotFoundError,
    HalError,
    InvalidInputError,
    InvalidProgramError,
    UnknownProgramError,
)
from .formats import FORMATS, BlockFormat, FloatFormat, get_format
from .numerics import BlockTensor, canonicalize, quantize
from .program import MATRIX_OPS, Op, Program
from .program_file import load_program, save_program
from .registry import DEFAULT_DEVICE, list_devices, open_device

__all__ = [
    "DEFAULT_DEVICE",
    "FORMATS",
    "MATRIX_OPS",
    "BlockFormat",
    "BlockTensor",
    "Device",
    "DeviceClosedError",
    "DeviceFaultError",
    "DeviceInfo",
    "DeviceNotFoundError",
    "FloatFormat",
    "HalError",
    "InvalidInputError",
    "InvalidProgramError",
    "Op",
    "Program",
    "UnknownProgramError",
    "canonicalize",
    "get_format",
    "list_devices",
    "load_program",
    "open_device",
    "quantize",
    "save_program",
]
