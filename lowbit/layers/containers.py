"""Layers made of layers: ``Sequential`` (also the model container), ``Residual``, ``Concat``."""
from __future__ import annotations

from ..backend import get_array_module
from .base import Layer, layer_from_config, register_layer


class _Composite(Layer):
    def forward(self, x, train=False):  # pragma: no cover - abstract
        raise NotImplementedError

    def constrain(self):
        for _, child in self.children():
            child.constrain()


@register_layer
class Sequential(_Composite):
    """A chain of layers; also the model container (see :mod:`lowbit.model` for predict/evaluate)."""

    def __init__(self, layers=()):
        self.layers = list(layers)
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layers[{i}] must be a lowbit Layer, got {type(layer).__name__}")

    @classmethod
    def from_spec(cls, spec):
        return cls([layer_from_config(child) for _, child in spec.get("children", [])])

    def children(self):
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    def forward(self, x, train=False):
        for layer in self.layers:
            x = layer.forward(x, train)
        return x

    def backward(self, dout, input_grad=True):
        """``dout`` through every layer in reverse; returns the input gradient.  With
        ``input_grad=False`` only the parameter gradients are computed and None is returned (see
        :meth:`backward_params`): a training step that discards the model's input gradient."""
        if not input_grad:
            return self.backward_params(dout)
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return dout

    def backward_params(self, dout):
        """The parameter gradients only: the leading layers without parameters (a Flatten, a
        Rescale) get no backward at all, and the first layer with parameters skips its input
        gradient where it can (:meth:`Layer.backward_params`)."""
        first = next((i for i, layer in enumerate(self.layers) if layer.has_parameters()), len(self.layers))
        for layer in reversed(self.layers[first + 1:]):
            dout = layer.backward(dout)
        if first < len(self.layers):
            self.layers[first].backward_params(dout)

    def output_shape(self, input_shape):
        for layer in self.layers:
            input_shape = layer.output_shape(input_shape)
        return input_shape

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __repr__(self):
        inner = ",\n  ".join(repr(layer).replace("\n", "\n  ") for layer in self.layers)
        return f"{type(self).__name__}([\n  {inner}\n])"


def _as_sequential(block, name):
    if block is None:
        return None
    if isinstance(block, Sequential):
        return block
    if isinstance(block, Layer):
        return Sequential([block])
    if isinstance(block, (list, tuple)):
        return Sequential(block)
    raise TypeError(f"{name} must be a Layer or a list of layers, got {type(block).__name__}")


@register_layer
class Residual(_Composite):
    """Skip connection: ``y = body(x) + shortcut(x)``, with ``shortcut`` the identity when None.

    The backward pass returns ``body.backward(dout) + shortcut.backward(dout)``; with the identity
    shortcut the upstream gradient reaches the input unchanged (Deep Learning from Scratch, 8.1.5).
    Use a 1x1 convolution (projection) as the shortcut when the body changes the shape.
    """

    def __init__(self, body, shortcut=None):
        self.body = _as_sequential(body, "body")
        self.shortcut = _as_sequential(shortcut, "shortcut")

    @classmethod
    def from_spec(cls, spec):
        kids = dict((name, layer_from_config(child)) for name, child in spec.get("children", []))
        return cls(kids["body"], kids.get("shortcut"))

    def children(self):
        kids = [("body", self.body)]
        if self.shortcut is not None:
            kids.append(("shortcut", self.shortcut))
        return kids

    def forward(self, x, train=False):
        out = self.body.forward(x, train)
        skip = x if self.shortcut is None else self.shortcut.forward(x, train)
        if out.shape != skip.shape:
            raise ValueError(
                f"Residual body output {out.shape} and shortcut output {skip.shape} differ; "
                "give the block a projection shortcut"
            )
        return out + skip

    def backward(self, dout):
        dx = self.body.backward(dout)
        if self.shortcut is None:
            return dx + dout
        return dx + self.shortcut.backward(dout)

    def output_shape(self, input_shape):
        return self.body.output_shape(input_shape)


@register_layer
class Concat(_Composite):
    """Parallel branches on one input, concatenated along the channel axis (inception blocks)."""

    def __init__(self, branches):
        if not branches:
            raise ValueError("Concat needs at least one branch, got none")
        self.branches = [_as_sequential(b, f"branches[{i}]") for i, b in enumerate(branches)]

    @classmethod
    def from_spec(cls, spec):
        return cls([layer_from_config(child) for _, child in spec.get("children", [])])

    def children(self):
        return [(str(i), b) for i, b in enumerate(self.branches)]

    def forward(self, x, train=False):
        xp = get_array_module(x)
        outs = [b.forward(x, train) for b in self.branches]
        self._cache_sizes = [o.shape[1] for o in outs]
        return xp.concatenate(outs, axis=1)

    def backward(self, dout):
        dx = None
        start = 0
        for branch, size in zip(self.branches, self._cache_sizes):
            part = branch.backward(dout[:, start:start + size])
            dx = part if dx is None else dx + part
            start += size
        return dx

    def output_shape(self, input_shape):
        shapes = [b.output_shape(input_shape) for b in self.branches]
        return (shapes[0][0], sum(s[1] for s in shapes)) + tuple(shapes[0][2:])
