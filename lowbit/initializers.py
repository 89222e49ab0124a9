"""Weight initialisers.  Each takes a shape, the fan-in/fan-out and a ``numpy.random.Generator``.

``he_normal``: N(0, 1) * sqrt(2 / fan_in) (He et al. 2015; Deep Learning from Scratch ch. 6/8).
``glorot_uniform``: U(-a, a), a = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010).
``uniform``: U(-1, 1), the latent-weight init of BNN-PYNQ / Brevitas.
Arrays are created on the host as float32; move the model to the GPU afterwards.
"""
from __future__ import annotations

import numpy as np

__all__ = ["INITIALIZERS", "initialize"]


def he_normal(shape, fan_in, fan_out, rng):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def glorot_uniform(shape, fan_in, fan_out, rng):
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


def glorot_normal(shape, fan_in, fan_out, rng):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / (fan_in + fan_out))).astype(np.float32)


def uniform(shape, fan_in, fan_out, rng):
    return rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)


INITIALIZERS = {
    "he": he_normal,
    "he_normal": he_normal,
    "glorot": glorot_uniform,
    "glorot_uniform": glorot_uniform,
    "glorot_normal": glorot_normal,
    "uniform": uniform,
}


def initialize(name: str, shape, fan_in: int, fan_out: int, rng) -> np.ndarray:
    try:
        fn = INITIALIZERS[name]
    except KeyError:
        raise ValueError(f"init must be one of {sorted(INITIALIZERS)}, got {name!r}") from None
    return fn(shape, fan_in, fan_out, rng)
