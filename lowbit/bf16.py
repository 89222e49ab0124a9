"""bfloat16 rounding of the binary layers' backward products, emulated (issue 21, item 3).

A binary layer's two backward products each have one operand that bfloat16 holds exactly: the +-1
weights in ``dx = dy @ W.T``, the +-1 (or dropout's {0, +-c}) inputs in ``dW = x.T @ dy``.  A bf16
GEMM with float32 accumulation (``vdpbf16ps``, AMX) would therefore change one thing only: ``dy``
rounded to bfloat16 (8 significant bits) before the products.  :func:`bf16_backward` makes exactly
that change on numpy's float32 path, so the accuracy effect of such a backend can be measured
before one is built (``experiments/bf16_backward_accuracy.py``).  It is no faster (one more pass);
it is off by default, and nothing else in lowbit turns it on.
"""
from __future__ import annotations

import contextlib

import numpy as np

from .backend import get_array_module

__all__ = ["round_bfloat16", "bf16_backward", "bf16_backward_enabled"]

_enabled = False


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
def bf16_backward(enabled=True):
    """``with bf16_backward(): ...`` rounds ``dy`` to bfloat16 in the backward of every quantized layer
    whose weights are +-1 (:meth:`lowbit.quant_layers.QuantAffine.binary_operands` or
    ``binary_weight_float_input``), as a bf16 GEMM would; restores the previous setting after."""
    global _enabled
    previous = _enabled
    _enabled = bool(enabled)
    try:
        yield
    finally:
        _enabled = previous


def bf16_backward_enabled() -> bool:
    return _enabled
