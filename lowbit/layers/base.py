"""The layer protocol's base class, the ``LAYERS`` registry and the argument checks layers share."""
from __future__ import annotations

import numpy as np

from ..backend import to_device


LAYERS: dict[str, type] = {}


def register_layer(cls):
    """Class decorator: make ``cls`` loadable from a model manifest under its class name."""
    LAYERS[cls.__name__] = cls
    return cls


def layer_from_config(spec: dict):
    """Build a layer from ``{"type": name, "config": {...}, "children": [...]}`` (see ``Layer.spec``)."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"layer spec must be a dict with a 'type' key, got {spec!r}")
    name = spec["type"]
    try:
        cls = LAYERS[name]
    except KeyError:
        raise ValueError(f"unknown layer type {name!r}; known types: {sorted(LAYERS)}") from None
    return cls.from_spec(spec)


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_nonnegative_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def check_input(layer, x, ndim, what):
    if not hasattr(x, "ndim") or x.ndim != ndim:
        got = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{type(layer).__name__} expects {what}, got an input of shape {got}")


class Layer:
    """Base class; see the module docstring for the protocol."""

    param_names: tuple = ()
    buffer_names: tuple = ()

    # -- structure ---------------------------------------------------------------------------
    def config(self) -> dict:
        return {}

    def children(self) -> list:
        return []

    def spec(self) -> dict:
        out = {"type": type(self).__name__, "config": self.config()}
        kids = self.children()
        if kids:
            out["children"] = [[name, child.spec()] for name, child in kids]
        return out

    @classmethod
    def from_spec(cls, spec):
        return cls(**spec.get("config", {}))

    def named_layers(self, prefix=""):
        """Yield ``(path, layer)`` for this layer and every nested one, depth first."""
        yield prefix, self
        for name, child in self.children():
            yield from child.named_layers(f"{prefix}.{name}" if prefix else name)

    def named_arrays(self, buffers=True):
        """Yield ``(path, layer, attribute)`` of every parameter (and buffer) in this subtree."""
        for path, layer in self.named_layers():
            names = layer.param_names + (layer.buffer_names if buffers else ())
            for attr in names:
                yield (f"{path}.{attr}" if path else attr), layer, attr

    # -- training hooks ------------------------------------------------------------------------
    def backward_params(self, dout):
        """The parameter gradients of ``backward(dout)`` (``dW``, ``db``, ...) without the input
        gradient, where nothing reads it: a model's first layer in a training step.  Returns None.
        Layers that can skip the input gradient's work override this (``Affine``, ``Conv2D``,
        ``Sequential``); the default runs ``backward`` and drops its result."""
        self.backward(dout)

    def has_parameters(self) -> bool:
        """True when this layer or a nested one has a trainable array."""
        return any(True for _ in self.named_arrays(buffers=False))

    def constrain(self):
        """Project parameters back onto their constraint set after an update (default: none)."""

    def zero_grads(self):
        for _, layer in self.named_layers():
            for attr in layer.param_names:
                setattr(layer, "d" + attr, None)

    def to_device(self, device: str):
        """Move every parameter, buffer and gradient of this subtree to 'cpu' or 'gpu' (in place)."""
        for _, layer in self.named_layers():
            for attr in layer.param_names + layer.buffer_names:
                setattr(layer, attr, to_device(getattr(layer, attr), device))
            for attr in layer.param_names:
                g = getattr(layer, "d" + attr, None)
                if g is not None:
                    setattr(layer, "d" + attr, to_device(g, device))
            layer._clear_cache()
        return self

    def _clear_cache(self):
        """Drop arrays kept from the last forward pass (they may live on the old device)."""
        for attr in list(vars(self)):
            if attr.startswith("_cache"):
                setattr(self, attr, None)

    def output_shape(self, input_shape):
        """Shape of the output for an input of ``input_shape`` (batch axis included)."""
        return tuple(input_shape)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"
