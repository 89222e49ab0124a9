"""Model builders: the networks lowbit's experiments train, by name.

``MODELS`` maps a name to a builder ``f(seed=0, **options) -> Model``; the CLI's ``--model`` takes these
names.
"""
from __future__ import annotations

import numpy as np

from .deprecation import renamed_argument
from .layers import Affine, Conv2D, Dropout, Flatten, GlobalAvgPool2D, MaxPool2D, ReLU
from .model import Model

__all__ = ["MODELS", "build_model", "deep_convnet", "mlp"]


def _seeds(seed, n):
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(n)]


def deep_convnet(seed=0, dropout=0.5):
    """The chapter-8 network of *Deep Learning from Scratch* (the 99.38% MNIST CNN), exactly:

    conv3x3(16)-ReLU-conv3x3(16)-ReLU-pool-conv3x3(32)-ReLU-conv3x3(32, pad 2)-ReLU-pool-
    conv3x3(64)-ReLU-conv3x3(64)-ReLU-pool-affine(1024, 50)-ReLU-dropout-affine(50, 10)-dropout,
    He initialisation, zero biases.  Spatial sizes 28 -> 14 -> 16 -> 8 -> 4.
    """
    s = _seeds(seed, 8)
    layers = [
        Conv2D(1, 16, 3, padding=1, seed=s[0]), ReLU(),
        Conv2D(16, 16, 3, padding=1, seed=s[1]), ReLU(),
        MaxPool2D(2, 2),
        Conv2D(16, 32, 3, padding=1, seed=s[2]), ReLU(),
        Conv2D(32, 32, 3, padding=2, seed=s[3]), ReLU(),
        MaxPool2D(2, 2),
        Conv2D(32, 64, 3, padding=1, seed=s[4]), ReLU(),
        Conv2D(64, 64, 3, padding=1, seed=s[5]), ReLU(),
        MaxPool2D(2, 2),
        Flatten(),
        Affine(64 * 4 * 4, 50, seed=s[6]), ReLU(),
        Dropout(dropout),
        Affine(50, 10, seed=s[7]),
        Dropout(dropout),
    ]
    return Model(layers, input_shape=(1, 28, 28), name="deep_convnet").seed(seed)


def mlp(seed=0, hidden=(100, 100), dropout=0.0):
    """A float ReLU multilayer perceptron on flattened 28x28 images (quick experiments and tests)."""
    hidden = [int(h) for h in hidden]
    s = _seeds(seed, len(hidden) + 1)
    layers = [Flatten()]
    width = 28 * 28
    for i, h in enumerate(hidden):
        layers += [Affine(width, h, seed=s[i]), ReLU()]
        if dropout:
            layers.append(Dropout(dropout))
        width = h
    layers.append(Affine(width, 10, seed=s[-1]))
    return Model(layers, input_shape=(1, 28, 28), name="mlp").seed(seed)


MODELS = {"deep_convnet": deep_convnet, "mlp": mlp}


def build_model(name, seed=0, **options):
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}") from None
    return builder(seed=seed, **options)


# -- binarized and low-precision networks (issue 3) ----------------------------------------------------
from .layers import BatchNorm, PixelCodes, Rescale  # noqa: E402
from .quant_layers import QuantActivation, QuantAffine, QuantConv2D  # noqa: E402
from .quantize import stochastic_kinds  # noqa: E402
from .quantizers import DoReFaActivation, quantizer_for_bits  # noqa: E402
from .reactnet import RSign  # noqa: E402

__all__ += ["bnn_mlp", "binary_cnn", "brevitas_fc", "tfc", "sfc", "lfc"]


def bnn_mlp(seed=0, hidden=(4096, 4096, 4096), stochastic=False, dropout_in=0.2, dropout_hidden=0.5,
            bn_eps=1e-4, bn_momentum=0.9, init="uniform", glorot_lr_scale=True, input_bits=8,
            draws="generator", rsign=False):
    """The MNIST multilayer perceptron of Binarized Neural Networks (Courbariaux, Hubara et al. 2016).

    ``PixelCodes(input_bits)`` (8-bit pixels to (-1, 1) on the grid k/256, so the first layer's float32
    sums are exact and the packed model runs it on the integer codes by bit planes; ``input_bits=None``:
    ``Rescale(2, -1)``, the paper's [-1, 1], and a float first stage when packed) - Flatten - Dropout(dropout_in) - then per hidden width h:
    ``QuantAffine(binary weights, bias-free) - BatchNorm(eps) - QuantActivation(sign) - Dropout``,
    and last ``QuantAffine(h, 10, binary weights, bias-free) - BatchNorm(10)`` (the scores; train with
    ``loss="squared_hinge"`` as the paper).

    * The first layer takes the real-valued (dropped-out) pixels; hidden activations are binarized right
      after BatchNorm, so dropout acts on +-1 values as in the paper's code (a dropped unit is 0, not
      ``sign(0) = +1``), and the next layer takes them as they are (no input quantizer).
    * Bias-free layers (as Brevitas/BNN-PYNQ): the BatchNorm that follows has its own shift.
    * Latent weights initialised by ``init`` ("uniform": U(-1, 1) as the paper's MNIST run; "glorot"
      for short runs), clipped to [-1, 1] after every update; ``glorot_lr_scale`` multiplies each
      layer's learning rate by ``1 / sqrt(1.5 / (fan_in + fan_out))`` as in ``binary_net.py``.
    * ``stochastic``: False, True, "weights" or "activations" -- which binarizations are
      :class:`~lowbit.quantizers.StochasticBinary` in training (deterministic at evaluation).  The
      paper's code makes only the weights stochastic ("weights").
    * BatchNorm momentum 0.9 is Lasagne's ``alpha = 0.1``.
    * ``draws``: where the dropout masks' and stochastic binarizations' random numbers come from
      (:mod:`lowbit.draws`); ``"counter"`` computes them on the GPU instead of copying them from the host.
    * ``rsign``: every hidden sign is a :class:`~lowbit.reactnet.RSign` (a learned threshold per unit)
      instead of ``QuantActivation(sign)``.
    """
    kinds = stochastic_kinds(stochastic)
    if rsign and "activation" in kinds:
        raise ValueError("rsign=True needs deterministic activations (stochastic=False or 'weights'), "
                         f"got stochastic={stochastic!r}")
    hidden = [int(h) for h in hidden]
    s = _seeds(seed, len(hidden) + 1)

    def kernel_q():
        return quantizer_for_bits(1, "weight", "weight" in kinds, draws)

    def dense(n_in, n_out, i):
        return QuantAffine(n_in, n_out, bias=False, init=init, seed=s[i], kernel_quantizer=kernel_q(),
                           kernel_constraint="clip", glorot_lr_scale=glorot_lr_scale)

    layers = [Rescale(2.0, -1.0) if input_bits is None else PixelCodes(input_bits), Flatten()]
    if dropout_in:
        layers.append(Dropout(dropout_in, draws=draws))
    width = 28 * 28
    for i, h in enumerate(hidden):
        layers += [dense(width, h, i), BatchNorm(h, momentum=bn_momentum, eps=bn_eps),
                   RSign(h) if rsign else
                   QuantActivation(quantizer_for_bits(1, "activation", "activation" in kinds, draws))]
        if dropout_hidden:
            layers.append(Dropout(dropout_hidden, draws=draws))
        width = h
    layers += [dense(width, 10, len(hidden)), BatchNorm(10, momentum=bn_momentum, eps=bn_eps)]
    return Model(layers, input_shape=(1, 28, 28), name="bnn_mlp").seed(seed)


def binary_cnn(seed=0, channels=(32, 32, 64, 64), hidden=256, keep_last=True, stochastic=False,
               input_bits=8, dropout=0.0, bn_eps=1e-4, bn_momentum=0.9, init="glorot",
               glorot_lr_scale=False, rsign=False):
    """A small VGG-like binary CNN for MNIST, in XNOR-Net block order (BN -> sign -> binary conv -> pool).

    ::

        conv3x3(1 -> c0, float weights, 8-bit input) - BN
        [sign - binconv3x3(c0 -> c1)] - maxpool2 - BN             28 -> 14
        [sign - binconv3x3(c1 -> c2)] - BN
        [sign - binconv3x3(c2 -> c3)] - maxpool2 - BN             14 -> 7
        Flatten - [sign - binary affine(c3*49 -> hidden)] - BN
        [Dropout] - [sign - affine(hidden -> 10)]                  float weights + bias if keep_last,
                                                                   else binary, bias-free, then BN(10)

    Brackets are one QuantConv2D/QuantAffine: the sign is its input quantizer and the binary weights its
    kernel quantizer.  All convolutions 3x3, stride 1, padding 1 (padded positions are 0), bias-free
    (BatchNorm follows).  ``input_bits`` (8 by default: exact for 8-bit images in [0, 1]) quantizes the
    image with :func:`~lowbit.quantizers.quantizer_for_bits`.  Binary latent weights use ``init``
    ("glorot": small, so signs move early in short Adam runs) and are clipped to [-1, 1]; the first
    conv uses He init.  With ``dropout`` the last hidden activation is binarized by a QuantActivation
    before the Dropout, so dropped units are 0.  ``stochastic`` as in :func:`bnn_mlp`.

    ``rsign``: each sign of a binary layer's input is a :class:`~lowbit.reactnet.RSign` layer in front
    of it (a learned threshold per channel; the layer's ``input_quantizer`` is then None), placed
    before the Flatten for the hidden affine layer.

    Cost: about 38 MFLOP per image forward with the default channels (three times deep_convnet).
    """
    kinds = stochastic_kinds(stochastic)
    if rsign and "activation" in kinds:
        raise ValueError("rsign=True needs deterministic activations (stochastic=False or 'weights'), "
                         f"got stochastic={stochastic!r}")
    c0, c1, c2, c3 = (int(c) for c in channels)
    hidden = int(hidden)
    s = _seeds(seed, 6)

    def sign():
        return quantizer_for_bits(1, "activation", "activation" in kinds)

    def binary():
        return dict(bias=False, init=init, input_quantizer=None if rsign else sign(),
                    kernel_quantizer=quantizer_for_bits(1, "weight", "weight" in kinds),
                    kernel_constraint="clip", glorot_lr_scale=glorot_lr_scale)

    def bn(n):
        return BatchNorm(n, momentum=bn_momentum, eps=bn_eps)

    def learned(n):
        return [RSign(n)] if rsign else []

    layers = [
        QuantConv2D(1, c0, 3, padding=1, bias=False, init="he", seed=s[0],
                    input_quantizer=quantizer_for_bits(input_bits, "activation")),
        bn(c0), *learned(c0),
        QuantConv2D(c0, c1, 3, padding=1, seed=s[1], **binary()), MaxPool2D(2, 2), bn(c1), *learned(c1),
        QuantConv2D(c1, c2, 3, padding=1, seed=s[2], **binary()), bn(c2), *learned(c2),
        QuantConv2D(c2, c3, 3, padding=1, seed=s[3], **binary()), MaxPool2D(2, 2), bn(c3), *learned(c3),
        Flatten(),
        QuantAffine(c3 * 7 * 7, hidden, seed=s[4], **binary()), bn(hidden),
    ]
    last_input = sign()
    if dropout:
        layers += [QuantActivation(last_input), Dropout(dropout)]
        last_input = None
    if keep_last:
        layers.append(QuantAffine(hidden, 10, bias=True, init="he", seed=s[5],
                                  input_quantizer=last_input))
    else:
        options = binary()
        options["input_quantizer"] = last_input
        layers += [QuantAffine(hidden, 10, seed=s[5], **options), bn(10)]
    return Model(layers, input_shape=(1, 28, 28), name="binary_cnn").seed(seed)


def _fc_activation(bits):
    """Brevitas-style activation quantizer: sign for 1 bit, signed k-bit in [-1, 1] otherwise."""
    if bits == 1:
        return quantizer_for_bits(1, "activation")
    if isinstance(bits, (int, np.integer)) and not isinstance(bits, bool) and 2 <= bits <= 8:
        return DoReFaActivation(int(bits), signed=True)
    return quantizer_for_bits(bits, "activation")


def brevitas_fc(seed=0, width=64, weight_bits=1, activation_bits=None, in_bits=None, hidden_layers=3,
                dropout=0.2, bn_eps=1e-4, bn_momentum=0.9, init="uniform", name=None, *, act_bits=None):
    """The BNN-PYNQ / Brevitas MNIST MLPs: TFC (width 64), SFC (256), LFC (1024).

    ``Rescale(2, -1)`` (pixels to [-1, 1]) - Flatten - QuantActivation(in_bits) - Dropout, then
    ``hidden_layers`` times ``QuantAffine(bias-free, weight_bits) - BatchNorm - QuantActivation(activation_bits)
    - Dropout``, then a bias-free ``QuantAffine(width, 10, weight_bits) - BatchNorm(10)``.

    Differences from Brevitas, by design: activations of 2..8 bits are
    ``DoReFaActivation(bits, signed=True)`` (levels ``2j/(2^k-1) - 1`` in [-1, 1]) rather than
    Brevitas' narrow-range integer quantizer; 2..8-bit weights are DoReFa's tanh quantizer; the final
    scalar TensorNorm is a BatchNorm over the 10 scores.  ``in_bits`` defaults to ``activation_bits`` (1
    bit: the pixel's sign, i.e. ``pixel >= 0.5``).  Latent weights U(-1, 1), clipped to [-1, 1].
    ``activation_bits`` defaults to 1; ``act_bits`` is its deprecated name.
    """
    activation_bits = renamed_argument("brevitas_fc", "act_bits", act_bits, "activation_bits", activation_bits,
                                       default=1)
    in_bits = activation_bits if in_bits is None else in_bits
    quantizer_for_bits(weight_bits, "weight")  # validates before building
    _fc_activation(activation_bits)
    width = int(width)
    s = _seeds(seed, hidden_layers + 1)

    def dense(n_in, n_out, i):
        return QuantAffine(n_in, n_out, bias=False, init=init, seed=s[i],
                           kernel_quantizer=quantizer_for_bits(weight_bits, "weight"),
                           kernel_constraint="clip")

    def bn(n):
        return BatchNorm(n, momentum=bn_momentum, eps=bn_eps)

    layers = [Rescale(2.0, -1.0), Flatten(), QuantActivation(_fc_activation(in_bits))]
    if dropout:
        layers.append(Dropout(dropout))
    n_in = 28 * 28
    for i in range(int(hidden_layers)):
        layers += [dense(n_in, width, i), bn(width), QuantActivation(_fc_activation(activation_bits))]
        if dropout:
            layers.append(Dropout(dropout))
        n_in = width
    layers += [dense(n_in, 10, int(hidden_layers)), bn(10)]
    name = name or f"fc{width}_w{weight_bits}a{activation_bits}"
    return Model(layers, input_shape=(1, 28, 28), name=name).seed(seed)


def _brevitas_mlp(arch, width):
    """The builder of one Brevitas MLP, ``arch(seed=0, weight_bits=1, activation_bits=1, **options)``:
    :func:`brevitas_fc` with three hidden layers of ``width``, named ``<arch>_w<W>a<A>``."""

    def build(seed=0, weight_bits=1, activation_bits=None, *, act_bits=None, **options):
        activation_bits = renamed_argument(arch, "act_bits", act_bits, "activation_bits", activation_bits,
                                           default=1)
        return brevitas_fc(seed, width=width, weight_bits=weight_bits, activation_bits=activation_bits,
                           name=f"{arch}_w{weight_bits}a{activation_bits}", **options)

    build.__name__ = build.__qualname__ = arch
    build.__doc__ = (f"Brevitas {arch.upper()}: :func:`brevitas_fc` with three hidden layers of {width} "
                     "(``act_bits``: the deprecated name of ``activation_bits``).")
    return build


tfc = _brevitas_mlp("tfc", 64)
sfc = _brevitas_mlp("sfc", 256)
lfc = _brevitas_mlp("lfc", 1024)


MODELS.update({"bnn_mlp": bnn_mlp, "binary_cnn": binary_cnn, "tfc": tfc, "sfc": sfc, "lfc": lfc})


# -- chapter 8's deeper networks (lowbit/blocks.py) ------------------------------------------------

def vgg_mnist(seed=0, widths=(32, 64), convs_per_stage=2, hidden=128, dropout=0.5, weight_bits=32,
              activation_bits=32):
    """VGG-style MNIST network: ``vgg_stack(widths)`` (28 -> 14 -> 7), then affine ``hidden`` - ReLU -
    dropout - affine 10."""
    from .blocks import vgg_stack

    s = _seeds(seed, 3)
    layers = vgg_stack(1, widths, convs_per_stage, seed=s[0], weight_bits=weight_bits,
                       activation_bits=activation_bits)
    side = 28 // 2 ** len(widths)
    layers += [Flatten(), Affine(widths[-1] * side * side, hidden, seed=s[1]), ReLU(),
               Dropout(dropout), Affine(hidden, 10, seed=s[2])]
    return Model(layers, input_shape=(1, 28, 28), name="vgg_mnist").seed(seed)


def resnet_mnist(seed=0, widths=(16, 32, 64), blocks_per_stage=2, weight_bits=32, activation_bits=32):
    """A small ResNet for MNIST: stem conv3x3 - BN - ReLU, then per width ``blocks_per_stage`` basic
    blocks (the first of each later stage has stride 2 and a projection shortcut), global average
    pooling, affine 10.  Spatial 28 -> 14 -> 7."""
    from .blocks import resnet_block

    s = _seeds(seed, 2 + len(widths) * blocks_per_stage)
    layers = [Conv2D(1, widths[0], 3, padding=1, bias=False, seed=s[0]), BatchNorm(widths[0]), ReLU()]
    c = widths[0]
    i = 1
    for stage, width in enumerate(widths):
        for b in range(blocks_per_stage):
            stride = 2 if stage > 0 and b == 0 else 1
            layers += resnet_block(c, width, stride, seed=s[i], weight_bits=weight_bits,
                                   activation_bits=activation_bits)
            c = width
            i += 1
    layers += [GlobalAvgPool2D(), Affine(c, 10, seed=s[-1])]
    return Model(layers, input_shape=(1, 28, 28), name="resnet_mnist").seed(seed)


def inception_mnist(seed=0, weight_bits=32, activation_bits=32):
    """A small GoogLeNet-style network: stem conv3x3(32) - BN - ReLU - pool (28 -> 14), inception
    (-> 64 channels) - pool (-> 7), inception (-> 128), global average pooling, affine 10."""
    from .blocks import inception_block

    s = _seeds(seed, 4)
    bits = {"weight_bits": weight_bits, "activation_bits": activation_bits}
    layers = [Conv2D(1, 32, 3, padding=1, bias=False, seed=s[0]), BatchNorm(32), ReLU(), MaxPool2D(2),
              inception_block(32, 16, 16, 24, 8, 8, 16, seed=s[1], **bits), MaxPool2D(2),
              inception_block(64, 32, 32, 48, 8, 16, 32, seed=s[2], **bits),
              GlobalAvgPool2D(), Affine(128, 10, seed=s[3])]
    return Model(layers, input_shape=(1, 28, 28), name="inception_mnist").seed(seed)


def bireal_resnet(seed=0, widths=(32, 64, 128), blocks_per_stage=2, shortcut=True, head="gap",
                  pre_bn=False, rsign=False, rprelu=False):
    """A binary ResNet in the Bi-Real Net style for MNIST.

    Stem: float conv3x3(1 -> widths[0]) - BN (the first layer stays real, as in BNN papers); then per
    width ``blocks_per_stage`` Bi-Real blocks ``BN(binconv3x3(sign(x))) + x`` with binary weights and
    activations in every inner convolution (stride 2 at the start of each later stage: 28 -> 14 -> 7,
    with a real AvgPool - conv1x1 - BN shortcut); global average pooling and a float affine 10 (the last
    layer stays real).  ``shortcut=False`` removes every skip connection (the ablation of chapter 8's
    argument).  ``head="flatten"`` replaces the global average pooling by a flatten, so the float
    affine layer sees every position of the last feature map (``widths[-1] * 7 * 7`` inputs).
    ``pre_bn=True``: a BatchNorm before every block's sign (see :func:`lowbit.blocks.bireal_block`).
    ``rsign`` / ``rprelu``: ReActNet's learned sign thresholds and shifted PReLU after every block
    (:mod:`lowbit.reactnet`; see :func:`lowbit.blocks.bireal_block`).
    """
    from .blocks import bireal_block

    if head not in ("gap", "flatten"):
        raise ValueError(f"head must be 'gap' or 'flatten', got {head!r}")

    s = _seeds(seed, 2 + len(widths) * blocks_per_stage)
    layers = [Conv2D(1, widths[0], 3, padding=1, bias=False, seed=s[0]), BatchNorm(widths[0])]
    c = widths[0]
    i = 1
    for stage, width in enumerate(widths):
        for b in range(blocks_per_stage):
            stride = 2 if stage > 0 and b == 0 else 1
            layers += bireal_block(c, width, stride, seed=s[i], shortcut=shortcut, pre_bn=pre_bn,
                                   rsign=rsign, rprelu=rprelu)
            c = width
            i += 1
    side = 28 // 2 ** (len(widths) - 1)
    layers += ([GlobalAvgPool2D(), Affine(c, 10, seed=s[-1])] if head == "gap"
               else [Flatten(), Affine(c * side * side, 10, seed=s[-1])])
    name = "bireal_resnet" if shortcut else "bireal_resnet_noshortcut"
    return Model(layers, input_shape=(1, 28, 28), name=name).seed(seed)


MODELS.update({"vgg_mnist": vgg_mnist, "resnet_mnist": resnet_mnist,
               "inception_mnist": inception_mnist, "bireal_resnet": bireal_resnet})
