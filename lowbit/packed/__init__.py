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

from .common import PACKED_FORMAT, describe_spec, make_spec, sim_shape, spec_from_json, spec_to_json
from .binary_stages import (
    BinaryConvStage,
    BinaryDenseStage,
    BitplaneDenseStage,
    IntMaxPoolStage,
    PackedMaxPoolStage,
    ThresholdMaxPoolStage,
    ThresholdStage,
)
from .encoding import decode_kernel, encode_kernel, kernel_bits, kernel_channel_axis, pack_codes, unpack_codes
from .model import PackedModel, load_any, load_packed, packed_from_manifest
from .stages import (
    STAGES,
    AccToFloatStage,
    FlattenStage,
    FloatStage,
    PackStage,
    ResidualStage,
    Stage,
    UnpackStage,
    register_stage,
)

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
