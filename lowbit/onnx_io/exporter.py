"""ONNX export: a model's layers, or a packed model's stages, as standard ops (see :mod:`lowbit.onnx_io`)."""
from __future__ import annotations

import math

import numpy as np

from ..backend import to_numpy
from ..layers import (
    Affine, AvgPool2D, BatchNorm, Concat, Conv2D, Dropout, Flatten, GlobalAvgPool2D, Layer, MaxPool2D,
    PixelCodes, ReLU, Rescale, Residual, Sequential,
)
from ..quant_layers import QuantActivation
from ..onnx_layers import (
    ChannelOp, Clip, FakeQuantize, LeakyReLU, Pad2D, Round, Sigmoid, Sign, Softmax, Tanh, Threshold,
)
from .common import OnnxExportError, onnx_module

__all__ = ["BATCHNORM_FORMS", "model_to_onnx", "export_onnx"]


class Builder:
    """Collects nodes and initializers; names every tensor uniquely."""

    def __init__(self):
        self.onnx = onnx_module()
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


def channel_shape(ndim, channels):
    """Shape that broadcasts a per-channel vector over axis 1 of an ``ndim``-D tensor."""
    return (channels,) + (1,) * (ndim - 2)


class Exporter:
    def __init__(self, builder, batchnorm="folded"):
        self.b = builder
        self.batchnorm = batchnorm

    # -- quantizers ---------------------------------------------------------------------------------
    def sign(self, x):
        """The BNN sign, +1 for x >= 0 (also -0.0), -1 below: Sign(Sign(x) + 0.5)."""
        b = self.b
        return b.node("Sign", [b.node("Add", [b.node("Sign", [x]), b.const(0.5, "half")])], "binary")

    def activation(self, q, x, where):
        from ..quantizers import DoReFaActivation, Fp16, Identity, SteSign, StochasticBinary

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
        from ..quantizers import DoReFaWeight, Fp16, Identity, UniformWeight

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
        for emit in (self.lowbit_layer, self.imported_layer):
            out = emit(layer, x, shape, where)
            if out is not None:
                return out, out_shape
        raise OnnxExportError(f"layer {where} ({type(layer).__name__}) has no ONNX form in lowbit's exporter")

    def lowbit_layer(self, layer, x, shape, where):
        """The output tensor of one of lowbit's own leaf layers, or None for another layer."""
        b = self.b
        if isinstance(layer, Conv2D):
            p = layer.padding
            inputs = [x, self.kernel(layer, 0)] + ([b.const(to_numpy(layer.b), "bias")] if layer.bias else [])
            return b.node("Conv", inputs, "conv", kernel_shape=[layer.kernel_size] * 2,
                          strides=[layer.stride] * 2, pads=[p] * 4)
        if isinstance(layer, Affine):
            if len(shape) > 1:
                x = b.node("Flatten", [x], axis=1)
            inputs = [x, self.kernel(layer, 1)] + ([b.const(to_numpy(layer.b), "bias")] if layer.bias else [])
            return b.node("Gemm", inputs, "gemm")
        if isinstance(layer, ReLU):
            return b.node("Relu", [x])
        if isinstance(layer, (MaxPool2D, AvgPool2D)):
            k, p = layer.kernel_size, layer.padding
            attrs = dict(kernel_shape=[k, k], strides=[layer.stride] * 2, pads=[p] * 4)
            if isinstance(layer, AvgPool2D):
                return b.node("AveragePool", [x], count_include_pad=1, **attrs)
            return b.node("MaxPool", [x], **attrs)
        if isinstance(layer, GlobalAvgPool2D):
            return b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
        if isinstance(layer, Flatten):
            return b.node("Flatten", [x], axis=1) if len(shape) > 1 else x
        if isinstance(layer, BatchNorm):
            return self.batchnorm_layer(layer, x, shape)
        if isinstance(layer, Rescale):
            y = b.node("Mul", [x, b.const(layer.scale, "scale")]) if layer.scale != 1 else x
            return b.node("Add", [y, b.const(layer.offset, "offset")]) if layer.offset != 0 else y
        if isinstance(layer, PixelCodes):
            levels = 2 ** layer.bits - 1
            codes = b.node("Round", [b.node("Mul", [b.node("Clip", [x, b.const(0.0, "zero"), b.const(1.0, "one")]),
                                                    b.const(levels, "levels")])], "codes")
            centred = b.node("Sub", [b.node("Mul", [codes, b.const(2.0, "two")]), b.const(levels, "levels")])
            return b.node("Mul", [centred, b.const(2.0 ** -layer.bits, "step")], "pixels")
        if isinstance(layer, QuantActivation):
            return self.activation(layer.quantizer, x, where)
        return None

    def batchnorm_layer(self, layer, x, shape):
        """BatchNorm as ``BatchNormalization`` (``batchnorm="op"``) or as the simulation's four ops."""
        b = self.b
        arrays = {a: np.asarray(to_numpy(getattr(layer, a)), np.float32)
                  for a in ("gamma", "beta", "running_mean", "running_var")}
        if self.batchnorm == "op":
            inputs = [b.const(arrays[a], a) for a in ("gamma", "beta", "running_mean", "running_var")]
            return b.node("BatchNormalization", [x] + inputs, "batchnorm", epsilon=layer.eps)
        # folded: the simulation's own arithmetic, gamma * ((x - mean) * inv_std) + beta, so the
        # runtime's values equal lowbit's bit for bit (a sign that follows cannot flip)
        inv_std = (1.0 / np.sqrt(arrays["running_var"] + np.float32(layer.eps))).astype(np.float32)
        cshape = channel_shape(len(shape) + 1, layer.num_features)
        for op, value in (("Sub", arrays["running_mean"]), ("Mul", inv_std), ("Mul", arrays["gamma"]),
                          ("Add", arrays["beta"])):
            x = b.node(op, [x, b.const(value.reshape(cshape), "batchnorm")])
        return x

    def imported_layer(self, layer, x, shape, where):
        """The output tensor of a layer of :mod:`lowbit.onnx_layers` (what imported graphs bring), or None."""
        b = self.b
        if isinstance(layer, ChannelOp):
            v = b.const(np.asarray(to_numpy(layer.value), np.float32).reshape(
                channel_shape(len(shape) + 1, layer.channels)), layer.op)
            op = {"add": "Add", "sub": "Sub", "rsub": "Sub", "mul": "Mul", "div": "Div"}[layer.op]
            return b.node(op, [v, x] if layer.op == "rsub" else [x, v])
        if isinstance(layer, Threshold):
            t = np.asarray(to_numpy(layer.threshold), np.float32).reshape(channel_shape(len(shape) + 1, layer.channels))
            mask = b.node("GreaterOrEqual", [x, b.const(t, "threshold")])
            return b.node("Where", [mask, b.const(layer.high, "high"), b.const(layer.low, "low")])
        simple = {LeakyReLU: "LeakyRelu", Sigmoid: "Sigmoid", Tanh: "Tanh", Sign: "Sign", Round: "Round"}
        if type(layer) in simple:
            attrs = {"alpha": layer.alpha} if isinstance(layer, LeakyReLU) else {}
            return b.node(simple[type(layer)], [x], **attrs)
        if isinstance(layer, Softmax):
            return b.node(type(layer).__name__, [x], axis=1)
        if isinstance(layer, Clip):
            low = b.const(layer.low, "low") if math.isfinite(layer.low) else ""
            high = b.const(layer.high, "high") if math.isfinite(layer.high) else ""
            return b.node("Clip", [x, low, high])
        if isinstance(layer, Pad2D):
            top, left, bottom, right = layer.pads
            pads = b.const([0, 0, top, left, 0, 0, bottom, right], "pads", np.int64)
            return b.node("Pad", [x, pads, b.const(layer.value, "pad_value")], mode="constant")
        if isinstance(layer, FakeQuantize):
            return self.fake_quantize(layer, x, where)
        return None

    def fake_quantize(self, layer, x, where):
        """An imported activation quantizer as ``QuantizeLinear`` (+ ``Clip``) + ``DequantizeLinear``."""
        b = self.b
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
        return b.node("DequantizeLinear", [q, s, z])

    # -- packed stages ------------------------------------------------------------------------------
    def threshold(self, x, ndim, threshold, direction):
        """+-1 where ``direction * x >= direction * threshold`` per channel (axis 1), else -1."""
        b = self.b
        direction = np.asarray(to_numpy(direction)).astype(np.float32)
        threshold = np.asarray(to_numpy(threshold)).astype(np.float64)
        shape = channel_shape(ndim, direction.size)
        scaled = b.node("Mul", [x, b.const(direction.reshape(shape), "direction")])
        bound = (threshold * direction).astype(np.float32).reshape(shape)
        mask = b.node("GreaterOrEqual", [scaled, b.const(bound, "threshold")])
        return b.node("Where", [mask, b.const(1.0, "plus"), b.const(-1.0, "minus")], "signs")

    def stage(self, stage, x, where):
        from .. import packed as P

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
            return self.binary_stage(stage, x, in_dims)
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
                x = b.node("Mul", [x, b.const(to_numpy(stage.scale).reshape(channel_shape(ndim, channels)), "scale")])
            if stage.bias is not None:
                x = b.node("Add", [x, b.const(to_numpy(stage.bias).reshape(channel_shape(ndim, channels)), "bias")])
            return x
        raise OnnxExportError(f"stage {where} ({kind}) has no ONNX form in lowbit's exporter")


    def binary_stage(self, stage, x, in_dims):
        """A packed binary product (dense, convolution, or the bit-plane dense layer of 8-bit pixels) as
        a ``Conv``/``MatMul`` on +-1 weights."""
        from .. import kernels

        b = self.b
        kind = stage.kind
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


BATCHNORM_FORMS = ("folded", "op")


def model_to_onnx(model, opset=13, name=None, batchnorm="folded"):
    """An ``onnx.ModelProto`` computing ``model``'s evaluation-mode scores (see the module docstring).

    ``model`` is a :class:`~lowbit.Model` (float, k-bit or binary layers) or a
    :class:`~lowbit.PackedModel`.  The input is ``"input"`` ``(N, *model.input_shape)`` float32 and the
    output ``"scores"`` ``(N, classes)`` float32.  ``batchnorm="folded"`` (default) writes each
    BatchNorm as ``Sub``, ``Mul``, ``Mul``, ``Add`` per channel, the simulation's arithmetic bit for bit
    (a binary layer's sign after it then cannot flip); ``"op"`` writes ``BatchNormalization``.
    """
    from ..packed import PackedModel

    onnx = onnx_module()
    if not isinstance(opset, int) or isinstance(opset, bool) or not 13 <= opset <= 21:
        raise ValueError(f"opset must be an int in 13..21, got {opset!r}")
    if batchnorm not in BATCHNORM_FORMS:
        raise ValueError(f"batchnorm must be one of {list(BATCHNORM_FORMS)}, got {batchnorm!r}")
    builder = Builder()
    exporter = Exporter(builder, batchnorm)
    x = "input"
    if isinstance(model, PackedModel):
        from ..packed import sim_shape

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
    from ..io import write_bytes_atomic

    proto = model_to_onnx(model, opset=opset, batchnorm=batchnorm)
    return write_bytes_atomic(path, proto.SerializeToString())
