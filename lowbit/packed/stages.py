"""The stage base class, its registry, and the float-side stages (float, pack, flatten, acc_to_float,
unpack, residual); the binary stages are in :mod:`lowbit.packed.binary_stages`."""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module, to_device, to_numpy
from ..io import ModelFileError
from ..layers import Affine, Conv2D, Sequential, layer_from_config
from .common import check_array, kernels_module, describe_spec, make_spec, sim_shape, spec_from_json, spec_to_json
from .encoding import decode_kernel, encode_kernel, kernel_channel_axis

STAGES: dict[str, type] = {}


def register_stage(cls):
    STAGES[cls.kind] = cls
    return cls


class Stage:
    """One step of a :class:`PackedModel`: ``run(x)`` maps an array of ``input_spec`` to ``output_spec``.

    Subclasses define ``kind`` (the name in files), ``run``, ``config()`` (JSON),
    ``arrays()`` (name -> host array) and ``from_parts(config, arrays)``.
    """

    kind = "stage"
    _array_names: tuple = ()

    def __init__(self, input_spec, output_spec):
        self.input_spec = input_spec
        self.output_spec = output_spec

    def run(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict:
        return {"input": spec_to_json(self.input_spec), "output": spec_to_json(self.output_spec)}

    def arrays(self) -> dict:
        return {name: to_numpy(getattr(self, name)) for name in self._array_names}

    @classmethod
    def from_parts(cls, config, arrays):  # pragma: no cover - abstract
        raise NotImplementedError

    def to_device(self, device):
        for name in self._array_names:
            setattr(self, name, to_device(getattr(self, name), device))
        return self

    def rows(self):
        """``(label, callable)`` pairs that together do ``run`` (one per layer for float stages)."""
        return [(self.kind, self.run)]

    def fused_with(self, following):
        """A callable that does ``following.run(self.run(x))`` in fewer passes, or None (the default).

        :meth:`PackedModel.forward` uses it for each pair of consecutive stages; the result must be
        equal, bit for bit, to running the two stages.
        """
        return None

    def __repr__(self):
        return f"{type(self).__name__}({describe_spec(self.input_spec)} -> {describe_spec(self.output_spec)})"


def stage_specs(config):
    return spec_from_json(config.get("input")), spec_from_json(config.get("output"))


@register_stage
class FloatStage(Stage):
    """A run of ordinary lowbit layers, evaluated as in the simulation (``layer.forward(x, False)``).

    Kernels of quantized layers are stored in their compact encoding (:func:`encode_kernel`) and
    rebuilt at load; the layers then carry the rebuilt kernel with an identity kernel quantizer, so
    the product multiplies exactly the values the simulation multiplies.
    """

    kind = "float"

    def __init__(self, layers, input_shape, encodings=None, dtype=np.float32):
        self.layers = list(layers)
        input_shape = tuple(int(s) for s in input_shape)
        shape = Sequential(self.layers).output_shape((1,) + input_shape)[1:]
        super().__init__(make_spec("float", None, input_shape), make_spec("float", None, shape))
        # path -> (info, arrays) of every encoded kernel; computed by prepare_layers at conversion.
        self.encodings = dict(encodings or {})
        # float16: the layers of a half-precision model (Model.astype(np.float16)), run in float16
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float16, np.float32):
            raise ValueError(f"a float stage computes in float32 or float16, got {self.dtype}")

    @staticmethod
    def prepare_layers(layers):
        """Replace every quantized kernel by its decoded encoding; return ``{path: (info, arrays)}``.

        Works in place on ``layers`` (CPU copies owned by the converter).
        """
        from ..quantizers import Identity

        encodings = {}
        for path, layer in Sequential(layers).named_layers():
            if not isinstance(layer, (Affine, Conv2D)):
                continue
            axis = kernel_channel_axis(layer)
            quantizer = getattr(layer, "kernel_quantizer", None)
            if quantizer is not None:
                w_eff = np.asarray(layer.quantized_kernel(train=False), dtype=np.float32)
            else:
                w_eff = layer.W
            dtype = layer.W.dtype  # float16 in a half-precision model: stored exactly as float32 values
            info, arrays = encode_kernel(np.asarray(w_eff, dtype=np.float32), axis, quantizer,
                                         latent=np.asarray(layer.W, dtype=np.float32))
            encodings[f"{path}.W"] = (info, arrays)
            if quantizer is not None:
                layer.kernel_quantizer = Identity()
                layer.kernel_constraint = None
                layer._cache_weight = None
            layer.W = decode_kernel(info, arrays).astype(dtype, copy=False)
        return encodings

    def run(self, x):
        if x.dtype != self.dtype:
            x = x.astype(self.dtype)  # as Model.predict_scores casts its input to the compute dtype
        for layer in self.layers:
            x = layer.forward(x, train=False)
        return x

    def rows(self):
        return [(type(layer).__name__, (lambda x, layer=layer: layer.forward(x, train=False)))
                for layer in self.layers]

    def fused_with(self, following):
        """A following pack stage (thresholds or the plain sign, channels-last) after a last float32
        convolution with few input channels: ``few_channel_conv2d_threshold`` writes the sign bits of
        the values that ``few_channel_conv2d`` gives the simulation, without the floats, whenever the
        simulation's forward takes that kernel (:func:`~lowbit.functions.few_channel_conv_available`,
        asked on every call; otherwise the two stages run).  The layers before the convolution, and its
        input quantizer, run as in :meth:`run`."""
        conv = self.layers[-1] if self.layers else None
        if not (isinstance(following, PackStage) and following.output_spec[1] == "nhwc" and isinstance(conv, Conv2D)
                and self.dtype == np.float32 and not conv.binary_operands()):
            return None
        from ..functions import few_channel_conv_available
        from ..kernels.few_channel_conv import few_channel_conv2d_threshold

        def conv_pack(x):
            if x.dtype != self.dtype:
                x = x.astype(self.dtype)
            for layer in self.layers[:-1]:
                x = layer.forward(x, train=False)
            if type(x) is not np.ndarray:  # CuPy: the two stages, without quantizing the input twice
                return following.run(conv.forward(x, train=False))
            xq = conv.effective_input(x, False)
            # what the layer's forward multiplies (QuantConv2D quantizes its kernel on each forward)
            w = conv.quantized_kernel(train=False) if hasattr(conv, "quantized_kernel") else conv.effective_weight()
            threshold, direction = following.threshold, following.direction
            if threshold is None:
                threshold, direction = np.zeros(following.channels, np.float32), np.ones(following.channels, np.int8)
            if not (few_channel_conv_available(xq, w, conv.padding) and type(threshold) is np.ndarray):
                return following.run(conv.forward(x, train=False))
            return few_channel_conv2d_threshold(np.ascontiguousarray(xq), w, conv.b if conv.bias else None,
                                                conv.stride, conv.padding, threshold, direction)
        return conv_pack

    def config(self):
        out = {**super().config(), "layers": [layer.spec() for layer in self.layers],
               "weights": {path: info for path, (info, _) in self.encodings.items()}}
        if self.dtype != np.float32:
            out["dtype"] = self.dtype.name
        return out

    def arrays(self):
        out = {}
        for path, layer, attr in Sequential(self.layers).named_arrays():
            if path in self.encodings:
                for name, arr in self.encodings[path][1].items():
                    out[f"{path}.{name}"] = arr
            else:
                out[path] = to_numpy(getattr(layer, attr))
        return out

    def layer_arrays(self, index):
        """The stored arrays of layer ``index`` (for memory accounting)."""
        prefix = f"{index}."
        return {k: v for k, v in self.arrays().items() if k.startswith(prefix)}

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = stage_specs(config)
        specs = config.get("layers")
        weights = config.get("weights", {})
        if not isinstance(specs, list) or not isinstance(weights, dict):
            raise ValueError("a float stage needs a 'layers' list and a 'weights' dict")
        dtype = config.get("dtype", "float32")
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
        from ..io import check_declared_shapes

        # Decode the kernels first (each encoding's arrays are checked against its shape), then check
        # every size the layer specs declare against what is stored, and only then build the layers.
        decoded, encodings = {}, {}
        for path, info in weights.items():
            if not isinstance(path, str):
                raise ValueError(f"weights must be keyed by array path, got {path!r}")
            prefix = f"{path}."
            sub = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            decoded[path] = decode_kernel(info, sub)
            encodings[path] = (info, sub)
        stored = {**{k: v for k, v in arrays.items() if not any(k.startswith(f"{p}.") for p in weights)},
                  **decoded}
        tree = {"type": "Sequential", "children": [[str(i), spec] for i, spec in enumerate(specs)]}
        check_declared_shapes(tree, stored, "the float stage")
        layers = [layer_from_config(spec) for spec in specs]
        if dtype == "float16":  # as Model.astype: parameters in float16, buffers stay float32
            for _, layer, attr in Sequential(layers).named_arrays(buffers=False):
                setattr(layer, attr, getattr(layer, attr).astype(np.float16))
        expected = {path: (layer, attr) for path, layer, attr in Sequential(layers).named_arrays()}
        unknown = sorted(set(stored) - set(expected))
        if unknown:
            raise ValueError(f"arrays or weights {unknown[:3]} belong to no array of the stage's layers")
        for path, (layer, attr) in expected.items():
            current = getattr(layer, attr)
            if path not in stored:
                raise ValueError(f"array {path!r} of layer {type(layer).__name__} is missing")
            value = np.array(stored[path])
            if current.dtype == np.float16 and value.dtype == np.float32 and path in decoded:
                half = value.astype(np.float16)
                if not np.array_equal(half.astype(np.float32), value):
                    raise ValueError(f"kernel {path!r} of a float16 stage is not made of float16 values")
                value = half
            if tuple(value.shape) != tuple(current.shape) or value.dtype != current.dtype:
                raise ValueError(f"array {path!r} is {value.dtype}{tuple(value.shape)}, the layer needs "
                                 f"{current.dtype}{tuple(current.shape)}")
            setattr(layer, attr, value)
        stage = cls(layers, sim_shape(input_spec), encodings, dtype)
        if stage.input_spec != input_spec or stage.output_spec != output_spec:
            raise ValueError(f"the layers map {describe_spec(stage.input_spec)} to "
                             f"{describe_spec(stage.output_spec)}, the stage says "
                             f"{describe_spec(input_spec)} to {describe_spec(output_spec)}")
        return stage

    def to_device(self, device):
        for layer in self.layers:
            layer.to_device(device)
        return self


@register_stage
class PackStage(Stage):
    """Sign bits of a float array: ``(N, C, H, W)`` -> NHWC packed, or ``(N, ...)`` -> ``(N, words)``.

    With ``threshold`` / ``direction`` (float32 / int8, one per channel) the stage also stands for
    the per-channel float layers just before the sign (a BatchNorm, a ReLU, ...): bit ``c`` is
    ``x >= threshold[c]`` (direction +1) or ``x <= threshold[c]`` (-1), thresholds that
    :mod:`lowbit.convert` derives by running those layers; without them it is the plain sign
    (threshold 0, direction +1).  float32 input goes through ``threshold_signs`` (the NCHW -> NHWC
    move and the pack in one pass); other dtypes (a float16 model) through ``pack_signs``.
    """

    kind = "pack"

    def __init__(self, input_spec, output_spec, threshold=None, direction=None):
        super().__init__(input_spec, output_spec)
        if (threshold is None) != (direction is None):
            raise ValueError("a pack stage takes both threshold and direction, or neither")
        self.threshold = threshold
        self.direction = direction

    @property
    def _array_names(self):
        return () if self.threshold is None else ("threshold", "direction")

    @property
    def channels(self):
        dims = self.input_spec[2]
        return dims[0] if self.output_spec[1] == "nhwc" else int(np.prod(dims))

    def run(self, x):
        xp = get_array_module(x)
        nhwc = self.output_spec[1] == "nhwc"
        if x.dtype == np.float32:
            x = x if nhwc else x.reshape(x.shape[0], -1)  # threshold_signs takes strided input
            threshold, direction = self.threshold, self.direction
            if threshold is None:
                threshold = xp.zeros(self.channels, dtype=np.float32)
                direction = xp.ones(self.channels, dtype=np.int8)
            return kernels_module().threshold_signs(x, threshold, direction)
        if self.threshold is not None:
            raise TypeError(f"a pack stage with thresholds takes float32 input, got {x.dtype}")
        if nhwc:
            x = xp.ascontiguousarray(x.transpose(0, 2, 3, 1))
        else:
            x = xp.ascontiguousarray(x.reshape(x.shape[0], -1))
        return kernels_module().pack_signs(x)

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = stage_specs(config)
        if input_spec[0] != "float" or output_spec[0] != "packed" or output_spec[1] == "nhwc_flat":
            raise ValueError("a pack stage maps float to packed nhwc or dense")
        expected = input_spec[2] if output_spec[1] == "nhwc" else (int(np.prod(input_spec[2])),)
        if output_spec[2] != expected:
            raise ValueError(f"packing {input_spec[2]} gives dims {expected}, "
                             f"the stage says {output_spec[2]}")
        stage = cls(input_spec, output_spec)
        if "threshold" in arrays or "direction" in arrays:
            channels = stage.channels
            stage.threshold = check_array(arrays, "threshold", np.float32, (channels,))
            stage.direction = check_array(arrays, "direction", np.int8, (channels,))
            if not np.all((stage.direction == 1) | (stage.direction == -1)):
                raise ValueError("array 'direction' must hold only +1 and -1")
        return stage


@register_stage
class FlattenStage(Stage):
    """Packed NHWC -> the same array, which the simulation now sees flattened NCHW (``nhwc_flat``).

    Nothing moves: the dense layer that reads it has its weight rows in (h, w, c) order.
    """

    kind = "flatten"

    def run(self, x):
        return x

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = stage_specs(config)
        if input_spec[:2] != ("packed", "nhwc") or output_spec[:2] != ("packed", "nhwc_flat") \
                or input_spec[2] != output_spec[2]:
            raise ValueError("a flatten stage maps packed nhwc to packed nhwc_flat of the same dims")
        return cls(input_spec, output_spec)


@register_stage
class AccToFloatStage(Stage):
    """int32 accumulators -> the simulation's float32 layer output ``acc * scale + bias``.

    ``acc`` as float32 is exact (|acc| < 2^24), and so is ``acc * scale`` (the converter checks that
    every ``j * scale`` with ``|j| <= K`` is a float32), which is what the simulation's float sum
    gives; ``+ bias`` is then the same float32 addition.  Feature maps come back NCHW with the
    simulation's strides (a transposed ``(O, N, OH, OW)`` array).
    """

    kind = "acc_to_float"

    def __init__(self, input_spec, output_spec, scale=None, bias=None):
        super().__init__(input_spec, output_spec)
        self.scale = scale
        self.bias = bias

    @property
    def _array_names(self):
        return tuple(name for name in ("scale", "bias") if getattr(self, name) is not None)

    def run(self, acc):
        xp = get_array_module(acc)
        if self.input_spec[1] == "dense":
            out = acc.astype(np.float32)
            if self.scale is not None:
                out = out * self.scale
            if self.bias is not None:
                out = out + self.bias
            return out
        n = acc.shape[0]
        channels = acc.shape[3]
        out = xp.ascontiguousarray(acc.transpose(3, 0, 1, 2)).astype(np.float32).reshape(channels, -1)
        if self.scale is not None:
            out = out * self.scale[:, None]
        if self.bias is not None:
            out += self.bias[:, None]
        return out.reshape(channels, n, acc.shape[1], acc.shape[2]).transpose(1, 0, 2, 3)

    def config(self):
        return {**super().config(), "scale": self.scale is not None, "bias": self.bias is not None}

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = stage_specs(config)
        if input_spec[0] != "acc" or output_spec[0] != "float" or output_spec[2] != input_spec[2]:
            raise ValueError("an acc_to_float stage maps acc to float of the same dims")
        channels = input_spec[2][0]
        scale = check_array(arrays, "scale", np.float32, (channels,)) if config.get("scale") else None
        bias = check_array(arrays, "bias", np.float32, (channels,)) if config.get("bias") else None
        return cls(input_spec, output_spec, scale, bias)


@register_stage
class UnpackStage(Stage):
    """Packed signs -> +-1 float32 in the simulation's layout (NCHW, or flattened NCHW)."""

    kind = "unpack"

    def run(self, x):
        xp = get_array_module(x)
        layout, dims = self.input_spec[1], self.input_spec[2]
        values = kernels_module().unpack_signs(x, dims[0], np.float32)
        if layout == "dense":
            return values
        values = xp.ascontiguousarray(values.transpose(0, 3, 1, 2))
        if layout == "nhwc_flat":
            return values.reshape(values.shape[0], -1)
        return values

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = stage_specs(config)
        if input_spec[0] != "packed" or output_spec[0] != "float" or output_spec[2] != sim_shape(input_spec):
            raise ValueError("an unpack stage maps packed to float of the simulation's shape")
        return cls(input_spec, output_spec)


@register_stage
class ResidualStage(Stage):
    """A :class:`~lowbit.layers.Residual` block: ``body(x) + shortcut(x)`` on float input.

    ``body`` and ``shortcut`` are stage chains of their own (``shortcut`` empty: the identity) that
    each map the block's float input to its float output.  The body of a Bi-Real block is
    ``pack`` -> ``binary_conv`` -> ``acc_to_float`` -> ``float`` (its BatchNorm): the binary
    convolution runs on bits, its integer accumulators come back as the simulation's float32 values
    (exactly, see :class:`AccToFloatStage`), and the real-valued shortcut is added to them with the
    same float32 addition as the simulation's, so the block's output is equal, not merely close.
    In the file, the inner stages' arrays are named ``body.<i>.<name>`` and ``shortcut.<i>.<name>``.
    """

    kind = "residual"

    def __init__(self, input_spec, body, shortcut=()):
        body, shortcut = list(body), list(shortcut)
        if input_spec[0] != "float":
            raise ValueError(f"a residual stage takes float input, got {describe_spec(input_spec)}")
        out = _chain_output(body, input_spec, "body")
        skip = _chain_output(shortcut, input_spec, "shortcut")
        if out != skip or out[0] != "float":
            raise ValueError(f"the residual body gives {describe_spec(out)}, the shortcut "
                             f"{describe_spec(skip)}: they must be the same float shape")
        super().__init__(input_spec, out)
        self.body, self.shortcut = body, shortcut

    def run(self, x):
        out = x
        for stage in self.body:
            out = stage.run(out)
        skip = x
        for stage in self.shortcut:
            skip = stage.run(skip)
        return out + skip

    def config(self):
        def entries(stages):
            return [{"type": st.kind, "config": st.config(), "arrays": sorted(st.arrays())} for st in stages]

        return {**super().config(), "body": entries(self.body), "shortcut": entries(self.shortcut)}

    def arrays(self):
        out = {}
        for part, stages in (("body", self.body), ("shortcut", self.shortcut)):
            for index, stage in enumerate(stages):
                for name, arr in stage.arrays().items():
                    out[f"{part}.{index}.{name}"] = arr
        return out

    def inner_stages(self):
        return self.body + self.shortcut

    @classmethod
    def from_parts(cls, config, arrays):
        input_spec, output_spec = stage_specs(config)
        body, used = build_stages(config.get("body"), arrays, "body.", "residual", "body.")
        shortcut, used_skip = build_stages(config.get("shortcut", []), arrays, "shortcut.", "residual",
                                            "shortcut.")
        unused = sorted(set(arrays) - used - used_skip)
        if unused:
            raise ValueError(f"arrays {unused[:3]} belong to no inner stage")
        stage = cls(input_spec, body, shortcut)
        if stage.output_spec != output_spec:
            raise ValueError(f"the block gives {describe_spec(stage.output_spec)}, the stage says "
                             f"{describe_spec(output_spec)}")
        return stage

    def to_device(self, device):
        for stage in self.inner_stages():
            stage.to_device(device)
        return self


def _chain_output(stages, input_spec, what):
    """The output spec of ``stages`` run in order on ``input_spec``; ValueError where two disagree."""
    expected = input_spec
    for index, stage in enumerate(stages):
        if stage.input_spec != expected:
            raise ValueError(f"{what} stage {index} ({stage.kind}) takes {describe_spec(stage.input_spec)} "
                             f"but receives {describe_spec(expected)}")
        expected = stage.output_spec
    return expected


def build_stages(entries, arrays, prefix, source, label=""):
    """Stages from manifest ``entries`` (``{"type", "config", "arrays"}`` each) whose arrays are
    ``arrays[prefix + "<index>." + name]`` (``label`` prefixes the index in messages).  Returns ``(stages, used array keys)``; raises
    :class:`~lowbit.io.ModelFileError` naming the stage and what is wrong."""
    if not isinstance(entries, list):
        raise ModelFileError(f"{source}: the stage list must be a list, got {type(entries).__name__}")
    stages = []
    used = set()
    for index, entry in enumerate(entries):
        where = f"{source}: stage {label}{index}"
        if not isinstance(entry, dict):
            raise ModelFileError(f"{where} is not a dict")
        kind = entry.get("type")
        if not isinstance(kind, str) or kind not in STAGES:
            raise ModelFileError(f"{where} has unknown type {kind!r}; known: {sorted(STAGES)}")
        names = entry.get("arrays", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ModelFileError(f"{where} ({kind}) must list its arrays by name")
        stage_prefix = f"{prefix}{index}."
        missing = [n for n in names if stage_prefix + n not in arrays]
        if missing:
            raise ModelFileError(f"{where} ({kind}) lacks arrays {missing[:3]}")
        stage_arrays = {n: arrays[stage_prefix + n] for n in names}
        used.update(stage_prefix + n for n in names)
        config = entry.get("config")
        if not isinstance(config, dict):
            raise ModelFileError(f"{where} ({kind}) has no config dict")
        try:
            stage = STAGES[kind].from_parts(config, stage_arrays)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ModelFileError(f"{where} ({kind}) is invalid: {exc}") from None
        if sorted(stage.arrays()) != sorted(names):
            raise ModelFileError(f"{where} ({kind}) lists arrays {sorted(names)[:4]}, "
                                 f"its config needs {sorted(stage.arrays())[:4]}")
        stages.append(stage)
    return stages, used
