"""Slow, obviously correct reference implementations that the fast paths are compared with.

Each section belongs to one part of lowbit; append new sections below with their own heading.
"""
from __future__ import annotations

import numpy as np

# ==================================================================================================
# lowbit.kernels (issue 4): packing, XNOR GEMM, binary convolution, BN-then-sign, packed max-pool.
# Bit convention: see the module docstring of lowbit.kernels (bit 1 = +1 = x >= 0, LSB first,
# padding bits past K are 0).
# ==================================================================================================


def sign_pm1(x):
    """+1 where x >= 0 (0 and -0.0 included), -1 elsewhere, as int64."""
    return np.where(np.asarray(x) >= 0, 1, -1).astype(np.int64)


def pack_signs_loops(x):
    """Pack the signs of (..., K) into uint64 (..., ceil(K / 64)) one element at a time."""
    x = np.asarray(x)
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    words = (k + 63) // 64
    packed = np.zeros((rows.shape[0], words), dtype=np.uint64)
    for r in range(rows.shape[0]):
        for c in range(k):
            if rows[r, c] >= 0:
                packed[r, c // 64] |= np.uint64(1) << np.uint64(c % 64)
    return packed.reshape(x.shape[:-1] + (words,))


def unpack_signs_loops(packed, k):
    """+1 / -1 int64 (..., k) from packed bits, one element at a time."""
    packed = np.asarray(packed)
    rows = packed.reshape(-1, packed.shape[-1])
    values = np.empty((rows.shape[0], k), dtype=np.int64)
    for r in range(rows.shape[0]):
        for c in range(k):
            values[r, c] = 1 if (int(rows[r, c // 64]) >> (c % 64)) & 1 else -1
    return values.reshape(packed.shape[:-1] + (k,))


def xnor_gemm_matmul(a_values, b_values):
    """sign(A) @ sign(B).T as an int64 matrix product of the +-1 matrices."""
    return sign_pm1(a_values) @ sign_pm1(b_values).T


def xnor_gemm_bitcount(a_packed, b_packed, k):
    """k - 2 * popcount(a_i XOR b_j) with numpy's ``np.bitwise_count``, int64 (M, N)."""
    a_packed = np.asarray(a_packed)
    b_packed = np.asarray(b_packed)
    mismatches = np.bitwise_count(a_packed[:, None, :] ^ b_packed[None, :, :]).astype(np.int64).sum(axis=-1)
    return k - 2 * mismatches


def conv2d_direct(x_nchw, w_oihw, stride=(1, 1), padding=(0, 0)):
    """Float64 cross-correlation with zero padding, by direct loops over the output; NCHW in and out.

    ``stride`` and ``padding`` are ints or (height, width) pairs.
    """
    x = np.asarray(x_nchw, dtype=np.float64)
    w = np.asarray(w_oihw, dtype=np.float64)
    stride_h, stride_w = (stride, stride) if np.isscalar(stride) else stride
    pad_h, pad_w = (padding, padding) if np.isscalar(padding) else padding
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    padded = np.zeros((n, c, h + 2 * pad_h, wd + 2 * pad_w))
    padded[:, :, pad_h:pad_h + h, pad_w:pad_w + wd] = x
    out_h = (h + 2 * pad_h - kh) // stride_h + 1
    out_w = (wd + 2 * pad_w - kw) // stride_w + 1
    out = np.zeros((n, o, out_h, out_w))
    for oy in range(out_h):
        for ox in range(out_w):
            window = padded[:, :, oy * stride_h:oy * stride_h + kh, ox * stride_w:ox * stride_w + kw]
            out[:, :, oy, ox] = np.einsum("nchw,ochw->no", window, w)
    return out


def bn_sign_float(acc, gamma, beta, mean, var, eps, dtype=np.float64, order="divide"):
    """Bits (int64 0/1) of BatchNorm(acc) >= 0, every operation in ``dtype``.

    order "divide": ``gamma * (acc - mean) / sqrt(var + eps) + beta``; order "inverse":
    ``gamma * ((acc - mean) * (1 / sqrt(var + eps))) + beta`` (lowbit.layers.BatchNorm, eval mode).
    """
    t = np.dtype(dtype).type
    acc = np.asarray(acc).astype(dtype)
    gamma, beta, mean, var = (np.asarray(v).astype(dtype) for v in (gamma, beta, mean, var))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        std = np.sqrt(var + t(eps))
        if order == "inverse":
            y = gamma * ((acc - mean) * (t(1) / std)) + beta
        else:
            y = gamma * (acc - mean) / std + beta
    return (y >= 0).astype(np.int64)


def maxpool_float(x_nhwc, kernel, stride, padding):
    """Max-pool of real NHWC values with -inf padding, by loops over the output."""
    x = np.asarray(x_nhwc, dtype=np.float64)
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, h, w, c = x.shape
    padded = np.full((n, h + 2 * ph, w + 2 * pw, c), -np.inf)
    padded[:, ph:ph + h, pw:pw + w, :] = x
    out_h = (h + 2 * ph - kh) // sh + 1
    out_w = (w + 2 * pw - kw) // sw + 1
    out = np.empty((n, out_h, out_w, c))
    for oy in range(out_h):
        for ox in range(out_w):
            out[:, oy, ox, :] = padded[:, oy * sh:oy * sh + kh, ox * sw:ox * sw + kw, :].max(axis=(1, 2))
    return out
