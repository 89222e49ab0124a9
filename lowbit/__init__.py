"""lowbit: binarized and low-precision neural networks in numpy/CuPy, run bit-packed.

See ``docs/architecture.md`` for the data flow from training to packed inference.
"""
from .convert import convert
from .ensemble import Ensemble, ensemble
from .io import ModelFileError, load_model, save_model
from .model import Model
from . import onnx_layers  # noqa: F401  (registers the layers imported ONNX models use)
from .onnx_io import export_onnx, load_onnx
from .packed import PackedModel, load_any, load_packed
from .ptq import post_training_quantize
from .summary import summarize

__version__ = "0.1.0"

__all__ = [
    "Ensemble", "Model", "ModelFileError", "PackedModel", "convert", "ensemble", "load_any",
    "load_model", "load_onnx", "export_onnx", "load_packed", "post_training_quantize", "save_model", "summarize", "__version__",
]
