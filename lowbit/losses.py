"""Loss functions.  ``forward(scores, labels)`` returns a Python float (the batch mean);
``backward()`` returns the gradient with respect to ``scores`` (already divided by the batch size).

Labels are int class indices (N,).  Scores are float (N, classes).
"""
from __future__ import annotations

import numpy as np

from .backend import get_array_module

__all__ = ["LOSSES", "get_loss", "SoftmaxCrossEntropy", "SquaredHinge", "Distillation"]


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
    """Mean over the batch of ``-sum_k t_k log softmax(scores)_k``; gradient ``(softmax - t) / N``.

    ``t`` is the one-hot label, or with ``label_smoothing = e`` (Szegedy et al. 2016)
    ``(1 - e) * onehot + e / classes``.  With ``e = 0`` the loss is ``logsumexp(scores) -
    scores[label]`` (with the row maximum subtracted first), so it has no ceiling: logits
    ``[1000, -1000, 0]`` with label 1 give 2000, as PyTorch does, where ``-log(max(p, 1e-30))`` would
    stop at 69.08.  With ``e > 0`` it is ``logsumexp(scores) - sum_k t_k scores_k``, PyTorch's
    ``cross_entropy(label_smoothing=e)``.
    """

    name = "cross_entropy"

    def __init__(self, label_smoothing=0.0):
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
                or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)

    def config(self):
        """``"cross_entropy"`` without smoothing (what checkpoints have always recorded), else a dict."""
        if not self.label_smoothing:
            return self.name
        return {"name": self.name, "label_smoothing": self.label_smoothing}

    def forward(self, scores, labels):
        _check(scores, labels)
        xp = get_array_module(scores)
        n = scores.shape[0]
        z = scores - scores.max(axis=1, keepdims=True)
        e = xp.exp(z)
        total = e.sum(axis=1, keepdims=True)
        self._cache = (e / total, labels)
        picked = z[xp.arange(n), labels]
        if not self.label_smoothing:
            return float((xp.log(total[:, 0]) - picked).mean())
        smooth = self.label_smoothing
        target = (1.0 - smooth) * picked + smooth * z.mean(axis=1)
        return float((xp.log(total[:, 0]) - target).mean())

    def backward(self):
        p, labels = self._cache
        xp = get_array_module(p)
        n = p.shape[0]
        d = p.copy()
        if self.label_smoothing:
            d -= p.dtype.type(self.label_smoothing / p.shape[1])
            d[xp.arange(n), labels] -= p.dtype.type(1.0 - self.label_smoothing)
        else:
            d[xp.arange(n), labels] -= 1
        return d / np.float32(n)


class SquaredHinge:
    """``mean(max(0, 1 - t * y) ** 2)`` over batch and classes, with ``t = +1`` for the label and ``-1``
    elsewhere (the BinaryNet paper's loss, Courbariaux et al. 2016)."""

    name = "squared_hinge"

    def config(self):
        return self.name

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


class Distillation:
    """Knowledge distillation (Hinton et al. 2015): ``(1 - weight) * base + weight * T^2 * KL(p_T || q_T)``.

    ``q_T = softmax(scores / T)`` is the student's and ``p_T = softmax(teacher_scores / T)`` the
    teacher's distribution at temperature ``T``; the ``T^2`` keeps the gradient's size independent of
    ``T``.  ``base`` is the loss on the labels (any loss here).  The teacher's scores of the batch are
    set before each forward: ``loss.teacher_scores = ...`` (float (N, classes); the trainer does it,
    see :class:`lowbit.recipes.Teacher`).  Gradient with respect to ``scores``:
    ``(1 - weight) * dbase + weight * T * (q_T - p_T) / N``.

    Parameters
    ----------
    base : loss object (``SoftmaxCrossEntropy``, ``SquaredHinge``)
    temperature : float > 0
    weight : float in [0, 1]
        1: the teacher alone; 0: the labels alone.
    """

    name = "distillation"

    def __init__(self, base, temperature=4.0, weight=0.5):
        if not hasattr(base, "forward") or not hasattr(base, "backward"):
            raise TypeError(f"base must be a loss object (forward, backward), got {type(base).__name__}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not (temperature > 0 and np.isfinite(temperature)):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
            raise ValueError(f"weight must be a number in [0, 1], got {weight!r}")
        self.base = base
        self.temperature = float(temperature)
        self.weight = float(weight)
        self.teacher_scores = None

    def config(self):
        base = self.base.config() if hasattr(self.base, "config") else self.base.name
        return {"name": self.name, "base": base, "temperature": self.temperature, "weight": self.weight}

    def forward(self, scores, labels):
        _check(scores, labels)
        teacher = self.teacher_scores
        if teacher is None:
            raise ValueError("Distillation.forward needs teacher_scores for the batch; none was set")
        if teacher.shape != scores.shape:
            raise ValueError(f"teacher_scores must have the shape of scores {scores.shape}, got {teacher.shape}")
        xp = get_array_module(scores)
        t = self.temperature
        base = self.base.forward(scores, labels)
        student = scores / scores.dtype.type(t)
        z = student - student.max(axis=1, keepdims=True)
        log_q = z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))
        target = teacher.astype(scores.dtype, copy=False) / scores.dtype.type(t)
        zt = target - target.max(axis=1, keepdims=True)
        log_p = zt - xp.log(xp.exp(zt).sum(axis=1, keepdims=True))
        p = xp.exp(log_p)
        self._cache = (xp.exp(log_q), p)
        kl = float((p * (log_p - log_q)).sum(axis=1).mean())
        self.teacher_scores = None  # one batch's scores serve one step only
        return (1.0 - self.weight) * base + self.weight * t * t * kl

    def backward(self):
        q, p = self._cache
        n = q.shape[0]
        grad = (q - p) * np.float32(self.weight * self.temperature / n)
        if self.weight < 1.0:
            grad += np.float32(1.0 - self.weight) * self.base.backward()
        return grad


LOSSES = {"cross_entropy": SoftmaxCrossEntropy, "squared_hinge": SquaredHinge}


def get_loss(name, **options):
    """A fresh loss object by name; ``options`` go to its constructor (``label_smoothing`` for
    ``"cross_entropy"``)."""
    try:
        cls = LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {name!r}") from None
    return cls(**options)
