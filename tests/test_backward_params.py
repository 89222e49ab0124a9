"""``Model.backward(dout, input_grad=False)``: the parameter gradients of a full backward, bit for
bit, without the first layer's input gradient (a training step discards it)."""
import contextlib

import numpy as np
import pytest

from lowbit.functions import reference_ops
from lowbit.layers import Affine, BatchNorm, Conv2D, Flatten, MaxPool2D, ReLU, Rescale, Residual
from lowbit.model import Model
from lowbit.quant_layers import QuantAffine, QuantConv2D


def _conv_model():
    return Model([Conv2D(1, 16, 3, padding=1, seed=0), ReLU(), MaxPool2D(2, 2), Conv2D(16, 16, 3, padding=1, seed=1),
                  ReLU(), Flatten(), Affine(16 * 7 * 7, 10, seed=2)], input_shape=(1, 14, 14))


def _binary_model():
    return Model([QuantConv2D(1, 16, 3, padding=1, input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                              bias=False, seed=0),
                  BatchNorm(16), QuantConv2D(16, 16, 3, padding=1, input_quantizer="ste_sign",
                                             kernel_quantizer="ste_sign", bias=False, seed=1),
                  Flatten(), QuantAffine(16 * 14 * 14, 10, seed=2)], input_shape=(1, 14, 14))


def _mlp():
    return Model([Rescale(2.0, -1.0), Flatten(), Affine(196, 32, seed=0), ReLU(), Affine(32, 10, seed=1)],
                 input_shape=(1, 14, 14))


def _residual_first():
    body = [Conv2D(1, 1, 3, padding=1, seed=0), ReLU()]
    return Model([Residual(body), Flatten(), Affine(196, 10, seed=1)], input_shape=(1, 14, 14))


def _gradients(model):
    return {path: getattr(layer, "d" + attr).copy() for path, layer, attr in model.parameters()}


def _forbid(monkeypatch, obj, name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{name} ran although the input gradient is not needed")

    monkeypatch.setattr(obj, name, refuse)


@pytest.mark.parametrize("build", [_conv_model, _binary_model, _mlp, _residual_first])
@pytest.mark.parametrize("fast", [True, False])
def test_parameter_gradients_equal_a_full_backward(build, fast, monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 1, 14, 14)).astype(np.float32)
    dout = rng.standard_normal((4, 10)).astype(np.float32)
    model = build()

    def run(input_grad):
        model.forward(x, train=True)
        return model.backward(dout, input_grad=input_grad)

    with contextlib.nullcontext() if fast else reference_ops():
        dx = run(True)
        assert dx.shape == x.shape
        full = _gradients(model)
        model.zero_grads()
        first = model.layers[0]
        if not isinstance(first, Residual):  # a container keeps its full backward
            for layer in model.layers[:next(i for i, la in enumerate(model.layers) if la.has_parameters())]:
                _forbid(monkeypatch, layer, "backward")  # leading layers without parameters: skipped
            parametrized = next(la for la in model.layers if la.has_parameters())
            _forbid(monkeypatch, parametrized, "input_grad")
        assert run(False) is None
    skipped = _gradients(model)
    assert skipped.keys() == full.keys()
    for path in full:
        np.testing.assert_array_equal(skipped[path], full[path], err_msg=path)


def test_layer_default_backward_params_runs_backward():
    layer = BatchNorm(3)
    x = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    dout = np.ones_like(x)
    layer.forward(x, train=True)
    layer.backward(dout)
    expected = layer.dgamma.copy(), layer.dbeta.copy()
    layer.forward(x, train=True)
    assert layer.backward_params(dout) is None
    np.testing.assert_array_equal(layer.dgamma, expected[0])
    np.testing.assert_array_equal(layer.dbeta, expected[1])
