"""Per-layer sensitivity to quantization: which layers can lose their bits.

:class:`LayerwisePTQ` quantizes a trained float model layer by layer: every quantizable layer
(``Affine``/``Conv2D``, depth first, first and last included) gets its own weight width and its own
input-activation width, each of 1..8, 16 or 32 bits.  The weight and activation quantizers are
those of :func:`lowbit.convert.post_training_quantize` (2..8-bit weights on a symmetric integer grid
over their least-squared-error range, 1-bit weights ``sign(W) * mean|W|`` per output unit with an
exact scale, 2..8-bit activations :class:`~lowbit.quantizers.DoReFaActivation` over their
least-squared-error range calibrated on training images, 16 bits float16, 32 bits none), so a
uniform assignment with the first and last kernels kept in float and an 8-bit image is exactly
``post_training_quantize``'s model (for 2..8-bit activations; checked by the tests).  The one
difference is a 1-bit *activation*: ``post_training_quantize`` removes every ReLU and takes the sign of
the pre-activation, which only works when every layer is binary; here a 1-bit input is
``DoReFaActivation(1)`` over its calibrated range ``m`` (``{0, m}`` after a ReLU, ``{-m, m}`` for a
signed input), so one layer can take 1-bit inputs while its neighbours do not.  The calibration runs
once (one pass of the float model over the calibration images, the same random sample of each
layer's inputs as ``post_training_quantize`` takes with the same ``seed``); the ranges and the clipped
weights of each width are computed once and cached.

:func:`measure_sensitivity` quantizes one layer at a time, its weights to each width (inputs float)
and its inputs to each width (weights float), the rest of the model float, and measures accuracy and
mean cross-entropy on held-out *training* images (never the test set): the drop in accuracy and the
increase in loss against the float model.  A layer at 32 bits is the float layer itself, so its
sensitivity is exactly 0.  When the quantizable layers sit at the top level of the model, the float
activations in front of each layer are computed once and only the rest of the network is rerun.

:func:`hessian_traces` estimates, per layer, the average trace of the loss Hessian with respect to
the layer's weights and with respect to its inputs by Hutchinson's method (Avron and Toledo 2011;
as HAWQ, Dong et al. 2019-2021, arXiv 1905.03696, 1911.03852, 2011.10680): ``E[v^T H v]`` over
Rademacher vectors ``v``, with ``H v`` a central difference of gradients (lowbit has no
double back-propagation).  One pair of passes perturbs every layer's weights and inputs at once; each
block's quadratic form is an unbiased estimate of that block's trace (the cross terms have mean 0).
:func:`hessian_scores` turns them into HAWQ's second-order estimate of the loss increase,
``0.5 * trace / n * ||Q(z) - z||^2`` (``z`` the weights or the inputs, ``n`` their count), and
:func:`rank_correlation` says how well that ranks against the measured increase.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import NamedTuple

import numpy as np

from .backend import to_numpy
from .layers import Affine, Conv2D, layer_from_config
from .model import Model
from .quant_layers import QuantAffine, QuantConv2D
from .quantizers import DoReFaActivation, Fp16, Identity, Quantizer, SteSign, UniformWeight

__all__ = [
    "WIDTHS", "LayerInfo", "LayerwisePTQ", "quantizable_layers", "measure_sensitivity", "hessian_traces",
    "hessian_scores", "rank_correlation", "sensitivity_table", "write_sensitivity_reports",
    "sensitivity_command", "read_sensitivity_csv", "held_out_images", "draw_heatmap",
]

#: The widths measured by default, for weights and for activations.
WIDTHS = (1, 2, 4, 8)
_ALLOWED = tuple(range(1, 9)) + (16, 32)
KINDS = ("weight", "activation")


def _check_width(name, bits):
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in _ALLOWED:
        raise ValueError(f"{name} must be one of 1..8, 16, 32, got {bits!r}")
    return int(bits)


def _check_float_model(model):
    if not isinstance(model, Model):
        raise TypeError(f"model must be a lowbit Model, got {type(model).__name__}")
    kinds = [type(layer) for _, layer in model.named_layers()]
    if any(kind in (QuantAffine, QuantConv2D) for kind in kinds) or not any(kind in (Affine, Conv2D)
                                                                            for kind in kinds):
        raise ValueError("model must be a float model (Affine/Conv2D layers, no quantized ones); this one is "
                         "already quantized or has no kernels")


def quantizable_layers(model):
    """Paths of the ``Affine``/``Conv2D`` (float or quantized) layers of ``model``, depth first."""
    return [path for path, layer in model.named_layers() if isinstance(layer, (Affine, Conv2D))]


class LayerInfo(NamedTuple):
    """One quantizable layer: ``path`` in the model, ``kind`` ("Affine"/"Conv2D"), ``weights`` (kernel
    entries), ``out_channels`` (output units: one scale each), ``macs`` (multiply-accumulates per image),
    ``input_shape`` (one image's input to the layer)."""

    path: str
    kind: str
    weights: int
    out_channels: int
    macs: int
    input_shape: tuple


class _ShapeProbe(Quantizer):
    name = "shape_probe"

    def __init__(self):
        self.shape = None

    def forward(self, x, train=False, channel_axis=None):
        self.shape = tuple(x.shape[1:])
        return x


def _targets(model):
    return [layer for _, layer in model.named_layers() if isinstance(layer, (QuantAffine, QuantConv2D))]


class LayerwisePTQ:
    """Post-training quantization with a weight and an input width per layer (see the module doc).

    Parameters
    ----------
    model : Model
        A trained float model (Affine/Conv2D layers).
    calibration_images : numpy.ndarray, float32 (N,) + input_shape, optional
        Training images for the activation ranges (needed for 1..8-bit activations).
    per_channel : bool
        Per-output-unit weight scales (else one per tensor).
    batch_size, seed : int
        Calibration batches; ``seed`` for the calibration sample and the twin's generators.

    Attributes
    ----------
    layers : list of LayerInfo
        The quantizable layers, in the order of ``widths``.
    """

    def __init__(self, model, calibration_images=None, per_channel=True, batch_size=100, seed=0):
        from .convert import _RangeRecorder
        from .quantize import quantized_twin

        _check_float_model(model)
        self.model = model
        self.scale = "channel" if per_channel else "tensor"
        self.seed = int(seed)
        self.base = quantized_twin(model, 32, 32, keep_first=False, keep_last=False, first_input_bits=32,
                                   kernel_constraint=None, drop_relu=False, seed=seed)
        targets = _targets(self.base)
        self.paths = [path for path, layer in self.base.named_layers() if isinstance(layer, (QuantAffine,
                                                                                             QuantConv2D))]
        probes = [_ShapeProbe() for _ in targets]
        for layer, probe in zip(targets, probes):
            layer.input_quantizer = probe
        self.base.forward(np.zeros((1,) + tuple(model.input_shape), np.float32), train=False)
        self.layers = []
        for path, layer, probe in zip(self.paths, targets, probes):
            layer.input_quantizer = Identity()
            out_shape = layer.output_shape((1,) + probe.shape)[1:]
            fan_in = int(layer.W.size // layer.W.shape[layer.kernel_channel_axis])
            out_channels = int(layer.W.shape[layer.kernel_channel_axis])
            macs = fan_in * int(np.prod(out_shape))
            self.layers.append(LayerInfo(path, "Conv2D" if isinstance(layer, Conv2D) else "Affine",
                                         int(layer.W.size), out_channels, int(macs), probe.shape))
        self.recorders = None
        if calibration_images is not None:
            images = np.asarray(calibration_images, dtype=np.float32)
            if images.ndim != len(model.input_shape) + 1 or tuple(images.shape[1:]) != tuple(model.input_shape):
                raise ValueError(f"calibration_images must have shape (N, "
                                 f"{', '.join(map(str, model.input_shape))}), got {images.shape}")
            rng = np.random.default_rng(seed)
            self.recorders = [_RangeRecorder(100.0, "mse", rng) for _ in targets]
            try:
                for layer, recorder in zip(targets, self.recorders):
                    layer.input_quantizer = recorder
                for start in range(0, len(images), batch_size):
                    self.base.forward(images[start:start + batch_size], train=False)
            finally:
                for layer in targets:
                    layer.input_quantizer = Identity()
        self._weights = {}
        self._ranges = {}

    # -- quantizers ---------------------------------------------------------------------------------
    def _check_index(self, index):
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(self.layers):
            raise ValueError(f"layer index must be in 0..{len(self.layers) - 1}, got {index!r}")
        return int(index)

    def activation_quantizer(self, index, bits):
        """The calibrated input quantizer of layer ``index`` at ``bits``."""
        index, bits = self._check_index(index), _check_width("activation bits", bits)
        if bits == 32:
            return Identity()
        if bits == 16:
            return Fp16()
        if self.recorders is None:
            raise ValueError(f"{bits}-bit activations need calibration_images to set their ranges")
        key = (index, bits)
        if key not in self._ranges:
            recorder = self.recorders[index]
            signed = recorder.low < 0
            self._ranges[key] = (signed, recorder.value(bits, signed))
        signed, value = self._ranges[key]
        return DoReFaActivation(bits, signed=signed, max_value=value)

    def _weight(self, index, bits):
        """``(latent W, kernel quantizer)`` of layer ``index`` at ``bits`` (the float W for 16, 32)."""
        from .convert import _exact_binary_scale, _mse_clip

        key = (index, bits)
        if key not in self._weights:
            layer = _targets(self.base)[index]
            probe = _copy_layer(layer)
            if 2 <= bits <= 8:
                _mse_clip(probe, bits, self.scale)
            elif bits == 1:
                _exact_binary_scale(probe, self.scale)
            self._weights[key] = probe.W
        if 2 <= bits <= 8:
            quantizer = UniformWeight(bits, self.scale)
        elif bits == 1:
            quantizer = SteSign(scale=self.scale)
        elif bits == 16:
            quantizer = Fp16()
        else:
            quantizer = Identity()
        return self._weights[key], quantizer

    def check_widths(self, widths):
        """``widths`` as a list of ``(weight_bits, activation_bits)`` int pairs, one per layer."""
        if widths is None:
            return [(32, 32)] * len(self.layers)
        widths = list(widths)
        if len(widths) != len(self.layers):
            raise ValueError(f"widths must give one (weight_bits, activation_bits) pair per quantizable layer "
                             f"({len(self.layers)}: {', '.join(self.paths)}), got {len(widths)}")
        out = []
        for i, pair in enumerate(widths):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"widths[{i}] must be a (weight_bits, activation_bits) pair, got {pair!r}")
            out.append((_check_width(f"widths[{i}] weight bits", pair[0]),
                        _check_width(f"widths[{i}] activation bits", pair[1])))
        return out

    def build(self, widths=None, name=None):
        """The quantized model with ``widths[i] = (weight_bits, activation_bits)`` for layer ``i``
        (None: every layer at 32 bits, the float model's predictions exactly)."""
        widths = self.check_widths(widths)
        from .convert import _cpu_copy

        twin = _cpu_copy(self.base)
        for index, (layer, (wb, ab)) in enumerate(zip(_targets(twin), widths)):
            layer.W, layer.kernel_quantizer = self._weight(index, wb)
            layer.W = layer.W.copy()
            layer.input_quantizer = self.activation_quantizer(index, ab)
            layer.constrain()
        twin.name = name or f"{self.model.name}_mixed_" + "_".join(f"w{w}a{a}" for w, a in widths)
        return twin.seed(self.seed)

    # -- costs --------------------------------------------------------------------------------------
    def kernel_bits(self, index, bits):
        """Bits of layer ``index``'s kernel at ``bits``: the codes plus a float32 scale per output unit
        (per tensor without per_channel) for 1..8 bits."""
        info = self.layers[self._check_index(index)]
        bits = _check_width("weight bits", bits)
        scales = 0 if bits >= 16 else (info.out_channels if self.scale == "channel" else 1)
        return info.weights * bits + 32 * scales

    def fixed_bits(self):
        """Bits of everything but the quantizable kernels, stored as float32 (biases, BatchNorm, ...)."""
        kernels = {id(layer.W) for layer in _targets(self.base)}
        total = 0
        for _, layer, attr in self.base.named_arrays():
            array = getattr(layer, attr)
            if id(array) not in kernels:
                total += 32 * int(array.size)
        return total

    def model_bytes(self, widths):
        """Estimated bytes of the quantized model: kernels at their widths + the rest in float32."""
        widths = self.check_widths(widths)
        bits = self.fixed_bits() + sum(self.kernel_bits(i, wb) for i, (wb, _) in enumerate(widths))
        return bits / 8.0

    def bops(self, widths):
        """Bit operations per image: ``sum(macs * weight_bits * activation_bits)`` (32 for float)."""
        widths = self.check_widths(widths)
        return int(sum(info.macs * wb * ab for info, (wb, ab) in zip(self.layers, widths)))


def _copy_layer(layer):
    copy = layer_from_config(layer.spec())
    copy.W = np.array(to_numpy(layer.W), dtype=np.float32, copy=True)
    return copy


# -- measuring ----------------------------------------------------------------------------------------
def _cross_entropy(scores, labels):
    scores = scores.astype(np.float64)
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def _run(layers, x, batch_size):
    outs = []
    for start in range(0, len(x), batch_size):
        v = x[start:start + batch_size]
        for layer in layers:
            v = layer.forward(v, train=False)
        outs.append(np.asarray(to_numpy(v), dtype=np.float32))
    return np.concatenate(outs, axis=0)


def _top_positions(model, paths):
    """Top-level index of each path when every path is a top-level layer, else None."""
    if any("." in path for path in paths):
        return None
    return [int(path) for path in paths]


def measure_sensitivity(ptq, images, labels, widths=WIDTHS, kinds=KINDS, batch_size=100, progress=True):
    """Accuracy drop and loss increase of quantizing each layer alone, per kind and width.

    Parameters
    ----------
    ptq : LayerwisePTQ
    images : numpy.ndarray, float32 (N,) + input_shape
        Held-out training images (not the test set).
    labels : numpy.ndarray, int (N,)
    widths : sequence of int
        Widths of 1..8, 16, 32 to measure.
    kinds : sequence of "weight", "activation"
    batch_size : int
    progress : bool
        A tqdm bar over the measurements.

    Returns
    -------
    dict
        ``baseline`` (accuracy, loss of the float model) and ``rows``: one dict per layer, kind and
        width with ``layer`` (index), ``path``, ``kind``, ``bits``, ``accuracy``, ``loss``,
        ``accuracy_drop`` (float accuracy minus this), ``loss_increase``.
    """
    from tqdm.auto import tqdm

    widths = [_check_width("widths", b) for b in widths]
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"kinds must be among {list(KINDS)}, got {kind!r}")
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images) or len(images) == 0:
        raise ValueError(f"images and labels must have the same number (> 0) of rows, got {images.shape} and "
                         f"{labels.shape}")
    base = ptq.build(None)
    positions = _top_positions(base, ptq.paths)
    float_scores = base.predict_scores(images, batch_size)
    baseline = {"accuracy": float((float_scores.argmax(axis=1) == labels).mean()),
                "loss": _cross_entropy(float_scores, labels)}
    rows = []
    bar = tqdm(total=len(ptq.layers) * len(kinds) * len(widths), desc="sensitivity", unit="model",
               disable=not progress)
    activation, done = images, 0
    for index, info in enumerate(ptq.layers):
        if positions is not None:  # the float activations in front of this layer, computed once
            activation = _run(base.layers[done:positions[index]], activation, batch_size)
            done = positions[index]
        for kind in kinds:
            for bits in widths:
                pair = (bits, 32) if kind == "weight" else (32, bits)
                if pair == (32, 32):
                    scores = float_scores
                else:
                    assignment = [(32, 32)] * len(ptq.layers)
                    assignment[index] = pair
                    model = ptq.build(assignment)
                    scores = (_run(model.layers[done:], activation, batch_size) if positions is not None
                              else model.predict_scores(images, batch_size))
                accuracy = float((scores.argmax(axis=1) == labels).mean())
                loss = _cross_entropy(scores, labels)
                rows.append({"layer": index, "path": info.path, "kind": kind, "bits": bits, "accuracy": accuracy,
                             "loss": loss, "accuracy_drop": baseline["accuracy"] - accuracy,
                             "loss_increase": loss - baseline["loss"]})
                bar.update(1)
    bar.close()
    return {"baseline": baseline, "images": int(len(images)), "rows": rows}


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
    from tqdm.auto import tqdm

    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    if not relative_step > 0:
        raise ValueError(f"relative_step must be > 0, got {relative_step!r}")
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels)
    model = ptq.build(None)
    targets = _targets(model)
    probes = [_Perturb() for _ in targets]
    for layer, probe in zip(targets, probes):
        layer.input_quantizer = probe
    positions = _top_positions(model, ptq.paths)
    batch = len(images)
    rng = np.random.default_rng(seed)
    estimates = {kind: np.zeros((samples, len(targets))) for kind in KINDS}
    inputs = []
    activation, done = images, 0
    bar = tqdm(total=len(targets) * 2 * samples, desc="hessian", unit="pass", disable=not progress)
    for index, (layer, probe) in enumerate(zip(targets, probes)):
        start = 0
        if positions is not None:
            activation = _run(model.layers[done:positions[index]], activation, batch)
            done = start = positions[index]
        suffix = model.layers[start:]
        base = _run(suffix, activation, batch).astype(np.float64)
        x = np.asarray(to_numpy(probe.input), dtype=np.float32).copy()
        inputs.append(x)
        curvature = _softmax(base)  # H_s u = (p * u - p (p . u)) / N
        w = np.asarray(to_numpy(layer.W), dtype=np.float32).copy()
        for kind, values in (("weight", w), ("activation", x)):
            step = relative_step * max(float(np.sqrt(np.mean(values.astype(np.float64) ** 2))), 1e-12)
            for s in range(samples):
                v = rng.choice(np.array([-1.0, 1.0], np.float32), size=values.shape)
                if kind == "weight":
                    layer.W = (w + np.float32(step) * v).astype(np.float32)
                    layer.constrain()
                else:
                    probe.delta = np.float32(step) * v
                u = (_run(suffix, activation, batch).astype(np.float64) - base) / step
                layer.W, probe.delta = w.copy(), None
                layer.constrain()
                quadratic = (curvature * u * u).sum() - ((curvature * u).sum(axis=1) ** 2).sum()
                estimates[kind][s, index] = quadratic / batch / values.size
                bar.update(1)
    bar.close()

    def sem(e):
        return (e.std(axis=0, ddof=1) / np.sqrt(samples)).tolist() if samples > 1 else [None] * e.shape[1]

    return {"weight_trace": estimates["weight"].mean(axis=0).tolist(),
            "activation_trace": estimates["activation"].mean(axis=0).tolist(),
            "weight_trace_sem": sem(estimates["weight"]), "activation_trace_sem": sem(estimates["activation"]),
            "samples": int(samples), "images": int(batch), "relative_step": float(relative_step), "inputs": inputs}


def hessian_scores(ptq, traces, widths=WIDTHS):
    """HAWQ's estimate of each (layer, kind, width)'s loss increase: ``0.5 * mean Hessian diagonal *
    ||Q(z) - z||^2`` (``z``: the layer's weights, or its inputs on the Hessian batch).  Returns
    ``{(layer, kind, bits): score}``."""
    scores = {}
    for index in range(len(ptq.layers)):
        layer = _targets(ptq.base)[index]
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


# -- reports ------------------------------------------------------------------------------------------
_FIELDS = ("layer", "path", "type", "weights", "macs", "kind", "bits", "accuracy", "loss", "accuracy_drop",
           "loss_increase", "hessian_trace", "hessian_score")


def sensitivity_table(ptq, measured, scores=None, traces=None):
    """Rows of the sensitivity CSV: ``measured`` rows with the layer's type, size, MACs and (when given)
    its Hessian trace and HAWQ score."""
    rows = []
    for row in measured["rows"]:
        info = ptq.layers[row["layer"]]
        out = {**row, "type": info.kind, "weights": info.weights, "macs": info.macs,
               "hessian_trace": None, "hessian_score": None}
        if traces is not None:
            out["hessian_trace"] = traces[f"{row['kind']}_trace"][row["layer"]]
        if scores is not None:
            out["hessian_score"] = scores.get((row["layer"], row["kind"], row["bits"]))
        rows.append(out)
    return rows


def _csv_text(rows, fields):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    return buffer.getvalue()


def read_sensitivity_csv(path):
    """The rows of a sensitivity CSV written by :func:`write_sensitivity_reports` (numbers parsed)."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"layer", "kind", "bits", "accuracy_drop", "loss_increase"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} is not a sensitivity CSV: columns {sorted(missing)} are missing")
        rows = []
        for row in reader:
            parsed = dict(row)
            for key in ("layer", "bits", "weights", "macs"):
                if row.get(key) not in (None, ""):
                    parsed[key] = int(row[key])
            for key in ("accuracy", "loss", "accuracy_drop", "loss_increase", "hessian_trace", "hessian_score"):
                if row.get(key) not in (None, ""):
                    parsed[key] = float(row[key])
                else:
                    parsed[key] = None
            rows.append(parsed)
    return rows


def _correlations(rows):
    """Spearman correlations of the HAWQ score with the measured loss increase and accuracy drop, per
    kind (every layer and width) and per kind and width (across layers)."""
    out = {}
    for kind in KINDS:
        chosen = [r for r in rows if r["kind"] == kind and r.get("hessian_score") is not None and r["bits"] < 32]
        if not chosen:
            continue
        groups = {"all widths": chosen}
        for bits in sorted({r["bits"] for r in chosen}):
            groups[f"{bits} bits"] = [r for r in chosen if r["bits"] == bits]
        for name, group in groups.items():
            score = [r["hessian_score"] for r in group]
            out[f"{kind}, {name}"] = {
                "pairs": len(group),
                "spearman_loss_increase": rank_correlation(score, [r["loss_increase"] for r in group]),
                "spearman_accuracy_drop": rank_correlation(score, [r["accuracy_drop"] for r in group]),
            }
    return out


def _markdown(ptq, rows, measured, correlations, title):
    widths = sorted({r["bits"] for r in rows})
    lines = [f"# Per-layer sensitivity: {title}", "",
             f"Each layer quantized alone (the rest float), post-training; accuracy on {measured['images']} "
             f"held-out training images (float model: {measured['baseline']['accuracy']:.2%}, loss "
             f"{measured['baseline']['loss']:.4f}).  Cells: accuracy drop in points / loss increase.", ""]
    for kind in KINDS:
        chosen = [r for r in rows if r["kind"] == kind]
        if not chosen:
            continue
        lines += [f"## {kind.capitalize()}s", "",
                  "| layer | type | weights | " + " | ".join(f"{b} bits" for b in widths) + " | Hessian trace / n |",
                  "|---|---|---|" + "---|" * len(widths) + "---|"]
        for index, info in enumerate(ptq.layers):
            cells = []
            for bits in widths:
                match = [r for r in chosen if r["layer"] == index and r["bits"] == bits]
                cells.append(f"{100 * match[0]['accuracy_drop']:+.2f} / {match[0]['loss_increase']:+.4f}"
                             if match else "-")
            trace = next((r["hessian_trace"] for r in chosen if r["layer"] == index), None)
            lines.append(f"| {index} ({info.path}) | {info.kind} | {info.weights} | " + " | ".join(cells)
                         + f" | {'-' if trace is None else f'{trace:.3g}'} |")
        lines.append("")
    if correlations:
        lines += ["## How well the Hessian score ranks the measured sensitivity", "",
                  "HAWQ's estimate 0.5 x (Hessian trace / n) x ||Q(z) - z||^2 against the measurement, Spearman's "
                  "rank correlation.", "",
                  "| group | pairs | vs loss increase | vs accuracy drop |", "|---|---|---|---|"]
        for name, entry in correlations.items():
            lines.append(f"| {name} | {entry['pairs']} | {entry['spearman_loss_increase']:.3f} | "
                         f"{entry['spearman_accuracy_drop']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def draw_heatmap(path, ptq, rows, title):
    """The heatmap of the accuracy drops of ``rows`` (layers by widths, one panel per kind)."""
    from matplotlib.figure import Figure

    from .plots import save_figure

    widths = sorted({r["bits"] for r in rows})
    kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
    figure = Figure(figsize=(5.2 * len(kinds) + 1, 0.45 * len(ptq.layers) + 1.8), layout="constrained")
    axes = figure.subplots(1, len(kinds), squeeze=False)[0]
    for ax, kind in zip(axes, kinds):
        grid = np.full((len(ptq.layers), len(widths)), np.nan)
        for r in rows:
            if r["kind"] == kind:
                grid[r["layer"], widths.index(r["bits"])] = 100 * r["accuracy_drop"]
        image = ax.imshow(np.clip(grid, 0, None), cmap="Reds", aspect="auto", vmin=0)
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(widths)))
        ax.set_xticklabels([str(b) for b in widths])
        ax.set_yticks(range(len(ptq.layers)))
        ax.set_yticklabels([f"{i} {info.kind} {info.weights}" for i, info in enumerate(ptq.layers)], fontsize=7)
        ax.set_xlabel(f"{kind} bits")
        ax.set_title(f"{title}: {kind}s alone", fontsize=8)
        figure.colorbar(image, ax=ax, label="accuracy drop (points)")
    save_figure(figure, path)


def write_sensitivity_reports(out_dir, ptq, measured, traces=None, title="model", extra=None):
    """Write ``sensitivity.csv``, ``sensitivity.md``, ``sensitivity.json`` and ``sensitivity.png``
    into ``out_dir``; returns the paths by name and the rows."""
    from .io import write_bytes_atomic

    os.makedirs(out_dir, exist_ok=True)
    scores = hessian_scores(ptq, traces, sorted({r["bits"] for r in measured["rows"]})) if traces else None
    rows = sensitivity_table(ptq, measured, scores, traces)
    correlations = _correlations(rows) if scores else {}
    files = {name: os.path.join(out_dir, f"sensitivity.{ext}")
             for name, ext in (("csv", "csv"), ("table", "md"), ("json", "json"), ("heatmap", "png"))}
    write_bytes_atomic(files["csv"], _csv_text(rows, _FIELDS).encode())
    write_bytes_atomic(files["table"], _markdown(ptq, rows, measured, correlations, title).encode())
    document = {"title": title, "baseline": measured["baseline"], "images": measured["images"],
                "layers": [info._asdict() for info in ptq.layers], "correlations": correlations,
                "hessian": None if traces is None else {k: v for k, v in traces.items() if k != "inputs"},
                **(extra or {}), "rows": rows}
    write_bytes_atomic(files["json"], (json.dumps(document, indent=1) + "\n").encode())
    draw_heatmap(files["heatmap"], ptq, rows, title)
    return files, rows


def held_out_images(data, val_size=10000, seed=0, calibrate=1000, images=5000):
    """``(calibration, x_held, y_held)``: the first ``calibrate`` images of the training part and the
    first ``images`` of the held-out part of :func:`lowbit.data.train_val_split` (``val_size``, ``seed``),
    the split ``lowbit train --val`` and ``lowbit sweep`` hold out; the calibration images are those a
    sweep with the same ``val_size``, ``seed`` and ``calibration`` uses."""
    from .data import float_images, train_val_split

    x_train, _, x_val, y_val = train_val_split(np.asarray(data.x_train), np.asarray(data.y_train), int(val_size),
                                               int(seed))
    if not 0 < images <= len(x_val):
        raise ValueError(f"images must be in 1..{len(x_val)} (the held-out part, val_size), got {images!r}")
    calibration = float_images(x_train[:int(calibrate)]) if calibrate else None
    return calibration, float_images(x_val[:int(images)]), np.asarray(y_val[:int(images)])


def sensitivity_command(model_path, out_dir, widths=WIDTHS, images=5000, val_size=10000, seed=0, calibrate=1000,
                        hessian_images=500, hessian_samples=16, per_channel=True, batch_size=100, data=None,
                        progress=True, out=print):
    """``lowbit sensitivity``: measure and report every layer's sensitivity (see the module doc)."""
    from .data import load_mnist
    from .io import load_model

    model = load_model(model_path)
    mnist = data if data is not None else load_mnist(progress=False)
    calibration, x_held, y_held = held_out_images(mnist, val_size, seed, calibrate, images)
    ptq = LayerwisePTQ(model, calibration, per_channel=per_channel, batch_size=batch_size, seed=seed)
    measured = measure_sensitivity(ptq, x_held, y_held, widths, batch_size=batch_size, progress=progress)
    traces = None
    if hessian_samples:
        count = min(int(hessian_images), len(x_held))
        traces = hessian_traces(ptq, x_held[:count], y_held[:count], samples=hessian_samples, seed=seed,
                                progress=progress)
    extra = {"model_file": os.path.basename(os.fspath(model_path)), "val_size": int(val_size), "seed": int(seed),
             "calibration_images": int(calibrate), "per_channel": bool(per_channel)}
    files, rows = write_sensitivity_reports(out_dir, ptq, measured, traces, title=model.name, extra=extra)
    with open(files["table"], encoding="utf-8") as fh:
        out(fh.read())
    out("wrote " + ", ".join(files.values()))
    return files, rows
