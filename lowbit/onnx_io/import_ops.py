"""The ONNX importer's per-op handlers: one method per op with a tensor input, returning its layers."""
from __future__ import annotations

import math

import numpy as np

from ..layers import Affine, AvgPool2D, BatchNorm, Conv2D, Dropout, Flatten, MaxPool2D, ReLU, Rescale
from ..quant_layers import QuantActivation
from ..onnx_layers import (
    ChannelOp, Clip, FakeQuantize, LeakyReLU, LogSoftmax, Pad2D, Round, Sigmoid, Sign, Softmax, Tanh, Threshold,
)
from .common import onnx_module

__all__ = ["ImportOps"]


class ImportOps:
    """Mixed into the importer: ``_op_<Op>(node, x, shape, attrs)`` returns the layers of one node."""

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
        to = onnx_module().helper.tensor_dtype_to_np_dtype(attrs["to"])
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
