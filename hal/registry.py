"""Device discovery and selection by name (``--device emulator``)."""

from __future__ import annotations

from .device import Device, DeviceInfo
from .emulator.device import EmulatorDevice
from .errors import DeviceNotFoundError

DEFAULT_DEVICE = "emulator"


def list_devices() -> list[DeviceInfo]:
    """Every device this machine can open, the emulator first."""
    return [EmulatorDevice().info]


def open_device(name: str = DEFAULT_DEVICE) -> Device:
    """Open the device called ``name``; an unknown name lists the known ones."""
    if name == "emulator":
        device = EmulatorDevice()
        device.open()
        return device
    known = ", ".join(info.name for info in list_devices())
    raise DeviceNotFoundError(f"no HAL device named {name!r}; available: {known}")
