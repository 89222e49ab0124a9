"""The quantizer protocol's base: :class:`Quantizer`, :class:`PackedEncoding` and the checks and
roundings every quantizer shares.  The protocol itself and the quantizers are documented in
:mod:`lowbit.quantizers`, which re-exports these names; a new quantizer is written there.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .backend import get_array_module

__all__ = ["PackedEncoding", "Quantizer", "check_bits", "check_float_array", "hard_sigmoid", "nonzero_scale",
           "quantize_k", "uniform_signed_codes"]


def check_float_array(owner, x):
    """``x`` must be a float array without NaN; returns its array module.  ``owner`` (a quantizer,
    or a function's name) names the caller in the errors."""
    name = owner if isinstance(owner, str) else type(owner).__name__
    dtype = getattr(x, "dtype", None)
    if dtype is None or dtype.kind != "f":
        raise TypeError(
            f"{name} expects a float array, got "
            f"{'dtype ' + str(dtype) if dtype is not None else type(x).__name__}"
        )
    xp = get_array_module(x)
    if bool(xp.isnan(x).any()):
        raise ValueError(f"{name} got NaN input (NaN has no quantized value)")
    return xp


def check_bits(name, bits, low, high):
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not low <= bits <= high:
        raise ValueError(f"{name} bits must be an int in {low}..{high}, got {bits!r}")
    return int(bits)


def hard_sigmoid(x):
    """``clip((x + 1) / 2, 0, 1)`` in the dtype of ``x`` (BNN paper, eq. 3)."""
    xp = get_array_module(x)
    one = x.dtype.type(1)
    return xp.clip((x + one) * x.dtype.type(0.5), 0, one)


def quantize_k(x, bits):
    """DoReFa's ``quantize_k(x) = round((2^k - 1) x) / (2^k - 1)`` for ``x`` in [0, 1].

    Rounds half to even (``rint``, as ``tf.round``); the result has the dtype of ``x`` and takes at most
    ``2^k`` values ``j / (2^k - 1)``.
    """
    xp = get_array_module(x)
    n = x.dtype.type(2 ** bits - 1)
    return xp.rint(x * n) / n


@dataclass(frozen=True)
class PackedEncoding:
    """What a quantizer's output is at evaluation, as the converter and the summary need to know it.

    Attributes
    ----------
    bits : int
        Bits per value (1 for signs, k for a k-bit grid, 16 for float16, 32 for float32).
    signed : bool
        The values may be negative.
    levels : int or None
        At most this many distinct values in one tensor, or in one output unit of it with a
        ``"channel"`` scale (None: a float format).
    scale : None, "tensor", "channel" or "range"
        What multiplies the integer grid: nothing (a fixed grid), a scale per tensor or per output
        unit computed from the tensor, or a fixed calibrated range (``max_value``).
    max_value : float or None
        The fixed range of a ``"range"`` scale.
    deterministic : bool
        The output depends on the input alone (a packed model is deterministic, so the converter
        refuses a quantizer without it).
    sign : bool
        The output is exactly ``sign(x)``: +1 where ``x >= 0``, -1 elsewhere, no scale.  The
        converter then stores it as one packed bit and folds the per-channel layers in front of it
        into a threshold.
    passthrough : bool
        The output is the input (no quantization at all).
    codes : bool
        The quantizer has ``codes(x, channel_axis)`` / ``from_codes(codes, **params)``, so a kernel
        can be stored as ``bits``-bit integer codes (:func:`lowbit.packed.encode_kernel`).
    """

    bits: int
    signed: bool = True
    levels: int | None = None
    scale: str | None = None
    max_value: float | None = None
    deterministic: bool = True
    sign: bool = False
    passthrough: bool = False
    codes: bool = False

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 32:
            raise ValueError(f"bits must be an int in 1..32, got {self.bits!r}")
        if self.scale not in (None, "tensor", "channel", "range"):
            raise ValueError(f"scale must be None, 'tensor', 'channel' or 'range', got {self.scale!r}")
        if self.sign and (self.bits != 1 or self.scale is not None or not self.deterministic):
            raise ValueError("sign=True means an unscaled, deterministic 1-bit output (bits=1, scale=None)")
        if self.passthrough and (self.sign or self.codes):
            raise ValueError("a passthrough encoding is neither a sign nor integer codes")

    @property
    def binary(self):
        """One bit per value (a sign, scaled or not)."""
        return self.bits == 1


class Quantizer:
    """Base class; see the module docstring for the protocol."""

    name = "quantizer"
    precision = 32

    def __call__(self, x, train=False, channel_axis=None):
        return self.forward(x, train, channel_axis)

    def forward(self, x, train=False, channel_axis=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, x, dout, channel_axis=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict:
        return {"name": self.name}

    def packed_encoding(self) -> PackedEncoding:
        """The :class:`PackedEncoding` of this quantizer's evaluation-mode output (every concrete
        quantizer says it; nothing is inferred from its class)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not describe its packed encoding: implement packed_encoding() "
            "(see lowbit.quantizers.PackedEncoding)")

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        """Equal type and config (a stochastic quantizer's generator state is not compared)."""
        return type(other) is type(self) and other.config() == self.config()

    def __hash__(self):
        return hash((type(self).__name__, json.dumps(self.config(), sort_keys=True)))


def nonzero_scale(alpha):
    """``alpha`` with its zeros (all-zero units) set to 1, so that ``x / alpha`` is 0 / 1, not 0 / 0."""
    return alpha + (alpha == 0).astype(alpha.dtype)


def uniform_signed_codes(xp, x, alpha, m):
    """UniformWeight's rounding: ``rint(clip(x / alpha, -1, 1) * m)``, integers in ``[-m, m]``."""
    one = x.dtype.type(1)
    return xp.rint(xp.clip(x / alpha, -one, one) * m)
