"""Stateless array operations shared by the layers (no parameters, no autograd).

Every function takes arrays of one module (numpy or cupy) and returns arrays of the same module.

Convolution layout
------------------
``im2col`` lays the patches out as ``(C, KH, KW, N, OH, OW)`` so that one (large) GEMM
``W.reshape(O, C*KH*KW) @ col.reshape(C*KH*KW, N*OH*OW)`` computes the whole batch at once, and the
patch buffer is filled with ``KH*KW`` strided copies rather than a Python loop over pixels.  The input
is padded with zeros; padded positions contribute 0 to the dot product (this is the padding rule the
packed binary convolution in :mod:`lowbit.kernels` reproduces exactly).
"""
from __future__ import annotations

import numpy as np

from .backend import get_array_module

__all__ = [
    "matmul",
    "conv_output_size",
    "pad2d",
    "im2col",
    "col2im",
    "pool_forward",
    "pool_backward",
]


def matmul(a, b, keep_float32=False):
    """``a @ b``; on numpy, when either operand is float16, both are multiplied in float32 and the
    product rounded to float16 (or, with ``keep_float32``, returned in float32 for the caller to sum
    further and round once).

    That is what a GPU's tensor cores do for half precision (fp16 inputs, fp32 accumulation, fp16
    output; Micikevicius et al. 2017), and it keeps numpy's slow non-BLAS float16 matmul out of the way.
    A float32 operand that holds float16 values (a cached im2col buffer) gives the same product as its
    float16 twin.  CuPy multiplies float16 natively (cuBLAS, fp32 compute); ``keep_float32`` is ignored
    there.
    """
    if (a.dtype == np.float16 or b.dtype == np.float16) and get_array_module(a) is np:
        product = a.astype(np.float32, copy=False) @ b.astype(np.float32, copy=False)
        if keep_float32:
            return product
        with np.errstate(over="ignore"):  # overflow to inf is float16's behaviour; loss scaling reacts
            return product.astype(np.float16)
    return a @ b


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    out = (size + 2 * padding - kernel) // stride + 1
    if out <= 0:
        raise ValueError(
            f"window of size {kernel} with stride {stride} and padding {padding} does not fit an input "
            f"of size {size}"
        )
    return out


def pad2d(x, padding: int, value=0.0):
    """Pad the last two axes of ``x`` by ``padding`` on each side with ``value``."""
    if padding == 0:
        return x
    xp = get_array_module(x)
    widths = [(0, 0)] * (x.ndim - 2) + [(padding, padding), (padding, padding)]
    return xp.pad(x, widths, mode="constant", constant_values=value)


def im2col(x, kh: int, kw: int, stride: int, padding: int):
    """Patches of ``x`` (N, C, H, W) as an array (C, KH, KW, N, OH, OW), zero-padded."""
    xp = get_array_module(x)
    n, c, h, w = x.shape
    oh = conv_output_size(h, kh, stride, padding)
    ow = conv_output_size(w, kw, stride, padding)
    # (C, N, H, W): the channel axis first so that the patch buffer's leading axes are C, KH, KW.
    xc = pad2d(x.transpose(1, 0, 2, 3), padding)
    col = xp.empty((c, kh, kw, n, oh, ow), dtype=x.dtype)
    h_end = stride * (oh - 1) + 1
    w_end = stride * (ow - 1) + 1
    for i in range(kh):
        for j in range(kw):
            col[:, i, j] = xc[:, :, i : i + h_end : stride, j : j + w_end : stride]
    return col


def col2im(dcol, x_shape, stride: int, padding: int):
    """Adjoint of :func:`im2col`: sum patch gradients (C, KH, KW, N, OH, OW) back into (N, C, H, W)."""
    xp = get_array_module(dcol)
    n, c, h, w = x_shape
    _, kh, kw, _, oh, ow = dcol.shape
    dx = xp.zeros((c, n, h + 2 * padding, w + 2 * padding), dtype=dcol.dtype)
    h_end = stride * (oh - 1) + 1
    w_end = stride * (ow - 1) + 1
    for i in range(kh):
        for j in range(kw):
            dx[:, :, i : i + h_end : stride, j : j + w_end : stride] += dcol[:, i, j]
    if padding:
        dx = dx[:, :, padding:-padding, padding:-padding]
    return dx.transpose(1, 0, 2, 3)


def _windows(x, kh, kw, stride, padding, fill):
    """Yield (i, j, view) for every tap of a pooling window over padded ``x`` (N, C, H, W)."""
    n, c, h, w = x.shape
    oh = conv_output_size(h, kh, stride, padding)
    ow = conv_output_size(w, kw, stride, padding)
    xp_ = pad2d(x, padding, fill)
    h_end = stride * (oh - 1) + 1
    w_end = stride * (ow - 1) + 1
    for i in range(kh):
        for j in range(kw):
            yield i, j, xp_[:, :, i : i + h_end : stride, j : j + w_end : stride]


def pool_forward(x, kh: int, kw: int, stride: int, padding: int, mode: str):
    """Max or average pooling of ``x`` (N, C, H, W).

    Returns ``(out, argmax)``; ``argmax`` (int8 tap index, first maximum wins on ties) is ``None`` for
    average pooling.  Padding is -inf for max pooling and counts as zero for average pooling
    (``count_include_pad``, the divisor is always KH*KW).
    """
    xp = get_array_module(x)
    if mode == "max":
        out = None
        arg = None
        for i, j, view in _windows(x, kh, kw, stride, padding, -xp.inf):
            tap = i * kw + j
            if out is None:
                out = view.copy()
                arg = xp.zeros(view.shape, dtype=xp.int8)
            else:
                better = view > out  # strict: the first maximum wins ties
                out = xp.where(better, view, out)
                arg[better] = tap
        return out, arg
    if mode == "avg":
        out = None
        for _, _, view in _windows(x, kh, kw, stride, padding, 0.0):
            out = view.astype(x.dtype, copy=True) if out is None else out + view
        return out / (kh * kw), None
    raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")


def pool_backward(dout, argmax, x_shape, kh: int, kw: int, stride: int, padding: int, mode: str):
    """Gradient of :func:`pool_forward` with respect to its input."""
    xp = get_array_module(dout)
    n, c, h, w = x_shape
    oh, ow = dout.shape[2], dout.shape[3]
    dx = xp.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=dout.dtype)
    h_end = stride * (oh - 1) + 1
    w_end = stride * (ow - 1) + 1
    scale = 1.0 / (kh * kw)
    overlapping = stride < kh or stride < kw  # else every input position is in one window at most
    zero = dout.dtype.type(0)
    for i in range(kh):
        for j in range(kw):
            if mode == "max":
                # a select, not dout * mask: numpy has no vectorised float16 multiply
                contrib = xp.where(argmax == i * kw + j, dout, zero)
            else:
                contrib = dout * scale
            if overlapping:
                dx[:, :, i : i + h_end : stride, j : j + w_end : stride] += contrib
            else:
                dx[:, :, i : i + h_end : stride, j : j + w_end : stride] = contrib
    if padding:
        dx = dx[:, :, padding:-padding, padding:-padding]
    return dx
