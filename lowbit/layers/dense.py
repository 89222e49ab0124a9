"""Layers with weights: ``Affine`` (dense) and ``Conv2D``."""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..bit_products import binary_conv2d_pm1, binary_matmul_pm1, binary_product_available, masked_binary_matmul
from ..functions import (
    col2im, conv2d_direct, conv2d_direct_backward, conv2d_few_channels, conv_output_size, direct_conv_available,
    direct_conv_cache, few_channel_conv_available, im2col,
    im2col_layout, matmul,
)
from ..initializers import initialize
from .base import Layer, check_input, check_nonnegative_int, check_positive_int, register_layer


@register_layer
class Affine(Layer):
    """Dense layer ``y = x @ W + b``.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool
    init : str
        Name in :data:`lowbit.initializers.INITIALIZERS` ('he', 'glorot', 'uniform', ...).
    seed : int or None
        Seed of the initialiser (ignored when arrays are loaded from a file).

    Shapes: x (N, in_features) float32 -> y (N, out_features); W (in_features, out_features), b (out,).
    Inputs with more than two axes are flattened to (N, -1) (the book's Affine does the same).
    """

    param_names = ("W", "b")

    def __init__(self, in_features, out_features, bias=True, init="he", seed=None):
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.bias = bool(bias)
        self.init = init
        rng = np.random.default_rng(seed)
        self.W = initialize(init, (self.in_features, self.out_features), self.in_features,
                            self.out_features, rng)
        if self.bias:
            self.b = np.zeros(self.out_features, dtype=np.float32)
        else:
            self.param_names = ("W",)
        self.dW = self.db = None
        self._cache_x = None
        self._cache_shape = None

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias, "init": self.init}

    # Hooks that quantized twins override: the weight and input actually used by the product.
    def effective_weight(self):
        return self.W

    def effective_input(self, x, train):
        return x

    def weight_grad(self, dW_eff):
        return dW_eff

    def input_grad(self, dx_eff):
        return dx_eff

    def product_grad(self, dout):
        """The output gradient as the backward products take it (binary twins may round it)."""
        return dout

    def input_product(self, dout, w):
        """``dout @ w.T``, the input gradient's product (binary twins may run it in bfloat16)."""
        return matmul(dout, w.T)

    def weight_product(self, x, dout):
        """``x.T @ dout``, the weight gradient's product (binary twins may run it in bfloat16)."""
        return matmul(x.T, dout)

    def binary_operands(self):
        """True when the effective input and weight hold only +-1 (binary twins override it): the
        product may then run on the bit kernels, with the same result."""
        return False

    def binary_weight_float_input(self):
        """True when the effective weight holds only +-1 and the input is taken as it comes (binary
        twins override it): an input of dropout's form {0, +-c} then runs on the bit kernels."""
        return False

    def forward(self, x, train=False):
        if x.ndim < 2:
            raise ValueError(f"Affine expects (N, {self.in_features}), got an input of shape {x.shape}")
        self._cache_shape = x.shape
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"Affine expects {self.in_features} input features, got {x.shape[1]} "
                f"(input shape {self._cache_shape})"
            )
        xq = self.effective_input(x, train)
        self._cache_x = xq
        w = self.effective_weight()
        out = None
        if self.binary_operands() and binary_product_available(xq, w):
            out = binary_matmul_pm1(xq, w)
        elif self.binary_weight_float_input() and binary_product_available(xq, w):
            out = masked_binary_matmul(xq, w)  # None unless xq is {0, +-c}
        if out is None:
            out = matmul(xq, w)
        if self.bias:
            out = out + self.b
        return out

    def backward(self, dout):
        dout = self.product_grad(dout)
        self._param_grads(dout)
        dx = self.input_grad(self.input_product(dout, self.effective_weight()))
        return dx.reshape(self._cache_shape)

    def backward_params(self, dout):
        self._param_grads(self.product_grad(dout))

    def _param_grads(self, dout):
        self.dW = self.weight_grad(self.weight_product(self._cache_x, dout))
        if self.bias:
            self.db = dout.sum(axis=0)

    def output_shape(self, input_shape):
        return (input_shape[0], self.out_features)


@register_layer
class Conv2D(Layer):
    """2-D convolution (cross-correlation) with zero padding, through im2col and one GEMM.

    Shapes: x (N, C, H, W) -> y (N, O, OH, OW); W (O, C, KH, KW); b (O,).
    ``OH = (H + 2*padding - KH) // stride + 1``.
    """

    param_names = ("W", "b")

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=0, bias=True,
                 init="he", seed=None):
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        self.stride = check_positive_int("stride", stride)
        self.padding = check_nonnegative_int("padding", padding)
        self.bias = bool(bias)
        self.init = init
        k = self.kernel_size
        fan_in = self.in_channels * k * k
        fan_out = self.out_channels * k * k
        rng = np.random.default_rng(seed)
        self.W = initialize(init, (self.out_channels, self.in_channels, k, k), fan_in, fan_out, rng)
        if self.bias:
            self.b = np.zeros(self.out_channels, dtype=np.float32)
        else:
            self.param_names = ("W",)
        self.dW = self.db = None
        self._cache_col = None
        self._cache_direct = None
        self._cache_shape = None

    def config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "bias": self.bias, "init": self.init}

    effective_weight = Affine.effective_weight
    effective_input = Affine.effective_input
    weight_grad = Affine.weight_grad
    input_grad = Affine.input_grad
    product_grad = Affine.product_grad
    binary_operands = Affine.binary_operands

    def forward(self, x, train=False):
        check_input(self, x, 4, f"(N, {self.in_channels}, H, W)")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"Conv2D expects {self.in_channels} input channels, got {x.shape[1]} (shape {x.shape})"
            )
        xq = self.effective_input(x, train)
        w = self.effective_weight()
        self._cache_shape = x.shape
        if self.binary_operands() and binary_product_available(xq, w):
            # +-1 operands: the bit kernel, exact; the patches are built in backward, if it runs
            out = binary_conv2d_pm1(xq, w, self.stride, self.padding, channels_last=train)
            if self.bias:
                out += self.b[:, None, None]
            self._cache_col = self._cache_direct = None
            self._cache_binary_input = xq
            return out
        self._cache_direct = None
        if not train and few_channel_conv_available(xq, w, self.padding):
            # few input channels (a first layer): vectorised over pixels, in the im2col path's layout; a
            # backward, should one follow, builds its cache from the input as after the bit kernel
            self._cache_col, self._cache_binary_input = None, xq
            return conv2d_few_channels(xq, w, self.b if self.bias else None, self.stride, self.padding)
        if direct_conv_available(xq, w, self.padding, train):  # float32 without im2col (lowbit.functions)
            self._cache_col = None
            out, self._cache_direct = conv2d_direct(xq, w, self.b if self.bias else None, self.stride,
                                                    self.padding)
            # in inference, the im2col path's memory layout: packed models mirror it, and reductions
            # downstream (GlobalAvgPool2D's mean) then sum in the same order
            return out if train else im2col_layout(out)
        if xq.dtype == np.float16 and get_array_module(xq) is np:
            # float16 on numpy: matmul multiplies in float32 anyway, so build (and cache) the 9x larger
            # patch buffer in float32 from the exact float16 values, cast once here instead of in
            # both matmuls that read it.
            xq = xq.astype(np.float32)
        k = self.kernel_size
        col = im2col(xq, k, k, self.stride, self.padding)  # (C, K, K, N, OH, OW)
        n, oh, ow = col.shape[3:]
        col2d = col.reshape(-1, n * oh * ow)
        w2d = w.reshape(self.out_channels, -1)
        out = matmul(w2d, col2d)  # (O, N*OH*OW)
        if self.bias:
            out += self.b[:, None]
        self._cache_col = col2d
        return out.reshape(self.out_channels, n, oh, ow).transpose(1, 0, 2, 3)

    def backward(self, dout):
        return self._backward(self.product_grad(dout), True)

    def backward_params(self, dout):
        self._backward(self.product_grad(dout), False)

    def _backward(self, dout, input_grad):
        """``dW`` (and ``db``) from ``dout``; returns the input gradient, or None without
        ``input_grad``."""
        if self._cache_col is None and self._cache_direct is None and direct_conv_available(
                self._cache_binary_input, self.effective_weight(), self.padding):
            self._cache_direct = direct_conv_cache(self._cache_binary_input, self.padding, self.stride)
            self._cache_binary_input = None
        if self._cache_direct is not None:  # the direct kernels, also after a forward on the bit kernel
            dx, dw, db = conv2d_direct_backward(dout, self._cache_direct, self.effective_weight(), self.stride,
                                                self.padding, input_grad)
            self.dW = self.weight_grad(dw)
            if self.bias:
                self.db = db
            return self.input_grad(dx.astype(dout.dtype, copy=False)) if input_grad else None
        xp = get_array_module(dout)
        n, o, oh, ow = dout.shape
        d2d = xp.ascontiguousarray(dout.transpose(1, 0, 2, 3)).reshape(o, -1)
        k = self.kernel_size
        c = self.in_channels
        if self._cache_col is None:  # the forward ran on the bit kernel
            self._cache_col = im2col(self._cache_binary_input, k, k, self.stride, self.padding).reshape(
                c * k * k, -1)
            self._cache_binary_input = None
        # (col @ d2d.T).T, not d2d @ col.T: OpenBLAS runs the former several times faster for these
        # short-and-wide shapes (O x N*OH*OW times N*OH*OW x C*K*K).
        self.dW = self.weight_grad(matmul(self._cache_col, d2d.T).T.reshape(o, c, k, k))
        if self.bias:
            self.db = d2d.sum(axis=1)
        if not input_grad:
            return None
        w2d = self.effective_weight().reshape(o, -1)
        # float16 on numpy: the patch gradients stay float32 until summed back into the image, and the
        # sum is rounded once (a GPU's backward-data convolution also accumulates in float32).
        dcol = matmul(w2d.T, d2d, keep_float32=True).reshape(c, k, k, n, oh, ow)
        dx = col2im(dcol, self._cache_shape, self.stride, self.padding)
        if dx.dtype != dout.dtype:
            with np.errstate(over="ignore"):
                dx = dx.astype(dout.dtype)
        return self.input_grad(dx)

    def output_shape(self, input_shape):
        n, _, h, w = input_shape
        k = self.kernel_size
        return (n, self.out_channels, conv_output_size(h, k, self.stride, self.padding),
                conv_output_size(w, k, self.stride, self.padding))
