"""Argument validation shared by the public kernel functions.

Every check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape, layout or
value) with a message that names the argument, what was expected and what came.
"""
from __future__ import annotations

import numbers
import operator

import numpy as np
from numba import njit

from lowbit.backend import cupy, is_cupy_array


def array_kind(**arrays):
    """Return ``"numpy"`` or ``"cupy"``; all arrays must be of one kind.

    Parameters
    ----------
    **arrays : numpy.ndarray or cupy.ndarray
        The array arguments of a public function, by name.
    """
    kinds = {}
    for name, arr in arrays.items():
        if is_cupy_array(arr):
            kinds[name] = "cupy"
        elif isinstance(arr, np.ndarray):
            kinds[name] = "numpy"
        else:
            raise TypeError(
                f"{name} must be a numpy or CuPy array, got {type(arr).__module__}.{type(arr).__name__}"
            )
    if len(set(kinds.values())) > 1:
        described = ", ".join(f"{name} is {kind}" for name, kind in kinds.items())
        raise TypeError(f"arrays must all be numpy or all CuPy arrays, got {described}")
    return next(iter(kinds.values()))


def check_dtype(name, arr, dtype):
    if arr.dtype != np.dtype(dtype):
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {arr.dtype.name}")


def check_ndim(name, arr, ndim, layout=""):
    if arr.ndim != ndim:
        what = f" {layout}" if layout else ""
        raise ValueError(f"{name} must be {ndim}-D{what}, got shape {tuple(arr.shape)}")


def check_contiguous(name, arr):
    if not arr.flags.c_contiguous:
        raise ValueError(
            f"{name} must be C-contiguous, got strides {tuple(arr.strides)} for shape "
            f"{tuple(arr.shape)} (use numpy/cupy ascontiguousarray)"
        )


def check_float32_array(name, arr, ndim=None, contiguous=True):
    """``arr`` must be a numpy float32 array (of ``ndim`` dimensions when given; C-contiguous unless
    ``contiguous=False``): the check of every float32 CPU kernel's operands."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(arr).__module__}.{type(arr).__name__}")
    check_dtype(name, arr, np.float32)
    if ndim is not None:
        check_ndim(name, arr, ndim)
    if contiguous:
        check_contiguous(name, arr)


def conv_output_size(size, kernel, stride, padding, name):
    """Output size of a convolution or pooling window along one axis; ``ValueError`` naming ``name``
    when the window does not fit."""
    out = (size + 2 * padding - kernel) // stride + 1
    if out <= 0:
        raise ValueError(f"{name}: a window of {kernel} with stride {stride} and padding {padding} does not "
                         f"fit an input of size {size}")
    return out


def check_packed(name, arr, ndim=None, layout=""):
    """A packed array: uint64, C-contiguous, optionally of a given ndim."""
    check_dtype(name, arr, np.uint64)
    if ndim is not None:
        check_ndim(name, arr, ndim, layout)
    elif arr.ndim < 1:
        raise ValueError(f"{name} must have at least 1 dimension, got a 0-D array")
    check_contiguous(name, arr)


def check_int(name, value, minimum=None):
    """A Python or numpy integer (not bool), at least ``minimum``; returns it as int."""
    if type(value) is int and (minimum is None or value >= minimum):  # the common case, fast
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = operator.index(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_pair(name, value, minimum):
    """An int or a pair of ints (height, width), each at least ``minimum``; returns a tuple."""
    if type(value) is int and value >= minimum:  # the common case, fast
        return (value, value)
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair (height, width), got {value!r}")
        return (check_int(f"{name}[0]", value[0], minimum), check_int(f"{name}[1]", value[1], minimum))
    value = check_int(name, value, minimum)
    return (value, value)


def words_for(k):
    """Number of uint64 words that hold ``k`` bits: ``ceil(k / 64)``."""
    return (k + 63) // 64


def padding_mask(k):
    """uint64 mask of the padding bits past ``k`` in the last word (0 when ``k % 64 == 0``)."""
    used = k % 64
    if used == 0:
        return np.uint64(0)
    return np.uint64(~((1 << used) - 1) & 0xFFFF_FFFF_FFFF_FFFF)


@njit(cache=True)
def _padding_bits_set(rows, mask):
    """True when ``rows[r, -1] & mask`` is nonzero for some row (rows: C-contiguous 2-D uint64)."""
    last = rows.shape[1] - 1
    for r in range(rows.shape[0]):
        if rows[r, last] & mask:
            return True
    return False


def check_padding_bits(name, arr, k):
    """Raise ValueError when any bit past ``k`` in the last word along the last axis is set.

    Reads only the last word of each row, so it costs one pass over ``size / words`` words.
    """
    if k % 64 == 0 or arr.size == 0:
        return
    mask = padding_mask(k)
    if is_cupy_array(arr):
        bad = bool(cupy.any(arr[..., -1] & mask))
    else:
        bad = _padding_bits_set(arr.reshape(-1, arr.shape[-1]), mask)
    if bad:
        raise ValueError(
            f"{name} has padding bits set past k={k} in its last word; packed arrays must hold 0 "
            "there (see the bit convention in lowbit.kernels)"
        )
