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

import json
import math

import numpy as np

from .backend import get_array_module
from .draws import check_draws, uniform
from .functions import sign, ste_grad

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
    "mse_weight_range",
    "WEIGHT_CLIPPINGS",
    "mse_activation_range",
    "ACTIVATION_CLIPPINGS",
    "hard_sigmoid",
    "quantize_k",
]


def _check_array(owner, x):
    """``x`` must be a float array without NaN; returns its array module.  ``owner`` (a quantizer,
    or a function's name) names the caller in the errors."""
    name = owner if isinstance(owner, str) else type(owner).__name__
    dtype = getattr(x, "dtype", None)
    if dtype is None or dtype.kind != "f":
        raise TypeError(
            f"{name} expects a float array, got "
            f"{'dtype ' + str(dtype) if dtype is not None else type(x).__name__}"
        )
    xp = get_array_module(x)
    if bool(xp.isnan(x).any()):
        raise ValueError(f"{name} got NaN input (NaN has no quantized value)")
    return xp


def _check_bits(name, bits, low, high):
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not low <= bits <= high:
        raise ValueError(f"{name} bits must be an int in {low}..{high}, got {bits!r}")
    return int(bits)


def hard_sigmoid(x):
    """``clip((x + 1) / 2, 0, 1)`` in the dtype of ``x`` (BNN paper, eq. 3)."""
    xp = get_array_module(x)
    one = x.dtype.type(1)
    return xp.clip((x + one) * x.dtype.type(0.5), 0, one)


def quantize_k(x, bits):
    """DoReFa's ``quantize_k(x) = round((2^k - 1) x) / (2^k - 1)`` for ``x`` in [0, 1].

    Rounds half to even (``rint``, as ``tf.round``); the result has the dtype of ``x`` and takes at most
    ``2^k`` values ``j / (2^k - 1)``.
    """
    xp = get_array_module(x)
    n = x.dtype.type(2 ** bits - 1)
    return xp.rint(x * n) / n


class Quantizer:
    """Base class; see the module docstring for the protocol."""

    name = "quantizer"
    precision = 32

    def __call__(self, x, train=False, channel_axis=None):
        return self.forward(x, train, channel_axis)

    def forward(self, x, train=False, channel_axis=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, x, dout, channel_axis=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict:
        return {"name": self.name}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        """Equal type and config (a stochastic quantizer's generator state is not compared)."""
        return type(other) is type(self) and other.config() == self.config()

    def __hash__(self):
        return hash((type(self).__name__, json.dumps(self.config(), sort_keys=True)))


class Identity(Quantizer):
    """No quantization (float32 stays float32).

    Forward ``q = x``; gradient ``dx = dout``.  ``precision = 32``.
    """

    name = "identity"
    precision = 32

    def forward(self, x, train=False, channel_axis=None):
        _check_array(self, x)
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

    def forward(self, x, train=False, channel_axis=None):
        _check_array(self, x)
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

    def forward(self, x, train=False, channel_axis=None):
        if not train and self.deterministic_eval:
            return sign(x, type(self).__name__)
        xp = _check_array(self, x)
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
    quantization (:func:`lowbit.convert.post_training_quantize`) sets it to a range calibrated on
    training images.  With ``max_value == 1`` nothing is divided or multiplied, so the result is the
    paper's formula bit for bit.

    Gradient: STE through the rounding, zero outside the clip range: ``dx = dout * 1{0 <= x <= m}``
    (``1{-m <= x <= m}`` when signed), ``m = max_value``.  ``precision = bits``; at most ``2^k``
    levels; idempotent.
    """

    name = "dorefa_activation"

    def __init__(self, bits=2, signed=False, max_value=1.0):
        self.bits = _check_bits("DoReFaActivation", bits, 1, 8)
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

    def forward(self, x, train=False, channel_axis=None):
        return self._quantize(_check_array(self, x), x)

    def _quantize(self, xp, x):
        """The forward on an already checked ``x`` (:func:`mse_activation_range` checks its sample
        once, then quantizes it at every candidate range)."""
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
        self.bits = _check_bits("DoReFaWeight", bits, 2, 8)

    @property
    def precision(self):
        return self.bits

    def config(self):
        return {"name": self.name, "bits": self.bits}

    @staticmethod
    def _normalise(w):
        t = get_array_module(w).tanh(w)
        m = abs(t).max()
        m = m + (m == 0).astype(w.dtype)  # all zeros: 0 / 1 rather than 0 / 0
        return t, m

    def forward(self, x, train=False, channel_axis=None):
        _check_array(self, x)
        t, m = self._normalise(x)
        half = x.dtype.type(0.5)
        u = t / m * half + half
        return quantize_k(u, self.bits) * x.dtype.type(2) - x.dtype.type(1)

    def codes(self, x, channel_axis=None):
        """Integer codes of ``forward(x)``: ``(codes, params)``, ``codes`` uint8 in [0, 2^k - 1].

        ``from_codes(codes, **params)`` equals ``forward(x)`` bit for bit (``params`` is empty: the
        levels do not depend on ``x``), so a k-bit layer can be stored as its codes.
        """
        _check_array(self, x)
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
        self.bits = _check_bits("UniformWeight", bits, 2, 8)
        if scale not in self._scales:
            raise ValueError(f"scale must be one of {list(self._scales)}, got {scale!r}")
        self.scale = scale

    @property
    def precision(self):
        return self.bits

    def config(self):
        return {"name": self.name, "bits": self.bits, "scale": self.scale}

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
        return _nonzero(alpha)

    def codes(self, x, channel_axis=None):
        """Integer codes of ``forward(x)``: ``(codes, {"alpha": alpha})``, ``codes`` uint8 in
        ``[0, 2m]`` (the signed code plus ``m``); ``from_codes(codes, alpha)`` equals ``forward(x)``
        bit for bit."""
        xp = _check_array(self, x)
        alpha = self._alpha(x, channel_axis)
        m = x.dtype.type(2 ** (self.bits - 1) - 1)
        return (_uniform_signed_codes(xp, x, alpha, m) + m).astype(np.uint8), {"alpha": alpha}

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


#: Post-training weight clipping: "mse" (:func:`mse_weight_range`) or "max" (UniformWeight's own range).
WEIGHT_CLIPPINGS = ("mse", "max")


def mse_weight_range(w, bits, channel_axis=None, candidates=128):
    """The clipping range ``alpha`` of :class:`UniformWeight` that minimizes the squared error.

    :class:`UniformWeight` takes ``alpha = max|w|``, which suits 8 bits but wastes a short grid on
    the few largest weights: at 2 bits (ternary ``{-alpha, 0, alpha}``) most weights of a trained
    layer round to 0.  This searches ``alpha = max|w| * j / candidates`` for ``j = 1..candidates``
    and returns, per output unit (over every axis but ``channel_axis``) or for the whole tensor
    (``channel_axis=None``), the one with the least ``sum((q(w; alpha) - w)^2)``; ties go to the
    larger ``alpha``, and ``j = candidates`` (the max) is among them, so the error is never above
    the max-abs scale's.  Post-training quantization clips the latent weights to ``[-alpha, alpha]``
    (:func:`lowbit.convert.post_training_quantize`, ``weight_clipping="mse"``): ``UniformWeight``'s
    max-abs scale of the clipped weights is then this ``alpha``, and the packed format is unchanged.
    Banner et al. 2019 (ACIQ, arXiv 1810.05723) derive the MSE-optimal clipping from a fitted
    distribution; this searches it on the weights themselves.  For ternary weights it plays the role
    of TWN's threshold (Li et al. 2016, arXiv 1605.04711).

    Returns a float array of ``w``'s dtype with ``w``'s ndim (size 1 on the reduced axes); an
    all-zero unit gets ``0``.  Cost: ``candidates`` quantizations of ``w``.
    """
    _check_bits("mse_weight_range", bits, 2, 8)
    if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) or candidates < 1:
        raise ValueError(f"candidates must be an int >= 1, got {candidates!r}")
    xp = _check_array("mse_weight_range", w)
    if channel_axis is None:
        others = tuple(range(w.ndim))
    else:
        axis = channel_axis % w.ndim
        others = tuple(a for a in range(w.ndim) if a != axis)
    top = abs(w).max(axis=others, keepdims=True)
    m = w.dtype.type(2 ** (bits - 1) - 1)

    def error(alpha):
        safe = _nonzero(alpha)
        q = _uniform_signed_codes(xp, w, safe, m) / m * safe
        return ((q - w).astype(np.float64) ** 2).sum(axis=others, keepdims=True)

    best_alpha, best_error = top, error(top)
    for j in range(int(candidates) - 1, 0, -1):  # from the max down: a tie keeps the larger alpha
        alpha = (top * w.dtype.type(j / candidates)).astype(w.dtype)
        err = error(alpha)
        better = err < best_error
        best_error = xp.where(better, err, best_error)
        best_alpha = xp.where(better, alpha, best_alpha)
    return best_alpha


#: Post-training activation ranges: "mse" (:func:`mse_activation_range`) or "max" (a percentile of
#: ``|x|``, by default its maximum).
ACTIVATION_CLIPPINGS = ("mse", "max")


def mse_activation_range(x, bits, signed=False, candidates=128):
    """The range ``max_value`` of :class:`DoReFaActivation` that minimizes the squared error on ``x``.

    Post-training quantization calibrates each k-bit activation on sample activations ``x`` of the
    float model.  The largest ``|x|`` is an outlier's: at 2 bits (levels ``0, m/3, 2m/3, m``) most
    activations then fall in the lowest step.  This searches ``max_value = max|x| * j / candidates``
    for ``j = 1..candidates`` and returns the one with the least ``sum((q(x; max_value) - x)^2)``,
    ``q`` being ``DoReFaActivation(bits, signed, max_value)``'s forward; ties go to the larger range,
    and the maximum is among the candidates, so the error is never above the max range's.  It is the
    activation counterpart of :func:`mse_weight_range` (Banner et al. 2019, ACIQ, arXiv 1810.05723,
    derive the optimum from a fitted distribution; this searches it on the samples).

    ``x`` is any float array of samples (flattened); returns a Python float, 1.0 when the
    representable side of ``x`` is all zeros (``max x <= 0`` unsigned).  Cost: ``candidates``
    quantizations of ``x``.
    """
    bits = _check_bits("mse_activation_range", bits, 1, 8)
    if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) or candidates < 1:
        raise ValueError(f"candidates must be an int >= 1, got {candidates!r}")
    xp = _check_array("mse_activation_range", x)
    x = x.reshape(-1)
    # The top of the representable side: negatives of an unsigned quantizer clip to 0 whatever
    # the range, so they add the same error to every candidate.
    top = float((abs(x) if signed else x).max()) if x.size else 0.0
    if not top > 0:
        return 1.0

    def error(value):
        q = DoReFaActivation(bits, signed=signed, max_value=value)._quantize(xp, x)
        return float(((q - x).astype(np.float64) ** 2).sum())

    best_value, best_error = top, error(top)
    for j in range(int(candidates) - 1, 0, -1):  # from the max down: a tie keeps the larger range
        value = top * j / candidates
        err = error(value)
        if err < best_error:
            best_value, best_error = value, err
    return best_value


def _nonzero(alpha):
    """``alpha`` with its zeros (all-zero units) set to 1, so that ``x / alpha`` is 0 / 1, not 0 / 0."""
    return alpha + (alpha == 0).astype(alpha.dtype)


def _uniform_signed_codes(xp, x, alpha, m):
    """UniformWeight's rounding: ``rint(clip(x / alpha, -1, 1) * m)``, integers in ``[-m, m]``."""
    one = x.dtype.type(1)
    return xp.rint(xp.clip(x / alpha, -one, one) * m)


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
