"""Number formats of the accelerator datapath (docs/datapath.md, section 2).

Formats are plain data, kept apart from the ops that use them (as microxcaling does), so the
compiler, the emulator and the OpenCL backend all read one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Largest reduction length (terms per output) of the matrix unit, section 4.2.
R_MAX = 1 << 15
#: Shared-exponent range of the E8M0 code; code 255 marks a NaN block.
EXP_MIN = -127
EXP_MAX = 127
EXP_BIAS = 127
NAN_CODE = 255


@dataclass(frozen=True)
class BlockFormat:
    """A block floating point format: ``B`` elements share an 8-bit exponent."""

    name: str
    block_size: int
    mantissa_bits: int
    window: int
    exponent_bits: int = 8

    @property
    def max_mantissa(self) -> int:
        return (1 << self.mantissa_bits) - 1

    @property
    def quantized(self) -> bool:
        return True


@dataclass(frozen=True)
class FloatFormat:
    """The fp32 reference path: no quantization, same ops (datapath section 6)."""

    name: str = "fp32"

    @property
    def quantized(self) -> bool:
        return False


NumberFormat = BlockFormat | FloatFormat

FORMATS: dict[str, NumberFormat] = {
    "msfp16": BlockFormat("msfp16", block_size=16, mantissa_bits=7, window=12),
    "msfp12": BlockFormat("msfp12", block_size=16, mantissa_bits=3, window=12),
    "mxint8": BlockFormat("mxint8", block_size=32, mantissa_bits=7, window=12),
    "fp32": FloatFormat(),
}


def get_format(name: str) -> NumberFormat:
    """Look a preset up by name, with an error that lists the valid names."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown number format {name!r}; choose one of {', '.join(FORMATS)}"
        ) from None
