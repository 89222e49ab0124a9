"""Max, average and global average pooling."""
from __future__ import annotations

from ..backend import get_array_module
from ..functions import conv_output_size, pool_backward, pool_forward
from .base import Layer, check_input, check_nonnegative_int, check_positive_int, register_layer


class _Pool2D(Layer):
    mode = "max"

    def __init__(self, kernel_size=2, stride=None, padding=0):
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        self.stride = self.kernel_size if stride is None else check_positive_int("stride", stride)
        self.padding = check_nonnegative_int("padding", padding)
        self._cache_arg = None
        self._cache_shape = None

    def config(self):
        return {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding}

    def forward(self, x, train=False):
        check_input(self, x, 4, "(N, C, H, W)")
        k = self.kernel_size
        out, arg = pool_forward(x, k, k, self.stride, self.padding, self.mode)
        self._cache_arg = arg
        self._cache_shape = x.shape
        return out

    def backward(self, dout):
        k = self.kernel_size
        return pool_backward(dout, self._cache_arg, self._cache_shape, k, k, self.stride,
                             self.padding, self.mode)

    def output_shape(self, input_shape):
        n, c, h, w = input_shape
        k = self.kernel_size
        return (n, c, conv_output_size(h, k, self.stride, self.padding),
                conv_output_size(w, k, self.stride, self.padding))


@register_layer
class MaxPool2D(_Pool2D):
    """Max pooling; padding counts as -inf; on ties the first position in the window gets the gradient.

    ``padding`` must be smaller than ``kernel_size`` (as the packed kernels require): otherwise a
    window can hold padding only, and its maximum is -inf.
    """

    mode = "max"

    def __init__(self, kernel_size=2, stride=None, padding=0):
        super().__init__(kernel_size, stride, padding)
        if self.padding >= self.kernel_size:
            raise ValueError(f"MaxPool2D padding must be smaller than kernel_size {self.kernel_size} (a window "
                             f"of padding only has the maximum -inf), got padding {self.padding}")


@register_layer
class AvgPool2D(_Pool2D):
    """Average pooling; padded positions count as zeros (divisor KH*KW)."""

    mode = "avg"


@register_layer
class GlobalAvgPool2D(Layer):
    """Mean over H and W: (N, C, H, W) -> (N, C)."""

    def forward(self, x, train=False):
        check_input(self, x, 4, "(N, C, H, W)")
        self._cache_shape = x.shape
        return x.mean(axis=(2, 3))

    def backward(self, dout):
        xp = get_array_module(dout)
        n, c, h, w = self._cache_shape
        return xp.broadcast_to((dout / (h * w))[:, :, None, None], self._cache_shape).copy()

    def output_shape(self, input_shape):
        return tuple(input_shape[:2])
