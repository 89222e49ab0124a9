"""Layers without parameters that map each example on its own: ReLU, Flatten, Rescale, PixelCodes."""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..functions import relu, relu_backward
from .base import Layer, register_layer


@register_layer
class ReLU(Layer):
    def forward(self, x, train=False):
        out = relu(x)
        self._cache_out = out
        return out

    def backward(self, dout):
        return relu_backward(self._cache_out, dout)


@register_layer
class Flatten(Layer):
    """(N, ...) -> (N, prod(...))."""

    def forward(self, x, train=False):
        self._cache_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dout):
        return dout.reshape(self._cache_shape)

    def output_shape(self, input_shape):
        return (input_shape[0], int(np.prod(input_shape[1:])))


@register_layer
class Rescale(Layer):
    """``y = x * scale + offset``: input normalisation that is part of the model file.

    ``Rescale(2, -1)`` maps images in [0, 1] to [-1, 1] (the BNN papers' input range).
    """

    def __init__(self, scale=1.0, offset=0.0):
        self.scale = float(scale)
        self.offset = float(offset)

    def config(self):
        return {"scale": self.scale, "offset": self.offset}

    def forward(self, x, train=False):
        return x * x.dtype.type(self.scale) + x.dtype.type(self.offset)

    def backward(self, dout):
        return dout * dout.dtype.type(self.scale)


@register_layer
class PixelCodes(Layer):
    """Images in [0, 1] to ``bits``-bit codes on a dyadic grid in (-1, 1): the BNN input range, exactly.

    ``p = rint(clip(x, 0, 1) * L)`` with ``L = 2^bits - 1`` (uint8 images / 255 give back their
    integer pixels), then ``y = (2 p - L) / 2^bits``.  Every ``y`` is a multiple of ``2^-bits``, so a
    layer that sums ``y * (+-1)`` over K inputs is exact in float32 in any order while
    ``K * 2^bits < 2^24`` (K = 784 at 8 bits: 200,704): the packed model reproduces such a binary
    first layer bit for bit from the integer codes (``lowbit.convert``: bit planes).  Compared with
    ``Rescale(2, -1)`` the values differ by the factor 255/256 (absorbed by the BatchNorm that follows)
    and by the rounding to ``bits`` bits, which 8-bit images do not have.  The gradient is the
    straight-through ``2 L / 2^bits`` inside [0, 1] (nothing trains before the first layer anyway).
    """

    def __init__(self, bits=8):
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 16:
            raise ValueError(f"bits must be an int in 1..16, got {bits!r}")
        self.bits = int(bits)

    def config(self):
        return {"bits": self.bits}

    @staticmethod
    def codes(x, bits):
        """The integer codes ``rint(clip(x, 0, 1) * (2^bits - 1))``, in ``x``'s float dtype (the packed
        model's bit-plane stage takes its codes from here too, so both round alike)."""
        xp = get_array_module(x)
        t = x.dtype.type
        return xp.rint(xp.clip(x, t(0), t(1)) * t(2 ** bits - 1))

    @staticmethod
    def sums_exact(bits, fan_in):
        """True when any sum of ``fan_in`` outputs times +-1 is exact in float32 (multiples of
        ``2^-bits`` below ``fan_in``: ``(2^bits - 1) * fan_in < 2^24``)."""
        return (2 ** bits - 1) * fan_in < 2 ** 24

    def forward(self, x, train=False):
        t = x.dtype.type
        self._inside = (x >= 0) & (x <= 1)
        return (self.codes(x, self.bits) * t(2) - t(2 ** self.bits - 1)) * t(2.0 ** -self.bits)

    def backward(self, dout):
        slope = dout.dtype.type(2 * (2 ** self.bits - 1) * 2.0 ** -self.bits)
        return dout * slope * self._inside
