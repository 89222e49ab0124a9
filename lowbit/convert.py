"""Conversion of trained models to packed inference models, and post-training quantization.

:func:`convert` turns a trained (quantized) :class:`~lowbit.Model` into a
:class:`~lowbit.packed.PackedModel` whose predictions equal the model's own evaluation-mode
forward pass (the training-time simulation) exactly.

How exactness is obtained
-------------------------
* A layer is run *binary* (``xnor_gemm`` / ``binary_conv2d`` on packed bits) only when its input
  is +-1 (a sign input quantizer, or packed activations) and its effective kernel is
  ``+-alpha_c`` per output unit.  Then the simulation's float32 product is an exact multiple
  ``acc * alpha_c`` of the integer accumulator: with ``alpha_c = 1`` every partial sum is an integer
  below 2^24, and with another ``alpha_c`` the converter checks that every ``j * alpha_c``,
  ``|j| <= K`` (K the fan-in), is a float32, so no partial sum of any order rounds.  (Otherwise the
  layer stays a float stage, exact, unless ``allow_inexact=True``.)
* Everything the simulation does between that product and the next sign -- bias, BatchNorm, ReLU,
  Rescale, Dropout (identity), a monotone quantizer, a max-pool, a Flatten, and the sign itself
  (a ``QuantActivation`` or the next layer's input quantizer) -- is per channel, so the bit is a
  function of the integer accumulator alone.  The converter *evaluates the model's own layer
  objects* (evaluation mode, float32, shaped ``(2K+1, C)`` or ``(2K+1, C, 1, 1)``) on every integer
  ``-K..K`` and reads the threshold and direction off the result; nothing is re-derived by formula.
  It checks that the bits are monotone in the accumulator (else: no fusion, a float stage).
* A max-pool in that chain pools the int32 accumulators when the layers before it are
  non-decreasing per channel (max commutes with them; the simulation pools the same values), or
  ORs the thresholded bits when everything after it is non-decreasing; otherwise no fusion.
* Where no sign follows (the scores at the end), the accumulators become float32
  (``acc * alpha + bias``, exactly the simulation's values) and the remaining layers run as a float
  stage, so the logits are equal, not merely close.
* A :class:`~lowbit.layers.Residual` block is converted body and shortcut apart, each from the
  block's float input: a binary convolution in the body runs on bits, its accumulators come back as
  the simulation's float32 values (``acc * alpha + bias``, exact as above), the rest of the body and
  the real-valued shortcut run as float stages, and their sum is the simulation's float32 addition
  (a ``residual`` stage).  ``notes`` say which parts of each block stay float; a block with no binary
  layer on +-1 input stays one float stage (and a note says so).
* Every other layer runs as a float stage: the same layer code on the same values.  Their kernels
  are stored compactly (sign bits, k-bit codes, float16) and rebuilt bit for bit.

Float stages call BLAS as the simulation does; BLAS may round a float product differently for a
different batch shape, so compare with ``Model.predict`` at the same ``batch_size`` (default 100).

Post-training quantization
--------------------------
:func:`post_training_quantize` makes a quantized twin of a float model (fp16, k-bit with
per-channel or per-tensor scales and calibrated activation ranges, or binary with XNOR scales);
:func:`quantize_command`, :func:`convert_command` do the whole job for the CLI.
"""
from __future__ import annotations

import os

import numpy as np

from .backend import to_numpy
from .data import float_images
from .functions import conv_output_size
from .io import assign_model_arrays, check_output_path, load_model, model_arrays
from .layers import (
    Affine, BatchNorm, Concat, Conv2D, Dropout, Flatten, MaxPool2D, PixelCodes, ReLU, Rescale, Residual,
    Sequential, layer_from_config,
)
from .model import Model
from .packed import (
    AccToFloatStage, BinaryConvStage, BinaryDenseStage, BitplaneDenseStage, FlattenStage, FloatStage,
    PackedMaxPoolStage, PackedModel, PackStage, ResidualStage, ThresholdMaxPoolStage, ThresholdStage,
    UnpackStage, kernel_channel_axis, make_spec, sim_shape,
)
from .progress import batched_scores, step
from .quant_layers import QuantActivation, QuantAffine, QuantConv2D
from .reactnet import RPReLU, RSign
from .quantizers import (
    ACTIVATION_CLIPPINGS, DoReFaActivation, Identity, Quantizer, SteSign, StochasticBinary, UniformWeight,
    WEIGHT_CLIPPINGS, mse_activation_range, mse_weight_range,
)

__all__ = [
    "convert",
    "post_training_quantize",
    "quantize_command",
    "convert_command",
    "compare_predictions",
]

# Rows of the accumulator grid evaluated at once (times the channel count): bounds the memory.
_GRID_ELEMENTS = 1 << 21


def _sign_quantizer(q):
    """True when ``q`` is, at evaluation, exactly ``sign`` (+1 for x >= 0) with no scale."""
    if isinstance(q, SteSign):
        return q.scale is None
    if isinstance(q, StochasticBinary):
        return q.deterministic_eval
    return False


def _per_channel_monotone(layer):
    """ReActNet's layers that fold into a threshold: RSign, and RPReLU with slopes >= 0."""
    return isinstance(layer, RSign) or (isinstance(layer, RPReLU) and layer.monotone())


def _flat_layers(container, prefix=""):
    """``(path, layer)`` of the leaves of nested Sequentials (plain nesting is the same as inlining)."""
    out = []
    for i, layer in enumerate(container.layers):
        if isinstance(layer, Sequential):
            out.extend(_flat_layers(layer, f"{prefix}{i}."))
        else:
            out.append((f"{prefix}{i}", layer))
    return out


def _cpu_copy(model):
    copy = layer_from_config(model.spec())
    if np.dtype(model.compute_dtype) != np.float32:
        copy.astype(model.compute_dtype)  # a half-precision model stays one
    assign_model_arrays(copy, model_arrays(model), source="model")
    return copy


def _float_parts(stages):
    """Names of the layers that ``stages`` run in float (for the notes)."""
    names = []
    for stage in stages:
        if isinstance(stage, FloatStage):
            names += [type(layer).__name__ for layer in stage.layers]
        elif isinstance(stage, AccToFloatStage):
            names.append("accumulators to float32")
    return names


def _check_deterministic(model):
    for path, layer in model.named_layers():
        for attr in ("input_quantizer", "kernel_quantizer", "quantizer"):
            q = getattr(layer, attr, None)
            if isinstance(q, StochasticBinary) and not q.deterministic_eval:
                raise ValueError(
                    f"layer {path!r} has a {attr} that is stochastic at evaluation "
                    "(StochasticBinary(deterministic_eval=False)); a packed model is deterministic")


def _exact_multiples(alpha, fan_in):
    """True when every ``j * alpha[c]`` with ``|j| <= fan_in`` is exactly a float32."""
    if fan_in >= 2 ** 24:
        return False
    alpha = np.asarray(alpha, dtype=np.float32)
    if np.all(alpha == 1):
        return True
    largest = alpha.astype(np.float64) * fan_in
    if np.any(alpha < np.finfo(np.float32).tiny) or np.any(largest >= np.finfo(np.float32).max):
        return False
    mantissa, _ = np.frexp(alpha.astype(np.float64))
    significand = (mantissa * 2.0 ** 24).astype(np.int64)  # 24-bit integer significand
    lowest = significand & -significand
    significant_bits = 24 - np.log2(lowest).astype(np.int64)
    return bool(np.all(significant_bits + int(fan_in).bit_length() <= 24))


def _round_significand(values, bits):
    """Round positive values to ``bits`` significant bits (float32)."""
    values = np.asarray(values, dtype=np.float64)
    mantissa, exponent = np.frexp(values)
    return np.ldexp(np.round(np.ldexp(mantissa, bits)), exponent - bits).astype(np.float32)


class _BinaryKernel:
    """The +-alpha form of a binary kernel: ``w_eff`` (layer layout), ``alpha`` (O,) or None, fan-in."""

    def __init__(self, w_eff, alpha, fan_in, exact):
        self.w_eff, self.alpha, self.fan_in, self.exact = w_eff, alpha, fan_in, exact


def _binary_kernel(layer):
    """A :class:`_BinaryKernel` when ``layer``'s effective kernel is +-alpha per output unit."""
    if not isinstance(layer, (QuantAffine, QuantConv2D)) or layer.kernel_quantizer.precision != 1:
        return None
    w_eff = np.asarray(to_numpy(layer.quantized_kernel(train=False)))
    if w_eff.dtype != np.float32:
        return None
    axis = kernel_channel_axis(layer)
    moved = np.moveaxis(w_eff, axis, 0).reshape(w_eff.shape[axis], -1)
    magnitude = np.abs(moved)
    alpha = magnitude.max(axis=1)
    rebuilt = np.where(moved >= 0, alpha[:, None], -alpha[:, None]).astype(np.float32)
    if not np.array_equal(rebuilt.view(np.uint32), moved.view(np.uint32)):
        return None  # not +-alpha_c (or a -0.0 from alpha_c = 0)
    fan_in = moved.shape[1]
    scaled = not np.all(alpha == 1)
    return _BinaryKernel(w_eff, alpha.astype(np.float32) if scaled else None, fan_in,
                         _exact_multiples(alpha, fan_in))


class _NotFusable(Exception):
    pass


class _Converter:
    """One left-to-right pass over the flattened layer list, emitting stages (see the module doc)."""

    def __init__(self, named_layers, input_shape, allow_inexact, dtype=np.float32):
        self.input_shape = tuple(input_shape)
        self.dtype = np.dtype(dtype)  # float16: a half-precision model's float stages compute in it
        self.paths = [path for path, _ in named_layers]
        self.layers = [layer for _, layer in named_layers]
        self.allow_inexact = allow_inexact
        self.stages = []
        self.notes = []
        self.pending = []
        self.pending_shape = tuple(input_shape)
        self.spec = make_spec("float", None, input_shape)
        self._kernels = {}

    # -- helpers -------------------------------------------------------------------------------
    def note(self, index, text):
        layer = self.layers[index]
        self.notes.append(f"layer {self.paths[index]} ({type(layer).__name__}): {text}")

    def binary(self, index):
        """The binary kernel of layer ``index`` if it can run on packed bits, else None."""
        if index not in self._kernels:
            kernel = _binary_kernel(self.layers[index])
            if kernel is not None and not kernel.exact:
                if self.allow_inexact:
                    self.note(index, "kernel scale is not exact in float32 sums; fused anyway "
                                     "(allow_inexact=True): results may differ from the simulation by "
                                     "rounding")
                else:
                    self.note(index, "binary kernel whose scale makes the simulation's float sums round; "
                                     "kept as a float stage (weights stored as sign bits + scale)")
                    kernel = None
            self._kernels[index] = kernel
        return self._kernels[index]

    def push(self, stage):
        self.stages.append(stage)
        self.spec = stage.output_spec

    def flush(self):
        if self.pending:
            layers = self.pending
            encodings = FloatStage.prepare_layers(layers)
            self.stages.append(FloatStage(layers, self.pending_shape, encodings, self.dtype))
            self.pending = []

    def add_float(self, layer):
        if not self.pending:
            self.pending_shape = sim_shape(self.spec)
        self.pending.append(layer)
        shape = layer.output_shape((1,) + sim_shape(self.spec))[1:]
        self.spec = make_spec("float", None, shape)

    def takes_packed(self, index):
        """Layer ``index`` is a binary kernel whose input quantizer is the identity or a sign."""
        layer = self.layers[index]
        if self.binary(index) is None:
            return False
        q = layer.input_quantizer
        return isinstance(q, Identity) or _sign_quantizer(q)

    def next_consumer(self, index):
        """Index of the first layer from ``index`` that is not a no-op on +-1 values, and whether a
        max-pool was skipped on the way."""
        pooled = False
        while index < len(self.layers):
            layer = self.layers[index]
            if isinstance(layer, (Dropout, Flatten)):
                pass
            elif isinstance(layer, MaxPool2D):
                pooled = True
            elif isinstance(layer, QuantActivation) and (
                    isinstance(layer.quantizer, Identity) or _sign_quantizer(layer.quantizer)):
                pass
            else:
                return index, pooled
            index += 1
        return None, pooled

    # -- the pass ------------------------------------------------------------------------------
    def run(self):
        index = self.bitplane_first()
        n = len(self.layers)
        while index < n:
            layer = self.layers[index]
            if self.spec[0] == "float":
                index = self.float_step(index, layer)
            else:
                index = self.packed_step(index, layer)
        if self.spec[0] == "packed":
            self.unpack()
        self.flush()
        if not self.stages:
            self.stages.append(FloatStage([], sim_shape(self.spec)))
        return self.stages

    def bitplane_first(self):
        """A model that starts ``PixelCodes - [Flatten] [Dropout] - binary QuantAffine - ... - sign``:
        one :class:`BitplaneDenseStage` for all of it; returns the index of the first layer left (0
        when the model does not start that way)."""
        if not self.layers or not isinstance(self.layers[0], PixelCodes):
            return 0
        index = 1
        while index < len(self.layers) and isinstance(self.layers[index], (Flatten, Dropout)):
            index += 1
        if index >= len(self.layers):
            return 0
        layer = self.layers[index]
        kernel = self.binary(index) if isinstance(layer, QuantAffine) else None
        if kernel is None or kernel.alpha is not None or layer.bias or \
                not isinstance(layer.input_quantizer, Identity):
            return 0
        bits = self.layers[0].bits
        if not PixelCodes.sums_exact(bits, kernel.fan_in):
            self.note(index, f"{bits}-bit codes over {kernel.fan_in} inputs: the simulation's float32 sums may "
                             "round; the first layer stays a float stage")
            return 0
        try:
            ops, _, _, _, terminal, next_index = self.chain(index + 1, spatial=False)
            threshold, direction = _bitplane_thresholds(kernel, ops, terminal, bits)
        except _NotFusable as reason:
            self.note(index, f"binary layer on pixel codes: {reason}; kept as a float stage")
            return 0
        from . import kernels

        packed = kernels.pack_signs(np.ascontiguousarray(kernel.w_eff.T))
        out = make_spec("packed", "dense", (layer.out_features,))
        self.push(BitplaneDenseStage(make_spec("float", None, self.input_shape), out, packed, layer.in_features,
                                     bits, threshold, direction))
        return next_index

    def residual(self, index, layer):
        """A Residual block: its body and shortcut converted on their own (binary convolutions on
        bits, see :class:`~lowbit.packed.ResidualStage`), or the whole block as a float stage when
        nothing in it runs on bits."""
        shape = sim_shape(self.spec)
        path = self.paths[index]
        parts = []
        for part, inner in (("body", layer.body), ("shortcut", layer.shortcut)):
            if inner is None:
                parts.append(([], []))
                continue
            # a copy: conversion replaces quantized kernels by their decoded encodings in place, and
            # the block may still become one float stage of the original layers
            copy = layer_from_config(inner.spec())
            for _, owner, attr in copy.named_arrays(buffers=False):  # as Model.astype does
                setattr(owner, attr, getattr(owner, attr).astype(self.dtype))
            assign_model_arrays(copy, model_arrays(inner), source=f"layer {path}.{part}")
            converter = _Converter(_flat_layers(copy, f"{path}.{part}."), shape, self.allow_inexact, self.dtype)
            parts.append((converter.run(), converter.notes))
        (body, body_notes), (shortcut, shortcut_notes) = parts
        self.notes += body_notes + shortcut_notes
        if all(isinstance(stage, FloatStage) for stage in body + shortcut):
            self.note(index, "no binary layer on +-1 input inside the block: it runs as a float stage")
            self.add_float(layer)
            return index + 1
        self.flush()
        self.push(ResidualStage(self.spec, body, shortcut))
        floats = _float_parts(body)
        skip = _float_parts(shortcut) if layer.shortcut is not None else ["identity"]
        self.note(index, f"binary convolution on bits; in float32 as in the simulation: body "
                         f"{', '.join(floats) or 'nothing'}; shortcut {', '.join(skip)}; then the sum")
        return index + 1

    def float_step(self, index, layer):
        if isinstance(layer, Residual):
            return self.residual(index, layer)
        if isinstance(layer, Concat):
            self.note(index, "parallel branches: the block runs as a float stage")
        if isinstance(layer, (QuantAffine, QuantConv2D)) and _sign_quantizer(layer.input_quantizer) \
                and self.binary(index) is not None:
            self.pack(nhwc=isinstance(layer, Conv2D), terminal=layer.input_quantizer)
            return index
        if isinstance(layer, RSign):
            # the learned thresholds go into the pack stage with the per-channel layers before them
            consumer, pooled = self.next_consumer(index + 1)
            if consumer is not None and self.takes_packed(consumer):
                spatial = len(sim_shape(self.spec)) == 3
                self.add_float(layer)
                self.pack(nhwc=spatial and (isinstance(self.layers[consumer], Conv2D) or pooled),
                          terminal=SteSign())
                return index + 1
        if isinstance(layer, QuantActivation) and _sign_quantizer(layer.quantizer):
            consumer, pooled = self.next_consumer(index + 1)
            if consumer is not None and self.takes_packed(consumer):
                spatial = len(sim_shape(self.spec)) == 3
                self.pack(nhwc=spatial and (isinstance(self.layers[consumer], Conv2D) or pooled),
                          terminal=layer.quantizer)
                return index + 1
        if isinstance(layer, Dropout):
            return index + 1  # the identity at evaluation
        if isinstance(layer, (QuantAffine, QuantConv2D)) and layer.kernel_quantizer.precision == 1 \
                and not _sign_quantizer(layer.input_quantizer):
            self.note(index, "binary kernel on real-valued input: float stage (weights stored as sign bits)")
        self.add_float(layer)
        return index + 1

    def packed_step(self, index, layer):
        layout = self.spec[1]
        if isinstance(layer, Dropout) or (isinstance(layer, QuantActivation) and (
                isinstance(layer.quantizer, Identity) or _sign_quantizer(layer.quantizer))):
            return index + 1  # identity on +-1 values
        if isinstance(layer, Flatten):
            if layout == "nhwc":
                self.push(FlattenStage(self.spec, make_spec("packed", "nhwc_flat", self.spec[2])))
            return index + 1
        if isinstance(layer, MaxPool2D) and layout == "nhwc" and layer.padding < layer.kernel_size:
            dims = _pool_dims(self.spec[2], layer)
            self.push(PackedMaxPoolStage(self.spec, make_spec("packed", "nhwc", dims),
                                         layer.kernel_size, layer.stride, layer.padding))
            return index + 1
        if self.takes_packed(index) and (isinstance(layer, Affine) or layout == "nhwc"):
            return self.binary_layer(index)
        self.unpack()
        return index

    def pack(self, nhwc, terminal=None):
        """Flush the float layers and pack their output's signs (``terminal`` is the sign quantizer).

        Per-channel layers at the end of the pending float layers (BatchNorm, ReLU, Rescale) become
        the pack stage's float thresholds when :func:`_float_thresholds` can derive them exactly.
        """
        shape = sim_shape(self.spec)
        threshold = direction = None
        tail = self.pending_tail(nhwc, shape)
        if tail and terminal is not None:
            try:
                threshold, direction = _float_thresholds(tail, terminal, shape[0], spatial=nhwc)
            except _NotFusable:
                threshold = direction = None
            else:
                del self.pending[len(self.pending) - len(tail):]
        self.flush()
        if nhwc:
            out = make_spec("packed", "nhwc", shape)
        else:
            out = make_spec("packed", "dense", (int(np.prod(shape)),))
        self.push(PackStage(self.spec, out, threshold, direction))

    def pending_tail(self, nhwc, shape):
        """The per-channel float32 layers at the end of ``pending`` that a pack stage can absorb."""
        if not ((nhwc and len(shape) == 3) or (not nhwc and len(shape) == 1)):
            return []
        tail = []
        for layer in reversed(self.pending):
            per_channel = isinstance(layer, (BatchNorm, ReLU, Rescale)) or _per_channel_monotone(layer) or (
                isinstance(layer, QuantActivation) and isinstance(layer.quantizer, Identity))
            if not per_channel:
                break
            tail.insert(0, layer)
        # A float16 model computes these layers in float16: thresholds are derived in float32 only.
        arrays = [getattr(inner, attr) for _, inner, attr in Sequential(self.pending).named_arrays()]
        if any(np.asarray(to_numpy(a)).dtype != np.float32 for a in arrays):
            return []
        return tail

    def unpack(self):
        self.push(UnpackStage(self.spec, make_spec("float", None, sim_shape(self.spec))))

    def binary_layer(self, index):
        from . import kernels

        layer = self.layers[index]
        kernel = self.binary(index)
        layout, dims = self.spec[1], self.spec[2]
        w_eff = kernel.w_eff
        if isinstance(layer, Conv2D):
            if dims[0] != layer.in_channels:
                raise ValueError(f"layer {self.paths[index]}: {layer.in_channels} input channels, "
                                 f"the input has {dims[0]}")
            packed = kernels.pack_signs(np.ascontiguousarray(w_eff.transpose(0, 2, 3, 1)))
            k, s, p = layer.kernel_size, layer.stride, layer.padding
            out_dims = (layer.out_channels, conv_output_size(dims[1], k, s, p),
                        conv_output_size(dims[2], k, s, p))
            acc_spec = make_spec("acc", "nhwc", out_dims)
            self.push(BinaryConvStage(self.spec, acc_spec, packed, s, p))
        else:
            out = layer.out_features
            if layout == "dense":
                packed = kernels.pack_signs(np.ascontiguousarray(w_eff.T))
            else:
                # The simulation flattens NCHW (row c*H*W + h*W + w); the activations are NHWC words
                # per pixel: permute the rows to (h, w, c) and pack them per pixel the same way.
                channels, height, width = dims
                rows = w_eff.reshape(channels, height, width, out).transpose(3, 1, 2, 0)
                packed = kernels.pack_signs(np.ascontiguousarray(rows)).reshape(out, -1)
            if int(np.prod(dims)) != layer.in_features:
                raise ValueError(f"layer {self.paths[index]}: {layer.in_features} input features, "
                                 f"the input has {dims}")
            acc_spec = make_spec("acc", "dense", (out,))
            self.push(BinaryDenseStage(self.spec, acc_spec, np.ascontiguousarray(packed), layer.in_features))
        try:
            return self.fuse(index, layer, kernel)
        except _NotFusable as reason:
            if str(reason) != "no sign follows" or any(
                    isinstance(later, (Affine, Conv2D)) for later in self.layers[index + 1:]):
                self.note(index, f"{reason}; accumulators go to float32")
            bias = layer.b if layer.bias else None
            self.push(AccToFloatStage(self.spec, make_spec("float", None, self.spec[2]), kernel.alpha, bias))
            return index + 1

    def chain(self, index, spatial):
        """The per-channel layers after a binary layer up to the next sign (see the module doc)."""
        ops, pool, pool_at, flat = [], None, None, False
        n = len(self.layers)
        while index < n:
            layer = self.layers[index]
            if isinstance(layer, Dropout):
                index += 1
                continue
            if isinstance(layer, QuantActivation):
                q = layer.quantizer
                if _sign_quantizer(q):
                    return ops, pool, pool_at, flat, q, index + 1
                if isinstance(q, Identity):
                    index += 1
                    continue
                if flat:
                    break
                ops.append(layer)
                index += 1
                continue
            if isinstance(layer, RSign) and not flat:
                # sign(x - threshold) is the sign: the plain sign of its +-1 output ends the chain
                return ops + [layer], pool, pool_at, flat, SteSign(), index + 1
            if isinstance(layer, (BatchNorm, ReLU, Rescale, RPReLU)) and not flat:
                ops.append(layer)
                index += 1
                continue
            if isinstance(layer, MaxPool2D) and spatial and pool is None and not flat \
                    and layer.padding < layer.kernel_size:
                pool, pool_at = layer, len(ops)
                index += 1
                continue
            if isinstance(layer, Flatten):
                flat = flat or spatial
                index += 1
                continue
            if isinstance(layer, (QuantAffine, QuantConv2D)) and _sign_quantizer(layer.input_quantizer):
                return ops, pool, pool_at, flat, layer.input_quantizer, index
            break
        raise _NotFusable("no sign follows")

    def fuse(self, index, layer, kernel):
        spatial = isinstance(layer, Conv2D)
        ops, pool, pool_at, flat, terminal, next_index = self.chain(index + 1, spatial)
        before = ops if pool is None else ops[:pool_at]
        after = [] if pool is None else ops[pool_at:]
        bits, pre = _evaluate_chain(layer, kernel, before, after, terminal, spatial,
                                    keep_pre=pool is not None)
        threshold, direction = _thresholds(bits, kernel.fan_in)
        acc_spec = self.spec
        if pool is None:
            packed = make_spec("packed", acc_spec[1], acc_spec[2])
            self.push(ThresholdStage(acc_spec, packed, threshold, direction))
        else:
            dims = _pool_dims(acc_spec[2], pool)
            if np.all(pre[1:] >= pre[:-1]):
                # max commutes with the non-decreasing layers before the pool: pool the integers
                # (the pool and the threshold in one pass)
                self.push(ThresholdMaxPoolStage(acc_spec, make_spec("packed", "nhwc", dims), pool.kernel_size,
                                                pool.stride, pool.padding, threshold, direction))
            elif _non_decreasing_after(pre, bits):
                # sign(after(max v)) = max sign(after(v)) when sign o after is non-decreasing: OR the bits
                packed = make_spec("packed", "nhwc", acc_spec[2])
                self.push(ThresholdStage(acc_spec, packed, threshold, direction))
                self.push(PackedMaxPoolStage(self.spec, make_spec("packed", "nhwc", dims),
                                             pool.kernel_size, pool.stride, pool.padding))
            else:
                raise _NotFusable("the max-pool sits between layers that are not monotone the same way")
        if flat:
            self.push(FlattenStage(self.spec, make_spec("packed", "nhwc_flat", self.spec[2])))
        return next_index


def _pool_dims(dims, pool):
    channels, height, width = dims
    k, s, p = pool.kernel_size, pool.stride, pool.padding
    return (channels, conv_output_size(height, k, s, p), conv_output_size(width, k, s, p))


def _evaluate_chain(layer, kernel, before, after, terminal, spatial, keep_pre):
    """Bits (2K+1, O) of the simulation's sign for every accumulator -K..K, by running its layers.

    Also returns the values just before the pool (``keep_pre``) for the pool's monotonicity test.
    """
    fan_in = kernel.fan_in
    out_channels = layer.out_channels if spatial else layer.out_features
    rows_total = 2 * fan_in + 1
    bits = np.empty((rows_total, out_channels), dtype=bool)
    pre = np.empty((rows_total, out_channels), dtype=np.float32) if keep_pre else None
    step = max(1, _GRID_ELEMENTS // out_channels)
    scale = kernel.alpha if kernel.alpha is not None else np.ones(out_channels, np.float32)
    for start in range(0, rows_total, step):
        stop = min(rows_total, start + step)
        acc = np.arange(start - fan_in, stop - fan_in, dtype=np.float32)
        # The simulation's product value for accumulator j: exactly j * alpha (checked), then + bias.
        v = acc[:, None] * scale[None, :]
        if layer.bias:
            v = v + layer.b
        if spatial:
            v = v.reshape(stop - start, out_channels, 1, 1)
        for op in before:
            v = op.forward(v, train=False)
        if keep_pre:
            pre[start:stop] = v.reshape(stop - start, out_channels)
        for op in after:
            v = op.forward(v, train=False)
        q = np.asarray(terminal(v, train=False)).reshape(stop - start, out_channels)
        if not np.all((q == 1) | (q == -1)):
            raise _NotFusable("the sign quantizer returned values other than +-1")
        bits[start:stop] = q == 1
    return bits, pre


def _thresholds(bits, fan_in):
    """Threshold (int64) and direction (int8) per channel reproducing monotone ``bits`` (2K+1, C)."""
    up = np.all(bits[1:] >= bits[:-1], axis=0)
    down = np.all(bits[1:] <= bits[:-1], axis=0)
    if not np.all(up | down):
        bad = np.flatnonzero(~(up | down))
        raise _NotFusable(f"the sign is not monotone in the accumulator for channels {bad[:5].tolist()}")
    count = bits.sum(axis=0).astype(np.int64)
    # up: bits are 0..0 1..1, the first 1 at accumulator K + 1 - count (K + 1: never; -K: always).
    # down: bits are 1..1 0..0, the last 1 at accumulator count - 1 - K.
    threshold = np.where(up, fan_in + 1 - count, count - 1 - fan_in).astype(np.int64)
    direction = np.where(up, 1, -1).astype(np.int8)
    acc = np.arange(-fan_in, fan_in + 1, dtype=np.int64)[:, None]
    if not np.array_equal((acc - threshold) * direction >= 0, bits):  # belt and braces
        raise _NotFusable("internal error: thresholds do not reproduce the evaluated bits")
    return threshold, direction


def _non_decreasing_after(pre, bits):
    order = np.argsort(pre, axis=0, kind="stable")
    ordered = np.take_along_axis(bits, order, axis=0)
    return bool(np.all(ordered[1:] >= ordered[:-1]))


def _float_keys(values):
    """float32 -> int64 keys in the order of the floats (-0.0 just below +0.0; NaN not allowed)."""
    bits = np.asarray(values, dtype=np.float32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)


def _key_floats(keys):
    """The inverse of :func:`_float_keys`."""
    keys = np.asarray(keys, dtype=np.int64)
    bits = np.where(keys < 0, (-(keys + 1)) | np.int64(-(2 ** 31)), keys)
    return bits.astype(np.int32).view(np.float32)


def _signs_after(ops, terminal, v, shape, allow_nan=False):
    """The bits (``shape``) of the simulation's sign ``terminal(ops(v))``, in evaluation mode.

    NaN before the sign raises :class:`_NotFusable`, or gives None with ``allow_nan``.
    """
    with np.errstate(all="ignore"):
        for op in ops:
            v = op.forward(v, train=False)
        v = np.asarray(to_numpy(v))
        if np.isnan(v).any():
            if allow_nan:
                return None
            raise _NotFusable("the layers before the sign give NaN")
        q = np.asarray(to_numpy(terminal(v, train=False))).reshape(shape)
    if not np.all((q == 1) | (q == -1)):
        raise _NotFusable("the sign quantizer returned values other than +-1")
    return q == 1


def _bisect(bits_at, lowest, highest, at_low, at_high):
    """Bisection over the integer keys ``[lowest, highest]`` of bits that are monotone per channel.

    ``bits_at`` maps keys (1, C) to bits (1, C); ``at_low`` / ``at_high`` are the bits at the two ends.
    Returns ``(low, high, down, varies)``: where the bit changes, ``low`` is the last key with the
    low end's bit and ``high`` the first with the other; ``down`` marks bits that fall (1 then 0).
    """
    down = at_low & ~at_high
    varies = at_low != at_high
    low = np.full(at_low.shape, lowest, np.int64)
    high = np.full(at_low.shape, highest, np.int64)
    while np.any(varies & (high - low > 1)):
        middle = (low + high) // 2
        on = bits_at(middle[None, :])[0] ^ down  # direction-corrected: 0 then 1
        high = np.where(varies & on, middle, high)
        low = np.where(varies & ~on, middle, low)
    return low, high, down, varies


def _probes(edge, lowest, highest, special=()):
    """Keys (R, C) that check derived thresholds: each channel's ``edge`` +-64, the ``special`` keys and
    256 random keys of the range, all clipped to ``[lowest, highest]``."""
    channels = edge.shape[0]
    rows = [edge[None, :] + np.arange(-64, 65)[:, None]]
    if len(special):
        rows.append(np.broadcast_to(np.asarray(special, np.int64)[:, None], (len(special), channels)))
    rows.append(np.random.default_rng(0).integers(lowest, highest + 1, size=(256, channels)))
    return np.clip(np.concatenate(rows, axis=0), lowest, highest)


def _float_thresholds(ops, terminal, channels, spatial):
    """Float32 thresholds (C,) and directions (C,) that reproduce ``terminal(ops(x))`` per channel.

    ``ops`` are per-channel float32 layers that are monotone in each element (BatchNorm, ReLU,
    Rescale: each float32 operation rounds monotonically), so the sign after them is a threshold on
    ``x`` in float order.  The layers themselves are evaluated (evaluation mode, shape ``(R, C)`` or
    ``(R, C, 1, 1)``): at both ends of the domain for the direction, then a bisection over the
    float32 values in order, then a check on the neighbours of every threshold, signed zeros and
    random values.  A constant channel gets threshold -inf (always 1) or NaN (never).  The domain is
    the widest of +-3.4e38, +-1e30, ..., +-1e5 on which the layers give no NaN (an overflow times a
    zero gamma); outside it the simulation has no sign to give (its quantizer refuses NaN).
    """
    def bits(keys, allow_nan=False):
        keys = np.asarray(keys, dtype=np.int64)
        out = np.empty(keys.shape, dtype=bool)
        step = max(1, _GRID_ELEMENTS // channels)
        for start in range(0, keys.shape[0], step):
            part = keys[start:start + step]
            v = _key_floats(part)
            if spatial:
                v = v.reshape(part.shape[0], channels, 1, 1)
            part_bits = _signs_after(ops, terminal, v, part.shape, allow_nan)
            if part_bits is None:
                return None
            out[start:start + step] = part_bits
        return out

    # The domain: the widest symmetric range on which the layers give numbers (0 * inf = NaN where an
    # overflow meets a zero gamma); beyond it the simulation itself has no sign to give.
    for limit in (np.finfo(np.float32).max, 1e30, 1e20, 1e10, 1e5):
        lowest, highest = _float_keys([-limit, limit])
        ends = bits(np.array([[lowest] * channels, [highest] * channels]), allow_nan=True)
        if ends is not None:
            break
    else:
        raise _NotFusable("the layers before the sign give NaN on moderate inputs")
    at_low = ends[0]
    low, high, down, varies = _bisect(bits, lowest, highest, at_low, ends[1])
    threshold = np.where(down, _key_floats(low), _key_floats(high)).astype(np.float32)
    threshold = np.where(varies, threshold, np.where(at_low, np.float32(-np.inf), np.float32(np.nan)))
    threshold = threshold.astype(np.float32)
    direction = np.where(down, -1, 1).astype(np.int8)
    # belt and braces: every threshold's neighbourhood, the special values, random values
    keys = _probes(np.where(down, low, high), lowest, highest, _float_keys([0.0, -0.0, 1.0, -1.0]))
    x = _key_floats(keys)
    with np.errstate(invalid="ignore"):
        expected = np.where(direction > 0, x >= threshold, x <= threshold)
    if not np.array_equal(bits(keys), expected):
        raise _NotFusable("float thresholds do not reproduce the layers before the sign")
    return threshold, direction


def _bitplane_thresholds(kernel, ops, terminal, bits):
    """Thresholds on ``T = 2 * codes . w - L * sum(w)`` (``L = 2^bits - 1``) for :class:`BitplaneDenseStage`.

    After :class:`~lowbit.layers.PixelCodes` the layer sums ``(2 p_k - L) / 2^bits * w_k``, all
    multiples of ``2^-bits`` (checked small enough by the caller), so the simulation's float32 value
    is exactly ``T / 2^bits``.  The per-channel ``ops`` and the sign ``terminal`` (the model's own
    layers) are evaluated on it, and a bisection over the integers ``|T| <= L * K`` finds each
    channel's threshold (the composition is monotone in T); checked again around every threshold.
    """
    levels = 2 ** int(bits) - 1
    channels = kernel.w_eff.shape[1]

    def bits_at(totals):
        totals = np.asarray(totals, dtype=np.int64)
        y = (totals.astype(np.float64) * 2.0 ** -int(bits)).astype(np.float32)  # exact
        return _signs_after(ops, terminal, y, totals.shape)

    lowest, highest = -levels * kernel.fan_in, levels * kernel.fan_in
    at_low = bits_at(np.full((1, channels), lowest))[0]
    at_high = bits_at(np.full((1, channels), highest))[0]
    low, high, down, varies = _bisect(bits_at, lowest, highest, at_low, at_high)
    # bit = direction * (T - threshold) >= 0; a constant channel: always (lowest) or never (highest + 1)
    threshold = np.where(down, low, high)
    threshold = np.where(varies, threshold, np.where(at_low, lowest, highest + 1)).astype(np.int64)
    direction = np.where(down, -1, 1).astype(np.int8)
    probes = _probes(np.where(down, low, high), lowest, highest)
    if not np.array_equal(bits_at(probes), (probes - threshold) * direction >= 0):
        raise _NotFusable("the sign is not monotone in the bit-plane sum")
    return threshold, direction


def _source_info(model):
    count = int(sum(getattr(layer, attr).size for _, layer, attr in model.named_arrays()))
    return {"name": model.name, "parameters": count, "float32_bytes": 4 * count}


def convert(model, allow_inexact=False, name=None):
    """Convert a trained model into a :class:`~lowbit.packed.PackedModel` for inference.

    Parameters
    ----------
    model : Model
        Any lowbit model (on the CPU or the GPU; it is copied, not modified).  Binary layers whose
        input is +-1 run on packed bits, each BatchNorm (and whatever else is per channel) up to the
        next sign becomes an integer threshold, k-bit kernels are stored as codes, fp16 ones as
        float16, the rest as float32 (see the module docstring).
    allow_inexact : bool
        Fuse binary layers whose kernel scale makes the simulation's float sums round (not done by
        lowbit's zoo models nor by :func:`post_training_quantize`); their bits then match the
        simulation up to that rounding only.
    name : str, optional
        Name of the packed model (default: the model's name).
    Returns
    -------
    PackedModel
        On the CPU; ``notes`` says which layers could not be fused and why.

    Raises
    ------
    TypeError
        ``model`` is not a lowbit Model.
    ValueError
        The model is stochastic at evaluation (``StochasticBinary(deterministic_eval=False)``).
    """
    if not isinstance(model, Model):
        raise TypeError(f"model must be a lowbit Model, got {type(model).__name__}")
    _check_deterministic(model)
    cpu = _cpu_copy(model)
    converter = _Converter(_flat_layers(cpu), cpu.input_shape, bool(allow_inexact), cpu.compute_dtype)
    stages = converter.run()
    return PackedModel(stages, cpu.input_shape, name=name or model.name, notes=converter.notes,
                       source=_source_info(model))


def compare_predictions(model, packed, x, batch_size=100):
    """How far ``packed`` is from ``model``'s simulation on images ``x``.

    Returns a dict: ``labels_equal`` (count), ``count``, ``max_abs_score_difference``,
    ``scores_identical`` (bit for bit).
    """
    sim = model.predict_scores(x, batch_size)
    got = packed.predict_scores(x, batch_size)
    return {
        "count": int(len(x)),
        "labels_equal": int((sim.argmax(axis=1) == got.argmax(axis=1)).sum()),
        "max_abs_score_difference": float(np.max(np.abs(sim - got))) if len(x) else 0.0,
        "scores_identical": bool(np.array_equal(sim, got)),
    }


# -- post-training quantization ---------------------------------------------------------------------
class _RangeRecorder(Quantizer):
    """Identity that records the range of what passes through it, and a random sample of it (up to
    2^16 values a batch) for the percentile and MSE ranges (calibration only; never saved)."""

    name = "range_recorder"

    def __init__(self, percentile, clipping, rng):
        self.low = np.inf
        self.high = 0.0
        self.percentile = percentile
        self.clipping = clipping
        self.rng = rng
        self.samples = []

    def forward(self, x, train=False, channel_axis=None):
        values = np.asarray(to_numpy(x)).reshape(-1)
        if values.size:
            self.low = min(self.low, float(values.min()))
            self.high = max(self.high, float(np.abs(values).max()))
            if self.percentile < 100 or self.clipping == "mse":
                take = min(values.size, 1 << 16)
                self.samples.append(self.rng.choice(values, take, replace=False))
        return x

    def value(self, bits, signed):
        """The range ``max_value`` of a ``bits``-bit DoReFaActivation."""
        if self.clipping == "mse" and self.samples:
            # The largest |x| joins the sample, so that the max range is among the candidates (an
            # unsigned quantizer is chosen only when no x was negative: then it is the largest x).
            top = np.array([self.high], dtype=self.samples[0].dtype)
            return mse_activation_range(np.concatenate(self.samples + [top]), bits, signed=signed)
        if self.percentile < 100 and self.samples:
            high = float(np.percentile(np.abs(np.concatenate(self.samples)), self.percentile))
        else:
            high = self.high
        return high if high > 0 else 1.0


_ALLOWED_BITS = tuple(range(1, 9)) + (16, 32)


def _check_limit(limit):
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0:
        raise ValueError(f"limit must be an int >= 0 (0: all test images), got {limit!r}")


def _check_bits(name, bits):
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in _ALLOWED_BITS:
        raise ValueError(f"{name} must be one of 1..8, 16, 32, got {bits!r}")
    return int(bits)


def _check_weight_clipping(weight_clipping):
    if weight_clipping not in WEIGHT_CLIPPINGS:
        raise ValueError(f"weight_clipping must be one of {list(WEIGHT_CLIPPINGS)}, got {weight_clipping!r}")


def _check_activation_clipping(activation_clipping, percentile=100.0):
    if activation_clipping not in ACTIVATION_CLIPPINGS:
        raise ValueError(f"activation_clipping must be one of {list(ACTIVATION_CLIPPINGS)}, "
                         f"got {activation_clipping!r}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile!r}")
    if activation_clipping == "mse" and percentile != 100:
        raise ValueError(f"percentile (got {percentile!r}) sets the 'max' activation range; with "
                         "activation_clipping='mse' the range is searched, so pass activation_clipping='max' "
                         "to use a percentile")


def post_training_quantize(model, weight_bits, activation_bits, calibration_images=None, per_channel=True,
                           keep_first=True, keep_last=True, percentile=100.0, batch_size=100, seed=0,
                           weight_clipping="mse", activation_clipping="mse"):
    """Quantize a trained float model without retraining; returns the quantized twin (a Model).

    Built on :func:`lowbit.quantize.quantized_twin` (every Affine/Conv2D becomes its quantized twin;
    the first and last keep float kernels by default), then:

    * ``weight_bits`` 2..8: :class:`~lowbit.quantizers.UniformWeight` (symmetric integer grid,
      ``alpha = max|W|`` per output unit with ``per_channel``, else per tensor), after the latent
      weights are clipped to the range of least squared error
      (:func:`~lowbit.quantizers.mse_weight_range`) with ``weight_clipping="mse"``; 16: float16;
      1: ``sign(W) * mean|W|`` per output unit (XNOR-Net; per tensor without ``per_channel``) with
      the scale rounded to ``24 - bit_length(fan-in)`` significant bits so that the binary products
      are exact in float32 and the layer runs packed after :func:`convert`.
    * ``activation_bits`` 2..8: every quantized layer's input quantizer is a
      :class:`~lowbit.quantizers.DoReFaActivation` whose range ``max_value`` is calibrated on that
      layer's input in the float model over ``calibration_images`` (signed when the input took
      negative values): with ``activation_clipping="mse"`` (the default) the range of least squared
      error on a sample of the inputs (:func:`~lowbit.quantizers.mse_activation_range`), with
      ``"max"`` the ``percentile`` of ``|input|``.  The image goes through an 8-bit quantizer,
      calibrated the same way.  1: sign (ReLUs are removed, as ``quantized_twin`` does); 16: float16.

    Parameters
    ----------
    model : Model
        A float model trained by lowbit (Affine/Conv2D layers).
    weight_bits, activation_bits : int
        1..8, 16 or 32.
    calibration_images : numpy.ndarray, float32 (N,) + input_shape, optional
        Needed for 2..8-bit activations; used for every DoReFa input quantizer when given.
    per_channel : bool
        Per-output-unit weight scales (else one per tensor).
    keep_first, keep_last : bool
        Keep the first / last layer's kernel in float32.
    percentile : float in (0, 100]
        With ``activation_clipping="max"``: the calibration statistic of ``|x|`` (100: the maximum).
    batch_size, seed : int
        Calibration batches; ``seed`` for the percentile's subsample and the twin's generators.
    weight_clipping : "mse" or "max"
        2..8-bit weights: clip each unit's (or the tensor's) weights to the MSE-optimal range first
        ("mse", the default), or quantize over the full ``max|W|`` range ("max"; at 2 bits most
        weights of a trained layer then round to 0).
    activation_clipping : "mse" or "max"
        2..8-bit activations: the range of least squared error ("mse", the default) or the
        ``percentile`` of ``|x|`` ("max"; at 2 bits the maximum leaves most activations in the
        lowest step).
    """
    from .quantize import quantized_twin

    if not isinstance(model, Model):
        raise TypeError(f"model must be a lowbit Model, got {type(model).__name__}")
    weight_bits = _check_bits("weight_bits", weight_bits)
    activation_bits = _check_bits("activation_bits", activation_bits)
    _check_weight_clipping(weight_clipping)
    _check_activation_clipping(activation_clipping, percentile)
    kinds = [type(layer) for _, layer in model.named_layers()]
    quantized = any(kind in (QuantAffine, QuantConv2D) for kind in kinds)
    if quantized or not any(kind in (Affine, Conv2D) for kind in kinds):
        raise ValueError("post-training quantization needs a float model (Affine/Conv2D layers, no quantized "
                         "ones); this model is already quantized or has no kernels")
    if 2 <= activation_bits <= 8 and calibration_images is None:
        raise ValueError(f"{activation_bits}-bit activations need calibration_images to set their ranges")
    scale = "channel" if per_channel else "tensor"
    twin = quantized_twin(
        model, 32 if 2 <= weight_bits <= 8 else weight_bits, activation_bits,
        keep_first=keep_first, keep_last=keep_last,
        first_input_bits=8 if activation_bits <= 8 else None,
        kernel_constraint=None, weight_scale=scale if weight_bits == 1 else None, seed=seed)
    targets = [layer for _, layer in twin.named_layers() if isinstance(layer, (QuantAffine, QuantConv2D))]
    for position, layer in enumerate(targets):
        kept = (position == 0 and keep_first) or (position == len(targets) - 1 and keep_last)
        if kept:
            continue
        if 2 <= weight_bits <= 8:
            layer.kernel_quantizer = UniformWeight(weight_bits, scale)
            if weight_clipping == "mse":
                _mse_clip(layer, weight_bits, scale)
        elif weight_bits == 1:
            _exact_binary_scale(layer, scale)
        layer.constrain()  # drop any cached kernel
    if calibration_images is not None:
        _calibrate(twin, targets, calibration_images, percentile, batch_size, seed, activation_clipping)
    twin.name = f"{model.name}_ptq_w{weight_bits}a{activation_bits}"
    return twin


def _mse_clip(layer, bits, scale):
    """Clip the latent W to :func:`mse_weight_range`, so that UniformWeight's max-abs scale is it."""
    w = np.asarray(to_numpy(layer.W), dtype=np.float32)
    alpha = mse_weight_range(w, bits, kernel_channel_axis(layer) if scale == "channel" else None)
    layer.W = np.clip(w, -alpha, alpha)


def _exact_binary_scale(layer, scale):
    """Set the latent W to sign(W) * alpha with alpha = mean|W| rounded so that SteSign's mean is
    exact and every product sum of the layer is exact in float32."""
    axis = kernel_channel_axis(layer)
    w = np.asarray(to_numpy(layer.W), dtype=np.float32)
    fan_in = w.size // w.shape[axis]
    if scale == "channel":
        others = tuple(a for a in range(w.ndim) if a != axis)
        alpha = np.abs(w.astype(np.float64)).mean(axis=others, keepdims=True)
        count = fan_in
    else:
        alpha = np.abs(w.astype(np.float64)).mean(keepdims=True)
        count = w.size
    alpha = np.where(alpha > 0, alpha, 1.0)
    significant = max(1, 24 - max(int(count).bit_length(), int(fan_in).bit_length()))
    alpha = _round_significand(alpha, significant)
    layer.W = np.where(w >= 0, alpha, -alpha).astype(np.float32)


def _calibrate(twin, targets, images, percentile, batch_size, seed, clipping):
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != len(twin.input_shape) + 1 or tuple(images.shape[1:]) != twin.input_shape:
        raise ValueError(f"calibration_images must have shape (N, {', '.join(map(str, twin.input_shape))}), "
                         f"got {images.shape}")
    rng = np.random.default_rng(seed)
    saved = [(layer.input_quantizer, layer.kernel_quantizer) for layer in targets]
    recorders = []
    try:
        for layer in targets:
            recorder = _RangeRecorder(percentile, clipping, rng)
            recorders.append(recorder)
            layer.input_quantizer = recorder
            layer.kernel_quantizer = Identity()  # the float model's activations
            layer.constrain()
        for start in range(0, len(images), batch_size):
            twin.forward(images[start:start + batch_size], train=False)
    finally:
        for layer, (input_q, kernel_q) in zip(targets, saved):
            layer.input_quantizer, layer.kernel_quantizer = input_q, kernel_q
            layer.constrain()
    for layer, recorder in zip(targets, recorders):
        q = layer.input_quantizer
        if isinstance(q, DoReFaActivation):
            signed = recorder.low < 0
            layer.input_quantizer = DoReFaActivation(q.bits, signed=signed,
                                                     max_value=recorder.value(q.bits, signed))


# -- commands ---------------------------------------------------------------------------------------
def _size(path):
    return os.path.getsize(path)


def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0


def quantize_command(model_path, weight_bits, activation_bits, out_path, calibrate=1000, per_channel=True,
                     keep_first=True, keep_last=True, percentile=100.0, limit=0, seed=0, verify=True,
                     data=None, out=print, weight_clipping="mse", activation_clipping="mse", progress=True):
    """``lowbit quantize``: post-training quantization of a saved float model to a packed file.

    Loads ``model_path``, quantizes it (:func:`post_training_quantize`, activation ranges on
    ``calibrate`` random training images), converts it (:func:`convert`), saves the packed model to
    ``out_path``, and prints the MNIST test accuracy before and after and both file sizes.  With
    ``verify`` it also runs the quantized simulation and reports how many labels agree with the
    packed model (all of them, by construction).

    Parameters
    ----------
    model_path, out_path : path
    weight_bits, activation_bits : int
        1..8, 16 or 32.
    calibrate : int
        Number of training images for the activation ranges (0: none; k-bit activations need some).
    limit : int
        Evaluate on the first ``limit`` test images only (0: all 10,000).
    weight_clipping, activation_clipping : "mse" or "max"
        As in :func:`post_training_quantize`.
    data : MNIST, optional
        Preloaded data set (default :func:`lowbit.data.load_mnist`).
    out : callable
        Where the report lines go (default ``print``).
    progress : bool
        Announce each step on stderr and show progress bars over the test images.

    Returns
    -------
    dict
        ``accuracy_before``, ``accuracy_after``, ``size_before``, ``size_after``, ``ratio``,
        ``labels_equal`` (with ``verify``), ``count``, ``notes``.
    """
    from .data import load_mnist

    _check_weight_clipping(weight_clipping)  # before the data set is loaded
    _check_activation_clipping(activation_clipping, percentile)
    _check_limit(limit)
    check_output_path(out_path, "-o/--output")  # before the work, not after it
    model = load_model(model_path)
    mnist = data if data is not None else load_mnist(progress=False)
    x_test, y_test = float_images(mnist.x_test), np.asarray(mnist.y_test)
    if limit:
        x_test, y_test = x_test[:limit], y_test[:limit]
    step(f"quantizing {os.fspath(model_path)} to w{weight_bits}a{activation_bits}"
         + (f" (activation ranges from {calibrate} training images)" if calibrate else ""), progress)
    calibration = None
    if calibrate:
        rng = np.random.default_rng(seed)
        count = min(int(calibrate), len(mnist.x_train))
        picks = np.sort(rng.choice(len(mnist.x_train), count, replace=False))
        calibration = float_images(mnist.x_train[picks])
    twin = post_training_quantize(model, weight_bits, activation_bits, calibration, per_channel=per_channel,
                                  keep_first=keep_first, keep_last=keep_last, percentile=percentile,
                                  seed=seed, weight_clipping=weight_clipping,
                                  activation_clipping=activation_clipping)
    step("converting the quantized model to a packed one", progress)
    packed = convert(twin)
    settings = {"weight_bits": int(weight_bits), "activation_bits": int(activation_bits),
                "per_channel": bool(per_channel), "calibration_images": int(calibrate),
                "percentile": float(percentile), "seed": int(seed), "weight_clipping": weight_clipping,
                "activation_clipping": activation_clipping}
    packed.save(out_path, metadata={"source_file": os.path.basename(os.fspath(model_path)),
                                    "post_training_quantization": settings})
    before = float((batched_scores(model, x_test, desc="float model", progress=progress).argmax(axis=1)
                    == y_test).mean())
    scores = batched_scores(packed, x_test, desc="packed model", progress=progress)
    after = float((scores.argmax(axis=1) == y_test).mean())
    size_before, size_after = _size(model_path), _size(out_path)
    result = {"accuracy_before": before, "accuracy_after": after, "size_before": size_before,
              "size_after": size_after, "ratio": size_before / size_after, "count": int(len(y_test)),
              "notes": list(packed.notes)}
    out(f"float model      {os.fspath(model_path)}: test accuracy {before:.2%} on {len(y_test)} images, "
        f"{_human(size_before)}")
    out(f"w{weight_bits}a{activation_bits} packed     {os.fspath(out_path)}: test accuracy {after:.2%}, "
        f"{_human(size_after)} ({size_before / size_after:.1f}x smaller)")
    if verify:
        sim = batched_scores(twin, x_test, desc="quantized simulation", progress=progress).argmax(axis=1)
        result["labels_equal"] = int((sim == scores.argmax(axis=1)).sum())
        out(f"packed vs quantized simulation: {result['labels_equal']}/{len(y_test)} labels equal")
    for line in packed.notes:
        out(f"note: {line}")
    return result


def convert_command(model_path, out_path, limit=0, verify=True, allow_inexact=False, data=None, out=print,
                    progress=True):
    """``lowbit convert``: convert a trained quantized model file to a packed file and check it.

    Prints both files' sizes and, with ``verify``, the MNIST test accuracy of both and how many of
    the labels agree (all of them) and the largest score difference.  Returns a dict of those.
    A float model (no quantized layer) is refused: it has nothing to pack, ``lowbit quantize`` is
    the command for it.  ``progress``: steps on stderr and progress bars over the test images.
    """
    _check_limit(limit)
    check_output_path(out_path, "-o/--output")  # before the work, not after it
    model = load_model(model_path)
    if not any(isinstance(layer, (QuantAffine, QuantConv2D, QuantActivation)) for _, layer in model.named_layers()):
        raise ValueError(f"{os.fspath(model_path)} is a float model (no quantized layer): convert has nothing to "
                         f"pack; quantize it instead: lowbit quantize {os.fspath(model_path)} -o OUT.npz "
                         "--weights 1 --activations 1 (or other bits)")
    mnist = None
    if verify:  # before the work: without MNIST it stops here, having written nothing
        from .data import load_mnist

        mnist = data if data is not None else load_mnist(progress=False)
    step(f"converting {os.fspath(model_path)}", progress)
    packed = convert(model, allow_inexact=allow_inexact)
    packed.save(out_path, metadata={"source_file": os.path.basename(os.fspath(model_path))})
    size_before, size_after = _size(model_path), _size(out_path)
    result = {"size_before": size_before, "size_after": size_after, "ratio": size_before / size_after,
              "notes": list(packed.notes)}
    out(f"{os.fspath(model_path)}: {_human(size_before)} -> {os.fspath(out_path)}: {_human(size_after)} "
        f"({size_before / size_after:.1f}x smaller)")
    if verify:
        x_test, y_test = float_images(mnist.x_test), np.asarray(mnist.y_test)
        if limit:
            x_test, y_test = x_test[:limit], y_test[:limit]
        sim = batched_scores(model, x_test, desc="simulation", progress=progress)
        got = batched_scores(packed, x_test, desc="packed model", progress=progress)
        result.update({
            "count": int(len(y_test)),
            "accuracy_simulation": float((sim.argmax(axis=1) == y_test).mean()),
            "accuracy_packed": float((got.argmax(axis=1) == y_test).mean()),
            "labels_equal": int((sim.argmax(axis=1) == got.argmax(axis=1)).sum()),
            "max_abs_score_difference": float(np.max(np.abs(sim - got))) if len(y_test) else 0.0,
            "scores_identical": bool(np.array_equal(sim, got)),
        })
        out(f"test accuracy: simulation {result['accuracy_simulation']:.2%}, packed "
            f"{result['accuracy_packed']:.2%}; labels equal {result['labels_equal']}/{len(y_test)}; "
            f"max |score difference| {result['max_abs_score_difference']:.3g}"
            f"{' (identical)' if result['scores_identical'] else ''}")
    for line in packed.notes:
        out(f"note: {line}")
    return result
