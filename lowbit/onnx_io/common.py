"""What import and export share: the op list, size limits, errors and the onnx package itself."""
from __future__ import annotations

import math
import os

import numpy as np

#: Ops :func:`load_onnx` imports (the default ONNX domain).
SUPPORTED_OPS = (
    "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant", "Conv",
    "DequantizeLinear", "Div", "Dropout", "Flatten", "Gather", "Gemm", "GlobalAveragePool",
    "GreaterOrEqual", "Identity", "LeakyRelu", "LogSoftmax", "MatMul", "MaxPool", "Mul", "Neg", "Pad",
    "QuantizeLinear", "Relu", "Reshape", "Round", "Shape", "Sigmoid", "Sign", "Softmax", "Squeeze", "Sub",
    "Tanh", "Transpose", "Unsqueeze", "Where",
)
#: Largest size of one tensor axis, and largest element count of one tensor (one example's
#: activations, or a constant), that an imported graph may declare.
MAX_DIM = 1 << 20
MAX_ELEMENTS = 1 << 28

INSTALL_HINT = 'pip install "lowbit[onnx]"'


class OnnxImportError(ValueError):
    """An ONNX file lowbit cannot import: unreadable, unsupported op, structure or shape."""


class OnnxExportError(ValueError):
    """A lowbit model holding something that has no standard-ONNX form here."""


def onnx_module():
    try:
        import onnx
    except ImportError:
        raise ImportError(f"reading and writing ONNX files needs the onnx package: {INSTALL_HINT}") from None
    return onnx


def is_onnx_path(path) -> bool:
    """True when ``path`` names an ``.onnx`` file (by its extension)."""
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(".onnx")



def opset_of(proto):
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def check_shape(dims, what):
    dims = [int(d) for d in dims]
    if any(d < 0 for d in dims):
        raise OnnxImportError(f"{what} has a negative dimension: {dims}")
    if any(d > MAX_DIM for d in dims):
        raise OnnxImportError(f"{what} has shape {dims}: an axis over {MAX_DIM} (refused as absurd)")
    if math.prod(dims) > MAX_ELEMENTS:
        raise OnnxImportError(f"{what} has shape {dims}: over {MAX_ELEMENTS} elements (refused as absurd)")
    return dims


def tensor_to_array(tensor, what):
    onnx = onnx_module()
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
        raise OnnxImportError(f"{what} is stored outside the file (external data), which lowbit does not "
                              "open; save the model with its weights inside the .onnx file")
    check_shape(tensor.dims, what)
    try:
        arr = onnx.numpy_helper.to_array(tensor)
    except Exception as exc:
        raise OnnxImportError(f"{what} could not be decoded: {exc}") from None
    return np.array(arr)

