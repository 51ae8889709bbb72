"""Host side of kernels/datapath.cl: build it for one OpenCL device and launch its kernels.

Ops take and return ``DeviceTensor``s, so a program's activations stay in device memory from
its inputs to its outputs; buffers come from a per-thread memory pool and go back to it when a
tensor is dropped, so a steady stream of requests allocates nothing. The NumPy methods at the
end (``quantize``, ``conv2d``, ``elementwise``, ``pool``) upload, run one op and fetch: the
golden vectors and the emulator check the kernels bit for bit through them.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from importlib.resources import files
from math import prod

import numpy as np
import pyopencl as cl
import pyopencl.tools

from ..errors import DeviceFaultError
from ..formats import BlockFormat
from ..numerics import BlockTensor, reciprocal
from ..program import Geometry, conv_output_size

DEVICE_ENV = "FPGASERVE_OPENCL_DEVICE"
CONV_TILE = 8  # filters per work-item of the tiled convolutions: CONV_TILE in datapath.cl
ACTIVATIONS = {"linear": 0, "relu": 1, "relu6": 2}  # activate() in datapath.cl
EPILOGUE_BIAS, EPILOGUE_SCALE_SHIFT, EPILOGUE_ACTIVATION_SHIFT = 1, 2, 2
_I32 = np.int32


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


@dataclass(frozen=True)
class DeviceTensor:
    """A float32 tensor (NHWC, or NK) in device memory."""

    buffer: cl.MemoryObjectHolder
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return prod(self.shape)

    def reshape(self, *shape: int) -> DeviceTensor:
        """Same bits, new shape: flatten and keepdims cost nothing on the device."""
        new = tuple(shape)
        if prod(new) != self.size:
            raise ValueError(f"cannot reshape {self.shape} to {new}")
        return DeviceTensor(self.buffer, new)


@dataclass(frozen=True)
class DeviceWeight:
    """Quantized weights kept on the device from load to unload.

    Blocked weights (``blocked``) are int8 mantissas with per-block shifts ``s = X - L``
    (section 4.2) for ``conv2d_blocks``, padded to whole tiles of filters; the others are
    int32 terms ``m * 2^s`` for ``conv2d`` / ``conv2d_tiled``. ``floor`` is ``L`` per filter.
    """

    values: cl.Buffer
    shifts: cl.Buffer | None
    floor: cl.Buffer
    filters: int
    format: BlockFormat

    @property
    def blocked(self) -> bool:
        return self.shifts is not None


@dataclass(frozen=True)
class Epilogue:
    """What a matrix op (or a standalone vector op) applies per output: bias, folded batch
    norm, activation, in that order (datapath section 5.2), as constant device buffers."""

    bias: cl.Buffer | None = None
    scale: cl.Buffer | None = None
    shift: cl.Buffer | None = None
    activation: str = "linear"

    def args(self) -> tuple:
        flags = (EPILOGUE_BIAS if self.bias is not None else 0) | (
            EPILOGUE_SCALE_SHIFT if self.scale is not None else 0
        )
        flags |= ACTIVATIONS[self.activation] << EPILOGUE_ACTIVATION_SHIFT
        return _I32(flags), self.bias, self.scale, self.shift


@dataclass(frozen=True)
class _Quantized:
    """An activation tensor quantized on the device (section 3): int8 mantissas, per-block
    E8M0 codes and shifts (-1 for a NaN block), and the anchor G of each sample."""

    mantissas: cl.MemoryObjectHolder
    codes: cl.MemoryObjectHolder
    shifts: cl.MemoryObjectHolder
    anchor: cl.MemoryObjectHolder
    blocks: int


def blocks_line_up(fmt: BlockFormat, channels_per_group: int, groups: int) -> bool:
    """Whether ``conv2d_blocks`` applies: weight blocks along (kh, kw, c) then coincide with
    activation blocks along c, and a block is whole 16-lane vectors."""
    return groups == 1 and channels_per_group % fmt.block_size == 0 and fmt.block_size % 16 == 0


class DatapathKernels:
    """kernels/datapath.cl for one device: built from source, or loaded from a precompiled
    binary (``.aocx``, ``.xclbin``: FPGA platforms have no compiler)."""

    def __init__(self, device: cl.Device, binary: bytes | None = None) -> None:
        self.device = device
        self.context = cl.Context([device])
        self._local = threading.local()
        self._tables: dict[int, cl.Buffer] = {}
        if binary is not None:
            self.source = "binary"
            program = cl.Program(self.context, [device], [binary])
        else:
            self.source = "OpenCL C source"
            program = cl.Program(self.context, kernel_source())
        # No -cl-fast-relaxed-math, no -cl-mad-enable: the spec's roundings must survive.
        self.program = program.build(options=["-cl-std=CL1.2"])
        # A compiler can "succeed" and lose kernels (PoCL did, on by-value long8 arguments).
        built = set(self.program.get_info(cl.program_info.KERNEL_NAMES).split(";"))
        missing = sorted(set(re.findall(r"__kernel void (\w+)", kernel_source())) - built)
        if missing:
            raise DeviceFaultError(f"{self.name}: the kernel build lost {', '.join(missing)}")

    @property
    def name(self) -> str:
        return f"{self.device.platform.name}: {self.device.name}"

    # --- per-thread state: queue, kernel objects, memory pool, profiling events -----------

    @property
    def queue(self) -> cl.CommandQueue:
        """This thread's command queue: pyopencl kernel objects and queues are not
        thread-safe, so every worker thread gets its own (weights are shared)."""
        local = self._local
        if not hasattr(local, "queue"):
            profiling = cl.command_queue_properties.PROFILING_ENABLE
            local.queue = cl.CommandQueue(self.context, properties=profiling)
            local.kernels = {k.function_name: k for k in self.program.all_kernels()}
            local.events = []
            # The queue is in order, so a buffer returned to the pool by a dropped tensor is
            # safe to hand to the next kernel of this thread.
            local.pool = cl.tools.MemoryPool(cl.tools.ImmediateAllocator(local.queue))
        return local.queue

    def _allocate(self, nbytes: int) -> cl.MemoryObjectHolder:
        self.queue  # noqa: B018 - makes this thread's pool
        return self._local.pool.allocate(max(nbytes, 1))

    def _run(self, name: str, size: int, *args) -> None:
        if size >= 1 << 31:
            raise ValueError(f"{name}: {size} work-items exceed the kernels' 32-bit indexing")
        queue = self.queue
        self._local.events.append(self._local.kernels[name](queue, (size,), None, *args))

    def take_kernel_seconds(self) -> float:
        """Device time of the kernels this thread ran since the last call (profiling events:
        the board's own clock, not the host's)."""
        self.queue  # noqa: B018 - makes this thread's queue and event list
        events, self._local.events = self._local.events, []
        return sum(e.profile.end - e.profile.start for e in events) * 1e-9

    # --- moving tensors and constants --------------------------------------------------------

    def constant(self, array: np.ndarray) -> cl.Buffer:
        """A read-only buffer that lives as long as its owner (weights, per-channel params)."""
        flags = cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR
        return cl.Buffer(self.context, flags, hostbuf=np.ascontiguousarray(array))

    def upload(self, array: np.ndarray) -> DeviceTensor:
        array = np.ascontiguousarray(array, dtype=np.float32)
        buffer = self._allocate(array.nbytes)
        cl.enqueue_copy(self.queue, buffer, array)
        return DeviceTensor(buffer, array.shape)

    def download(self, tensor: DeviceTensor) -> np.ndarray:
        return self._fetch(tensor.buffer, tensor.shape, np.float32)

    def _fetch(self, buffer: cl.MemoryObjectHolder, shape, dtype) -> np.ndarray:
        """Blocking: the in-order queue has finished every kernel that wrote ``buffer``."""
        host = np.empty(shape, dtype)
        cl.enqueue_copy(self.queue, host, buffer)
        return host

    def _empty(self, shape: tuple[int, ...]) -> DeviceTensor:
        return DeviceTensor(self._allocate(prod(shape) * 4), tuple(shape))

    def upload_weight(self, weight: BlockTensor, geometry: Geometry) -> DeviceWeight:
        """Once per loaded program, in the layout its convolution kernel reads."""
        fmt, filters = weight.format, weight.shape[0]
        per_group = weight.shape[1] // (geometry.kernel[0] * geometry.kernel[1])
        if not blocks_line_up(fmt, per_group, geometry.groups):
            terms, floor = weight.integer_terms()
            return DeviceWeight(self.constant(terms.astype(np.int32)), None,
                                self.constant(floor.astype(np.int32)), filters, fmt)  # fmt: skip
        shifts, floor = weight.block_shifts()
        pad = -filters % CONV_TILE  # whole tiles of filters for conv2d_blocks
        mantissas = np.pad(weight.mantissas, ((0, pad), (0, 0)))
        shifts = np.pad(shifts, ((0, pad), (0, 0))).astype(np.int32)
        return DeviceWeight(self.constant(mantissas), self.constant(shifts),
                            self.constant(floor.astype(np.int32)), filters, fmt)  # fmt: skip

    # --- ops on device tensors ------------------------------------------------------------------

    def _quantize(self, x: DeviceTensor, fmt: BlockFormat) -> _Quantized:
        """Section 3, windows per sample (axis 0)."""
        length, block = x.shape[-1], fmt.block_size
        rows, groups = x.size // length, x.shape[0]
        blocks = -(-length // block)
        raw = self._allocate(rows * blocks * 4)
        anchor = self._allocate(groups * 4)
        mantissas = self._allocate(x.size)
        codes = self._allocate(rows * blocks)
        shifts = self._allocate(rows * blocks * 4)
        common = (_I32(length), _I32(block), _I32(blocks))
        self._run("block_exponents", rows * blocks, x.buffer, *common, raw)
        self._run("group_anchor", groups, raw, _I32(rows // groups * blocks), anchor)
        self._run("quantize_blocks", rows * blocks, x.buffer, *common, _I32(rows // groups),
                  _I32(fmt.mantissa_bits), _I32(fmt.window), raw, anchor, mantissas, codes,
                  shifts)  # fmt: skip
        return _Quantized(mantissas, codes, shifts, anchor, blocks)

    def conv(
        self, x: DeviceTensor, weight: DeviceWeight, geometry: Geometry, epilogue: Epilogue
    ) -> DeviceTensor:
        """Section 4 (quantize, exact integer sums, one rounding) and the op's epilogue."""
        fmt = weight.format
        n, height, width, channels = x.shape
        q = self._quantize(x, fmt)
        out_h, out_w = geometry.output_size(height, width)
        filters = weight.filters
        out = self._empty((n, out_h, out_w, filters))
        top, _, left, _ = geometry.padding
        window = (q.anchor, _I32(fmt.window), _I32(height), _I32(width), _I32(channels))
        shape = (_I32(filters), *map(_I32, geometry.kernel), *map(_I32, geometry.strides),
                 *map(_I32, geometry.dilation), _I32(top), _I32(left))  # fmt: skip
        tail = (_I32(out_h), _I32(out_w), _I32(fmt.mantissa_bits), *epilogue.args(), out.buffer)
        pixels = n * out_h * out_w
        if weight.blocked:
            self._run("conv2d_blocks", pixels * -(-filters // CONV_TILE), q.mantissas, q.shifts,
                      *window, _I32(fmt.block_size), weight.values, weight.shifts, weight.floor,
                      *shape, *tail)  # fmt: skip
            return out
        terms = self._allocate(x.size * 4)
        nan = self._allocate(x.size)
        self._run("activation_terms", x.size, q.mantissas, q.shifts, _I32(channels),
                  _I32(fmt.block_size), _I32(q.blocks), terms, nan)  # fmt: skip
        # CONV_TILE filters per work-item where a group's filters allow (all but depthwise).
        tiled = (filters // geometry.groups) % CONV_TILE == 0
        self._run("conv2d_tiled" if tiled else "conv2d",
                  pixels * filters // CONV_TILE if tiled else pixels * filters, terms, nan,
                  *window, weight.values, weight.floor, *shape, _I32(geometry.groups),
                  *tail)  # fmt: skip
        return out

    def channel_ops(self, x: DeviceTensor, epilogue: Epilogue) -> DeviceTensor:
        """bias, scale_shift, relu and relu6 as ops of their own."""
        out = self._empty(x.shape)
        self._run("channel_ops", x.size, x.buffer, _I32(x.shape[-1]), *epilogue.args(),
                  out.buffer)  # fmt: skip
        return out

    def add(self, a: DeviceTensor, b: DeviceTensor, activation: str = "linear") -> DeviceTensor:
        out = self._empty(a.shape)
        self._run("add", a.size, a.buffer, b.buffer, _I32(ACTIVATIONS[activation]), out.buffer)
        return out

    def _reciprocals(self, largest: int) -> cl.Buffer:
        """r(n) for n = 0..largest (section 5.2): OpenCL's 1.0f / n is not correctly rounded."""
        table = self._tables.get(largest)
        if table is None:
            values = [0.0] + [reciprocal(k) for k in range(1, largest + 1)]
            table = self._tables[largest] = self.constant(np.array(values, np.float32))
        return table

    def pool_op(self, x: DeviceTensor, average: bool, pool, strides, padding) -> DeviceTensor:
        n, height, width, channels = x.shape
        top, bottom, left, right = padding
        out_h = conv_output_size(height, pool[0], strides[0], 1, top + bottom)
        out_w = conv_output_size(width, pool[1], strides[1], 1, left + right)
        out = self._empty((n, out_h, out_w, channels))
        self._run("pool", out.size, x.buffer, _I32(height), _I32(width), _I32(channels),
                  _I32(pool[0]), _I32(pool[1]), _I32(strides[0]), _I32(strides[1]), _I32(top),
                  _I32(left), _I32(out_h), _I32(out_w), _I32(average),
                  self._reciprocals(pool[0] * pool[1]), out.buffer)  # fmt: skip
        return out

    def concat(self, parts: list[DeviceTensor]) -> DeviceTensor:
        """Channel concatenation: each part's bits copied into its slice."""
        total = sum(part.shape[-1] for part in parts)
        out = self._empty((*parts[0].shape[:-1], total))
        offset = 0
        for part in parts:
            channels = part.shape[-1]
            self._run("copy_channels", part.size, part.buffer, _I32(channels), _I32(total),
                      _I32(offset), out.buffer)  # fmt: skip
            offset += channels
        return out

    def zero_pad(self, x: DeviceTensor, padding) -> DeviceTensor:
        n, height, width, channels = x.shape
        top, bottom, left, right = padding
        out = self._empty((n, height + top + bottom, width + left + right, channels))
        self._run("zero_pad", out.size, x.buffer, _I32(height), _I32(width), _I32(channels),
                  _I32(top), _I32(left), _I32(out.shape[1]), _I32(out.shape[2]),
                  out.buffer)  # fmt: skip
        return out

    # --- NumPy in, NumPy out: one op at a time, for the bit-exactness tests ---------------------

    def quantize(self, x: np.ndarray, fmt: BlockFormat):
        """Section 3 on the device; returns (mantissas, codes, anchors) on the host."""
        q = self._quantize(self.upload(x), fmt)
        return (
            self._fetch(q.mantissas, x.shape, np.int8),
            self._fetch(q.codes, (*x.shape[:-1], q.blocks), np.uint8),
            self._fetch(q.anchor, x.shape[0], np.int32),
        )

    def conv2d(self, x: np.ndarray, weight: DeviceWeight, geometry: Geometry) -> np.ndarray:
        return self.download(self.conv(self.upload(x), weight, geometry, Epilogue()))

    def elementwise(self, name: str, *arrays: np.ndarray) -> np.ndarray:
        """bias / scale_shift (per-channel parameters last), relu, relu6 and add."""
        x = self.upload(arrays[0])
        if name == "add":
            return self.download(self.add(x, self.upload(arrays[1])))
        params = [self.constant(np.asarray(a, np.float32)) for a in arrays[1:]]
        if name == "bias":
            epilogue = Epilogue(bias=params[0])
        elif name == "scale_shift":
            epilogue = Epilogue(scale=params[0], shift=params[1])
        else:
            epilogue = Epilogue(activation=name)
        return self.download(self.channel_ops(x, epilogue))

    def pool(self, x: np.ndarray, average: bool, pool, strides, padding) -> np.ndarray:
        return self.download(self.pool_op(self.upload(x), average, pool, strides, padding))
