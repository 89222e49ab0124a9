"""Float32 convolution with few input channels (a first layer on gray or RGB images), on the CPU.

:mod:`lowbit.kernels.float_conv` blocks its registers over input channels, which a layer with one
to four input channels leaves mostly empty.  These kernels vectorise over output pixels instead:
each image is copied once into a zero-padded channels-first plane ``(C, HP, WP)``, and for one
output channel the values at flat positions ``q = oh * WP + ow`` (``q < (OH - 1) * WP + OW``) are

    out[q] = sum over (c, i, j) of  w[o, c, i, j] * padded[c, stride * q + i * WP + j]

one contiguous loop over ``q`` (unit stride for stride 1), with the ``C * KH * KW`` taps unrolled
(they are compile-time constants: drivers compiled per ``(C, KH, KW, stride)``), two output channels
per loop sharing each input load, and the sums in registers.  Positions with ``ow >= OW`` are computed and dropped (``(WP - OW) / WP`` of the work:
7% for a 3 x 3, padding-1 convolution of 28 x 28 images; about half for stride 2).

Arithmetic (the same in both kernels: both inline one helper, :func:`_channels`): every output
value is ``acc = 0; for c, i, j (in that order): acc = acc + w * x``, then ``acc + bias``, a
separate float32 multiply and add (Numba without ``fastmath`` does not contract them into fused
multiply-adds).  The values agree with the im2col reference of ``lowbit.functions`` (a BLAS GEMM,
whose order of summation is BLAS's) to float32 rounding, not bit for bit; the two kernels here
agree with each other bit for bit.

* :func:`few_channel_conv2d` writes float32 in the memory layout of the im2col path,
  ``(O, N, OH, OW)``, and returns its ``(N, O, OH, OW)`` view;
* :func:`few_channel_conv2d_threshold` writes, instead of the floats, the packed channels-last
  sign bits that ``threshold_signs(out, threshold, direction)`` would give for them (bit ``o`` is
  ``out >= threshold[o]`` for direction +1, ``out <= threshold[o]`` for -1; the bit convention of
  :mod:`lowbit.kernels`): a first convolution and the BatchNorm + sign after it in one pass.

Both are parallel over images on the thread count of ``lowbit.kernels.float_ops.set_threads``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._checks import check_dtype, check_float32_array, check_int, conv_output_size, words_for
from .float_ops import _parallel
from .threshold import _check_thresholds

__all__ = ["few_channel_conv2d", "few_channel_conv2d_threshold"]


@njit(inline="always", error_model="numpy")
def _channels(padded, padded_width, weights, bias, has_bias, first, second, values, second_values, threshold,
              direction, bits, channels, kernel_h, kernel_w, stride):
    """Output channels ``first`` and ``second`` (the same channel twice for a lone last one) of one
    image at the flat positions ``q < length`` (the module docstring): written as float32 into
    ``values`` and ``second_values`` (when ``bits`` is empty), or else as bits ``first % 64`` and
    ``second % 64`` of ``bits[q]`` (set where the value is ``>= threshold[o]`` for ``direction[o] >
    0``, ``<=`` otherwise); returns the number of NaN values seen in bit mode.

    The one place the arithmetic is written, so that both drivers give the same values; two channels
    share each input load.  Inlined by Numba into drivers (:func:`_make_kernels`) whose ``channels,
    kernel_h, kernel_w, stride`` are compile-time constants: the tap loops then unroll, LLVM unswitches
    the loop-invariant branches and vectorises each loop over ``q``.  (Drivers that call a jitted
    closure instead are not cached on disk by Numba, and a call per value is not inlined.)"""
    # unsigned offsets: Numba then skips its negative-index wraparound, which would turn the loads
    # into gathers
    plane_size = np.uint64(padded.size // channels)
    row = np.uint64(padded_width)
    floats = bits.size == 0
    length = values.size if floats else bits.size
    bit = np.uint64(1) << np.uint64(first & 63)
    second_bit = np.uint64(1) << np.uint64(second & 63)
    limit, second_limit = threshold[first], threshold[second]
    up, second_up = direction[first] > 0, direction[second] > 0
    second_nan = 1 if second != first else 0
    count = 0
    for q in range(length):
        start = np.uint64(stride) * np.uint64(q)
        total = np.float32(0.0)
        second_total = np.float32(0.0)
        for c in range(channels):
            for i in range(kernel_h):
                for j in range(kernel_w):
                    x = padded[np.uint64(c) * plane_size + np.uint64(i) * row + np.uint64(j) + start]
                    total = total + weights[first, c, i, j] * x
                    second_total = second_total + weights[second, c, i, j] * x
        if has_bias:
            total = total + bias[first]
            second_total = second_total + bias[second]
        if floats:
            values[q] = total
            second_values[q] = second_total
        else:
            # both comparisons and a select (no branch on the direction inside the loop)
            passes = ((total >= limit) & up) | ((total <= limit) & (not up))
            second_passes = ((second_total >= second_limit) & second_up) | ((second_total <= second_limit) & (not second_up))
            bits[q] |= (bit if passes else np.uint64(0)) | (second_bit if second_passes else np.uint64(0))
            count += (1 if total != total else 0) + (second_nan if second_total != second_total else 0)
    return count


@njit(cache=True)
def _pad_image(x, image, padding, padded):
    """The zero-padded (C, HP, WP) planes of image ``image`` of ``x`` (N, C, H, W), flat."""
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    padded_width = np.uint64(width + 2 * padding)
    plane_size = np.uint64(height + 2 * padding) * padded_width
    padded[:] = 0.0
    for c in range(channels):
        for r in range(height):
            start = np.uint64(c) * plane_size + np.uint64(r + padding) * padded_width + np.uint64(padding)
            for col in range(width):
                padded[start + np.uint64(col)] = x[image, c, r, col]


def _make_kernels(channels, kernel_h, kernel_w, stride):
    """The two drivers for one ``(C, KH, KW, stride)``, compile-time constants (Numba caches each)."""

    @njit(parallel=True, cache=True, error_model="numpy")
    def convolve(x, weights, bias, has_bias, padding, out):
        """out (O, N, OH, OW) float32."""
        batch, _, height, width = x.shape
        outputs, _, out_h, out_w = out.shape
        padded_width = width + 2 * padding
        length = (out_h - 1) * padded_width + out_w
        no_threshold = np.zeros(outputs, dtype=np.float32)
        no_direction = np.ones(outputs, dtype=np.int8)
        for image in prange(batch):
            padded = np.empty(channels * (height + 2 * padding) * padded_width, dtype=np.float32)
            _pad_image(x, image, padding, padded)
            acc = np.empty(length, dtype=np.float32)
            second_acc = np.empty(length, dtype=np.float32)
            no_bits = np.empty(0, dtype=np.uint64)
            for o in range(0, outputs, 2):
                second = min(o + 1, outputs - 1)
                _channels(padded, padded_width, weights, bias, has_bias, o, second, acc, second_acc, no_threshold,
                          no_direction, no_bits, channels, kernel_h, kernel_w, stride)
                for channel, values in ((o, acc), (second, second_acc)):
                    target = out[channel, image]
                    for r in range(out_h):
                        target[r, :] = values[r * padded_width:r * padded_width + out_w]

    @njit(parallel=True, cache=True, error_model="numpy")
    def convolve_threshold(x, weights, bias, has_bias, padding, threshold, direction, out_h, out_w, packed):
        """packed (N, OH * OW, words) uint64: the sign bits of ``convolve``'s values; returns the
        number of NaN values met."""
        batch, _, height, width = x.shape
        outputs = weights.shape[0]
        words = packed.shape[2]
        padded_width = width + 2 * padding
        length = (out_h - 1) * padded_width + out_w
        nans = np.zeros(batch, dtype=np.int64)
        for image in prange(batch):
            padded = np.empty(channels * (height + 2 * padding) * padded_width, dtype=np.float32)
            _pad_image(x, image, padding, padded)
            # one word of every flat position at a time (as threshold_signs does), then the OW
            # positions of each output row into the packed array
            local = np.empty(length, dtype=np.uint64)
            no_values = np.empty(0, dtype=np.float32)
            count = 0
            for word in range(words):
                local[:] = 0
                end = min(outputs, word * 64 + 64)
                for o in range(word * 64, end, 2):
                    count += _channels(padded, padded_width, weights, bias, has_bias, o, min(o + 1, end - 1), no_values,
                                       no_values, threshold, direction, local, channels, kernel_h, kernel_w, stride)
                for r in range(out_h):
                    for col in range(out_w):
                        packed[image, r * out_w + col, word] = local[r * padded_width + col]
            nans[image] = count
        return nans.sum()

    return convolve, convolve_threshold


_kernel_cache = {}


def _kernels(channels, kernel_h, kernel_w, stride):
    key = (channels, kernel_h, kernel_w, stride)
    if key not in _kernel_cache:
        _kernel_cache[key] = _make_kernels(*key)
    return _kernel_cache[key]


def _check_operands(x, weight, bias, stride, padding):
    """Checks shared by both functions; returns ``(stride, padding, out_h, out_w, has_bias, bias)``."""
    check_float32_array("x", x, 4)
    check_float32_array("weight", weight, 4)
    stride = check_int("stride", stride, 1)
    padding = check_int("padding", padding, 0)
    outputs, channels, kernel_h, kernel_w = weight.shape
    if min(kernel_h, kernel_w) < 1:
        raise ValueError(f"weight must have a kernel of at least 1 x 1, got shape {weight.shape}")
    if x.shape[1] != channels:
        raise ValueError(f"x must have {channels} channels for weight of shape {weight.shape}, got shape {x.shape}")
    if channels == 0:
        raise ValueError(f"weight must have at least one input channel, got shape {weight.shape}")
    out_h = conv_output_size(x.shape[2], kernel_h, stride, padding, "x height")
    out_w = conv_output_size(x.shape[3], kernel_w, stride, padding, "x width")
    if bias is None:
        bias = np.zeros(max(outputs, 1), dtype=np.float32)
        has_bias = False
    else:
        if not isinstance(bias, np.ndarray):
            raise TypeError(f"bias must be a numpy array or None, got {type(bias).__module__}.{type(bias).__name__}")
        check_dtype("bias", bias, np.float32)
        if bias.shape != (outputs,):
            raise ValueError(f"bias must have shape ({outputs},), got {tuple(bias.shape)}")
        bias = np.ascontiguousarray(bias)
        has_bias = True
    return stride, padding, out_h, out_w, has_bias, bias


def few_channel_conv2d(x, weight, bias, stride, padding):
    """Convolution (cross-correlation, zero padding) of ``x`` with ``weight``, vectorised over pixels.

    Parameters
    ----------
    x : numpy.ndarray, float32, (N, C, H, W), C-contiguous
        Meant for few channels (1 to 4); any number works, more slowly than ``float_conv``.
    weight : numpy.ndarray, float32, (O, C, KH, KW), C-contiguous
    bias : numpy.ndarray, float32, (O,), or None
    stride, padding : int
        ``stride >= 1``; zero padding on every side.

    Returns
    -------
    out : numpy.ndarray, float32, (N, O, OH, OW)
        The ``(N, O, OH, OW)`` view of a C-contiguous ``(O, N, OH, OW)`` buffer (the im2col path's
        layout); each value summed in the order of the module docstring.
    """
    stride, padding, out_h, out_w, has_bias, bias = _check_operands(x, weight, bias, stride, padding)
    outputs, channels, kernel_h, kernel_w = weight.shape
    out = np.empty((outputs, x.shape[0], out_h, out_w), dtype=np.float32)
    if out.size:
        convolve, _ = _kernels(channels, kernel_h, kernel_w, stride)
        _parallel(convolve, x, weight, bias, has_bias, padding, out)
    return out.transpose(1, 0, 2, 3)


def few_channel_conv2d_threshold(x, weight, bias, stride, padding, threshold, direction):
    """The sign bits of per-channel thresholds on :func:`few_channel_conv2d`'s output, packed
    channels-last, without writing the floats: equal, bit for bit, to
    ``threshold_signs(few_channel_conv2d(x, weight, bias, stride, padding), threshold, direction)``.

    Parameters
    ----------
    x, weight, bias, stride, padding
        As for :func:`few_channel_conv2d`.
    threshold : numpy.ndarray, float32, (O,)
        NaN means the bit is never set.
    direction : numpy.ndarray, int8, (O,), values +1 or -1

    Returns
    -------
    packed : numpy.ndarray, uint64, (N, OH, OW, ceil(O / 64))
        Bit ``o`` is ``out[:, o] >= threshold[o]`` where ``direction[o] = +1``, ``out[:, o] <=
        threshold[o]`` where it is -1; padding bits 0.

    Raises
    ------
    ValueError
        An output value is NaN (it has no sign, as in ``threshold_signs``), or a shape does not match.
    """
    stride, padding, out_h, out_w, has_bias, bias = _check_operands(x, weight, bias, stride, padding)
    outputs, channels, kernel_h, kernel_w = weight.shape
    for name, arr in (("threshold", threshold), ("direction", direction)):
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"{name} must be a numpy array, got {type(arr).__module__}.{type(arr).__name__}")
    _check_thresholds(f"weight {tuple(weight.shape)}", threshold, direction, outputs, np.float32)
    packed = np.empty((x.shape[0], out_h, out_w, words_for(outputs)), dtype=np.uint64)
    if packed.size == 0:
        return packed
    _, convolve_threshold = _kernels(channels, kernel_h, kernel_w, stride)
    nans = _parallel(convolve_threshold, x, weight, bias, has_bias, padding, threshold, direction, out_h, out_w,
                     packed.reshape(x.shape[0], out_h * out_w, -1))
    if nans:
        raise ValueError(f"the convolution gave {nans} NaN values, which have no sign")
    return packed
