"""Ensembles: average the softmax outputs of several models (Deep Learning from Scratch, 8.1.3)."""
from __future__ import annotations

import os

import numpy as np

from .model import Classifier

__all__ = ["Ensemble", "ensemble", "softmax_np"]


def softmax_np(scores):
    z = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Ensemble(Classifier):
    """Mean of the members' class probabilities.

    Parameters
    ----------
    members : list
        Objects with ``predict_scores(x, batch_size)`` returning (N, classes) scores (lowbit models,
        packed models, or other ensembles).
    """

    def __init__(self, members):
        members = list(members)
        if not members:
            raise ValueError("an ensemble needs at least one member, got none")
        for i, m in enumerate(members):
            if not hasattr(m, "predict_scores"):
                raise TypeError(f"members[{i}] has no predict_scores method ({type(m).__name__})")
        self.members = members

    def predict_proba(self, x, batch_size=100):
        """Mean softmax probabilities (N, classes) float32."""
        total = None
        for m in self.members:
            p = softmax_np(np.asarray(m.predict_scores(x, batch_size=batch_size), dtype=np.float64))
            if total is not None and p.shape != total.shape:
                raise ValueError(f"members disagree on the output shape: {p.shape} vs {total.shape}")
            total = p if total is None else total + p
        return (total / len(self.members)).astype(np.float32)

    predict_scores = predict_proba


def ensemble(models):
    """An :class:`Ensemble` of models or of paths to saved model files (trained or packed)."""
    from .packed import load_any

    loaded = [load_any(m) if isinstance(m, (str, os.PathLike)) else m for m in models]
    return Ensemble(loaded)
