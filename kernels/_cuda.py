"""CuPy path: the CUDA kernels of ``kernels/cuda/*.cu``, loaded lazily with ``cupy.RawModule``.

The public functions validate their arguments and then call the function of the same name here
with CuPy arrays that are already C-contiguous and of the right dtype and shape.  Bit convention
and layouts: see ``lowbit.kernels``.  Scalars are passed as numpy scalars of the exact C type of
the kernel parameter (``long long`` -> ``np.int64``, ``int`` -> ``np.int32``).
"""
from __future__ import annotations

import functools
import pathlib

import numpy as np

from lowbit.backend import cupy

from ._checks import words_for

SOURCE_DIR = pathlib.Path(__file__).resolve().parent / "cuda"
_BLOCK = 256  # threads per block; a multiple of 32 (the ballot kernels need whole warps)
_GEMM_TILE = 128  # LOWBIT_TILE_M = LOWBIT_TILE_N in xnor_gemm.cu
_GEMM_THREADS = 256

_UNPACK_SUFFIX = {
    np.dtype(np.float32): "f32",
    np.dtype(np.float64): "f64",
    np.dtype(np.int8): "i8",
    np.dtype(np.int16): "i16",
    np.dtype(np.int32): "i32",
    np.dtype(np.int64): "i64",
}


@functools.lru_cache(maxsize=None)
def _module(name):
    if cupy is None:
        raise RuntimeError("the CuPy path needs CuPy with a CUDA device (lowbit.backend.cupy is None)")
    return cupy.RawModule(code=(SOURCE_DIR / f"{name}.cu").read_text())


def _kernel(module, function):
    return _module(module).get_function(function)


def _blocks(threads):
    return ((threads + _BLOCK - 1) // _BLOCK,)


def _i64(value):
    return np.int64(value)


def pack_signs(values, rows, k):
    """values: cupy (rows, k) real; returns cupy uint64 (rows, ceil(k / 64))."""
    words = words_for(k)
    packed = cupy.empty((rows, words), dtype=np.uint64)
    if packed.size == 0:
        return packed
    if values.dtype == np.float64:
        suffix = "f64"
    elif values.dtype == np.float32:
        suffix = "f32"
    elif values.dtype == np.float16:
        values, suffix = values.astype(np.float32), "f32"
    else:
        # Integers: float64 keeps the sign of every integer (a nonzero value never rounds to 0).
        values, suffix = values.astype(np.float64), "f64"
    nan_flag = cupy.zeros(1, dtype=np.int32)
    _kernel("pack", f"pack_signs_{suffix}")(
        _blocks(rows * words * 32), (_BLOCK,), (values, packed, _i64(rows), _i64(k), _i64(words), nan_flag)
    )
    if int(nan_flag.get()[0]):
        raise ValueError("x holds NaN, which has no sign; pack_signs needs finite or infinite values")
    return packed


def unpack_signs(packed, rows, k, dtype):
    """packed: cupy uint64 (rows, ceil(k / 64)); returns cupy ``dtype`` (rows, k) of +-1."""
    dtype = np.dtype(dtype)
    values = cupy.empty((rows, k), dtype=dtype)
    if values.size == 0:
        return values
    suffix = _UNPACK_SUFFIX.get(dtype)
    target = values if suffix else cupy.empty((rows, k), dtype=np.float64)
    _kernel("pack", f"unpack_signs_{suffix or 'f64'}")(
        _blocks(rows * k), (_BLOCK,), (packed, target, _i64(rows), _i64(k), _i64(words_for(k)))
    )
    if suffix is None:  # float16 and the like: +-1 converts exactly
        values[...] = target
    return values


def xnor_gemm(a, b, k, out):
    """a (M, words), b (N, words) cupy uint64; returns cupy int32 (M, N)."""
    m, words = a.shape
    n = b.shape[0]
    if out is None:
        out = cupy.empty((m, n), dtype=np.int32)
    if m == 0 or n == 0:
        return out
    if words == 0:
        out.fill(0)
        return out
    grid = ((n + _GEMM_TILE - 1) // _GEMM_TILE, (m + _GEMM_TILE - 1) // _GEMM_TILE)
    _kernel("xnor_gemm", "xnor_gemm")(
        grid, (_GEMM_THREADS,), (a, b, out, _i64(m), _i64(n), _i64(words), np.int32(k))
    )
    return out


def binary_conv2d(x, weights, channels, stride_h, stride_w, pad_h, pad_w, out_h, out_w):
    batch, height, width, words = x.shape
    n_out, kernel_h, kernel_w, _ = weights.shape
    out = cupy.empty((batch, out_h, out_w, n_out), dtype=np.int32)
    if out.size == 0:
        return out
    sizes = (batch, height, width, words, n_out, kernel_h, kernel_w)
    geometry = (stride_h, stride_w, pad_h, pad_w, out_h, out_w)
    args = (x, weights, out) + tuple(_i64(v) for v in sizes + geometry) + (np.int32(channels),)
    _kernel("binary_conv", "binary_conv2d")(_blocks(out.size), (_BLOCK,), args)
    return out


def maxpool_packed(x, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w):
    batch, height, width, words = x.shape
    out = cupy.empty((batch, out_h, out_w, words), dtype=np.uint64)
    if out.size == 0:
        return out
    sizes = (batch, height, width, words, kernel_h, kernel_w)
    geometry = (stride_h, stride_w, pad_h, pad_w, out_h, out_w)
    args = (x, out) + tuple(_i64(v) for v in sizes + geometry)
    _kernel("binary_conv", "maxpool_packed")(_blocks(out.size), (_BLOCK,), args)
    return out


def threshold_pack(acc, threshold, direction):
    """acc cupy int32 (rows, C); returns cupy uint64 (rows, ceil(C / 64))."""
    rows, channels = acc.shape
    words = words_for(channels)
    packed = cupy.empty((rows, words), dtype=np.uint64)
    if packed.size == 0:
        return packed
    _kernel("threshold", "threshold_pack")(
        _blocks(rows * words * 32),
        (_BLOCK,),
        (acc, threshold, direction, packed, _i64(rows), _i64(channels), _i64(words)),
    )
    return packed
