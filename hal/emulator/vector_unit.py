"""Vector unit of the emulator (docs/datapath.md, section 5).

Inputs are canonical float32 NHWC (or NK) arrays; every elementary operation is one NumPy float32
operation (IEEE RNE, no FMA) followed by canonicalization. Loops run over window positions, never
over elements.
"""

from __future__ import annotations

import numpy as np

from ..numerics import canonicalize, canonicalize_in_place, reciprocal
from ..program import conv_output_size

Window = tuple[int, int]
Padding = tuple[int, int, int, int]
# Overflow to Inf and Inf - Inf = NaN are defined results here (section 5.1), not accidents.
ieee = np.errstate(over="ignore", invalid="ignore")


# ``out=x`` lets a caller that owns ``x`` (a fresh matrix-unit result) work in place.


@ieee
def bias(x: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return canonicalize_in_place(np.add(x, b, out=out))


@ieee
def scale_shift(
    x: np.ndarray, scale: np.ndarray, shift: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """Folded batch norm: two roundings, never an FMA (section 5.2)."""
    product = canonicalize_in_place(np.multiply(x, scale, out=out))
    return canonicalize_in_place(np.add(product, shift, out=product))


def relu(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """max(x, +0): NumPy's maximum keeps NaN operands, and inputs are canonical (no -0.0)."""
    return np.maximum(x, np.float32(0.0), out=out)


def relu6(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    y = relu(x, out=out)
    return np.minimum(y, np.float32(6.0), out=y)


def activation(x: np.ndarray, name: str, out: np.ndarray | None = None) -> np.ndarray:
    if name == "relu":
        return relu(x, out=out)
    if name == "relu6":
        return relu6(x, out=out)
    return x


@ieee
def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return canonicalize_in_place(a + b)


def epilogue(x: np.ndarray, params: dict, activation_name: str) -> np.ndarray:
    """Section 5.3: bias, then scale_shift, then the activation; ``x`` is the caller's own
    fresh matrix-unit result, so every step runs in place."""
    if "bias" in params:
        x = bias(x, params["bias"], out=x)
    if "scale" in params:
        x = scale_shift(x, params["scale"], params["shift"], out=x)
    return activation(x, activation_name, out=x)


def _window_slices(
    x: np.ndarray, pool: Window, strides: Window, padding: Padding, fill: float
) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Strided views of the padded input, one per window position in row-major order."""
    top, bottom, left, right = padding
    padded = np.pad(
        x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=np.float32(fill)
    )
    out_h = conv_output_size(x.shape[1], pool[0], strides[0], 1, top + bottom)
    out_w = conv_output_size(x.shape[2], pool[1], strides[1], 1, left + right)
    views = [
        padded[:, i : i + strides[0] * out_h : strides[0], j : j + strides[1] * out_w : strides[1]]
        for i in range(pool[0])
        for j in range(pool[1])
    ]
    return views, (out_h, out_w)


def max_pool(x: np.ndarray, pool: Window, strides: Window, padding: Padding) -> np.ndarray:
    """Max over in-range positions: padding is -Inf, so it never wins; NaN propagates."""
    views, _ = _window_slices(x, pool, strides, padding, -np.inf)
    out = views[0]
    for view in views[1:]:
        out = np.maximum(out, view)
    return canonicalize(out)


def _valid_counts(size: int, pool: int, stride: int, before: int, out: int) -> np.ndarray:
    starts = np.arange(out) * stride - before
    return np.minimum(starts + pool, size) - np.maximum(starts, 0)


@ieee
def avg_pool(x: np.ndarray, pool: Window, strides: Window, padding: Padding) -> np.ndarray:
    """Sequential row-major sum of in-range positions, times r(n) (section 5.2).

    Padding positions add +0.0, which leaves a canonical sum unchanged, so one vectorised pass
    per window position implements "skip out-of-range positions" exactly.
    """
    views, (out_h, out_w) = _window_slices(x, pool, strides, padding, 0.0)
    total = views[0]
    total = np.array(total)
    for view in views[1:]:
        total = canonicalize_in_place(np.add(total, view, out=total))
    rows = _valid_counts(x.shape[1], pool[0], strides[0], padding[0], out_h)
    cols = _valid_counts(x.shape[2], pool[1], strides[1], padding[2], out_w)
    counts = np.outer(rows, cols)
    table = {int(n): reciprocal(int(n)) for n in np.unique(counts)}
    factors = np.vectorize(table.__getitem__, otypes=[np.float32])(counts)
    return canonicalize_in_place(np.multiply(total, factors[None, :, :, None], out=total))


def global_avg_pool(x: np.ndarray) -> np.ndarray:
    height, width = x.shape[1:3]
    return avg_pool(x, (height, width), (1, 1), (0, 0, 0, 0)).reshape(x.shape[0], -1)


def global_max_pool(x: np.ndarray) -> np.ndarray:
    height, width = x.shape[1:3]
    return max_pool(x, (height, width), (1, 1), (0, 0, 0, 0)).reshape(x.shape[0], -1)


def concat(tensors: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(tensors, axis=-1)


def zero_pad(x: np.ndarray, padding: Padding) -> np.ndarray:
    top, bottom, left, right = padding
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))


def flatten(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1)
