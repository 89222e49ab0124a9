"""Per-layer PTQ (:class:`LayerwisePTQ`) and the measured sensitivity of each layer alone."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import to_numpy
from ..layers import Affine, Conv2D, layer_from_config
from ..model import Model
from ..quant_layers import QuantAffine, QuantConv2D
from ..quantizers import DoReFaActivation, Fp16, Identity, Quantizer, SteSign, UniformWeight

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


def layer_targets(model):
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
        from ..ptq import RangeRecorder
        from ..quantize import quantized_twin

        _check_float_model(model)
        self.model = model
        self.scale = "channel" if per_channel else "tensor"
        self.seed = int(seed)
        self.base = quantized_twin(model, 32, 32, keep_first=False, keep_last=False, first_input_bits=32,
                                   kernel_constraint=None, drop_relu=False, seed=seed)
        targets = layer_targets(self.base)
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
            self.recorders = [RangeRecorder(100.0, "mse", rng) for _ in targets]
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
        from ..ptq import clip_weights_mse, exact_binary_scale

        key = (index, bits)
        if key not in self._weights:
            layer = layer_targets(self.base)[index]
            probe = _copy_layer(layer)
            if 2 <= bits <= 8:
                clip_weights_mse(probe, bits, self.scale)
            elif bits == 1:
                exact_binary_scale(probe, self.scale)
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
        from ..convert import cpu_copy

        twin = cpu_copy(self.base)
        for index, (layer, (wb, ab)) in enumerate(zip(layer_targets(twin), widths)):
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
        kernels = {id(layer.W) for layer in layer_targets(self.base)}
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


def run_layers(layers, x, batch_size):
    outs = []
    for start in range(0, len(x), batch_size):
        v = x[start:start + batch_size]
        for layer in layers:
            v = layer.forward(v, train=False)
        outs.append(np.asarray(to_numpy(v), dtype=np.float32))
    return np.concatenate(outs, axis=0)


def top_positions(model, paths):
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
    from ..progress import tqdm

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
    positions = top_positions(base, ptq.paths)
    float_scores = base.predict_scores(images, batch_size)
    baseline = {"accuracy": float((float_scores.argmax(axis=1) == labels).mean()),
                "loss": _cross_entropy(float_scores, labels)}
    rows = []
    bar = tqdm(total=len(ptq.layers) * len(kinds) * len(widths), desc="sensitivity", unit="model",
               disable=not progress)
    activation, done = images, 0
    for index, info in enumerate(ptq.layers):
        if positions is not None:  # the float activations in front of this layer, computed once
            activation = run_layers(base.layers[done:positions[index]], activation, batch_size)
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
                    scores = (run_layers(model.layers[done:], activation, batch_size) if positions is not None
                              else model.predict_scores(images, batch_size))
                accuracy = float((scores.argmax(axis=1) == labels).mean())
                loss = _cross_entropy(scores, labels)
                rows.append({"layer": index, "path": info.path, "kind": kind, "bits": bits, "accuracy": accuracy,
                             "loss": loss, "accuracy_drop": baseline["accuracy"] - accuracy,
                             "loss_increase": loss - baseline["loss"]})
                bar.update(1)
    bar.close()
    return {"baseline": baseline, "images": int(len(images)), "rows": rows}


def held_out_images(data, val_size=10000, seed=0, calibrate=1000, images=5000):
    """``(calibration, x_held, y_held)``: the first ``calibrate`` images of the training part and the
    first ``images`` of the held-out part of :func:`lowbit.data.train_val_split` (``val_size``, ``seed``),
    the split ``lowbit train --val`` and ``lowbit sweep`` hold out; the calibration images are those a
    sweep with the same ``val_size``, ``seed`` and ``calibration`` uses."""
    from ..data import float_images, train_val_split

    x_train, _, x_val, y_val = train_val_split(np.asarray(data.x_train), np.asarray(data.y_train), int(val_size),
                                               int(seed))
    if not 0 < images <= len(x_val):
        raise ValueError(f"images must be in 1..{len(x_val)} (the held-out part, val_size), got {images!r}")
    calibration = float_images(x_train[:int(calibrate)]) if calibrate else None
    return calibration, float_images(x_val[:int(images)]), np.asarray(y_val[:int(images)])
