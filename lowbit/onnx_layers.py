"""Layers that ONNX models bring with them: activations lowbit's own models do not use, an explicit
zero padding, ONNX's ``Sign`` and a fixed fake-quantizer (``QuantizeLinear`` + ``DequantizeLinear``).

They follow the layer protocol of :mod:`lowbit.layers` (forward, backward, config) and are registered
by name, so a model imported with :func:`lowbit.onnx_io.load_onnx` and saved as ``.npz`` loads,
trains (QAT fine-tuning) and converts like any other.  Arrays are float32; any shape unless said.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import get_array_module
from .layers import Layer, check_nonnegative_int, register_layer

__all__ = ["LeakyReLU", "Sigmoid", "Tanh", "Clip", "Softmax", "LogSoftmax", "Sign", "Pad2D",
           "FakeQuantize", "ChannelOp", "Threshold", "Round"]


def _check_float(name, value, allow_inf=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or math.isnan(value) or (not allow_inf and math.isinf(value)):
        raise ValueError(f"{name} must be a {'' if allow_inf else 'finite '}number, got {value!r}")
    return float(value)


@register_layer
class LeakyReLU(Layer):
    """``y = x`` where ``x >= 0``, else ``alpha * x`` (ONNX ``LeakyRelu``, default alpha 0.01)."""

    def __init__(self, alpha=0.01):
        self.alpha = _check_float("alpha", alpha)

    def config(self):
        return {"alpha": self.alpha}

    def forward(self, x, train=False):
        self._cache_mask = x >= 0
        return get_array_module(x).where(self._cache_mask, x, x * x.dtype.type(self.alpha))

    def backward(self, dout):
        return get_array_module(dout).where(self._cache_mask, dout, dout * dout.dtype.type(self.alpha))


@register_layer
class Sigmoid(Layer):
    """``y = 1 / (1 + exp(-x))``; ``dx = dout * y * (1 - y)``."""

    def forward(self, x, train=False):
        xp = get_array_module(x)
        one = x.dtype.type(1)
        with np.errstate(over="ignore"):
            y = one / (one + xp.exp(-x))
        self._cache_y = y
        return y

    def backward(self, dout):
        y = self._cache_y
        return dout * y * (y.dtype.type(1) - y)


@register_layer
class Tanh(Layer):
    """``y = tanh(x)``; ``dx = dout * (1 - y^2)``."""

    def forward(self, x, train=False):
        y = get_array_module(x).tanh(x)
        self._cache_y = y
        return y

    def backward(self, dout):
        y = self._cache_y
        return dout * (y.dtype.type(1) - y * y)


@register_layer
class Clip(Layer):
    """``y = min(max(x, low), high)`` (ONNX ``Clip``; ReLU6 is ``Clip(0, 6)``).  The gradient passes
    where ``low <= x <= high``.  ``low`` / ``high`` may be infinite (no bound on that side)."""

    def __init__(self, low=-math.inf, high=math.inf):
        self.low = _check_float("low", low, allow_inf=True)
        self.high = _check_float("high", high, allow_inf=True)
        if self.low > self.high:
            raise ValueError(f"low must be <= high, got low={self.low}, high={self.high}")

    def config(self):
        # JSON has no infinity: the manifest stores None for an open side.
        return {"low": None if math.isinf(self.low) else self.low,
                "high": None if math.isinf(self.high) else self.high}

    @classmethod
    def from_spec(cls, spec):
        cfg = dict(spec.get("config", {}))
        low, high = cfg.get("low"), cfg.get("high")
        return cls(-math.inf if low is None else low, math.inf if high is None else high)

    def forward(self, x, train=False):
        t = x.dtype.type
        self._cache_mask = (x >= t(self.low)) & (x <= t(self.high))
        return get_array_module(x).clip(x, t(self.low), t(self.high))

    def backward(self, dout):
        return dout * self._cache_mask


def _check_axis(axis):
    if axis not in (1, -1):
        raise ValueError(f"axis must be 1 (the class axis of (N, C) scores), got {axis!r}")
    return int(axis)


@register_layer
class Softmax(Layer):
    """Softmax over the classes of ``(N, C)`` scores (the max is subtracted first)."""

    def __init__(self, axis=1):
        self.axis = _check_axis(axis)

    def config(self):
        return {"axis": self.axis}

    def forward(self, x, train=False):
        xp = get_array_module(x)
        if x.ndim != 2:
            raise ValueError(f"{type(self).__name__} expects (N, C) scores, got shape {x.shape}")
        e = xp.exp(x - x.max(axis=1, keepdims=True))
        y = e / e.sum(axis=1, keepdims=True)
        self._cache_y = y
        return y

    def backward(self, dout):
        y = self._cache_y
        return y * (dout - (dout * y).sum(axis=1, keepdims=True))


@register_layer
class LogSoftmax(Softmax):
    """``log(softmax(x))`` over the classes of ``(N, C)`` scores."""

    def forward(self, x, train=False):
        xp = get_array_module(x)
        if x.ndim != 2:
            raise ValueError(f"LogSoftmax expects (N, C) scores, got shape {x.shape}")
        shifted = x - x.max(axis=1, keepdims=True)
        y = shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
        self._cache_y = y
        return y

    def backward(self, dout):
        p = get_array_module(dout).exp(self._cache_y)
        return dout - p * dout.sum(axis=1, keepdims=True)


@register_layer
class Sign(Layer):
    """ONNX ``Sign``: ``+1`` for ``x > 0``, ``-1`` for ``x < 0``, ``0`` for zero.

    (Not the BNN sign of :mod:`lowbit.quantizers`, which maps 0 to +1; ``lowbit export`` writes that
    one as ``Sign(Sign(x) + 0.5)``.)  Gradient: straight-through inside [-1, 1] (hard tanh), as
    :class:`~lowbit.quantizers.SteSign`.
    """

    def forward(self, x, train=False):
        self._cache_x = x
        return get_array_module(x).sign(x)

    def backward(self, dout):
        return dout * (abs(self._cache_x) <= 1)


@register_layer
class Pad2D(Layer):
    """Constant padding of the spatial axes of ``(N, C, H, W)``: ``(top, left, bottom, right)``.

    Lowbit's convolutions and pools pad symmetrically; an ONNX node with uneven pads imports as this
    layer followed by the unpadded node.  ``value`` is 0 for convolutions, ``-inf`` for max-pools.
    """

    def __init__(self, pads=(0, 0, 0, 0), value=0.0):
        if not isinstance(pads, (list, tuple)) or len(pads) != 4:
            raise ValueError(f"pads must be (top, left, bottom, right), got {pads!r}")
        self.pads = tuple(check_nonnegative_int("pads", p) for p in pads)
        self.value = _check_float("value", value, allow_inf=True)

    def config(self):
        return {"pads": list(self.pads), "value": None if math.isinf(self.value) else self.value}

    @classmethod
    def from_spec(cls, spec):
        cfg = dict(spec.get("config", {}))
        value = cfg.get("value", 0.0)
        return cls(cfg.get("pads", (0, 0, 0, 0)), -math.inf if value is None else value)

    def forward(self, x, train=False):
        if x.ndim != 4:
            raise ValueError(f"Pad2D expects (N, C, H, W), got an input of shape {x.shape}")
        top, left, bottom, right = self.pads
        return get_array_module(x).pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)),
                                       constant_values=x.dtype.type(self.value))

    def backward(self, dout):
        top, left, bottom, right = self.pads
        h, w = dout.shape[2], dout.shape[3]
        return dout[:, :, top:h - bottom, left:w - right]

    def output_shape(self, input_shape):
        n, c, h, w = input_shape
        top, left, bottom, right = self.pads
        return (n, c, h + top + bottom, w + left + right)


@register_layer
class FakeQuantize(Layer):
    """An activation ``QuantizeLinear`` + ``DequantizeLinear`` pair with fixed parameters (per tensor).

    ``q = clip(round_half_even(x / scale) + zero_point, qmin, qmax)``, ``y = (q - zero_point) * scale``:
    ONNX's formulas, with ``qmin, qmax`` the integer type's range (0, 255 for uint8; -128, 127 for
    int8).  Gradient: straight-through where ``q`` was not clipped.
    """

    def __init__(self, scale=1.0, zero_point=0, qmin=0, qmax=255):
        self.scale = _check_float("scale", scale)
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.zero_point, self.qmin, self.qmax = int(zero_point), int(qmin), int(qmax)
        if not self.qmin <= self.zero_point <= self.qmax:
            raise ValueError(f"zero_point must lie in [qmin, qmax] = [{qmin}, {qmax}], got {zero_point}")

    def config(self):
        return {"scale": self.scale, "zero_point": self.zero_point, "qmin": self.qmin, "qmax": self.qmax}

    def forward(self, x, train=False):
        xp = get_array_module(x)
        t = x.dtype.type
        q = xp.rint(x / t(self.scale)) + t(self.zero_point)
        self._cache_mask = (q >= self.qmin) & (q <= self.qmax)
        q = xp.clip(q, t(self.qmin), t(self.qmax))
        return (q - t(self.zero_point)) * t(self.scale)

    def backward(self, dout):
        return dout * self._cache_mask


@register_layer
class ChannelOp(Layer):
    """An elementwise op with a per-channel constant on axis 1: ``x + v``, ``x - v``, ``v - x``, ``x * v``
    or ``x / v`` (``op`` = "add", "sub", "rsub", "mul", "div"), ``v`` float32 ``(C,)``.

    ONNX graphs normalise inputs per channel (``(x - mean) / std``) and lowbit's exporter writes
    BatchNorm in this folded form (bit for bit the simulation's arithmetic).  ``value`` is a saved
    buffer, not trained.
    """

    buffer_names = ("value",)
    OPS = ("add", "sub", "rsub", "mul", "div")

    def __init__(self, op="add", channels=1):
        if op not in self.OPS:
            raise ValueError(f"op must be one of {list(self.OPS)}, got {op!r}")
        self.op = op
        self.channels = int(channels)
        if self.channels <= 0:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.value = np.zeros(self.channels, np.float32) if op not in ("mul", "div") \
            else np.ones(self.channels, np.float32)

    def config(self):
        return {"op": self.op, "channels": self.channels}

    def _v(self, x):
        if x.ndim < 2 or x.shape[1] != self.channels:
            raise ValueError(f"ChannelOp expects {self.channels} channels on axis 1, got shape {x.shape}")
        return self.value.astype(x.dtype, copy=False).reshape((self.channels,) + (1,) * (x.ndim - 2))

    def forward(self, x, train=False):
        v = self._v(x)
        self._cache_v = v
        if self.op == "add":
            return x + v
        if self.op == "sub":
            return x - v
        if self.op == "rsub":
            return v - x
        if self.op == "mul":
            return x * v
        return x / v

    def backward(self, dout):
        v = self._cache_v
        if self.op in ("add", "sub"):
            return dout
        if self.op == "rsub":
            return -dout
        return dout * v if self.op == "mul" else dout / v


@register_layer
class Threshold(Layer):
    """``y = high`` where ``x >= threshold[c]``, else ``low``, per channel on axis 1 (ONNX
    ``GreaterOrEqual`` + ``Where``; lowbit's export of a packed model's thresholds, ``high = 1``,
    ``low = -1``).  ``threshold`` (C,) float32 is a saved buffer; NaN never passes.  Gradient:
    straight-through (``dx = dout``).
    """

    buffer_names = ("threshold",)

    def __init__(self, channels=1, high=1.0, low=-1.0):
        self.channels = int(channels)
        if self.channels <= 0:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.high = _check_float("high", high)
        self.low = _check_float("low", low)
        self.threshold = np.zeros(self.channels, np.float32)

    def config(self):
        return {"channels": self.channels, "high": self.high, "low": self.low}

    def forward(self, x, train=False):
        if x.ndim < 2 or x.shape[1] != self.channels:
            raise ValueError(f"Threshold expects {self.channels} channels on axis 1, got shape {x.shape}")
        t = self.threshold.astype(x.dtype, copy=False).reshape((self.channels,) + (1,) * (x.ndim - 2))
        dtype = x.dtype.type
        return get_array_module(x).where(x >= t, dtype(self.high), dtype(self.low))

    def backward(self, dout):
        return dout


@register_layer
class Round(Layer):
    """ONNX ``Round``: to the nearest integer, halves to even (``rint``).  Gradient: straight-through."""

    def forward(self, x, train=False):
        return get_array_module(x).rint(x)

    def backward(self, dout):
        return dout
