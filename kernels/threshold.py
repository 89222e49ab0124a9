"""BatchNorm followed by sign, fused into a per-channel integer threshold that writes packed bits.

``bn_sign_threshold`` runs once per layer at conversion time; ``threshold_pack`` runs on every
inference and reads the int32 accumulators of ``xnor_gemm`` / ``binary_conv2d``.  Bit convention:
see ``lowbit.kernels``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from lowbit.backend import cupy

from ._checks import array_kind, check_contiguous, check_dtype, check_ndim, words_for
from ._intrinsics import threshold_word
from .pool import maxpool_int, pool_geometry

__all__ = ["bn_sign_threshold", "threshold_pack", "threshold_maxpool_pack", "threshold_signs"]

# Accumulators are int32, so a threshold only has to be exact on this range.
_ACC_MIN = -(2**31)
_ACC_MAX = 2**31 - 1
# Neighbour steps before falling back to bisection (the float candidate is off by at most a few).
_CORRECTION_STEPS = 8
# Rows per parallel work item of threshold_pack (amortises the per-item scratch buffer).
_ROWS_PER_CHUNK = 256


def _first_true(predicate, candidate):
    """Smallest integer a in [_ACC_MIN, _ACC_MAX + 1] where a monotone ``predicate`` holds.

    ``predicate`` maps an int64 array (one entry per channel) to a bool array and is False then
    True as ``a`` increases; ``_ACC_MAX + 1`` stands for "never".  Starts from ``candidate``, walks
    to the neighbouring integers, and bisects the channels that have not settled after
    ``_CORRECTION_STEPS`` steps.
    """
    first = np.clip(candidate, _ACC_MIN, _ACC_MAX + 1).astype(np.int64)
    for _ in range(_CORRECTION_STEPS):
        step_down = (first > _ACC_MIN) & predicate(first - 1)
        step_up = (first <= _ACC_MAX) & ~predicate(first)
        if not (step_down.any() or step_up.any()):
            return first
        first = first - step_down + step_up
    low = np.full_like(first, _ACC_MIN)
    high = np.full_like(first, _ACC_MAX + 1)
    while np.any(low < high):
        middle = (low + high) // 2
        holds = predicate(middle)
        high = np.where(holds, middle, high)
        low = np.where(holds, low, middle + 1)
    return low


def bn_sign_threshold(gamma, beta, mean, var, eps, dtype=np.float64, order="divide"):
    """Integer thresholds that reproduce ``sign(BatchNorm(acc))`` exactly on int32 accumulators.

    The reproduced function is, per channel c and with every operation rounded to ``dtype``::

        order="divide":   y = gamma[c] * (acc - mean[c]) / sqrt(var[c] + eps) + beta[c]
        order="inverse":  y = gamma[c] * ((acc - mean[c]) * (1 / sqrt(var[c] + eps))) + beta[c]
        bit = 1 if y >= 0 else 0          (sign(0) = +1, as in pack_signs)

    where ``acc`` is first converted to ``dtype`` and the five parameters are first rounded to
    ``dtype``.  ``y`` is monotone in ``acc`` (increasing for gamma > 0, decreasing for gamma < 0),
    so the bit is ``acc >= t`` or ``acc <= t`` for an integer ``t``.  ``t`` comes from the real root
    ``mean - beta * sqrt(var + eps) / gamma``, then is corrected by evaluating the formula above at
    the neighbouring integers, so it is exact, not approximate.  ``gamma == 0`` gives a constant
    bit (``beta >= 0``).

    The default (float64, "divide") is the reference definition.  To reproduce a float32
    training-time simulation bit for bit, pass its precision and order of operations:
    ``dtype=np.float32, order="inverse"`` is the evaluation-mode forward of
    ``lowbit.layers.BatchNorm`` (``gamma * ((x - running_mean) * inv_std) + beta``).  Another order
    can round differently near the boundary.

    Parameters
    ----------
    gamma, beta, mean, var : numpy.ndarray or cupy.ndarray, float, shape (C,)
        BatchNorm scale, shift, running mean and running variance, all finite; ``var + eps > 0``.
    eps : float
        BatchNorm epsilon.
    dtype : {numpy.float64, numpy.float32}, default float64
        Precision in which the reproduced formula is evaluated.
    order : {"divide", "inverse"}, default "divide"
        Order of operations of the reproduced formula (see above).

    Returns
    -------
    threshold : same kind as ``gamma``, int64, shape (C,)
        In [-2**31 - 1, 2**31]; the values past the int32 range mean "always" or "never".
    direction : same kind as ``gamma``, int8, shape (C,)
        +1 (bit = acc >= threshold) or -1 (bit = acc <= threshold).
    """
    arrays = {"gamma": gamma, "beta": beta, "mean": mean, "var": var}
    kind = array_kind(**arrays)
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float64), np.dtype(np.float32)):
        raise TypeError(f"dtype must be float64 or float32, got {dtype.name}")
    if order not in ("divide", "inverse"):
        raise ValueError(f'order must be "divide" or "inverse", got {order!r}')
    host = {}
    for name, arr in arrays.items():
        if arr.dtype.kind != "f":
            raise TypeError(f"{name} must have a float dtype, got {arr.dtype.name}")
        check_ndim(name, arr, 1, "(C,)")
        if arr.shape != gamma.shape:
            raise ValueError(
                f"{name} must have the shape of gamma {tuple(gamma.shape)}, got {tuple(arr.shape)}"
            )
        values = cupy.asnumpy(arr) if kind == "cupy" else arr
        if not np.all(np.isfinite(values)):
            where = np.flatnonzero(~np.isfinite(values))[:8]
            raise ValueError(f"{name} must be finite, got non-finite values at indices {where}")
        host[name] = values.astype(dtype)
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, (int, float, np.integer, np.floating)):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    scale_gamma, shift, center = host["gamma"], host["beta"], host["mean"]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        std = np.sqrt(host["var"] + dtype.type(eps))
    if not np.all(np.isfinite(std) & (std > 0)):
        raise ValueError("var + eps must be positive and finite for every channel")
    with np.errstate(over="ignore", divide="ignore"):
        inverse_std = dtype.type(1) / std

    def normalized(acc):
        with np.errstate(over="ignore", invalid="ignore"):
            if order == "inverse":
                return scale_gamma * ((acc.astype(dtype) - center) * inverse_std) + shift
            return scale_gamma * (acc.astype(dtype) - center) / std + shift

    positive = scale_gamma > 0
    # First accumulator whose bit differs from the bit at -infinity: y >= 0 for gamma > 0, y < 0 for
    # gamma < 0.
    def flips(acc):
        y = normalized(acc)
        return np.where(positive, y >= 0, y < 0)

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        safe_gamma = np.where(scale_gamma == 0, 1.0, scale_gamma.astype(np.float64))
        root = center.astype(np.float64) - shift.astype(np.float64) * std.astype(np.float64) / safe_gamma
    root = np.nan_to_num(root, nan=0.0, posinf=2.0**32, neginf=-(2.0**32))
    candidate = np.where(positive, np.ceil(root), np.floor(root) + 1)
    first = _first_true(flips, candidate)
    threshold = np.where(positive, first, first - 1)
    direction = np.where(scale_gamma < 0, -1, 1).astype(np.int8)
    constant = scale_gamma == 0
    threshold = np.where(constant, np.where(shift >= 0, _ACC_MIN, _ACC_MAX + 1), threshold).astype(np.int64)
    if kind == "cupy":
        return cupy.asarray(threshold), cupy.asarray(direction)
    return threshold, direction


def _check_thresholds(values, threshold, direction, channels, threshold_dtype):
    """Checks of the per-channel ``threshold`` (``threshold_dtype``) and ``direction`` (int8, +-1) that
    go with ``values`` (the description of the array they apply to, for the messages)."""
    check_dtype("threshold", threshold, threshold_dtype)
    check_dtype("direction", direction, np.int8)
    for name, arr in (("threshold", threshold), ("direction", direction)):
        check_ndim(name, arr, 1, "(C,)")
        if arr.shape[0] != channels:
            raise ValueError(
                f"{name} must have shape (C,) = ({channels},) to match {values}, "
                f"got {tuple(arr.shape)}"
            )
        check_contiguous(name, arr)
    if not bool(((direction == 1) | (direction == -1)).all()):
        raise ValueError("direction must hold only +1 and -1")


@njit(parallel=True, cache=True)
def _threshold_pack_cpu(acc, threshold, direction, packed):
    """``threshold`` / ``direction`` are padded to ``64 * words`` channels (see ``_padded``)."""
    rows, channels = acc.shape
    words = packed.shape[1]
    full_words = channels // 64
    chunks = (rows + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK
    for chunk in prange(chunks):
        tail = np.zeros(64, dtype=np.int32)
        for row in range(chunk * _ROWS_PER_CHUNK, min(rows, (chunk + 1) * _ROWS_PER_CHUNK)):
            for w in range(full_words):
                packed[row, w] = threshold_word(acc, row * channels + w * 64, threshold, direction, w * 64)
            if full_words < words:
                start = full_words * 64
                for c in range(channels - start):
                    tail[c] = acc[row, start + c]
                packed[row, full_words] = threshold_word(tail, 0, threshold, direction, start)


def _padded(threshold, direction):
    """Thresholds and directions padded to a whole number of 64-channel words with "never" (so the
    vector compare of ``threshold_word`` serves the last, partial word too and leaves its padding
    bits 0)."""
    channels = threshold.shape[0]
    extra = -channels % 64
    if extra == 0:
        return threshold, direction
    return (np.concatenate([threshold, np.full(extra, np.int64(2) ** 40)]),
            np.concatenate([direction, np.ones(extra, np.int8)]))


@njit(cache=True)
def _int32_bounds_cpu(threshold, direction, bounds, flips, valids):
    low, high = np.int64(-(2**31)), np.int64(2**31 - 1)
    bounds[:] = high
    flips[:] = 0
    valids[:] = 0
    for c in range(threshold.shape[0]):
        up = direction[c] > 0
        bound = threshold[c] if up else threshold[c] + 1  # acc <= t is NOT acc >= t + 1
        flip, valid = not up, True
        if bound > high:      # acc >= bound for no int32 acc
            if up:
                valid = False     # constant 0
            else:
                flip = False      # acc <= t always: (acc >= low) = 1, not flipped
            bound = low
        elif bound < low:     # acc >= bound for every int32 acc
            bound = low
        bounds[c] = bound
        bit = np.uint64(1) << np.uint64(c & 63)
        if flip:
            flips[c >> 6] |= bit
        if valid:
            valids[c >> 6] |= bit


def int32_bounds(threshold, direction):
    """``(bounds, flips, valids)`` for ``_intrinsics.threshold_word32``, from int64 thresholds and
    +-1 directions of C channels (numpy).

    ``bounds`` int32 (64 * words,), ``flips`` and ``valids`` uint64 (words,): bit c of the word is
    ``(acc >= bounds[c]) XOR flip_c`` for ``valid_c``, 0 past C.  ``acc <= t`` is
    ``NOT (acc >= t + 1)``; thresholds beyond the int32 range become constant bits (an int32 ``acc``
    is always above or below them), so the bits equal ``threshold_pack``'s for every int32 ``acc``.
    """
    words = words_for(threshold.shape[0])
    bounds = np.empty(64 * words, dtype=np.int32)
    flips = np.empty(words, dtype=np.uint64)
    valids = np.empty(words, dtype=np.uint64)
    _int32_bounds_cpu(threshold, direction, bounds, flips, valids)
    return bounds, flips, valids


def threshold_pack(acc, threshold, direction):
    """Apply per-channel integer thresholds to accumulators and pack the resulting sign bits.

    Parameters
    ----------
    acc : numpy.ndarray or cupy.ndarray, int32, shape (..., C)
        Accumulators (the output of ``xnor_gemm`` or ``binary_conv2d``), C-contiguous.
    threshold : same kind, int64, shape (C,)
    direction : same kind, int8, shape (C,), values +1 or -1
        From :func:`bn_sign_threshold`.

    Returns
    -------
    packed : same kind, uint64, shape (..., ceil(C / 64))
        Bit ``c`` is ``direction[c] * acc[..., c] >= direction[c] * threshold[c]``; padding bits 0.
    """
    kind = array_kind(acc=acc, threshold=threshold, direction=direction)
    check_dtype("acc", acc, np.int32)
    if acc.ndim < 1:
        raise ValueError("acc must have at least 1 dimension (..., C), got a 0-D array")
    check_contiguous("acc", acc)
    channels = acc.shape[-1]
    _check_thresholds(f"acc {tuple(acc.shape)}", threshold, direction, channels, np.int64)
    rows = 1
    for extent in acc.shape[:-1]:
        rows *= extent
    out_shape = acc.shape[:-1] + (words_for(channels),)
    if kind == "cupy":
        from . import _cuda

        return _cuda.threshold_pack(acc.reshape(rows, channels), threshold, direction).reshape(out_shape)
    packed = np.empty((rows, words_for(channels)), dtype=np.uint64)
    if packed.size:
        _threshold_pack_cpu(acc.reshape(rows, channels), *_padded(threshold, direction), packed)
    return packed.reshape(out_shape)


@njit(parallel=True, cache=True)
def _threshold_maxpool_cpu(acc, threshold, direction, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                           packed):
    batch, height, width, channels = acc.shape
    out_h, out_w, words = packed.shape[1], packed.shape[2], packed.shape[3]
    for image_row in prange(batch * out_h):
        image = image_row // out_h
        oy = image_row - image * out_h
        y_start = max(oy * stride_h - pad_h, 0)
        y_stop = min(oy * stride_h - pad_h + kernel_h, height)
        pooled = np.zeros(words * 64, dtype=np.int32)
        for ox in range(out_w):
            x_start = max(ox * stride_w - pad_w, 0)
            x_stop = min(ox * stride_w - pad_w + kernel_w, width)
            for c in range(channels):
                pooled[c] = acc[image, y_start, x_start, c]
            for iy in range(y_start, y_stop):
                for ix in range(x_start, x_stop):
                    for c in range(channels):
                        pooled[c] = max(pooled[c], acc[image, iy, ix, c])
            for w in range(words):
                packed[image, oy, ox, w] = threshold_word(pooled, w * 64, threshold, direction, w * 64)


def threshold_maxpool_pack(acc, threshold, direction, kernel, stride=None, padding=0):
    """Max-pool int32 accumulators, then threshold and pack them: one pass, exactly
    ``threshold_pack(maxpool(acc), threshold, direction)``.

    Parameters
    ----------
    acc : numpy.ndarray or cupy.ndarray, int32, shape (N, H, W, C)
        NHWC accumulators (the output of ``binary_conv2d``), C-contiguous.
    threshold : same kind, int64, shape (C,)
    direction : same kind, int8, shape (C,), values +1 or -1
        As for :func:`threshold_pack`.
    kernel, stride, padding
        As for :func:`~lowbit.kernels.maxpool_packed`: padded positions are ignored (as if -inf),
        and the padding must be smaller than the kernel.

    Returns
    -------
    packed : same kind, uint64, shape (N, OH, OW, ceil(C / 64))
        Bit ``c`` of position ``(oy, ox)`` is ``direction[c] * m >= direction[c] * threshold[c]``
        with ``m`` the max of ``acc[..., c]`` over the window; padding bits 0.
    """
    kind = array_kind(acc=acc, threshold=threshold, direction=direction)
    check_dtype("acc", acc, np.int32)
    check_ndim("acc", acc, 4, "(N, H, W, C)")
    check_contiguous("acc", acc)
    batch, height, width, channels = acc.shape
    _check_thresholds(f"acc {tuple(acc.shape)}", threshold, direction, channels, np.int64)
    kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w = pool_geometry(
        "acc", acc, kernel, stride, padding)
    if kind == "cupy":  # not fused on the GPU: a max over strided views (CuPy), then the CUDA threshold
        return threshold_pack(maxpool_int(acc, kernel, stride, padding), threshold, direction)
    packed = np.empty((batch, out_h, out_w, words_for(channels)), dtype=np.uint64)
    if packed.size and channels:
        _threshold_maxpool_cpu(acc, *_padded(threshold, direction), kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                               packed)
    return packed


@njit(parallel=True, cache=True)
def _threshold_signs_cpu(x, channels_first, threshold, direction, packed):
    """x C-contiguous float32, (N, C, P), or (C, N, P) when ``channels_first`` -> packed (N, P, words);
    returns the number of NaNs seen.  Each channel's P values are one contiguous row (vectorised)."""
    if channels_first:
        channels, batch, positions = x.shape
    else:
        batch, channels, positions = x.shape
    words = packed.shape[2]
    nans = np.zeros(batch, dtype=np.int64)
    for image in prange(batch):
        out = packed[image]
        # One word of every position at a time, gathered in a contiguous buffer: the inner loop
        # then reads one channel's row and updates the buffer at unit stride (vectorised), where
        # out[p, word] would be strided by the word count.
        local = np.empty(positions, dtype=np.uint64)
        count = 0
        for word in range(words):
            local[:] = 0
            for c in range(word * 64, min(channels, word * 64 + 64)):
                row = x[c, image] if channels_first else x[image, c]
                shift = np.uint64(c & 63)
                t = threshold[c]
                up = direction[c] > 0  # loop-invariant: LLVM unswitches the loop on it
                for p in range(positions):
                    v = row[p]
                    count += v != v
                    local[p] |= np.uint64((v >= t) if up else (v <= t)) << shift
            for p in range(positions):
                out[p, word] = local[p]
        nans[image] = count
    return nans.sum()


def threshold_signs(x, threshold, direction):
    """Per-channel float thresholds on channels-first float32 values, packed channels-last.

    The float counterpart of :func:`threshold_pack`, for a sign that follows float layers: with
    ``threshold = 0`` and ``direction = +1`` it is ``pack_signs`` of ``x`` moved to channels-last
    (NCHW -> NHWC, the transpose and the pack in one pass); other thresholds reproduce a monotone
    per-channel function followed by sign, such as BatchNorm (``lowbit.convert`` derives them).

    Parameters
    ----------
    x : numpy.ndarray or cupy.ndarray, float32, shape (N, C) or (N, C, H, W)
        No NaN.  C-contiguous, or the NCHW view of a C-contiguous CNHW buffer (what convolutions
        return), both read in place; other strides are copied first.
    threshold : same kind, float32, shape (C,)
        NaN means the bit is never set.
    direction : same kind, int8, shape (C,), values +1 or -1

    Returns
    -------
    packed : same kind, uint64, shape (N, ceil(C / 64)) or (N, H, W, ceil(C / 64))
        Bit ``c`` is ``x[:, c] >= threshold[c]`` where ``direction[c] = +1``, ``x[:, c] <=
        threshold[c]`` where it is -1 (IEEE comparisons: -0.0 == 0.0); padding bits 0.

    Raises
    ------
    ValueError
        ``x`` holds NaN (it has no sign, as in ``pack_signs``), or a shape does not match.
    """
    kind = array_kind(x=x, threshold=threshold, direction=direction)
    check_dtype("x", x, np.float32)
    if x.ndim not in (2, 4):
        raise ValueError(f"x must be 2-D (N, C) or 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    channels = x.shape[1]
    _check_thresholds(f"x {tuple(x.shape)}", threshold, direction, channels, np.float32)
    spatial = x.shape[2:]
    out_shape = (x.shape[0],) + spatial + (words_for(channels),)
    if kind == "cupy":
        from .pack import pack_signs

        if bool(cupy.isnan(x).any()):
            raise ValueError("x holds NaN, which has no sign")
        shape = (1, channels) + (1,) * len(spatial)
        t, d = threshold.reshape(shape), direction.reshape(shape)
        bits = cupy.where(d > 0, x >= t, x <= t)
        moved = bits.transpose((0,) + tuple(range(2, x.ndim)) + (1,)) if spatial else bits
        return pack_signs(cupy.ascontiguousarray(moved).astype(cupy.int8) * 2 - 1)
    packed = np.empty(out_shape, dtype=np.uint64)
    if packed.size == 0:
        return packed
    positions = int(np.prod(spatial)) if spatial else 1
    x3 = x.reshape(x.shape[0], channels, positions)  # a view unless (H, W) cannot be one axis
    channels_first = not x3.flags.c_contiguous and x3.transpose(1, 0, 2).flags.c_contiguous
    if channels_first:  # the (C, N, P) buffer of a convolution's output, read as it lies
        x3 = x3.transpose(1, 0, 2)
    elif not x3.flags.c_contiguous:
        x3 = np.ascontiguousarray(x3)
    nans = _threshold_signs_cpu(x3, channels_first, threshold, direction,
                                packed.reshape(x.shape[0], positions, -1))
    if nans:
        raise ValueError(f"x holds {nans} NaN values, which have no sign")
    return packed
