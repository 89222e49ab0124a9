"""Building blocks from chapter 8 of *Deep Learning from Scratch*: VGG stacks, ResNet blocks (skip
connections, projection shortcuts), GoogLeNet inception blocks, and Bi-Real binary blocks.

Every builder returns a list of layers (or one composite layer) to put in a :class:`~lowbit.model.Model`.
``weight_bits`` / ``activation_bits`` give the quantized form directly (1 = binary, 2..8 = DoReFa,
16 = fp16, 32 = float): the block's convolutions become :class:`~lowbit.quant_layers.QuantConv2D`
with those quantizers.  A float model can also be turned into its quantized twin afterwards with
:func:`lowbit.quantize.quantized_twin`, which walks through Residual and Concat blocks.
"""
from __future__ import annotations

import numpy as np

from .layers import AvgPool2D, BatchNorm, Concat, Conv2D, MaxPool2D, ReLU, Residual
from .quant_layers import QuantConv2D
from .quantizers import quantizer_for_bits

__all__ = ["conv", "vgg_stack", "resnet_block", "inception_block", "bireal_block"]


def _seed_stream(seed):
    ss = np.random.SeedSequence(seed)
    while True:
        (child,) = ss.spawn(1)
        yield int(child.generate_state(1)[0])


def conv(in_channels, out_channels, kernel_size=3, stride=1, padding=None, seed=None, bias=False,
         weight_bits=32, activation_bits=32, init="he"):
    """A convolution, float (``weight_bits == activation_bits == 32``) or quantized.

    ``padding`` defaults to ``kernel_size // 2`` ("same" for odd kernels and stride 1).  Quantized
    binary kernels get the latent-weight clip constraint.
    """
    padding = kernel_size // 2 if padding is None else padding
    if weight_bits == 32 and activation_bits == 32:
        return Conv2D(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias,
                      init=init, seed=seed)
    return QuantConv2D(
        in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias, init=init,
        seed=seed, input_quantizer=quantizer_for_bits(activation_bits, "activation"),
        kernel_quantizer=quantizer_for_bits(weight_bits, "weight"),
        kernel_constraint="clip" if weight_bits == 1 else None,
    )


def vgg_stack(in_channels, widths, convs_per_stage=2, seed=0, batchnorm=True, **bits):
    """VGG: stages of ``convs_per_stage`` 3x3 convolutions (+BN) + ReLU, each stage ending in a 2x2
    max-pool.  Returns a list of layers; the spatial size halves once per entry of ``widths``."""
    seeds = _seed_stream(seed)
    layers = []
    c = in_channels
    for width in widths:
        for _ in range(convs_per_stage):
            layers.append(conv(c, width, 3, seed=next(seeds), bias=not batchnorm, **bits))
            if batchnorm:
                layers.append(BatchNorm(width))
            layers.append(ReLU())
            c = width
        layers.append(MaxPool2D(2, 2))
    return layers


def resnet_block(in_channels, out_channels, stride=1, seed=0, **bits):
    """The basic ResNet block: ``ReLU(BN(conv3x3(ReLU(BN(conv3x3(x))))) + shortcut(x))``.

    The shortcut is the identity when the shape is kept, otherwise a projection (1x1 convolution with
    the block's stride, then BN; He et al. 2016, option B).  Returns ``[Residual(...), ReLU()]``.
    """
    seeds = _seed_stream(seed)
    body = [
        conv(in_channels, out_channels, 3, stride=stride, seed=next(seeds), **bits),
        BatchNorm(out_channels), ReLU(),
        conv(out_channels, out_channels, 3, seed=next(seeds), **bits),
        BatchNorm(out_channels),
    ]
    shortcut = None
    if stride != 1 or in_channels != out_channels:
        shortcut = [Conv2D(in_channels, out_channels, 1, stride=stride, padding=0, bias=False,
                           seed=next(seeds)), BatchNorm(out_channels)]
    return [Residual(body, shortcut), ReLU()]


def inception_block(in_channels, c1, c3_reduce, c3, c5_reduce, c5, pool_proj, seed=0, **bits):
    """GoogLeNet's inception block: four parallel branches concatenated on the channel axis.

    1x1 conv (c1) | 1x1 reduce (c3_reduce) -> 3x3 conv (c3) | 1x1 reduce (c5_reduce) -> 5x5 conv (c5)
    | 3x3 max-pool (stride 1) -> 1x1 projection (pool_proj); every conv followed by BN and ReLU.
    Output channels: ``c1 + c3 + c5 + pool_proj``; the spatial size is kept.
    """
    seeds = _seed_stream(seed)

    def unit(cin, cout, k):
        return [conv(cin, cout, k, seed=next(seeds), **bits), BatchNorm(cout), ReLU()]

    return Concat([
        unit(in_channels, c1, 1),
        unit(in_channels, c3_reduce, 1) + unit(c3_reduce, c3, 3),
        unit(in_channels, c5_reduce, 1) + unit(c5_reduce, c5, 5),
        [MaxPool2D(3, 1, 1)] + unit(in_channels, pool_proj, 1),
    ])


def bireal_block(in_channels, out_channels, stride=1, seed=0, shortcut=True, weight_bits=1,
                 activation_bits=1, pre_bn=False, rsign=False, rprelu=False):
    """Bi-Real Net block (Liu et al. 2018): ``BN(binconv3x3(sign(x))) + x``.

    A real-valued identity shortcut around every binary convolution, so real-valued activations flow
    through the network and the gradient passes the shortcut unchanged.  When the block changes the
    shape, the shortcut is ``AvgPool2D(2) -> conv1x1 (real) -> BN`` (Bi-Real Net's downsampling).
    ``shortcut=False`` gives the same network without skip connections (for the ablation).
    ``pre_bn=True`` puts a BatchNorm in front of the sign (``BN(binconv3x3(sign(BN(x)))) + x``), so
    each channel's sign threshold and the scale it sees are learned (the real-valued stream itself is
    left as it is).
    ``rsign=True`` (with ``activation_bits=1``): the sign is ReActNet's :class:`~lowbit.reactnet.RSign`
    layer (a learned threshold per channel) in front of the convolution; ``rprelu=True`` adds an
    :class:`~lowbit.reactnet.RPReLU` after the block (after the sum), ReActNet's block order.
    """
    from .reactnet import RPReLU, RSign

    if rsign and activation_bits != 1:
        raise ValueError(f"rsign=True needs activation_bits=1, got {activation_bits!r}")
    seeds = _seed_stream(seed)
    body = ([BatchNorm(in_channels)] if pre_bn else []) + ([RSign(in_channels)] if rsign else []) + [
        conv(in_channels, out_channels, 3, stride=stride, seed=next(seeds), init="glorot",
             weight_bits=weight_bits, activation_bits=32 if rsign else activation_bits),
        BatchNorm(out_channels)]
    after = [RPReLU(out_channels)] if rprelu else []
    if not shortcut:
        return body + after
    proj = None
    if stride != 1 or in_channels != out_channels:
        proj = []
        if stride != 1:
            proj.append(AvgPool2D(stride, stride))
        proj += [Conv2D(in_channels, out_channels, 1, bias=False, seed=next(seeds)),
                 BatchNorm(out_channels)]
    return [Residual(body, proj)] + after
