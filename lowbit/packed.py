"""Packed inference models: a list of stages that run a converted model on packed sign bits.

:func:`lowbit.convert.convert` turns a trained :class:`~lowbit.Model` into a :class:`PackedModel`;
this module holds what runs and stores it.  A packed model is a chain of *stages*; each stage takes
one array and returns one, in one of three domains:

``float``
    float32 arrays in the layout the training-time simulation uses: NCHW ``(N, C, H, W)`` or
    ``(N, D)``.
``packed``
    uint64 sign bits (the bit convention of :mod:`lowbit.kernels`): NHWC ``(N, H, W, ceil(C/64))``
    for feature maps, ``(N, ceil(D/64))`` for vectors.  A feature map that the model has flattened
    stays NHWC in memory (layout ``nhwc_flat``); the dense layer that reads it has its weight rows
    permuted to match.
``acc``
    int32 accumulators of a binary layer: NHWC ``(N, OH, OW, O)`` or ``(N, O)``.

Stages
------
=================  =============  ==========================================================
``float``          float -> float  ordinary lowbit layers, run as in the simulation
``pack``           float -> packed ``threshold_signs``: sign, or per-channel float thresholds that
                                   stand for the BatchNorm/ReLU/Rescale before it (NCHW -> NHWC)
``binary_dense``   packed -> acc   ``xnor_gemm`` (minus the per-pixel padding agreements)
``binary_conv``    packed -> acc   ``binary_conv2d``
``int_maxpool``    acc -> acc      max-pooling of the integer accumulators (older files)
``threshold``      acc -> packed   ``threshold_pack``: a fused (bias, scale, BatchNorm, ..., sign)
``threshold_maxpool`` acc -> packed ``threshold_maxpool_pack``: ``int_maxpool`` + ``threshold``
``bitplane_dense`` float -> packed ``PixelCodes`` + a binary dense first layer, on the codes by bit planes
``packed_maxpool`` packed -> packed ``maxpool_packed`` (OR of sign bits)
``flatten``        packed -> packed NHWC relabelled as the simulation's flattened NCHW (no work)
``acc_to_float``   acc -> float    ``acc * scale + bias`` in float32, in the simulation's layout
``unpack``         packed -> float ``unpack_signs`` to +-1 (NHWC -> NCHW)
``residual``       float -> float  ``body(x) + shortcut(x)``, each an inner chain of stages (a Residual block
                                   whose binary convolution runs on bits)
=================  =============  ==========================================================

Every stage names its input and output as ``[domain, layout, dims]`` (``dims`` per example:
``[C, H, W]`` for ``nhwc``/``nhwc_flat``, ``[D]`` for ``dense``; the float domain gives the
simulation's shape) and :class:`PackedModel` checks that consecutive stages agree, so a file whose
stages were edited or reordered is refused with a clear message.

Weights of float stages are stored in the most compact encoding that rebuilds them bit for bit
(:func:`encode_kernel`): sign bits (+ a per-channel scale), k-bit integer codes (+ the quantizer's
parameters), float16, or float32.  The file format is described in ``docs/packed_format.md``.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time

import numpy as np

from .backend import get_array_module, is_cupy_array, to_device, to_numpy
from .io import ModelFileError, read_archive, write_archive
from .layers import Affine, Conv2D, PixelCodes, Sequential, layer_from_config
from .model import Classifier, check_no_nan
from .quantizers import get_quantizer

__all__ = [
    "PackedModel",
    "STAGES",
    "Stage",
    "FloatStage",
    "PackStage",
    "BinaryDenseStage",
    "BinaryConvStage",
    "IntMaxPoolStage",
    "ThresholdStage",
    "PackedMaxPoolStage",
    "AccToFloatStage",
    "UnpackStage",
    "FlattenStage",
    "ResidualStage",
    "encode_kernel",
    "decode_kernel",
    "pack_codes",
    "unpack_codes",
    "load_packed",
    "load_any",
    "PACKED_FORMAT",
]

PACKED_FORMAT = "lowbit.packed"


@functools.lru_cache(maxsize=1)
def _blas_controller():
    """One threadpoolctl controller for the process: made once (its scan of the loaded libraries
    costs about 0.5 ms), after numpy has loaded its BLAS."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _kernels():
    # lowbit.kernels imports Numba; load it when a packed model first runs, not on ``import lowbit``.
    from . import kernels

    return kernels


def _words(k):
    return (int(k) + 63) // 64


# -- domain specs ---------------------------------------------------------------------------------
_LAYOUTS = {"float": (None,), "packed": ("nhwc", "nhwc_flat", "dense"), "acc": ("nhwc", "dense")}


def make_spec(domain, layout, dims):
    """A validated ``(domain, layout, dims)`` tuple (see the module docstring)."""
    if domain not in _LAYOUTS:
        raise ValueError(f"domain must be one of {sorted(_LAYOUTS)}, got {domain!r}")
    if layout not in _LAYOUTS[domain]:
        raise ValueError(f"layout of a {domain} array must be one of {list(_LAYOUTS[domain])}, "
                         f"got {layout!r}")
    if not isinstance(dims, (list, tuple)) or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in dims):
        raise ValueError(f"dims must be a list of positive ints, got {dims!r}")
    dims = tuple(int(d) for d in dims)
    expected = {"nhwc": 3, "nhwc_flat": 3, "dense": 1}.get(layout)
    if expected is not None and len(dims) != expected:
        raise ValueError(f"layout {layout!r} needs {expected} dims, got {list(dims)}")
    return (domain, layout, dims)


def spec_from_json(value):
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"a domain spec must be [domain, layout, dims], got {value!r}")
    return make_spec(value[0], value[1], value[2])


def spec_to_json(spec):
    return [spec[0], spec[1], list(spec[2])]


def sim_shape(spec):
    """Per-example shape of the array the simulation holds at this point."""
    domain, layout, dims = spec
    if layout == "nhwc_flat":
        return (dims[0] * dims[1] * dims[2],)
    return dims


def describe_spec(spec):
    domain, layout, dims = spec
    shape = "(" + ", ".join(str(d) for d in sim_shape(spec)) + ")"
    return shape if domain == "float" else f"{shape} {domain}"


# -- weight encodings -----------------------------------------------------------------------------
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
    arrays = {"bits": _kernels().pack_signs(moved)}
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


def _check_array(arrays, name, dtype, shape=None):
    if name not in arrays:
        raise ValueError(f"array {name!r} is missing")
    arr = arrays[name]
    if arr.dtype != np.dtype(dtype):
        raise ValueError(f"array {name!r} must be {np.dtype(dtype).name}, got {arr.dtype.name}")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise ValueError(f"array {name!r} must have shape {tuple(shape)}, got {tuple(arr.shape)}")
    return arr


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
        bits = _check_array(arrays, "bits", np.uint64, (out_channels, _words(k)))
        signs = _kernels().unpack_signs(np.ascontiguousarray(bits), k, np.float32)
        if info.get("scaled"):
            scale = _check_array(arrays, "scale", np.float32, (out_channels,))
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
        codes = unpack_codes(_check_array(arrays, "codes", np.uint8), bits, count).reshape(shape)
        names = info.get("params", [])
        params = {name: _check_array(arrays, f"param.{name}", np.float32) for name in names}
        values = quantizer.from_codes(codes, **params)
        if tuple(values.shape) != shape:
            raise ValueError(f"codes decode to shape {tuple(values.shape)}, expected {shape}")
        return np.ascontiguousarray(values, dtype=np.float32)
    if encoding == "float16":
        return _check_array(arrays, "values", np.float16, shape).astype(np.float32)
    if encoding == "float32":
        return np.array(_check_array(arrays, "values", np.float32, shape))
    raise ValueError(f"unknown kernel encoding {encoding!r}; known: signs, codes, float16, float32")


def kernel_bits(info):
    """Bits per weight of an encoding (1, k, 16 or 32)."""
    return {"signs": 1, "float16": 16, "float32": 32}.get(info["encoding"], info.get("bits", 32))


def kernel_channel_axis(layer):
    return getattr(layer, "kernel_channel_axis", 1 if isinstance(layer, Affine) else 0)


# -- stages ---------------------------------------------------------------------------------------
STAGES: dict[str, type] = {}


def register_stage(cls):
    STAGES[cls.kind] = cls
    return cls


def _int(config, name, minimum=0):
    value = config.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class Stage:
    """One step of a :class:`PackedModel`: ``run(x)`` maps an array of ``input_spec`` to ``output_spec``.

    Subclasses define ``kind`` (the name in files), ``run``, ``config()`` (JSON),
    ``arrays()`` (name -> host array) and ``from_parts(config, arrays)``.
    """

    kind = "stage"
    _array_names: tuple = ()

    def __init__(self, input_spec, output_spec):
        self.input_spec = input_spec
        self.output_spec = output_spec

    def run(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict:
        return {"input": spec_to_json(self.input_spec), "output": spec_to_json(self.output_spec)}

    def arrays(self) -> dict:
        return {name: to_numpy(getattr(self, name)) for name in self._array_names}

    @classmethod
    def from_parts(cls, config, arrays):  # pragma: no cover - abstract
        raise NotImplementedError

    def to_device(self, device):
        for name in self._array_names:
            setattr(self, name, to_device(getattr(self, name), device))
        return self

    def rows(self):
        """``(label, callable)`` pairs that together do ``run`` (one per layer for float stages)."""
        return [(self.kind, self.run)]

    def __repr__(self):
        return f"{type(self).__name__}({describe_spec(self.input_spec)} -> {describe_spec(self.output_spec)})"


def _specs(config):
    return spec_from_json(config.get("input")), spec_from_json(config.get("output"))


@register_stage
class FloatStage(Stage):
    """A run of ordinary lowbit layers, evaluated as in the simulation (``layer.forward(x, False)``).

    Kernels of quantized layers are stored in their compact encoding (:func:`encode_kernel`) and
    rebuilt at load; the layers then carry the rebuilt kernel with an identity kernel quantizer, so
    the product multiplies exactly the values the simulation multiplies.
    """

    kind = "float"

    def __init__(self, layers, input_shape, encodings=None, dtype=np.float32):
        self.layers = list(layers)
        input_shape = tuple(int(s) for s in input_shape)
        shape = Sequential(self.layers).output_shape((1,) + input_shape)[1:]
        super().__init__(make_spec("float", None, input_shape), make_spec("float", None, shape))
        # path -> (info, arrays) of every encoded kernel; computed by prepare_layers at conversion.
        self.encodings = dict(encodings or {})
        # float16: the layers of a half-precision model (Model.astype(np.float16)), run in float16
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float16, np.float32):
            raise ValueError(f"a float stage computes in float32 or float16, got {self.dtype}")

    @staticmethod
    def prepare_layers(layers):
        """Replace every quantized kernel by its decoded encoding; return ``{path: (info, arrays)}``.

        Works in place on ``layers`` (CPU copies owned by the converter).
        """
        from .quantizers import Identity

        encodings = {}
        for path, layer in Sequential(layers).named_layers():
            if not isinstance(layer, (Affine, Conv2D)):
                continue
            axis = kernel_channel_axis(layer)
            quantizer = getattr(layer, "kernel_quantizer", None)
            if quantizer is not None:
                w_eff = np.asarray(layer.quantized_kernel(train=False), dtype=np.float32)
            else:
                w_eff = layer.W
            dtype = layer.W.dtype  # float16 in a half-precision model: stored exactly as float32 values
            info, arrays = encode_kernel(np.asarray(w_eff, dtype=np.float32), axis, quantizer,
                                         latent=np.asarray(layer.W, dtype=np.float32))
            encodings[f"{path}.W"] = (info, arrays)
            if quantizer is not None:
                layer.kernel_quantizer = Identity()
                layer.kernel_constraint = None
                layer._cache_weight = None
            layer.W = decode_kernel(info, arrays).astype(dtype, copy=False)
        return encodings

    def run(self, x):
        if x.dtype != self.dtype:
            x = x.astype(self.dtype)  # as Model.predict_scores casts its input to the compute dtype
        for layer in self.layers:
            x = layer.forward(x, train=False)
        return x

    def rows(self):
        return [(type(layer).__name__, (lambda x, layer=layer: layer.forward(x, train=False)))
                for layer in self.layers]

    def config(self):
        out = {**super().config(), "layers": [layer.spec() for layer in self.layers],
               "weights": {path: info for path, (info, _) in self.encodings.items()}}
        if self.dtype != np.float32:
            out["dtype"] = self.dtype.name
        return out

    def arrays(self):
        out = {}
        for path, layer, attr in Sequential(self.layers).named_arrays():
            if path in self.encodings:
                for name, arr in self.encodings[path][1].items():
                    out[f"{path}.{name}"] = arr
            else:
                out[path] = to_numpy(getattr(layer, attr))
        return out

    def layer_arrays(self, index):
        """The stored arrays of layer ``index`` (for memory accounting)."""
        prefix = f"{index}."
        return {k: v for k, v in self.arrays().items() if k.startswith(prefix)}

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = _specs(config)
        specs = config.get("layers")
        weights = config.get("weights", {})
        if not isinstance(specs, list) or not isinstance(weights, dict):
            raise ValueError("a float stage needs a 'layers' list and a 'weights' dict")
        dtype = config.get("dtype", "float32")
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
        from .io import check_declared_shapes

        # Decode the kernels first (each encoding's arrays are checked against its shape), then check
        # every size the layer specs declare against what is stored, and only then build the layers.
        decoded, encodings = {}, {}
        for path, info in weights.items():
            if not isinstance(path, str):
                raise ValueError(f"weights must be keyed by array path, got {path!r}")
            prefix = f"{path}."
            sub = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            decoded[path] = decode_kernel(info, sub)
            encodings[path] = (info, sub)
        stored = {**{k: v for k, v in arrays.items() if not any(k.startswith(f"{p}.") for p in weights)},
                  **decoded}
        tree = {"type": "Sequential", "children": [[str(i), spec] for i, spec in enumerate(specs)]}
        check_declared_shapes(tree, stored, "the float stage")
        layers = [layer_from_config(spec) for spec in specs]
        if dtype == "float16":  # as Model.astype: parameters in float16, buffers stay float32
            for _, layer, attr in Sequential(layers).named_arrays(buffers=False):
                setattr(layer, attr, getattr(layer, attr).astype(np.float16))
        expected = {path: (layer, attr) for path, layer, attr in Sequential(layers).named_arrays()}
        unknown = sorted(set(stored) - set(expected))
        if unknown:
            raise ValueError(f"arrays or weights {unknown[:3]} belong to no array of the stage's layers")
        for path, (layer, attr) in expected.items():
            current = getattr(layer, attr)
            if path not in stored:
                raise ValueError(f"array {path!r} of layer {type(layer).__name__} is missing")
            value = np.array(stored[path])
            if current.dtype == np.float16 and value.dtype == np.float32 and path in decoded:
                half = value.astype(np.float16)
                if not np.array_equal(half.astype(np.float32), value):
                    raise ValueError(f"kernel {path!r} of a float16 stage is not made of float16 values")
                value = half
            if tuple(value.shape) != tuple(current.shape) or value.dtype != current.dtype:
                raise ValueError(f"array {path!r} is {value.dtype}{tuple(value.shape)}, the layer needs "
                                 f"{current.dtype}{tuple(current.shape)}")
            setattr(layer, attr, value)
        stage = cls(layers, sim_shape(input_spec), encodings, dtype)
        if stage.input_spec != input_spec or stage.output_spec != output_spec:
            raise ValueError(f"the layers map {describe_spec(stage.input_spec)} to "
                             f"{describe_spec(stage.output_spec)}, the stage says "
                             f"{describe_spec(input_spec)} to {describe_spec(output_spec)}")
        return stage

    def to_device(self, device):
        for layer in self.layers:
            layer.to_device(device)
        return self


@register_stage
class PackStage(Stage):
    """Sign bits of a float array: ``(N, C, H, W)`` -> NHWC packed, or ``(N, ...)`` -> ``(N, words)``.

    With ``threshold`` / ``direction`` (float32 / int8, one per channel) the stage also stands for
    the per-channel float layers just before the sign (a BatchNorm, a ReLU, ...): bit ``c`` is
    ``x >= threshold[c]`` (direction +1) or ``x <= threshold[c]`` (-1), thresholds that
    :mod:`lowbit.convert` derives by running those layers; without them it is the plain sign
    (threshold 0, direction +1).  float32 input goes through ``threshold_signs`` (the NCHW -> NHWC
    move and the pack in one pass); other dtypes (a float16 model) through ``pack_signs``.
    """

    kind = "pack"

    def __init__(self, input_spec, output_spec, threshold=None, direction=None):
        super().__init__(input_spec, output_spec)
        if (threshold is None) != (direction is None):
            raise ValueError("a pack stage takes both threshold and direction, or neither")
        self.threshold = threshold
        self.direction = direction

    @property
    def _array_names(self):
        return () if self.threshold is None else ("threshold", "direction")

    @property
    def channels(self):
        dims = self.input_spec[2]
        return dims[0] if self.output_spec[1] == "nhwc" else int(np.prod(dims))

    def run(self, x):
        xp = get_array_module(x)
        nhwc = self.output_spec[1] == "nhwc"
        if x.dtype == np.float32:
            x = x if nhwc else x.reshape(x.shape[0], -1)  # threshold_signs takes strided input
            threshold, direction = self.threshold, self.direction
            if threshold is None:
                threshold = xp.zeros(self.channels, dtype=np.float32)
                direction = xp.ones(self.channels, dtype=np.int8)
            return _kernels().threshold_signs(x, threshold, direction)
        if self.threshold is not None:
            raise TypeError(f"a pack stage with thresholds takes float32 input, got {x.dtype}")
        if nhwc:
            x = xp.ascontiguousarray(x.transpose(0, 2, 3, 1))
        else:
            x = xp.ascontiguousarray(x.reshape(x.shape[0], -1))
        return _kernels().pack_signs(x)

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = _specs(config)
        if input_spec[0] != "float" or output_spec[0] != "packed" or output_spec[1] == "nhwc_flat":
            raise ValueError("a pack stage maps float to packed nhwc or dense")
        expected = input_spec[2] if output_spec[1] == "nhwc" else (int(np.prod(input_spec[2])),)
        if output_spec[2] != expected:
            raise ValueError(f"packing {input_spec[2]} gives dims {expected}, "
                             f"the stage says {output_spec[2]}")
        stage = cls(input_spec, output_spec)
        if "threshold" in arrays or "direction" in arrays:
            channels = stage.channels
            stage.threshold = _check_array(arrays, "threshold", np.float32, (channels,))
            stage.direction = _check_array(arrays, "direction", np.int8, (channels,))
            if not np.all((stage.direction == 1) | (stage.direction == -1)):
                raise ValueError("array 'direction' must hold only +1 and -1")
        return stage


def _repack(bits, k, shape_in, axes, k_out):
    """Unpack rows of ``bits`` (O, words(k)), reshape to ``shape_in``, transpose, pack the last axis."""
    kernels = _kernels()
    values = kernels.unpack_signs(np.ascontiguousarray(bits), k, np.int8).reshape(shape_in)
    return kernels.pack_signs(np.ascontiguousarray(values.transpose(axes)))


@register_stage
class BinaryDenseStage(Stage):
    """``acc = sign(x) . sign(W)`` exactly, through ``xnor_gemm``.

    ``weights`` (held for the kernel) is uint64 ``(O, words)``.  For a dense input,
    ``words = ceil(K / 64)`` and the columns are the simulation's input features in order.  For a
    feature-map input (NHWC, which the simulation flattens NCHW), the weight rows are permuted to
    ``(h, w, c)`` order and packed per pixel with the activations' per-pixel word padding:
    ``words = H * W * ceil(C / 64)``.  The padding bits are 0 in both operands, so XNOR counts each
    as an agreement and ``acc = xnor_gemm(x, W, 64 * words) - (64 * words - K)``.

    The file stores the canonical form: ``pack_signs(W_eff.T)``, (O, ceil(K / 64)), columns in the
    simulation's feature order (1 bit per weight whatever the layout).
    """

    kind = "binary_dense"

    def __init__(self, input_spec, output_spec, weights, in_features):
        super().__init__(input_spec, output_spec)
        self.weights = weights
        self.in_features = int(in_features)
        if input_spec[1] == "dense":
            self.k = self.in_features
        else:
            self.k = 64 * weights.shape[1]
        self.padding_agreements = self.k - self.in_features

    def run(self, x):
        x = x.reshape(x.shape[0], -1)
        acc = _kernels().xnor_gemm(x, self.weights, self.k)
        if self.padding_agreements:
            acc -= np.int32(self.padding_agreements)
        return acc

    def to_device(self, device):
        self.weights = to_device(self.weights, device)
        return self

    def config(self):
        return {**super().config(), "in_features": self.in_features}

    def arrays(self):
        weights = to_numpy(self.weights)
        if self.input_spec[1] == "dense":
            return {"weights": weights}
        channels, height, width = self.input_spec[2]
        out = weights.shape[0]
        per_pixel = _kernels().unpack_signs(
            weights.reshape(out, height, width, _words(channels)), channels, np.int8)  # (O, H, W, C)
        canonical = np.ascontiguousarray(per_pixel.transpose(0, 3, 1, 2)).reshape(out, -1)
        return {"weights": _kernels().pack_signs(canonical)}

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = _specs(config)
        if input_spec[0] != "packed" or output_spec[:2] != ("acc", "dense"):
            raise ValueError("a binary_dense stage maps packed to dense acc")
        in_features = _int(config, "in_features", 1)
        dims = input_spec[2]
        if int(np.prod(dims)) != in_features:
            raise ValueError(f"in_features {in_features} does not match the input dims {dims}")
        out = output_spec[2][0]
        weights = _check_array(arrays, "weights", np.uint64, (out, _words(in_features)))
        if input_spec[1] != "dense":
            channels, height, width = dims
            weights = _repack(weights, in_features, (out, channels, height, width), (0, 2, 3, 1), channels)
            weights = weights.reshape(out, -1)
        else:
            # unpacking checks that the padding bits are 0
            _kernels().unpack_signs(np.ascontiguousarray(weights), in_features, np.int8)
        return cls(input_spec, output_spec, np.ascontiguousarray(weights), in_features)


@register_stage
class BinaryConvStage(Stage):
    """``acc = conv(sign(x), sign(W))`` exactly (zero padding), through ``binary_conv2d``.

    ``weights`` (held for the kernel) is uint64 ``(O, KH, KW, ceil(C / 64))``.  The file stores the
    canonical form ``pack_signs(W_eff.reshape(O, C * KH * KW))`` (the simulation's order).  The
    first ``run`` prepares them (``prepare_conv_weights``: the kernel's panels and tap sums, made
    once instead of on every call); the preparation is made anew when ``weights`` is replaced
    (``to_device`` included).
    """

    kind = "binary_conv"

    def __init__(self, input_spec, output_spec, weights, stride, padding):
        super().__init__(input_spec, output_spec)
        self.weights = weights
        self.stride = int(stride)
        self.padding = int(padding)
        self._prepared = None  # (the weights it was made from, PreparedConvWeights)

    def run(self, x):
        if self._prepared is None or self._prepared[0] is not self.weights:
            self._prepared = (self.weights, _kernels().prepare_conv_weights(self.weights, self.input_spec[2][0]))
        return _kernels().binary_conv2d(x, self._prepared[1], None, self.stride, self.padding)

    def to_device(self, device):
        self.weights = to_device(self.weights, device)
        self._prepared = None
        return self

    @property
    def kernel_size(self):
        return int(self.weights.shape[1])

    def config(self):
        return {**super().config(), "kernel_size": self.kernel_size, "stride": self.stride,
                "padding": self.padding}

    def arrays(self):
        out, kh, kw, _ = self.weights.shape
        channels = self.input_spec[2][0]
        values = _kernels().unpack_signs(np.ascontiguousarray(to_numpy(self.weights)), channels, np.int8)
        canonical = np.ascontiguousarray(values.transpose(0, 3, 1, 2)).reshape(out, -1)
        return {"weights": _kernels().pack_signs(canonical)}

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = _specs(config)
        if input_spec[:2] != ("packed", "nhwc") or output_spec[:2] != ("acc", "nhwc"):
            raise ValueError("a binary_conv stage maps packed nhwc to nhwc acc")
        kernel = _int(config, "kernel_size", 1)
        stride, padding = _int(config, "stride", 1), _int(config, "padding", 0)
        channels, height, width = input_spec[2]
        out = output_spec[2][0]
        fan_in = channels * kernel * kernel
        weights = _check_array(arrays, "weights", np.uint64, (out, _words(fan_in)))
        expected = (out,) + _pool_shape(input_spec[2], kernel, stride, padding)[1:]
        if output_spec[2] != expected:
            raise ValueError(f"the convolution gives dims {expected}, the stage says {output_spec[2]}")
        weights = _repack(weights, fan_in, (out, channels, kernel, kernel), (0, 2, 3, 1), channels)
        return cls(input_spec, output_spec, np.ascontiguousarray(weights), stride, padding)


def _pool_shape(dims, kernel, stride, padding):
    channels, height, width = dims
    return (channels, (height + 2 * padding - kernel) // stride + 1,
            (width + 2 * padding - kernel) // stride + 1)


class _PoolStage(Stage):
    domain = "acc"

    def __init__(self, input_spec, output_spec, kernel, stride, padding):
        super().__init__(input_spec, output_spec)
        self.kernel, self.stride, self.padding = int(kernel), int(stride), int(padding)

    def config(self):
        return {**super().config(), "kernel": self.kernel, "stride": self.stride, "padding": self.padding}

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = _specs(config)
        if input_spec[:2] != (cls.domain, "nhwc") or output_spec[:2] != (cls.domain, "nhwc"):
            raise ValueError(f"a {cls.kind} stage maps {cls.domain} nhwc to {cls.domain} nhwc")
        kernel = _int(config, "kernel", 1)
        stride, padding = _int(config, "stride", 1), _int(config, "padding", 0)
        if padding >= kernel:
            raise ValueError(f"padding {padding} must be smaller than the kernel {kernel}")
        expected = _pool_shape(input_spec[2], kernel, stride, padding)
        if output_spec[2] != expected:
            raise ValueError(f"pooling gives dims {expected}, the stage says {output_spec[2]}")
        return cls(input_spec, output_spec, kernel, stride, padding)


@register_stage
class IntMaxPoolStage(_PoolStage):
    """Max-pooling of int32 NHWC accumulators (padding ignored, as the simulation's -inf)."""

    kind = "int_maxpool"

    def run(self, acc):
        from .kernels.pool import maxpool_int

        return maxpool_int(acc, self.kernel, self.stride, self.padding)


@register_stage
class PackedMaxPoolStage(_PoolStage):
    """Max-pooling of packed signs (bitwise OR), through ``maxpool_packed``."""

    kind = "packed_maxpool"
    domain = "packed"

    def run(self, x):
        return _kernels().maxpool_packed(x, self.kernel, self.stride, self.padding)


@register_stage
class ThresholdStage(Stage):
    """Bit ``c`` = ``direction[c] * acc[..., c] >= direction[c] * threshold[c]`` (``threshold_pack``).

    The thresholds reproduce everything the simulation does between the accumulator and the next
    sign (bias, kernel scale, BatchNorm, ReLU, ..., the sign itself), derived by evaluating those
    layers on every possible accumulator value (:mod:`lowbit.convert`).  Thresholds lie in
    ``[-(K+1), K+1]`` (``K`` the fan-in): stored as int16 when that fits, else int32, directions as
    int8; held as int64 / int8 for the kernel.
    """

    kind = "threshold"
    _array_names = ("threshold", "direction")

    def __init__(self, input_spec, output_spec, threshold, direction):
        super().__init__(input_spec, output_spec)
        self.threshold = threshold
        self.direction = direction

    def run(self, acc):
        return _kernels().threshold_pack(acc, self.threshold, self.direction)

    def arrays(self):
        threshold = to_numpy(self.threshold)
        narrow = np.int16 if threshold.size == 0 or int(np.abs(threshold).max()) < 2 ** 15 else np.int32
        return {"threshold": threshold.astype(narrow), "direction": to_numpy(self.direction)}

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = _specs(config)
        if input_spec[0] != "acc" or output_spec[0] != "packed":
            raise ValueError("a threshold stage maps acc to packed")
        if input_spec[1] == "dense" and output_spec[1] != "dense":
            raise ValueError("a threshold stage keeps a dense layout dense")
        if input_spec[1] == "nhwc" and output_spec[1] not in ("nhwc", "nhwc_flat"):
            raise ValueError("a threshold stage keeps a feature map a feature map")
        if input_spec[2] != output_spec[2]:
            raise ValueError(f"a threshold stage keeps the dims, got {input_spec[2]} -> {output_spec[2]}")
        channels = input_spec[2][0]
        threshold = arrays.get("threshold")
        if threshold is not None and threshold.dtype == np.int16:
            threshold = _check_array(arrays, "threshold", np.int16, (channels,))
        else:
            threshold = _check_array(arrays, "threshold", np.int32, (channels,))
        direction = _check_array(arrays, "direction", np.int8, (channels,))
        if not np.all((direction == 1) | (direction == -1)):
            raise ValueError("array 'direction' must hold only +1 and -1")
        return cls(input_spec, output_spec, threshold.astype(np.int64), np.ascontiguousarray(direction))


@register_stage
class ThresholdMaxPoolStage(_PoolStage):
    """Max-pooling of int32 NHWC accumulators and a :class:`ThresholdStage` in one pass
    (``threshold_maxpool_pack``): acc ``(C, H, W)`` -> packed ``(C, OH, OW)``.

    Equal to an ``int_maxpool`` stage followed by a ``threshold`` stage (padding ignored, as the
    simulation's -inf); arrays as :class:`ThresholdStage`.
    """

    kind = "threshold_maxpool"
    _array_names = ("threshold", "direction")

    def __init__(self, input_spec, output_spec, kernel, stride, padding, threshold, direction):
        super().__init__(input_spec, output_spec, kernel, stride, padding)
        self.threshold = threshold
        self.direction = direction

    def run(self, acc):
        return _kernels().threshold_maxpool_pack(acc, self.threshold, self.direction, self.kernel, self.stride,
                                                 self.padding)

    arrays = ThresholdStage.arrays

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = _specs(config)
        if input_spec[:2] != ("acc", "nhwc") or output_spec[:2] != ("packed", "nhwc"):
            raise ValueError("a threshold_maxpool stage maps acc nhwc to packed nhwc")
        pool = IntMaxPoolStage.from_parts(
            {**config, "output": spec_to_json(make_spec("acc", "nhwc", output_spec[2]))}, {})
        threshold = ThresholdStage.from_parts(
            {"input": spec_to_json(make_spec("acc", "nhwc", output_spec[2])), "output": config.get("output")},
            arrays)
        return cls(input_spec, output_spec, pool.kernel, pool.stride, pool.padding, threshold.threshold,
                   threshold.direction)


@register_stage
class BitplaneDenseStage(Stage):
    """A model's ``PixelCodes - [Flatten, Dropout] - binary dense - ... - sign`` start, exactly, on the codes.

    ``codes = rint(clip(x, 0, 1) * L)`` (``L = 2^bits - 1``) as :class:`~lowbit.layers.PixelCodes`
    computes them; ``T = combine_bitplanes(xnor_gemm(pack_bitplanes(codes), weights))`` is the exact
    integer ``2 * codes . w - L * sum(w)``, of which the simulation's float32 layer output is exactly
    ``T / 2^bits``; the per-channel layers up to the next sign are a threshold on T
    (``threshold_pack``).  Arrays: ``weights`` uint64 ``(O, ceil(K/64))``, ``threshold`` int32,
    ``direction`` int8 ``(O,)``.
    """

    kind = "bitplane_dense"
    _array_names = ("weights", "threshold", "direction")

    def __init__(self, input_spec, output_spec, weights, in_features, bits, threshold, direction):
        super().__init__(input_spec, output_spec)
        self.weights = weights
        self.in_features = int(in_features)
        self.bits = int(bits)
        self.threshold = threshold
        self.direction = direction

    def codes(self, x):
        """The pixel codes of ``x`` (N, ...) as (N, K) uint8 / uint16, from ``PixelCodes.codes``."""
        codes = PixelCodes.codes(x.reshape(x.shape[0], -1), self.bits)
        return codes.astype(np.uint8 if self.bits <= 8 else np.uint16)

    def run(self, x):
        kernels = _kernels()
        n = x.shape[0]
        planes = kernels.pack_bitplanes(self.codes(x), self.bits)
        products = kernels.xnor_gemm(planes.reshape(self.bits * n, -1), self.weights, self.in_features)
        totals = kernels.combine_bitplanes(products.reshape(self.bits, n, -1))
        return kernels.threshold_pack(totals, self.threshold, self.direction)

    def config(self):
        return {**super().config(), "in_features": self.in_features, "bits": self.bits}

    def arrays(self):
        return {"weights": to_numpy(self.weights), "threshold": to_numpy(self.threshold).astype(np.int32),
                "direction": to_numpy(self.direction)}

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = _specs(config)
        if input_spec[0] != "float" or output_spec[:2] != ("packed", "dense"):
            raise ValueError("a bitplane_dense stage maps float to packed dense")
        in_features, bits = _int(config, "in_features", 1), _int(config, "bits", 1)
        if bits > 16:
            raise ValueError(f"bits must be <= 16, got {bits}")
        if int(np.prod(input_spec[2])) != in_features:
            raise ValueError(f"in_features {in_features} does not match the input dims {input_spec[2]}")
        if not PixelCodes.sums_exact(bits, in_features):
            raise ValueError("(2^bits - 1) * in_features must be < 2^24 (exact float32 sums)")
        out = output_spec[2][0]
        weights = _check_array(arrays, "weights", np.uint64, (out, _words(in_features)))
        _kernels().unpack_signs(np.ascontiguousarray(weights), in_features, np.int8)  # padding bits 0
        threshold = _check_array(arrays, "threshold", np.int32, (out,))
        direction = _check_array(arrays, "direction", np.int8, (out,))
        if not np.all((direction == 1) | (direction == -1)):
            raise ValueError("array 'direction' must hold only +1 and -1")
        return cls(input_spec, output_spec, weights, in_features, bits, threshold.astype(np.int64),
                   np.ascontiguousarray(direction))


@register_stage
class FlattenStage(Stage):
    """Packed NHWC -> the same array, which the simulation now sees flattened NCHW (``nhwc_flat``).

    Nothing moves: the dense layer that reads it has its weight rows in (h, w, c) order.
    """

    kind = "flatten"

    def run(self, x):
        return x

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = _specs(config)
        if input_spec[:2] != ("packed", "nhwc") or output_spec[:2] != ("packed", "nhwc_flat") \
                or input_spec[2] != output_spec[2]:
            raise ValueError("a flatten stage maps packed nhwc to packed nhwc_flat of the same dims")
        return cls(input_spec, output_spec)


@register_stage
class AccToFloatStage(Stage):
    """int32 accumulators -> the simulation's float32 layer output ``acc * scale + bias``.

    ``acc`` as float32 is exact (|acc| < 2^24), and so is ``acc * scale`` (the converter checks that
    every ``j * scale`` with ``|j| <= K`` is a float32), which is what the simulation's float sum
    gives; ``+ bias`` is then the same float32 addition.  Feature maps come back NCHW with the
    simulation's strides (a transposed ``(O, N, OH, OW)`` array).
    """

    kind = "acc_to_float"

    def __init__(self, input_spec, output_spec, scale=None, bias=None):
        super().__init__(input_spec, output_spec)
        self.scale = scale
        self.bias = bias

    @property
    def _array_names(self):
        return tuple(name for name in ("scale", "bias") if getattr(self, name) is not None)

    def run(self, acc):
        xp = get_array_module(acc)
        if self.input_spec[1] == "dense":
            out = acc.astype(np.float32)
            if self.scale is not None:
                out = out * self.scale
            if self.bias is not None:
                out = out + self.bias
            return out
        n = acc.shape[0]
        channels = acc.shape[3]
        out = xp.ascontiguousarray(acc.transpose(3, 0, 1, 2)).astype(np.float32).reshape(channels, -1)
        if self.scale is not None:
            out = out * self.scale[:, None]
        if self.bias is not None:
            out += self.bias[:, None]
        return out.reshape(channels, n, acc.shape[1], acc.shape[2]).transpose(1, 0, 2, 3)

    def config(self):
        return {**super().config(), "scale": self.scale is not None, "bias": self.bias is not None}

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = _specs(config)
        if input_spec[0] != "acc" or output_spec[0] != "float" or output_spec[2] != input_spec[2]:
            raise ValueError("an acc_to_float stage maps acc to float of the same dims")
        channels = input_spec[2][0]
        scale = _check_array(arrays, "scale", np.float32, (channels,)) if config.get("scale") else None
        bias = _check_array(arrays, "bias", np.float32, (channels,)) if config.get("bias") else None
        return cls(input_spec, output_spec, scale, bias)


@register_stage
class UnpackStage(Stage):
    """Packed signs -> +-1 float32 in the simulation's layout (NCHW, or flattened NCHW)."""

    kind = "unpack"

    def run(self, x):
        xp = get_array_module(x)
        layout, dims = self.input_spec[1], self.input_spec[2]
        values = _kernels().unpack_signs(x, dims[0], np.float32)
        if layout == "dense":
            return values
        values = xp.ascontiguousarray(values.transpose(0, 3, 1, 2))
        if layout == "nhwc_flat":
            return values.reshape(values.shape[0], -1)
        return values

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = _specs(config)
        if input_spec[0] != "packed" or output_spec[0] != "float" or output_spec[2] != sim_shape(input_spec):
            raise ValueError("an unpack stage maps packed to float of the simulation's shape")
        return cls(input_spec, output_spec)


@register_stage
class ResidualStage(Stage):
    """A :class:`~lowbit.layers.Residual` block: ``body(x) + shortcut(x)`` on float input.

    ``body`` and ``shortcut`` are stage chains of their own (``shortcut`` empty: the identity) that
    each map the block's float input to its float output.  The body of a Bi-Real block is
    ``pack`` -> ``binary_conv`` -> ``acc_to_float`` -> ``float`` (its BatchNorm): the binary
    convolution runs on bits, its integer accumulators come back as the simulation's float32 values
    (exactly, see :class:`AccToFloatStage`), and the real-valued shortcut is added to them with the
    same float32 addition as the simulation's, so the block's output is equal, not merely close.
    In the file, the inner stages' arrays are named ``body.<i>.<name>`` and ``shortcut.<i>.<name>``.
    """

    kind = "residual"

    def __init__(self, input_spec, body, shortcut=()):
        body, shortcut = list(body), list(shortcut)
        if input_spec[0] != "float":
            raise ValueError(f"a residual stage takes float input, got {describe_spec(input_spec)}")
        out = _chain_output(body, input_spec, "body")
        skip = _chain_output(shortcut, input_spec, "shortcut")
        if out != skip or out[0] != "float":
            raise ValueError(f"the residual body gives {describe_spec(out)}, the shortcut "
                             f"{describe_spec(skip)}: they must be the same float shape")
        super().__init__(input_spec, out)
        self.body, self.shortcut = body, shortcut

    def run(self, x):
        out = x
        for stage in self.body:
            out = stage.run(out)
        skip = x
        for stage in self.shortcut:
            skip = stage.run(skip)
        return out + skip

    def config(self):
        def entries(stages):
            return [{"type": st.kind, "config": st.config(), "arrays": sorted(st.arrays())} for st in stages]

        return {**super().config(), "body": entries(self.body), "shortcut": entries(self.shortcut)}

    def arrays(self):
        out = {}
        for part, stages in (("body", self.body), ("shortcut", self.shortcut)):
            for index, stage in enumerate(stages):
                for name, arr in stage.arrays().items():
                    out[f"{part}.{index}.{name}"] = arr
        return out

    def inner_stages(self):
        return self.body + self.shortcut

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = _specs(config)
        body, used = _build_stages(config.get("body"), arrays, "body.", "residual", "body.")
        shortcut, used_skip = _build_stages(config.get("shortcut", []), arrays, "shortcut.", "residual",
                                            "shortcut.")
        unused = sorted(set(arrays) - used - used_skip)
        if unused:
            raise ValueError(f"arrays {unused[:3]} belong to no inner stage")
        stage = cls(input_spec, body, shortcut)
        if stage.output_spec != output_spec:
            raise ValueError(f"the block gives {describe_spec(stage.output_spec)}, the stage says "
                             f"{describe_spec(output_spec)}")
        return stage

    def to_device(self, device):
        for stage in self.inner_stages():
            stage.to_device(device)
        return self


def _chain_output(stages, input_spec, what):
    """The output spec of ``stages`` run in order on ``input_spec``; ValueError where two disagree."""
    expected = input_spec
    for index, stage in enumerate(stages):
        if stage.input_spec != expected:
            raise ValueError(f"{what} stage {index} ({stage.kind}) takes {describe_spec(stage.input_spec)} "
                             f"but receives {describe_spec(expected)}")
        expected = stage.output_spec
    return expected


# -- the model ------------------------------------------------------------------------------------
class PackedModel(Classifier):
    """A converted model: a chain of :class:`Stage` objects that runs on numpy (Numba) or CuPy.

    Parameters
    ----------
    stages : list of Stage
        Consecutive stages must agree on their domain specs; the first takes float images of
        ``input_shape``, the last returns float scores.
    input_shape : tuple of int
        Shape of one example (``(1, 28, 28)`` for MNIST).
    name : str
    notes : list of str
        What the converter decided where it could not fuse (kept in the file).
    source : dict
        About the model it came from: ``name``, ``parameters`` (trainable + buffers) and
        ``float32_bytes`` (their size at 32 bits).
    """

    def __init__(self, stages, input_shape, name="packed", notes=(), source=None):
        self.stages = list(stages)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.name = str(name)
        self.notes = [str(n) for n in notes]
        self.source = dict(source or {})
        self.metadata = {}
        self._check_chain()

    def _check_chain(self):
        if not self.stages:
            raise ValueError("a packed model needs at least one stage")
        expected = make_spec("float", None, self.input_shape)
        for index, stage in enumerate(self.stages):
            if stage.input_spec != expected:
                raise ValueError(
                    f"stage {index} ({stage.kind}) takes {describe_spec(stage.input_spec)} but receives "
                    f"{describe_spec(expected)}")
            expected = stage.output_spec
        if expected[0] != "float":
            raise ValueError(f"the last stage must return float scores, it returns {describe_spec(expected)}")

    @property
    def output_shape(self):
        return self.stages[-1].output_spec[2]

    # -- inference ----------------------------------------------------------------------------
    def _blas_limit(self, blas_threads):
        """A context that sets numpy's BLAS threads (see :meth:`predict_scores`)."""
        if blas_threads == "auto":
            packed = any(not isinstance(stage, FloatStage) for stage in self.stages)
            blas_threads = 1 if packed and self.device == "cpu" else None
        if blas_threads is None:
            return contextlib.nullcontext()
        if isinstance(blas_threads, bool) or not isinstance(blas_threads, (int, np.integer)) or blas_threads < 1:
            raise ValueError(f"blas_threads must be 'auto', None or an int >= 1, got {blas_threads!r}")
        return _blas_controller().limit(limits=int(blas_threads), user_api="blas")

    def forward(self, x):
        """Run every stage on a batch ``x`` (float32, (N,) + input_shape) of the model's array kind."""
        for stage in self.stages:
            x = stage.run(x)
        return x

    def _check_images(self, x):
        arr = x if is_cupy_array(x) else np.asarray(x)
        if arr.ndim != len(self.input_shape) + 1 or tuple(arr.shape[1:]) != self.input_shape:
            raise ValueError(
                f"x must have shape (N, {', '.join(map(str, self.input_shape))}), got {tuple(arr.shape)}")
        if arr.dtype.kind != "f":
            raise TypeError(f"x must be float images in [0, 1] (float32), got dtype {arr.dtype}; "
                            "divide uint8 images by 255 first")
        return check_no_nan(arr).astype(np.float32, copy=False)

    def predict_scores(self, x, batch_size=100, blas_threads="auto"):
        """Scores (N, classes) float32, in batches.

        Equal to ``Model.predict_scores`` of the source model with the same ``batch_size``: float
        stages make the same BLAS calls as the simulation, and BLAS may round a product differently
        for another batch shape.

        ``blas_threads``: threads of numpy's BLAS meanwhile (threadpoolctl).  "auto" is 1 on the CPU
        when the model has packed stages: their float stages are small (first and last layers), and
        BLAS's idle worker threads spin on the cores that the Numba kernels need (several times
        slower end to end on the binary CNN with 2 BLAS threads on 2 cores).  None leaves BLAS alone.
        """
        x = self._check_images(x)
        on_gpu = self.device == "gpu"
        outs = []
        with self._blas_limit(blas_threads):
            for start in range(0, x.shape[0], batch_size):
                batch = x[start:start + batch_size]
                if on_gpu and not is_cupy_array(batch):
                    batch = to_device(batch, "gpu")
                elif not on_gpu and is_cupy_array(batch):
                    batch = to_numpy(batch)
                outs.append(to_numpy(self.forward(batch)).astype(np.float32, copy=False))
        if not outs:
            return np.zeros((0,) + tuple(self.output_shape), dtype=np.float32)
        return np.concatenate(outs, axis=0)

    @property
    def device(self):
        """'cpu' or 'gpu': where the stages' arrays live."""
        for stage in _all_stages(self.stages):
            held = [getattr(stage, name) for name in stage._array_names]
            if getattr(stage, "weights", None) is not None:
                held.append(stage.weights)
            if isinstance(stage, FloatStage):
                held += [getattr(layer, attr) for _, layer, attr in Sequential(stage.layers).named_arrays()]
            if held:
                return "gpu" if is_cupy_array(held[0]) else "cpu"
        return getattr(self, "_device", "cpu")

    def to_device(self, device):
        """Move every stage to 'cpu' (numpy, Numba kernels) or 'gpu' (CuPy, CUDA kernels), in place."""
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        for stage in self.stages:
            stage.to_device(device)
        self._device = device
        return self

    def profile(self, x, repeats=5):
        """Median seconds per row of :meth:`Stage.rows` on batch ``x``: list of ``(stage, label, s)``."""
        x = self._check_images(x)
        if self.device == "gpu":
            x = to_device(x, "gpu")
        timings = [[] for _ in range(sum(len(stage.rows()) for stage in self.stages))]
        labels = []
        with self._blas_limit("auto"):
            self._profile_passes(x, repeats, timings, labels)
        return [(index, label, float(np.median(times))) for (index, label), times in zip(labels, timings)]

    def _profile_passes(self, x, repeats, timings, labels):
        for repeat in range(repeats + 1):  # the first pass compiles / warms up
            value = x
            position = 0
            for index, stage in enumerate(self.stages):
                for label, fn in stage.rows():
                    start = time.perf_counter()
                    value = fn(value)
                    _synchronize(value)
                    elapsed = time.perf_counter() - start
                    if repeat == 0:
                        labels.append((index, label))
                    else:
                        timings[position].append(elapsed)
                    position += 1

    # -- files --------------------------------------------------------------------------------
    def manifest(self):
        stages = []
        for index, stage in enumerate(self.stages):
            stages.append({"type": stage.kind, "config": stage.config(), "arrays": sorted(stage.arrays())})
        return {"name": self.name, "input_shape": list(self.input_shape), "stages": stages,
                "notes": self.notes, "source": self.source}

    def save(self, path, metadata=None):
        """Write the model to one ``.npz`` (format ``lowbit.packed``, see ``docs/packed_format.md``)."""
        arrays = {}
        for index, stage in enumerate(self.stages):
            for name, arr in stage.arrays().items():
                arrays[f"stages.{index}.{name}"] = arr
        meta = dict(self.metadata)
        meta.update(metadata or {})
        return write_archive(path, PACKED_FORMAT, arrays, {"model": self.manifest(), "metadata": meta})

    def __repr__(self):
        inner = ",\n  ".join(repr(stage) for stage in self.stages)
        return f"PackedModel(name={self.name!r}, stages=[\n  {inner}\n])"


def _all_stages(stages):
    """``stages`` and, depth first, the stages inside residual stages."""
    out = []
    for stage in stages:
        out.append(stage)
        if isinstance(stage, ResidualStage):
            out.extend(_all_stages(stage.inner_stages()))
    return out


def _synchronize(value):
    if is_cupy_array(value):
        from .backend import cupy

        cupy.cuda.get_current_stream().synchronize()


def _build_stages(entries, arrays, prefix, source, label=""):
    """Stages from manifest ``entries`` (``{"type", "config", "arrays"}`` each) whose arrays are
    ``arrays[prefix + "<index>." + name]`` (``label`` prefixes the index in messages).  Returns ``(stages, used array keys)``; raises
    :class:`~lowbit.io.ModelFileError` naming the stage and what is wrong."""
    if not isinstance(entries, list):
        raise ModelFileError(f"{source}: the stage list must be a list, got {type(entries).__name__}")
    stages = []
    used = set()
    for index, entry in enumerate(entries):
        where = f"{source}: stage {label}{index}"
        if not isinstance(entry, dict):
            raise ModelFileError(f"{where} is not a dict")
        kind = entry.get("type")
        if not isinstance(kind, str) or kind not in STAGES:
            raise ModelFileError(f"{where} has unknown type {kind!r}; known: {sorted(STAGES)}")
        names = entry.get("arrays", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ModelFileError(f"{where} ({kind}) must list its arrays by name")
        stage_prefix = f"{prefix}{index}."
        missing = [n for n in names if stage_prefix + n not in arrays]
        if missing:
            raise ModelFileError(f"{where} ({kind}) lacks arrays {missing[:3]}")
        stage_arrays = {n: arrays[stage_prefix + n] for n in names}
        used.update(stage_prefix + n for n in names)
        config = entry.get("config")
        if not isinstance(config, dict):
            raise ModelFileError(f"{where} ({kind}) has no config dict")
        try:
            stage = STAGES[kind].from_parts(config, stage_arrays)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ModelFileError(f"{where} ({kind}) is invalid: {exc}") from None
        if sorted(stage.arrays()) != sorted(names):
            raise ModelFileError(f"{where} ({kind}) lists arrays {sorted(names)[:4]}, "
                                 f"its config needs {sorted(stage.arrays())[:4]}")
        stages.append(stage)
    return stages, used


def packed_from_manifest(doc, arrays, source="file"):
    """Build a :class:`PackedModel` from a manifest's ``model`` entry and the file's arrays.

    Raises :class:`~lowbit.io.ModelFileError` naming the stage and what is wrong.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), list):
        raise ModelFileError(f"{source}: the manifest has no stage list")
    input_shape = doc.get("input_shape")
    if not isinstance(input_shape, list) or not all(isinstance(s, int) and s > 0 for s in input_shape):
        raise ModelFileError(f"{source}: input_shape must be a list of positive ints, got {input_shape!r}")
    stages, used = _build_stages(doc["stages"], arrays, "stages.", source)
    unused = sorted(set(arrays) - used)
    if unused:
        raise ModelFileError(f"{source}: arrays {unused[:3]} belong to no stage")
    try:
        model = PackedModel(stages, input_shape, name=doc.get("name", "packed"), notes=doc.get("notes", []),
                            source=doc.get("source", {}))
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{source}: the stages do not form a model: {exc}") from None
    return model


def load_packed(path):
    """Load a packed model saved by :meth:`PackedModel.save` onto the CPU.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ModelFileError
        Not a packed lowbit file (a trained model file is named as such), truncated, a checksum
        does not match, or the manifest's stages are inconsistent.
    """
    manifest, arrays = read_archive(path, PACKED_FORMAT)
    model = packed_from_manifest(manifest.get("model"), arrays, source=os.fspath(path))
    model.metadata = manifest.get("metadata", {}) if isinstance(manifest.get("metadata"), dict) else {}
    return model


def load_any(path):
    """Load a trained model (``lowbit.model``) or a packed model (``lowbit.packed``) by its format;
    an ``.onnx`` file is imported (:func:`lowbit.onnx_io.load_onnx`)."""
    from .io import model_from_manifest
    from .onnx_io import is_onnx_path

    if is_onnx_path(path):
        from .onnx_io import load_onnx

        return load_onnx(path)

    manifest, arrays = read_archive(path, ("lowbit.model", PACKED_FORMAT))
    if manifest["format"] != PACKED_FORMAT:
        return model_from_manifest(manifest, arrays, path)
    model = packed_from_manifest(manifest.get("model"), arrays, source=os.fspath(path))
    model.metadata = manifest.get("metadata", {})
    return model
