"""ReActNet's learnable activation shifts (Liu et al. 2020, "ReActNet: Towards precise binary neural
networks with generalized activation functions"): :class:`RSign` and :class:`RPReLU`.

Both act per channel (axis 1 of ``(N, C)`` or ``(N, C, H, W)``) and own their parameters, so they are
layers, not quantizers.  Both are monotone per channel (RPReLU while its slopes are >= 0), so
:func:`lowbit.convert` folds them, with the BatchNorm in front, into the integer (or float) threshold
of the packed sign that follows: a packed model predicts exactly what the simulation predicts.

* ``RSign`` replaces a sign: ``QuantActivation("ste_sign")`` or the ``input_quantizer`` of the binary
  layer after it (which then gets ``input_quantizer=None``: its input is already +-1).
* ``RPReLU`` replaces a ReLU/PReLU on the real-valued stream (after a Bi-Real block's sum).
"""
from __future__ import annotations

import numpy as np

from .backend import get_array_module
from .layers import Layer, check_positive_int, register_layer

__all__ = ["RSign", "RPReLU"]


def _channel_shape(layer, x, channels):
    if x.ndim not in (2, 4) or x.shape[1] != channels:
        raise ValueError(f"{type(layer).__name__} expects (N, {channels}) or (N, {channels}, H, W), "
                         f"got an input of shape {getattr(x, 'shape', type(x).__name__)}")
    return (1, channels) if x.ndim == 2 else (1, channels, 1, 1)


def _per_channel(param, x, shape):
    return param.astype(x.dtype, copy=False).reshape(shape)


@register_layer
class RSign(Layer):
    """A sign with a learnable threshold per channel: ``y = sign(x - threshold_c)`` (+1 where
    ``x - threshold_c >= 0``, the bit convention of :mod:`lowbit.kernels`).

    Pseudo-gradient: the straight-through estimator clipped at ``clip`` (hard tanh) at
    ``u = x - threshold_c``: ``dx = dout * (|u| <= clip)`` and ``dthreshold_c = -sum dx`` over the
    batch (and space).  ReActNet, Liu et al. 2020 (its RSign).

    Parameters
    ----------
    channels : int
        C, the size of axis 1 of the input.
    clip : float
        Where the straight-through gradient stops (default 1, as ``ste_sign``).

    Shapes: x (N, C) or (N, C, H, W) float -> y the same shape and dtype, values +-1.
    """

    param_names = ("threshold",)
    per_channel_arrays = True  # lowbit.io.declared_shapes: every parameter is (channels,)
    precision = 1

    def __init__(self, channels, clip=1.0):
        self.channels = check_positive_int("channels", channels)
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0:
            raise ValueError(f"clip must be a positive number, got {clip!r}")
        self.clip = float(clip)
        self.threshold = np.zeros(self.channels, dtype=np.float32)
        self.dthreshold = None
        self._cache = None

    def config(self):
        return {"channels": self.channels, "clip": self.clip}

    def shifted(self, x):
        """``x - threshold_c`` as the forward pass computes it (the converter evaluates it too)."""
        return x - _per_channel(self.threshold, x, _channel_shape(self, x, self.channels))

    def forward(self, x, train=False):
        u = self.shifted(x)
        if bool(get_array_module(u).isnan(u).any()):
            raise ValueError("RSign got NaN input (NaN has no sign)")
        self._cache = u
        q = (u >= 0).astype(x.dtype)
        q *= 2
        q -= 1
        return q

    def backward(self, dout):
        u = self._cache
        xp = get_array_module(u)
        dx = dout * (xp.abs(u) <= u.dtype.type(self.clip))
        axes = (0,) if dx.ndim == 2 else (0, 2, 3)
        self.dthreshold = -dx.sum(axis=axes).astype(self.threshold.dtype, copy=False)
        return dx

    def output_shape(self, input_shape):
        return tuple(input_shape)


@register_layer
class RPReLU(Layer):
    """ReActNet's shifted PReLU per channel: ``u = x - shift_in_c``, ``y = (u if u >= 0 else
    slope_c * u) + shift_out_c``.

    Gradients: ``dx = dout * (1 if u >= 0 else slope_c)``, ``dslope_c = sum dout * min(u, 0)``,
    ``dshift_in_c = -sum dx``, ``dshift_out_c = sum dout`` (sums over batch and space).  The slopes
    start at 0.25 (PReLU's default), the shifts at 0.  Monotone per channel while ``slope_c >= 0``;
    :func:`lowbit.convert` checks that before it folds one into a threshold.

    Shapes: x (N, C) or (N, C, H, W) float -> y the same shape and dtype.
    """

    param_names = ("shift_in", "slope", "shift_out")
    per_channel_arrays = True

    def __init__(self, channels, slope=0.25):
        self.channels = check_positive_int("channels", channels)
        if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not np.isfinite(slope):
            raise ValueError(f"slope must be a finite number, got {slope!r}")
        self.init_slope = float(slope)
        self.shift_in = np.zeros(self.channels, dtype=np.float32)
        self.slope = np.full(self.channels, self.init_slope, dtype=np.float32)
        self.shift_out = np.zeros(self.channels, dtype=np.float32)
        self.dshift_in = self.dslope = self.dshift_out = None
        self._cache = None

    def config(self):
        return {"channels": self.channels, "slope": self.init_slope}

    def forward(self, x, train=False):
        shape = _channel_shape(self, x, self.channels)
        xp = get_array_module(x)
        u = x - _per_channel(self.shift_in, x, shape)
        slope = _per_channel(self.slope, x, shape)
        self._cache = (u, shape)
        return xp.where(u >= 0, u, slope * u) + _per_channel(self.shift_out, x, shape)

    def backward(self, dout):
        u, shape = self._cache
        xp = get_array_module(u)
        axes = (0,) if dout.ndim == 2 else (0, 2, 3)
        negative = u < 0
        dx = xp.where(negative, dout * _per_channel(self.slope, dout, shape), dout)
        dtype = self.slope.dtype
        self.dslope = (dout * xp.where(negative, u, u.dtype.type(0))).sum(axis=axes).astype(dtype, copy=False)
        self.dshift_in = -dx.sum(axis=axes).astype(dtype, copy=False)
        self.dshift_out = dout.sum(axis=axes).astype(dtype, copy=False)
        return dx

    def monotone(self):
        """True when every slope is >= 0 (then the layer is non-decreasing in each element)."""
        return bool(np.all(np.asarray(self.slope) >= 0))

    def output_shape(self, input_shape):
        return tuple(input_shape)
