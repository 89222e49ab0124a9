"""Conversion of trained models to packed inference models.

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

What a quantizer does is read from its :meth:`~lowbit.quantizers.Quantizer.packed_encoding` (is it
exactly the sign, the identity, deterministic, how many bits), never from its class, so a new
quantizer needs no change here.  The thresholds are derived in :mod:`lowbit.thresholds`.
Post-training quantization is :mod:`lowbit.ptq`; the ``lowbit convert`` and ``lowbit quantize``
commands are :mod:`lowbit.cli.convert` and :mod:`lowbit.cli.quantize`.
"""
from __future__ import annotations

import numpy as np

from .backend import to_numpy
from .functions import conv_output_size
from .io import assign_model_arrays, model_arrays
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
from .quant_layers import QuantActivation, QuantAffine, QuantConv2D
from .quantizers import SteSign
from .reactnet import RPReLU, RSign
from .thresholds import (
    NotFusable, binary_kernel, bitplane_thresholds, evaluate_chain, float_thresholds, integer_thresholds, non_decreasing_after,
)

__all__ = ["convert", "compare_predictions", "cpu_copy"]

def _sign_quantizer(q):
    """True when ``q`` is, at evaluation, exactly ``sign`` (+1 for x >= 0) with no scale."""
    return q.packed_encoding().sign


def _passes_signs(q):
    """True when ``q`` leaves +-1 values as they are: the identity or the sign itself."""
    encoding = q.packed_encoding()
    return encoding.passthrough or encoding.sign


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


def cpu_copy(model):
    """A copy of ``model`` on the CPU (same layers, arrays and compute dtype); the model is not changed."""
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
            if q is not None and not q.packed_encoding().deterministic:
                raise ValueError(
                    f"layer {path!r} has a {attr} that is stochastic at evaluation "
                    f"({q!r}); a packed model is deterministic")


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
            kernel = binary_kernel(self.layers[index])
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
        return _passes_signs(q)

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
            elif isinstance(layer, QuantActivation) and _passes_signs(layer.quantizer):
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
                not layer.input_quantizer.packed_encoding().passthrough:
            return 0
        bits = self.layers[0].bits
        if not PixelCodes.sums_exact(bits, kernel.fan_in):
            self.note(index, f"{bits}-bit codes over {kernel.fan_in} inputs: the simulation's float32 sums may "
                             "round; the first layer stays a float stage")
            return 0
        try:
            ops, _, _, _, terminal, next_index = self.chain(index + 1, spatial=False)
            threshold, direction = bitplane_thresholds(kernel, ops, terminal, bits)
        except NotFusable as reason:
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
        if isinstance(layer, (QuantAffine, QuantConv2D)) and layer.kernel_quantizer.packed_encoding().binary \
                and not _sign_quantizer(layer.input_quantizer):
            self.note(index, "binary kernel on real-valued input: float stage (weights stored as sign bits)")
        self.add_float(layer)
        return index + 1

    def packed_step(self, index, layer):
        layout = self.spec[1]
        if isinstance(layer, Dropout) or (isinstance(layer, QuantActivation) and _passes_signs(layer.quantizer)):
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
        the pack stage's float thresholds when :func:`~lowbit.thresholds.float_thresholds` can derive them exactly.
        """
        shape = sim_shape(self.spec)
        threshold = direction = None
        tail = self.pending_tail(nhwc, shape)
        if tail and terminal is not None:
            try:
                threshold, direction = float_thresholds(tail, terminal, shape[0], spatial=nhwc)
            except NotFusable:
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
                isinstance(layer, QuantActivation) and layer.quantizer.packed_encoding().passthrough)
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
        """A binary layer on packed input: its XNOR-popcount stage, then the threshold of what follows
        (:meth:`fuse`) or, where no threshold can be derived, the accumulators as float32."""
        layer = self.layers[index]
        kernel = self.binary(index)
        if isinstance(layer, Conv2D):
            self.push(self.binary_conv_stage(index, layer, kernel))
        else:
            self.push(self.binary_dense_stage(index, layer, kernel))
        try:
            return self.fuse(index, layer, kernel)
        except NotFusable as reason:
            if str(reason) != "no sign follows" or any(
                    isinstance(later, (Affine, Conv2D)) for later in self.layers[index + 1:]):
                self.note(index, f"{reason}; accumulators go to float32")
            bias = layer.b if layer.bias else None
            self.push(AccToFloatStage(self.spec, make_spec("float", None, self.spec[2]), kernel.alpha, bias))
            return index + 1

    def binary_conv_stage(self, index, layer, kernel):
        """The :class:`~lowbit.packed.BinaryConvStage` of a binary Conv2D on NHWC packed input."""
        from . import kernels

        dims = self.spec[2]
        if dims[0] != layer.in_channels:
            raise ValueError(f"layer {self.paths[index]}: {layer.in_channels} input channels, "
                             f"the input has {dims[0]}")
        packed = kernels.pack_signs(np.ascontiguousarray(kernel.w_eff.transpose(0, 2, 3, 1)))
        k, s, p = layer.kernel_size, layer.stride, layer.padding
        out_dims = (layer.out_channels, conv_output_size(dims[1], k, s, p), conv_output_size(dims[2], k, s, p))
        return BinaryConvStage(self.spec, make_spec("acc", "nhwc", out_dims), packed, s, p)

    def binary_dense_stage(self, index, layer, kernel):
        """The :class:`~lowbit.packed.BinaryDenseStage` of a binary Affine on dense or flattened NHWC bits."""
        from . import kernels

        layout, dims = self.spec[1], self.spec[2]
        out = layer.out_features
        if layout == "dense":
            packed = kernels.pack_signs(np.ascontiguousarray(kernel.w_eff.T))
        else:
            # The simulation flattens NCHW (row c*H*W + h*W + w); the activations are NHWC words
            # per pixel: permute the rows to (h, w, c) and pack them per pixel the same way.
            channels, height, width = dims
            rows = kernel.w_eff.reshape(channels, height, width, out).transpose(3, 1, 2, 0)
            packed = kernels.pack_signs(np.ascontiguousarray(rows)).reshape(out, -1)
        if int(np.prod(dims)) != layer.in_features:
            raise ValueError(f"layer {self.paths[index]}: {layer.in_features} input features, "
                             f"the input has {dims}")
        return BinaryDenseStage(self.spec, make_spec("acc", "dense", (out,)), np.ascontiguousarray(packed),
                                layer.in_features)

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
                if q.packed_encoding().passthrough:
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
        raise NotFusable("no sign follows")

    def fuse(self, index, layer, kernel):
        spatial = isinstance(layer, Conv2D)
        ops, pool, pool_at, flat, terminal, next_index = self.chain(index + 1, spatial)
        before = ops if pool is None else ops[:pool_at]
        after = [] if pool is None else ops[pool_at:]
        bits, pre = evaluate_chain(layer, kernel, before, after, terminal, spatial,
                                    keep_pre=pool is not None)
        threshold, direction = integer_thresholds(bits, kernel.fan_in)
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
            elif non_decreasing_after(pre, bits):
                # sign(after(max v)) = max sign(after(v)) when sign o after is non-decreasing: OR the bits
                packed = make_spec("packed", "nhwc", acc_spec[2])
                self.push(ThresholdStage(acc_spec, packed, threshold, direction))
                self.push(PackedMaxPoolStage(self.spec, make_spec("packed", "nhwc", dims),
                                             pool.kernel_size, pool.stride, pool.padding))
            else:
                raise NotFusable("the max-pool sits between layers that are not monotone the same way")
        if flat:
            self.push(FlattenStage(self.spec, make_spec("packed", "nhwc_flat", self.spec[2])))
        return next_index


def _pool_dims(dims, pool):
    channels, height, width = dims
    k, s, p = pool.kernel_size, pool.stride, pool.padding
    return (channels, conv_output_size(height, k, s, p), conv_output_size(width, k, s, p))


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
    cpu = cpu_copy(model)
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
