"""The model compiler: Keras CNN -> accelerator program (+ CPU head), and the model zoo."""

from .compile import CompiledModel, compile_model, load_keras_model
from .graph import UnsupportedModelError

__all__ = ["CompiledModel", "UnsupportedModelError", "compile_model", "load_keras_model"]
