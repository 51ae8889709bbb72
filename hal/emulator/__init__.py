"""The bit-accurate NumPy emulator backend of the HAL."""

from .device import EmulatorDevice

__all__ = ["EmulatorDevice"]
