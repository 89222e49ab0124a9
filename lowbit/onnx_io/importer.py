"""ONNX import: fold constants, turn each node into layers, recover branches (see :mod:`lowbit.onnx_io`)."""
from __future__ import annotations

import math
import os

import numpy as np

from ..layers import Concat, Residual, Sequential
from ..model import Model
from .common import SUPPORTED_OPS, OnnxImportError, check_shape, onnx_module, opset_of, tensor_to_array
from .import_ops import ImportOps

__all__ = ["load_onnx", "model_from_onnx"]


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
    onnx = onnx_module()
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
                      "opset": opset_of(proto)}
    return model




class Node:
    """One ONNX node with its decoded attributes and a label for messages."""

    def __init__(self, index, proto):
        onnx = onnx_module()
        self.index = index
        self.op = proto.op_type
        self.domain = proto.domain
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.label = f"{proto.name!r} (#{index}, {self.op})" if proto.name else f"#{index} ({self.op})"
        self.attrs = {}
        for attr in proto.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                self.attrs[attr.name] = tensor_to_array(attr.t, f"attribute {attr.name} of node {self.label}")
            elif attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise OnnxImportError(f"node {self.label} holds a subgraph, which lowbit does not import")
            else:
                self.attrs[attr.name] = onnx.helper.get_attribute_value(attr)
                if isinstance(self.attrs[attr.name], bytes):
                    self.attrs[attr.name] = self.attrs[attr.name].decode("utf-8", "replace")

    def error(self, text):
        return OnnxImportError(f"node {self.label}: {text}")




class Importer(ImportOps):
    """One graph's import: pass 1 converts node by node (the ``_op_*`` handlers of :class:`ImportOps`),
    pass 2 recovers the chain and its residual/concat blocks."""

    def __init__(self, proto, source):
        onnx = onnx_module()
        self.source = source
        self.opset = opset_of(proto)
        graph = proto.graph
        self.consts = {}
        for tensor in graph.initializer:
            self.consts[tensor.name] = tensor_to_array(tensor, f"initializer {tensor.name!r}")
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
        self.input_shape = tuple(check_shape(per_example, f"input {value.name!r}"))
        self.output_name = graph.output[0].name
        self.shapes = {self.input_name: self.input_shape}  # per-example shapes of dynamic tensors
        self.producer = {}            # dynamic tensor -> node
        self.consumers = {self.input_name: []}
        self.node_layers = {}         # node index -> list of layers (layer nodes)
        self.merges = {}              # node index -> "add" or "concat"
        self.quantized = {}           # output of an activation QuantizeLinear -> its parameters
        self.half = set()             # outputs of a Cast to float16 (to be cast back)
        self.masks = {}               # output of GreaterOrEqual(tensor, constant) -> the thresholds
        self.nodes = [Node(i, p) for i, p in enumerate(graph.node)]
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
            out = args[0].astype(onnx_module().helper.tensor_dtype_to_np_dtype(attrs["to"]))
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
        check_shape(out.shape, f"the output of node {node.label}")
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
        check_shape(out_shape, f"the output of node {node.label}")
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
    importer = Importer(proto, source)
    layers = importer.run()
    model = Model(layers, input_shape=importer.input_shape, name=str(name))
    return model


# ================================================================================================
