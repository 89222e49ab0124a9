"""Products of +-1 operands on the XNOR-popcount kernels, bit for bit the float products.

The ops the binary layers call in place of a float GEMM or convolution (``Conv2D`` / ``Affine`` in
:mod:`lowbit.layers.dense`, through their ``binary_operands()`` and ``binary_weight_float_input()``
hooks): every sum is an integer (times one scale) that float32 holds exactly, so the float
simulation and these give the same bits.  Numpy float32 only (:func:`binary_product_available`);
the layers keep their float path for everything else.
"""
from __future__ import annotations

import math

import numpy as np

from .functions import blas_held, channels_last as channels_last_view, fast_arrays

__all__ = ["binary_product_available", "binary_conv2d_pm1", "binary_matmul_pm1", "masked_binary_matmul"]


def binary_product_available(*arrays):
    """True when :func:`binary_conv2d_pm1` / :func:`binary_matmul_pm1` take these arrays (fast ops on,
    numpy float32); the caller still has to know that they hold only +-1."""
    return fast_arrays(*arrays)


def binary_conv2d_pm1(xq, wq, stride: int, padding: int, channels_last: bool = False):
    """Convolution of +-1 float32 ``xq`` (N, C, H, W) with +-1 float32 ``wq`` (O, C, KH, KW), zero
    padding, through the XNOR-popcount kernel (``lowbit.kernels.binary_conv2d``).

    Every value being +-1 and every sum an integer below 2^24, this equals the float convolution
    (im2col and a float32 GEMM) bit for bit.  Returns float32 (N, O, OH, OW): C-contiguous, or with
    ``channels_last`` (training, where the BatchNorm, pooling and sign kernels that follow take that
    layout as it lies) the NCHW view of the kernel's NHWC result, without the transposing copy.
    ``xq`` may be C-contiguous or channels-last (then packed along its contiguous channels).
    """
    from lowbit.kernels import binary_conv2d, pack_signs, threshold_signs

    channels = xq.shape[1]
    if channels_last_view(xq):
        packed_x = pack_signs(xq.transpose(0, 2, 3, 1))
    else:
        packed_x = threshold_signs(xq, np.zeros(channels, np.float32), np.ones(channels, np.int8))
    packed_w = pack_signs(np.ascontiguousarray(wq.transpose(0, 2, 3, 1)))
    # (N, OH, OW, O) float32, converted by the kernel as it stores (no second pass)
    acc = binary_conv2d(packed_x, packed_w, channels, stride, padding, dtype=np.float32)
    if channels_last:
        return acc.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(acc.transpose(0, 3, 1, 2))


def binary_matmul_pm1(xq, wq):
    """``xq @ wq`` of +-1 float32 ``xq`` (N, K) and ``wq`` (K, M) through the XNOR-popcount GEMM,
    equal to the float32 product bit for bit (integer sums below 2^24); ``wq`` is packed by columns
    in place of a transposed copy.  Returns float32 (N, M)."""
    from lowbit.kernels import pack_sign_columns, pack_signs, xnor_gemm

    k = xq.shape[1]
    acc = xnor_gemm(pack_signs(np.ascontiguousarray(xq)), pack_sign_columns(np.ascontiguousarray(wq)), k)
    return acc.astype(np.float32)


def masked_binary_matmul(x, wq):
    """``x @ wq`` of float32 ``x`` (N, K) whose values are 0, +c or -c for one ``c`` (dropout's output
    on +-1 activations) and +-1 float32 ``wq`` (K, M), on the XNOR-popcount GEMM through the two
    sign planes of ``pack_masked_signs`` (at half the rate of ``binary_matmul_pm1``); None when ``x``
    is not of that form (``kernels.masked_scale``) or the product could round.

    Exact: every partial sum of the float product is an integer multiple of ``c``, representable
    when that integer times ``c``'s odd mantissa fits in 24 bits (checked), so any summation order
    gives ``c * S``; the kernel returns ``2 S`` and ``2 S * (c / 2)`` is that float bit for bit.
    Without zeros (``+-c`` only: at evaluation, where dropout is off) the sign planes are the plain
    signs, ``S`` comes from ``xnor_gemm`` at the full rate and ``S * c`` is the float product.
    A model's hidden layers after Dropout (bnn_mlp 3x1024, batch 100): 2.4 ms of float GEMM per
    layer against 0.35-0.6 ms, one thread.
    """
    from lowbit.kernels import float_ops, masked_scale, pack_masked_signs, pack_sign_columns, pack_signs, xnor_gemm

    k = x.shape[1]
    scale = masked_scale(x)
    if scale == 0.0:
        return None
    mantissa, _ = math.frexp(scale)
    odd = int(mantissa * (1 << 24))
    odd >>= (odd & -odd).bit_length() - 1  # drop the trailing zero bits
    if odd.bit_length() + k.bit_length() > 24:
        return None

    # All on one Numba thread unless numpy's BLAS is held to one (one_blas_thread): OpenMP's workers
    # spin after a parallel region, and beside the threaded products of the backward they cost
    # 8 ms a call on 2 cores (bnn_mlp 3x1024 at 2 threads: a step 3x slower).
    threads = None if blas_held() else 1
    x = np.ascontiguousarray(x)
    if np.count_nonzero(x) == x.size:  # +-c only (evaluation, dropout off): the plain sign product S
        return float_ops.run_on_threads(threads, binary_matmul_pm1, x, wq) * np.float32(scale)

    def product():  # 2 S from the two sign planes
        if k % 64 == 0:  # the weights' two copies are whole words: pack once, repeat the words
            columns = pack_sign_columns(np.ascontiguousarray(wq))
            packed_w = np.concatenate([columns, columns], axis=1)
        else:
            packed_w = pack_signs(np.ascontiguousarray(np.concatenate([wq, wq], axis=0).T))
        return xnor_gemm(pack_masked_signs(x), packed_w, 2 * k)

    return float_ops.run_on_threads(threads, product).astype(np.float32) * np.float32(scale / 2)
