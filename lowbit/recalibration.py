"""Precise BatchNorm statistics: :func:`recalibrate_batchnorm` (``Trainer(bn_recalibrate=)``)."""
from __future__ import annotations

import numpy as np

from .backend import get_array_module
from .layers import BatchNorm, Dropout

__all__ = ["recalibrate_batchnorm"]


def recalibrate_batchnorm(model, x, batch_size=100):
    """Set every BatchNorm's running statistics to their mean over the batches of ``x`` ("precise BN").

    The exponential running averages that training leaves behind trail weights that keep moving, and
    a binary network is sensitive to them: a shifted mean in front of a sign flips every activation
    near its threshold (on MNIST, whole backgrounds).  This pass runs ``x`` forward in training mode
    with the current weights, Dropout off, and replaces each layer's running mean and variance by the
    average of its per-batch means and (biased) variances.  Stochastic layers draw as in training; their
    random states are restored afterwards, so a run that recalibrates repeats exactly.

    Parameters
    ----------
    model : lowbit.Model
    x : array (N, ...)
        Input images (training images, unaugmented); on the model's device or the host.
    batch_size : int
        Images per forward pass; use the training batch size (the statistics are per-batch ones).

    Returns
    -------
    int
        The number of BatchNorm layers updated (0 leaves the model untouched).
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if len(x) < 1:
        raise ValueError("recalibrate_batchnorm needs at least one image in x, got 0")
    layers = [layer for _, layer in model.named_layers()]
    norms = [layer for layer in layers if isinstance(layer, BatchNorm)]
    if not norms:
        return 0
    dropouts = [(layer, layer.ratio) for layer in layers if isinstance(layer, Dropout)]
    momenta = [bn.momentum for bn in norms]
    states = model.rng_states()
    xp = get_array_module(norms[0].running_mean)
    sums = [[xp.zeros(bn.num_features, dtype=np.float64), xp.zeros(bn.num_features, dtype=np.float64)]
            for bn in norms]
    batches = 0
    try:
        for layer, _ in dropouts:
            layer.ratio = 0.0
        for bn in norms:
            bn.momentum = 0.0  # running statistics := this batch's
        for start in range(0, len(x), batch_size):
            batch = x[start:start + batch_size]
            if xp is not np:
                batch = xp.asarray(batch)
            model.forward(batch.astype(model.compute_dtype, copy=False), train=True)
            batches += 1
            for (mean, var), bn in zip(sums, norms):
                mean += bn.running_mean
                var += bn.running_var
    finally:
        for layer, ratio in dropouts:
            layer.ratio = ratio
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        model.set_rng_states(states)
        for layer in layers:
            layer._clear_cache()
    for (mean, var), bn in zip(sums, norms):
        bn.running_mean = (mean / batches).astype(np.float32)
        bn.running_var = (var / batches).astype(np.float32)
    return len(norms)
