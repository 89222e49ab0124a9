"""Max-pooling on packed sign bits (bit convention and layout: see ``lowbit.kernels``)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from lowbit.backend import get_array_module

from ._checks import array_kind, check_dtype, check_ndim, check_packed, check_pair, words_for

__all__ = ["maxpool_packed"]


def pool_geometry(name, x, kernel, stride, padding):
    """Checked ``(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w)`` of a pooling
    of the NHWC array ``x`` (argument ``name``): padding smaller than the kernel (no window is all
    padding), the padded input at least the kernel; ``stride`` None means ``kernel``."""
    kernel_h, kernel_w = check_pair("kernel", kernel, 1)
    stride_h, stride_w = check_pair("stride", kernel if stride is None else stride, 1)
    pad_h, pad_w = check_pair("padding", padding, 0)
    if pad_h >= kernel_h or pad_w >= kernel_w:
        raise ValueError(
            f"padding must be smaller than the kernel {(kernel_h, kernel_w)} so that no window is all "
            f"padding, got {(pad_h, pad_w)}"
        )
    height, width = x.shape[1], x.shape[2]
    if height + 2 * pad_h < kernel_h or width + 2 * pad_w < kernel_w:
        raise ValueError(
            f"the padded input ({height + 2 * pad_h}, {width + 2 * pad_w}) is smaller than the kernel "
            f"({kernel_h}, {kernel_w}); {name} has shape {tuple(x.shape)}"
        )
    out_h = (height + 2 * pad_h - kernel_h) // stride_h + 1
    out_w = (width + 2 * pad_w - kernel_w) // stride_w + 1
    return kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w


def maxpool_int(acc, kernel, stride=None, padding=0):
    """Max-pooling of integer NHWC arrays (numpy or CuPy, by strided views; padding ignored, as
    -inf): the reference that ``threshold_maxpool_pack`` fuses, and its CuPy path."""
    kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w = pool_geometry(
        "acc", acc, kernel, stride, padding)
    xp = get_array_module(acc)
    low = np.iinfo(acc.dtype).min
    padded = xp.pad(acc, ((0, 0), (pad_h, pad_h), (pad_w, pad_w), (0, 0)), constant_values=low)
    h_end, w_end = stride_h * (out_h - 1) + 1, stride_w * (out_w - 1) + 1
    pooled = None
    for i in range(kernel_h):
        for j in range(kernel_w):
            view = padded[:, i:i + h_end:stride_h, j:j + w_end:stride_w, :]
            pooled = view.copy() if pooled is None else xp.maximum(pooled, view)
    return xp.ascontiguousarray(pooled)


@njit(parallel=True, cache=True)
def _maxpool_packed_cpu(x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, up, out):
    """OR over each window where ``up`` has its bit set, AND elsewhere (``up``: (words,) uint64)."""
    batch, height, width, words = x.shape
    out_h, out_w = out.shape[1], out.shape[2]
    for image_row in prange(batch * out_h):
        image = image_row // out_h
        oy = image_row - image * out_h
        y_start = max(oy * stride_h - pad_h, 0)
        y_stop = min(oy * stride_h - pad_h + kernel_h, height)
        for ox in range(out_w):
            x_start = max(ox * stride_w - pad_w, 0)
            x_stop = min(ox * stride_w - pad_w + kernel_w, width)
            for w in range(words):
                any_set = np.uint64(0)
                all_set = ~np.uint64(0)
                for iy in range(y_start, y_stop):
                    for ix in range(x_start, x_stop):
                        any_set |= x[image, iy, ix, w]
                        all_set &= x[image, iy, ix, w]
                out[image, oy, ox, w] = (any_set & up[w]) | (all_set & ~up[w])


def _upward_words(direction, words):
    """uint64 (words,): bit c set where ``direction[c] > 0``; padding bits 0 (numpy or CuPy)."""
    from .pack import pack_signs

    xp = get_array_module(direction)
    return pack_signs((direction.astype(xp.int8) > 0).astype(xp.int8) * 2 - 1).reshape(words)


def maxpool_packed(x_packed, kernel, stride=None, padding=0, direction=None):
    """Max-pooling of packed +-1 activations: the max of +-1 values is the OR of their bits.

    Parameters
    ----------
    x_packed : numpy.ndarray or cupy.ndarray, uint64, shape (N, H, W, words)
        Packed NHWC activations, C-contiguous.
    kernel : int or (int, int)
        Window height and width.
    stride : int or (int, int), optional
        Defaults to ``kernel``.
    padding : int or (int, int), default 0
        Positions added on each side of H and W; they are ignored (as if -inf), so each window
        takes the max over its positions inside the input.  Must be smaller than the kernel, so
        that every window holds at least one input position.
    direction : same kind, int8, shape (C,), values +1 or -1, optional
        For bits that ``threshold_pack`` made from accumulators with these directions: channels
        with direction -1 take the AND of their window instead of the OR, so that the result is
        the threshold of the max-pooled accumulators, ``threshold_maxpool_pack``'s bits
        (``max(acc) >= t`` is any ``acc >= t``; ``max(acc) <= t`` is every ``acc <= t``).
        ``ceil(C / 64)`` must be ``words``.

    Returns
    -------
    out : same kind, uint64, shape (N, OH, OW, words)
        ``OH = (H + 2 * pad_h - KH) // stride_h + 1``, likewise ``OW``; padding bits stay 0.
    """
    kind = array_kind(x_packed=x_packed) if direction is None else array_kind(x_packed=x_packed, direction=direction)
    check_packed("x_packed", x_packed, ndim=4, layout="(N, H, W, words)")
    kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w = pool_geometry(
        "x_packed", x_packed, kernel, stride, padding)
    batch, _, _, words = x_packed.shape
    up = None
    if direction is not None:
        check_dtype("direction", direction, np.int8)
        check_ndim("direction", direction, 1, "(C,)")
        if words_for(direction.shape[0]) != words:
            raise ValueError(f"direction must have C channels with ceil(C / 64) = {words} (the words of x_packed), "
                             f"got shape {tuple(direction.shape)}")
        if not bool(((direction == 1) | (direction == -1)).all()):
            raise ValueError("direction must hold only +1 and -1")
        up = _upward_words(direction, words)
    if kind == "cupy":
        from . import _cuda

        def pool(bits):
            return _cuda.maxpool_packed(bits, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w)

        if up is None:
            return pool(x_packed)
        return (pool(x_packed) & up) | (~pool(~x_packed) & ~up)
    out = np.empty((batch, out_h, out_w, words), dtype=np.uint64)
    if up is None:
        up = np.full(words, ~np.uint64(0), dtype=np.uint64)
    if out.size:
        _maxpool_packed_cpu(x_packed, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, up, out)
    return out
