"""Layers: objects that own parameters and call the stateless ops in :mod:`lowbit.functions`.

The layer protocol
------------------
``forward(x, train=False)``
    Returns the output and keeps only what ``backward`` needs.
``backward(dout)``
    Returns ``dx``; never writes into ``dout``.  Parameter gradients are stored on the layer as
    ``d<name>`` for every name in ``param_names`` (``dW``, ``db``, ``dgamma``, ...).
``param_names`` / ``buffer_names``
    Attribute names of the trainable arrays and of the saved non-trainable arrays (BatchNorm's running
    statistics).  Both travel with the model file; only parameters are updated by optimizers.
``config()``
    The JSON-serialisable constructor arguments; ``Layer.from_config`` rebuilds the layer.  Layer types
    are looked up by name in the explicit ``LAYERS`` dictionary (no pickle, no eval).
``children()``
    ``(name, layer)`` pairs of nested layers (``Sequential``, ``Residual``, ``Concat``); empty for leaves.
``constrain()``
    Called by the trainer after each optimizer step; quantized layers clip latent weights here.

Arrays are float32, images NCHW.  All bodies are written against ``xp = get_array_module(x)``, so a
model moved to CuPy with :meth:`Layer.to_device` runs unchanged on the GPU.
"""
from __future__ import annotations

import numpy as np

from .backend import get_array_module, to_device
from .draws import check_draws, uniform
from .functions import (
    batchnorm_axes,
    batchnorm_backward,
    batchnorm_forward,
    binary_conv2d_pm1,
    binary_matmul_pm1,
    binary_product_available,
    col2im,
    conv2d_direct,
    conv2d_direct_backward,
    conv_output_size,
    direct_conv_available,
    direct_conv_cache,
    im2col,
    im2col_layout,
    matmul,
    pool_backward,
    pool_forward,
    relu,
    relu_backward,
)
from .initializers import initialize

__all__ = [
    "LAYERS",
    "register_layer",
    "layer_from_config",
    "Layer",
    "Affine",
    "Conv2D",
    "MaxPool2D",
    "AvgPool2D",
    "GlobalAvgPool2D",
    "ReLU",
    "PixelCodes",
    "BatchNorm",
    "Dropout",
    "Flatten",
    "Rescale",
    "Sequential",
    "Residual",
    "Concat",
]

LAYERS: dict[str, type] = {}


def register_layer(cls):
    """Class decorator: make ``cls`` loadable from a model manifest under its class name."""
    LAYERS[cls.__name__] = cls
    return cls


def layer_from_config(spec: dict):
    """Build a layer from ``{"type": name, "config": {...}, "children": [...]}`` (see ``Layer.spec``)."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"layer spec must be a dict with a 'type' key, got {spec!r}")
    name = spec["type"]
    try:
        cls = LAYERS[name]
    except KeyError:
        raise ValueError(f"unknown layer type {name!r}; known types: {sorted(LAYERS)}") from None
    return cls.from_spec(spec)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_nonnegative_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _check_input(layer, x, ndim, what):
    if not hasattr(x, "ndim") or x.ndim != ndim:
        got = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{type(layer).__name__} expects {what}, got an input of shape {got}")


class Layer:
    """Base class; see the module docstring for the protocol."""

    param_names: tuple = ()
    buffer_names: tuple = ()

    # -- structure ---------------------------------------------------------------------------
    def config(self) -> dict:
        return {}

    def children(self) -> list:
        return []

    def spec(self) -> dict:
        out = {"type": type(self).__name__, "config": self.config()}
        kids = self.children()
        if kids:
            out["children"] = [[name, child.spec()] for name, child in kids]
        return out

    @classmethod
    def from_spec(cls, spec):
        return cls(**spec.get("config", {}))

    def named_layers(self, prefix=""):
        """Yield ``(path, layer)`` for this layer and every nested one, depth first."""
        yield prefix, self
        for name, child in self.children():
            yield from child.named_layers(f"{prefix}.{name}" if prefix else name)

    def named_arrays(self, buffers=True):
        """Yield ``(path, layer, attribute)`` of every parameter (and buffer) in this subtree."""
        for path, layer in self.named_layers():
            names = layer.param_names + (layer.buffer_names if buffers else ())
            for attr in names:
                yield (f"{path}.{attr}" if path else attr), layer, attr

    # -- training hooks ------------------------------------------------------------------------
    def constrain(self):
        """Project parameters back onto their constraint set after an update (default: none)."""

    def zero_grads(self):
        for _, layer in self.named_layers():
            for attr in layer.param_names:
                setattr(layer, "d" + attr, None)

    def to_device(self, device: str):
        """Move every parameter, buffer and gradient of this subtree to 'cpu' or 'gpu' (in place)."""
        for _, layer in self.named_layers():
            for attr in layer.param_names + layer.buffer_names:
                setattr(layer, attr, to_device(getattr(layer, attr), device))
            for attr in layer.param_names:
                g = getattr(layer, "d" + attr, None)
                if g is not None:
                    setattr(layer, "d" + attr, to_device(g, device))
            layer._clear_cache()
        return self

    def _clear_cache(self):
        """Drop arrays kept from the last forward pass (they may live on the old device)."""
        for attr in list(vars(self)):
            if attr.startswith("_cache"):
                setattr(self, attr, None)

    def output_shape(self, input_shape):
        """Shape of the output for an input of ``input_shape`` (batch axis included)."""
        return tuple(input_shape)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


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
        self.in_features = _check_positive_int("in_features", in_features)
        self.out_features = _check_positive_int("out_features", out_features)
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

    def binary_operands(self):
        """True when the effective input and weight hold only +-1 (binary twins override it): the
        product may then run on the bit kernels, with the same result."""
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
        if self.binary_operands() and binary_product_available(xq, w):
            out = binary_matmul_pm1(xq, w)
        else:
            out = matmul(xq, w)
        if self.bias:
            out = out + self.b
        return out

    def backward(self, dout):
        self.dW = self.weight_grad(matmul(self._cache_x.T, dout))
        if self.bias:
            self.db = dout.sum(axis=0)
        dx = self.input_grad(matmul(dout, self.effective_weight().T))
        return dx.reshape(self._cache_shape)

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
        self.in_channels = _check_positive_int("in_channels", in_channels)
        self.out_channels = _check_positive_int("out_channels", out_channels)
        self.kernel_size = _check_positive_int("kernel_size", kernel_size)
        self.stride = _check_positive_int("stride", stride)
        self.padding = _check_nonnegative_int("padding", padding)
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
    binary_operands = Affine.binary_operands

    def forward(self, x, train=False):
        _check_input(self, x, 4, f"(N, {self.in_channels}, H, W)")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"Conv2D expects {self.in_channels} input channels, got {x.shape[1]} (shape {x.shape})"
            )
        xq = self.effective_input(x, train)
        w = self.effective_weight()
        self._cache_shape = x.shape
        if self.binary_operands() and binary_product_available(xq, w):
            # +-1 operands: the bit kernel, exact; the patches are built in backward, if it runs
            out = binary_conv2d_pm1(xq, w, self.stride, self.padding)
            if self.bias:
                out += self.b[:, None, None]
            self._cache_col = self._cache_direct = None
            self._cache_binary_input = xq
            return out
        self._cache_direct = None
        if direct_conv_available(xq, w, self.padding):  # float32 without im2col (lowbit.functions)
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
        if self._cache_col is None and self._cache_direct is None and direct_conv_available(
                self._cache_binary_input, self.effective_weight(), self.padding):
            self._cache_direct = direct_conv_cache(self._cache_binary_input, self.padding, self.stride)
            self._cache_binary_input = None
        if self._cache_direct is not None:  # the direct kernels, also after a forward on the bit kernel
            dx, dw, db = conv2d_direct_backward(dout, self._cache_direct, self.effective_weight(), self.stride,
                                                self.padding)
            self.dW = self.weight_grad(dw)
            if self.bias:
                self.db = db
            return self.input_grad(dx.astype(dout.dtype, copy=False))
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


class _Pool2D(Layer):
    mode = "max"

    def __init__(self, kernel_size=2, stride=None, padding=0):
        self.kernel_size = _check_positive_int("kernel_size", kernel_size)
        self.stride = self.kernel_size if stride is None else _check_positive_int("stride", stride)
        self.padding = _check_nonnegative_int("padding", padding)
        self._cache_arg = None
        self._cache_shape = None

    def config(self):
        return {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding}

    def forward(self, x, train=False):
        _check_input(self, x, 4, "(N, C, H, W)")
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
        _check_input(self, x, 4, "(N, C, H, W)")
        self._cache_shape = x.shape
        return x.mean(axis=(2, 3))

    def backward(self, dout):
        xp = get_array_module(dout)
        n, c, h, w = self._cache_shape
        return xp.broadcast_to((dout / (h * w))[:, :, None, None], self._cache_shape).copy()

    def output_shape(self, input_shape):
        return tuple(input_shape[:2])


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


@register_layer
class BatchNorm(Layer):
    """Batch normalisation over the batch axis (dense input (N, D)) or batch and space (N, C, H, W).

    Training mode normalises with the batch statistics and updates the running ones:
    ``running = momentum * running + (1 - momentum) * batch`` (the variance is the biased batch
    variance, as in Deep Learning from Scratch).  Evaluation mode uses the running statistics.
    ``y = gamma * (x - mean) / sqrt(var + eps) + beta``.
    """

    param_names = ("gamma", "beta")
    buffer_names = ("running_mean", "running_var")

    def __init__(self, num_features, momentum=0.9, eps=1e-5):
        self.num_features = _check_positive_int("num_features", num_features)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.gamma = np.ones(self.num_features, dtype=np.float32)
        self.beta = np.zeros(self.num_features, dtype=np.float32)
        self.running_mean = np.zeros(self.num_features, dtype=np.float32)
        self.running_var = np.ones(self.num_features, dtype=np.float32)
        self.dgamma = self.dbeta = None

    def config(self):
        return {"num_features": self.num_features, "momentum": self.momentum, "eps": self.eps}

    def forward(self, x, train=False):
        axes, bshape = batchnorm_axes(x)
        out_dtype = x.dtype
        if x.dtype == np.float16:  # statistics and normalisation in float32 (mixed precision)
            x = x.astype(np.float32)
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"BatchNorm expects {self.num_features} features on axis 1, got shape {x.shape}"
            )
        if train:
            out, xn, mean, var, inv_std = batchnorm_forward(x, self.gamma, self.beta, self.eps)
            m = self.momentum
            self.running_mean = (m * self.running_mean + (1 - m) * mean).astype(np.float32)
            self.running_var = (m * self.running_var + (1 - m) * var).astype(np.float32)
        else:
            xp = get_array_module(x)
            xc = x - self.running_mean.reshape(bshape)
            inv_std = (1.0 / xp.sqrt(self.running_var + np.float32(self.eps))).astype(x.dtype, copy=False)
            xn = xc * inv_std.reshape(bshape)
            out = self.gamma.reshape(bshape) * xn + self.beta.reshape(bshape)
        self._cache = (xn, inv_std, axes, bshape, train)
        return out.astype(out_dtype, copy=False)

    def backward(self, dout):
        xn, inv_std, axes, bshape, train = self._cache
        out_dtype = dout.dtype
        dout = dout.astype(xn.dtype, copy=False)
        if train:
            dx, self.dgamma, self.dbeta = batchnorm_backward(dout, xn, self.gamma, inv_std)
            return dx.astype(out_dtype, copy=False)
        # running statistics are constants
        self.dbeta = dout.sum(axis=axes)
        self.dgamma = (dout * xn).sum(axis=axes)
        dxn = dout * self.gamma.reshape(bshape)
        return (dxn * inv_std.reshape(bshape)).astype(out_dtype, copy=False)

    def _clear_cache(self):
        self._cache = None


@register_layer
class Dropout(Layer):
    """Inverted dropout: in training, zero each unit with probability ``ratio`` and scale the rest by
    ``1 / (1 - ratio)``; identity at evaluation.

    The mask comes from the layer's own ``numpy.random.Generator`` (``self.rng``, seeded by ``seed`` or by
    :meth:`Sequential.seed`), so runs repeat exactly and checkpoints can save its state.  With
    ``draws="generator"`` (default) the mask is drawn on the host and copied to the device when the
    model runs on CuPy; with ``draws="counter"`` it is computed on the device from one 64-bit key per
    step (:mod:`lowbit.draws`), the same values on numpy and CuPy.
    """

    def __init__(self, ratio=0.5, seed=None, draws="generator"):
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
        self.ratio = float(ratio)
        self.rng = np.random.default_rng(seed)
        self.draws = check_draws(draws)
        self._cache_mask = None

    def config(self):
        cfg = {"ratio": self.ratio}
        if self.draws != "generator":  # files of the default stay byte-identical
            cfg["draws"] = self.draws
        return cfg

    def forward(self, x, train=False):
        if not train or self.ratio == 0.0:
            self._cache_mask = None
            return x
        xp = get_array_module(x)
        u = uniform(self.rng, self.draws, x.shape, np if self.draws == "generator" else xp)
        keep = u >= self.ratio
        mask = xp.asarray((keep * np.float32(1.0 / (1.0 - self.ratio))).astype(x.dtype, copy=False))
        self._cache_mask = mask
        return x * mask

    def backward(self, dout):
        if self._cache_mask is None:
            return dout
        return dout * self._cache_mask


class _Composite(Layer):
    def forward(self, x, train=False):  # pragma: no cover - abstract
        raise NotImplementedError

    def constrain(self):
        for _, child in self.children():
            child.constrain()


@register_layer
class Sequential(_Composite):
    """A chain of layers; also the model container (see :mod:`lowbit.model` for predict/evaluate)."""

    def __init__(self, layers=()):
        self.layers = list(layers)
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layers[{i}] must be a lowbit Layer, got {type(layer).__name__}")

    @classmethod
    def from_spec(cls, spec):
        return cls([layer_from_config(child) for _, child in spec.get("children", [])])

    def children(self):
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    def forward(self, x, train=False):
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def backward(self, dout):
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout

    def output_shape(self, input_shape):
        for layer in self.layers:
            input_shape = layer.output_shape(input_shape)
        return input_shape

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __repr__(self):
        inner = ",\n  ".join(repr(layer).replace("\n", "\n  ") for layer in self.layers)
        return f"{type(self).__name__}([\n  {inner}\n])"


def _as_sequential(block, name):
    if block is None:
        return None
    if isinstance(block, Sequential):
        return block
    if isinstance(block, Layer):
        return Sequential([block])
    if isinstance(block, (list, tuple)):
        return Sequential(block)
    raise TypeError(f"{name} must be a Layer or a list of layers, got {type(block).__name__}")


@register_layer
class Residual(_Composite):
    """Skip connection: ``y = body(x) + shortcut(x)``, with ``shortcut`` the identity when None.

    The backward pass returns ``body.backward(dout) + shortcut.backward(dout)``; with the identity
    shortcut the upstream gradient reaches the input unchanged (Deep Learning from Scratch, 8.1.5).
    Use a 1x1 convolution (projection) as the shortcut when the body changes the shape.
    """

    def __init__(self, body, shortcut=None):
        self.body = _as_sequential(body, "body")
        self.shortcut = _as_sequential(shortcut, "shortcut")

    @classmethod
    def from_spec(cls, spec):
        kids = dict((name, layer_from_config(child)) for name, child in spec.get("children", []))
        return cls(kids["body"], kids.get("shortcut"))

    def children(self):
        kids = [("body", self.body)]
        if self.shortcut is not None:
            kids.append(("shortcut", self.shortcut))
        return kids

    def forward(self, x, train=False):
        out = self.body.forward(x, train)
        skip = x if self.shortcut is None else self.shortcut.forward(x, train)
        if out.shape != skip.shape:
            raise ValueError(
                f"Residual body output {out.shape} and shortcut output {skip.shape} differ; "
                "give the block a projection shortcut"
            )
        return out + skip

    def backward(self, dout):
        dx = self.body.backward(dout)
        if self.shortcut is None:
            return dx + dout
        return dx + self.shortcut.backward(dout)

    def output_shape(self, input_shape):
        return self.body.output_shape(input_shape)


@register_layer
class Concat(_Composite):
    """Parallel branches on one input, concatenated along the channel axis (inception blocks)."""

    def __init__(self, branches):
        if not branches:
            raise ValueError("Concat needs at least one branch, got none")
        self.branches = [_as_sequential(b, f"branches[{i}]") for i, b in enumerate(branches)]

    @classmethod
    def from_spec(cls, spec):
        return cls([layer_from_config(child) for _, child in spec.get("children", [])])

    def children(self):
        return [(str(i), b) for i, b in enumerate(self.branches)]

    def forward(self, x, train=False):
        xp = get_array_module(x)
        outs = [b.forward(x, train) for b in self.branches]
        self._cache_sizes = [o.shape[1] for o in outs]
        return xp.concatenate(outs, axis=1)

    def backward(self, dout):
        dx = None
        start = 0
        for branch, size in zip(self.branches, self._cache_sizes):
            part = branch.backward(dout[:, start:start + size])
            dx = part if dx is None else dx + part
            start += size
        return dx

    def output_shape(self, input_shape):
        shapes = [b.output_shape(input_shape) for b in self.branches]
        return (shapes[0][0], sum(s[1] for s in shapes)) + tuple(shapes[0][2:])
