"""The bfloat16 backward of binary layers (lowbit.bf16): the rounding, that it changes only ``dy`` of
layers with +-1 weights, only when asked, and that its two backends (the avx512_bf16 kernel and the
emulation) agree up to summation order."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lowbit.bf16 as bf16_module
from lowbit import zoo
from lowbit.bf16 import bf16_backend, bf16_backward, bf16_backward_enabled, round_bfloat16
from lowbit.functions import reference_ops
from lowbit.kernels import bf16_available, bf16_gemm
from lowbit.quant_layers import QuantAffine, QuantConv2D

needs_bf16 = pytest.mark.skipif(not bf16_available(), reason="the CPU lacks AVX-512 BF16 (vdpbf16ps)")


def reference_round(value):
    """Round-to-nearest-even onto 8 significant bits, in float64 then back (finite, normal values)."""
    if value == 0 or not np.isfinite(value):
        return value
    mantissa, exponent = np.frexp(np.float64(value))
    scaled = mantissa * 2 ** 8
    return np.float32(np.ldexp(np.round(scaled), int(exponent) - 8))  # np.round: ties to even


@given(st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-2.0 ** 100, max_value=2.0 ** 100)
       .filter(lambda v: v == 0 or abs(v) > 1e-30))
def test_round_bfloat16_is_round_to_nearest_even(value):
    x = np.array([value], np.float32)
    assert round_bfloat16(x)[0] == reference_round(x[0])


def test_round_bfloat16_specials():
    x = np.array([np.inf, -np.inf, np.nan, -0.0, 3.4e38], np.float32)
    out = round_bfloat16(x)
    assert np.isposinf(out[0]) and np.isneginf(out[1]) and np.isnan(out[2])
    assert out[3] == 0 and np.signbit(out[3]) and np.isposinf(out[4])  # past bf16's largest: inf
    with pytest.raises(TypeError, match="float32"):
        round_bfloat16(np.zeros(3))


@pytest.mark.parametrize("make", [
    lambda: QuantAffine(40, 7, bias=False, seed=1, input_quantizer="ste_sign", kernel_quantizer="ste_sign"),
    lambda: QuantAffine(40, 7, bias=False, seed=1, kernel_quantizer="ste_sign"),
    lambda: QuantConv2D(3, 5, 3, padding=1, bias=False, seed=1, input_quantizer="ste_sign",
                        kernel_quantizer="ste_sign"),
], ids=["binary_affine", "binary_weights_float_input", "binary_conv"])
def test_bf16_backward_rounds_dy_of_binary_layers_only_when_asked(make):
    rng = np.random.default_rng(0)
    layers = [make() for _ in range(3)]
    shape = (4, 40) if isinstance(layers[0], QuantAffine) else (4, 3, 6, 6)
    x = rng.standard_normal(shape).astype(np.float32)
    outs = [layer.forward(x, train=True) for layer in layers]
    dout = rng.standard_normal(outs[0].shape).astype(np.float32)
    assert not bf16_backward_enabled()
    plain = layers[0].backward(dout)
    with bf16_backward(backend="emulated"):
        emulated = layers[1].backward(dout)
    assert not bf16_backward_enabled()
    by_hand = layers[2].backward(round_bfloat16(dout))
    np.testing.assert_array_equal(emulated, by_hand)
    np.testing.assert_array_equal(layers[1].dW, layers[2].dW)
    assert not np.array_equal(layers[0].dW, layers[1].dW)  # the rounding did change dW
    np.testing.assert_allclose(layers[1].dW, layers[0].dW, rtol=0.05, atol=0.05 * np.abs(layers[0].dW).max())
    assert plain.shape == emulated.shape


def test_bf16_backward_leaves_float_layers_alone():
    layers = [QuantAffine(8, 3, seed=2, kernel_quantizer="dorefa_weight") for _ in range(2)]
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    dout = np.random.default_rng(2).standard_normal((5, 3)).astype(np.float32)
    for layer in layers:
        layer.forward(x, train=True)
    layers[0].backward(dout)
    with bf16_backward():
        layers[1].backward(dout)
    np.testing.assert_array_equal(layers[0].dW, layers[1].dW)


AFFINES = {
    "binary_affine": lambda: QuantAffine(70, 130, bias=False, seed=1, input_quantizer="ste_sign",
                                         kernel_quantizer="ste_sign"),
    "binary_weights_float_input": lambda: QuantAffine(70, 130, bias=True, seed=1, kernel_quantizer="ste_sign"),
}


def affine_case(name, x_kind):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((33, 70)).astype(np.float32)
    if x_kind == "dropout":  # dropout's {0, +-2} on +-1 activations: bfloat16 holds it
        x = np.where(rng.random(x.shape) < 0.5, 0.0, 2.0 * np.sign(x)).astype(np.float32)
    layers = [AFFINES[name]() for _ in range(3)]
    for layer in layers:
        layer.forward(x, train=True)
    dout = (rng.standard_normal((33, 130)) * 1e-3).astype(np.float32)
    return layers, x, dout


@pytest.mark.parametrize("name, x_kind", [("binary_affine", "float"), ("binary_weights_float_input", "dropout"),
                                          ("binary_weights_float_input", "float")])
def test_bf16_backward_off_is_the_float32_backward(name, x_kind):
    layers, x, dout = affine_case(name, x_kind)
    dx = layers[0].backward(dout)
    w = layers[0].effective_weight()
    np.testing.assert_array_equal(dx, layers[0].input_grad(dout @ w.T))
    np.testing.assert_array_equal(layers[0].dW, layers[0].weight_grad(layers[0]._cache_x.T @ dout))


@needs_bf16
@pytest.mark.parametrize("name, x_kind", [("binary_affine", "float"), ("binary_weights_float_input", "dropout"),
                                          ("binary_weights_float_input", "float")])
def test_bf16_backward_runs_the_dense_products_on_the_kernel(name, x_kind):
    layers, x, dout = affine_case(name, x_kind)
    assert bf16_backend() == "avx512_bf16"
    with bf16_backward():
        dx = layers[0].backward(dout)
    with bf16_backward(backend="emulated"):
        assert bf16_backend() == "emulated"
        dx_emulated = layers[1].backward(dout)
    rounded = round_bfloat16(dout)
    w, xq = layers[0].effective_weight(), layers[0]._cache_x
    np.testing.assert_array_equal(dx, layers[0].input_grad(bf16_gemm(rounded, w.T)))
    exact_input = name == "binary_affine" or x_kind == "dropout"
    dw_product = bf16_gemm(xq.T, rounded) if exact_input else xq.T @ rounded  # pixels: float32, as emulated
    np.testing.assert_array_equal(layers[0].dW, layers[0].weight_grad(dw_product))
    if layers[0].bias:
        np.testing.assert_array_equal(layers[0].db, layers[1].db)  # summed from the rounded dy in both
    # the same values multiplied, summed in another order: float32 rounding apart
    np.testing.assert_allclose(dx, dx_emulated, rtol=0, atol=1e-6 * np.abs(dx_emulated).max())
    np.testing.assert_allclose(layers[0].dW, layers[1].dW, rtol=0, atol=1e-6 * np.abs(layers[1].dW).max())


def test_bf16_backward_falls_back_to_the_emulation(monkeypatch):
    monkeypatch.setattr(bf16_module, "_kernel_available", lambda: False)
    assert bf16_backend() == "emulated"
    with pytest.raises(RuntimeError, match="AVX-512 BF16"):
        with bf16_backward(backend="avx512_bf16"):
            pass
    layers, x, dout = affine_case("binary_affine", "float")
    with bf16_backward():
        dx = layers[0].backward(dout)
    np.testing.assert_array_equal(dx, layers[1].backward(round_bfloat16(dout)))
    np.testing.assert_array_equal(layers[0].dW, layers[1].dW)


def test_bf16_backend_argument_and_reference_ops():
    with pytest.raises(ValueError, match="backend must be None or one of"):
        with bf16_backward(backend="amx"):
            pass
    with reference_ops():
        assert bf16_backend() == "emulated"


def training_step_grads(backend, enabled=True):
    """The parameter gradients of one training step of a small bnn_mlp (dropout, first layer on pixels)."""
    model = zoo.bnn_mlp(hidden=(96, 70), seed=3)
    rng = np.random.default_rng(4)
    x = rng.random((40, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, 40)
    model.seed(7)
    scores = model.forward(x, train=True)
    dout = (np.exp(scores - scores.max(1, keepdims=True)) / np.exp(scores - scores.max(1, keepdims=True)).sum(
        1, keepdims=True)).astype(np.float32)
    dout[np.arange(40), labels] -= 1
    with bf16_backward(enabled, backend=backend):
        model.backward(dout / 40, input_grad=False)
    return {path: getattr(layer, "d" + attr).copy() for path, layer, attr in model.parameters()}


@needs_bf16
def test_a_training_step_on_the_kernel_is_close_to_the_emulated_one(monkeypatch):
    import lowbit.kernels

    calls = []
    monkeypatch.setattr(lowbit.kernels, "bf16_gemm", lambda a, b: calls.append(a.shape) or bf16_gemm(a, b))
    real = training_step_grads(None)
    # of the three layers: the dW and dx products of the two on dropout's {0, +-2} (the first layer's dW
    # on its pixels stays float32, its input gradient is skipped)
    assert len(calls) == 4
    emulated, plain = training_step_grads("emulated"), training_step_grads(None, False)
    assert len(calls) == 4
    assert real.keys() == emulated.keys() == plain.keys()
    for key in real:
        scale = np.abs(emulated[key]).max()
        # summation order only: within a few float32 ulps of the largest gradient, where the bf16 rounding
        # of dy itself moves the gradients by up to about 2^-9 of it
        np.testing.assert_allclose(real[key], emulated[key], rtol=0, atol=1e-5 * scale, err_msg=key)
        np.testing.assert_allclose(real[key], plain[key], rtol=0, atol=2e-2 * scale, err_msg=key)
    assert any(not np.array_equal(real[key], plain[key]) for key in real)
