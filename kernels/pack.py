"""Packing real arrays into sign bits and back (bit convention: see ``lowbit.kernels``)."""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._checks import array_kind, check_contiguous, check_int, check_packed, check_padding_bits, words_for
from ._intrinsics import nan_word, sign_word

__all__ = ["pack_signs", "pack_masked_signs", "masked_scale", "pack_sign_columns", "unpack_signs", "words_for"]

# Real dtypes packed as they are; float16 is widened to float32 first (exact).
_PACKABLE_KINDS = "fiu"


@njit(parallel=True, cache=True)
def _pack_signs_cpu(values, packed):
    """Pack ``values`` (rows, k) into ``packed`` (rows, words); return the number of NaNs seen."""
    rows, k = values.shape
    words = packed.shape[1]
    nan_count = 0
    for index in prange(rows * words):
        row = index // words
        word_index = index - row * words
        start = word_index * 64
        if start + 64 <= k:
            # A whole word: one 64-lane vector compare (see _intrinsics.sign_word).
            offset = row * k + start
            packed[row, word_index] = sign_word(values, offset)
            nan_count += nan_word(values, offset) != 0
            continue
        word = np.uint64(0)
        not_a_number = 0
        for column in range(start, k):
            value = values[row, column]
            word |= np.uint64(value >= 0) << np.uint64(column - start)
            not_a_number += value != value
        packed[row, word_index] = word
        nan_count += not_a_number
    return nan_count


@njit(parallel=True, cache=True)
def _pack_signs_narrow_cpu(values, packed):
    """``_pack_signs_cpu`` for rows of ``k`` < 64 elements where ``k`` divides 64 (the channels of a
    narrow convolution, 32 or 16): one 64-lane compare covers ``64 // k`` whole rows, its word split
    into one word per row (a row at a time would compare scalar by scalar).  Returns the NaN count."""
    rows, k = values.shape
    per_word = 64 // k
    groups = rows // per_word
    flat = values.reshape(-1)
    low = (np.uint64(1) << np.uint64(k)) - np.uint64(1)
    nan_count = 0
    for group in prange(groups):
        offset = group * 64
        word = sign_word(flat, offset)
        nan_count += nan_word(flat, offset) != 0
        for j in range(per_word):
            packed[group * per_word + j, 0] = (word >> np.uint64(j * k)) & low
    for row in range(groups * per_word, rows):  # the last rows, fewer than 64 elements
        word = np.uint64(0)
        for column in range(k):
            value = values[row, column]
            word |= np.uint64(value >= 0) << np.uint64(column)
            nan_count += value != value
        packed[row, 0] = word
    return nan_count


@njit(parallel=True, cache=True)
def _unpack_signs_cpu(packed, values):
    """Write +1 / -1 into ``values`` (rows, k) from the bits of ``packed`` (rows, words)."""
    rows, k = values.shape
    words = packed.shape[1]
    for index in prange(rows * words):
        row = index // words
        word_index = index - row * words
        word = packed[row, word_index]
        start = word_index * 64
        for column in range(start, min(start + 64, k)):
            values[row, column] = 1 if (word >> np.uint64(column - start)) & np.uint64(1) else -1


def _leading_rows(shape):
    rows = 1
    for extent in shape[:-1]:
        rows *= extent
    return rows


def _check_packable(x):
    """The array kind of ``x`` after the checks every sign packer makes: a real dtype, at least one
    dimension, C-contiguous."""
    kind = array_kind(x=x)
    if x.dtype.kind not in _PACKABLE_KINDS:
        raise TypeError(f"x must have a real (float or integer) dtype, got {x.dtype.name}")
    if x.ndim < 1:
        raise ValueError("x must have at least 1 dimension (..., K), got a 0-D array")
    check_contiguous("x", x)
    return kind


def pack_signs(x):
    """Pack the signs of a real array into bits along its last axis.

    Parameters
    ----------
    x : numpy.ndarray or cupy.ndarray, shape (..., K)
        Real values (float16/32/64 or integer), C-contiguous.  ``x >= 0`` (including 0 and -0.0)
        packs as +1 (bit 1), ``x < 0`` as -1 (bit 0).

    Returns
    -------
    packed : same kind as ``x``, uint64, shape (..., ceil(K / 64))
        Element ``k`` in word ``k // 64``, bit ``k % 64``; padding bits past ``K`` are 0.

    Raises
    ------
    TypeError
        ``x`` is not an array of a real dtype (bool and complex are refused).
    ValueError
        ``x`` is 0-D, not C-contiguous, or holds NaN.
    """
    kind = _check_packable(x)
    k = x.shape[-1]
    rows = _leading_rows(x.shape)
    out_shape = x.shape[:-1] + (words_for(k),)
    if kind == "cupy":
        from . import _cuda

        return _cuda.pack_signs(x.reshape(rows, k), rows, k).reshape(out_shape)
    values = x.reshape(rows, k)
    if values.dtype == np.float16:
        values = values.astype(np.float32)
    packed = np.empty((rows, words_for(k)), dtype=np.uint64)
    narrow = 0 < k < 64 and 64 % k == 0 and rows * k >= 64
    if (_pack_signs_narrow_cpu if narrow else _pack_signs_cpu)(values, packed):
        raise ValueError("x holds NaN, which has no sign; pack_signs needs finite or infinite values")
    return packed.reshape(out_shape)


@njit(parallel=True, error_model="numpy", cache=True)
def _pack_sign_columns_cpu(values, packed):
    """Pack the columns of ``values`` (k, m) float32 into ``packed`` (m, words): word ``w`` of column
    ``j`` gathers rows ``64 w ..`` of it.  Rows are read whole (the loop over columns vectorizes);
    returns the number of NaNs seen."""
    k, m = values.shape
    words = packed.shape[1]
    nan_count = 0
    for word_index in prange(words):
        bits = np.zeros(m, dtype=np.uint64)
        nans = 0
        start = word_index * 64
        zero = np.uint64(0)
        for r in range(start, min(start + 64, k)):
            row = values[r]
            bit = np.uint64(1) << np.uint64(r - start)
            for j in range(m):
                v = row[j]
                bits[j] |= bit if v >= 0 else zero  # a select: vectorizes, a shifted bool does not
                nans += v != v
        for j in range(m):
            packed[j, word_index] = bits[j]
        nan_count += nans
    return nan_count


def pack_sign_columns(x):
    """Pack the signs of a 2-D array's columns: ``pack_signs(x.T)`` without the transposed copy.

    Parameters
    ----------
    x : numpy.ndarray, float32, shape (K, M), C-contiguous
        A dense layer's weights ``(in_features, out_features)``: the result holds one packed row per
        output unit, the layout ``xnor_gemm`` takes for its right operand.

    Returns
    -------
    packed : numpy.ndarray, uint64, shape (M, ceil(K / 64)); padding bits 0.

    Raises
    ------
    TypeError
        ``x`` is not a numpy float32 array.
    ValueError
        ``x`` is not 2-D or not C-contiguous, or holds NaN.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a numpy array, got {type(x).__module__}.{type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"x must have dtype float32, got {x.dtype.name}")
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (K, M), got shape {tuple(x.shape)}")
    check_contiguous("x", x)
    packed = np.empty((x.shape[1], words_for(x.shape[0])), dtype=np.uint64)
    if _pack_sign_columns_cpu(x, packed):
        raise ValueError("x holds NaN, which has no sign; pack_sign_columns needs finite or infinite values")
    return packed


def unpack_signs(packed, k, dtype=np.float32):
    """Unpack sign bits into +1 / -1 values; the inverse of :func:`pack_signs`.

    Parameters
    ----------
    packed : numpy.ndarray or cupy.ndarray, uint64, shape (..., ceil(k / 64))
        C-contiguous, padding bits past ``k`` equal to 0.
    k : int
        Number of real columns (the length of the last axis before packing).
    dtype : numpy dtype, default float32
        Signed integer or float dtype of the result.

    Returns
    -------
    values : same kind as ``packed``, ``dtype``, shape (..., k)
        +1 where the bit is 1, -1 where it is 0.
    """
    kind = array_kind(packed=packed)
    check_packed("packed", packed)
    k = check_int("k", k, minimum=0)
    dtype = np.dtype(dtype)
    if dtype.kind not in "fi":
        raise TypeError(f"dtype must be a signed integer or float dtype, got {dtype.name}")
    if packed.shape[-1] != words_for(k):
        raise ValueError(
            f"packed must have ceil(k / 64) = {words_for(k)} words on its last axis for k={k}, "
            f"got shape {tuple(packed.shape)}"
        )
    check_padding_bits("packed", packed, k)
    rows = _leading_rows(packed.shape)
    out_shape = packed.shape[:-1] + (k,)
    if kind == "cupy":
        from . import _cuda

        return _cuda.unpack_signs(packed.reshape(rows, words_for(k)), rows, k, dtype).reshape(out_shape)
    values = np.empty((rows, k), dtype=dtype)
    _unpack_signs_cpu(packed.reshape(rows, words_for(k)), values)
    return values.reshape(out_shape)


def pack_masked_signs(x):
    """Pack values in {0, +c, -c} (dropout's output on +-1 inputs) as two sign planes, for an exact
    ``xnor_gemm`` with zeros.

    Row ``x`` (K values) becomes the 2K signs ``[s_plus | s_minus]``: ``s_plus = +1`` where
    ``x >= 0`` (0 included), ``s_minus = +1`` where ``x > 0``.  Where ``x = 0`` the two are +1 and
    -1 and cancel against any weight; elsewhere both equal ``sign(x)``.  So, for +-1 weights ``w``
    (K,) and ``c > 0``::

        xnor_gemm(pack_masked_signs(x), pack_signs(concatenate([w, w], -1)), 2 * K)
            = 2 * (x / c) . w        exactly (the sum over the kept inputs of sign(x) * w)

    and the dropout layer's product ``x . w`` is that times ``c / 2`` (exactly 1 for c = 2, dropout
    with p = 0.5).  Costs twice the words of ``pack_signs(x)``: a binary forward on dropout's
    output at half the XNOR GEMM's rate, still exact.

    Parameters
    ----------
    x : numpy.ndarray or cupy.ndarray, shape (..., K), real dtype, C-contiguous
        Any real values: what matters is their sign and whether they are 0 (-0.0 counts as 0).

    Returns
    -------
    packed : same kind, uint64, shape (..., ceil(2K / 64))
        ``pack_signs`` of the 2K signs above (padding bits 0).
    """
    kind = _check_packable(x)
    if kind == "numpy" and x.dtype == np.float32:  # one compiled pass, no int8 planes in between
        k = x.shape[-1]
        rows = _leading_rows(x.shape)
        packed = np.zeros((rows, words_for(2 * k)), dtype=np.uint64)
        if _pack_masked_signs_cpu(x.reshape(rows, k), packed):
            raise ValueError("x holds NaN, which has no sign; pack_masked_signs needs finite or infinite values")
        return packed.reshape(x.shape[:-1] + (packed.shape[1],))
    if kind == "cupy":
        from lowbit.backend import cupy as xp
    else:
        xp = np
    planes = xp.concatenate([xp.where(x >= 0, 1, -1), xp.where(x > 0, 1, -1)], axis=-1).astype(np.int8)
    if kind == "numpy" and x.dtype.kind == "f" and np.isnan(x).any():
        raise ValueError("x holds NaN, which has no sign; pack_masked_signs needs finite or infinite values")
    return pack_signs(xp.ascontiguousarray(planes))


@njit(parallel=True, cache=True)
def _pack_masked_signs_cpu(values, packed):
    """The two sign planes of ``pack_masked_signs`` for float32 ``values`` (rows, k) into the zeroed
    ``packed`` (rows, words of 2k): bit j is ``x[j] >= 0``, bit k + j is ``x[j] > 0``; 64 values
    at a time (a fixed-length loop that LLVM turns into vector compares).  Returns the NaN count."""
    rows, k = values.shape
    nan_count = 0
    for row in prange(rows):
        out = packed[row]
        x = values[row]
        for start in range(0, k, 64):
            stop = min(k, start + 64)
            plus = np.uint64(0)
            minus = np.uint64(0)
            nans = 0
            for j in range(start, stop):
                v = x[j]
                shift = np.uint64(j - start)
                plus |= np.uint64(v >= 0) << shift
                minus |= np.uint64(v > 0) << shift
                nans += v != v
            nan_count += nans
            # plus lands at bit start, minus at bit k + start (k need not be a multiple of 64)
            out[start >> 6] |= plus
            offset = k + start
            low = np.uint64(offset & 63)
            out[offset >> 6] |= minus << low
            if low and (offset >> 6) + 1 < out.shape[0]:
                out[(offset >> 6) + 1] |= minus >> (np.uint64(64) - low)
    return nan_count


@njit(fastmath={"reassoc"}, cache=True)
def _masked_scale_cpu(flat):
    scale = np.float32(0)
    for i in range(flat.size):  # the first nonzero magnitude
        if flat[i] != 0:
            scale = abs(flat[i])
            break
    others = 0
    for i in range(flat.size):  # a vectorised count of the values of another magnitude (NaN too)
        magnitude = abs(flat[i])
        others += not (magnitude == 0 or magnitude == scale)
    return scale if others == 0 else np.float32(-1)


def masked_scale(x):
    """``c`` when every element of the float32 numpy array ``x`` is 0 (either sign), ``+c`` or ``-c``
    for one finite ``c > 0`` (dropout's output on +-1 values, ``c = 1 / (1 - ratio)``), else 0.0.
    Two passes: to the first nonzero value, then a vectorised count of the values of another
    magnitude over all of ``x``; 0.0 too when ``x`` is all zeros."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32:
        raise TypeError(f"x must be a float32 numpy array, got {getattr(x, 'dtype', type(x).__name__)}")
    scale = float(_masked_scale_cpu(np.ascontiguousarray(x).reshape(-1)))
    return scale if 0 < scale < np.inf else 0.0
