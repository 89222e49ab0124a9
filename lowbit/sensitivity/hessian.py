"""Hutchinson estimates of per-layer Hessian traces, HAWQ scores, and the rank correlation."""
from __future__ import annotations

import numpy as np

from ..backend import to_numpy
from ..progress import tqdm
from ..quantizers import Quantizer
from .layerwise import KINDS, WIDTHS, layer_targets, run_layers, top_positions


class _Perturb(Quantizer):
    """Adds ``delta`` (when set) to the layer's input; keeps the unperturbed input."""

    name = "perturb"

    def __init__(self):
        self.delta = None
        self.input = None

    def forward(self, x, train=False, channel_axis=None):
        if self.delta is None:
            self.input = x
            return x
        return x + self.delta


def _softmax(scores):
    shifted = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def hessian_traces(ptq, images, labels, samples=16, relative_step=1e-3, seed=0, progress=True):
    """Hutchinson estimates of the mean Hessian diagonal of the loss, per layer, for its weights and
    for its inputs.

    For a network that is piecewise linear in one layer's weights (or inputs) with the rest fixed --
    ReLU, max-pool, BatchNorm in evaluation mode, affine layers -- the Hessian block of the
    cross-entropy with respect to them is the Gauss-Newton block ``J^T H_s J`` (``J`` the Jacobian of the
    scores, ``H_s = (diag(p) - p p^T) / N`` per image of the batch) almost everywhere.  So
    ``v^T H v = u^T H_s u`` with ``u = J v`` the change of the scores along ``v``, a finite
    difference of two forward passes (exact between kinks); no second derivative is needed.

    Parameters
    ----------
    ptq : LayerwisePTQ
    images, labels : numpy.ndarray
        One batch of held-out training images (a few hundred) and their labels; the loss is the mean
        cross-entropy over it.
    samples : int
        Rademacher vectors per layer and kind.
    relative_step : float
        The finite-difference step, relative to the RMS of the perturbed values.
    seed : int

    Returns
    -------
    dict
        ``weight_trace``, ``activation_trace``: lists (one per layer) of the estimated trace divided by
        the block's size (the mean Hessian diagonal); ``weight_trace_sem``, ``activation_trace_sem``
        their standard errors over the samples; ``inputs``: each layer's float input on the batch
        (for :func:`hessian_scores`).
    """
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    if not relative_step > 0:
        raise ValueError(f"relative_step must be > 0, got {relative_step!r}")
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels)
    model = ptq.build(None)
    targets = layer_targets(model)
    probes = [_Perturb() for _ in targets]
    for layer, probe in zip(targets, probes):
        layer.input_quantizer = probe
    positions = top_positions(model, ptq.paths)
    batch = len(images)
    rng = np.random.default_rng(seed)
    estimates = {kind: np.zeros((samples, len(targets))) for kind in KINDS}
    inputs = []
    activation, done = images, 0
    bar = tqdm(total=len(targets) * 2 * samples, desc="hessian", unit="pass", disable=not progress)
    for index, (layer, probe) in enumerate(zip(targets, probes)):
        start = 0
        if positions is not None:
            activation = run_layers(model.layers[done:positions[index]], activation, batch)
            done = start = positions[index]
        suffix = model.layers[start:]
        base = run_layers(suffix, activation, batch).astype(np.float64)
        x = np.asarray(to_numpy(probe.input), dtype=np.float32).copy()
        inputs.append(x)
        curvature = _softmax(base)  # H_s u = (p * u - p (p . u)) / N
        w = np.asarray(to_numpy(layer.W), dtype=np.float32).copy()
        def scores():
            return run_layers(suffix, activation, batch).astype(np.float64)

        for kind, values in (("weight", w), ("activation", x)):
            estimates[kind][:, index] = _quadratic_forms(layer, w, probe, kind, values, scores, base, curvature,
                                                         samples, relative_step, rng, bar)
    bar.close()

    def sem(e):
        return (e.std(axis=0, ddof=1) / np.sqrt(samples)).tolist() if samples > 1 else [None] * e.shape[1]

    return {"weight_trace": estimates["weight"].mean(axis=0).tolist(),
            "activation_trace": estimates["activation"].mean(axis=0).tolist(),
            "weight_trace_sem": sem(estimates["weight"]), "activation_trace_sem": sem(estimates["activation"]),
            "samples": int(samples), "images": int(batch), "relative_step": float(relative_step), "inputs": inputs}


def _quadratic_forms(layer, w, probe, kind, values, scores, base, curvature, samples, relative_step, rng, bar):
    """``v^T H v / n`` for ``samples`` Rademacher vectors ``v`` over ``values`` (``kind`` "weight": the
    layer's weights, "activation": its input), each from the finite difference ``scores()`` - ``base``
    along ``v``; the layer's weights are reset to ``w`` after every pass."""
    batch = len(base)
    step = relative_step * max(float(np.sqrt(np.mean(values.astype(np.float64) ** 2))), 1e-12)
    out = np.zeros(samples)
    for s in range(samples):
        v = rng.choice(np.array([-1.0, 1.0], np.float32), size=values.shape)
        if kind == "weight":
            layer.W = (w + np.float32(step) * v).astype(np.float32)
            layer.constrain()
        else:
            probe.delta = np.float32(step) * v
        u = (scores() - base) / step
        layer.W, probe.delta = w.copy(), None
        layer.constrain()
        quadratic = (curvature * u * u).sum() - ((curvature * u).sum(axis=1) ** 2).sum()
        out[s] = quadratic / batch / values.size
        bar.update(1)
    return out


def hessian_scores(ptq, traces, widths=WIDTHS):
    """HAWQ's estimate of each (layer, kind, width)'s loss increase: ``0.5 * mean Hessian diagonal *
    ||Q(z) - z||^2`` (``z``: the layer's weights, or its inputs on the Hessian batch).  Returns
    ``{(layer, kind, bits): score}``."""
    scores = {}
    for index in range(len(ptq.layers)):
        layer = layer_targets(ptq.base)[index]
        w = np.asarray(to_numpy(layer.W), dtype=np.float32)
        x = traces["inputs"][index]
        for bits in widths:
            latent, quantizer = ptq._weight(index, bits)
            q = np.asarray(to_numpy(quantizer(latent, False, channel_axis=layer.kernel_channel_axis)))
            error_w = float(((q.astype(np.float64) - w) ** 2).sum())
            qa = np.asarray(to_numpy(ptq.activation_quantizer(index, bits)(x, False)))
            error_a = float(((qa.astype(np.float64) - x) ** 2).sum())
            scores[(index, "weight", bits)] = 0.5 * traces["weight_trace"][index] * error_w
            scores[(index, "activation", bits)] = 0.5 * traces["activation_trace"][index] * error_a
    return scores


def _ranks(values):
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    while start < len(values):
        stop = start + 1
        while stop < len(values) and sorted_values[stop] == sorted_values[start]:
            stop += 1
        ranks[order[start:stop]] = (start + stop - 1) / 2.0  # ties share their mean rank
        start = stop
    return ranks


def rank_correlation(a, b):
    """Spearman's rank correlation of two equally long sequences (ties get mean ranks); NaN when either
    is constant or shorter than 2."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be 1-D of one length, got shapes {a.shape} and {b.shape}")
    if len(a) < 2:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")
