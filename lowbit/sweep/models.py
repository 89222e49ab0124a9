"""The models of a sweep's points: the float model PTQ starts from, and the untrained QAT model.

``tfc``, ``sfc``, ``lfc``
    The Brevitas BNN-PYNQ MLPs (3 x 64, 256, 1024).  QAT: :func:`lowbit.zoo.tfc` etc. built with
    ``(weight_bits, activation_bits)``; every layer is quantized (first and last too, as in Brevitas)
    and the input is quantized to ``activation_bits`` (1 bit: the pixel's sign).  At 16 and 32
    activation bits the builder's hidden "activation" is only fp16 rounding or the identity, which
    would leave a linear network, so a ReLU is put in front of it (the builder's own layers are
    otherwise kept).  The float model is the same MLP with plain ``Affine`` layers and ReLU
    (``Rescale - Flatten - Dropout - [Affine - BatchNorm - ReLU - Dropout] x 3 - Affine - BatchNorm``);
    PTQ quantizes all its layers, first and last included, to compare with QAT like for like.
``deep_convnet``
    The chapter-8 CNN (:func:`lowbit.zoo.deep_convnet`).  QAT: ``quantized_twin(deep_convnet(seed), wb,
    ab)`` trained from scratch; PTQ: ``post_training_quantize`` of the float model.  Both keep the
    first and last layers' weights in float (the defaults of both functions; the usual practice of
    XNOR-Net and DoReFa), and at 1-bit activations the ReLUs go (the sign of the pre-activation).
"""
from __future__ import annotations

import numpy as np

from ..deprecation import renamed_argument
from .settings import FC_WIDTHS, RECIPES, check_arch


def _spawn_seeds(seed, n):
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(n)]


def float_model(arch, seed=0, init=None):
    """The float model of ``arch`` that PTQ starts from (see the module docstring)."""
    from .. import zoo
    from ..layers import Affine, BatchNorm, Dropout, Flatten, ReLU, Rescale
    from ..model import Model

    check_arch(arch)
    if arch == "deep_convnet":
        return zoo.deep_convnet(seed=seed)
    width = FC_WIDTHS[arch]
    init = init or RECIPES[arch]["init"]
    s = _spawn_seeds(seed, 4)

    def bn(n):  # the builder's BatchNorm settings
        return BatchNorm(n, momentum=0.9, eps=1e-4)

    layers = [Rescale(2.0, -1.0), Flatten(), Dropout(0.2)]
    n_in = 28 * 28
    for i in range(3):
        layers += [Affine(n_in, width, bias=False, init=init, seed=s[i]), bn(width), ReLU(), Dropout(0.2)]
        n_in = width
    layers += [Affine(n_in, 10, bias=False, init=init, seed=s[3]), bn(10)]
    return Model(layers, input_shape=(1, 28, 28), name=f"{arch}_float").seed(seed)


def qat_model(arch, weight_bits, activation_bits=None, seed=0, init=None, *, act_bits=None):
    """The untrained model that quantization-aware training of one point starts from.

    ``act_bits`` is the deprecated name of ``activation_bits``.
    """
    from .. import zoo
    from ..quantize import quantized_twin

    activation_bits = renamed_argument("qat_model", "act_bits", act_bits, "activation_bits", activation_bits)
    if activation_bits is None:
        raise TypeError("qat_model() needs activation_bits")
    check_arch(arch)
    if arch == "deep_convnet":
        return quantized_twin(zoo.deep_convnet(seed=seed), weight_bits, activation_bits, seed=seed)
    model = zoo.MODELS[arch](seed=seed, weight_bits=weight_bits, activation_bits=activation_bits,
                             init=init or RECIPES[arch]["init"])
    if activation_bits in (16, 32):
        model.layers = _relu_before_activations(model.layers, keep_activation=activation_bits == 16)
    return model


def _relu_before_activations(layers, keep_activation):
    """The builder's hidden activation at 16/32 bits is fp16 rounding / the identity: give it a
    nonlinearity, as the float model has (a ReLU after each BatchNorm; the activation itself kept
    only when it rounds)."""
    from ..layers import BatchNorm, ReLU
    from ..quant_layers import QuantActivation

    out = []
    previous = None
    for layer in layers:
        if isinstance(layer, QuantActivation) and isinstance(previous, BatchNorm):
            out.append(ReLU())
            if keep_activation:
                out.append(layer)
        else:
            out.append(layer)
        previous = layer
    return out
