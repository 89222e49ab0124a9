"""The layers whose training and evaluation differ: ``BatchNorm`` and ``Dropout``."""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..draws import check_draws, uniform
from ..functions import batchnorm_axes, batchnorm_backward, batchnorm_forward
from .base import Layer, check_positive_int, register_layer


@register_layer
class BatchNorm(Layer):
    """Batch normalisation over the batch axis (dense input (N, D)) or batch and space (N, C, H, W).

    Training mode normalises with the batch statistics and updates the running ones:
    ``running = momentum * running + (1 - momentum) * batch`` (the variance is the biased batch
    variance, as in Deep Learning from Scratch).  Evaluation mode uses the running statistics.
    ``y = gamma * (x - mean) / sqrt(var + eps) + beta``.
    """

    param_names = ("gamma", "beta")
    buffer_names = ("running_mean", "running_var")

    def __init__(self, num_features, momentum=0.9, eps=1e-5):
        self.num_features = check_positive_int("num_features", num_features)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.gamma = np.ones(self.num_features, dtype=np.float32)
        self.beta = np.zeros(self.num_features, dtype=np.float32)
        self.running_mean = np.zeros(self.num_features, dtype=np.float32)
        self.running_var = np.ones(self.num_features, dtype=np.float32)
        self.dgamma = self.dbeta = None

    def config(self):
        return {"num_features": self.num_features, "momentum": self.momentum, "eps": self.eps}

    def forward(self, x, train=False):
        axes, bshape = batchnorm_axes(x)
        out_dtype = x.dtype
        if x.dtype == np.float16:  # statistics and normalisation in float32 (mixed precision)
            x = x.astype(np.float32)
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"BatchNorm expects {self.num_features} features on axis 1, got shape {x.shape}"
            )
        if train:
            out, xn, mean, var, inv_std = batchnorm_forward(x, self.gamma, self.beta, self.eps)
            m = self.momentum
            self.running_mean = (m * self.running_mean + (1 - m) * mean).astype(np.float32)
            self.running_var = (m * self.running_var + (1 - m) * var).astype(np.float32)
        else:
            xp = get_array_module(x)
            xc = x - self.running_mean.reshape(bshape)
            inv_std = (1.0 / xp.sqrt(self.running_var + np.float32(self.eps))).astype(x.dtype, copy=False)
            xn = xc * inv_std.reshape(bshape)
            out = self.gamma.reshape(bshape) * xn + self.beta.reshape(bshape)
        self._cache = (xn, inv_std, axes, bshape, train)
        return out.astype(out_dtype, copy=False)

    def backward(self, dout):
        xn, inv_std, axes, bshape, train = self._cache
        out_dtype = dout.dtype
        dout = dout.astype(xn.dtype, copy=False)
        if train:
            dx, self.dgamma, self.dbeta = batchnorm_backward(dout, xn, self.gamma, inv_std)
            return dx.astype(out_dtype, copy=False)
        # running statistics are constants
        self.dbeta = dout.sum(axis=axes)
        self.dgamma = (dout * xn).sum(axis=axes)
        dxn = dout * self.gamma.reshape(bshape)
        return (dxn * inv_std.reshape(bshape)).astype(out_dtype, copy=False)

    def _clear_cache(self):
        self._cache = None


@register_layer
class Dropout(Layer):
    """Inverted dropout: in training, zero each unit with probability ``ratio`` and scale the rest by
    ``1 / (1 - ratio)``; identity at evaluation.

    The mask comes from the layer's own ``numpy.random.Generator`` (``self.rng``, seeded by ``seed`` or by
    :meth:`Sequential.seed`), so runs repeat exactly and checkpoints can save its state.  With
    ``draws="generator"`` (default) the mask is drawn on the host and copied to the device when the
    model runs on CuPy; with ``draws="counter"`` it is computed on the device from one 64-bit key per
    step (:mod:`lowbit.draws`), the same values on numpy and CuPy.
    """

    def __init__(self, ratio=0.5, seed=None, draws="generator"):
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
        self.ratio = float(ratio)
        self.rng = np.random.default_rng(seed)
        self.draws = check_draws(draws)
        self._cache_mask = None

    def config(self):
        cfg = {"ratio": self.ratio}
        if self.draws != "generator":  # files of the default stay byte-identical
            cfg["draws"] = self.draws
        return cfg

    def forward(self, x, train=False):
        if not train or self.ratio == 0.0:
            self._cache_mask = None
            return x
        xp = get_array_module(x)
        u = uniform(self.rng, self.draws, x.shape, np if self.draws == "generator" else xp)
        keep = u >= self.ratio
        mask = xp.asarray((keep * np.float32(1.0 / (1.0 - self.ratio))).astype(x.dtype, copy=False))
        self._cache_mask = mask
        return x * mask

    def backward(self, dout):
        if self._cache_mask is None:
            return dout
        return dout * self._cache_mask
