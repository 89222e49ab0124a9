"""Quantized twins of float models: quantization-aware training and post-training quantization.

:func:`quantized_twin` copies a float :class:`~lowbit.Model` and replaces every
:class:`~lowbit.layers.Affine` and :class:`~lowbit.layers.Conv2D` by its quantized twin
(:class:`~lowbit.quant_layers.QuantAffine`, :class:`~lowbit.quant_layers.QuantConv2D`) carrying the
float weights, so the result can be trained further (QAT) or evaluated as it is (PTQ).
"""
from __future__ import annotations

from .io import assign_model_arrays, model_arrays
from .layers import Affine, Conv2D, ReLU, Sequential, layer_from_config
from .model import Model
from .quant_layers import QuantAffine, QuantConv2D
from .quantizers import Quantizer, SteSign, get_quantizer, quantizer_for_bits

__all__ = ["quantized_twin", "stochastic_kinds"]

_STOCHASTIC = {False: (), True: ("weight", "activation"), "weights": ("weight",),
               "activations": ("activation",)}


def stochastic_kinds(stochastic):
    """Which kinds of 1-bit quantizers are stochastic: ``False`` none, ``True`` both,
    ``"weights"`` or ``"activations"`` one of them.  Returns a tuple of ``"weight"``/``"activation"``."""
    try:
        return _STOCHASTIC[stochastic]
    except (KeyError, TypeError):
        raise ValueError(
            f"stochastic must be False, True, 'weights' or 'activations', got {stochastic!r}"
        ) from None


def _bits_or_spec(value, kind, stochastic, what):
    """A quantizer from a bit width (int) or a quantizer spec (dict, name, instance)."""
    if isinstance(value, (dict, str, Quantizer)):
        return get_quantizer(value)
    try:
        return quantizer_for_bits(value, kind, stochastic)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


def _named_bits(name, bits, kind, stochastic):
    try:
        return quantizer_for_bits(bits, kind, stochastic)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def quantized_twin(model, weight_bits, activation_bits, keep_first=True, keep_last=True,
                   stochastic=False, first_input_bits=8, kernel_constraint="auto",
                   weight_scale=None, drop_relu=None, glorot_lr_scale=False, seed=0):
    """Return a quantized copy of ``model``; ``model`` itself is not modified.

    Every ``Affine``/``Conv2D`` (found depth first, inside ``Sequential``, ``Residual`` and ``Concat``)
    becomes ``QuantAffine``/``QuantConv2D`` with the same shape, bias, init name and a copy of the float
    weights.  "First" and "last" are the first and last of these layers in depth-first order.

    Parameters
    ----------
    model : Model
    weight_bits, activation_bits : int
        One of 1..8, 16, 32, mapped by :func:`lowbit.quantizers.quantizer_for_bits`: the kernel
        quantizer of every converted layer and the input quantizer of every layer but the first.
    keep_first, keep_last : bool
        Keep the first / last layer's kernel in float32 (the usual practice of BNN, XNOR-Net, DoReFa).
    stochastic : False, True, "weights" or "activations"
        Use :class:`~lowbit.quantizers.StochasticBinary` for the 1-bit weights and/or activations.
    first_input_bits : int, None or quantizer spec
        Input quantizer of the first layer, whose input is the image: an int is a bit width (8: the
        unsigned DoReFa quantizer, exact for 8-bit images in [0, 1]; 32: none), ``None`` means
        ``activation_bits``, and a dict/name/Quantizer is used as given (e.g.
        ``{"name": "dorefa_activation", "bits": 8, "signed": True}`` for inputs in [-1, 1]).  It applies
        whether or not ``keep_first`` keeps the first kernel in float.
    kernel_constraint : "auto", None or "clip"
        "auto": "clip" (latent weights in [-1, 1]) for layers with 1-bit kernels, None otherwise.
    weight_scale : None, "tensor" or "channel"
        Scale of 1-bit kernels, ``mean(|W|)`` (XNOR-Net); ``"channel"`` is per output unit.  Helps
        post-training quantization, where the float layers expect weights of their own magnitude.
    drop_relu : bool or None
        Remove every ReLU.  None means ``activation_bits == 1``: a ReLU output is >= 0, and
        ``sign(0) = +1``, so a binarized ReLU output is always +1; the BNN way is the sign of the
        pre-activation.
    glorot_lr_scale : bool
        BinaryNet's per-layer learning-rate factor on the converted layers' ``W``.
    seed : int
        Reseeds the twin's random generators (dropout, stochastic quantizers) with ``Model.seed``.

    Returns
    -------
    Model
        On the CPU, named ``"<name>_w<weight_bits>a<activation_bits>"``.
    """
    if not isinstance(model, Model):
        raise TypeError(f"model must be a lowbit Model, got {type(model).__name__}")
    kinds = stochastic_kinds(stochastic)
    if kernel_constraint not in ("auto", None, "clip"):
        raise ValueError(f"kernel_constraint must be 'auto', None or 'clip', got {kernel_constraint!r}")
    if weight_scale is not None:
        if weight_bits != 1 or "weight" in kinds:
            raise ValueError("weight_scale applies to deterministic 1-bit weights only "
                             f"(weight_bits=1, stochastic weights off), got weight_bits={weight_bits!r}")
        SteSign(scale=weight_scale)  # validates the value

    def weight_quantizer():
        if weight_scale is not None:
            return SteSign(scale=weight_scale)
        return _named_bits("weight_bits", weight_bits, "weight", "weight" in kinds)

    def activation_quantizer():
        return _named_bits("activation_bits", activation_bits, "activation", "activation" in kinds)

    def first_input_quantizer():
        if first_input_bits is None:
            return activation_quantizer()
        return _bits_or_spec(first_input_bits, "activation", "activation" in kinds,
                             "first_input_bits")

    weight_quantizer()  # check the arguments before copying the model
    activation_quantizer()
    first_input_quantizer()

    twin = layer_from_config(model.spec())
    assign_model_arrays(twin, model_arrays(model), source="source model")

    if drop_relu is None:
        drop_relu = activation_bits == 1
    if drop_relu:
        for _, layer in twin.named_layers():
            if isinstance(layer, Sequential):
                layer.layers = [child for child in layer.layers if type(child) is not ReLU]

    parents = {}
    for _, layer in twin.named_layers():
        if isinstance(layer, Sequential):
            for i, child in enumerate(layer.layers):
                parents[id(child)] = (layer, i)
    targets = []
    for path, layer in twin.named_layers():
        if type(layer) in (Affine, Conv2D):
            if id(layer) not in parents:
                raise TypeError(f"cannot replace {type(layer).__name__} at {path!r}: it is not held "
                                "in a Sequential (Residual and Concat hold theirs in one)")
            targets.append(layer)

    for index, layer in enumerate(targets):
        first = index == 0
        last = index == len(targets) - 1
        keep_float = (first and keep_first) or (last and keep_last)
        kernel_q = get_quantizer(None) if keep_float else weight_quantizer()
        input_q = first_input_quantizer() if first else activation_quantizer()
        if kernel_constraint == "auto":
            constraint = "clip" if kernel_q.precision == 1 else None
        else:
            constraint = kernel_constraint
        options = dict(bias=layer.bias, init=layer.init, input_quantizer=input_q,
                       kernel_quantizer=kernel_q, kernel_constraint=constraint,
                       glorot_lr_scale=glorot_lr_scale)
        if type(layer) is Affine:
            new = QuantAffine(layer.in_features, layer.out_features, **options)
        else:
            new = QuantConv2D(layer.in_channels, layer.out_channels, layer.kernel_size,
                              stride=layer.stride, padding=layer.padding, **options)
        new.W = layer.W
        if layer.bias:
            new.b = layer.b
        parent, i = parents[id(layer)]
        parent.layers[i] = new

    twin.name = f"{model.name}_w{weight_bits}a{activation_bits}"
    return twin.seed(seed)
