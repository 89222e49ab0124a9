"""Float32 CPU kernels for the non-GEMM work of training: pooling, ReLU, BatchNorm, sign, Adam.

Like the rest of ``lowbit.kernels`` these know nothing of layers or autograd: arrays in, arrays
out.  Each public function checks its arguments (numpy ``float32``, C-contiguous, consistent
shapes; ``TypeError``/``ValueError`` naming the argument otherwise) and runs one private Numba
kernel.  They have no CuPy body: ``lowbit.functions`` calls them only for numpy float32 arrays and
keeps its array-module code (the reference, and the GPU path) for everything else.

Each kernel does in one pass over memory what the reference does in several numpy passes, and
reproduces the reference's float32 arithmetic:

* ``maxpool2d`` / ``maxpool2d_backward``, ``relu`` / ``relu_backward``, ``sign_ste`` /
  ``ste_grad`` and ``adam_update`` are **bit-exact** to the numpy expressions in
  ``lowbit.functions``, ``lowbit.layers``, ``lowbit.quantizers`` and ``lowbit.optimizers``
  (same float32 operations in the same order, no FMA contraction, no fast-math).
* The elementwise kernels (ReLU, sign, STE) also take a permuted view of a C-contiguous array (a
  convolution's NCHW view of its CNHW buffer) as it lies, and return the same layout.
* ``batchnorm_forward`` / ``batchnorm_backward`` sum in float64 where numpy sums pairwise in float32,
  so they agree with the reference to float32 rounding, not bit for bit.

Kernels that run over large arrays share their loop out to the cores with ``prange``
(``numba.set_num_threads`` sets how many).
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from ._checks import check_contiguous, check_dtype, check_float32_array, check_int

__all__ = [
    "set_threads",
    "dense_flat",
    "maxpool2d",
    "maxpool2d_backward",
    "maxpool2d_nhwc",
    "maxpool2d_nhwc_backward",
    "relu",
    "relu_backward",
    "sign_ste",
    "ste_grad",
    "batchnorm_forward",
    "batchnorm_backward",
    "adam_update",
]

# Below this many elements an elementwise kernel runs on one thread: waking the pool costs more
# than the pass (these kernels are bound by memory; a pass over 1 MiB takes tens of microseconds).
_PARALLEL_MIN = 1 << 18
_BLOCKS = 16
# One thread by default: these kernels are bound by memory traffic, and beside BLAS's threads (which
# spin between GEMMs) a second thread cost more than it gave on the 2-core development machine
# (experiments/bench_training.py at 2 threads: deep_convnet 0.59x, bnn_mlp 0.30x, binary_cnn 0.87x of
# the one-thread speed; its lowbit_kernels_all_threads contender measures it on any machine).
_threads = 1  # None: Numba's thread count; an int: this many threads for these kernels only


def set_threads(threads=None):
    """Threads for the parallel loops of these kernels only: ``None`` follows
    ``numba.set_num_threads``; an int >= 1 caps them (capped again by ``NUMBA_NUM_THREADS``) while
    the binary kernels keep Numba's count.  The default is 1 (see the comment above ``_threads``).
    Returns the previous setting.
    """
    global _threads
    if threads is not None:
        threads = check_int("threads", threads, 1)
    previous = _threads
    _threads = threads
    return previous


def run_on_threads(threads, kernel, *args):
    """``kernel(*args)`` with Numba's thread count set to ``threads`` (None: as it is, else capped
    by ``NUMBA_NUM_THREADS``) for the call."""
    if threads is None:
        return kernel(*args)
    previous = numba.get_num_threads()
    threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    if threads == previous:
        return kernel(*args)
    numba.set_num_threads(threads)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(previous)


def _parallel(kernel, *args):
    """``kernel(*args)`` on the thread count :func:`set_threads` chose."""
    return run_on_threads(_threads, kernel, *args)


def _check_same_shape(name, arr, like_name, like):
    if arr.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {like.shape}, got {arr.shape}")


# -- max pooling -----------------------------------------------------------------------------------


@njit(error_model="numpy", cache=True)
def _maxpool_plane_unpadded(x, kernel_h, kernel_w, stride, out, arg):
    """One (H, W) plane, no padding: the running maximum starts at tap 0 and takes a later tap only
    when strictly greater (the first maximum wins; NaN at tap 0 stays)."""
    out_h, out_w = out.shape
    for oy in range(out_h):
        for ox in range(out_w):
            best = x[oy * stride, ox * stride]
            best_tap = 0
            for i in range(kernel_h):
                row = x[oy * stride + i]
                for j in range(kernel_w):
                    v = row[ox * stride + j]
                    if v > best:
                        best = v
                        best_tap = i * kernel_w + j
            out[oy, ox] = best
            arg[oy, ox] = best_tap


@njit(error_model="numpy", cache=True)
def _maxpool_plane_2x2(x, out, arg):
    """The 2 x 2, stride 2, unpadded case of :func:`_maxpool_plane_unpadded`, written as selects so
    that the loop over output columns vectorizes (about 8x faster)."""
    out_h, out_w = out.shape
    for oy in range(out_h):
        row0, row1, out_row, arg_row = x[2 * oy], x[2 * oy + 1], out[oy], arg[oy]
        for ox in range(out_w):
            v1, v2, v3 = row0[2 * ox + 1], row1[2 * ox], row1[2 * ox + 1]
            best = row0[2 * ox]
            tap = np.int8(0)
            better = v1 > best
            best, tap = (v1 if better else best), (np.int8(1) if better else tap)
            better = v2 > best
            best, tap = (v2 if better else best), (np.int8(2) if better else tap)
            better = v3 > best
            best, tap = (v3 if better else best), (np.int8(3) if better else tap)
            out_row[ox] = best
            arg_row[ox] = tap


@njit(parallel=True, error_model="numpy", cache=True)
def _maxpool_unpadded(x, kernel_h, kernel_w, stride, out, arg):
    batch, channels = x.shape[0], x.shape[1]
    for plane in prange(batch * channels):
        n = plane // channels
        c = plane - n * channels
        if kernel_h == 2 and kernel_w == 2 and stride == 2:
            _maxpool_plane_2x2(x[n, c], out[n, c], arg[n, c])
        else:
            _maxpool_plane_unpadded(x[n, c], kernel_h, kernel_w, stride, out[n, c], arg[n, c])


@njit(parallel=True, error_model="numpy", cache=True)
def _maxpool_cpu(x, kernel_h, kernel_w, stride, pad, out, arg):
    batch, channels, height, width = x.shape
    out_h, out_w = out.shape[2], out.shape[3]
    for plane in prange(batch * channels):
        n = plane // channels
        c = plane - n * channels
        for oy in range(out_h):
            for ox in range(out_w):
                y0 = oy * stride - pad
                x0 = ox * stride - pad
                # tap 0 starts the running maximum (-inf when it is padding); later taps replace it
                # only when strictly greater: the first maximum wins, NaN at tap 0 stays.
                if 0 <= y0 < height and 0 <= x0 < width:
                    best = x[n, c, y0, x0]
                else:
                    best = -np.inf
                best_tap = 0
                for i in range(kernel_h):
                    yy = y0 + i
                    if yy < 0 or yy >= height:
                        continue
                    for j in range(kernel_w):
                        xx = x0 + j
                        if xx < 0 or xx >= width or (i == 0 and j == 0):
                            continue
                        v = x[n, c, yy, xx]
                        if v > best:
                            best = v
                            best_tap = i * kernel_w + j
                out[n, c, oy, ox] = best
                arg[n, c, oy, ox] = best_tap


@njit(parallel=True, error_model="numpy", cache=True)
def _maxpool_backward_cpu(dout, arg, kernel_h, kernel_w, stride, pad, dx, overlapping):
    batch, channels, height, width = dx.shape
    out_h, out_w = dout.shape[2], dout.shape[3]
    zero = np.float32(0)
    for plane in prange(batch * channels):
        n = plane // channels
        c = plane - n * channels
        for yy in range(height):
            for xx in range(width):
                dx[n, c, yy, xx] = zero
        if overlapping:
            # the reference adds tap by tap (tap-major), zeros included; do the same, in its order
            for i in range(kernel_h):
                for j in range(kernel_w):
                    tap = i * kernel_w + j
                    for oy in range(out_h):
                        yy = oy * stride - pad + i
                        if yy < 0 or yy >= height:
                            continue
                        for ox in range(out_w):
                            xx = ox * stride - pad + j
                            if xx < 0 or xx >= width:
                                continue
                            if arg[n, c, oy, ox] == tap:
                                dx[n, c, yy, xx] += dout[n, c, oy, ox]
                            else:
                                dx[n, c, yy, xx] += zero
        else:
            for oy in range(out_h):
                for ox in range(out_w):
                    tap = arg[n, c, oy, ox]
                    i = tap // kernel_w
                    yy = oy * stride - pad + i
                    xx = ox * stride - pad + (tap - i * kernel_w)
                    if 0 <= yy < height and 0 <= xx < width:
                        dx[n, c, yy, xx] = dout[n, c, oy, ox]


def _pool_geometry(x_shape, kernel_h, kernel_w, stride, padding):
    kernel_h = check_int("kernel_h", kernel_h, 1)
    kernel_w = check_int("kernel_w", kernel_w, 1)
    stride = check_int("stride", stride, 1)
    padding = check_int("padding", padding, 0)
    if kernel_h * kernel_w > 127:
        raise ValueError(f"kernel_h * kernel_w must be at most 127 (int8 tap index), got {kernel_h * kernel_w}")
    height, width = x_shape[2], x_shape[3]
    out_h = (height + 2 * padding - kernel_h) // stride + 1
    out_w = (width + 2 * padding - kernel_w) // stride + 1
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"window ({kernel_h}, {kernel_w}) with stride {stride} and padding {padding} does not fit "
            f"an input of shape {tuple(x_shape)}"
        )
    return kernel_h, kernel_w, stride, padding, out_h, out_w


def maxpool2d(x, kernel_h, kernel_w, stride, padding):
    """Max pooling of ``x`` (N, C, H, W) float32; padding counts as -inf.

    Returns ``(out, argmax)``: ``out`` (N, C, OH, OW) float32 and ``argmax`` (N, C, OH, OW) int8, the
    tap ``i * kernel_w + j`` of the first maximum of each window (``lowbit.functions.pool_forward``'s
    values, bit for bit).
    """
    check_float32_array("x", x, 4)
    kernel_h, kernel_w, stride, padding, out_h, out_w = _pool_geometry(x.shape, kernel_h, kernel_w,
                                                                       stride, padding)
    n, c = x.shape[:2]
    out = np.empty((n, c, out_h, out_w), dtype=np.float32)
    arg = np.empty((n, c, out_h, out_w), dtype=np.int8)
    if padding == 0:
        _parallel(_maxpool_unpadded, x, kernel_h, kernel_w, stride, out, arg)
    else:
        _parallel(_maxpool_cpu, x, kernel_h, kernel_w, stride, padding, out, arg)
    return out, arg


def maxpool2d_backward(dout, argmax, x_shape, kernel_h, kernel_w, stride, padding):
    """Gradient of :func:`maxpool2d`: ``dout`` (N, C, OH, OW) float32 goes to each window's argmax
    tap in a zero (N, C, H, W) array; where windows overlap, contributions add in the reference's
    order (``lowbit.functions.pool_backward``, bit for bit)."""
    check_float32_array("dout", dout, 4)
    if not isinstance(argmax, np.ndarray) or argmax.dtype != np.int8:
        raise TypeError(f"argmax must be a numpy int8 array, got {getattr(argmax, 'dtype', type(argmax))}")
    check_contiguous("argmax", argmax)
    _check_same_shape("argmax", argmax, "dout", dout)
    if len(x_shape) != 4 or tuple(x_shape[:2]) != dout.shape[:2]:
        raise ValueError(f"x_shape must be (N, C, H, W) with N, C of dout {dout.shape[:2]}, got {x_shape}")
    kernel_h, kernel_w, stride, padding, out_h, out_w = _pool_geometry(x_shape, kernel_h, kernel_w,
                                                                       stride, padding)
    if (out_h, out_w) != dout.shape[2:]:
        raise ValueError(f"dout must have spatial shape {(out_h, out_w)} for x_shape {tuple(x_shape)}, "
                         f"got {dout.shape[2:]}")
    dx = np.empty(tuple(x_shape), dtype=np.float32)
    overlapping = stride < kernel_h or stride < kernel_w
    _parallel(_maxpool_backward_cpu, dout, argmax, kernel_h, kernel_w, stride, padding, dx, overlapping)
    return dx


# -- max pooling of channels-last arrays (what the direct convolutions hand on) ---------------------


@njit(parallel=True, error_model="numpy", cache=True)
def _maxpool_nhwc(x, kernel_h, kernel_w, stride, out, arg):
    """Unpadded max pooling of (N, H, W, C): per output pixel, the taps in the reference's order (the
    first maximum wins, NaN at tap 0 stays), each a vector compare-and-select over the channels."""
    batch, channels = x.shape[0], x.shape[3]
    out_h, out_w = out.shape[1], out.shape[2]
    for line in prange(batch * out_h):
        n = line // out_h
        oy = line - n * out_h
        for ox in range(out_w):
            best, taps = out[n, oy, ox], arg[n, oy, ox]
            first = x[n, oy * stride, ox * stride]
            for ch in range(channels):
                best[ch] = first[ch]
                taps[ch] = 0
            for i in range(kernel_h):
                for j in range(kernel_w):
                    if i == 0 and j == 0:
                        continue
                    row = x[n, oy * stride + i, ox * stride + j]
                    tap = np.int8(i * kernel_w + j)
                    for ch in range(channels):
                        v = row[ch]
                        better = v > best[ch]
                        best[ch] = v if better else best[ch]
                        taps[ch] = tap if better else taps[ch]


@njit(parallel=True, error_model="numpy", cache=True)
def _maxpool_nhwc_backward(dout, arg, kernel_h, kernel_w, stride, dx):
    """Gradient of :func:`_maxpool_nhwc` for windows that do not overlap (stride >= kernel): each
    covered input gets its window's gradient or 0, once; ``dx`` arrives zeroed."""
    batch, channels = dx.shape[0], dx.shape[3]
    out_h, out_w = dout.shape[1], dout.shape[2]
    zero = np.float32(0)
    for line in prange(batch * out_h):
        n = line // out_h
        oy = line - n * out_h
        for ox in range(out_w):
            grad, taps = dout[n, oy, ox], arg[n, oy, ox]
            for i in range(kernel_h):
                for j in range(kernel_w):
                    target = dx[n, oy * stride + i, ox * stride + j]
                    tap = np.int8(i * kernel_w + j)
                    for ch in range(channels):
                        target[ch] = grad[ch] if taps[ch] == tap else zero


def maxpool2d_nhwc(x, kernel_h, kernel_w, stride):
    """Unpadded max pooling of a channels-last ``x`` (N, H, W, C) float32, C-contiguous.

    Returns ``(out, argmax)``, (N, OH, OW, C) float32 and int8: the values of :func:`maxpool2d` on
    the NCHW view, bit for bit, in channels-last layout.
    """
    check_float32_array("x", x, 4)
    n, h, w, c = x.shape
    kernel_h, kernel_w, stride, _, out_h, out_w = _pool_geometry((n, c, h, w), kernel_h, kernel_w, stride, 0)
    out = np.empty((n, out_h, out_w, c), dtype=np.float32)
    arg = np.empty((n, out_h, out_w, c), dtype=np.int8)
    _parallel(_maxpool_nhwc, x, kernel_h, kernel_w, stride, out, arg)
    return out, arg


def maxpool2d_nhwc_backward(dout, argmax, x_shape, kernel_h, kernel_w, stride):
    """Gradient of :func:`maxpool2d_nhwc` for ``stride >= kernel_h, kernel_w`` (windows that do not
    overlap): ``dout`` (N, OH, OW, C) float32 and ``argmax`` int8, both C-contiguous, ``x_shape``
    (N, H, W, C).  Returns (N, H, W, C) float32, :func:`maxpool2d_backward`'s values bit for bit."""
    check_float32_array("dout", dout, 4)
    if not isinstance(argmax, np.ndarray) or argmax.dtype != np.int8:
        raise TypeError(f"argmax must be a numpy int8 array, got {getattr(argmax, 'dtype', type(argmax))}")
    check_contiguous("argmax", argmax)
    _check_same_shape("argmax", argmax, "dout", dout)
    if len(x_shape) != 4 or (x_shape[0], x_shape[3]) != (dout.shape[0], dout.shape[3]):
        raise ValueError(f"x_shape must be (N, H, W, C) with N, C of dout {(dout.shape[0], dout.shape[3])}, "
                         f"got {x_shape}")
    n, h, w, c = x_shape
    kernel_h, kernel_w, stride, _, out_h, out_w = _pool_geometry((n, c, h, w), kernel_h, kernel_w, stride, 0)
    if stride < kernel_h or stride < kernel_w:
        raise ValueError(f"stride must be >= the window {(kernel_h, kernel_w)} (no overlap), got {stride}")
    if (out_h, out_w) != dout.shape[1:3]:
        raise ValueError(f"dout must have spatial shape {(out_h, out_w)} for x_shape {tuple(x_shape)}, "
                         f"got {dout.shape[1:3]}")
    dx = np.zeros(tuple(x_shape), dtype=np.float32)
    _parallel(_maxpool_nhwc_backward, dout, argmax, kernel_h, kernel_w, stride, dx)
    return dx


# -- elementwise: ReLU, sign, STE ------------------------------------------------------------------
# Each op is a sequential kernel over a 1-D slice (loops from 0, so LLVM vectorizes them) and, for
# large arrays, a prange over blocks of slices.  error_model="numpy": a float division by zero gives
# inf/nan as in numpy instead of a Python exception check that stops vectorization.


@njit(error_model="numpy", cache=True)
def _relu_seq(x, out):
    for i in range(x.size):
        v = x[i]
        out[i] = v if v > 0 else np.float32(0)


@njit(parallel=True, error_model="numpy", cache=True)
def _relu_par(x, out, blocks):
    chunk = (x.size + blocks - 1) // blocks
    for b in prange(blocks):
        lo, hi = b * chunk, min(x.size, (b + 1) * chunk)
        _relu_seq(x[lo:hi], out[lo:hi])


@njit(error_model="numpy", cache=True)
def _relu_backward_seq(y, dout, dx):
    for i in range(y.size):
        dx[i] = dout[i] if y[i] > 0 else np.float32(0)


@njit(parallel=True, error_model="numpy", cache=True)
def _relu_backward_par(y, dout, dx, blocks):
    chunk = (y.size + blocks - 1) // blocks
    for b in prange(blocks):
        lo, hi = b * chunk, min(y.size, (b + 1) * chunk)
        _relu_backward_seq(y[lo:hi], dout[lo:hi], dx[lo:hi])


def _run(seq, par, size, *arrays):
    """The sequential kernel on small arrays, the parallel one (``_BLOCKS`` blocks) on large ones."""
    if size >= _PARALLEL_MIN:
        if _threads != 1:
            return _parallel(par, *arrays, _BLOCKS)
    return seq(*arrays)


def dense_flat(arr):
    """The 1-D view of ``arr``'s elements in memory order when they fill their memory without gaps
    (C-contiguous, or a permuted view of such an array: a convolution's NCHW view of its CNHW
    buffer), else None."""
    if arr.flags.c_contiguous:
        return arr.reshape(-1)
    flat = arr.ravel(order="K")
    return flat if np.may_share_memory(flat, arr) else None


def _flat_operands(**arrays):
    """Checked float32 operands of an elementwise kernel, as 1-D views in one memory order: all of
    one shape and one layout (strides), C-contiguous or a permuted view of a C-contiguous array."""
    names = list(arrays)
    first = arrays[names[0]]
    flats = []
    for name in names:
        arr = arrays[name]
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"{name} must be a numpy array, got {type(arr).__module__}.{type(arr).__name__}")
        check_dtype(name, arr, np.float32)
        if name != names[0]:
            _check_same_shape(name, arr, names[0], first)
            both_c = arr.flags.c_contiguous and first.flags.c_contiguous  # strides of size-1 axes vary
            if not both_c and arr.strides != first.strides:
                raise ValueError(f"{name} must have the layout of {names[0]}: strides {first.strides}, "
                                 f"got {arr.strides}")
        flat = dense_flat(arr)
        if flat is None:
            raise ValueError(f"{name} must be C-contiguous or a permuted view of a C-contiguous array, "
                             f"got strides {arr.strides} for shape {arr.shape}")
        flats.append(flat)
    return flats


def relu(x):
    """``where(x > 0, x, 0)`` of a float32 array (NaN and -0.0 give +0.0), one pass; the output has
    the memory layout of ``x``, which may be a permuted view of a C-contiguous array."""
    (flat,) = _flat_operands(x=x)
    out = np.empty_like(x)  # the layout of x
    _run(_relu_seq, _relu_par, x.size, flat, dense_flat(out))
    return out


def relu_backward(y, dout):
    """``where(y > 0, dout, 0)`` with ``y`` the output of :func:`relu` (``y > 0`` exactly where its
    input was ``> 0``), one pass; ``y`` and ``dout`` share one layout (see :func:`relu`)."""
    y_flat, dout_flat = _flat_operands(y=y, dout=dout)
    dx = np.empty_like(dout)
    _run(_relu_backward_seq, _relu_backward_par, y.size, y_flat, dout_flat, dense_flat(dx))
    return dx


@njit(error_model="numpy", cache=True)
def _sign_ste_seq(x, out):
    nans = 0
    one = np.float32(1)
    for i in range(x.size):
        v = x[i]
        nans += v != v
        out[i] = one if v >= 0 else -one
    return nans


@njit(parallel=True, error_model="numpy", cache=True)
def _sign_ste_par(x, out, blocks):
    chunk = (x.size + blocks - 1) // blocks
    nans = 0
    for b in prange(blocks):
        lo, hi = b * chunk, min(x.size, (b + 1) * chunk)
        nans += _sign_ste_seq(x[lo:hi], out[lo:hi])
    return nans


def sign_ste(x):
    """``+1.0 where x >= 0 else -1.0`` (``sign(-0.0) = +1``) of a float32 array, and whether ``x``
    holds a NaN, in one pass: ``(signs, has_nan)``.  On NaN the signs are not meaningful."""
    (flat,) = _flat_operands(x=x)
    out = np.empty_like(x)
    nans = _run(_sign_ste_seq, _sign_ste_par, x.size, flat, dense_flat(out))
    return out, nans > 0


@njit(error_model="numpy", cache=True)
def _ste_grad_seq(x, dout, clip, dx):
    one, zero = np.float32(1), np.float32(0)
    for i in range(x.size):
        dx[i] = dout[i] * (one if abs(x[i]) <= clip else zero)


@njit(parallel=True, error_model="numpy", cache=True)
def _ste_grad_par(x, dout, clip, dx, blocks):
    chunk = (x.size + blocks - 1) // blocks
    for b in prange(blocks):
        lo, hi = b * chunk, min(x.size, (b + 1) * chunk)
        _ste_grad_seq(x[lo:hi], dout[lo:hi], clip, dx[lo:hi])


def ste_grad(x, dout, clip):
    """The straight-through gradient ``dout * (|x| <= clip)`` (a float32 multiply by 1 or 0, as the
    reference: ``-g * 0 = -0.0``, ``inf * 0 = nan``), one pass; ``clip`` is compared in float32."""
    x_flat, dout_flat = _flat_operands(x=x, dout=dout)
    dx = np.empty_like(dout)
    _run(_ste_grad_seq, _ste_grad_par, x.size, x_flat, dout_flat, np.float32(clip), dense_flat(dx))
    return dx


# -- BatchNorm (training mode: batch statistics) ---------------------------------------------------


# Sums in float64; "reassoc" lets LLVM split them into vector lanes (the order of a sum changes,
# which float64 absorbs; nothing else is reassociated, as no other flag is given).
@njit(fastmath={"reassoc"}, error_model="numpy", cache=True)
def _sum_rows(x, c):
    total = 0.0
    for n in range(x.shape[0]):
        row = x[n, c]
        for s in range(row.size):
            total += row[s]
    return total


@njit(fastmath={"reassoc"}, error_model="numpy", cache=True)
def _sum_squares_rows(x, c, m):
    total = 0.0
    for n in range(x.shape[0]):
        row = x[n, c]
        for s in range(row.size):
            d = np.float64(row[s] - m)
            total += d * d
    return total


@njit(parallel=True, error_model="numpy", cache=True)
def _bn_forward_nchw(x, gamma, beta, eps, xn, out, mean, var, inv_std):
    batch, channels, size = x.shape
    count = batch * size
    for c in prange(channels):
        m = np.float32(_sum_rows(x, c) / count)
        v = np.float32(_sum_squares_rows(x, c, m) / count)
        istd = np.float32(1) / np.sqrt(v + np.float32(eps))
        g, b = gamma[c], beta[c]
        for n in range(batch):
            row, xn_row, out_row = x[n, c], xn[n, c], out[n, c]
            for s in range(size):
                t = (row[s] - m) * istd
                xn_row[s] = t
                out_row[s] = g * t + b
        mean[c], var[c], inv_std[c] = m, v, istd


@njit(error_model="numpy", cache=True)
def _normalize_rows(x, gamma, beta, mean, inv_std, xn, out, lo, hi):
    """Rows ``lo:hi`` of (rows, C) ``x``: ``xn = (x - mean) * inv_std``, ``out = gamma * xn + beta``."""
    for r in range(lo, hi):
        row, xn_row, out_row = x[r], xn[r], out[r]
        for f in range(x.shape[1]):
            t = (row[f] - mean[f]) * inv_std[f]
            xn_row[f] = t
            out_row[f] = gamma[f] * t + beta[f]


@njit(error_model="numpy", cache=True)
def _bn_input_grad_rows(dout, xn, scale, mean_d, mean_dxn, dx, lo, hi):
    """Rows ``lo:hi`` of BatchNorm's input gradient: ``scale * (dout - mean_d - xn * mean_dxn)``."""
    for r in range(lo, hi):
        d_row, xn_row, dx_row = dout[r], xn[r], dx[r]
        for f in range(dout.shape[1]):
            dx_row[f] = scale[f] * (d_row[f] - mean_d[f] - xn_row[f] * mean_dxn[f])


@njit(error_model="numpy", cache=True)
def _add_column_sums(x, lo, hi, total):
    """``total[f] += x[r, f]`` over rows ``lo:hi`` of (rows, C) ``x``, in float64."""
    for r in range(lo, hi):
        row = x[r]
        for f in range(x.shape[1]):
            total[f] += row[f]


@njit(error_model="numpy", cache=True)
def _add_column_sums_wide(x, lo, hi, total):
    """``_add_column_sums`` for C-contiguous ``x`` with few columns: rows ``lo:hi`` taken ``group``
    at a time as one flat run of ``group * C`` values, added into a float64 row of that width, then
    folded into ``total``.  A row of 16 floats at a time left the loop's per-row cost (its alias
    check) to dominate: 0.30 ms for 78,400 x 16, the bias gradient of a 28 x 28, 16-channel layer at
    batch 100.  The order of the float64 sums differs from ``_add_column_sums``'."""
    columns = x.shape[1]
    group = max(1, 512 // max(columns, 1))
    width = group * columns
    wide = np.zeros(width)
    flat = x.reshape(-1)
    stop = lo + (hi - lo) // group * group
    for first in range(lo, stop, group):
        values = flat[first * columns:first * columns + width]
        for k in range(width):
            wide[k] += values[k]
    for k in range(width):
        total[k % columns] += wide[k]
    _add_column_sums(x, stop, hi, total)


@njit(error_model="numpy", cache=True)
def _add_column_square_deviations(x, mean, lo, hi, total):
    """``total[f] += (x[r, f] - mean[f]) ** 2`` over rows ``lo:hi``; the difference in float32, as
    the reference, its square and the sum in float64."""
    for r in range(lo, hi):
        row = x[r]
        for f in range(x.shape[1]):
            d = np.float64(row[f] - mean[f])
            total[f] += d * d


@njit(error_model="numpy", cache=True)
def _set_mean(partials, rows, mean):
    """``mean`` from per-block column sums ``partials`` (blocks, C), added in block order."""
    for f in range(mean.shape[0]):
        mean[f] = np.float32(partials[:, f].sum() / rows)


@njit(error_model="numpy", cache=True)
def _set_variance(partials, rows, eps, var, inv_std):
    """``var`` and ``inv_std = 1 / sqrt(var + eps)`` from per-block sums of squared deviations."""
    for f in range(var.shape[0]):
        var[f] = np.float32(partials[:, f].sum() / rows)
        inv_std[f] = np.float32(1) / np.sqrt(var[f] + np.float32(eps))


@njit(error_model="numpy", cache=True)
def _bn_forward_columns(x, gamma, beta, eps, xn, out, mean, var, inv_std):
    """BatchNorm of the columns of ``x`` (N, F): sums by rows into per-column float64 arrays (the
    loops over contiguous rows vectorize; one thread: dense layers' BatchNorm is small).  The
    one-block case of :func:`_bn_forward_rows_par`, with its helpers."""
    rows = x.shape[0]
    partial = np.zeros((1, x.shape[1]))
    _add_column_sums(x, 0, rows, partial[0])
    _set_mean(partial, rows, mean)
    partial[:] = 0.0
    _add_column_square_deviations(x, mean, 0, rows, partial[0])
    _set_variance(partial, rows, eps, var, inv_std)
    _normalize_rows(x, gamma, beta, mean, inv_std, xn, out, 0, rows)


@njit(parallel=True, error_model="numpy", cache=True)
def _bn_forward_rows_par(x, gamma, beta, eps, xn, out, mean, var, inv_std, blocks):
    """``_bn_forward_columns`` of a large (rows, C) matrix (a channels-last activation) on the
    threads: ``blocks`` row blocks sum into their own float64 rows, added in block order, so the
    statistics do not depend on the thread count."""
    rows = x.shape[0]
    chunk = (rows + blocks - 1) // blocks
    partial = np.zeros((blocks, x.shape[1]))
    for b in prange(blocks):
        _add_column_sums(x, b * chunk, min(rows, (b + 1) * chunk), partial[b])
    _set_mean(partial, rows, mean)
    partial[:] = 0.0
    for b in prange(blocks):
        _add_column_square_deviations(x, mean, b * chunk, min(rows, (b + 1) * chunk), partial[b])
    _set_variance(partial, rows, eps, var, inv_std)
    for b in prange(blocks):
        _normalize_rows(x, gamma, beta, mean, inv_std, xn, out, b * chunk, min(rows, (b + 1) * chunk))


@njit(error_model="numpy", cache=True)
def _add_grad_sums(dout, xn, lo, hi, sum_d, sum_dxn):
    """``sum_d += dout`` and ``sum_dxn += dout * xn`` by columns over rows ``lo:hi``, in float64."""
    for r in range(lo, hi):
        d_row, xn_row = dout[r], xn[r]
        for f in range(dout.shape[1]):
            sum_d[f] += d_row[f]
            sum_dxn[f] += d_row[f] * xn_row[f]


@njit(error_model="numpy", cache=True)
def _bn_grad_scales(sums_d, sums_dxn, rows, gamma, inv_std, dgamma, dbeta):
    """``dbeta``, ``dgamma`` from per-block sums (blocks, C) added in block order; returns the
    per-column ``(mean_d, mean_dxn, gamma * inv_std)`` that :func:`_bn_input_grad_rows` takes."""
    features = gamma.shape[0]
    mean_d = np.empty(features, dtype=np.float32)
    mean_dxn = np.empty(features, dtype=np.float32)
    scale = np.empty(features, dtype=np.float32)
    for f in range(features):
        total_d, total_dxn = sums_d[:, f].sum(), sums_dxn[:, f].sum()
        dbeta[f] = total_d
        dgamma[f] = total_dxn
        mean_d[f] = np.float32(total_d / rows)
        mean_dxn[f] = np.float32(total_dxn / rows)
        scale[f] = gamma[f] * inv_std[f]
    return mean_d, mean_dxn, scale


@njit(parallel=True, error_model="numpy", cache=True)
def _bn_backward_rows_par(dout, xn, gamma, inv_std, dx, dgamma, dbeta, blocks):
    """``_bn_backward_columns`` on the threads, summed by row blocks as ``_bn_forward_rows_par``."""
    rows = dout.shape[0]
    chunk = (rows + blocks - 1) // blocks
    sums_d = np.zeros((blocks, dout.shape[1]))
    sums_dxn = np.zeros((blocks, dout.shape[1]))
    for b in prange(blocks):
        _add_grad_sums(dout, xn, b * chunk, min(rows, (b + 1) * chunk), sums_d[b], sums_dxn[b])
    mean_d, mean_dxn, scale = _bn_grad_scales(sums_d, sums_dxn, rows, gamma, inv_std, dgamma, dbeta)
    for b in prange(blocks):
        _bn_input_grad_rows(dout, xn, scale, mean_d, mean_dxn, dx, b * chunk, min(rows, (b + 1) * chunk))


def _channels_last_rows(arr):
    """``arr`` (N, C, H, W) as the (N * H * W, C) matrix of its memory when it is an NCHW view of a
    C-contiguous NHWC buffer (a direct or binary convolution's training output), else None."""
    if not isinstance(arr, np.ndarray) or arr.ndim != 4 or arr.flags.c_contiguous:
        return None
    nhwc = arr.transpose(0, 2, 3, 1)
    return nhwc.reshape(-1, arr.shape[1]) if nhwc.flags.c_contiguous else None


def _bn_checked_view(name, arr, **per_channel):
    """Check ``arr`` (float32 (N, C) or (N, C, H, W)) and its per-channel (C,) float32 arrays; return
    ``arr`` as (N, C) or (N, C, H*W)."""
    check_float32_array(name, arr)
    if arr.ndim not in (2, 4):
        raise ValueError(f"{name} must be (N, C) or (N, C, H, W), got shape {arr.shape}")
    channels = arr.shape[1]
    for other, values in per_channel.items():
        check_float32_array(other, values, 1)
        if values.shape[0] != channels:
            raise ValueError(f"{other} must have shape ({channels},) for {name} of shape {arr.shape}, "
                             f"got {values.shape}")
    return arr if arr.ndim == 2 else arr.reshape(arr.shape[0], channels, -1)


def batchnorm_forward(x, gamma, beta, eps):
    """Training-mode BatchNorm of float32 ``x`` (N, C) or (N, C, H, W) over all axes but 1.

    ``x`` is C-contiguous, or (4-D) the NCHW view of a C-contiguous NHWC buffer, which is read as an
    (N * H * W, C) matrix and gives outputs in that layout (no copy between channels-last layers).

    Returns ``(out, xn, mean, var, inv_std)``: ``xn = (x - mean) * inv_std``, ``out = gamma * xn +
    beta`` (shape of ``x``), and the per-channel float32 batch mean, biased variance and
    ``1 / sqrt(var + eps)`` (C,).  Sums run in float64.
    """
    rows = _channels_last_rows(x)
    view = _bn_checked_view("x", x if rows is None else rows, gamma=gamma, beta=beta)
    channels = x.shape[1]
    out = np.empty_like(x)  # the layout of x
    xn = np.empty_like(x)
    mean, var, inv_std = (np.empty(channels, dtype=np.float32) for _ in range(3))
    if rows is not None and rows.size >= _PARALLEL_MIN and _threads != 1:
        _parallel(_bn_forward_rows_par, rows, gamma, beta, float(eps), _channels_last_rows(xn),
                  _channels_last_rows(out), mean, var, inv_std, _BLOCKS)
    elif rows is not None:
        _bn_forward_columns(rows, gamma, beta, float(eps), _channels_last_rows(xn), _channels_last_rows(out),
                            mean, var, inv_std)
    elif x.ndim == 2:
        _bn_forward_columns(view, gamma, beta, float(eps), xn, out, mean, var, inv_std)
    else:
        _parallel(_bn_forward_nchw, view, gamma, beta, float(eps), xn.reshape(view.shape), out.reshape(view.shape),
                         mean, var, inv_std)
    return out, xn, mean, var, inv_std


@njit(fastmath={"reassoc"}, error_model="numpy", cache=True)
def _sum_products_rows(a, b, c):
    total = 0.0
    for n in range(a.shape[0]):
        row_a, row_b = a[n, c], b[n, c]
        for s in range(row_a.size):
            total += row_a[s] * row_b[s]
    return total


@njit(parallel=True, error_model="numpy", cache=True)
def _bn_backward_nchw(dout, xn, gamma, inv_std, dx, dgamma, dbeta):
    batch, channels, size = dout.shape
    count = batch * size
    for c in prange(channels):
        sum_d = _sum_rows(dout, c)
        sum_dxn = _sum_products_rows(dout, xn, c)
        dbeta[c] = sum_d
        dgamma[c] = sum_dxn
        mean_d = np.float32(sum_d / count)
        mean_dxn = np.float32(sum_dxn / count)
        scale = gamma[c] * inv_std[c]
        for n in range(batch):
            d_row, xn_row, dx_row = dout[n, c], xn[n, c], dx[n, c]
            for s in range(size):
                dx_row[s] = scale * (d_row[s] - mean_d - xn_row[s] * mean_dxn)


@njit(error_model="numpy", cache=True)
def _bn_backward_columns(dout, xn, gamma, inv_std, dx, dgamma, dbeta):
    """The one-block case of :func:`_bn_backward_rows_par`, with its helpers."""
    rows = dout.shape[0]
    sums_d = np.zeros((1, dout.shape[1]))
    sums_dxn = np.zeros((1, dout.shape[1]))
    _add_grad_sums(dout, xn, 0, rows, sums_d[0], sums_dxn[0])
    mean_d, mean_dxn, scale = _bn_grad_scales(sums_d, sums_dxn, rows, gamma, inv_std, dgamma, dbeta)
    _bn_input_grad_rows(dout, xn, scale, mean_d, mean_dxn, dx, 0, rows)


def batchnorm_backward(dout, xn, gamma, inv_std):
    """Gradient of training-mode :func:`batchnorm_forward`: ``(dx, dgamma, dbeta)``.

    ``dbeta = sum(dout)``, ``dgamma = sum(dout * xn)`` over all axes but 1 (float64 sums), and
    ``dx = gamma * inv_std * (dout - mean(dout) - xn * mean(dout * xn))``, the reference's compact form
    with the factor ``gamma`` taken out of the means.
    """
    rows = _channels_last_rows(dout)
    if rows is not None:
        xn_rows = _channels_last_rows(xn)
        if xn_rows is None:
            raise ValueError(f"xn must have the layout of dout (channels-last, strides {dout.strides}), "
                             f"got strides {getattr(xn, 'strides', None)}")
        check_float32_array("xn", xn_rows)
    else:
        check_float32_array("xn", xn)
    _check_same_shape("xn", xn, "dout", dout)
    view = _bn_checked_view("dout", dout if rows is None else rows, gamma=gamma, inv_std=inv_std)
    channels = dout.shape[1]
    dx = np.empty_like(dout)  # the layout of dout
    dgamma = np.empty(channels, dtype=np.float32)
    dbeta = np.empty(channels, dtype=np.float32)
    if rows is not None and rows.size >= _PARALLEL_MIN and _threads != 1:
        _parallel(_bn_backward_rows_par, rows, xn_rows, gamma, inv_std, _channels_last_rows(dx), dgamma, dbeta,
                  _BLOCKS)
    elif rows is not None:
        _bn_backward_columns(rows, xn_rows, gamma, inv_std, _channels_last_rows(dx), dgamma, dbeta)
    elif dout.ndim == 2:
        _bn_backward_columns(view, xn, gamma, inv_std, dx, dgamma, dbeta)
    else:
        _parallel(_bn_backward_nchw, view, xn.reshape(view.shape), gamma, inv_std, dx.reshape(view.shape), dgamma, dbeta)
    return dx, dgamma, dbeta


# -- Adam ------------------------------------------------------------------------------------------


@njit(error_model="numpy", cache=True)
def _adam_seq(p, g, m, v, c1, c2, step, eps, low, high, clip):
    for i in range(p.size):
        gi = g[i]
        mi = m[i] + c1 * (gi - m[i])
        vi = v[i] + c2 * (gi * gi - v[i])
        m[i] = mi
        v[i] = vi
        pi = p[i] - step * mi / (np.sqrt(vi) + eps)
        if clip:  # np.clip's result: the lower bound, then the upper one
            pi = pi if pi > low else low
            pi = pi if pi < high else high
        p[i] = pi


@njit(parallel=True, error_model="numpy", cache=True)
def _adam_par(p, g, m, v, c1, c2, step, eps, low, high, clip, blocks):
    chunk = (p.size + blocks - 1) // blocks
    for b in prange(blocks):
        lo, hi = b * chunk, min(p.size, (b + 1) * chunk)
        _adam_seq(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], c1, c2, step, eps, low, high, clip)


def adam_update(param, grad, m, v, c1, c2, step, eps, bounds=None):
    """One Adam update in place, in one pass: ``m += c1 (g - m); v += c2 (g^2 - v);
    p -= step * m / (sqrt(v) + eps)``, then ``p = clip(p, *bounds)`` when ``bounds`` is a pair.

    All four arrays float32, C-contiguous, one shape; the scalars are rounded to float32.  Equal bit
    for bit to the numpy update in ``lowbit.optimizers.Adam`` followed by ``numpy.clip``.
    """
    for name, arr in (("param", param), ("grad", grad), ("m", m), ("v", v)):
        check_float32_array(name, arr)
        if name != "param":
            _check_same_shape(name, arr, "param", param)
    if bounds is None:
        low = high = np.float32(0)
    else:
        low, high = np.float32(bounds[0]), np.float32(bounds[1])
        if not low <= high:
            raise ValueError(f"bounds must be (low, high) with low <= high, got {bounds!r}")
    args = (param.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1), np.float32(c1),
            np.float32(c2), np.float32(step), np.float32(eps), low, high, bounds is not None)
    _run(_adam_seq, _adam_par, param.size, *args)
