"""Cheap checks of image bytes before any decoder sees them.

A 1 KiB PNG can declare 100 000 x 100 000 pixels; decoding it would take 30 GB. The header is
read here (JPEG SOF segment, PNG IHDR chunk) and images past ``max_pixels`` are refused with
INVALID_ARGUMENT. Only JPEG and PNG are accepted, the formats whose headers are checked.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from .errors import InvalidArgument

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers that carry the frame size (not DHT C4, JPG C8, DAC CC).
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn: markers without a length
DEFAULT_MAX_PIXELS = 40_000_000
# Preprocessing scales the shorter side to 256 before cropping: a 8000 x 1 image would become
# 256 x 2 048 000. Past this ratio an image is refused from its header.
MAX_ASPECT_RATIO = 64


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """The frame size, found by walking the markers as libjpeg does (``next_marker``): bytes
    other than 0xFF before a marker are skipped (some cameras and editors write them; libjpeg
    warns of "extraneous bytes" and decodes), so is a stuffed 0xFF00. The size found is then
    the one the decoder will use."""
    offset = 2
    while (offset := data.find(b"\xff", offset)) >= 0 and offset + 4 <= len(data):
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker == 0x00 or marker in _NO_LENGTH:
            offset += 2
            continue
        (length,) = struct.unpack_from(">H", data, offset + 2)
        if marker in _SOF:
            if offset + 9 > len(data):
                return None
            height, width = struct.unpack_from(">HH", data, offset + 5)
            return width, height
        offset += 2 + length
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG or PNG header; None when it is neither or unreadable."""
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    if data.startswith(PNG_SIGNATURE) and len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack_from(">II", data, 16)
    return None


def _unreadable(index: int, image: bytes) -> str:
    if image.startswith((b"\xff\xd8", PNG_SIGNATURE)):
        kind = "JPEG" if image.startswith(b"\xff\xd8") else "PNG"
        return (
            f"image {index} starts as a {kind} but its size cannot be read from its header "
            f"({len(image)} bytes): is the file cut short or damaged?"
        )
    return (
        f"image {index} is not a readable JPEG or PNG (it starts with {image[:8]!r}); "
        "send JPEG or PNG bytes"
    )


def check_images(images: Iterable[object], max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    for index, image in enumerate(images):
        if not isinstance(image, bytes) or not image:
            raise InvalidArgument(f"image {index} is empty; send JPEG or PNG bytes")
        size = image_size(image)
        if size is None:
            raise InvalidArgument(_unreadable(index, image))
        width, height = size
        if width == 0 or height == 0:
            raise InvalidArgument(f"image {index} declares a size of {width}x{height} pixels")
        if width * height > max_pixels:
            raise InvalidArgument(
                f"image {index} declares {width}x{height} pixels; the limit is {max_pixels} "
                "pixels: downscale it before sending"
            )
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise InvalidArgument(
                f"image {index} is {width}x{height} pixels: sides more than {MAX_ASPECT_RATIO} "
                "times apart are refused; crop it before sending"
            )
