"""The model compiler: Keras CNNs -> accelerator programs, fusion, program files, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
keras = pytest.importorskip("keras")

from conftest import assert_same_bits  # noqa: E402
from fpgaserve.compiler import UnsupportedModelError, compile_model  # noqa: E402
from fpgaserve.hal import (  # noqa: E402
    BlockTensor,
    InvalidProgramError,
    load_program,
    open_device,
    save_program,
)

layers = keras.layers
RNG = np.random.default_rng(4)


def custom_cnn() -> keras.Model:
    """Every supported layer kind in one small functional CNN with a softmax head."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((20, 20, 3))
    x = layers.ZeroPadding2D(((1, 2), (1, 2)))(inputs)
    x = layers.Conv2D(16, 3, strides=2, use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    branch = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2)(x)
    branch = layers.BatchNormalization()(branch)
    branch = layers.ReLU(6.0)(branch)
    branch = layers.Conv2D(16, 1, activation="relu")(branch)
    grouped = layers.Conv2D(16, 3, padding="same", groups=4, dilation_rate=2)(x)
    x = layers.Add()([x, branch, grouped])
    x = layers.Activation("relu")(x)
    pooled = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    averaged = layers.AveragePooling2D(2, padding="same")(x)
    x = layers.Concatenate()([pooled, averaged])
    x = layers.BatchNormalization()(x)  # DenseNet-style: stays a scale_shift
    x = layers.Activation("relu")(x)
    x = layers.Dense(24)(x)  # Dense on a map: a 1x1 convolution
    x = layers.GlobalMaxPooling2D()(x)
    x = layers.Dense(12, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(5, activation="softmax")(x)
    model = keras.Model(inputs, outputs, name="custom")
    rng = np.random.default_rng(0)
    for layer in model.layers:  # non-trivial batch norm statistics
        if isinstance(layer, layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2, n).astype(np.float32) for _ in range(4)])
    return model


def run_program(program, x):
    with open_device() as device:
        handle = device.load(program)
        (name,) = program.inputs
        return device.run(handle, {name: x})[program.outputs[0]]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.min((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def test_custom_cnn_compiles_fuses_and_matches_keras():
    model = custom_cnn()
    compiled = compile_model(model, "fp32", progress=False)
    x = RNG.standard_normal((3, 20, 20, 3)).astype(np.float32)
    features = run_program(compiled.program, x)
    featurizer = keras.Model(model.input, model.get_layer(compiled.cut).output)
    expected = featurizer.predict(x, verbose=0)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)
    # The head is the last Dense + softmax (Dropout skipped); it reproduces the model's output.
    assert compiled.head is not None and compiled.head.input.shape[1:] == (12,)
    probabilities = compiled.head.predict(features, verbose=0)
    np.testing.assert_allclose(probabilities, model.predict(x, verbose=0), rtol=1e-4, atol=1e-5)
    kinds = [op.kind for op in compiled.program.ops]
    # BN after conv is folded, ReLUs fused; the post-concat BN and its ReLU stay.
    assert kinds.count("scale_shift") == 1 and kinds.count("relu") == 1
    assert {op.attrs.get("activation") for op in compiled.program.ops} >= {"relu", "relu6"}
    assert "alias" not in kinds


@pytest.mark.parametrize("fmt", ["msfp16", "msfp12", "mxint8"])
def test_quantized_programs_carry_block_weights_and_run(fmt):
    model = custom_cnn()
    compiled = compile_model(model, fmt, progress=False)
    weights = [op.params["weight"] for op in compiled.program.ops if "weight" in op.params]
    assert weights and all(isinstance(w, BlockTensor) and w.format.name == fmt for w in weights)
    x = RNG.standard_normal((2, 20, 20, 3)).astype(np.float32)
    reference = run_program(compile_model(model, "fp32", progress=False).program, x)
    assert cosine(run_program(compiled.program, x), reference) > {"msfp12": 0.9}.get(fmt, 0.99)


def test_program_file_round_trip_is_bit_exact(tmp_path):
    compiled = compile_model(custom_cnn(), "msfp16", progress=False)
    path = tmp_path / "model.fpgaprog"
    save_program(compiled.program, path)
    loaded = load_program(path)
    assert loaded.metadata["model"] == "custom" and loaded.format == "msfp16"
    x = RNG.standard_normal((2, 20, 20, 3)).astype(np.float32)
    assert_same_bits(run_program(loaded, x), run_program(compiled.program, x))


def test_program_file_loads_and_runs_without_tensorflow(tmp_path):
    path = tmp_path / "model.fpgaprog"
    save_program(compile_model(custom_cnn(), "msfp16", progress=False).program, path)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["tensorflow"] = None  # any import of TensorFlow now fails
        sys.modules["keras"] = None
        import numpy as np
        from fpgaserve.hal import load_program, open_device
        program = load_program({str(path)!r})
        with open_device() as device:
            out = device.run(device.load(program), {{next(iter(program.inputs)):
                             np.ones((1, 20, 20, 3), np.float32)}})
        print(out[program.outputs[0]].shape)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 12)"


def test_damaged_program_files_are_clear_errors(tmp_path):
    program = compile_model(custom_cnn(), "msfp16", progress=False).program
    good = tmp_path / "good.fpgaprog"
    save_program(program, good)
    data = good.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "garbage": b"\x00" * 64,
        "header_flip": data[:12] + b"#" + data[13:],
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.fpgaprog"
        path.write_bytes(content)
        with pytest.raises(InvalidProgramError):
            load_program(path)
    with pytest.raises(InvalidProgramError, match="not a readable program file"):
        load_program(tmp_path / "missing.fpgaprog")


def test_program_file_version_and_tensor_checks(tmp_path):
    from safetensors.numpy import save_file

    program = compile_model(custom_cnn(), "fp32", progress=False).program
    path = tmp_path / "p.fpgaprog"
    save_program(program, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        header = handle.metadata()["fpgaserve.program"]
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    bumped = header.replace('"schema_version": 1', '"schema_version": 99')
    save_file(tensors, str(path), metadata={"fpgaserve.program": bumped})
    with pytest.raises(InvalidProgramError, match="schema 99 is not supported"):
        load_program(path)
    save_file({**tensors, "stray": np.zeros(2, np.float32)}, str(path),
              metadata={"fpgaserve.program": header})  # fmt: skip
    with pytest.raises(InvalidProgramError, match="tensors no op uses"):
        load_program(path)
    save_file(tensors, str(path), metadata={"other": "x"})
    with pytest.raises(InvalidProgramError, match="without an fpgaserve program"):
        load_program(path)


def test_keras_file_compiles(tmp_path):
    path = tmp_path / "custom.keras"
    custom_cnn().save(path)
    compiled = compile_model(path, "msfp16", progress=False)
    assert compiled.program.outputs == (compiled.cut,)
    with pytest.raises(UnsupportedModelError, match=r"expected an existing \.keras model file"):
        compile_model(tmp_path / "nope.keras")


def small(*body, input_shape=(8, 8, 3)) -> keras.Model:
    inputs = keras.Input(input_shape)
    x = inputs
    for layer in body:
        x = layer(x)
    return keras.Model(inputs, x)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: small(layers.Conv2D(4, 3, activation="sigmoid", name="c1")),
         "'c1': activation 'sigmoid' does not run on the accelerator"),
        (lambda: small(layers.Conv2D(4, 3), layers.LeakyReLU(name="leaky")),
         "'leaky' \\(LeakyReLU\\) has no accelerator equivalent"),
        (lambda: small(layers.ReLU(negative_slope=0.1, name="r")), "'r': leaky or thresholded"),
        (lambda: small(layers.ReLU(max_value=4.0, name="r4")), "'r4': ReLU max_value 4.0"),
        (lambda: small(layers.LayerNormalization(name="ln")), "'ln' \\(LayerNormalization\\)"),
        (lambda: small(layers.Conv2D(4, 3, name="cf", data_format="channels_first")),
         "'cf': only channels_last"),
        (lambda: small(layers.Reshape((4, 48), name="rs")), "'rs': only reshapes to a vector"),
        (lambda: small(layers.Conv2D(4, 3), input_shape=(None, None, 3)),
         "give the model a fixed input size"),
        (lambda: small(layers.Conv2D(4, 3), layers.Activation("softmax", name="sm"),
                       layers.Conv2D(2, 1, name="c2")),
         "'sm': activation 'softmax' does not run on the accelerator"),
    ],
)  # fmt: skip
def test_unsupported_layers_are_named(build, message):
    model = build()
    with pytest.raises(UnsupportedModelError, match=message):
        compile_model(model, "msfp16", cut=model.layers[-1].name, progress=False)


def test_shared_layers_and_bad_cuts_are_refused():
    inputs = keras.Input((8, 8, 3))
    shared = layers.Conv2D(3, 3, padding="same", name="shared")
    model = keras.Model(inputs, shared(shared(inputs)))
    with pytest.raises(UnsupportedModelError, match="'shared' is called 2 times"):
        compile_model(model, progress=False)
    with pytest.raises(UnsupportedModelError, match="cut layer 'nowhere' is not in model"):
        compile_model(custom_cnn(), cut="nowhere", progress=False)
    with pytest.raises(ValueError, match="unknown number format 'int4'"):
        compile_model(custom_cnn(), "int4", progress=False)


def test_named_cut_and_head_separation():
    model = custom_cnn()
    gmp = next(layer.name for layer in model.layers if "global_max" in layer.name)
    compiled = compile_model(model, "fp32", cut=gmp, progress=False)
    assert compiled.program.shapes()[gmp] == (24,)
    assert [type(layer).__name__ for layer in compiled.head.layers[1:]] == [
        "Dense", "Dropout", "Dense"
    ]  # fmt: skip
    # A cut whose head would still read featurizer tensors is refused.
    x_name = next(layer.name for layer in model.layers if isinstance(layer, layers.Add))
    branch_conv = model.get_layer(x_name).input[1]._keras_history.operation.name
    with pytest.raises(UnsupportedModelError, match="also reads"):
        compile_model(model, "fp32", cut=branch_conv, progress=False)


def test_sequential_models_compile():
    model = keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            layers.Conv2D(8, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(10, activation="softmax"),
        ]
    )
    compiled = compile_model(model, "msfp16", progress=False)
    assert [op.kind for op in compiled.program.ops] == ["conv2d", "max_pool", "flatten"]


def test_bias_correction_removes_channel_drift():
    """Calibrated biases cancel the per-channel mean error of a coarse format: exactly on the
    calibration inputs (the program is linear here), and most of it on new inputs."""
    keras.utils.set_random_seed(1)
    model = small(layers.Conv2D(8, 3, name="conv"), layers.GlobalAveragePooling2D(name="gap"))
    calibration = RNG.uniform(0, 1, (32, 8, 8, 3)).astype(np.float32)
    held_out = RNG.uniform(0, 1, (32, 8, 8, 3)).astype(np.float32)
    exact = compile_model(model, "fp32", progress=False).program
    plain = compile_model(model, "msfp12", progress=False).program
    corrected = compile_model(model, "msfp12", progress=False, calibration=calibration).program
    assert corrected.metadata["bias_correction"] == "32 calibration inputs"
    assert "bias_correction" not in plain.metadata

    def drift(program, x) -> float:
        return float(np.abs((run_program(program, x) - run_program(exact, x)).mean(axis=0)).max())

    assert drift(corrected, calibration) < 0.02 * drift(plain, calibration)
    assert drift(corrected, held_out) < 0.5 * drift(plain, held_out)
    unchanged = compile_model(model, "fp32", progress=False, calibration=calibration)
    assert "bias_correction" not in unchanged.program.metadata
