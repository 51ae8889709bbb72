"""Typed HAL errors, so the server can map each to the right gRPC status without guessing."""


class HalError(Exception):
    """Base class of every error the HAL raises on purpose."""


class DeviceNotFoundError(HalError):
    """No device matches the requested name (server: NOT_FOUND / startup error)."""


class DeviceClosedError(HalError):
    """The device was used after ``close()`` (a programming error in the caller)."""


class InvalidProgramError(HalError):
    """The program cannot run on this datapath; the message names the op and the reason."""


class InvalidInputError(HalError):
    """A run's inputs do not match the program (server: INVALID_ARGUMENT)."""


class UnknownProgramError(HalError):
    """A run or unload named a program handle this device does not hold."""


class DeviceFaultError(HalError):
    """The device failed while running (server: UNAVAILABLE; the request may be retried)."""
