"""Model builders: the networks lowbit's experiments train, by name.

``MODELS`` maps a name to a builder ``f(seed=0, **options) -> Model``; the CLI's ``--model`` takes these
names.
"""
from __future__ import annotations

import numpy as np

from .layers import Affine, Conv2D, Dropout, Flatten, MaxPool2D, ReLU
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
