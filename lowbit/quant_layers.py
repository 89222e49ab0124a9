"""Quantized layers: float layers whose product uses quantized weights and inputs (Larq's design).

:class:`QuantAffine` and :class:`QuantConv2D` are :class:`~lowbit.layers.Affine` and
:class:`~lowbit.layers.Conv2D` plus three things: ``input_quantizer``, ``kernel_quantizer`` and
``kernel_constraint``.  The optimizer updates the float *latent* weights ``W``; the forward pass
multiplies ``input_quantizer(x)`` by ``kernel_quantizer(W)``; the backward pass computes the float
layer's gradients with respect to those quantized arrays and maps them back through the quantizers'
pseudo-gradients (:mod:`lowbit.quantizers`):

* ``dW = kernel_quantizer.backward(W, dW_q)`` at the latent ``W``;
* ``dx = input_quantizer.backward(x, dx_q)`` at the cached input ``x``;
* ``db`` as in the float layer (biases are never quantized).

This is done by overriding the four hooks of the float layers (``effective_weight``,
``effective_input``, ``weight_grad``, ``input_grad``); the product itself is the float layer's code.
Three more, ``product_grad``, ``input_product`` and ``weight_product``, are where
:func:`lowbit.bf16.bf16_backward` rounds ``dy`` and runs the products in bfloat16.

Cached quantized weight
    ``forward`` quantizes ``W`` once and keeps it; ``backward`` (and ``effective_weight()`` until the
    next update) uses that same array, so a stochastic draw is the same in both passes.  ``constrain()``
    (called by the optimizer after each step) drops it.  After changing ``W`` by hand, call
    ``constrain()`` or ``forward`` before reading ``effective_weight()``; ``quantized_kernel()`` always
    recomputes.

Random generators
    A layer with a stochastic quantizer (one that has an ``rng`` attribute, e.g.
    :class:`~lowbit.quantizers.StochasticBinary`) has an ``rng`` property that reads and sets that
    quantizer's generator (both quantizers share one generator when both are stochastic).  Layers without
    one raise ``AttributeError``, so ``hasattr(layer, "rng")`` is False.  That is all
    :meth:`lowbit.Model.seed` and ``Model.rng_states`` look for: seeding and checkpoints work without
    knowing about quantizers.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import get_array_module
from .bf16 import bf16_backward_enabled, bf16_exact_operand, bf16_product, round_bfloat16
from .layers import Affine, Conv2D, Layer, register_layer
from .quantizers import Identity, SteSign, StochasticBinary, get_quantizer

__all__ = ["QuantAffine", "QuantConv2D", "QuantActivation", "KERNEL_CONSTRAINTS", "glorot_lr_factor"]

KERNEL_CONSTRAINTS = (None, "clip")


def glorot_lr_factor(fan_in, fan_out):
    """BinaryNet's per-layer learning-rate scale ``1 / sqrt(1.5 / (fan_in + fan_out))``.

    (``W_LR_scale = "Glorot"`` in Courbariaux's ``binary_net.py``; for a convolution
    ``fan_in = C*KH*KW`` and ``fan_out = O*KH*KW``.)
    """
    return 1.0 / math.sqrt(1.5 / (fan_in + fan_out))


def _plus_minus_one(quantizer):
    """True when every output of ``quantizer`` is +1 or -1."""
    if type(quantizer) is SteSign:
        return quantizer.scale is None
    return type(quantizer) is StochasticBinary


class _StochasticRNG:
    """Mixin: the ``rng`` of the layer is the generator of its stochastic quantizer(s)."""

    def _quantizers(self):  # pragma: no cover - abstract
        return []

    def _stochastic_quantizers(self):
        return [q for q in self._quantizers() if getattr(q, "rng", None) is not None]

    @property
    def rng(self):
        stochastic = self._stochastic_quantizers()
        if not stochastic:
            raise AttributeError(f"{type(self).__name__} has no stochastic quantizer, hence no rng")
        return stochastic[0].rng

    @rng.setter
    def rng(self, generator):
        stochastic = self._stochastic_quantizers()
        if not stochastic:
            raise AttributeError(f"{type(self).__name__} has no stochastic quantizer, hence no rng")
        if not isinstance(generator, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(generator).__name__}")
        for q in stochastic:
            q.rng = generator


class _QuantKernel(_StochasticRNG):
    """The part QuantAffine and QuantConv2D share; ``kernel_channel_axis`` is the output-unit axis."""

    kernel_channel_axis = 0

    def _init_quantization(self, input_quantizer, kernel_quantizer, kernel_constraint,
                           glorot_lr_scale, fan_in, fan_out):
        self.input_quantizer = get_quantizer(input_quantizer)
        self.kernel_quantizer = get_quantizer(kernel_quantizer)
        if kernel_constraint not in KERNEL_CONSTRAINTS:
            raise ValueError(
                f"kernel_constraint must be one of {list(KERNEL_CONSTRAINTS)}, got {kernel_constraint!r}"
            )
        self.kernel_constraint = kernel_constraint
        self.glorot_lr_scale = bool(glorot_lr_scale)
        if self.glorot_lr_scale:
            # read by lowbit.optimizers.Optimizer.step
            self.lr_multipliers = {"W": glorot_lr_factor(fan_in, fan_out)}
        stochastic = self._stochastic_quantizers()
        if len(stochastic) > 1:
            self.rng = stochastic[0].rng  # one generator per layer: one state in checkpoints
        self._cache_weight = None
        self._cache_input = None
        self._bf16_products = False  # set by product_grad for the products of one backward
        self.bounds_applied = set()

    def _quantizers(self):
        return [self.input_quantizer, self.kernel_quantizer]

    @property
    def param_bounds(self):
        """``{"W": (-1, 1)}`` under the clip constraint.  Read by
        :meth:`lowbit.optimizers.Optimizer.step`: an optimizer that clips in its update pass adds
        "W" to ``bounds_applied``, and :meth:`constrain` then skips its own clip once."""
        return {"W": (-1.0, 1.0)} if self.kernel_constraint == "clip" else {}

    def _quant_config(self):
        return {"input_quantizer": self.input_quantizer.config(),
                "kernel_quantizer": self.kernel_quantizer.config(),
                "kernel_constraint": self.kernel_constraint,
                "glorot_lr_scale": self.glorot_lr_scale}

    # -- the quantization --------------------------------------------------------------------------
    def quantized_kernel(self, train=False):
        """``kernel_quantizer(W)`` computed now (a fresh draw for a stochastic quantizer)."""
        return self.kernel_quantizer(self.W, train, channel_axis=self.kernel_channel_axis)

    def forward(self, x, train=False):
        self._cache_weight = self.quantized_kernel(train)
        return super().forward(x, train)

    # -- the hooks of Affine / Conv2D ---------------------------------------------------------------
    def effective_weight(self):
        if self._cache_weight is None:
            self._cache_weight = self.quantized_kernel(train=False)
        return self._cache_weight

    def effective_input(self, x, train):
        self._cache_input = x
        return self.input_quantizer(x, train)

    def binary_operands(self):
        """Both quantizers give only +-1 (an unscaled ``SteSign`` or a ``StochasticBinary``): the
        float layer's product then runs on the XNOR-popcount kernels, bit for bit the same."""
        return _plus_minus_one(self.input_quantizer) and _plus_minus_one(self.kernel_quantizer)

    def binary_weight_float_input(self):
        """+-1 weights (as :meth:`binary_operands`) and no input quantizer: an input of dropout's form
        {0, +-c} (a BNN's hidden layer after Dropout) then runs on the masked XNOR-popcount product,
        bit for bit the float one (:func:`lowbit.bit_products.masked_binary_matmul`)."""
        return type(self.input_quantizer) is Identity and _plus_minus_one(self.kernel_quantizer)

    def product_grad(self, dout):
        """``dout`` as the backward products take it: rounded to bfloat16 inside
        :func:`lowbit.bf16.bf16_backward` when the weights are +-1 (float32 only), else as it is."""
        self._bf16_products = (bf16_backward_enabled() and dout.dtype == np.float32
                               and (self.binary_operands() or self.binary_weight_float_input()))
        return round_bfloat16(dout) if self._bf16_products else dout

    def input_product(self, dout, w):
        """``dout @ w.T``; inside :func:`lowbit.bf16.bf16_backward` (+-1 weights, ``dout`` rounded by
        :meth:`product_grad`) through :func:`lowbit.bf16.bf16_product`."""
        if self._bf16_products:
            return bf16_product(dout, w.T)
        return super().input_product(dout, w)

    def weight_product(self, x, dout):
        """``x.T @ dout``; inside :func:`lowbit.bf16.bf16_backward` through
        :func:`lowbit.bf16.bf16_product` when bfloat16 holds ``x`` (+-1 inputs, or checked: dropout's
        {0, +-2}), else on float32 with the rounded ``dout`` (a first layer's pixels)."""
        if self._bf16_products and (self.binary_operands() or bf16_exact_operand(x)):
            return bf16_product(x.T, dout)
        return super().weight_product(x, dout)

    def weight_grad(self, dW_eff):
        return self.kernel_quantizer.backward(self.W, dW_eff, channel_axis=self.kernel_channel_axis)

    def input_grad(self, dx_eff):
        return self.input_quantizer.backward(self._cache_input, dx_eff)

    def constrain(self):
        """Clip the latent weights to [-1, 1] (``kernel_constraint="clip"``); drop the cached kernel."""
        if self.kernel_constraint == "clip" and "W" not in self.bounds_applied:
            xp = get_array_module(self.W)
            xp.clip(self.W, -1, 1, out=self.W)
        self.bounds_applied.clear()
        self._cache_weight = None


@register_layer
class QuantAffine(_QuantKernel, Affine):
    """:class:`~lowbit.layers.Affine` with quantized input and weights: ``y = iq(x) @ kq(W) + b``.

    Parameters
    ----------
    in_features, out_features, bias, init, seed
        As for :class:`~lowbit.layers.Affine`.  Binary layers use ``bias=False`` before a BatchNorm.
    input_quantizer, kernel_quantizer : None, str, dict or Quantizer
        Resolved by :func:`lowbit.quantizers.get_quantizer`; None means no quantization.  The kernel
        quantizer gets ``channel_axis=1`` (W is ``(in_features, out_features)``).
    kernel_constraint : None or "clip"
        "clip": latent weights are clipped to [-1, 1] after every update (BNN).
    glorot_lr_scale : bool
        Set ``lr_multipliers = {"W": 1 / sqrt(1.5 / (in_features + out_features))}`` (BinaryNet).

    Shapes: x (N, in_features) float32 (or (N, ...) flattened) -> y (N, out_features) float32.
    """

    kernel_channel_axis = 1

    def __init__(self, in_features, out_features, bias=True, init="he", seed=None,
                 input_quantizer=None, kernel_quantizer=None, kernel_constraint=None,
                 glorot_lr_scale=False):
        super().__init__(in_features, out_features, bias=bias, init=init, seed=seed)
        self._init_quantization(input_quantizer, kernel_quantizer, kernel_constraint,
                                glorot_lr_scale, self.in_features, self.out_features)

    def config(self):
        return {**super().config(), **self._quant_config()}


@register_layer
class QuantConv2D(_QuantKernel, Conv2D):
    """:class:`~lowbit.layers.Conv2D` with quantized input and weights: ``y = conv(iq(x), kq(W)) + b``.

    Parameters as :class:`QuantAffine` plus those of :class:`~lowbit.layers.Conv2D`.  The kernel
    quantizer gets ``channel_axis=0`` (W is ``(O, C, KH, KW)``).  Zero padding is applied after the input
    quantizer, so padded positions are 0 (neither +1 nor -1), the padding rule of
    :mod:`lowbit.kernels`.  The Glorot factor uses ``fan_in = C*KH*KW``, ``fan_out = O*KH*KW``.

    Shapes: x (N, C, H, W) float32 -> y (N, O, OH, OW) float32.
    """

    kernel_channel_axis = 0

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=0, bias=True,
                 init="he", seed=None, input_quantizer=None, kernel_quantizer=None,
                 kernel_constraint=None, glorot_lr_scale=False):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         bias=bias, init=init, seed=seed)
        k2 = self.kernel_size * self.kernel_size
        self._init_quantization(input_quantizer, kernel_quantizer, kernel_constraint,
                                glorot_lr_scale, self.in_channels * k2, self.out_channels * k2)

    def config(self):
        return {**super().config(), **self._quant_config()}


@register_layer
class QuantActivation(_StochasticRNG, Layer):
    """An activation quantizer as a layer: ``y = quantizer(x)``, ``dx = quantizer.backward(x, dout)``.

    ``QuantActivation("ste_sign")`` after a BatchNorm is the BNN hidden activation (sign forward, hard
    tanh STE backward).  Any shape; the output has the shape and dtype of ``x``.
    """

    def __init__(self, quantizer="ste_sign"):
        self.quantizer = get_quantizer(quantizer)
        self._cache_x = None

    def _quantizers(self):
        return [self.quantizer]

    @property
    def precision(self):
        return self.quantizer.precision

    def config(self):
        return {"quantizer": self.quantizer.config()}

    def forward(self, x, train=False):
        self._cache_x = x
        return self.quantizer(x, train)

    def backward(self, dout):
        return self.quantizer.backward(self._cache_x, dout)

