"""ONNX import and export: bring a model trained elsewhere, and run lowbit's models elsewhere.

Import (:func:`load_onnx`, ``lowbit import model.onnx -o model.npz``)
----------------------------------------------------------------------
An ONNX graph with one float32 input (batch axis first, NCHW images) and one output becomes a
:class:`~lowbit.Model` of lowbit layers, which every command then treats as a model it trained
itself (evaluate, summarize, post-training quantization, QAT fine-tuning, export).  The ops are
those of MLPs, CNNs, ResNets and inception blocks as ``torch.onnx.export`` (opsets 13-18) and
tf2onnx write them; :data:`SUPPORTED_OPS` lists them.  How the graph is mapped:

* Initializers, ``Constant`` nodes and nodes whose inputs are all constant (``Shape`` of a tensor
  included: its batch entry reads 0, which ``Reshape`` copies) are folded with numpy, so weights
  stored as ``DequantizeLinear`` of integers, transposed, or cast come in as float32 arrays.
* Every other node has one tensor input (the rest constant) and becomes zero or more layers:
  ``Conv``/``Gemm``/``MatMul`` (+ ``Add`` of a bias, fused) -> ``Conv2D``/``Affine``; ``Sub``,
  ``Div``, ``Mul``, ``Add`` of a scalar -> ``Rescale``; ``Dropout`` -> ``Dropout``; ``Identity``
  -> nothing; an activation ``QuantizeLinear`` + ``DequantizeLinear`` pair -> ``FakeQuantize``;
  uneven pads -> ``Pad2D`` before the node.
* Branching: where a tensor feeds several nodes, the branches are followed to the ``Add`` or
  ``Concat`` (channels) that joins them all, and become a :class:`~lowbit.layers.Residual` (two
  branches, one of which may be the identity) or a :class:`~lowbit.layers.Concat` block; nesting
  is allowed.  A graph that does not decompose this way is refused with the node that breaks it.
* Any other op: :class:`OnnxImportError` naming the op, the node and :data:`SUPPORTED_OPS`.

Safety: the file is parsed by the onnx protobuf reader only (nothing in it is executed); tensors
stored outside the file (external data) are refused rather than opened; every tensor shape is
checked against :data:`MAX_ELEMENTS` / :data:`MAX_DIM` before anything is allocated.

Export (:func:`export_onnx`, ``lowbit export model.npz -o model.onnx``)
-----------------------------------------------------------------------
Standard operators only (default opset 13), so onnxruntime and other runtimes load the file:

* float layers: ``Conv``, ``Gemm``, ``Relu``, ``MaxPool``, ``AveragePool``, ``BatchNormalization``,
  ``Flatten``, ``Add`` (residual), ``Concat``; ``Rescale`` as ``Mul`` + ``Add``; ``Dropout`` omitted.
* k-bit weights (``UniformWeight``): int8 codes + per-channel ``DequantizeLinear``; DoReFa weights:
  uint8 codes + ``DequantizeLinear`` + ``Add(-1)``; fp16 weights: float16 + ``Cast``.
* k-bit activations (``DoReFaActivation``): ``Clip`` + ``QuantizeLinear`` + ``DequantizeLinear``
  (QCDQ, as Brevitas and torch export); the signed form shifts by ``max_value`` first.
* binary layers: +-1 (or +-alpha) float weights, and the BNN sign (``sign(0) = +1``) as
  ``Sign(Sign(x) + 0.5)``.
* a packed model (:class:`~lowbit.PackedModel`, e.g. the binary CNN): each stage in float32, with
  packed signs as +-1 and integer accumulators as exact float32 integers: binary products are
  ``Conv``/``MatMul`` on +-1, thresholds are ``GreaterOrEqual`` + ``Where``.

``onnx`` is an optional dependency (``pip install "lowbit[onnx]"``); onnxruntime is only used to
check exported files (tests, ``experiments/onnx_mnist.py``).
"""
from __future__ import annotations

import math
import os

import numpy as np

from .backend import to_numpy
from .layers import (
    Affine, AvgPool2D, BatchNorm, Concat, Conv2D, Dropout, Flatten, GlobalAvgPool2D, Layer, MaxPool2D,
    PixelCodes, ReLU, Rescale, Residual, Sequential,
)
from .model import Model
from .quant_layers import QuantActivation
from .onnx_layers import (
    ChannelOp, Clip, FakeQuantize, LeakyReLU, LogSoftmax, Pad2D, Round, Sigmoid, Sign, Softmax, Tanh, Threshold,
)

__all__ = ["OnnxImportError", "OnnxExportError", "SUPPORTED_OPS", "MAX_DIM", "MAX_ELEMENTS",
           "load_onnx", "model_from_onnx", "export_onnx", "model_to_onnx", "is_onnx_path"]

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

_INSTALL = 'pip install "lowbit[onnx]"'


class OnnxImportError(ValueError):
    """An ONNX file lowbit cannot import: unreadable, unsupported op, structure or shape."""


class OnnxExportError(ValueError):
    """A lowbit model holding something that has no standard-ONNX form here."""


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError(f"reading and writing ONNX files needs the onnx package: {_INSTALL}") from None
    return onnx


def is_onnx_path(path) -> bool:
    """True when ``path`` names an ``.onnx`` file (by its extension)."""
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(".onnx")


# ================================================================================================
# import
# ================================================================================================
def load_onnx(path, name=None) -> Model:
    """Import the ONNX model at ``path`` as a lowbit :class:`~lowbit.Model` (see the module docstring).

    Parameters
    ----------
    path : str or PathLike
        An ``.onnx`` file with one float32 input ``(N, ...)`` and one output.
    name : str, optional
        The model's name (default: the graph's name, else the file's stem).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    OnnxImportError
        The file is not ONNX, or holds an op, structure or shape lowbit does not import.
    """
    onnx = _onnx()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such ONNX file: {path}")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise OnnxImportError(f"{path} could not be read as an ONNX model: {exc}") from None
    if not proto.HasField("graph") or not proto.graph.node:
        raise OnnxImportError(f"{path} is not an ONNX model (no graph nodes)")
    stem = os.path.splitext(os.path.basename(path))[0]
    model = model_from_onnx(proto, name=name or proto.graph.name or stem, source=path)
    model.metadata = {"imported_from": os.path.basename(path), "producer": proto.producer_name,
                      "opset": _opset(proto)}
    return model


def _opset(proto):
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def _check_shape(dims, what):
    dims = [int(d) for d in dims]
    if any(d < 0 for d in dims):
        raise OnnxImportError(f"{what} has a negative dimension: {dims}")
    if any(d > MAX_DIM for d in dims):
        raise OnnxImportError(f"{what} has shape {dims}: an axis over {MAX_DIM} (refused as absurd)")
    if math.prod(dims) > MAX_ELEMENTS:
        raise OnnxImportError(f"{what} has shape {dims}: over {MAX_ELEMENTS} elements (refused as absurd)")
    return dims


def _tensor_to_array(tensor, what):
    onnx = _onnx()
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
        raise OnnxImportError(f"{what} is stored outside the file (external data), which lowbit does not "
                              "open; save the model with its weights inside the .onnx file")
    _check_shape(tensor.dims, what)
    try:
        arr = onnx.numpy_helper.to_array(tensor)
    except Exception as exc:
        raise OnnxImportError(f"{what} could not be decoded: {exc}") from None
    return np.array(arr)


class _Node:
    """One ONNX node with its decoded attributes and a label for messages."""

    def __init__(self, index, proto):
        onnx = _onnx()
        self.index = index
        self.op = proto.op_type
        self.domain = proto.domain
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.label = f"{proto.name!r} (#{index}, {self.op})" if proto.name else f"#{index} ({self.op})"
        self.attrs = {}
        for attr in proto.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                self.attrs[attr.name] = _tensor_to_array(attr.t, f"attribute {attr.name} of node {self.label}")
            elif attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise OnnxImportError(f"node {self.label} holds a subgraph, which lowbit does not import")
            else:
                self.attrs[attr.name] = onnx.helper.get_attribute_value(attr)
                if isinstance(self.attrs[attr.name], bytes):
                    self.attrs[attr.name] = self.attrs[attr.name].decode("utf-8", "replace")

    def error(self, text):
        return OnnxImportError(f"node {self.label}: {text}")


class _Importer:
    def __init__(self, proto, source):
        onnx = _onnx()
        self.source = source
        self.opset = _opset(proto)
        graph = proto.graph
        self.consts = {}
        for tensor in graph.initializer:
            self.consts[tensor.name] = _tensor_to_array(tensor, f"initializer {tensor.name!r}")
        inputs = [v for v in graph.input if v.name not in self.consts]
        if len(inputs) != 1:
            raise OnnxImportError(f"{source}: lowbit imports graphs with one input, this one has "
                                  f"{[v.name for v in inputs]}")
        if len(graph.output) != 1:
            raise OnnxImportError(f"{source}: lowbit imports graphs with one output, this one has "
                                  f"{[v.name for v in graph.output]}")
        value = inputs[0]
        ttype = value.type.tensor_type
        if ttype.elem_type != onnx.TensorProto.FLOAT:
            raise OnnxImportError(f"{source}: the input {value.name!r} must be float32, got "
                                  f"{onnx.TensorProto.DataType.Name(ttype.elem_type)}")
        dims = list(ttype.shape.dim)
        if len(dims) < 2:
            raise OnnxImportError(f"{source}: the input {value.name!r} must be (N, ...) with a batch axis, "
                                  f"got rank {len(dims)}")
        per_example = []
        for d in dims[1:]:
            if not d.HasField("dim_value") or d.dim_value <= 0:
                raise OnnxImportError(f"{source}: the input {value.name!r} must have fixed sizes after the "
                                      f"batch axis, got {[x.dim_param or x.dim_value for x in dims]}")
            per_example.append(int(d.dim_value))
        self.input_name = value.name
        self.input_shape = tuple(_check_shape(per_example, f"input {value.name!r}"))
        self.output_name = graph.output[0].name
        self.shapes = {self.input_name: self.input_shape}  # per-example shapes of dynamic tensors
        self.producer = {}            # dynamic tensor -> node
        self.consumers = {self.input_name: []}
        self.node_layers = {}         # node index -> list of layers (layer nodes)
        self.merges = {}              # node index -> "add" or "concat"
        self.quantized = {}           # output of an activation QuantizeLinear -> its parameters
        self.half = set()             # outputs of a Cast to float16 (to be cast back)
        self.masks = {}               # output of GreaterOrEqual(tensor, constant) -> the thresholds
        self.nodes = [_Node(i, p) for i, p in enumerate(graph.node)]
        self.uses = {}  # tensor -> how many node inputs name it
        for node in self.nodes:
            for name in node.inputs:
                self.uses[name] = self.uses.get(name, 0) + 1

    # -- pass 1: fold constants, convert every dynamic node to layers, track shapes -------------------
    def run(self):
        for node in self.nodes:
            if node.domain not in ("", "ai.onnx"):
                raise node.error(f"op {node.op!r} of domain {node.domain!r} is not a standard ONNX op; "
                                 f"supported ops: {', '.join(SUPPORTED_OPS)}")
            if node.op not in SUPPORTED_OPS:
                raise node.error(f"op {node.op!r} is not supported by lowbit's importer; supported ops: "
                                 f"{', '.join(SUPPORTED_OPS)}")
            for name in node.inputs:
                if name and name not in self.consts and name not in self.shapes:
                    raise node.error(f"input {name!r} is not defined before the node (graph not in "
                                     "topological order, or an undeclared input)")
            dynamic = [n for n in node.inputs if n and n in self.shapes]
            if node.op == "Shape" and dynamic:
                full = np.array((0,) + self.shapes[dynamic[0]], dtype=np.int64)
                self.consts[node.outputs[0]] = full[node.attrs.get("start", 0):node.attrs.get("end", len(full))]
            elif not dynamic:
                self._fold(node)
            else:
                self._convert(node, dynamic)
        if self.output_name not in self.shapes:
            raise OnnxImportError(f"{self.source}: the output {self.output_name!r} does not depend on the "
                                  "input (a constant graph)")
        layers = self._chain(self.input_name, self.output_name)
        return layers

    def _const(self, node, position, default=None):
        if position >= len(node.inputs) or not node.inputs[position]:
            return default
        name = node.inputs[position]
        if name not in self.consts:
            raise node.error(f"input {position} ({name!r}) must be a constant (an initializer)")
        return self.consts[name]

    def _fold(self, node):
        """Evaluate a node whose inputs are all constant."""
        op, attrs = node.op, node.attrs
        args = [self.consts[n] if n else None for n in node.inputs]
        if op == "Constant":
            if "value" in attrs:
                out = attrs["value"]
            elif "value_float" in attrs:
                out = np.array(attrs["value_float"], np.float32)
            elif "value_floats" in attrs:
                out = np.array(attrs["value_floats"], np.float32)
            elif "value_int" in attrs:
                out = np.array(attrs["value_int"], np.int64)
            elif "value_ints" in attrs:
                out = np.array(attrs["value_ints"], np.int64)
            else:
                raise node.error(f"a Constant with attributes {sorted(attrs)} is not supported")
        elif op in ("Identity", "Dropout"):
            out = args[0]
        elif op == "Cast":
            out = args[0].astype(_onnx().helper.tensor_dtype_to_np_dtype(attrs["to"]))
        elif op == "Reshape":
            out = args[0].reshape(self._reshape_target(node, args[0].shape, args[1]))
        elif op == "Transpose":
            out = np.transpose(args[0], attrs.get("perm"))
        elif op == "Unsqueeze":
            axes = attrs.get("axes") if args[1:] == [] or args[1] is None else args[1]
            out = args[0]
            for axis in sorted(int(a) % (out.ndim + len(axes)) for a in axes):
                out = np.expand_dims(out, axis)
        elif op == "Squeeze":
            axes = attrs.get("axes") if len(args) < 2 or args[1] is None else args[1]
            out = np.squeeze(args[0], axis=None if axes is None else tuple(int(a) for a in axes))
        elif op == "Concat":
            out = np.concatenate(args, axis=attrs["axis"])
        elif op == "Shape":
            out = np.array(args[0].shape, np.int64)[attrs.get("start", 0):attrs.get("end", args[0].ndim)]
        elif op == "Gather":
            out = np.take(args[0], args[1], axis=attrs.get("axis", 0))
        elif op in ("Add", "Sub", "Mul", "Div"):
            fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op]
            out = fn(args[0], args[1])
            if out.dtype.kind in "iu" and op == "Div":
                out = np.floor_divide(args[0], args[1])
            out = out.astype(np.result_type(args[0], args[1]))
        elif op == "Neg":
            out = -args[0]
        elif op == "DequantizeLinear":
            out = self._dequantize(node, *args[:3])
        elif op == "Sign":
            out = np.sign(args[0])
        else:
            raise node.error(f"op {op!r} on constant inputs is not supported")
        out = np.asarray(out)
        _check_shape(out.shape, f"the output of node {node.label}")
        self.consts[node.outputs[0]] = out

    def _dequantize(self, node, q, scale, zero_point):
        axis = node.attrs.get("axis", 1)
        scale = np.asarray(scale, np.float32)
        zp = np.zeros((), np.float32) if zero_point is None else np.asarray(zero_point).astype(np.float32)
        if scale.ndim == 1 and q.ndim > 0:
            shape = [1] * q.ndim
            shape[axis % q.ndim] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape) if zp.ndim == 1 else zp
        return ((q.astype(np.float32) - zp) * scale).astype(np.float32)

    def _reshape_target(self, node, shape, target):
        target = [int(t) for t in np.asarray(target).reshape(-1)]
        if node.attrs.get("allowzero", 0):
            raise node.error("Reshape with allowzero=1 is not supported")
        resolved = [shape[i] if t == 0 and i < len(shape) else t for i, t in enumerate(target)]
        if resolved.count(-1) > 1:
            raise node.error(f"Reshape target {target} has more than one -1")
        if -1 in resolved:
            known = math.prod(d for d in resolved if d != -1)
            resolved[resolved.index(-1)] = math.prod(shape) // known if known else 0
        return resolved

    # -- conversion of one dynamic node --------------------------------------------------------------
    def _convert(self, node, dynamic):
        out = node.outputs[0] if node.outputs else None
        if out is None:
            raise node.error("the node has no output")
        if node.op == "Add" and len(dynamic) == 2:
            a, b = (self.shapes[n] for n in node.inputs[:2])
            if a != b:
                raise node.error(f"Add joins tensors of shapes {a} and {b}; a residual Add needs equal shapes")
            self._register(node, dynamic, out, a, merge="add")
            return
        if node.op == "Concat":
            if any(n not in self.shapes for n in node.inputs):
                raise node.error("Concat of a tensor and a constant is not supported")
            shapes = [self.shapes[n] for n in node.inputs]
            rank = len(shapes[0]) + 1
            if node.attrs.get("axis") % rank != 1:
                raise node.error(f"Concat only along the channel axis 1, got axis {node.attrs.get('axis')}")
            if any(len(s) != len(shapes[0]) or s[1:] != shapes[0][1:] for s in shapes):
                raise node.error(f"Concat of shapes {shapes}: all but the channels must agree")
            shape = (sum(s[0] for s in shapes),) + shapes[0][1:]
            self._register(node, dynamic, out, shape, merge="concat")
            return
        if len(dynamic) != 1 or (node.inputs[0] != dynamic[0] and node.op not in ("Add", "Mul", "Sub")):
            raise node.error(f"{node.op} with tensor inputs {dynamic} is not supported (one tensor "
                             "input, the others constant)")
        x = dynamic[0]
        shape = self.shapes[x]
        if node.op != "Dropout" and len([o for o in node.outputs if o]) > 1:
            raise node.error(f"{node.op} with {len(node.outputs)} outputs is not supported")
        layers = self._layers(node, x, shape)
        try:
            out_shape = tuple(Sequential(layers).output_shape((1,) + shape)[1:]) if layers else shape
        except (ValueError, IndexError) as exc:
            raise node.error(f"does not fit its input of shape {shape}: {exc}") from None
        _check_shape(out_shape, f"the output of node {node.label}")
        self.node_layers[node.index] = layers
        self._register(node, [x], out, out_shape)

    def _register(self, node, dynamic, out, shape, merge=None):
        if merge:
            self.merges[node.index] = merge
        for name in dynamic:
            self.consumers[name].append(node)
        self.shapes[out] = tuple(int(s) for s in shape)
        self.producer[out] = node
        self.consumers[out] = []

    def _layers(self, node, x, shape):
        op, attrs = node.op, node.attrs
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            raise node.error(f"op {op!r} on a tensor input is not supported; supported ops: "
                             f"{', '.join(SUPPORTED_OPS)}")
        return handler(node, x, shape, attrs)

    # one method per op with a tensor input: returns the layers -------------------------------------
    def _op_Identity(self, node, x, shape, attrs):
        return []

    def _op_Dropout(self, node, x, shape, attrs):
        if len(node.outputs) > 1 and node.outputs[1]:
            raise node.error("Dropout's mask output is not supported")
        if attrs.get("is_test", 1) == 0 or self._const(node, 2, np.array(False)).item():
            raise node.error("Dropout in training mode is not supported (export the model for inference)")
        ratio = attrs.get("ratio", None)
        if ratio is None:
            ratio = self._number(node, self._const(node, 1, np.array(0.5)), "ratio")
        return [Dropout(float(ratio))] if ratio > 0 else []

    def _op_Round(self, node, x, shape, attrs):
        return [Round()]

    def _op_GreaterOrEqual(self, node, x, shape, attrs):
        """``x >= t`` (per channel or scalar) feeding one ``Where(mask, high, low)``: a Threshold."""
        if node.inputs[0] != x or self.uses.get(node.outputs[0]) != 1:
            raise node.error("GreaterOrEqual must compare the tensor (first) with a constant and feed one Where")
        t = np.asarray(self._const(node, 1), np.float32)
        channels = shape[0]
        flat = t.reshape(-1)
        if flat.size == 1:
            flat = np.full(channels, flat[0], np.float32)
        elif t.size != channels or t.reshape(-1).shape != (channels,) or \
                t.shape not in ((channels,) + (1,) * (len(shape) - 1), (1, channels) + (1,) * (len(shape) - 1)):
            raise node.error(f"GreaterOrEqual with a constant of shape {t.shape}: a scalar or one value per "
                             "channel is supported")
        self.masks[node.outputs[0]] = np.ascontiguousarray(flat, np.float32)
        return []

    def _op_Where(self, node, x, shape, attrs):
        if x not in self.masks or node.inputs[0] != x:
            raise node.error("Where is supported only on the mask of a GreaterOrEqual with a constant")
        high = self._number(node, self._const(node, 1), "the value where true")
        low = self._number(node, self._const(node, 2), "the value where false")
        layer = Threshold(shape[0], high, low)
        layer.threshold = self.masks[x]
        return [layer]

    def _op_Relu(self, node, x, shape, attrs):
        return [ReLU()]

    def _op_LeakyRelu(self, node, x, shape, attrs):
        return [LeakyReLU(attrs.get("alpha", 0.01))]

    def _op_Sigmoid(self, node, x, shape, attrs):
        return [Sigmoid()]

    def _op_Tanh(self, node, x, shape, attrs):
        return [Tanh()]

    def _op_Sign(self, node, x, shape, attrs):
        return [Sign()]

    def _op_Clip(self, node, x, shape, attrs):
        low = self._const(node, 1, None)
        high = self._const(node, 2, None)
        if x in self.quantized:  # QCDQ: a Clip of the integer codes narrows the FakeQuantize range
            scale, zero, qmin, qmax = self.quantized[x]
            if self.uses.get(x) != 1:
                raise node.error("the codes of a QuantizeLinear must feed one node only")
            qmin = qmin if low is None else max(qmin, int(self._number(node, low, "min")))
            qmax = qmax if high is None else min(qmax, int(self._number(node, high, "max")))
            self.quantized[node.outputs[0]] = (scale, zero, qmin, qmax)
            return []
        low = attrs.get("min", -math.inf) if low is None else self._number(node, low, "min")
        high = attrs.get("max", math.inf) if high is None else self._number(node, high, "max")
        if low == 0 and math.isinf(high) and high > 0:
            return [ReLU()]
        return [Clip(low, high)]

    @staticmethod
    def _number(node, value, what):
        value = np.asarray(value)
        if value.size != 1:
            raise node.error(f"{what} must be a single number, got shape {value.shape}")
        return float(value.reshape(()))

    def _softmax(self, node, shape, attrs, cls):
        if len(shape) != 1:
            raise node.error(f"{node.op} over scores (N, C) only, got per-example shape {shape}")
        axis = attrs.get("axis", -1 if self.opset >= 13 else 1)
        if axis not in (1, -1):
            raise node.error(f"{node.op} must act on the class axis 1, got axis {axis}")
        return [cls(1)]

    def _op_Softmax(self, node, x, shape, attrs):
        return self._softmax(node, shape, attrs, Softmax)

    def _op_LogSoftmax(self, node, x, shape, attrs):
        return self._softmax(node, shape, attrs, LogSoftmax)

    def _op_Flatten(self, node, x, shape, attrs):
        axis = attrs.get("axis", 1)
        if axis % (len(shape) + 1) != 1:
            raise node.error(f"Flatten only from axis 1 (keeping the batch axis), got axis {axis}")
        return [Flatten()] if len(shape) > 1 else []

    def _op_Reshape(self, node, x, shape, attrs):
        target = self._const(node, 1)
        resolved = self._reshape_target(node, (1,) + shape, target)
        if tuple(resolved[1:]) == shape and resolved[0] in (1, -1):
            return []
        if len(resolved) == 2 and resolved[1] == math.prod(shape):
            return [Flatten()] if len(shape) > 1 else []
        raise node.error(f"Reshape of {shape} to {[int(t) for t in np.asarray(target).reshape(-1)]}: only a "
                         "flattening to (N, -1) is supported")

    def _op_Squeeze(self, node, x, shape, attrs):
        # (N, C, 1, 1) -> (N, C) after a global pool, as tf2onnx writes it
        axes = attrs.get("axes") if len(node.inputs) < 2 or not node.inputs[1] else self._const(node, 1)
        axes = sorted(int(a) % (len(shape) + 1) for a in axes) if axes is not None else None
        if len(shape) == 3 and shape[1:] == (1, 1) and axes in (None, [2, 3]):
            return [Flatten()]
        raise node.error(f"Squeeze of {shape} on axes {axes}: only (N, C, 1, 1) -> (N, C) is supported")

    def _op_Transpose(self, node, x, shape, attrs):
        perm = list(attrs.get("perm", []))
        if perm == list(range(len(shape) + 1)):
            return []
        raise node.error(f"Transpose with perm {perm} of a tensor is not supported (NCHW graphs only)")

    def _op_Unsqueeze(self, node, x, shape, attrs):
        raise node.error("Unsqueeze of a tensor is not supported")

    def _op_Cast(self, node, x, shape, attrs):
        to = _onnx().helper.tensor_dtype_to_np_dtype(attrs["to"])
        if to == np.float16 and self.uses.get(node.outputs[0]) == 1:
            self.half.add(node.outputs[0])  # float16 and back: lowbit's fp16 quantizer
            return []
        if to == np.float32:
            return [QuantActivation("fp16")] if x in self.half else []
        raise node.error("Cast of a tensor to a type other than float32 (or float16 and back) is not supported")

    def _op_Neg(self, node, x, shape, attrs):
        return [Rescale(-1.0, 0.0)]

    def _elementwise(self, node, shape, value, op):
        """A constant operand: a scalar -> ``Rescale``; one value per channel (axis 1) -> ``ChannelOp``."""
        value = np.asarray(value, dtype=np.float64)
        flat = value.reshape(-1)
        if flat.size and np.all(flat == flat[0]) and value.ndim <= len(shape) + 1:
            v = float(flat[0])
            if op == "div" and v == 0:
                raise node.error("Div by zero")
            return [{"add": Rescale(1.0, v), "sub": Rescale(1.0, -v), "rsub": Rescale(-1.0, v),
                     "mul": Rescale(v, 0.0), "div": Rescale(1.0 / v if v else 1.0, 0.0)}[op]]
        channels = shape[0]
        squeezed = value.reshape(value.shape[1:]) if value.ndim == len(shape) + 1 and value.shape[0] == 1 \
            else value
        per_channel = (channels,) + (1,) * (len(shape) - 1)
        if squeezed.ndim != len(shape) or squeezed.shape != per_channel:
            raise node.error(f"{node.op} by a constant of shape {value.shape} on a tensor of per-example shape "
                             f"{shape}: only a scalar or one value per channel {per_channel} is supported")
        layer = ChannelOp(op, channels)
        layer.value = np.ascontiguousarray(squeezed.reshape(channels), np.float32)
        return [layer]

    def _op_Add(self, node, x, shape, attrs):
        const = self._const(node, 1 if node.inputs[0] == x else 0)
        fused = self._fuse_bias(node, x, shape, const)
        if fused is not None:
            return fused
        return self._elementwise(node, shape, const, "add")

    def _op_Sub(self, node, x, shape, attrs):
        if node.inputs[0] == x:
            return self._elementwise(node, shape, self._const(node, 1), "sub")
        return self._elementwise(node, shape, self._const(node, 0), "rsub")

    def _op_Mul(self, node, x, shape, attrs):
        return self._elementwise(node, shape, self._const(node, 1 if node.inputs[0] == x else 0), "mul")

    def _op_Div(self, node, x, shape, attrs):
        if node.inputs[0] != x:
            raise node.error("Div of a constant by a tensor is not supported")
        return self._elementwise(node, shape, self._const(node, 1), "div")

    def _fuse_bias(self, node, x, shape, const):
        """``MatMul`` / bias-free ``Conv`` followed by ``Add`` of a per-unit vector: the layer's bias."""
        producer = self.producer.get(x)
        if producer is None or self.uses.get(x) != 1 or producer.index not in self.node_layers:
            return None
        layers = self.node_layers[producer.index]
        if not layers or not isinstance(layers[-1], (Affine, Conv2D)) or layers[-1].bias:
            return None
        layer = layers[-1]
        units = shape[0]
        const = np.asarray(const, np.float32)
        if isinstance(layer, Affine) and const.shape in ((units,), (1, units)):
            bias = const.reshape(units)
            new = Affine(layer.in_features, units, bias=True)
        elif isinstance(layer, Conv2D) and const.size == units and const.shape[-2:] in ((1, 1),):
            bias = const.reshape(units)
            new = Conv2D(layer.in_channels, units, layer.kernel_size, layer.stride, layer.padding, bias=True)
        else:
            return None
        new.W, new.b = layer.W, np.ascontiguousarray(bias, np.float32)
        layers[-1] = new
        return []

    def _op_MatMul(self, node, x, shape, attrs):
        if node.inputs[0] != x:
            raise node.error("MatMul of a constant by a tensor is not supported (the tensor must come first)")
        w = self._const(node, 1)
        if len(shape) != 1 or w.ndim != 2 or w.shape[0] != shape[0]:
            raise node.error(f"MatMul of (N, {', '.join(map(str, shape))}) by a constant of shape {w.shape}: "
                             "only (N, K) @ (K, O) is supported")
        layer = Affine(w.shape[0], w.shape[1], bias=False)
        layer.W = np.ascontiguousarray(w, np.float32)
        return [layer]

    def _op_Gemm(self, node, x, shape, attrs):
        if attrs.get("transA", 0):
            raise node.error("Gemm with transA=1 is not supported")
        w = np.asarray(self._const(node, 1), np.float64)
        if w.ndim != 2:
            raise node.error(f"Gemm weight must be 2-D, got shape {w.shape}")
        if attrs.get("transB", 0):
            w = w.T
        if len(shape) != 1 or w.shape[0] != shape[0]:
            raise node.error(f"Gemm of (N, {', '.join(map(str, shape))}) by a weight of shape {w.shape} "
                             "(after transB) does not fit")
        alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
        c = self._const(node, 2, None)
        layer = Affine(w.shape[0], w.shape[1], bias=c is not None)
        layer.W = np.ascontiguousarray(w * alpha if alpha != 1 else w, np.float32)
        if c is not None:
            c = np.asarray(c, np.float64)
            if c.size not in (1, w.shape[1]):
                raise node.error(f"Gemm bias of shape {c.shape} does not fit {w.shape[1]} outputs")
            layer.b = np.ascontiguousarray(np.broadcast_to((c * beta).reshape(-1), (w.shape[1],)),
                                           np.float32)
        return [layer]

    def _spatial(self, node, shape, kernel, attrs, what):
        """Square kernel, equal strides, no dilation: ``(k, stride, pads[t, l, b, r])``."""
        if len(shape) != 3:
            raise node.error(f"{what} needs an (N, C, H, W) input, got per-example shape {shape}")
        if len(kernel) != 2 or kernel[0] != kernel[1]:
            raise node.error(f"only square 2-D kernels are supported, got kernel shape {list(kernel)}")
        strides = list(attrs.get("strides", [1, 1]))
        if len(strides) != 2 or strides[0] != strides[1]:
            raise node.error(f"only equal strides are supported, got {strides}")
        if any(d != 1 for d in attrs.get("dilations", [1, 1])):
            raise node.error(f"dilations {list(attrs['dilations'])} are not supported")
        k, s = int(kernel[0]), int(strides[0])
        auto_pad = attrs.get("auto_pad", "NOTSET")
        if auto_pad in ("NOTSET", ""):
            pads = list(attrs.get("pads", [0, 0, 0, 0]))
            if len(pads) != 4:
                raise node.error(f"pads must have 4 entries, got {pads}")
            pads = [int(pads[0]), int(pads[1]), int(pads[2]), int(pads[3])]  # t, l, b, r
        elif auto_pad == "VALID":
            pads = [0, 0, 0, 0]
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = [0, 0, 0, 0]
            for axis, size in enumerate(shape[1:]):
                total = max((-(-size // s) - 1) * s + k - size, 0)
                small, large = total // 2, total - total // 2
                first, last = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
                pads[axis], pads[axis + 2] = first, last
        else:
            raise node.error(f"auto_pad {auto_pad!r} is not supported")
        if any(p < 0 for p in pads):
            raise node.error(f"negative pads {pads} are not supported")
        return k, s, pads

    @staticmethod
    def _padded(pads, value, make):
        """``make(padding)`` with even pads, else ``Pad2D`` + ``make(0)``."""
        top, left, bottom, right = pads
        if top == left == bottom == right:
            return [make(top)]
        return [Pad2D((top, left, bottom, right), value), make(0)]

    def _op_Conv(self, node, x, shape, attrs):
        w = np.asarray(self._const(node, 1), np.float32)
        if attrs.get("group", 1) != 1:
            raise node.error(f"grouped convolutions (group={attrs['group']}) are not supported")
        if w.ndim != 4:
            raise node.error(f"only 2-D convolutions are supported, got a weight of shape {w.shape}")
        k, s, pads = self._spatial(node, shape, attrs.get("kernel_shape", w.shape[2:]), attrs, "Conv")
        if w.shape[1] != shape[0] or w.shape[2:] != (k, k):
            raise node.error(f"weight {w.shape} does not fit an input with {shape[0]} channels")
        b = self._const(node, 2, None)

        def make(padding):
            layer = Conv2D(shape[0], w.shape[0], k, stride=s, padding=padding, bias=b is not None)
            layer.W = np.ascontiguousarray(w)
            if b is not None:
                layer.b = np.ascontiguousarray(np.asarray(b, np.float32).reshape(w.shape[0]))
            return layer
        return self._padded(pads, 0.0, make)

    def _pool_checks(self, node, attrs):
        if attrs.get("storage_order", 0) or (len(node.outputs) > 1 and node.outputs[1]):
            raise node.error("MaxPool's indices output / storage_order are not supported")

    def _ceil_ok(self, node, shape, k, s, pads, attrs):
        if not attrs.get("ceil_mode", 0):
            return
        for size, before, after in ((shape[1], pads[0], pads[2]), (shape[2], pads[1], pads[3])):
            span = size + before + after - k
            if span % s:
                raise node.error("ceil_mode=1 that changes the output size is not supported")

    def _op_MaxPool(self, node, x, shape, attrs):
        self._pool_checks(node, attrs)
        k, s, pads = self._spatial(node, shape, attrs["kernel_shape"], attrs, "MaxPool")
        self._ceil_ok(node, shape, k, s, pads, attrs)
        if max(pads) >= k and len(set(pads)) == 1:
            raise node.error(f"pads {pads} must be smaller than the kernel {k}")
        return self._padded(pads, -math.inf, lambda p: MaxPool2D(k, s, p))

    def _op_AveragePool(self, node, x, shape, attrs):
        k, s, pads = self._spatial(node, shape, attrs["kernel_shape"], attrs, "AveragePool")
        self._ceil_ok(node, shape, k, s, pads, attrs)
        if any(pads) and not attrs.get("count_include_pad", 0):
            raise node.error("AveragePool with pads and count_include_pad=0 is not supported "
                             "(lowbit's AvgPool2D counts padded zeros)")
        return self._padded(pads, 0.0, lambda p: AvgPool2D(k, s, p))

    def _op_GlobalAveragePool(self, node, x, shape, attrs):
        if len(shape) != 3:
            raise node.error(f"GlobalAveragePool needs (N, C, H, W), got per-example shape {shape}")
        if shape[1] != shape[2]:
            raise node.error(f"GlobalAveragePool of a non-square {shape[1]}x{shape[2]} map is not supported")
        # AvgPool2D over the whole map keeps ONNX's (N, C, 1, 1) output shape.
        return [AvgPool2D(shape[1], shape[1], 0)]

    def _op_Pad(self, node, x, shape, attrs):
        mode = attrs.get("mode", "constant")
        pads = attrs.get("pads") if "pads" in attrs else self._const(node, 1)
        value = attrs.get("value", 0.0) if "value" in attrs else self._number(node, self._const(node, 2, np.array(0.0)), "the pad value")
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        if mode != "constant" or len(shape) != 3 or len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) \
                or (len(node.inputs) > 3 and node.inputs[3]):
            raise node.error(f"only constant padding of H and W of (N, C, H, W) is supported, got mode "
                             f"{mode!r}, pads {pads}")
        if any(p < 0 for p in pads):
            raise node.error(f"negative pads {pads} are not supported")
        return [Pad2D((pads[2], pads[3], pads[6], pads[7]), value)]

    def _op_BatchNormalization(self, node, x, shape, attrs):
        if attrs.get("training_mode", 0) or (len(node.outputs) > 1 and any(node.outputs[1:])):
            raise node.error("BatchNormalization in training mode is not supported")
        if len(shape) not in (1, 3):
            raise node.error(f"BatchNormalization of per-example shape {shape} is not supported")
        channels = shape[0]
        arrays = [np.asarray(self._const(node, i), np.float32).reshape(-1) for i in range(1, 5)]
        if any(a.shape != (channels,) for a in arrays):
            raise node.error(f"BatchNormalization parameters must have {channels} entries")
        momentum = attrs.get("momentum", 0.9)
        layer = BatchNorm(channels, momentum=momentum if 0 <= momentum < 1 else 0.9,
                          eps=attrs.get("epsilon", 1e-5))
        layer.gamma, layer.beta, layer.running_mean, layer.running_var = (np.ascontiguousarray(a) for a in arrays)
        return [layer]

    def _op_QuantizeLinear(self, node, x, shape, attrs):
        scale = self._const(node, 1)
        zero_point = self._const(node, 2, np.zeros((), np.uint8))
        if np.asarray(scale).size != 1 or np.asarray(zero_point).size != 1:
            raise node.error("activation QuantizeLinear with per-axis scales is not supported")
        info = np.iinfo(np.asarray(zero_point).dtype)
        self.quantized[node.outputs[0]] = (self._number(node, scale, "scale"),
                                           int(self._number(node, zero_point, "zero_point")),
                                           int(info.min), int(info.max))
        return []

    def _op_DequantizeLinear(self, node, x, shape, attrs):
        if x not in self.quantized:
            raise node.error("DequantizeLinear of a tensor that no QuantizeLinear made is not supported")
        scale = self._number(node, self._const(node, 1), "scale")
        zero_point = self._const(node, 2, np.zeros((), np.uint8))
        q_scale, q_zero, qmin, qmax = self.quantized[x]
        if self.uses.get(x) != 1 or scale != q_scale \
                or int(self._number(node, zero_point, "zero_point")) != q_zero:
            raise node.error("a QuantizeLinear must feed exactly one DequantizeLinear with the same scale "
                             "and zero point")
        return [FakeQuantize(q_scale, q_zero, qmin, qmax)]

    # -- pass 2: structure ---------------------------------------------------------------------------
    def _chain(self, tensor, end):
        """The layers that map ``tensor`` to ``end``."""
        layers = []
        node = None
        while True:
            if node is None:
                if tensor == end:
                    return layers
                consumers = self.consumers[tensor]
                if not consumers:
                    raise OnnxImportError(f"{self.source}: tensor {tensor!r} leads nowhere (it is not on the path "
                                          f"to the output {end!r})")
                if len(consumers) == 1 and consumers[0].index not in self.merges:
                    node = consumers[0]
                    continue
                merge, block = self._block(tensor)
                layers.append(block)
                tensor = merge.outputs[0]
                continue
            if node.index in self.merges:
                raise node.error("joins a branch with a tensor from outside it; lowbit imports branches that "
                                 "rejoin in one Add (residual) or Concat")
            layers.extend(self.node_layers[node.index])
            tensor, node = node.outputs[0], None

    def _block(self, tensor):
        """The Add/Concat where every branch out of ``tensor`` rejoins, and the block it makes."""
        open_edges = {tensor: len(self.consumers[tensor])}
        start = self.producer[tensor].index + 1 if tensor in self.producer else 0
        merge = None
        for node in self.nodes[start:]:
            inputs = [n for n in node.inputs if n in self.shapes and node in self.consumers.get(n, [])]
            touched = [n for n in inputs if n in open_edges]
            if not touched:
                continue
            for name in inputs:
                if name not in open_edges:
                    raise node.error(f"takes {name!r} from outside the branches that start at {tensor!r}; "
                                     "lowbit imports branches that rejoin in one Add or Concat")
                open_edges[name] -= 1
                if open_edges[name] == 0:
                    del open_edges[name]
            if not open_edges:
                merge = node
                break
            if node.outputs[0] == self.output_name:
                break
            open_edges[node.outputs[0]] = len(self.consumers[node.outputs[0]])
        if merge is None or merge.index not in self.merges:
            raise OnnxImportError(f"{self.source}: the branches out of tensor {tensor!r} do not rejoin in one "
                                  "Add or Concat; lowbit imports residual and concat blocks only")
        branches = []
        for name in merge.inputs:
            if name == tensor:
                branches.append(None)
                continue
            first = self._first_node(name, tensor)
            if first.index in self.merges:
                raise first.error(f"joins {tensor!r} directly with another branch out of it; lowbit imports "
                                  "branches that only meet at the joining Add or Concat")
            rest = self._chain(first.outputs[0], name) if first.outputs[0] != name else []
            branches.append(list(self.node_layers[first.index]) + rest)
        firsts = sorted(self._first_node(n, tensor).index for n in merge.inputs if n != tensor)
        if firsts != sorted(c.index for c in self.consumers[tensor] if c is not merge):
            raise merge.error(f"the branches from {tensor!r} share nodes; lowbit imports branches that only "
                              "meet at the joining Add or Concat")
        if self.merges[merge.index] == "add":
            body, shortcut = branches
            if body is None:
                body, shortcut = shortcut, None
            return merge, Residual(body or [], shortcut)
        return merge, Concat([b or [] for b in branches])

    def _first_node(self, name, tensor):
        """The consumer of ``tensor`` at the start of the branch that ends in ``name``."""
        node = self.producer[name]
        while True:
            dynamic = [n for n in node.inputs if n in self.shapes and node in self.consumers.get(n, [])]
            if tensor in dynamic:
                return node
            if not dynamic:
                raise node.error(f"is not reached from {tensor!r}")
            node = self.producer[dynamic[0]]


def model_from_onnx(proto, name="onnx_model", source="ONNX model") -> Model:
    """Build a lowbit :class:`~lowbit.Model` from a loaded ``onnx.ModelProto`` (see :func:`load_onnx`)."""
    importer = _Importer(proto, source)
    layers = importer.run()
    model = Model(layers, input_shape=importer.input_shape, name=str(name))
    return model


# ================================================================================================
# export
# ================================================================================================
class _Builder:
    """Collects nodes and initializers; names every tensor uniquely."""

    def __init__(self):
        self.onnx = _onnx()
        self.nodes, self.initializers = [], []
        self.count = 0

    def name(self, hint):
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value, hint="const", dtype=np.float32):
        arr = np.ascontiguousarray(np.asarray(value, dtype=dtype))
        name = self.name(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(arr, name))
        return name

    def node(self, op, inputs, hint=None, **attrs):
        out = self.name(hint or op.lower())
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out


def _channel_shape(ndim, channels):
    """Shape that broadcasts a per-channel vector over axis 1 of an ``ndim``-D tensor."""
    return (channels,) + (1,) * (ndim - 2)


class _Exporter:
    def __init__(self, builder, batchnorm="folded"):
        self.b = builder
        self.batchnorm = batchnorm

    # -- quantizers ---------------------------------------------------------------------------------
    def sign(self, x):
        """The BNN sign, +1 for x >= 0 (also -0.0), -1 below: Sign(Sign(x) + 0.5)."""
        b = self.b
        return b.node("Sign", [b.node("Add", [b.node("Sign", [x]), b.const(0.5, "half")])], "binary")

    def activation(self, q, x, where):
        from .quantizers import DoReFaActivation, Fp16, Identity, SteSign, StochasticBinary

        b = self.b
        if isinstance(q, Identity):
            return x
        if isinstance(q, Fp16):
            return b.node("Cast", [b.node("Cast", [x], to=self.b.onnx.TensorProto.FLOAT16)],
                          to=self.b.onnx.TensorProto.FLOAT)
        if isinstance(q, StochasticBinary):
            if not q.deterministic_eval:
                raise OnnxExportError(f"{where}: a stochastic sign at evaluation has no ONNX form")
            return self.sign(x)
        if isinstance(q, SteSign):
            if q.scale is None:
                return self.sign(x)
            if q.scale == "tensor":
                return b.node("Mul", [self.sign(x), b.node("ReduceMean", [b.node("Abs", [x])], keepdims=1)])
        if isinstance(q, DoReFaActivation):
            # QCDQ: QuantizeLinear (uint8, zero point 0; negatives saturate to 0), Clip of the codes
            # to [0, 2^k - 1], DequantizeLinear.  The signed form is shifted by max_value around it.
            levels = 2 ** q.bits - 1
            top = q.max_value
            if not q.signed:
                return self.qcdq(x, top / levels, levels)
            shifted = b.node("Add", [x, b.const(top, "max_value")])
            return b.node("Sub", [self.qcdq(shifted, 2 * top / levels, levels), b.const(top, "max_value")])
        raise OnnxExportError(f"{where}: quantizer {q!r} has no ONNX form as an activation quantizer")

    def qcdq(self, x, scale, levels):
        b = self.b
        s, z = b.const(scale, "scale"), b.const(0, "zero_point", np.uint8)
        q = b.node("QuantizeLinear", [x, s, z])
        if levels < 255:
            q = b.node("Clip", [q, b.const(0, "code_min", np.uint8), b.const(levels, "code_max", np.uint8)])
        return b.node("DequantizeLinear", [q, s, z])

    def kernel(self, layer, axis):
        """The name of the kernel the layer multiplies by (float32 in the graph)."""
        from .quantizers import DoReFaWeight, Fp16, Identity, UniformWeight

        b = self.b
        q = getattr(layer, "kernel_quantizer", None)
        w = np.asarray(to_numpy(layer.W), np.float32)
        if q is None or isinstance(q, Identity):
            return b.const(w, "weight")
        if isinstance(q, UniformWeight):
            codes, params = q.codes(w, channel_axis=axis)
            m = 2 ** (q.bits - 1) - 1
            signed = (codes.astype(np.int16) - m).astype(np.int8)
            alpha = np.asarray(params["alpha"], np.float32).reshape(-1)
            scale = (alpha / np.float32(m)).astype(np.float32)
            zero = np.zeros(scale.shape, np.int8)
            if scale.size == 1:
                scale, zero = scale.reshape(()), zero.reshape(())
                return b.node("DequantizeLinear", [b.const(signed, "weight_codes", np.int8),
                                                   b.const(scale, "weight_scale"), b.const(zero, "zero", np.int8)])
            return b.node("DequantizeLinear", [b.const(signed, "weight_codes", np.int8),
                                               b.const(scale, "weight_scale"), b.const(zero, "zero", np.int8)],
                          axis=axis)
        if isinstance(q, DoReFaWeight):
            codes, _ = q.codes(w)
            levels = 2 ** q.bits - 1
            dq = b.node("DequantizeLinear", [b.const(codes, "weight_codes", np.uint8),
                                             b.const(2.0 / levels, "weight_scale"),
                                             b.const(0, "zero", np.uint8)])
            return b.node("Add", [dq, b.const(-1.0, "minus_one")])
        w_eff = np.asarray(to_numpy(layer.quantized_kernel(train=False)), np.float32)
        if isinstance(q, Fp16):
            return b.node("Cast", [b.const(w_eff, "weight", np.float16)], to=b.onnx.TensorProto.FLOAT)
        return self.signs_or_float(w_eff, axis)

    def signs_or_float(self, w, axis):
        """A kernel whose every output unit is ``+-alpha_c`` (binary) as int8 signs and a ``Cast`` (all
        ``alpha_c = 1``) or a per-channel ``DequantizeLinear`` (exact: ``+-1 * alpha_c``); else float32."""
        b = self.b
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        alpha = np.abs(moved).max(axis=1) if moved.size else np.ones(w.shape[axis], np.float32)
        if not moved.size or not np.array_equal(np.abs(moved).min(axis=1), alpha) or not np.all(alpha > 0):
            return b.const(w, "weight")
        signs = b.const(np.where(w >= 0, 1, -1), "binary_weight", np.int8)
        if np.all(alpha == 1):
            return b.node("Cast", [signs], to=b.onnx.TensorProto.FLOAT)
        return b.node("DequantizeLinear", [signs, b.const(alpha, "binary_scale"),
                                           b.const(np.zeros(alpha.shape), "zero", np.int8)], axis=axis)

    # -- layers -------------------------------------------------------------------------------------
    def layer(self, layer, x, shape, where):
        """Emit ``layer`` on tensor ``x`` of per-example ``shape``; returns ``(tensor, shape)``."""
        b = self.b
        out_shape = tuple(layer.output_shape((1,) + tuple(shape))[1:])
        name = type(layer).__name__
        if isinstance(layer, Sequential):
            for i, child in enumerate(layer.layers):
                x, shape = self.layer(child, x, shape, f"{where}.{i}" if where else str(i))
            return x, shape
        if isinstance(layer, (Dropout,)):
            return x, shape
        if isinstance(layer, Residual):
            body, _ = self.layer(layer.body, x, shape, f"{where}.body")
            skip = x if layer.shortcut is None else self.layer(layer.shortcut, x, shape, f"{where}.shortcut")[0]
            return b.node("Add", [body, skip], "residual"), out_shape
        if isinstance(layer, Concat):
            outs = [self.layer(br, x, shape, f"{where}.{i}")[0] for i, br in enumerate(layer.branches)]
            return b.node("Concat", outs, "concat", axis=1), out_shape
        if hasattr(layer, "input_quantizer"):
            x = self.activation(layer.input_quantizer, x, where)
        if isinstance(layer, Conv2D):
            p = layer.padding
            inputs = [x, self.kernel(layer, 0)] + ([b.const(to_numpy(layer.b), "bias")] if layer.bias else [])
            return b.node("Conv", inputs, "conv", kernel_shape=[layer.kernel_size] * 2,
                          strides=[layer.stride] * 2, pads=[p] * 4), out_shape
        if isinstance(layer, Affine):
            if len(shape) > 1:
                x = b.node("Flatten", [x], axis=1)
            inputs = [x, self.kernel(layer, 1)] + ([b.const(to_numpy(layer.b), "bias")] if layer.bias else [])
            return b.node("Gemm", inputs, "gemm"), out_shape
        if isinstance(layer, ReLU):
            return b.node("Relu", [x]), out_shape
        if isinstance(layer, (MaxPool2D, AvgPool2D)):
            k, p = layer.kernel_size, layer.padding
            attrs = dict(kernel_shape=[k, k], strides=[layer.stride] * 2, pads=[p] * 4)
            if isinstance(layer, AvgPool2D):
                return b.node("AveragePool", [x], count_include_pad=1, **attrs), out_shape
            return b.node("MaxPool", [x], **attrs), out_shape
        if isinstance(layer, GlobalAvgPool2D):
            return b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1), out_shape
        if isinstance(layer, Flatten):
            return (b.node("Flatten", [x], axis=1) if len(shape) > 1 else x), out_shape
        if isinstance(layer, BatchNorm):
            arrays = {a: np.asarray(to_numpy(getattr(layer, a)), np.float32)
                      for a in ("gamma", "beta", "running_mean", "running_var")}
            if self.batchnorm == "op":
                inputs = [b.const(arrays[a], a) for a in ("gamma", "beta", "running_mean", "running_var")]
                return b.node("BatchNormalization", [x] + inputs, "batchnorm", epsilon=layer.eps), out_shape
            # folded: the simulation's own arithmetic, gamma * ((x - mean) * inv_std) + beta, so the
            # runtime's values equal lowbit's bit for bit (a sign that follows cannot flip)
            inv_std = (1.0 / np.sqrt(arrays["running_var"] + np.float32(layer.eps))).astype(np.float32)
            cshape = _channel_shape(len(shape) + 1, layer.num_features)
            for op, value in (("Sub", arrays["running_mean"]), ("Mul", inv_std), ("Mul", arrays["gamma"]),
                              ("Add", arrays["beta"])):
                x = b.node(op, [x, b.const(value.reshape(cshape), "batchnorm")])
            return x, out_shape
        if isinstance(layer, ChannelOp):
            v = b.const(np.asarray(to_numpy(layer.value), np.float32).reshape(
                _channel_shape(len(shape) + 1, layer.channels)), layer.op)
            op = {"add": "Add", "sub": "Sub", "rsub": "Sub", "mul": "Mul", "div": "Div"}[layer.op]
            return b.node(op, [v, x] if layer.op == "rsub" else [x, v]), out_shape
        if isinstance(layer, Rescale):
            y = b.node("Mul", [x, b.const(layer.scale, "scale")]) if layer.scale != 1 else x
            return (b.node("Add", [y, b.const(layer.offset, "offset")]) if layer.offset != 0 else y), out_shape
        if isinstance(layer, PixelCodes):
            levels = 2 ** layer.bits - 1
            codes = b.node("Round", [b.node("Mul", [b.node("Clip", [x, b.const(0.0, "zero"), b.const(1.0, "one")]),
                                                    b.const(levels, "levels")])], "codes")
            centred = b.node("Sub", [b.node("Mul", [codes, b.const(2.0, "two")]), b.const(levels, "levels")])
            return b.node("Mul", [centred, b.const(2.0 ** -layer.bits, "step")], "pixels"), out_shape
        if isinstance(layer, QuantActivation):
            return self.activation(layer.quantizer, x, where), out_shape
        if isinstance(layer, Threshold):
            t = np.asarray(to_numpy(layer.threshold), np.float32).reshape(_channel_shape(len(shape) + 1, layer.channels))
            mask = b.node("GreaterOrEqual", [x, b.const(t, "threshold")])
            return b.node("Where", [mask, b.const(layer.high, "high"), b.const(layer.low, "low")]), out_shape
        simple = {LeakyReLU: "LeakyRelu", Sigmoid: "Sigmoid", Tanh: "Tanh", Sign: "Sign", Round: "Round"}
        if type(layer) in simple:
            attrs = {"alpha": layer.alpha} if isinstance(layer, LeakyReLU) else {}
            return b.node(simple[type(layer)], [x], **attrs), out_shape
        if isinstance(layer, Softmax):
            return b.node(type(layer).__name__, [x], axis=1), out_shape
        if isinstance(layer, Clip):
            low = b.const(layer.low, "low") if math.isfinite(layer.low) else ""
            high = b.const(layer.high, "high") if math.isfinite(layer.high) else ""
            return b.node("Clip", [x, low, high]), out_shape
        if isinstance(layer, Pad2D):
            top, left, bottom, right = layer.pads
            pads = b.const([0, 0, top, left, 0, 0, bottom, right], "pads", np.int64)
            return b.node("Pad", [x, pads, b.const(layer.value, "pad_value")], mode="constant"), out_shape
        if isinstance(layer, FakeQuantize):
            if 0 <= layer.qmin and layer.qmax <= 255:
                dtype, full = np.uint8, (0, 255)
            elif -128 <= layer.qmin and layer.qmax <= 127:
                dtype, full = np.int8, (-128, 127)
            else:
                raise OnnxExportError(f"{where}: FakeQuantize range [{layer.qmin}, {layer.qmax}] fits no 8-bit type")
            s, z = b.const(layer.scale, "scale"), b.const(layer.zero_point, "zero_point", dtype)
            q = b.node("QuantizeLinear", [x, s, z])
            if (layer.qmin, layer.qmax) != full:
                q = b.node("Clip", [q, b.const(layer.qmin, "code_min", dtype), b.const(layer.qmax, "code_max", dtype)])
            return b.node("DequantizeLinear", [q, s, z]), out_shape
        raise OnnxExportError(f"layer {where} ({name}) has no ONNX form in lowbit's exporter")

    # -- packed stages ------------------------------------------------------------------------------
    def threshold(self, x, ndim, threshold, direction):
        """+-1 where ``direction * x >= direction * threshold`` per channel (axis 1), else -1."""
        b = self.b
        direction = np.asarray(to_numpy(direction)).astype(np.float32)
        threshold = np.asarray(to_numpy(threshold)).astype(np.float64)
        shape = _channel_shape(ndim, direction.size)
        scaled = b.node("Mul", [x, b.const(direction.reshape(shape), "direction")])
        bound = (threshold * direction).astype(np.float32).reshape(shape)
        mask = b.node("GreaterOrEqual", [scaled, b.const(bound, "threshold")])
        return b.node("Where", [mask, b.const(1.0, "plus"), b.const(-1.0, "minus")], "signs")

    def stage(self, stage, x, where):
        from . import packed as P

        b = self.b
        kind = stage.kind
        in_dims = P.sim_shape(stage.input_spec)
        if kind == "float":
            shape = tuple(in_dims)
            for i, layer in enumerate(stage.layers):
                x, shape = self.layer(layer, x, shape, f"{where}.{i}")
            return x
        if kind == "pack":
            if stage.output_spec[1] == "dense" and len(in_dims) > 1:
                x = b.node("Flatten", [x], axis=1)
            channels = stage.channels
            threshold = np.zeros(channels, np.float32) if stage.threshold is None else stage.threshold
            direction = np.ones(channels, np.int8) if stage.direction is None else stage.direction
            ndim = 4 if stage.output_spec[1] == "nhwc" else 2
            return self.threshold(x, ndim, threshold, direction)
        if kind in ("binary_dense", "binary_conv", "bitplane_dense"):
            from . import kernels

            canonical = stage.arrays()["weights"]
            if kind == "binary_conv":
                c = stage.input_spec[2][0]
                k = stage.kernel_size
                w = kernels.unpack_signs(np.ascontiguousarray(canonical), c * k * k, np.float32)
                w = self.signs_or_float(w.reshape(-1, c, k, k), 0)
                p = stage.padding
                return b.node("Conv", [x, w], "binary_conv", kernel_shape=[k, k], strides=[stage.stride] * 2,
                              pads=[p] * 4)
            w = kernels.unpack_signs(np.ascontiguousarray(canonical), stage.in_features, np.float32)
            if len(in_dims) > 1:
                x = b.node("Flatten", [x], axis=1)
            if kind == "binary_dense":
                return b.node("MatMul", [x, self.signs_or_float(np.ascontiguousarray(w.T), 1)], "binary_dense")
            levels = 2 ** stage.bits - 1
            codes = b.node("Round", [b.node("Mul", [b.node("Clip", [x, b.const(0.0, "zero"), b.const(1.0, "one")]),
                                                    b.const(levels, "levels")])], "codes")
            dot = b.node("MatMul", [codes, self.signs_or_float(np.ascontiguousarray(w.T), 1)])
            offset = np.float32(levels) * w.sum(axis=1)  # exact: integers below 2^24
            total = b.node("Sub", [b.node("Mul", [dot, b.const(2.0, "two")]), b.const(offset, "code_offset")])
            return self.threshold(total, 2, stage.threshold, stage.direction)
        if kind in ("int_maxpool", "packed_maxpool", "threshold_maxpool"):
            pooled = b.node("MaxPool", [x], kernel_shape=[stage.kernel] * 2, strides=[stage.stride] * 2,
                            pads=[stage.padding] * 4)
            if kind != "threshold_maxpool":
                return pooled
            return self.threshold(pooled, 4, stage.threshold, stage.direction)
        if kind == "threshold":
            return self.threshold(x, 4 if stage.input_spec[1] == "nhwc" else 2, stage.threshold, stage.direction)
        if kind == "flatten":
            return b.node("Flatten", [x], axis=1)
        if kind == "unpack":
            return x  # +-1 floats in the simulation's layout already
        if kind == "acc_to_float":
            ndim = 4 if stage.input_spec[1] == "nhwc" else 2
            channels = stage.input_spec[2][0]
            if stage.scale is not None:
                x = b.node("Mul", [x, b.const(to_numpy(stage.scale).reshape(_channel_shape(ndim, channels)), "scale")])
            if stage.bias is not None:
                x = b.node("Add", [x, b.const(to_numpy(stage.bias).reshape(_channel_shape(ndim, channels)), "bias")])
            return x
        raise OnnxExportError(f"stage {where} ({kind}) has no ONNX form in lowbit's exporter")


BATCHNORM_FORMS = ("folded", "op")


def model_to_onnx(model, opset=13, name=None, batchnorm="folded"):
    """An ``onnx.ModelProto`` computing ``model``'s evaluation-mode scores (see the module docstring).

    ``model`` is a :class:`~lowbit.Model` (float, k-bit or binary layers) or a
    :class:`~lowbit.PackedModel`.  The input is ``"input"`` ``(N, *model.input_shape)`` float32 and the
    output ``"scores"`` ``(N, classes)`` float32.  ``batchnorm="folded"`` (default) writes each
    BatchNorm as ``Sub``, ``Mul``, ``Mul``, ``Add`` per channel, the simulation's arithmetic bit for bit
    (a binary layer's sign after it then cannot flip); ``"op"`` writes ``BatchNormalization``.
    """
    from .packed import PackedModel

    onnx = _onnx()
    if not isinstance(opset, int) or isinstance(opset, bool) or not 13 <= opset <= 21:
        raise ValueError(f"opset must be an int in 13..21, got {opset!r}")
    if batchnorm not in BATCHNORM_FORMS:
        raise ValueError(f"batchnorm must be one of {list(BATCHNORM_FORMS)}, got {batchnorm!r}")
    builder = _Builder()
    exporter = _Exporter(builder, batchnorm)
    x = "input"
    if isinstance(model, PackedModel):
        from .packed import sim_shape

        for i, stage in enumerate(model.stages):
            x = exporter.stage(stage, x, f"stage {i}")
        out_shape = sim_shape(model.stages[-1].output_spec) if model.stages else model.input_shape
    elif isinstance(model, Layer) and hasattr(model, "input_shape"):
        x, out_shape = exporter.layer(model, x, tuple(model.input_shape), "")
    else:
        raise TypeError(f"model must be a lowbit Model or PackedModel, got {type(model).__name__}")
    builder.nodes.append(onnx.helper.make_node("Identity", [x], ["scores"], name="scores"))
    graph = onnx.helper.make_graph(
        builder.nodes, str(name or getattr(model, "name", "lowbit")),
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", *model.input_shape])],
        [onnx.helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["N", *out_shape])],
        builder.initializers)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)],
                                   producer_name="lowbit")
    proto.ir_version = min(proto.ir_version, 8 if opset <= 18 else 10)  # loadable by older runtimes
    onnx.checker.check_model(proto)
    return proto


def export_onnx(model, path, opset=13, batchnorm="folded"):
    """Write ``model`` (a :class:`~lowbit.Model` or :class:`~lowbit.PackedModel`) to ``path`` as ONNX,
    atomically.  Returns the path.  See :func:`model_to_onnx`."""
    from .io import write_bytes_atomic

    proto = model_to_onnx(model, opset=opset, batchnorm=batchnorm)
    return write_bytes_atomic(path, proto.SerializeToString())
