"""The few-channel float convolution (``lowbit.kernels.few_channel_conv``) and its two uses: the
simulation's inference forward of a first convolution, and the packed model's fused first stage
(convolution + BatchNorm/sign thresholds + pack), whose bits must equal the simulation's."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import reference
from lowbit import functions as F
from lowbit.convert import convert
from lowbit.functions import reference_ops
from lowbit.kernels import float_ops, threshold_signs
from lowbit.kernels.few_channel_conv import few_channel_conv2d, few_channel_conv2d_threshold
from lowbit.layers import BatchNorm, Conv2D, Flatten, MaxPool2D, ReLU
from lowbit.model import Model
from lowbit.quant_layers import QuantAffine, QuantConv2D
from lowbit.quantizers import quantizer_for_bits
from test_convert import assert_exact, images, kinds, stress_batchnorm
from lowbit import zoo


def operands(seed, batch, channels, outputs, kernel, stride, padding, size, bias):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, channels, size, size)).astype(np.float32)
    x.reshape(-1)[::7] = 0.0
    w = rng.standard_normal((outputs, channels, kernel, kernel)).astype(np.float32)
    b = rng.standard_normal(outputs).astype(np.float32) if bias else None
    return x, w, b


# (channels, kernel, stride): each triple compiles kernels of its own (a second or two), so a few
KERNELS = [(1, 3, 1), (1, 3, 2), (3, 3, 1), (2, 5, 2), (4, 1, 1), (3, 2, 3)]


@given(seed=st.integers(0, 2 ** 16), batch=st.integers(1, 4), shape=st.sampled_from(KERNELS),
       outputs=st.sampled_from([1, 5, 32, 70]), padding=st.integers(0, 4), size=st.integers(1, 12),
       bias=st.booleans())
def test_kernel_matches_the_float64_reference_and_its_fused_variant_bit_for_bit(
        seed, batch, shape, outputs, padding, size, bias):
    channels, kernel, stride = shape
    size = max(size, kernel - 2 * padding)  # the window fits
    x, w, b = operands(seed, batch, channels, outputs, kernel, stride, padding, size, bias)
    out = few_channel_conv2d(x, w, b, stride, padding)
    expected = reference.conv2d_direct(x, w, stride, padding) + (0 if b is None else b[:, None, None])
    assert out.transpose(1, 0, 2, 3).flags.c_contiguous  # (O, N, OH, OW): the im2col path's layout
    scale = reference.conv2d_direct(np.abs(x), np.abs(w), stride, padding) + (0 if b is None else np.abs(b)[:, None, None])
    taps = channels * kernel * kernel + 1  # + the bias: float32 rounding of a sum of that many products
    assert np.all(np.abs(out - expected) <= (taps + 1) * 2.0 ** -23 * scale)
    rng = np.random.default_rng(seed + 1)
    threshold = rng.standard_normal(outputs).astype(np.float32)
    threshold[::3] = out[0, ::3, 0, 0]  # ties: the value itself
    direction = rng.choice(np.array([-1, 1], np.int8), outputs)
    fused = few_channel_conv2d_threshold(x, w, b, stride, padding, threshold, direction)
    np.testing.assert_array_equal(fused, threshold_signs(out, threshold, direction))


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_does_not_depend_on_the_thread_count(threads):
    x, w, b = operands(3, 7, 3, 16, 3, 1, 1, 10, True)
    previous = float_ops.set_threads(threads)
    try:
        got = few_channel_conv2d(x, w, b, 1, 1)
    finally:
        float_ops.set_threads(previous)
    np.testing.assert_array_equal(got, few_channel_conv2d(x, w, b, 1, 1))


def test_kernel_rejects_bad_arguments_by_name():
    x, w, b = operands(0, 2, 1, 4, 3, 1, 1, 6, True)
    with pytest.raises(TypeError, match="x must have dtype float32"):
        few_channel_conv2d(x.astype(np.float64), w, b, 1, 1)
    with pytest.raises(ValueError, match="x must have 1 channels"):
        few_channel_conv2d(np.zeros((2, 2, 6, 6), np.float32), w, b, 1, 1)
    with pytest.raises(ValueError, match="bias must have shape"):
        few_channel_conv2d(x, w, b[:2], 1, 1)
    with pytest.raises(ValueError, match="does not fit"):
        few_channel_conv2d(np.ascontiguousarray(x[:, :, :1, :1]), w, b, 1, 0)
    with pytest.raises(ValueError, match="threshold must have shape"):
        few_channel_conv2d_threshold(x, w, b, 1, 1, np.zeros(3, np.float32), np.ones(4, np.int8))
    with pytest.raises(ValueError, match="NaN"):
        x[0, 0, 2, 2] = np.nan
        few_channel_conv2d_threshold(x, w, b, 1, 1, np.zeros(4, np.float32), np.ones(4, np.int8))


@given(seed=st.integers(0, 2 ** 16), shape=st.sampled_from([k for k in KERNELS if k[1] == 3]),
       padding=st.integers(0, 2), bias=st.booleans())
def test_inference_forward_runs_the_kernel_within_rounding_of_the_reference(seed, shape, padding, bias):
    channels, _, stride = shape
    layer = Conv2D(channels, 12, 3, stride=stride, padding=padding, bias=bias, seed=seed)
    if bias:
        layer.b = np.random.default_rng(seed).standard_normal(12).astype(np.float32)
    x = np.random.default_rng(seed + 1).standard_normal((3, channels, 9, 9)).astype(np.float32)
    got = layer.forward(x, train=False)
    assert F.few_channel_conv_available(x, layer.W, padding)
    np.testing.assert_array_equal(got, few_channel_conv2d(x, layer.W, layer.b if bias else None, stride, padding))
    with reference_ops():
        expected = layer.forward(x, train=False)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert got.strides == expected.strides  # the im2col path's layout


def test_backward_after_an_inference_forward_matches_the_training_path():
    layer = Conv2D(2, 8, 3, padding=1, seed=4)
    x = np.random.default_rng(4).standard_normal((2, 2, 7, 7)).astype(np.float32)
    dout = np.random.default_rng(5).standard_normal((2, 8, 7, 7)).astype(np.float32)
    layer.forward(x, train=True)
    dx = layer.backward(dout)
    dw = layer.dW.copy()
    layer.forward(x, train=False)
    np.testing.assert_array_equal(layer.backward(dout), dx)
    np.testing.assert_array_equal(layer.dW, dw)


def first_conv_cnn(stride, bias, channels=1, outputs=24, size=12):
    """A binary CNN whose float first convolution has ``stride`` and ``bias``; 8-bit inputs."""
    out_size = (size + 2 - 3) // stride + 1
    binary = dict(bias=False, input_quantizer="ste_sign", kernel_quantizer="ste_sign")
    layers = [QuantConv2D(channels, outputs, 3, stride=stride, padding=1, bias=bias, seed=1,
                          input_quantizer=quantizer_for_bits(8, "activation")),
              BatchNorm(outputs),
              QuantConv2D(outputs, 16, 3, padding=1, seed=2, **binary), MaxPool2D(2, 2), BatchNorm(16),
              Flatten(), QuantAffine(16 * (out_size // 2) ** 2, 10, seed=3, **binary), BatchNorm(10)]
    model = Model(layers, input_shape=(channels, size, size))
    if bias:
        layers[0].b = np.random.default_rng(0).standard_normal(outputs).astype(np.float32)
    return stress_batchnorm(model)


@pytest.mark.parametrize("stride, bias, channels, outputs", [(1, False, 1, 24), (2, False, 1, 24), (1, True, 3, 70),
                                                             (2, True, 2, 64)])
def test_fused_first_stage_gives_the_simulations_bits_and_scores(stride, bias, channels, outputs):
    model = first_conv_cnn(stride, bias, channels, outputs)
    packed = convert(model)
    assert kinds(packed)[:2] == ["float", "pack"]
    fused = packed._plan()[0]
    assert fused.__name__ == "conv_pack"
    x = images(37, shape=(channels, 12, 12))
    # the bits: the fused step against the two stages it stands for
    np.testing.assert_array_equal(fused(x), packed.stages[1].run(packed.stages[0].run(x)))
    assert_exact(model, packed, x, batch_size=16)
    with reference_ops():  # im2col in the simulation: the fused step steps aside, still equal
        assert_exact(model, packed, x, batch_size=16)


def test_converted_binary_cnn_is_exact_with_the_fused_first_stage():
    model = stress_batchnorm(zoo.binary_cnn(channels=(32, 8, 16, 8), hidden=16))
    packed = convert(model)
    assert packed._plan()[0].__name__ == "conv_pack"
    x = images(60)
    assert_exact(model, packed, x, batch_size=25)
    np.testing.assert_array_equal(packed.predict(x), model.predict(x))
