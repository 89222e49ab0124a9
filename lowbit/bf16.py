"""bfloat16 backward products of the binary layers (issue 21, item 3); off by default.

A binary layer's two backward products each have one operand that bfloat16 holds exactly: the +-1
weights in ``dx = dy @ W.T``, the +-1 (or dropout's {0, +-c}) inputs in ``dW = x.T @ dy``.  A bf16
GEMM with float32 accumulation therefore changes one thing: ``dy`` rounded to bfloat16 (8 significant
bits) before the products.  Inside :func:`bf16_backward` the quantized layers whose weights are +-1
round ``dy`` once (their ``product_grad`` hook; ``db`` is then summed from the rounded ``dy`` too) and
run their products on one of two backends, :func:`bf16_backend` says which:

``"avx512_bf16"``
    ``lowbit.kernels.bf16_gemm`` (``vdpbf16ps``; Numba, numpy float32 arrays, a CPU with AVX-512
    BF16): the dense layers' ``dx`` product, and their ``dW`` product where the input is exact in
    bfloat16 (+-1, or dropout's {0, +-2} after +-1; checked, ``lowbit.kernels.bf16_exact``).  A ``dW``
    whose input bfloat16 does not hold (a first layer's pixels) stays on numpy's float32 GEMM of the
    rounded ``dy``, so the values multiplied are the emulation's; only the summation order differs
    (the kernel's is fixed, see ``kernels/bf16.py``), so results are close to the emulated
    backend's but not bit-equal.  Convolutions keep the emulated backend.
``"emulated"``
    numpy's float32 GEMMs of the rounded ``dy``: the same rounding, no faster (one more pass).  Used
    where the kernel is not available (another CPU, CuPy arrays, ``lowbit.functions.reference_ops``),
    or when asked for with ``bf16_backward(backend="emulated")``.

Nothing in lowbit turns it on; ``experiments/bf16_backward_accuracy.py`` measures what it does to
accuracy and ``experiments/bench_bf16_backward.py`` to speed.
"""
from __future__ import annotations

import contextlib

import numpy as np

from .backend import get_array_module
from .functions import blas_held, fast_arrays, fast_ops_enabled, matmul

__all__ = ["round_bfloat16", "bf16_backward", "bf16_backward_enabled", "bf16_backend", "bf16_product",
           "bf16_exact_operand", "BACKENDS"]

BACKENDS = ("avx512_bf16", "emulated")

_enabled = False
_backend = None  # None: the kernel where available; "emulated": always emulated


def round_bfloat16(x):
    """float32 ``x`` rounded to the nearest bfloat16 (ties to even), returned as float32 (the low 16
    bits zero).  NaN stays NaN; values past bfloat16's range round to +-inf as the hardware does."""
    xp = get_array_module(x)
    if x.dtype != np.float32:
        raise TypeError(f"round_bfloat16 expects float32, got {x.dtype}")
    bits = xp.ascontiguousarray(x).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = xp.where(nan, bits | np.uint32(0x00400000), rounded)  # quiet NaN, not rounded into inf
    return rounded.view(np.float32).reshape(x.shape)


@contextlib.contextmanager
def bf16_backward(enabled=True, backend=None):
    """``with bf16_backward(): ...`` rounds ``dy`` to bfloat16 in the backward of every quantized layer
    whose weights are +-1 (:meth:`lowbit.quant_layers.QuantAffine.binary_operands` or
    ``binary_weight_float_input``) and runs their products in bfloat16 (module docstring);
    ``backend="emulated"`` keeps numpy's float32 products of the rounded ``dy`` even where the
    kernel is available.  Restores the previous settings after."""
    global _enabled, _backend
    if backend not in (None, *BACKENDS):
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    if backend == "avx512_bf16" and enabled and not _kernel_available():
        raise RuntimeError("backend='avx512_bf16' needs lowbit.kernels.bf16_available() (a CPU with AVX-512 BF16) "
                           "and the fast ops on")
    previous = _enabled, _backend
    _enabled, _backend = bool(enabled), ("emulated" if backend == "emulated" else None)
    try:
        yield
    finally:
        _enabled, _backend = previous


def bf16_backward_enabled() -> bool:
    return _enabled


def _kernel_available():
    if not fast_ops_enabled():
        return False
    from lowbit.kernels import bf16_available  # deferred: importing Numba kernels costs at first use only

    return bf16_available()


def bf16_backend() -> str:
    """``"avx512_bf16"`` when :func:`bf16_backward` runs the dense products on ``lowbit.kernels.bf16_gemm``
    (numpy float32 operands), else ``"emulated"``."""
    return "emulated" if _backend == "emulated" or not _kernel_available() else "avx512_bf16"


def bf16_exact_operand(x) -> bool:
    """True when numpy float32 ``x`` holds only bfloat16 values (its products may run on the kernel
    without rounding it); False for any other array."""
    if not fast_arrays(x):
        return False
    from lowbit.kernels import bf16_exact

    return bf16_exact(x)


def bf16_product(a, b):
    """``a @ b`` for a backward product whose operands bfloat16 holds (the caller knows it): on
    ``lowbit.kernels.bf16_gemm`` where :func:`bf16_backend` is ``"avx512_bf16"`` and both are numpy
    float32, else :func:`lowbit.functions.matmul`.

    The kernel runs on one Numba thread unless numpy's BLAS is held to one
    (:func:`lowbit.functions.one_blas_thread`), as ``bit_products.masked_binary_matmul``: beside the
    threaded BLAS products of the same step, OpenMP's and OpenBLAS's idle workers spin on each
    other's cores (bnn_mlp 3x1024 at 2 threads on the shared 2-core AMD EPYC: about 2,400 images/s
    with the kernel on two threads, 5,200 on one, 4,400-5,900 in float32)."""
    if bf16_backend() == "avx512_bf16" and fast_arrays(a, b):
        from lowbit.kernels import bf16_gemm, float_ops

        return float_ops.run_on_threads(None if blas_held() else 1, bf16_gemm, a, b)
    return matmul(a, b)
