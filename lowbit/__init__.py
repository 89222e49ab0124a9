"""lowbit: binarized and low-precision neural networks in numpy/CuPy, run bit-packed.

See ``docs/architecture.md`` for the data flow from training to packed inference.
"""
from .ensemble import Ensemble, ensemble
from .io import ModelFileError, load_model, save_model
from .model import Model

__version__ = "0.1.0"

__all__ = ["Ensemble", "Model", "ModelFileError", "ensemble", "load_model", "save_model", "__version__"]
