"""Weight encodings of float stages: the most compact form that rebuilds a kernel bit for bit."""
from __future__ import annotations

import numpy as np

from ..backend import to_numpy
from ..layers import Affine
from ..quantizers import get_quantizer
from .common import check_array, kernels_module, words_for

def pack_codes(codes, bits):
    """Pack unsigned integer codes of ``bits`` bits each into a uint8 stream (MSB of each code first).

    Parameters
    ----------
    codes : numpy.ndarray, uint8, any shape
        Values in ``[0, 2^bits)``.
    bits : int in 1..8

    Returns
    -------
    numpy.ndarray, uint8, shape (ceil(codes.size * bits / 8),)
    """
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if codes.size and int(codes.max()) >= 2 ** bits:
        raise ValueError(f"codes must be < 2**{bits}, got a maximum of {int(codes.max())}")
    planes = np.unpackbits(codes[:, None], axis=1)[:, 8 - bits:]
    return np.packbits(planes.reshape(-1))


def unpack_codes(packed, bits, count):
    """Inverse of :func:`pack_codes`: ``count`` uint8 codes of ``bits`` bits each."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise ValueError(f"packed codes must be a 1-D uint8 array, got {packed.dtype}{packed.shape}")
    need = (count * bits + 7) // 8
    if packed.size != need:
        raise ValueError(f"{count} codes of {bits} bits need {need} bytes, got {packed.size}")
    planes = np.unpackbits(packed)[:count * bits].reshape(count, bits)
    full = np.zeros((count, 8), dtype=np.uint8)
    full[:, 8 - bits:] = planes
    return np.packbits(full, axis=1).reshape(count)


def _same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(
        a.view(np.uint32) if a.dtype == np.float32 else a, b.view(np.uint32) if b.dtype == np.float32 else b)


def _sign_encoding(w, channel_axis):
    out_channels = w.shape[channel_axis]
    moved = np.ascontiguousarray(np.moveaxis(w, channel_axis, 0)).reshape(out_channels, -1)
    magnitude = np.abs(moved)
    alpha = magnitude.max(axis=1) if moved.size else np.ones(out_channels, np.float32)
    if moved.size and not np.array_equal(magnitude.min(axis=1), alpha):
        return None
    scaled = not np.all(alpha == 1)
    info = {"encoding": "signs", "shape": list(w.shape), "channel_axis": int(channel_axis), "scaled": scaled}
    arrays = {"bits": kernels_module().pack_signs(moved)}
    if scaled:
        arrays["scale"] = alpha.astype(np.float32)
    return info, arrays


def encode_kernel(w_eff, channel_axis, quantizer=None, latent=None):
    """The most compact encoding of a float32 kernel that :func:`decode_kernel` rebuilds bit for bit.

    Tried in order: ``"signs"`` (every output unit is ``+-alpha_c``: sign bits packed per unit, plus
    a float32 ``scale`` (O,) unless every ``alpha_c`` is 1), ``"codes"`` (the quantizer has
    ``codes``/``from_codes``: k-bit codes packed by :func:`pack_codes`, plus the quantizer's
    parameters as float32 arrays), ``"float16"`` and ``"float32"``.  Each candidate is decoded and
    compared bit for bit with ``w_eff`` before it is accepted.

    Parameters
    ----------
    w_eff : numpy.ndarray, float32
        The kernel the layer multiplies by (``quantized_kernel()``, or ``W`` of a float layer).
    channel_axis : int
        Axis of the output units (1 for Affine ``(in, out)``, 0 for Conv2D ``(O, C, KH, KW)``).
    quantizer : Quantizer, optional
        The kernel quantizer; used for the ``"codes"`` encoding when it has ``codes``.
    latent : numpy.ndarray, optional
        The latent weights the quantizer maps to ``w_eff`` (needed for ``"codes"``).

    Returns
    -------
    info : dict
        JSON: ``encoding``, ``shape`` and what decoding needs.
    arrays : dict of str -> numpy.ndarray
    """
    w_eff = np.ascontiguousarray(to_numpy(w_eff))
    if w_eff.dtype != np.float32:
        raise TypeError(f"kernels must be float32, got {w_eff.dtype}")
    candidates = []
    if w_eff.ndim >= 2:
        candidates.append(lambda: _sign_encoding(w_eff, channel_axis))
    if quantizer is not None and hasattr(quantizer, "codes") and latent is not None:
        def codes_encoding():
            codes, params = quantizer.codes(np.asarray(to_numpy(latent)), channel_axis=channel_axis)
            info = {"encoding": "codes", "shape": list(w_eff.shape), "quantizer": quantizer.config(),
                    "bits": int(quantizer.precision), "params": sorted(params)}
            arrays = {"codes": pack_codes(to_numpy(codes), quantizer.precision)}
            arrays.update({f"param.{k}": np.asarray(to_numpy(v), np.float32) for k, v in params.items()})
            return info, arrays
        candidates.append(codes_encoding)

    def half():
        return {"encoding": "float16", "shape": list(w_eff.shape)}, {"values": w_eff.astype(np.float16)}

    candidates.append(half)
    for make in candidates:
        with np.errstate(over="ignore", invalid="ignore"):
            encoded = make()
        if encoded is not None and _same_bits(decode_kernel(*encoded), w_eff):
            return encoded
    return {"encoding": "float32", "shape": list(w_eff.shape)}, {"values": w_eff}


def decode_kernel(info, arrays):
    """Rebuild the float32 kernel from :func:`encode_kernel`'s ``(info, arrays)``."""
    if not isinstance(info, dict):
        raise ValueError(f"a kernel encoding must be a dict, got {type(info).__name__}")
    encoding = info.get("encoding")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"kernel shape must be a list of ints, got {shape!r}")
    shape = tuple(shape)
    if encoding == "signs":
        axis = info.get("channel_axis")
        if not isinstance(axis, int) or not -len(shape) <= axis < len(shape):
            raise ValueError(f"channel_axis {axis!r} does not fit a kernel of shape {shape}")
        out_channels = shape[axis]
        k = int(np.prod(shape)) // max(out_channels, 1)
        bits = check_array(arrays, "bits", np.uint64, (out_channels, words_for(k)))
        signs = kernels_module().unpack_signs(np.ascontiguousarray(bits), k, np.float32)
        if info.get("scaled"):
            scale = check_array(arrays, "scale", np.float32, (out_channels,))
            values = np.where(signs > 0, scale[:, None], -scale[:, None]).astype(np.float32)
        else:
            values = signs
        moved_shape = (out_channels,) + tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
        return np.ascontiguousarray(np.moveaxis(values.reshape(moved_shape), 0, axis))
    if encoding == "codes":
        quantizer = get_quantizer(info.get("quantizer"))
        if not hasattr(quantizer, "from_codes"):
            raise ValueError(f"quantizer {quantizer.name!r} has no integer codes")
        count = int(np.prod(shape))
        bits = int(quantizer.precision)
        codes = unpack_codes(check_array(arrays, "codes", np.uint8), bits, count).reshape(shape)
        names = info.get("params", [])
        params = {name: check_array(arrays, f"param.{name}", np.float32) for name in names}
        values = quantizer.from_codes(codes, **params)
        if tuple(values.shape) != shape:
            raise ValueError(f"codes decode to shape {tuple(values.shape)}, expected {shape}")
        return np.ascontiguousarray(values, dtype=np.float32)
    if encoding == "float16":
        return check_array(arrays, "values", np.float16, shape).astype(np.float32)
    if encoding == "float32":
        return np.array(check_array(arrays, "values", np.float32, shape))
    raise ValueError(f"unknown kernel encoding {encoding!r}; known: signs, codes, float16, float32")


def kernel_bits(info):
    """Bits per weight of an encoding (1, k, 16 or 32)."""
    return {"signs": 1, "float16": 16, "float32": 32}.get(info["encoding"], info.get("bits", 32))


def kernel_channel_axis(layer):
    return getattr(layer, "kernel_channel_axis", 1 if isinstance(layer, Affine) else 0)
