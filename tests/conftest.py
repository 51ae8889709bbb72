"""Shared test helpers: bit-level comparison and format tuples for the scalar reference."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

# CI replays the same examples every run; developers' runs keep exploring new ones.
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=40, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def assert_same_bits(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = bits(actual), bits(expected)
    if not np.array_equal(a, e):
        where = np.argwhere(a != e)[:5]
        detail = [
            (tuple(int(v) for v in i), float(actual[tuple(i)]), float(expected[tuple(i)]))
            for i in where
        ]
        raise AssertionError(f"{int((a != e).sum())} elements differ, first: {detail}")


ROOT = Path(__file__).resolve().parents[1]
IMAGENET = Path(
    os.environ.get("FPGASERVE_IMAGENET_DIR", ROOT.parent / "shared" / "data" / "imagenet")
)
MOBILENET_WEIGHTS = IMAGENET / "mobilenet_0.75_224_imagenet.h5"


@pytest.fixture(scope="session")
def imagenet() -> Path:
    """Real ImageNet assets (shared/data/imagenet, or $FPGASERVE_IMAGENET_DIR)."""
    if not MOBILENET_WEIGHTS.is_file():
        pytest.skip(f"real ImageNet assets not found at {IMAGENET} (set FPGASERVE_IMAGENET_DIR)")
    return IMAGENET


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """The tiny model's archive, built once per test module (a module may override it)."""
    from servers import tiny_archive  # TensorFlow and Keras only for modules that use it

    return tiny_archive(tmp_path_factory.mktemp("models") / "tiny.zip")


@pytest.fixture(scope="module")
def expected(archive) -> dict:
    """What the pipeline answers in-process for ``jpeg(0)`` and ``jpeg(1)``: what a server
    serving ``archive`` must answer, bit for bit, whatever the protocol."""
    from servers import jpeg

    from fpgaserve.pipeline import Pipeline

    with Pipeline.load(archive) as pipeline:
        images = [jpeg(0), jpeg(1)]
        return pipeline.run({"images": images}, outputs=["features", "probabilities"])
