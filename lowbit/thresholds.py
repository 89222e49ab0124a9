"""The thresholds :func:`lowbit.convert.convert` derives: where the simulation's sign flips.

Every function here evaluates the model's own layer objects (evaluation mode) on the values that
can reach them and reads the threshold off the result; nothing is re-derived by formula (see
:mod:`lowbit.convert`).

* :func:`binary_kernel`: the ``+-alpha`` form of a binary layer's kernel, and whether every sum of
  the simulation's float32 product is exact (so the layer can run on packed bits).
* :func:`evaluate_chain` and :func:`integer_thresholds`: the bit of every integer accumulator
  ``-K..K`` of a binary layer and the per-channel threshold and direction that reproduce it;
  :func:`non_decreasing_after` tests the order a max-pool in the chain needs.
* :func:`float_thresholds`: per-channel float32 thresholds of the layers just before the first
  sign (a bisection over the float32 values in order).
* :func:`bitplane_thresholds`: integer thresholds on the bit-plane sum of a binary first layer on
  8-bit pixel codes.

Each raises :class:`NotFusable` when the layers do not give a threshold (the converter then keeps
them as float stages).
"""
from __future__ import annotations

import numpy as np

from .backend import to_numpy
from .packed import kernel_channel_axis
from .quant_layers import QuantAffine, QuantConv2D

__all__ = ["BinaryKernel", "GRID_ELEMENTS", "NotFusable", "binary_kernel", "bitplane_thresholds", "evaluate_chain", "float_thresholds",
           "integer_thresholds", "non_decreasing_after"]

#: Rows of an evaluation grid evaluated at once (times the channel count): bounds the memory.
GRID_ELEMENTS = 1 << 21


class NotFusable(Exception):
    """The layers after a binary layer (or before a sign) cannot become a threshold; the message says why."""


def _exact_multiples(alpha, fan_in):
    """True when every ``j * alpha[c]`` with ``|j| <= fan_in`` is exactly a float32."""
    if fan_in >= 2 ** 24:
        return False
    alpha = np.asarray(alpha, dtype=np.float32)
    if np.all(alpha == 1):
        return True
    largest = alpha.astype(np.float64) * fan_in
    if np.any(alpha < np.finfo(np.float32).tiny) or np.any(largest >= np.finfo(np.float32).max):
        return False
    mantissa, _ = np.frexp(alpha.astype(np.float64))
    significand = (mantissa * 2.0 ** 24).astype(np.int64)  # 24-bit integer significand
    lowest = significand & -significand
    significant_bits = 24 - np.log2(lowest).astype(np.int64)
    return bool(np.all(significant_bits + int(fan_in).bit_length() <= 24))


class BinaryKernel:
    """The +-alpha form of a binary kernel: ``w_eff`` (layer layout), ``alpha`` (O,) or None, fan-in."""

    def __init__(self, w_eff, alpha, fan_in, exact):
        self.w_eff, self.alpha, self.fan_in, self.exact = w_eff, alpha, fan_in, exact


def binary_kernel(layer):
    """A :class:`BinaryKernel` when ``layer``'s effective kernel is +-alpha per output unit."""
    if not isinstance(layer, (QuantAffine, QuantConv2D)) or not layer.kernel_quantizer.packed_encoding().binary:
        return None
    w_eff = np.asarray(to_numpy(layer.quantized_kernel(train=False)))
    if w_eff.dtype != np.float32:
        return None
    axis = kernel_channel_axis(layer)
    moved = np.moveaxis(w_eff, axis, 0).reshape(w_eff.shape[axis], -1)
    magnitude = np.abs(moved)
    alpha = magnitude.max(axis=1)
    rebuilt = np.where(moved >= 0, alpha[:, None], -alpha[:, None]).astype(np.float32)
    if not np.array_equal(rebuilt.view(np.uint32), moved.view(np.uint32)):
        return None  # not +-alpha_c (or a -0.0 from alpha_c = 0)
    fan_in = moved.shape[1]
    scaled = not np.all(alpha == 1)
    return BinaryKernel(w_eff, alpha.astype(np.float32) if scaled else None, fan_in,
                         _exact_multiples(alpha, fan_in))


def evaluate_chain(layer, kernel, before, after, terminal, spatial, keep_pre):
    """Bits (2K+1, O) of the simulation's sign for every accumulator -K..K, by running its layers.

    Also returns the values just before the pool (``keep_pre``) for the pool's monotonicity test.
    """
    fan_in = kernel.fan_in
    out_channels = layer.out_channels if spatial else layer.out_features
    rows_total = 2 * fan_in + 1
    bits = np.empty((rows_total, out_channels), dtype=bool)
    pre = np.empty((rows_total, out_channels), dtype=np.float32) if keep_pre else None
    step = max(1, GRID_ELEMENTS // out_channels)
    scale = kernel.alpha if kernel.alpha is not None else np.ones(out_channels, np.float32)
    for start in range(0, rows_total, step):
        stop = min(rows_total, start + step)
        acc = np.arange(start - fan_in, stop - fan_in, dtype=np.float32)
        # The simulation's product value for accumulator j: exactly j * alpha (checked), then + bias.
        v = acc[:, None] * scale[None, :]
        if layer.bias:
            v = v + layer.b
        if spatial:
            v = v.reshape(stop - start, out_channels, 1, 1)
        for op in before:
            v = op.forward(v, train=False)
        if keep_pre:
            pre[start:stop] = v.reshape(stop - start, out_channels)
        for op in after:
            v = op.forward(v, train=False)
        q = np.asarray(terminal(v, train=False)).reshape(stop - start, out_channels)
        if not np.all((q == 1) | (q == -1)):
            raise NotFusable("the sign quantizer returned values other than +-1")
        bits[start:stop] = q == 1
    return bits, pre


def integer_thresholds(bits, fan_in):
    """Threshold (int64) and direction (int8) per channel reproducing monotone ``bits`` (2K+1, C)."""
    up = np.all(bits[1:] >= bits[:-1], axis=0)
    down = np.all(bits[1:] <= bits[:-1], axis=0)
    if not np.all(up | down):
        bad = np.flatnonzero(~(up | down))
        raise NotFusable(f"the sign is not monotone in the accumulator for channels {bad[:5].tolist()}")
    count = bits.sum(axis=0).astype(np.int64)
    # up: bits are 0..0 1..1, the first 1 at accumulator K + 1 - count (K + 1: never; -K: always).
    # down: bits are 1..1 0..0, the last 1 at accumulator count - 1 - K.
    threshold = np.where(up, fan_in + 1 - count, count - 1 - fan_in).astype(np.int64)
    direction = np.where(up, 1, -1).astype(np.int8)
    acc = np.arange(-fan_in, fan_in + 1, dtype=np.int64)[:, None]
    if not np.array_equal((acc - threshold) * direction >= 0, bits):  # belt and braces
        raise NotFusable("internal error: thresholds do not reproduce the evaluated bits")
    return threshold, direction


def non_decreasing_after(pre, bits):
    order = np.argsort(pre, axis=0, kind="stable")
    ordered = np.take_along_axis(bits, order, axis=0)
    return bool(np.all(ordered[1:] >= ordered[:-1]))


def _float_keys(values):
    """float32 -> int64 keys in the order of the floats (-0.0 just below +0.0; NaN not allowed)."""
    bits = np.asarray(values, dtype=np.float32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)


def _key_floats(keys):
    """The inverse of :func:`_float_keys`."""
    keys = np.asarray(keys, dtype=np.int64)
    bits = np.where(keys < 0, (-(keys + 1)) | np.int64(-(2 ** 31)), keys)
    return bits.astype(np.int32).view(np.float32)


def _signs_after(ops, terminal, v, shape, allow_nan=False):
    """The bits (``shape``) of the simulation's sign ``terminal(ops(v))``, in evaluation mode.

    NaN before the sign raises :class:`NotFusable`, or gives None with ``allow_nan``.
    """
    with np.errstate(all="ignore"):
        for op in ops:
            v = op.forward(v, train=False)
        v = np.asarray(to_numpy(v))
        if np.isnan(v).any():
            if allow_nan:
                return None
            raise NotFusable("the layers before the sign give NaN")
        q = np.asarray(to_numpy(terminal(v, train=False))).reshape(shape)
    if not np.all((q == 1) | (q == -1)):
        raise NotFusable("the sign quantizer returned values other than +-1")
    return q == 1


def _bisect(bits_at, lowest, highest, at_low, at_high):
    """Bisection over the integer keys ``[lowest, highest]`` of bits that are monotone per channel.

    ``bits_at`` maps keys (1, C) to bits (1, C); ``at_low`` / ``at_high`` are the bits at the two ends.
    Returns ``(low, high, down, varies)``: where the bit changes, ``low`` is the last key with the
    low end's bit and ``high`` the first with the other; ``down`` marks bits that fall (1 then 0).
    """
    down = at_low & ~at_high
    varies = at_low != at_high
    low = np.full(at_low.shape, lowest, np.int64)
    high = np.full(at_low.shape, highest, np.int64)
    while np.any(varies & (high - low > 1)):
        middle = (low + high) // 2
        on = bits_at(middle[None, :])[0] ^ down  # direction-corrected: 0 then 1
        high = np.where(varies & on, middle, high)
        low = np.where(varies & ~on, middle, low)
    return low, high, down, varies


def _probes(edge, lowest, highest, special=()):
    """Keys (R, C) that check derived thresholds: each channel's ``edge`` +-64, the ``special`` keys and
    256 random keys of the range, all clipped to ``[lowest, highest]``."""
    channels = edge.shape[0]
    rows = [edge[None, :] + np.arange(-64, 65)[:, None]]
    if len(special):
        rows.append(np.broadcast_to(np.asarray(special, np.int64)[:, None], (len(special), channels)))
    rows.append(np.random.default_rng(0).integers(lowest, highest + 1, size=(256, channels)))
    return np.clip(np.concatenate(rows, axis=0), lowest, highest)


def float_thresholds(ops, terminal, channels, spatial):
    """Float32 thresholds (C,) and directions (C,) that reproduce ``terminal(ops(x))`` per channel.

    ``ops`` are per-channel float32 layers that are monotone in each element (BatchNorm, ReLU,
    Rescale: each float32 operation rounds monotonically), so the sign after them is a threshold on
    ``x`` in float order.  The layers themselves are evaluated (evaluation mode, shape ``(R, C)`` or
    ``(R, C, 1, 1)``): at both ends of the domain for the direction, then a bisection over the
    float32 values in order, then a check on the neighbours of every threshold, signed zeros and
    random values.  A constant channel gets threshold -inf (always 1) or NaN (never).  The domain is
    the widest of +-3.4e38, +-1e30, ..., +-1e5 on which the layers give no NaN (an overflow times a
    zero gamma); outside it the simulation has no sign to give (its quantizer refuses NaN).
    """
    def bits(keys, allow_nan=False):
        keys = np.asarray(keys, dtype=np.int64)
        out = np.empty(keys.shape, dtype=bool)
        step = max(1, GRID_ELEMENTS // channels)
        for start in range(0, keys.shape[0], step):
            part = keys[start:start + step]
            v = _key_floats(part)
            if spatial:
                v = v.reshape(part.shape[0], channels, 1, 1)
            part_bits = _signs_after(ops, terminal, v, part.shape, allow_nan)
            if part_bits is None:
                return None
            out[start:start + step] = part_bits
        return out

    # The domain: the widest symmetric range on which the layers give numbers (0 * inf = NaN where an
    # overflow meets a zero gamma); beyond it the simulation itself has no sign to give.
    for limit in (np.finfo(np.float32).max, 1e30, 1e20, 1e10, 1e5):
        lowest, highest = _float_keys([-limit, limit])
        ends = bits(np.array([[lowest] * channels, [highest] * channels]), allow_nan=True)
        if ends is not None:
            break
    else:
        raise NotFusable("the layers before the sign give NaN on moderate inputs")
    at_low = ends[0]
    low, high, down, varies = _bisect(bits, lowest, highest, at_low, ends[1])
    threshold = np.where(down, _key_floats(low), _key_floats(high)).astype(np.float32)
    threshold = np.where(varies, threshold, np.where(at_low, np.float32(-np.inf), np.float32(np.nan)))
    threshold = threshold.astype(np.float32)
    direction = np.where(down, -1, 1).astype(np.int8)
    # belt and braces: every threshold's neighbourhood, the special values, random values
    keys = _probes(np.where(down, low, high), lowest, highest, _float_keys([0.0, -0.0, 1.0, -1.0]))
    x = _key_floats(keys)
    with np.errstate(invalid="ignore"):
        expected = np.where(direction > 0, x >= threshold, x <= threshold)
    if not np.array_equal(bits(keys), expected):
        raise NotFusable("float thresholds do not reproduce the layers before the sign")
    return threshold, direction


def bitplane_thresholds(kernel, ops, terminal, bits):
    """Thresholds on ``T = 2 * codes . w - L * sum(w)`` (``L = 2^bits - 1``) for :class:`BitplaneDenseStage`.

    After :class:`~lowbit.layers.PixelCodes` the layer sums ``(2 p_k - L) / 2^bits * w_k``, all
    multiples of ``2^-bits`` (checked small enough by the caller), so the simulation's float32 value
    is exactly ``T / 2^bits``.  The per-channel ``ops`` and the sign ``terminal`` (the model's own
    layers) are evaluated on it, and a bisection over the integers ``|T| <= L * K`` finds each
    channel's threshold (the composition is monotone in T); checked again around every threshold.
    """
    levels = 2 ** int(bits) - 1
    channels = kernel.w_eff.shape[1]

    def bits_at(totals):
        totals = np.asarray(totals, dtype=np.int64)
        y = (totals.astype(np.float64) * 2.0 ** -int(bits)).astype(np.float32)  # exact
        return _signs_after(ops, terminal, y, totals.shape)

    lowest, highest = -levels * kernel.fan_in, levels * kernel.fan_in
    at_low = bits_at(np.full((1, channels), lowest))[0]
    at_high = bits_at(np.full((1, channels), highest))[0]
    low, high, down, varies = _bisect(bits_at, lowest, highest, at_low, at_high)
    # bit = direction * (T - threshold) >= 0; a constant channel: always (lowest) or never (highest + 1)
    threshold = np.where(down, low, high)
    threshold = np.where(varies, threshold, np.where(at_low, lowest, highest + 1)).astype(np.int64)
    direction = np.where(down, -1, 1).astype(np.int8)
    probes = _probes(np.where(down, low, high), lowest, highest)
    if not np.array_equal(bits_at(probes), (probes - threshold) * direction >= 0):
        raise NotFusable("the sign is not monotone in the bit-plane sum")
    return threshold, direction
