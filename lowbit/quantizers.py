"""Quantizers: the forward rounding and the pseudo-gradient of low-precision weights and activations.

A quantizer is a small callable object that acts on one array and owns no parameters (a stateless op in
the sense of :mod:`lowbit.functions`; the one exception, :class:`StochasticBinary`, owns a random
generator).  Quantized layers (:mod:`lowbit.quant_layers`) call them on their latent float weights and
on their inputs.

The quantizer protocol
----------------------
``precision``
    Bits per value after quantization (1 for signs, k for k-bit DoReFa, 16 for half, 32 for none).
``forward(x, train=False, channel_axis=None)`` (also ``quantizer(x, ...)``)
    The quantized array, same shape, module (numpy/CuPy) and float dtype as ``x``.
``backward(x, dout, channel_axis=None)``
    The pseudo-gradient: ``dL/dx`` at the input ``x`` given ``dout = dL/dq``.  It recomputes what it
    needs from ``x`` (the layers cache ``x``), so one quantizer may serve several layers.
``channel_axis``
    Layout hint from the layer: the axis of the output units of a weight tensor (``1`` for
    :class:`~lowbit.layers.Affine` weights ``(in, out)``, ``0`` for :class:`~lowbit.layers.Conv2D`
    weights ``(O, C, KH, KW)``).  Only per-channel scaling (``SteSign(scale="channel")``) uses it;
    the layers pass it, everything else ignores it.  Layers pass ``None`` for their inputs.
``config()``
    JSON-serialisable ``{"name": ..., **constructor arguments}``; :func:`get_quantizer` rebuilds it.
``packed_encoding()``
    A :class:`PackedEncoding`: what the quantizer's evaluation-mode output is (bits, signedness,
    levels, scale, whether it is exactly the sign, the identity, deterministic, stored as integer
    codes).  :func:`lowbit.convert.convert` and :mod:`lowbit.summary` ask this, never the class, so
    a new quantizer is one class here (and its :data:`QUANTIZERS` entry); see "Add a quantizer" in
    ``docs/architecture.md``.

Conventions
-----------
* ``sign(x) = +1`` where ``x >= 0`` and ``-1`` elsewhere, so ``sign(0) = sign(-0.0) = +1``: the bit
  convention of :mod:`lowbit.kernels` (bit 1 means +1).
* Straight-through estimator (STE, Hinton's lecture 15b, Bengio et al. 2013, used by BNN and DoReFa):
  the backward pass treats rounding as the identity, and a clip (hard tanh) passes the gradient only
  inside its range, endpoints included.
* Input checks: ``x`` must have a float dtype (``TypeError`` otherwise), and NaN raises ``ValueError``
  (it has no sign and no level).  The NaN check is one ``xp.isnan(x).any()`` reduction per call: cheap
  next to the matrix product that follows, though on CuPy it waits for the device.  Infinities are
  allowed (``sign(inf) = +1``, clipped by the k-bit quantizers, kept by :class:`Fp16`).
* Random draws (:class:`StochasticBinary`) come from a host ``numpy.random.Generator`` and are moved
  to the device with ``xp.asarray``, so numpy and CuPy runs draw the same values; with
  ``draws="counter"`` they are computed on the device from one key per call, again the same values on
  both (:mod:`lowbit.draws`).
"""
from __future__ import annotations

import math

import numpy as np

from .backend import get_array_module
from .draws import check_draws, uniform
from .functions import sign, ste_grad
from .quantizer_base import (  # noqa: F401  (the protocol's names are importable from here too)
    PackedEncoding, Quantizer, check_bits, check_float_array, hard_sigmoid, nonzero_scale, quantize_k,
    uniform_signed_codes,
)

__all__ = [
    "QUANTIZERS",
    "Quantizer",
    "Identity",
    "Fp16",
    "SteSign",
    "StochasticBinary",
    "DoReFaActivation",
    "DoReFaWeight",
    "UniformWeight",
    "get_quantizer",
    "quantizer_for_bits",
    "PackedEncoding",
    "check_float_array",
    "check_bits",
    "nonzero_scale",
    "uniform_signed_codes",
    "hard_sigmoid",
    "quantize_k",
]


class Identity(Quantizer):
    """No quantization (float32 stays float32).

    Forward ``q = x``; gradient ``dx = dout``.  ``precision = 32``.
    """

    name = "identity"
    precision = 32

    def packed_encoding(self):
        return PackedEncoding(32, passthrough=True)

    def forward(self, x, train=False, channel_axis=None):
        check_float_array(self, x)
        return x

    def backward(self, x, dout, channel_axis=None):
        return dout


class Fp16(Quantizer):
    """Round to IEEE 754 half precision and back (mixed precision, Micikevicius et al. 2018).

    Forward ``q = x.astype(float16).astype(x.dtype)``: exactly numpy's cast, round to nearest with ties
    to even, subnormals kept, values beyond 65519.99... overflow to ``+-inf`` (without numpy's overflow
    warning).  Gradient: identity, ``dx = dout``.  ``precision = 16``.
    """

    name = "fp16"
    precision = 16

    def packed_encoding(self):
        return PackedEncoding(16)

    def forward(self, x, train=False, channel_axis=None):
        check_float_array(self, x)
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(x.dtype)

    def backward(self, x, dout, channel_axis=None):
        return dout


class SteSign(Quantizer):
    """Deterministic binarization with the straight-through estimator (BNN: Courbariaux, Hubara et al.
    2016, arXiv 1602.02830; the scaled form is XNOR-Net, Rastegari et al. 2016, arXiv 1603.05279).

    Forward ``q = alpha * sign(x)``, ``sign(x) = +1 if x >= 0 else -1`` (so ``sign(0) = +1``), with
    ``alpha = 1`` (``scale=None``), ``alpha = mean(|x|)`` over the whole tensor (``scale="tensor"``) or
    ``alpha = mean(|x|)`` per output unit (``scale="channel"``: over every axis but ``channel_axis``,
    which the layer passes; per column of an Affine weight, per filter of a Conv2D weight).

    Gradient ``dx = dout * alpha * 1{|x| <= clip}`` (the STE of hard tanh); ``alpha`` is treated as a
    constant, as in Larq's ``MagnitudeAwareSign``.  ``precision = 1``.

    Parameters
    ----------
    clip : float > 0
        Gradient window; BNN uses 1, matching latent weights clipped to [-1, 1].
    scale : None, "tensor" or "channel"
    """

    name = "ste_sign"
    precision = 1
    _scales = (None, "tensor", "channel")

    def __init__(self, clip=1.0, scale=None):
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0 \
                or not math.isfinite(clip):
            raise ValueError(f"clip must be a positive finite number, got {clip!r}")
        if scale not in self._scales:
            raise ValueError(f"scale must be one of {list(self._scales)}, got {scale!r}")
        self.clip = float(clip)
        self.scale = scale

    def config(self):
        return {"name": self.name, "clip": self.clip, "scale": self.scale}

    def packed_encoding(self):
        return PackedEncoding(1, levels=2, scale=self.scale, sign=self.scale is None)

    def _alpha(self, x, channel_axis):
        """Scale factor broadcastable to ``x`` (None when unscaled)."""
        if self.scale is None:
            return None
        if self.scale == "tensor":
            return abs(x).mean(dtype=x.dtype)
        if channel_axis is None:
            raise ValueError(
                "SteSign(scale='channel') needs the channel_axis of a weight tensor; use it as a "
                "kernel_quantizer of QuantAffine/QuantConv2D (or scale='tensor' for activations)"
            )
        axis = channel_axis % x.ndim
        others = tuple(a for a in range(x.ndim) if a != axis)
        return abs(x).mean(axis=others, keepdims=True, dtype=x.dtype)

    def forward(self, x, train=False, channel_axis=None):
        q = sign(x, type(self).__name__)  # the NaN check and the signs in one pass
        alpha = self._alpha(x, channel_axis)
        return q if alpha is None else q * alpha

    def backward(self, x, dout, channel_axis=None):
        grad = ste_grad(x, dout, self.clip)
        alpha = self._alpha(x, channel_axis)
        return grad if alpha is None else grad * alpha


class StochasticBinary(Quantizer):
    """Stochastic binarization (BNN, arXiv 1602.02830, eq. 2; BinaryConnect, arXiv 1511.00363).

    Forward (training): ``q = +1`` with probability ``hard_sigmoid(x) = clip((x + 1) / 2, 0, 1)``,
    else ``-1``: ``q = +1 where u < hard_sigmoid(x)`` with ``u ~ U[0, 1)`` float32 drawn from
    ``self.rng`` on the host.  At evaluation (``train=False``) with ``deterministic_eval=True`` (the
    papers' test-time practice) it is the deterministic ``sign`` of :class:`SteSign`.

    Gradient ``dx = dout * 1{|x| <= clip}`` (straight-through, as :class:`SteSign`).
    ``precision = 1``.

    ``rng`` is a ``numpy.random.Generator`` the quantizer owns.  The layer that holds the quantizer
    exposes it as its own ``rng`` attribute, so :meth:`lowbit.Model.seed` reseeds it and
    ``Model.rng_states`` (training checkpoints) saves it.  ``seed`` is not part of ``config()``.
    ``draws="counter"`` computes ``u`` on the array's device from one 64-bit key per call instead of
    copying it from the host (:mod:`lowbit.draws`; for GPU training).
    """

    name = "stochastic_binary"
    precision = 1

    def __init__(self, clip=1.0, deterministic_eval=True, seed=None, draws="generator"):
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0 \
                or not math.isfinite(clip):
            raise ValueError(f"clip must be a positive finite number, got {clip!r}")
        self.clip = float(clip)
        self.deterministic_eval = bool(deterministic_eval)
        self.rng = np.random.default_rng(seed)
        self.draws = check_draws(draws)

    def config(self):
        cfg = {"name": self.name, "clip": self.clip, "deterministic_eval": self.deterministic_eval}
        if self.draws != "generator":  # files of the default stay byte-identical
            cfg["draws"] = self.draws
        return cfg

    def packed_encoding(self):
        # at evaluation: the deterministic sign, or a random draw (which no packed model reproduces)
        return PackedEncoding(1, levels=2, deterministic=self.deterministic_eval, sign=self.deterministic_eval)

    def forward(self, x, train=False, channel_axis=None):
        if not train and self.deterministic_eval:
            return sign(x, type(self).__name__)
        xp = check_float_array(self, x)
        u = uniform(self.rng, self.draws, x.shape, xp)
        q = (u < hard_sigmoid(x)).astype(x.dtype)
        q *= 2
        q -= 1
        return q

    def backward(self, x, dout, channel_axis=None):
        return ste_grad(x, dout, self.clip)


class DoReFaActivation(Quantizer):
    """k-bit activation quantizer of DoReFa-Net (Zhou et al. 2016, arXiv 1606.06160, eq. 9).

    Forward, ``signed=False`` (the paper): ``q = quantize_k(clip(x, 0, 1))``, levels ``j / (2^k - 1)``.
    Forward, ``signed=True`` (range [-1, 1], for inputs already in [-1, 1] such as the Brevitas MLPs'
    pixels and BatchNorm outputs): ``q = 2 * quantize_k((clip(x, -1, 1) + 1) / 2) - 1``.
    ``quantize_k(v) = round((2^k - 1) v) / (2^k - 1)``, half to even.

    ``max_value`` (default 1) widens the clip range to ``[0, max_value]`` (``[-max_value, max_value]``
    when signed): ``q = max_value * Q(x / max_value)`` with ``Q`` the formula above.  Post-training
    quantization (:func:`lowbit.ptq.post_training_quantize`) sets it to a range calibrated on
    training images.  With ``max_value == 1`` nothing is divided or multiplied, so the result is the
    paper's formula bit for bit.

    Gradient: STE through the rounding, zero outside the clip range: ``dx = dout * 1{0 <= x <= m}``
    (``1{-m <= x <= m}`` when signed), ``m = max_value``.  ``precision = bits``; at most ``2^k``
    levels; idempotent.
    """

    name = "dorefa_activation"

    def __init__(self, bits=2, signed=False, max_value=1.0):
        self.bits = check_bits("DoReFaActivation", bits, 1, 8)
        self.signed = bool(signed)
        if isinstance(max_value, bool) or not isinstance(max_value, (int, float, np.integer, np.floating)) \
                or not max_value > 0 or not math.isfinite(max_value):
            raise ValueError(f"max_value must be a positive finite number, got {max_value!r}")
        self.max_value = float(max_value)

    @property
    def precision(self):
        return self.bits

    def config(self):
        cfg = {"name": self.name, "bits": self.bits, "signed": self.signed}
        if self.max_value != 1.0:  # files written before max_value existed stay byte-identical
            cfg["max_value"] = self.max_value
        return cfg

    def packed_encoding(self):
        return PackedEncoding(self.bits, signed=self.signed, levels=2 ** self.bits,
                              scale=None if self.max_value == 1.0 else "range",
                              max_value=None if self.max_value == 1.0 else self.max_value)

    def forward(self, x, train=False, channel_axis=None):
        return self.quantize_checked(check_float_array(self, x), x)

    def quantize_checked(self, xp, x):
        """The forward on an ``x`` already checked by :func:`check_float_array`, ``xp`` its array
        module (:func:`lowbit.ptq.mse_activation_range` checks its sample once, then quantizes it at
        every candidate range)."""
        one = x.dtype.type(1)
        scaled = self.max_value != 1.0
        if scaled:
            x = x / x.dtype.type(self.max_value)
        if not self.signed:
            q = quantize_k(xp.clip(x, 0, one), self.bits)
        else:
            half = x.dtype.type(0.5)
            v = (xp.clip(x, -one, one) + one) * half
            q = quantize_k(v, self.bits) * x.dtype.type(2) - one
        if scaled:
            q = q * x.dtype.type(self.max_value)
        return q

    def backward(self, x, dout, channel_axis=None):
        high = self.max_value if self.max_value != 1.0 else 1
        low = -high if self.signed else 0
        return dout * ((x >= low) & (x <= high))


class DoReFaWeight(Quantizer):
    """k-bit weight quantizer of DoReFa-Net (Zhou et al. 2016, arXiv 1606.06160, eq. 8), k = 2..8.

    Forward ``q = 2 * quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1``: levels ``2 j / (2^k - 1) - 1``
    in [-1, 1] (no zero level), the largest ``|w|`` maps to ``+-1``; the max is over the whole tensor,
    as in the paper.  An all-zero tensor is treated as ``max = 1`` (every weight maps to the level
    next above zero, and the gradient is ``dout``).

    Gradient: straight-through on the rounding only, so ``dq = d(tanh(w) / max|tanh(w)|)`` exactly
    (the factor 2 and the 1/2 cancel) -- the normalisation is differentiated through, max included, as
    the paper's TensorFlow code does by autodiff.  With ``t = tanh(w)``, ``s = 1 - t^2``,
    ``m = max|t|``::

        dw = dout * s / m  -  [|t| == m] * sign(t) * s / m^2 * sum(dout * t) / count(|t| == m)

    (ties for the max share the second term equally).  Not idempotent: ``tanh`` moves the levels.
    ``precision = bits``; at most ``2^k`` levels.  For 1-bit weights use :class:`SteSign`
    (``scale="channel"`` or ``"tensor"`` gives DoReFa's ``sign(w) * mean|w|``).
    """

    name = "dorefa_weight"

    def __init__(self, bits=2):
        self.bits = check_bits("DoReFaWeight", bits, 2, 8)

    @property
    def precision(self):
        return self.bits

    def config(self):
        return {"name": self.name, "bits": self.bits}

    def packed_encoding(self):
        # the levels 2 j / (2^k - 1) - 1 are fixed: the max|tanh| normalises before the rounding
        return PackedEncoding(self.bits, levels=2 ** self.bits, codes=True)

    @staticmethod
    def _normalise(w):
        t = get_array_module(w).tanh(w)
        m = abs(t).max()
        m = m + (m == 0).astype(w.dtype)  # all zeros: 0 / 1 rather than 0 / 0
        return t, m

    def forward(self, x, train=False, channel_axis=None):
        check_float_array(self, x)
        t, m = self._normalise(x)
        half = x.dtype.type(0.5)
        u = t / m * half + half
        return quantize_k(u, self.bits) * x.dtype.type(2) - x.dtype.type(1)

    def codes(self, x, channel_axis=None):
        """Integer codes of ``forward(x)``: ``(codes, params)``, ``codes`` uint8 in [0, 2^k - 1].

        ``from_codes(codes, **params)`` equals ``forward(x)`` bit for bit (``params`` is empty: the
        levels do not depend on ``x``), so a k-bit layer can be stored as its codes.
        """
        check_float_array(self, x)
        xp = get_array_module(x)
        t, m = self._normalise(x)
        half = x.dtype.type(0.5)
        u = t / m * half + half
        return xp.rint(u * x.dtype.type(2 ** self.bits - 1)).astype(np.uint8), {}

    def from_codes(self, codes, dtype=np.float32):
        """The quantized weights ``2 * codes / (2^k - 1) - 1`` in ``dtype``, the ops of ``forward``."""
        dtype = np.dtype(dtype)
        n = dtype.type(2 ** self.bits - 1)
        return codes.astype(dtype) / n * dtype.type(2) - dtype.type(1)

    def backward(self, x, dout, channel_axis=None):
        xp = get_array_module(x)
        t, m = self._normalise(x)
        s = 1 - t * t
        at_max = abs(t) == m
        total = (dout * t).sum()
        count = xp.maximum(at_max.sum(), 1).astype(t.dtype)  # 0 only for an all-zero tensor
        sign_t = (t >= 0).astype(t.dtype) * 2 - 1
        return dout * s / m - at_max * (sign_t * s) * (total / (m * m * count))


class UniformWeight(Quantizer):
    """Symmetric uniform k-bit weight quantizer with a max-abs scale, for post-training quantization.

    Forward ``q = round(m * clip(w / alpha, -1, 1)) / m * alpha`` with ``m = 2^(k-1) - 1`` (so the
    integer codes lie in ``[-m, m]``: ternary for k = 2, int8's ``[-127, 127]`` for k = 8) and
    ``alpha = max|w|`` over the whole tensor (``scale="tensor"``) or per output unit
    (``scale="channel"``: over every axis but ``channel_axis``, which the layer passes); an all-zero
    tensor or unit gets ``alpha = 1``.  Rounds half to even; a zero level is always +0.0.  This is
    the per-channel symmetric scheme of Krishnamoorthi 2018 (arXiv 1806.08342, section 2.2) and
    Jacob et al. 2018
    (arXiv 1712.05877); unlike :class:`DoReFaWeight` it keeps zero and the weights' own magnitude,
    so a float layer keeps working with it without retraining.

    Gradient: straight-through, ``dx = dout`` (``alpha`` treated as a constant; ``|w| <= alpha``
    always).  ``precision = bits`` (``2^k - 1`` levels used).
    """

    name = "uniform_weight"
    _scales = ("tensor", "channel")

    def __init__(self, bits=8, scale="channel"):
        self.bits = check_bits("UniformWeight", bits, 2, 8)
        if scale not in self._scales:
            raise ValueError(f"scale must be one of {list(self._scales)}, got {scale!r}")
        self.scale = scale

    @property
    def precision(self):
        return self.bits

    def config(self):
        return {"name": self.name, "bits": self.bits, "scale": self.scale}

    def packed_encoding(self):
        return PackedEncoding(self.bits, levels=2 ** self.bits - 1, scale=self.scale, codes=True)

    def _alpha(self, x, channel_axis):
        if self.scale == "tensor":
            alpha = abs(x).max(keepdims=True)
        else:
            if channel_axis is None:
                raise ValueError(
                    "UniformWeight(scale='channel') needs the channel_axis of a weight tensor; use it "
                    "as a kernel_quantizer of QuantAffine/QuantConv2D (or scale='tensor')"
                )
            axis = channel_axis % x.ndim
            others = tuple(a for a in range(x.ndim) if a != axis)
            alpha = abs(x).max(axis=others, keepdims=True)
        return nonzero_scale(alpha)

    def codes(self, x, channel_axis=None):
        """Integer codes of ``forward(x)``: ``(codes, {"alpha": alpha})``, ``codes`` uint8 in
        ``[0, 2m]`` (the signed code plus ``m``); ``from_codes(codes, alpha)`` equals ``forward(x)``
        bit for bit."""
        xp = check_float_array(self, x)
        alpha = self._alpha(x, channel_axis)
        m = x.dtype.type(2 ** (self.bits - 1) - 1)
        return (uniform_signed_codes(xp, x, alpha, m) + m).astype(np.uint8), {"alpha": alpha}

    def from_codes(self, codes, alpha, dtype=np.float32):
        """``(codes - m) / m * alpha`` in ``dtype`` (what ``forward`` returns)."""
        dtype = np.dtype(dtype)
        m = dtype.type(2 ** (self.bits - 1) - 1)
        return (codes.astype(dtype) - m) / m * alpha.astype(dtype, copy=False)

    def forward(self, x, train=False, channel_axis=None):
        # Through the codes, so that a layer stored as codes is this forward bit for bit (a
        # rounded -0.0 comes back as +0.0 both ways).
        codes, params = self.codes(x, channel_axis)
        return self.from_codes(codes, params["alpha"], dtype=x.dtype)

    def backward(self, x, dout, channel_axis=None):
        return dout


QUANTIZERS = {
    "identity": Identity,
    "fp16": Fp16,
    "ste_sign": SteSign,
    "stochastic_binary": StochasticBinary,
    "dorefa_activation": DoReFaActivation,
    "dorefa_weight": DoReFaWeight,
    "uniform_weight": UniformWeight,
}


def get_quantizer(spec):
    """Resolve ``spec`` to a quantizer instance.

    ``spec`` may be None (:class:`Identity`), a name in :data:`QUANTIZERS`, a dict
    ``{"name": name, **constructor_arguments}`` (the output of ``config()``) or a :class:`Quantizer`
    instance (returned as is, not copied).
    """
    if spec is None:
        return Identity()
    if isinstance(spec, Quantizer):
        return spec
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, dict):
        if "name" not in spec:
            raise ValueError(f"quantizer dict needs a 'name' key, got {spec!r}")
        kwargs = dict(spec)
        name = kwargs.pop("name")
    else:
        raise TypeError(
            f"quantizer must be None, a name, a dict or a Quantizer, got {type(spec).__name__}"
        )
    try:
        cls = QUANTIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown quantizer {name!r}; known quantizers: {sorted(QUANTIZERS)}") from None
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise TypeError(f"bad arguments for quantizer {name!r}: {exc}") from None


def quantizer_for_bits(bits, kind="weight", stochastic=False, draws="generator"):
    """The default quantizer for a bit width.

    ``1`` -> :class:`SteSign` (:class:`StochasticBinary` with ``draws`` when ``stochastic``), ``2..8`` ->
    :class:`DoReFaWeight` or :class:`DoReFaActivation` (by ``kind``), ``16`` -> :class:`Fp16`,
    ``32`` -> :class:`Identity`.  ``kind`` is ``"weight"`` or ``"activation"``.
    """
    if kind not in ("weight", "activation"):
        raise ValueError(f"kind must be 'weight' or 'activation', got {kind!r}")
    valid = isinstance(bits, (int, np.integer)) and not isinstance(bits, bool)
    if not valid or not (1 <= bits <= 8 or bits in (16, 32)):
        raise ValueError(f"bits must be one of 1..8, 16, 32, got {bits!r}")
    bits = int(bits)
    if bits == 1:
        return StochasticBinary(draws=draws) if stochastic else SteSign()
    if bits == 16:
        return Fp16()
    if bits == 32:
        return Identity()
    return DoReFaWeight(bits) if kind == "weight" else DoReFaActivation(bits)
