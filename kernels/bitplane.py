"""Bit planes of unsigned integer codes: XNOR GEMMs on k-bit inputs, exactly.

A dot product of k-bit codes ``p`` (0 .. 2^k - 1) with +-1 weights ``w`` splits into one binary dot
product per bit plane.  With plane ``b`` read as +-1 values ``s_b = 2 * bit_b(p) - 1``::

    T = sum_b 2^b * (s_b . w) = 2 * (p . w) - (2^k - 1) * sum(w)

so ``pack_bitplanes`` + ``xnor_gemm`` on the ``k * N`` plane rows + ``combine_bitplanes`` give
``T`` exactly in int32, from which ``p . w`` follows.  This is how a binary first layer runs on
8-bit images (FINN and Brevitas do the same on FPGAs).  Bit convention: ``lowbit.kernels``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from lowbit.backend import cupy

from ._checks import array_kind, check_contiguous, check_dtype, check_int, check_ndim, words_for
from ._intrinsics import sign_word

__all__ = ["pack_bitplanes", "combine_bitplanes"]


@njit(parallel=True, cache=True)
def _pack_bitplanes_cpu(codes, bits, out):
    """Plane words by 64-lane compares: lane j of a row buffer holds -1 where bit b of code j is set,
    0 elsewhere (the padding lanes past K too), and ``~sign_word`` of it is the plane word."""
    rows, k = codes.shape
    words = out.shape[2]
    for row in prange(rows):
        lanes = np.zeros(words * 64, dtype=np.int8)
        for b in range(bits):
            for j in range(k):
                lanes[j] = -np.int8((codes[row, j] >> b) & 1)
            for w in range(words):
                out[b, row, w] = ~sign_word(lanes, w * 64)


def pack_bitplanes(codes, bits):
    """Pack each bit plane of unsigned codes along the last axis.

    Parameters
    ----------
    codes : numpy.ndarray or cupy.ndarray, uint8 or uint16, shape (N, K), C-contiguous
        Values below ``2 ** bits``.
    bits : int, 1 .. 16

    Returns
    -------
    planes : same kind, uint64, shape (bits, N, ceil(K / 64))
        ``planes[b]`` holds bit ``b`` of every code (bit 1 = +1 in ``xnor_gemm``); padding bits 0.
    """
    kind = array_kind(codes=codes)
    if codes.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"codes must have dtype uint8 or uint16, got {codes.dtype.name}")
    check_ndim("codes", codes, 2, "(N, K)")
    check_contiguous("codes", codes)
    bits = check_int("bits", bits, minimum=1)
    if bits > 8 * codes.dtype.itemsize:
        raise ValueError(f"bits must be <= {8 * codes.dtype.itemsize} for {codes.dtype.name} codes, got {bits}")
    rows, k = codes.shape
    if rows and k and int(codes.max()) >= 2 ** bits:
        raise ValueError(f"codes must be below 2 ** bits = {2 ** bits}, got a maximum of {int(codes.max())}")
    if kind == "cupy":
        from .pack import pack_signs

        shifts = cupy.arange(bits, dtype=codes.dtype).reshape(bits, 1, 1)
        plane_values = ((codes[None] >> shifts) & 1).astype(cupy.int8) * 2 - 1
        return pack_signs(cupy.ascontiguousarray(plane_values))
    out = np.empty((bits, rows, words_for(k)), dtype=np.uint64)
    if out.size:
        _pack_bitplanes_cpu(codes, bits, out)
    return out


@njit(parallel=True, cache=True)
def _combine_bitplanes_cpu(products, out):
    bits, rows, columns = products.shape
    for row in prange(rows):
        for c in range(columns):
            out[row, c] = products[0, row, c]
        for b in range(1, bits):
            for c in range(columns):
                out[row, c] += products[b, row, c] << b


def combine_bitplanes(products):
    """``sum_b 2^b * products[b]``: the plane products of ``xnor_gemm`` summed into one int32 array.

    Parameters
    ----------
    products : numpy.ndarray or cupy.ndarray, int32, shape (bits, M, N), C-contiguous
        ``xnor_gemm`` of the ``bits * M`` plane rows of :func:`pack_bitplanes` (reshaped).  The sum
        must fit int32: ``(2^bits - 1) * K < 2^31`` for dot products of length K.

    Returns
    -------
    out : same kind, int32, shape (M, N)
    """
    kind = array_kind(products=products)
    check_dtype("products", products, np.int32)
    check_ndim("products", products, 3, "(bits, M, N)")
    check_contiguous("products", products)
    if products.shape[0] < 1:
        raise ValueError("products must hold at least one plane, got shape (0, ...)")
    if kind == "cupy":
        weights = (cupy.int32(1) << cupy.arange(products.shape[0], dtype=cupy.int32)).reshape(-1, 1, 1)
        return (products * weights).sum(axis=0, dtype=cupy.int32)
    out = np.empty(products.shape[1:], dtype=np.int32)
    if out.size:
        _combine_bitplanes_cpu(products, out)
    return out
