"""Layers: objects that own parameters and call the stateless ops in :mod:`lowbit.functions`.

The layer protocol
------------------
``forward(x, train=False)``
    Returns the output and keeps only what ``backward`` needs.
``backward(dout)``
    Returns ``dx``; never writes into ``dout``.  Parameter gradients are stored on the layer as
    ``d<name>`` for every name in ``param_names`` (``dW``, ``db``, ``dgamma``, ...).
``param_names`` / ``buffer_names``
    Attribute names of the trainable arrays and of the saved non-trainable arrays (BatchNorm's running
    statistics).  Both travel with the model file; only parameters are updated by optimizers.
``config()``
    The JSON-serialisable constructor arguments; ``Layer.from_config`` rebuilds the layer.  Layer types
    are looked up by name in the explicit ``LAYERS`` dictionary (no pickle, no eval).
``children()``
    ``(name, layer)`` pairs of nested layers (``Sequential``, ``Residual``, ``Concat``); empty for leaves.
``constrain()``
    Called by the trainer after each optimizer step; quantized layers clip latent weights here.

Arrays are float32, images NCHW.  All bodies are written against ``xp = get_array_module(x)``, so a
model moved to CuPy with :meth:`Layer.to_device` runs unchanged on the GPU.
"""
from __future__ import annotations

from .base import (LAYERS, Layer, check_input, check_nonnegative_int, check_positive_int, layer_from_config,
                   register_layer)
from .containers import Concat, Residual, Sequential
from .dense import Affine, Conv2D
from .normalization import BatchNorm, Dropout
from .pointwise import Flatten, PixelCodes, ReLU, Rescale
from .pooling import AvgPool2D, GlobalAvgPool2D, MaxPool2D

__all__ = [
    "LAYERS",
    "register_layer",
    "layer_from_config",
    "Layer",
    "Affine",
    "Conv2D",
    "MaxPool2D",
    "AvgPool2D",
    "GlobalAvgPool2D",
    "ReLU",
    "PixelCodes",
    "BatchNorm",
    "Dropout",
    "Flatten",
    "Rescale",
    "Sequential",
    "Residual",
    "Concat",
    "check_input",
    "check_positive_int",
    "check_nonnegative_int",
]
