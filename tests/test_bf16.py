"""The emulated bfloat16 backward of binary layers (lowbit.bf16): the rounding, and that it changes
only ``dy`` of layers with +-1 weights, only when asked."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowbit.bf16 import bf16_backward, bf16_backward_enabled, round_bfloat16
from lowbit.quant_layers import QuantAffine, QuantConv2D


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
    with bf16_backward():
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
