"""Post-training quantization (PTQ): a trained float model's quantized twin, without retraining.

:func:`post_training_quantize` builds the twin (:func:`lowbit.quantize.quantized_twin`), sets its
weights' quantizers and ranges and calibrates its activations' ranges on sample images;
:func:`lowbit.convert.convert` then packs it.  This module also holds what that needs and what the
per-layer search (:mod:`lowbit.sensitivity`) shares with it:

* the ranges of least squared error: :func:`mse_weight_range` (2..8-bit weights: the latent weights
  are clipped to it, :func:`clip_weights_mse`) and :func:`mse_activation_range` (2..8-bit
  activations, on the samples a :class:`RangeRecorder` keeps);
* :func:`exact_binary_scale`: 1-bit weights ``sign(W) * alpha`` with ``alpha`` rounded so that the
  binary products are exact in float32 and the layer runs packed;
* :func:`calibration_images`: the one rule for which training images calibrate PTQ, shared by
  ``lowbit quantize``, ``lowbit sweep`` and ``lowbit sensitivity``: the first ``count`` of the
  training images that a ``val_size``-image validation split by ``seed``
  (:func:`lowbit.data.train_val_split`) leaves for training (default ``val_size`` 10,000, as the
  sweep's).  The validation images never calibrate.

Nothing here loads data or prints.
"""
from __future__ import annotations

import numpy as np

from .backend import to_numpy
from .layers import Affine, Conv2D
from .model import Model
from .packed import kernel_channel_axis
from .quant_layers import QuantAffine, QuantConv2D
from .quantize import quantized_twin
from .quantizers import (
    DoReFaActivation, Identity, PackedEncoding, Quantizer, UniformWeight, check_bits, check_float_array,
    nonzero_scale, uniform_signed_codes,
)

__all__ = [
    "ACTIVATION_CLIPPINGS",
    "ALLOWED_BITS",
    "CALIBRATION_VAL_SIZE",
    "RangeRecorder",
    "WEIGHT_CLIPPINGS",
    "calibration_images",
    "check_activation_clipping",
    "check_bit_width",
    "check_weight_clipping",
    "clip_weights_mse",
    "exact_binary_scale",
    "mse_activation_range",
    "mse_weight_range",
    "post_training_quantize",
    "round_significand",
]

#: PTQ's weight and activation widths: 1..8 bits, 16 (float16), 32 (float32).
ALLOWED_BITS = tuple(range(1, 9)) + (16, 32)

#: Training images held out for validation before the calibration images are taken (the sweep's
#: default ``val_size``).
CALIBRATION_VAL_SIZE = 10000


def calibration_images(train_images, count, seed=0, val_size=CALIBRATION_VAL_SIZE, limit=0):
    """The images that calibrate PTQ: the first ``count`` training images left after the validation split.

    :func:`lowbit.data.train_val_split` (``val_size``, ``seed``) holds out ``val_size`` images; of
    the rest, in their order in ``train_images``, the first ``limit`` are kept (``limit`` 0: all;
    a sweep's ``train_limit``) and of those the first ``count`` are returned.  This is the rule of
    ``lowbit sweep``'s PTQ points (``split.x_train[:calibration]``), of ``lowbit quantize`` (its
    ``--calibrate``, ``--val`` and ``--seed``) and of ``lowbit sensitivity``.

    Parameters
    ----------
    train_images : numpy.ndarray
        uint8 ``(N, H, W)`` (MNIST as loaded: converted by :func:`lowbit.data.float_images`) or float
        ``(N, ...)`` images (returned as float32).
    count : int >= 0
        How many images (fewer when fewer are left).
    seed : int
        The split's seed.
    val_size : int, 0 <= val_size < N
    limit : int >= 0

    Returns
    -------
    numpy.ndarray, float32, ``(min(count, ...),) + image shape``
    """
    from .data import float_images, train_val_split

    for name, value in (("count", count), ("limit", limit), ("val_size", val_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    images = np.asarray(train_images)
    if not 0 <= val_size < len(images):
        raise ValueError(f"val_size must be in [0, {len(images)}) (the training images), got {val_size}; "
                         "pass val_size=0 to calibrate on the first training images")
    order = np.arange(len(images))
    rows, _, _, _ = train_val_split(order, order, int(val_size), seed)  # the rule of train_val_split itself
    if limit:
        rows = rows[:int(limit)]
    rows = rows[:int(count)]
    if images.dtype == np.uint8:
        return float_images(images[rows])
    return np.asarray(images[rows], dtype=np.float32)


def check_bit_width(name, bits):
    """``bits`` must be one of 1..8, 16, 32 (PTQ's widths); returns it as an int."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in ALLOWED_BITS:
        raise ValueError(f"{name} must be one of 1..8, 16, 32, got {bits!r}")
    return int(bits)


def check_weight_clipping(weight_clipping):
    """``weight_clipping`` must be one of :data:`WEIGHT_CLIPPINGS`."""
    if weight_clipping not in WEIGHT_CLIPPINGS:
        raise ValueError(f"weight_clipping must be one of {list(WEIGHT_CLIPPINGS)}, got {weight_clipping!r}")


def check_activation_clipping(activation_clipping, percentile=100.0):
    """``activation_clipping`` must be one of :data:`ACTIVATION_CLIPPINGS`, ``percentile`` in (0, 100],
    and a percentile other than 100 goes with ``"max"`` only."""
    if activation_clipping not in ACTIVATION_CLIPPINGS:
        raise ValueError(f"activation_clipping must be one of {list(ACTIVATION_CLIPPINGS)}, "
                         f"got {activation_clipping!r}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    if activation_clipping == "mse" and percentile != 100:
        raise ValueError(f"percentile (got {percentile!r}) sets the 'max' activation range; with "
                         "activation_clipping='mse' the range is searched, so pass activation_clipping='max' "
                         "to use a percentile")


def post_training_quantize(model, weight_bits, activation_bits, calibration_images=None, per_channel=True,
                           keep_first=True, keep_last=True, percentile=100.0, batch_size=100, seed=0,
                           weight_clipping="mse", activation_clipping="mse"):
    """Quantize a trained float model without retraining; returns the quantized twin (a Model).

    Built on :func:`lowbit.quantize.quantized_twin` (every Affine/Conv2D becomes its quantized twin;
    the first and last keep float kernels by default), then:

    * ``weight_bits`` 2..8: :class:`~lowbit.quantizers.UniformWeight` (symmetric integer grid,
      ``alpha = max|W|`` per output unit with ``per_channel``, else per tensor), after the latent
      weights are clipped to the range of least squared error
      (:func:`~lowbit.ptq.mse_weight_range`) with ``weight_clipping="mse"``; 16: float16;
      1: ``sign(W) * mean|W|`` per output unit (XNOR-Net; per tensor without ``per_channel``) with
      the scale rounded to ``24 - bit_length(fan-in)`` significant bits so that the binary products
      are exact in float32 and the layer runs packed after :func:`convert`.
    * ``activation_bits`` 2..8: every quantized layer's input quantizer is a
      :class:`~lowbit.quantizers.DoReFaActivation` whose range ``max_value`` is calibrated on that
      layer's input in the float model over ``calibration_images`` (signed when the input took
      negative values): with ``activation_clipping="mse"`` (the default) the range of least squared
      error on a sample of the inputs (:func:`~lowbit.ptq.mse_activation_range`), with
      ``"max"`` the ``percentile`` of ``|input|``.  The image goes through an 8-bit quantizer,
      calibrated the same way.  1: sign (ReLUs are removed, as ``quantized_twin`` does); 16: float16.

    Parameters
    ----------
    model : Model
        A float model trained by lowbit (Affine/Conv2D layers).
    weight_bits, activation_bits : int
        1..8, 16 or 32.
    calibration_images : numpy.ndarray, float32 (N,) + input_shape, optional
        Needed for 2..8-bit activations; used for every DoReFa input quantizer when given.
    per_channel : bool
        Per-output-unit weight scales (else one per tensor).
    keep_first, keep_last : bool
        Keep the first / last layer's kernel in float32.
    percentile : float in (0, 100]
        With ``activation_clipping="max"``: the calibration statistic of ``|x|`` (100: the maximum).
    batch_size, seed : int
        Calibration batches; ``seed`` for the percentile's subsample and the twin's generators.
    weight_clipping : "mse" or "max"
        2..8-bit weights: clip each unit's (or the tensor's) weights to the MSE-optimal range first
        ("mse", the default), or quantize over the full ``max|W|`` range ("max"; at 2 bits most
        weights of a trained layer then round to 0).
    activation_clipping : "mse" or "max"
        2..8-bit activations: the range of least squared error ("mse", the default) or the
        ``percentile`` of ``|x|`` ("max"; at 2 bits the maximum leaves most activations in the
        lowest step).
    """
    if not isinstance(model, Model):
        raise TypeError(f"model must be a lowbit Model, got {type(model).__name__}")
    weight_bits = check_bit_width("weight_bits", weight_bits)
    activation_bits = check_bit_width("activation_bits", activation_bits)
    check_weight_clipping(weight_clipping)
    check_activation_clipping(activation_clipping, percentile)
    kinds = [type(layer) for _, layer in model.named_layers()]
    quantized = any(kind in (QuantAffine, QuantConv2D) for kind in kinds)
    if quantized or not any(kind in (Affine, Conv2D) for kind in kinds):
        raise ValueError("post-training quantization needs a float model (Affine/Conv2D layers, no quantized "
                         "ones); this model is already quantized or has no kernels")
    if 2 <= activation_bits <= 8 and calibration_images is None:
        raise ValueError(f"{activation_bits}-bit activations need calibration_images to set their ranges")
    scale = "channel" if per_channel else "tensor"
    twin = quantized_twin(
        model, 32 if 2 <= weight_bits <= 8 else weight_bits, activation_bits,
        keep_first=keep_first, keep_last=keep_last,
        first_input_bits=8 if activation_bits <= 8 else None,
        kernel_constraint=None, weight_scale=scale if weight_bits == 1 else None, seed=seed)
    targets = [layer for _, layer in twin.named_layers() if isinstance(layer, (QuantAffine, QuantConv2D))]
    for position, layer in enumerate(targets):
        kept = (position == 0 and keep_first) or (position == len(targets) - 1 and keep_last)
        if kept:
            continue
        if 2 <= weight_bits <= 8:
            layer.kernel_quantizer = UniformWeight(weight_bits, scale)
            if weight_clipping == "mse":
                clip_weights_mse(layer, weight_bits, scale)
        elif weight_bits == 1:
            exact_binary_scale(layer, scale)
        layer.constrain()  # drop any cached kernel
    if calibration_images is not None:
        _calibrate(twin, targets, calibration_images, percentile, batch_size, seed, activation_clipping)
    twin.name = f"{model.name}_ptq_w{weight_bits}a{activation_bits}"
    return twin


def clip_weights_mse(layer, bits, scale):
    """Clip the latent W to :func:`mse_weight_range`, so that UniformWeight's max-abs scale is it."""
    w = np.asarray(to_numpy(layer.W), dtype=np.float32)
    alpha = mse_weight_range(w, bits, kernel_channel_axis(layer) if scale == "channel" else None)
    layer.W = np.clip(w, -alpha, alpha)


def exact_binary_scale(layer, scale):
    """Set the latent W to sign(W) * alpha with alpha = mean|W| rounded so that SteSign's mean is
    exact and every product sum of the layer is exact in float32."""
    axis = kernel_channel_axis(layer)
    w = np.asarray(to_numpy(layer.W), dtype=np.float32)
    fan_in = w.size // w.shape[axis]
    if scale == "channel":
        others = tuple(a for a in range(w.ndim) if a != axis)
        alpha = np.abs(w.astype(np.float64)).mean(axis=others, keepdims=True)
        count = fan_in
    else:
        alpha = np.abs(w.astype(np.float64)).mean(keepdims=True)
        count = w.size
    alpha = np.where(alpha > 0, alpha, 1.0)
    significant = max(1, 24 - max(int(count).bit_length(), int(fan_in).bit_length()))
    alpha = round_significand(alpha, significant)
    layer.W = np.where(w >= 0, alpha, -alpha).astype(np.float32)


def _calibrate(twin, targets, images, percentile, batch_size, seed, clipping):
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != len(twin.input_shape) + 1 or tuple(images.shape[1:]) != twin.input_shape:
        raise ValueError(f"calibration_images must have shape (N, {', '.join(map(str, twin.input_shape))}), "
                         f"got {images.shape}")
    rng = np.random.default_rng(seed)
    saved = [(layer.input_quantizer, layer.kernel_quantizer) for layer in targets]
    recorders = []
    try:
        for layer in targets:
            recorder = RangeRecorder(percentile, clipping, rng)
            recorders.append(recorder)
            layer.input_quantizer = recorder
            layer.kernel_quantizer = Identity()  # the float model's activations
            layer.constrain()
        for start in range(0, len(images), batch_size):
            twin.forward(images[start:start + batch_size], train=False)
    finally:
        for layer, (input_q, kernel_q) in zip(targets, saved):
            layer.input_quantizer, layer.kernel_quantizer = input_q, kernel_q
            layer.constrain()
    for layer, recorder in zip(targets, recorders):
        q = layer.input_quantizer
        if isinstance(q, DoReFaActivation):
            signed = recorder.low < 0
            layer.input_quantizer = DoReFaActivation(q.bits, signed=signed,
                                                     max_value=recorder.value(q.bits, signed))


class RangeRecorder(Quantizer):
    """Identity that records the range of what passes through it, and a random sample of it (up to
    2^16 values a batch) for the percentile and MSE ranges (calibration only; never saved)."""

    name = "range_recorder"

    def packed_encoding(self):
        return PackedEncoding(32, passthrough=True)

    def __init__(self, percentile, clipping, rng):
        self.low = np.inf
        self.high = 0.0
        self.percentile = percentile
        self.clipping = clipping
        self.rng = rng
        self.samples = []

    def forward(self, x, train=False, channel_axis=None):
        values = np.asarray(to_numpy(x)).reshape(-1)
        if values.size:
            self.low = min(self.low, float(values.min()))
            self.high = max(self.high, float(np.abs(values).max()))
            if self.percentile < 100 or self.clipping == "mse":
                take = min(values.size, 1 << 16)
                self.samples.append(self.rng.choice(values, take, replace=False))
        return x

    def value(self, bits, signed):
        """The range ``max_value`` of a ``bits``-bit DoReFaActivation."""
        if self.clipping == "mse" and self.samples:
            # The largest |x| joins the sample, so that the max range is among the candidates (an
            # unsigned quantizer is chosen only when no x was negative: then it is the largest x).
            top = np.array([self.high], dtype=self.samples[0].dtype)
            return mse_activation_range(np.concatenate(self.samples + [top]), bits, signed=signed)
        if self.percentile < 100 and self.samples:
            high = float(np.percentile(np.abs(np.concatenate(self.samples)), self.percentile))
        else:
            high = self.high
        return high if high > 0 else 1.0


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
    (:func:`post_training_quantize`, ``weight_clipping="mse"``): ``UniformWeight``'s
    max-abs scale of the clipped weights is then this ``alpha``, and the packed format is unchanged.
    Banner et al. 2019 (ACIQ, arXiv 1810.05723) derive the MSE-optimal clipping from a fitted
    distribution; this searches it on the weights themselves.  For ternary weights it plays the role
    of TWN's threshold (Li et al. 2016, arXiv 1605.04711).

    Returns a float array of ``w``'s dtype with ``w``'s ndim (size 1 on the reduced axes); an
    all-zero unit gets ``0``.  Cost: ``candidates`` quantizations of ``w``.
    """
    check_bits("mse_weight_range", bits, 2, 8)
    if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) or candidates < 1:
        raise ValueError(f"candidates must be an int >= 1, got {candidates!r}")
    xp = check_float_array("mse_weight_range", w)
    if channel_axis is None:
        others = tuple(range(w.ndim))
    else:
        axis = channel_axis % w.ndim
        others = tuple(a for a in range(w.ndim) if a != axis)
    top = abs(w).max(axis=others, keepdims=True)
    m = w.dtype.type(2 ** (bits - 1) - 1)

    def error(alpha):
        safe = nonzero_scale(alpha)
        q = uniform_signed_codes(xp, w, safe, m) / m * safe
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
    bits = check_bits("mse_activation_range", bits, 1, 8)
    if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) or candidates < 1:
        raise ValueError(f"candidates must be an int >= 1, got {candidates!r}")
    xp = check_float_array("mse_activation_range", x)
    x = x.reshape(-1)
    # The top of the representable side: negatives of an unsigned quantizer clip to 0 whatever
    # the range, so they add the same error to every candidate.
    top = float((abs(x) if signed else x).max()) if x.size else 0.0
    if not top > 0:
        return 1.0

    def error(value):
        q = DoReFaActivation(bits, signed=signed, max_value=value).quantize_checked(xp, x)
        return float(((q - x).astype(np.float64) ** 2).sum())

    best_value, best_error = top, error(top)
    for j in range(int(candidates) - 1, 0, -1):  # from the max down: a tie keeps the larger range
        value = top * j / candidates
        err = error(value)
        if err < best_error:
            best_value, best_error = value, err
    return best_value


def round_significand(values, bits):
    """Round positive values to ``bits`` significant bits (float32)."""
    values = np.asarray(values, dtype=np.float64)
    mantissa, exponent = np.frexp(values)
    return np.ldexp(np.round(np.ldexp(mantissa, bits)), exponent - bits).astype(np.float32)
