"""The model zoo: Brainwave's cuts, fidelity of the fp32 program to TensorFlow, real accuracy."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras = pytest.importorskip("keras")

from conftest import MOBILENET_WEIGHTS  # noqa: E402
from fpgaserve.compiler import compile_model  # noqa: E402
from fpgaserve.compiler.zoo import (  # noqa: E402
    ZOO,
    WeightsUnavailableError,
    build_zoo_model,
    compile_zoo_model,
)
from fpgaserve.evaluation import (  # noqa: E402
    Scores,
    cross_calibrated,
    load_labelled_images,
    run_compiled,
    run_float,
)
from fpgaserve.hal import open_device  # noqa: E402

EXPECTED_CUT = {"resnet50": "avg_pool", "resnet152": "avg_pool", "densenet121": "avg_pool",
                "vgg16": "fc2"}  # fmt: skip


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_fp32_program_matches_tensorflow_featurizer(name, imagenet):
    weights = str(MOBILENET_WEIGHTS) if name == "mobilenet_0.75" else "random"
    compiled, model = compile_zoo_model(name, weights, "fp32", progress=False)
    assert compiled.cut == EXPECTED_CUT.get(name, compiled.cut)
    if name.startswith("mobilenet"):
        assert isinstance(model.get_layer(compiled.cut), keras.layers.GlobalAveragePooling2D)
    images = load_labelled_images(imagenet, ZOO[name].preprocess, limit=2).inputs
    featurizer = keras.Model(model.input, model.get_layer(compiled.cut).output)
    expected = featurizer.predict(images, verbose=0)
    with open_device() as device:
        (input_name,) = compiled.program.inputs
        ours = device.run(device.load(compiled.program), {input_name: images})[compiled.cut]
    assert ours.reshape(2, -1).shape[1] == ZOO[name].features
    assert cosines(ours, expected).min() >= 0.99999
    assert compiled.program.metadata["weights"].startswith("file" if "0.75" in name else "random")


@pytest.mark.slow
def test_resnet50_compiles_to_msfp16_with_provenance():
    compiled, _ = compile_zoo_model("resnet50", "random", "msfp16", progress=False)
    meta = compiled.program.metadata
    assert meta["zoo_model"] == "resnet50" and meta["weights"] == "random (seed 0)"
    assert compiled.program.shapes()["avg_pool"] == (2048,)
    assert sum(op.kind == "conv2d" for op in compiled.program.ops) == 53


def test_weights_must_be_named_explicitly(tmp_path):
    with pytest.raises(ValueError, match="unknown zoo model 'resnet18'"):
        build_zoo_model("resnet18", "random")
    with pytest.raises(WeightsUnavailableError, match="neither 'imagenet', 'random' nor"):
        build_zoo_model("mobilenet_0.25", str(tmp_path / "missing.h5"))


@pytest.mark.slow
def test_real_accuracy_of_mobilenet(imagenet):
    """200 labelled photos. fp32 is the float model; msfp16 with bias correction (two-fold
    cross-calibrated, so no photo scores itself) meets the issue's goals: at most 0.5 points of
    top-1 lost and >= 98% top-1 agreement (measured 98.0%; the test allows one photo of slack
    for BLAS differences in the float calibration pass). Figures: docs/benchmarks.md."""
    images = load_labelled_images(imagenet, "tf")
    model, _ = build_zoo_model("mobilenet_0.75", str(MOBILENET_WEIGHTS))
    reference = Scores.from_probabilities(run_float(model, images.inputs), images.labels)
    assert reference.top1 > 0.8 and reference.top5 > 0.95  # the real weights are real
    with open_device() as device:
        fp32 = compile_model(model, "fp32", progress=False)
        exact = Scores.from_probabilities(run_compiled(fp32, device, images.inputs), images.labels)
        corrected = Scores.from_probabilities(
            cross_calibrated(model, "msfp16", device, images.inputs, 100), images.labels
        )
    assert np.array_equal(exact.predictions, reference.predictions)
    agreement = np.mean(corrected.predictions == reference.predictions)
    assert agreement >= 0.975 and corrected.top1 >= reference.top1 - 0.005
