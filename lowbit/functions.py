"""Stateless array operations shared by the layers (no parameters, no autograd).

Every function takes arrays of one module (numpy or cupy) and returns arrays of the same module.

Convolution layout
------------------
``im2col`` lays the patches out as ``(C, KH, KW, N, OH, OW)`` so that one (large) GEMM
``W.reshape(O, C*KH*KW) @ col.reshape(C*KH*KW, N*OH*OW)`` computes the whole batch at once, and the
patch buffer is filled with ``KH*KW`` strided copies rather than a Python loop over pixels.  The input
is padded with zeros; padded positions contribute 0 to the dot product (this is the padding rule the
packed binary convolution in :mod:`lowbit.kernels` reproduces exactly).

Fast paths
----------
On numpy float32 arrays the ops below that have one run a compiled kernel from
``lowbit.kernels.float_ops`` (one pass over memory, shared out to the cores) instead of their
numpy body: max pooling, ReLU, training-mode BatchNorm, sign with its NaN check, the
straight-through gradient and the Adam update; convolutions and dense products of +-1 operands run
on the XNOR-popcount kernels (:mod:`lowbit.bit_products`).  im2col and
col2im stay numpy's strided copies: compiled versions measured no faster (both are bound by memory
traffic and, for fresh buffers, by page faults; see :func:`retain_freed_memory`).  The numpy body stays the reference, and the path
for CuPy arrays and other dtypes.  Every kernel gives the reference's values bit for bit except the
BatchNorm ones (float64 sums; equal to float32 rounding).  ``use_fast_ops(False)`` (or the
``reference_ops()`` context) selects the reference bodies everywhere, for tests and benchmarks.

Float convolutions on numpy float32 run without im2col (:func:`conv2d_direct`, the implicit-GEMM kernels
of ``lowbit.kernels.float_conv``; an inference forward with few input channels :func:`conv2d_few_channels`);
they agree with the im2col reference to float32 rounding, not bit for bit.  ``use_direct_conv(False)``
(or ``LOWBIT_CONV=im2col`` in the environment) keeps the im2col path with the other fast ops on;
the padding must be smaller than the kernel (else im2col runs).
"""
from __future__ import annotations

import contextlib
import functools
import os

import numpy as np

from .backend import get_array_module

__all__ = [
    "use_fast_ops",
    "fast_ops_enabled",
    "reference_ops",
    "relu",
    "relu_backward",
    "sign",
    "ste_grad",
    "batchnorm_axes",
    "batchnorm_forward",
    "batchnorm_backward",
    "adam_update",
    "fast_arrays",
    "channels_last",
    "blas_held",
    "matmul",
    "conv_output_size",
    "pad2d",
    "im2col",
    "col2im",
    "pool_forward",
    "pool_backward",
    "use_direct_conv",
    "direct_conv_enabled",
    "direct_conv_available",
    "direct_conv_cache",
    "conv2d_direct",
    "conv2d_direct_backward",
    "im2col_layout",
    "few_channel_conv_available",
    "conv2d_few_channels",
]


_fast_ops = True
_CONV_PATHS = ("direct", "im2col")


def _conv_path_from_environment():
    value = os.environ.get("LOWBIT_CONV", "direct").strip().lower() or "direct"
    if value not in _CONV_PATHS:
        raise ValueError(f"LOWBIT_CONV must be one of {_CONV_PATHS}, got {value!r}")
    return value == "direct"


_direct_conv = _conv_path_from_environment()


def use_fast_ops(enabled: bool = True) -> bool:
    """Select the compiled CPU kernels (True, the default) or the numpy reference bodies (False) for
    the ops that have both; returns the previous setting."""
    global _fast_ops
    previous = _fast_ops
    _fast_ops = bool(enabled)
    return previous


def fast_arrays(*arrays) -> bool:
    """True when the compiled kernels take these arrays: fast ops on, all numpy float32."""
    return _fast(*arrays)


def fast_ops_enabled() -> bool:
    return _fast_ops


@contextlib.contextmanager
def reference_ops():
    """``with reference_ops(): ...`` runs the numpy reference bodies, then restores the setting."""
    previous = use_fast_ops(False)
    try:
        yield
    finally:
        use_fast_ops(previous)


def _fast(*arrays):
    """True when the compiled kernels take these arrays: fast ops on, all numpy float32."""
    if not _fast_ops:
        return False
    for a in arrays:
        if type(a) is not np.ndarray or a.dtype != np.float32:
            return False
    return True


def _same_layout(*arrays):
    """The arrays (of one shape) as an elementwise kernel takes them: in the memory layout of the
    first, which may be C-contiguous or a permuted view of a C-contiguous buffer (a convolution's
    NCHW view of its CNHW output).  Only arrays in another layout are copied, into the first's, so
    the result (made in that layout too) stays in it for the next layer."""
    first = arrays[0]
    if _kernels().dense_flat(first) is None:
        first = np.ascontiguousarray(first)
    out = [first]
    for a in arrays[1:]:
        if a.strides != first.strides and not (a.flags.c_contiguous and first.flags.c_contiguous):
            copy = np.empty_like(first)
            np.copyto(copy, a)
            a = copy
        out.append(a)
    return out


def _kernels():
    from lowbit.kernels import float_ops  # deferred: importing Numba kernels costs at first use only

    return float_ops


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
    if _fast_ops and not _blas_held and type(a) is np.ndarray and type(b) is np.ndarray and a.ndim == b.ndim == 2 \
            and a.shape[0] * a.shape[1] * b.shape[1] < _SMALL_GEMM:
        with blas_controller().limit(limits=1, user_api="blas"):
            return _matmul(a, b, keep_float32)
    return _matmul(a, b, keep_float32)


# Products of fewer multiply-adds than this (a classifier's dense layers, a first convolution's
# im2col GEMMs) run on one BLAS thread while the fast ops are on: a threaded OpenBLAS call leaves its
# workers spinning for a while afterwards, on the cores that the Numba kernels of the next layers
# need (deep_convnet at 2 threads on the quiet 2-core AMD EPYC: 83 ms a step with numpy's BLAS on
# two threads, 46 ms with it on one), and at these sizes one thread is about as fast.
_SMALL_GEMM = 1 << 24
_blas_held = 0  # depth of one_blas_thread() contexts that hold BLAS to one thread


def blas_held() -> bool:
    """True inside :func:`one_blas_thread` (numpy's BLAS held to one thread)."""
    return _blas_held > 0


@contextlib.contextmanager
def one_blas_thread(enabled=True):
    """``with one_blas_thread(): ...`` runs numpy's BLAS on one thread inside (every product, whatever
    its size), then restores its thread count; a no-op when not ``enabled``.  Inside, the float
    kernels of ``lowbit.kernels.float_ops`` run on Numba's threads: their one-thread default guards
    them against those spinning workers, which are now held.

    For passes that interleave BLAS products with the parallel Numba kernels (a model whose
    convolutions run on ``lowbit.kernels``, see :meth:`lowbit.model.Model.forward`): after a
    product on several threads OpenBLAS's idle workers spin for up to about 0.1 s on the cores
    those kernels need.  The results do not depend on BLAS's thread count, nor on the float kernels'.
    """
    global _blas_held
    if not enabled:
        yield
        return
    with blas_controller().limit(limits=1, user_api="blas"):
        _blas_held += 1
        kernel_threads = _kernels().set_threads(None)
        try:
            yield
        finally:
            _kernels().set_threads(kernel_threads)
            _blas_held -= 1


@functools.lru_cache(maxsize=1)
def blas_controller():
    """One threadpoolctl controller for the process (its scan of the loaded libraries costs about a
    millisecond), made after numpy has loaded its BLAS."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _matmul(a, b, keep_float32):
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


def channels_last(x):
    """True when ``x`` (N, C, H, W) is an NCHW view of a C-contiguous NHWC buffer and not itself
    C-contiguous (the layout of a direct convolution's output)."""
    return x.ndim == 4 and not x.flags.c_contiguous and x.transpose(0, 2, 3, 1).flags.c_contiguous


def pool_forward(x, kh: int, kw: int, stride: int, padding: int, mode: str):
    """Max or average pooling of ``x`` (N, C, H, W).

    Returns ``(out, argmax)``; ``argmax`` (int8 tap index, first maximum wins on ties) is ``None`` for
    average pooling.  Padding is -inf for max pooling and counts as zero for average pooling
    (``count_include_pad``, the divisor is always KH*KW).
    """
    xp = get_array_module(x)
    if mode == "max" and _fast(x):
        if padding == 0 and channels_last(x):  # a direct convolution's output: pool it as it lies
            out, arg = _kernels().maxpool2d_nhwc(x.transpose(0, 2, 3, 1), kh, kw, stride)
            return out.transpose(0, 3, 1, 2), arg.transpose(0, 3, 1, 2)
        return _kernels().maxpool2d(np.ascontiguousarray(x), kh, kw, stride, padding)
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
    if mode == "max" and _fast(dout) and isinstance(argmax, np.ndarray):
        if padding == 0 and stride >= kh and stride >= kw and channels_last(argmax):
            n, c, h, w = x_shape
            dx = _kernels().maxpool2d_nhwc_backward(np.ascontiguousarray(dout.transpose(0, 2, 3, 1)),
                                                    argmax.transpose(0, 2, 3, 1), (n, h, w, c), kh, kw, stride)
            return dx.transpose(0, 3, 1, 2)
        return _kernels().maxpool2d_backward(np.ascontiguousarray(dout), np.ascontiguousarray(argmax),
                                             tuple(x_shape), kh, kw, stride, padding)
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


def relu(x):
    """``where(x > 0, x, 0)`` (NaN and -0.0 give +0.0); keep the output for :func:`relu_backward`."""
    if _fast(x):
        return _kernels().relu(*_same_layout(x))
    # a select, not x * mask: numpy has no vectorised float16 multiply, and where() copies bits
    return get_array_module(x).where(x > 0, x, x.dtype.type(0))


def relu_backward(y, dout):
    """Gradient of :func:`relu` from its output ``y``: ``where(y > 0, dout, 0)`` (``y > 0`` exactly
    where the input was)."""
    if _fast(y, dout) and y.shape == dout.shape:
        return _kernels().relu_backward(*_same_layout(y, dout))
    return get_array_module(dout).where(y > 0, dout, dout.dtype.type(0))


def sign(x, owner="sign"):
    """``+1 where x >= 0 else -1`` in the dtype of ``x`` (``sign(-0.0) = +1``).

    Raises ``ValueError`` naming ``owner`` when ``x`` holds NaN (it has no sign), and ``TypeError``
    when ``x`` is not a float array.  On numpy float32, the check and the signs are one pass.
    """
    dtype = getattr(x, "dtype", None)
    if dtype is None or dtype.kind != "f":
        raise TypeError(
            f"{owner} expects a float array, got "
            f"{'dtype ' + str(dtype) if dtype is not None else type(x).__name__}"
        )
    if _fast(x):
        q, has_nan = _kernels().sign_ste(*_same_layout(x))
    else:
        has_nan = bool(get_array_module(x).isnan(x).any())
        if not has_nan:
            q = (x >= 0).astype(x.dtype)
            q *= 2
            q -= 1
    if has_nan:
        raise ValueError(f"{owner} got NaN input (NaN has no quantized value)")
    return q


def ste_grad(x, dout, clip):
    """Straight-through gradient of a clipped rounding: ``dout * (|x| <= clip)``."""
    if _fast(x, dout) and x.shape == dout.shape:
        return _kernels().ste_grad(*_same_layout(x, dout), clip)
    return dout * (abs(x) <= clip)


def batchnorm_forward(x, gamma, beta, eps):
    """Training-mode batch normalisation over every axis but 1 of ``x`` (N, C) or (N, C, H, W).

    Returns ``(out, xn, mean, var, inv_std)``: ``out = gamma * xn + beta`` with
    ``xn = (x - mean) * inv_std``, ``inv_std = 1 / sqrt(var + eps)``, the biased batch variance, and
    per-channel arrays (C,) in the dtype of ``x``.
    """
    if _fast(x, gamma, beta) and x.ndim in (2, 4):
        # a channels-last view (a convolution's training output) is read as it lies, and the outputs
        # keep that layout for the sign and convolution that follow
        x = x if channels_last(x) else np.ascontiguousarray(x)
        return _kernels().batchnorm_forward(x, np.ascontiguousarray(gamma), np.ascontiguousarray(beta), eps)
    xp = get_array_module(x)
    axes, bshape = batchnorm_axes(x)
    mean = x.mean(axis=axes)
    xc = x - mean.reshape(bshape)
    var = (xc * xc).mean(axis=axes)
    inv_std = (1.0 / xp.sqrt(var + np.float32(eps))).astype(x.dtype, copy=False)
    xn = xc * inv_std.reshape(bshape)
    out = gamma.reshape(bshape) * xn + beta.reshape(bshape)
    return out, xn, mean, var, inv_std


def batchnorm_backward(dout, xn, gamma, inv_std):
    """Gradient of training-mode :func:`batchnorm_forward` from its cached ``xn`` and ``inv_std``:
    ``(dx, dgamma, dbeta)``."""
    if _fast(dout, xn, gamma, inv_std) and dout.ndim in (2, 4) and dout.shape == xn.shape:
        if channels_last(xn):  # the forward's layout: dout is brought to it (a copy only if it differs)
            xn, dout = _same_layout(xn, dout)
        else:
            xn, dout = np.ascontiguousarray(xn), np.ascontiguousarray(dout)
        return _kernels().batchnorm_backward(dout, xn, np.ascontiguousarray(gamma),
                                             np.ascontiguousarray(inv_std))
    axes, bshape = batchnorm_axes(dout)
    dbeta = dout.sum(axis=axes)
    dgamma = (dout * xn).sum(axis=axes)
    dxn = dout * gamma.reshape(bshape)
    # d/dx of (x - mean) * inv_std with batch statistics, in the compact form.
    dx = (dxn - dxn.mean(axis=axes).reshape(bshape)
          - xn * (dxn * xn).mean(axis=axes).reshape(bshape)) * inv_std.reshape(bshape)
    return dx, dgamma, dbeta


def batchnorm_axes(x):
    """BatchNorm's reduction axes and the broadcast shape of per-channel arrays for (N, C) or (N, C, H, W)."""
    if x.ndim == 2:
        return (0,), (1, -1)
    if x.ndim == 4:
        return (0, 2, 3), (1, -1, 1, 1)
    raise ValueError(f"BatchNorm expects (N, C) or (N, C, H, W), got shape {x.shape}")


def adam_update(param, grad, m, v, c1, c2, step, eps, bounds=None):
    """Adam's update of ``param`` and its moments in place: ``m += c1 (g - m); v += c2 (g^2 - v);
    param -= step * m / (sqrt(v) + eps)``, float32 scalars; then ``clip(param, *bounds)`` when
    ``bounds`` is given."""
    if (_fast(param, grad, m, v) and param.flags.c_contiguous and grad.shape == param.shape
            and m.flags.c_contiguous and v.flags.c_contiguous):
        _kernels().adam_update(param, np.ascontiguousarray(grad), m, v, c1, c2, step, eps, bounds)
        return
    xp = get_array_module(param)
    m += np.float32(c1) * (grad - m)
    v += np.float32(c2) * (grad * grad - v)
    param -= np.float32(step) * m / (xp.sqrt(v) + np.float32(eps))
    if bounds is not None:
        xp.clip(param, bounds[0], bounds[1], out=param)


# -- float convolution without im2col --------------------------------------------------------------


def use_direct_conv(enabled: bool = True) -> bool:
    """Run float32 numpy convolutions on the direct kernels (True, the default unless
    ``LOWBIT_CONV=im2col``) or through im2col and a BLAS GEMM (False); returns the previous setting.
    ``use_fast_ops(False)`` selects im2col regardless."""
    global _direct_conv
    previous = _direct_conv
    _direct_conv = bool(enabled)
    return previous


def direct_conv_enabled() -> bool:
    return _direct_conv


def _conv_kernels():
    from lowbit.kernels import float_conv  # deferred like _kernels()

    return float_conv


def direct_conv_available(x, w, padding: int, train: bool = True) -> bool:
    """True when :func:`conv2d_direct` takes input ``x`` and weights ``w`` (O, C, KH, KW): fast ops
    and direct convolutions on, both numpy float32, ``padding`` smaller than the kernel.

    ``train=False`` (an inference forward, whose output must be copied to the im2col path's layout,
    :func:`im2col_layout`) also asks that the input have more than a quarter vector of channels;
    fewer (a first layer on gray or RGB images) run :func:`conv2d_few_channels` instead."""
    available = _direct_conv and _fast(x, w) and w.ndim == 4 and padding < min(w.shape[2], w.shape[3])
    return available and (train or not _few_channels(w.shape[1]))


def few_channel_conv_available(x, w, padding: int) -> bool:
    """True when an inference forward of ``x`` with ``w`` runs on :func:`conv2d_few_channels` (not im2col)."""
    return direct_conv_available(x, w, padding) and _few_channels(w.shape[1])


def conv2d_few_channels(x, w, b, stride: int, padding: int):
    """Inference forward on ``lowbit.kernels.few_channel_conv`` (im2col's values to float32 rounding, its layout)."""
    return _conv_kernels().few_channel_conv2d(np.ascontiguousarray(x), w, b, stride, padding)


def _few_channels(channels):
    """At most a quarter vector of input channels (a first layer on gray or RGB images): the direct
    kernels' register blocks would then compute mostly padding channels, so their backward-data takes
    the GEMM (im2col) path and an inference forward the few-channel kernel."""
    return 4 * channels <= _conv_kernels().LANES


def direct_conv_cache(x, padding: int, stride: int = 1):
    """What :func:`conv2d_direct_backward` needs of the input ``x`` (N, C, H, W) float32: its
    zero-padded channels-last copy (for a convolution whose forward ran elsewhere, e.g. on the
    binary kernels)."""
    return _conv_kernels().padded_input(x, padding, stride)


def conv2d_direct(x, w, b, stride: int, padding: int):
    """Float32 convolution of ``x`` (N, C, H, W) with ``w`` (O, C, KH, KW) plus ``b`` (O,) or None,
    on the direct kernels (check :func:`direct_conv_available` first).

    Returns ``(out, cache)``: ``out`` (N, O, OH, OW) float32, an NCHW view of a channels-last
    buffer (the elementwise kernels keep that layout, and the next convolution reads it in one
    pass), and ``cache`` for :func:`conv2d_direct_backward`.
    """
    b = None if b is None else np.asarray(b, dtype=np.float32)
    return _conv_kernels().conv2d_forward(x, w, b, stride, padding)


def im2col_layout(out):
    """``out`` (N, O, OH, OW) as the im2col path lays a convolution's output out in memory,
    ``(O, N, OH, OW)`` (an NCHW view of it): the same values, and what packed models mirror."""
    return out.transpose(1, 0, 2, 3).copy().transpose(1, 0, 2, 3)


def conv2d_direct_backward(dout, cache, w, stride: int, padding: int, input_grad: bool = True):
    """Gradients of :func:`conv2d_direct`: ``(dx, dW, db)`` from ``dout`` (N, O, OH, OW), the
    forward's ``cache`` (or :func:`direct_conv_cache` of its input) and ``w``; all float32.
    ``dx`` is None with ``input_grad=False`` (a model's first layer: nothing reads it).

    With at most a quarter vector of input channels (a network's first layer on gray or RGB images)
    ``dx`` comes from one GEMM and col2im (:func:`_gemm_backward_data`): the register blocks would
    compute mostly padding channels.  Otherwise ``dx`` is an NCHW view of a channels-last buffer.
    """
    kernels = _conv_kernels()
    dout = dout.astype(np.float32, copy=False)
    n, hp, wp, c = cache.shape
    x_shape = (n, c, hp - 2 * padding, wp - 2 * padding)
    dw, db = kernels.conv2d_backward_weights(dout, cache, w.shape, stride)
    if not input_grad:
        dx = None
    elif _few_channels(c):
        dx = _gemm_backward_data(dout, w, x_shape, stride, padding)
    else:
        dx = kernels.conv2d_backward_data(dout, w, x_shape, stride, padding)
    return dx, dw, db


def _gemm_backward_data(dout, w, x_shape, stride, padding):
    """``dx`` of a float32 convolution: the patch gradients as one GEMM of the channels-last output
    gradient (N * OH * OW, O) with ``w`` (O, C * KH * KW), summed back by :func:`col2im`."""
    o, c, kh, kw = w.shape
    n, _, oh, ow = dout.shape
    rows = dout.transpose(0, 2, 3, 1).reshape(-1, o)  # no copy when dout is channels-last
    patches = matmul(rows, w.reshape(o, -1)).reshape(n, oh, ow, c, kh, kw)
    return col2im(patches.transpose(3, 4, 5, 0, 1, 2), x_shape, stride, padding)
