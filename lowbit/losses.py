"""Loss functions.  ``forward(scores, labels)`` returns a Python float (the batch mean);
``backward()`` returns the gradient with respect to ``scores`` (already divided by the batch size).

Labels are int class indices (N,).  Scores are float (N, classes).
"""
from __future__ import annotations

import numpy as np

from .backend import get_array_module

__all__ = ["LOSSES", "get_loss", "SoftmaxCrossEntropy", "SquaredHinge"]


def _check(scores, labels):
    if scores.ndim != 2:
        raise ValueError(f"scores must be (N, classes), got shape {scores.shape}")
    if labels.shape != (scores.shape[0],):
        raise ValueError(f"labels must be ({scores.shape[0]},) int class indices, got shape {labels.shape}")


def softmax(x):
    xp = get_array_module(x)
    z = x - x.max(axis=1, keepdims=True)
    e = xp.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class SoftmaxCrossEntropy:
    """Mean over the batch of ``-log softmax(scores)[label]``; gradient ``(softmax - onehot) / N``.

    The loss is ``logsumexp(scores) - scores[label]`` (with the row maximum subtracted first), so it
    has no ceiling: logits ``[1000, -1000, 0]`` with label 1 give 2000, as PyTorch does, where
    ``-log(max(p, 1e-30))`` would stop at 69.08.
    """

    name = "cross_entropy"

    def forward(self, scores, labels):
        _check(scores, labels)
        xp = get_array_module(scores)
        n = scores.shape[0]
        z = scores - scores.max(axis=1, keepdims=True)
        e = xp.exp(z)
        total = e.sum(axis=1, keepdims=True)
        self._cache = (e / total, labels)
        picked = z[xp.arange(n), labels]
        return float((xp.log(total[:, 0]) - picked).mean())

    def backward(self):
        p, labels = self._cache
        xp = get_array_module(p)
        n = p.shape[0]
        d = p.copy()
        d[xp.arange(n), labels] -= 1
        return d / np.float32(n)


class SquaredHinge:
    """``mean(max(0, 1 - t * y) ** 2)`` over batch and classes, with ``t = +1`` for the label and ``-1``
    elsewhere (the BinaryNet paper's loss, Courbariaux et al. 2016)."""

    name = "squared_hinge"

    def forward(self, scores, labels):
        _check(scores, labels)
        xp = get_array_module(scores)
        t = -xp.ones(scores.shape, dtype=scores.dtype)
        t[xp.arange(scores.shape[0]), labels] = 1
        margin = xp.maximum(0, 1 - t * scores)
        self._cache = (t, margin)
        return float((margin * margin).mean())

    def backward(self):
        t, margin = self._cache
        return (-2.0 / margin.size) * t * margin


LOSSES = {"cross_entropy": SoftmaxCrossEntropy, "squared_hinge": SquaredHinge}


def get_loss(name):
    try:
        return LOSSES[name]()
    except KeyError:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {name!r}") from None
