"""Host side of kernels/datapath.cl: build it for one OpenCL device and call its kernels.

The first piece of the OpenCL backend (Step 6): each method runs one datapath operation on
NumPy arrays, so the golden vectors and the emulator can check the kernels bit for bit. The
device backend (program execution, buffers kept on the device, faults) builds on it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from importlib.resources import files

import numpy as np
import pyopencl as cl

from ..formats import BlockFormat
from ..numerics import BlockTensor, reciprocal
from ..program import conv_output_size

DEVICE_ENV = "FPGASERVE_OPENCL_DEVICE"


def kernel_source() -> str:
    return (files("fpgaserve.kernels") / "datapath.cl").read_text()


def find_device(name: str | None = None) -> cl.Device:
    """The first device whose "platform: device" name contains ``name`` (or $FPGASERVE_
    OPENCL_DEVICE); without one, the first device with a compiler."""
    wanted = (name or os.environ.get(DEVICE_ENV, "")).lower()
    candidates = []
    for platform in cl.get_platforms():
        for device in platform.get_devices():
            label = f"{platform.name}: {device.name}"
            if wanted in label.lower() and (wanted or device.compiler_available):
                candidates.append(device)
    if not candidates:
        raise LookupError(f"no OpenCL device matches {wanted!r}")
    return candidates[0]


CONV_TILE = 8  # filters per work-item of conv2d_tiled: CONV_TILE in kernels/datapath.cl


@dataclass(frozen=True)
class DeviceWeight:
    """Quantized weights as device buffers: integer terms (section 4.2) and per-channel L."""

    terms: cl.Buffer
    floor: cl.Buffer
    filters: int
    format: BlockFormat


class DatapathKernels:
    """kernels/datapath.cl for one device: built from source, or loaded from a precompiled
    binary (``.aocx``, ``.xclbin``: FPGA platforms have no compiler)."""

    def __init__(self, device: cl.Device, binary: bytes | None = None) -> None:
        self.device = device
        self.context = cl.Context([device])
        self._local = threading.local()
        if binary is not None:
            self.source = "binary"
            program = cl.Program(self.context, [device], [binary])
        else:
            self.source = "OpenCL C source"
            program = cl.Program(self.context, kernel_source())
        # No -cl-fast-relaxed-math, no -cl-mad-enable: the spec's roundings must survive.
        self.program = program.build(options=["-cl-std=CL1.2"])

    @property
    def queue(self) -> cl.CommandQueue:
        """This thread's command queue: pyopencl kernel objects and queues are not
        thread-safe, so every worker thread gets its own (buffers are shared)."""
        local = self._local
        if not hasattr(local, "queue"):
            profiling = cl.command_queue_properties.PROFILING_ENABLE
            local.queue = cl.CommandQueue(self.context, properties=profiling)
            local.kernels = {k.function_name: k for k in self.program.all_kernels()}
            local.events = []
            local.pool = {}
        return local.queue

    @property
    def name(self) -> str:
        return f"{self.device.platform.name}: {self.device.name}"

    def _buffer(self, array: np.ndarray) -> cl.Buffer:
        """A read-only buffer that lives as long as its owner (the weights of a program)."""
        flags = cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR
        return cl.Buffer(self.context, flags, hostbuf=np.ascontiguousarray(array))

    def _scratch(self, role: str, nbytes: int) -> cl.Buffer:
        """This thread's buffer for ``role`` (e.g. "terms"), at least ``nbytes`` long. Ops run
        one after another on a thread and finish before returning, so each role's buffer is
        reused by every later op and run: no allocation per request once the largest layer has
        been seen (allocating is slow on FPGA boards)."""
        self.queue  # noqa: B018 - makes this thread's queue and pool
        pool = self._local.pool
        if role not in pool or pool[role].size < nbytes:
            pool[role] = cl.Buffer(self.context, cl.mem_flags.READ_WRITE, max(nbytes, 1))
        return pool[role]

    def _upload(self, role: str, array: np.ndarray) -> cl.Buffer:
        array = np.ascontiguousarray(array)
        buffer = self._scratch(role, array.nbytes)
        cl.enqueue_copy(self.queue, buffer, array)
        return buffer

    def _output(self, shape, dtype) -> tuple[np.ndarray, cl.Buffer]:
        host = np.empty(shape, dtype=dtype)
        return host, self._scratch("out", host.nbytes)

    def _run(self, name: str, size: int, *args) -> None:
        queue = self.queue
        self._local.events.append(self._local.kernels[name](queue, (size,), None, *args))

    def take_kernel_seconds(self) -> float:
        """Device time of the kernels this thread ran since the last call (profiling events:
        the board's own clock, not the host's)."""
        self.queue  # noqa: B018 - makes this thread's queue and event list
        events, self._local.events = self._local.events, []
        return sum(e.profile.end - e.profile.start for e in events) * 1e-9

    def _fetch(self, host: np.ndarray, buffer: cl.Buffer) -> np.ndarray:
        cl.enqueue_copy(self.queue, host, buffer)
        self.queue.finish()
        return host

    def _quantize(self, x: np.ndarray, fmt: BlockFormat):
        """Section 3 on the device; the results stay there as buffers."""
        length, block = x.shape[-1], fmt.block_size
        rows, groups = x.size // length, x.shape[0]
        blocks = -(-length // block)
        x_buf = self._upload("x", x)
        raw = self._scratch("raw", rows * blocks * 4)
        anchor = self._scratch("anchor", groups * 4)
        mant = self._scratch("mantissas", x.size)
        codes = self._scratch("codes", rows * blocks)
        i32 = np.int32
        self._run(
            "block_exponents", rows * blocks, x_buf, i32(length), i32(block), i32(blocks), raw
        )
        self._run("group_anchor", groups, raw, i32(rows // groups * blocks), anchor)
        self._run("quantize_elements", x.size, x_buf, i32(length), i32(block), i32(blocks),
                  i32(rows // groups), i32(fmt.mantissa_bits), i32(fmt.window), raw, anchor,
                  mant, codes)  # fmt: skip
        return mant, codes, anchor, blocks

    def quantize(self, x: np.ndarray, fmt: BlockFormat):
        """Section 3 on the device; returns (mantissas, codes, anchors) on the host."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        mant, codes, anchor, blocks = self._quantize(x, fmt)
        return (
            self._fetch(np.empty(x.shape, np.int8), mant),
            self._fetch(np.empty((*x.shape[:-1], blocks), np.uint8), codes),
            self._fetch(np.empty(x.shape[0], np.int32), anchor),
        )

    def upload_weight(self, weight: BlockTensor) -> DeviceWeight:
        """Once per loaded program: the weights stay on the device."""
        terms, floor = weight.integer_terms()
        return DeviceWeight(
            self._buffer(terms.astype(np.int32)),
            self._buffer(floor.astype(np.int32)),
            weight.shape[0],
            weight.format,
        )

    def conv2d(self, x: np.ndarray, weight: DeviceWeight, geometry) -> np.ndarray:
        """Section 4 on the device: quantize, integer terms, exact conv, one rounding."""
        fmt = weight.format
        n, height, width, channels = x.shape
        x = np.ascontiguousarray(x, dtype=np.float32)
        mantissas, codes, anchors, blocks = self._quantize(x, fmt)  # stay on the device
        act_floor = self._fetch(np.empty(n, np.int32), anchors) - np.int32(fmt.window)
        terms_buf = self._scratch("terms", x.size * 4)
        nan_buf = self._scratch("nan", x.size)
        i32 = np.int32
        self._run("activation_terms", x.size, mantissas, codes,
                  i32(channels), i32(fmt.block_size), i32(blocks), i32(height * width),
                  i32(fmt.window), anchors, terms_buf, nan_buf)  # fmt: skip
        out_h, out_w = geometry.output_size(height, width)
        filters = weight.filters
        out_host, out = self._output((n, out_h, out_w, filters), np.float32)
        top, _, left, _ = geometry.padding
        # CONV_TILE filters per work-item where a group's filters allow (all but depthwise).
        tiled = (filters // geometry.groups) % CONV_TILE == 0
        kernel = "conv2d_tiled" if tiled else "conv2d"
        size = out_host.size // CONV_TILE if tiled else out_host.size
        self._run(kernel, size, terms_buf, nan_buf,
                  self._upload("act_floor", act_floor),
                  i32(height), i32(width), i32(channels),
                  weight.terms, weight.floor,
                  i32(filters), *map(i32, geometry.kernel), *map(i32, geometry.strides),
                  *map(i32, geometry.dilation), i32(top), i32(left), i32(geometry.groups),
                  i32(out_h), i32(out_w), i32(fmt.mantissa_bits), out)  # fmt: skip
        return self._fetch(out_host, out)

    def elementwise(self, name: str, *arrays: np.ndarray, channels: int | None = None):
        """bias / scale_shift (per-channel parameters last) and relu, relu6, add."""
        first = np.ascontiguousarray(arrays[0], dtype=np.float32)
        out_host, out = self._output(first.shape, np.float32)
        args = [self._upload(f"arg{i}", np.asarray(a, np.float32)) for i, a in enumerate(arrays)]
        if channels is not None:
            args.append(np.int32(channels))
        self._run(name, first.size, *args, out)
        return self._fetch(out_host, out)

    def pool(self, x: np.ndarray, average: bool, pool, strides, padding) -> np.ndarray:
        n, height, width, channels = x.shape
        top, bottom, left, right = padding
        out_h = conv_output_size(height, pool[0], strides[0], 1, top + bottom)
        out_w = conv_output_size(width, pool[1], strides[1], 1, left + right)
        table = np.array([0.0] + [reciprocal(k) for k in range(1, pool[0] * pool[1] + 1)],
                         np.float32)  # fmt: skip
        out_host, out = self._output((n, out_h, out_w, channels), np.float32)
        i32 = np.int32
        self._run("pool", out_host.size, self._upload("x", x.astype(np.float32)), i32(height),
                  i32(width), i32(channels), i32(pool[0]), i32(pool[1]), i32(strides[0]),
                  i32(strides[1]), i32(top), i32(left), i32(out_h), i32(out_w), i32(average),
                  self._upload("table", table), out)  # fmt: skip
        return self._fetch(out_host, out)
