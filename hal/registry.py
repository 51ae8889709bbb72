"""Device discovery and selection by name: ``emulator``, ``opencl``, ``opencl:N`` or a
substring of an OpenCL "platform: device" description."""

from __future__ import annotations

from .device import Device, DeviceInfo
from .emulator.device import EmulatorDevice
from .errors import DeviceNotFoundError

DEFAULT_DEVICE = "emulator"


def _opencl_devices() -> list:
    """(index, cl.Device) for every OpenCL device; none if pyopencl or the ICD loader fails."""
    try:
        import pyopencl as cl

        platforms = cl.get_platforms()
    except Exception:  # no ICD loader, no platform: simply no OpenCL devices here
        return []
    devices = [device for platform in platforms for device in platform.get_devices()]
    return list(enumerate(devices))


def list_devices() -> list[DeviceInfo]:
    """Every device this machine can open, the emulator first."""
    from .opencl.device import device_info

    return [EmulatorDevice().info] + [device_info(i, d) for i, d in _opencl_devices()]


def open_device(name: str = DEFAULT_DEVICE) -> Device:
    """Open the device called ``name``; an unknown name lists the known ones."""
    if name == "emulator":
        device: Device = EmulatorDevice()
        device.open()
        return device
    from .opencl.device import OpenCLDevice, device_info

    for index, cl_device in _opencl_devices():
        info = device_info(index, cl_device)
        if name in ("opencl", info.name) or (
            not name.startswith(("opencl", "emulator")) and name.lower() in info.description.lower()
        ):
            device = OpenCLDevice(index, cl_device)
            device.open()
            return device
    known = ", ".join(info.name for info in list_devices())
    raise DeviceNotFoundError(f"no HAL device named {name!r}; available: {known}")
