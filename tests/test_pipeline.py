"""Service definitions: the Azure-style authoring flow end to end, and every archive error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")

from conftest import MOBILENET_WEIGHTS, assert_same_bits  # noqa: E402
from fpgaserve.hal import open_device  # noqa: E402
from fpgaserve.pipeline import (  # noqa: E402
    ArchiveError,
    ImagePreprocessing,
    Limits,
    ModelDefinition,
    Pipeline,
    QuantizedMobileNet,
)

PHOTO = "n01440764_tench.JPEG"


@pytest.fixture(scope="module")
def mobilenet(imagenet):
    return QuantizedMobileNet(alpha=0.75, weights=str(MOBILENET_WEIGHTS), progress=False)


@pytest.fixture(scope="module")
def labels(imagenet) -> list[str]:
    index = json.loads((imagenet / "imagenet_class_index.json").read_text())
    return [index[str(i)][1] for i in range(len(index))]


@pytest.fixture(scope="module")
def archive(mobilenet, labels, tmp_path_factory) -> Path:
    definition = ModelDefinition("mobilenet", labels=labels)
    definition.pipeline.append(mobilenet.preprocessing())
    definition.pipeline.append(mobilenet.featurizer())
    definition.pipeline.append(mobilenet.default_classifier())
    return definition.save(tmp_path_factory.mktemp("archives") / "mobilenet.zip")


@pytest.mark.slow
def test_azure_flow_classifies_a_real_photo(archive, imagenet, mobilenet):
    photo = (imagenet / "images" / PHOTO).read_bytes()
    with Pipeline.load(archive, device="emulator") as pipeline:
        assert pipeline.input_name == "images"
        out = pipeline.run({"images": [photo]}, outputs=["probabilities", "features"])
        probabilities = out["probabilities"][0]
        top5 = [
            (pipeline.labels[i], float(probabilities[i])) for i in np.argsort(-probabilities)[:5]
        ]
    assert top5[0][0] == "tench" and top5[0][1] > 0.5
    assert abs(probabilities.sum() - 1) < 1e-4
    # Identical to running the three stages by hand.
    pixels = mobilenet.preprocessing().module.serve(tf.constant([photo]))["preprocessed"].numpy()
    program = mobilenet.compiled.program
    with open_device() as device:
        (name,) = program.inputs
        features = device.run(device.load(program), {name: pixels})[program.outputs[0]]
    assert_same_bits(out["features"], features)
    by_hand = mobilenet.compiled.head.predict(features, verbose=0)
    np.testing.assert_allclose(out["probabilities"], by_hand, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_batches_of_mixed_sizes_and_png(archive, imagenet):
    photos = sorted((imagenet / "images").glob("*.JPEG"))[:3]
    png = tf.io.encode_png(tf.io.decode_jpeg(photos[0].read_bytes())).numpy()
    batch = [p.read_bytes() for p in photos] + [png]
    with Pipeline.load(archive) as pipeline:
        probabilities = pipeline.run({"images": batch})["probabilities"]
        assert probabilities.shape == (4, 1000)
        assert np.argmax(probabilities[0]) == np.argmax(probabilities[3])  # JPEG vs its PNG
        with pytest.raises(KeyError, match="takes one input 'images'"):
            pipeline.run({"image": batch})
        with pytest.raises(KeyError, match="unknown outputs"):
            pipeline.run({"images": batch}, outputs=["logits"])


def test_preprocessing_presets_match_keras():
    keras = pytest.importorskip("keras")
    # A 256x256 image: the resize is the identity, the crop takes the central 224x224.
    pixels = np.random.default_rng(0).uniform(0, 255, (256, 256, 3)).astype(np.float32)
    png = tf.io.encode_png(tf.cast(tf.round(pixels), tf.uint8)).numpy()
    decoded = tf.cast(tf.io.decode_png(png), tf.float32).numpy()[None, 16:240, 16:240]
    for preset in ("tf", "torch", "caffe"):
        stage = ImagePreprocessing(preset=preset)
        ours = stage.module.serve(tf.constant([png]))["preprocessed"].numpy()
        theirs = keras.applications.imagenet_utils.preprocess_input(decoded.copy(), mode=preset)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="unknown preset"):
        ImagePreprocessing(preset="yolo")


# --- archive validation ------------------------------------------------------------------------


def rewrite(source: Path, target: Path, edit) -> Path:
    """Copy an archive, letting ``edit(members: dict[name, bytes])`` change anything."""
    with zipfile.ZipFile(source) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    edit(members)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return target


def manifest_edit(change):
    def edit(members):
        manifest = json.loads(members["manifest.json"])
        change(manifest)
        members["manifest.json"] = json.dumps(manifest).encode()

    return edit


def first_program(members) -> str:
    return next(name for name in members if name.endswith(".fpgaprog"))


def flip_byte(members):
    name = first_program(members)
    data = bytearray(members[name])
    data[-1] ^= 0xFF
    members[name] = bytes(data)


def set_path(stage_index: int, path: str):
    def change(manifest):
        manifest["stages"][stage_index]["path"] = path

    return change


def set_output_shape(manifest):
    manifest["stages"][0]["output"]["shape"] = [None, 200, 200, 3]


CASES = {
    "schema": (manifest_edit(lambda m: m.update(schema_version=7)), "schema version 7"),
    "missing": (lambda m: m.pop(first_program(m)), "missing"),
    "extra": (lambda m: m.update({"stages/notes.txt": b"hi"}), "not in manifest.json"),
    "checksum": (flip_byte, "checksum mismatch"),
    "traversal": (lambda m: m.update({"../evil.txt": b"x"}), "unsafe path"),
    "absolute": (lambda m: m.update({"/etc/evil": b"x"}), "unsafe path"),
    "backslash": (lambda m: m.update({"stages\\evil": b"x"}), "unsafe path"),
    "stage_path": (manifest_edit(set_path(1, "../../outside")), "unsafe path"),
    "wiring": (manifest_edit(set_output_shape), "expects float32"),
    "no_manifest": (lambda m: m.pop("manifest.json"), "no manifest.json"),
    "bad_json": (lambda m: m.update({"manifest.json": b"{not json"}), "not valid JSON"),
    "kind": (manifest_edit(lambda m: m["stages"][0].update(kind="pytorch")), "unknown kind"),
    "dtype": (
        manifest_edit(lambda m: m["stages"][0]["input"].update(dtype="int64")),
        "unsupported dtype",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_archive_errors_are_clear(case, archive, tmp_path):
    edit, message = CASES[case]
    broken = rewrite(archive, tmp_path / f"{case}.zip", edit)
    with pytest.raises(ArchiveError, match=message):
        Pipeline.load(broken)
    assert not (tmp_path / "evil.txt").exists()


def test_symlinks_sizes_and_zip_bombs_are_refused(archive, tmp_path):
    link = tmp_path / "link.zip"
    rewrite(archive, link, lambda m: None)
    with zipfile.ZipFile(link, "a") as z:
        info = zipfile.ZipInfo("stages/link")
        info.external_attr = 0o120777 << 16  # a symbolic link
        z.writestr(info, "/etc/passwd")
    with pytest.raises(ArchiveError, match="symbolic link"):
        Pipeline.load(link)
    with pytest.raises(ArchiveError, match="the limit is 1000"):
        Pipeline.load(archive, limits=Limits(max_member_bytes=1000))
    with pytest.raises(ArchiveError, match="expands to"):
        Pipeline.load(archive, limits=Limits(max_total_bytes=1000))
    bomb = rewrite(archive, tmp_path / "bomb.zip", lambda m: m.update({"zeros": bytes(50 << 20)}))
    with pytest.raises(ArchiveError, match="zip bomb"):
        Pipeline.load(bomb)
    not_zip = tmp_path / "plain.zip"
    not_zip.write_bytes(b"this is not a zip")
    with pytest.raises(ArchiveError, match="not a readable zip"):
        Pipeline.load(not_zip)


def test_stages_that_touch_files_are_refused(tmp_path):
    from fpgaserve.pipeline import TensorflowStage, TensorSpec

    victim = tmp_path / "written-by-archive.txt"

    def sneaky(images):
        tf.io.write_file(str(victim), images[0])
        return tf.zeros((tf.shape(images)[0], 4))

    stage = TensorflowStage("sneaky", sneaky, TensorSpec("images", "string", (None,)),
                            TensorSpec("out", "float32", (None, 4)))  # fmt: skip
    path = ModelDefinition("sneaky", [stage]).save(tmp_path / "sneaky.zip")
    with pytest.raises(ArchiveError, match="uses TensorFlow op 'WriteFile'"):
        Pipeline.load(path)
    assert not victim.exists()


def test_saving_refuses_miswired_stages(mobilenet, tmp_path):
    definition = ModelDefinition("broken")
    definition.pipeline.append(mobilenet.preprocessing())
    definition.pipeline.append(mobilenet.default_classifier())  # skips the featurizer
    with pytest.raises(ArchiveError, match="stage 'preprocess' outputs float32"):
        definition.save(tmp_path / "broken.zip")
    assert not (tmp_path / "broken.zip").exists()


@pytest.mark.slow
def test_build_command_writes_a_loadable_archive(tmp_path):
    output = tmp_path / "tiny.zip"
    exe = Path(sys.executable).parent / "fpgaserve"
    result = subprocess.run(
        [str(exe), "build", "mobilenet_0.25", "--weights", "random", "-o", str(output)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "WARNING: RANDOM WEIGHTS" in result.stderr and "quantizing to msfp16" in result.stderr
    with Pipeline.load(output) as pipeline:
        provenance = pipeline.manifest["provenance"]
        assert provenance["format"] == "msfp16"
        assert provenance["program"]["weights"] == "random (seed 0)"
        assert set(provenance["software"]) >= {"fpgaserve", "tensorflow", "keras", "numpy"}
    failed = subprocess.run([str(exe), "build", "resnet18", "-o", str(output)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert failed.returncode == 1 and "error: MODEL must be a zoo name" in failed.stderr
    assert "Traceback" not in failed.stderr
