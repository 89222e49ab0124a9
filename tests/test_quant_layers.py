"""Quantized layer tests: straight-through gradients, random generators, constraints, model files,
quantized twins, the zoo's binary networks and a small learning task."""
import time

import numpy as np
import pytest
from hypothesis import given, strategies as st

from lowbit import load_model, save_model, zoo
from lowbit.backend import cupy, gpu_available
from lowbit.layers import (
    LAYERS, Affine, BatchNorm, Concat, Conv2D, Dropout, Flatten, MaxPool2D, ReLU, Residual,
    layer_from_config,
)
from lowbit.losses import SoftmaxCrossEntropy
from lowbit.model import Model
from lowbit.optimizers import SGD, Adam
from lowbit.quant_layers import QuantActivation, QuantAffine, QuantConv2D, glorot_lr_factor
from lowbit.quantize import quantized_twin
from lowbit.quantizers import (
    DoReFaActivation, DoReFaWeight, Fp16, Identity, SteSign, StochasticBinary,
)
from gradcheck import as_float64, check_layer_gradients


def sign(a):
    """sign with sign(0) = +1, rebuilt from np.sign."""
    return (np.sign(a) + (a == 0)).astype(a.dtype)


def uniform(shape, low=-1.5, high=1.5, seed=0, dtype=np.float32):
    a = np.random.default_rng(seed).uniform(low, high, shape).astype(dtype)
    a.flat[::7] = 0  # exact zeros: sign(0) = +1
    return a


# -- straight-through gradients ----------------------------------------------------------------------
@given(st.integers(1, 6), st.integers(1, 9), st.integers(1, 5), st.booleans(), st.integers(0, 99))
def test_quant_affine_gradients_are_straight_through(n, n_in, n_out, bias, seed):
    layer = QuantAffine(n_in, n_out, bias=bias, input_quantizer="ste_sign", kernel_quantizer="ste_sign")
    layer.W = uniform((n_in, n_out), seed=seed)
    if bias:
        layer.b = uniform((n_out,), seed=seed + 1)
    x = uniform((n, n_in), -2, 2, seed=seed + 2)
    dout = uniform((n, n_out), seed=seed + 3)
    out = layer.forward(x, train=True)
    dx = layer.backward(dout)
    xq, wq = sign(x), sign(layer.W)
    np.testing.assert_allclose(out, xq @ wq + (layer.b if bias else 0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.dW, (np.abs(layer.W) <= 1) * (xq.T @ dout), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, (np.abs(x) <= 1) * (dout @ wq.T), rtol=1e-6, atol=1e-6)
    if bias:
        np.testing.assert_allclose(layer.db, dout.sum(axis=0), rtol=1e-6)


def float_twin_conv(layer, kernel):
    conv = Conv2D(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                  padding=layer.padding, bias=layer.bias)
    conv.W = kernel
    if layer.bias:
        conv.b = layer.b
    return conv


@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 0), (1, 1, 0), (2, 2, 1)])
@pytest.mark.parametrize("scale", [None, "channel"])
def test_quant_conv_gradient_is_masked_float_gradient(k, stride, padding, scale):
    layer = QuantConv2D(3, 4, k, stride=stride, padding=padding, input_quantizer="ste_sign",
                        kernel_quantizer=SteSign(scale=scale))
    layer.W = uniform(layer.W.shape, seed=1)
    layer.b = uniform((4,), seed=2)
    x = uniform((2, 3, 6, 5), -2, 2, seed=3)
    alpha = 1 if scale is None else np.abs(layer.W).mean(axis=(1, 2, 3), keepdims=True)
    conv = float_twin_conv(layer, sign(layer.W) * alpha)
    out = layer.forward(x, train=True)
    np.testing.assert_allclose(out, conv.forward(sign(x), train=True), rtol=1e-5, atol=1e-5)
    dout = uniform(out.shape, seed=4)
    dx = layer.backward(dout)
    dx_float = conv.backward(dout)
    np.testing.assert_allclose(layer.dW, (np.abs(layer.W) <= 1) * alpha * conv.dW, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, (np.abs(x) <= 1) * dx_float, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.db, conv.db, rtol=1e-6)


def test_quant_conv_dorefa_gradient_goes_through_both_quantizers():
    layer = QuantConv2D(2, 3, 3, padding=1, input_quantizer=DoReFaActivation(3),
                        kernel_quantizer=DoReFaWeight(2), seed=0)
    x = uniform((2, 2, 5, 5), -0.5, 1.5, seed=5)
    out = layer.forward(x, train=True)
    conv = float_twin_conv(layer, DoReFaWeight(2)(layer.W))
    np.testing.assert_allclose(out, conv.forward(DoReFaActivation(3)(x)), rtol=1e-5, atol=1e-6)
    dout = uniform(out.shape, seed=6)
    dx = layer.backward(dout)
    dx_float = conv.backward(dout)
    np.testing.assert_allclose(layer.dW, DoReFaWeight(2).backward(layer.W, conv.dW), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(dx, DoReFaActivation(3).backward(x, dx_float), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_identity_quantized_layers_pass_numerical_gradient_checks(bias):
    affine = as_float64(QuantAffine(6, 4, bias=bias, seed=1))
    check_layer_gradients(affine, np.random.default_rng(0).standard_normal((5, 6)))
    conv = as_float64(QuantConv2D(2, 3, 3, stride=2, padding=1, bias=bias, seed=2))
    check_layer_gradients(conv, np.random.default_rng(1).standard_normal((2, 2, 6, 5)))


def test_fp16_layer_is_the_float_layer_at_rounded_arrays():
    layer = QuantAffine(8, 3, input_quantizer=Fp16(), kernel_quantizer=Fp16(), seed=0)
    layer.W *= 1.001  # not representable in half
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    ref = Affine(8, 3)
    ref.W = layer.W.astype(np.float16).astype(np.float32)
    ref.b = layer.b
    xh = x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(layer.forward(x, train=True), ref.forward(xh, train=True))
    dout = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_array_equal(layer.backward(dout), ref.backward(dout))
    np.testing.assert_array_equal(layer.dW, ref.dW)


# -- stochastic quantizers: one draw per step, random generators --------------------------------------
def test_stochastic_kernel_draw_is_shared_by_forward_and_backward():
    layer = QuantAffine(20, 30, kernel_quantizer=StochasticBinary(), bias=False, seed=0)
    layer.rng = np.random.default_rng(0)
    x = np.random.default_rng(1).standard_normal((5, 20)).astype(np.float32)
    out = layer.forward(x, train=True)
    wq = layer.effective_weight()
    assert set(np.unique(wq)) <= {-1.0, 1.0}
    np.testing.assert_allclose(out, x @ wq, rtol=1e-6)
    dout = np.ones_like(out)
    np.testing.assert_allclose(layer.backward(dout), dout @ wq.T, rtol=1e-6)
    layer.forward(x, train=True)
    assert not np.array_equal(layer.effective_weight(), wq)  # a new draw per forward
    np.testing.assert_array_equal(layer.forward(x, train=False), x @ sign(layer.W))


def stochastic_model():
    return Model([
        Flatten(),
        QuantAffine(4, 8, kernel_quantizer="stochastic_binary", seed=0),
        BatchNorm(8),
        QuantActivation("stochastic_binary"),
        Dropout(0.3),
        QuantAffine(8, 8, input_quantizer="stochastic_binary", kernel_quantizer="stochastic_binary"),
        QuantAffine(8, 3, kernel_quantizer="ste_sign"),
    ], input_shape=(4,))


def test_model_seed_and_rng_states_reach_stochastic_quantizers():
    model = stochastic_model()
    assert sorted(model.rng_states()) == ["1", "3", "4", "5"]  # not the deterministic layers
    assert not hasattr(model[6], "rng") and not hasattr(model[0], "rng")
    both = model[5]
    assert both.input_quantizer.rng is both.kernel_quantizer.rng  # one generator, one state
    x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    first = model.seed(5).forward(x, train=True)
    assert not np.array_equal(model.forward(x, train=True), first)
    np.testing.assert_array_equal(model.seed(5).forward(x, train=True), first)
    states = model.rng_states()
    after = model.forward(x, train=True)
    model.forward(x, train=True)
    model.set_rng_states(states)
    np.testing.assert_array_equal(model.forward(x, train=True), after)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        both.rng = 3


def test_quantizer_shared_between_layers_keeps_one_state():
    shared = StochasticBinary(seed=0)
    model = Model([QuantActivation(shared), QuantActivation(shared)], input_shape=(3,))
    model.seed(1)
    assert model[0].rng is model[1].rng is shared.rng


# -- constraints, learning-rate multipliers ----------------------------------------------------------
def test_clip_constraint_and_cache_invalidation_after_an_update():
    layer = QuantAffine(3, 2, kernel_quantizer="ste_sign", kernel_constraint="clip", seed=0)
    model = Model([layer], input_shape=(3,))
    x = np.ones((1, 3), np.float32)
    layer.forward(x, train=True)
    layer.backward(np.full((1, 2), -100.0, np.float32))  # pushes every weight up, past 1
    SGD(lr=1.0).step(model)
    assert layer.W.max() == 1 and layer.W.min() >= -1
    np.testing.assert_array_equal(layer.effective_weight(), sign(layer.W))
    free = QuantAffine(3, 2, seed=0)
    free.W[...] = 5
    free.constrain()
    assert free.W.max() == 5


@pytest.mark.parametrize("layer,fans", [
    (QuantAffine(784, 4096, glorot_lr_scale=True, init="uniform"), (784, 4096)),
    (QuantConv2D(32, 64, 3, glorot_lr_scale=True), (32 * 9, 64 * 9)),
])
def test_glorot_lr_multiplier_scales_the_update(layer, fans):
    factor = 1 / np.sqrt(1.5 / sum(fans))
    assert layer.lr_multipliers == {"W": pytest.approx(factor)} and glorot_lr_factor(*fans) == factor
    assert layer.config()["glorot_lr_scale"] is True
    model = Model([layer], input_shape=(1,))
    before = layer.W.copy()
    layer.dW = np.ones_like(layer.W)
    if layer.bias:
        layer.db = np.zeros_like(layer.b)
    SGD(lr=1e-4).step(model)
    np.testing.assert_allclose(before - layer.W, 1e-4 * factor, rtol=1e-3)
    assert not hasattr(QuantAffine(2, 2), "lr_multipliers")


# -- QuantActivation, configs, model files ----------------------------------------------------------
def test_quant_activation_forward_backward_and_config():
    layer = QuantActivation({"name": "dorefa_activation", "bits": 2, "signed": True})
    x = uniform((3, 4), -2, 2)
    np.testing.assert_array_equal(layer.forward(x, train=True), DoReFaActivation(2, signed=True)(x))
    dout = np.ones_like(x)
    np.testing.assert_array_equal(layer.backward(dout), (np.abs(x) <= 1).astype(np.float32))
    assert layer.precision == 2
    again = layer_from_config(layer.spec())
    assert again.config() == layer.config()
    assert {"QuantAffine", "QuantConv2D", "QuantActivation"} <= set(LAYERS)


def test_layer_specs_round_trip():
    layer = QuantConv2D(2, 3, 3, padding=1, bias=False, input_quantizer="ste_sign",
                        kernel_quantizer=SteSign(scale="channel"), kernel_constraint="clip",
                        glorot_lr_scale=True)
    again = layer_from_config(layer.spec())
    assert type(again) is QuantConv2D and again.config() == layer.config()
    assert again.kernel_quantizer == SteSign(scale="channel")


def trained_bn(model, seed=0):
    """One training forward so that BatchNorm running statistics are not their initial values."""
    x = np.random.default_rng(seed).random((20,) + model.input_shape).astype(np.float32)
    model.forward(x, train=True)
    return model


@pytest.mark.parametrize("build", [
    lambda: zoo.bnn_mlp(hidden=(32, 16)),
    lambda: zoo.bnn_mlp(hidden=(16,), stochastic=True),
    lambda: zoo.binary_cnn(channels=(4, 4, 8, 8), hidden=16, keep_last=False),
    lambda: zoo.tfc(weight_bits=2, act_bits=2),
    lambda: quantized_twin(zoo.mlp(hidden=(20,)), 4, 4),
])
def test_save_load_round_trip_gives_identical_predictions(tmp_path, build):
    model = trained_bn(build())
    x = np.random.default_rng(1).random((7, 1, 28, 28)).astype(np.float32)
    path = save_model(model, tmp_path / "m.npz")
    loaded = load_model(path)
    assert loaded.spec() == model.spec()
    np.testing.assert_array_equal(loaded.predict_scores(x), model.predict_scores(x))


@pytest.mark.parametrize("bad,error,match", [
    (lambda: QuantAffine(2, 2, kernel_constraint="max_norm"), ValueError,
     r"kernel_constraint must be one of \[None, 'clip'\], got 'max_norm'"),
    (lambda: QuantConv2D(1, 1, input_quantizer="sgn"), ValueError, "unknown quantizer 'sgn'; known"),
    (lambda: layer_from_config({"type": "QuantAffine", "config": {
        "in_features": 2, "out_features": 2, "kernel_quantizer": {"name": "dorefa_weight", "bits": 1}}}),
     ValueError, "DoReFaWeight bits must be an int in 2..8"),
])
def test_bad_layer_arguments(bad, error, match):
    with pytest.raises(error, match=match):
        bad()


def test_nan_input_to_a_quantized_layer_is_clear():
    with pytest.raises(ValueError, match="NaN"):
        QuantAffine(2, 2, input_quantizer="ste_sign").forward(np.array([[np.nan, 0]], np.float32))


# -- quantized_twin ----------------------------------------------------------------------------------
def kernels(model):
    return [layer for _, layer in model.named_layers() if isinstance(layer, (Affine, Conv2D))]


def test_quantized_twin_keeps_first_and_last_float_and_copies_weights():
    source = zoo.mlp(hidden=(20, 20))
    spec, weights = source.spec(), [layer.W.copy() for layer in kernels(source)]
    twin = quantized_twin(source, 1, 1)
    layers = kernels(twin)
    assert [type(layer) for layer in layers] == [QuantAffine] * 3
    assert [type(layer.kernel_quantizer) for layer in layers] == [Identity, SteSign, Identity]
    assert layers[0].input_quantizer == DoReFaActivation(8)
    assert [type(layer.input_quantizer) for layer in layers[1:]] == [SteSign, SteSign]
    assert [layer.kernel_constraint for layer in layers] == [None, "clip", None]
    assert not any(isinstance(layer, ReLU) for _, layer in twin.named_layers())  # 1-bit activations
    for new, old, w in zip(layers, kernels(source), weights):
        np.testing.assert_array_equal(new.W, w)
        assert new.W is not old.W
    assert source.spec() == spec and twin.name == "mlp_w1a1"
    assert all(type(layer) is Affine for layer in kernels(source))
    full = quantized_twin(source, 2, 3, keep_first=False, keep_last=False)
    assert all(type(layer.kernel_quantizer) is DoReFaWeight for layer in kernels(full))
    assert any(isinstance(layer, ReLU) for _, layer in full.named_layers())


def test_full_precision_twin_predicts_exactly_like_the_source():
    source = zoo.deep_convnet()
    x = np.random.default_rng(0).random((3, 1, 28, 28)).astype(np.float32)
    twin = quantized_twin(source, 32, 32, first_input_bits=32)
    np.testing.assert_array_equal(twin.predict_scores(x), source.predict_scores(x))
    half = quantized_twin(source, 16, 16)  # post-training fp16 weights and activations
    np.testing.assert_allclose(half.predict_scores(x), source.predict_scores(x), rtol=2e-2, atol=2e-2)


def test_quantized_twin_reaches_residual_and_concat_branches_depth_first():
    source = Model([
        Conv2D(1, 2, 3, padding=1, seed=0),
        Residual([Conv2D(2, 2, 3, padding=1, seed=1), ReLU()], shortcut=Conv2D(2, 2, 1, seed=2)),
        Concat([[Conv2D(2, 1, 1, seed=3)], [MaxPool2D(3, 1, 1), Conv2D(2, 1, 1, seed=4)]]),
        Flatten(), Affine(2 * 4 * 4, 3, seed=5),
    ], input_shape=(1, 4, 4))
    twin = quantized_twin(source, 1, 2, weight_scale="channel", stochastic="activations")
    layers = kernels(twin)
    assert len(layers) == 6 and all(type(layer).__name__.startswith("Quant") for layer in layers)
    assert type(layers[0].kernel_quantizer) is Identity and type(layers[-1].kernel_quantizer) is Identity
    assert all(layer.kernel_quantizer == SteSign(scale="channel") for layer in layers[1:-1])
    assert all(type(layer.input_quantizer) is DoReFaActivation for layer in layers[1:])
    x = np.random.default_rng(0).random((2, 1, 4, 4)).astype(np.float32)
    assert twin.predict_scores(x).shape == (2, 3)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(weight_bits=12, activation_bits=1), ValueError,
     "weight_bits: bits must be one of 1..8, 16, 32, got 12"),
    (dict(weight_bits=1, activation_bits=0), ValueError, "activation_bits: bits must be one of"),
    (dict(weight_bits=2, activation_bits=2, weight_scale="channel"), ValueError, "weight_scale applies"),
    (dict(weight_bits=1, activation_bits=1, stochastic="both"), ValueError, "stochastic must be"),
    (dict(weight_bits=1, activation_bits=1, kernel_constraint="max"), ValueError, "kernel_constraint"),
])
def test_quantized_twin_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        quantized_twin(zoo.mlp(hidden=(4,)), **kwargs)
    with pytest.raises(TypeError, match="model must be a lowbit Model"):
        quantized_twin([Affine(2, 2)], 1, 1)


# -- the zoo -----------------------------------------------------------------------------------------
def test_zoo_builders_are_registered_and_have_the_expected_sizes():
    assert {"bnn_mlp", "binary_cnn", "tfc", "sfc", "lfc"} <= set(zoo.MODELS)
    # bias-free dense layers + BatchNorm (gamma, beta) after each
    h = (32, 16)
    assert zoo.bnn_mlp(hidden=h).num_parameters() == 784 * 32 + 32 * 16 + 16 * 10 + 2 * (32 + 16 + 10)
    assert zoo.build_model("tfc").num_parameters() == 784 * 64 + 2 * 64 * 64 + 640 + 2 * (3 * 64 + 10)
    cnn = zoo.binary_cnn()
    convs = 9 * (32 + 32 * 32 + 32 * 64 + 64 * 64)
    assert cnn.num_parameters() == convs + 64 * 49 * 256 + 256 * 10 + 10 + 2 * (32 + 32 + 64 + 64 + 256)
    x = np.random.default_rng(0).random((2, 1, 28, 28)).astype(np.float32)
    assert cnn.predict_scores(x).shape == (2, 10)


def test_zoo_structure():
    mlp = zoo.bnn_mlp(hidden=(16, 16))
    dense = kernels(mlp)
    assert all(type(layer.input_quantizer) is Identity for layer in dense)
    assert all(type(layer.kernel_quantizer) is SteSign and not layer.bias for layer in dense)
    assert all(layer.kernel_constraint == "clip" and "W" in layer.lr_multipliers for layer in dense)
    assert type(mlp[0]).__name__ == "PixelCodes" and type(mlp[-1]) is BatchNorm
    cnn = zoo.binary_cnn(channels=(4, 4, 8, 8), hidden=16)
    convs = kernels(cnn)
    assert convs[0].input_quantizer == DoReFaActivation(8) and type(convs[0].kernel_quantizer) is Identity
    assert all(type(c.input_quantizer) is SteSign for c in convs[1:])
    assert all(type(c.kernel_quantizer) is SteSign for c in convs[1:-1])
    assert type(convs[-1].kernel_quantizer) is Identity and convs[-1].bias
    sfc = zoo.build_model("sfc", weight_bits=2, act_bits=2)
    assert sfc.name == "sfc_w2a2" and sfc[2].quantizer == DoReFaActivation(2, signed=True)
    assert all(type(layer.kernel_quantizer) is DoReFaWeight for layer in kernels(sfc))
    with pytest.raises(ValueError, match="bits must be one of 1..8, 16, 32, got 12"):
        zoo.tfc(weight_bits=12)


# -- a small learning task ---------------------------------------------------------------------------
def test_binary_mlp_learns_two_blobs():
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    x = (rng.standard_normal((200, 2)) * 0.7 + np.where(labels[:, None] == 1, 1.0, -1.0)
         * np.array([1.0, 0.5])).astype(np.float32)
    binary = dict(bias=False, kernel_quantizer="ste_sign", kernel_constraint="clip", init="glorot")
    model = Model([
        QuantAffine(2, 32, seed=1, **binary), BatchNorm(32), QuantActivation("ste_sign"),
        QuantAffine(32, 32, seed=2, **binary), BatchNorm(32), QuantActivation("ste_sign"),
        QuantAffine(32, 2, seed=3, **binary), BatchNorm(2),
    ], input_shape=(2,))
    chance = max(labels.mean(), 1 - labels.mean())
    loss, optimizer = SoftmaxCrossEntropy(), Adam(lr=0.01)
    for step in range(40):
        idx = rng.permutation(200)[:50]
        loss.forward(model.forward(x[idx], train=True), labels[idx])
        model.backward(loss.backward())
        optimizer.step(model)
    accuracy = model.evaluate(x, labels)
    assert accuracy > max(0.85, chance + 0.2), accuracy
    assert time.perf_counter() - t0 < 5


# -- the same on CuPy (skipped without a CUDA device) ------------------------------------------------
gpu = pytest.mark.skipif(not gpu_available(), reason="CuPy with a CUDA device is not available")


@gpu
@pytest.mark.parametrize("build", [
    lambda: QuantConv2D(3, 4, 3, padding=1, input_quantizer="ste_sign",
                        kernel_quantizer=SteSign(scale="channel"), seed=0),
    lambda: QuantAffine(12, 5, input_quantizer=DoReFaActivation(4), kernel_quantizer=DoReFaWeight(3),
                        seed=0),
    lambda: QuantAffine(12, 5, input_quantizer="stochastic_binary", kernel_quantizer="stochastic_binary",
                        seed=0),
])
def test_quantized_layers_on_cupy_match_numpy(build):
    host, device = build(), build()
    if hasattr(host, "rng"):
        host.rng, device.rng = np.random.default_rng(4), np.random.default_rng(4)
    device.to_device("gpu")
    x = np.random.default_rng(0).uniform(-1.5, 1.5, (2, 3, 2, 2)).astype(np.float32)
    out_h = host.forward(x, train=True)
    out_d = device.forward(cupy.asarray(x), train=True)
    np.testing.assert_allclose(cupy.asnumpy(out_d), out_h, rtol=1e-5, atol=1e-5)
    dout = np.random.default_rng(1).standard_normal(out_h.shape).astype(np.float32)
    dx_h = host.backward(dout)
    dx_d = device.backward(cupy.asarray(dout))
    np.testing.assert_allclose(cupy.asnumpy(dx_d), dx_h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cupy.asnumpy(device.dW), host.dW, rtol=1e-5, atol=1e-5)


@gpu
def test_binary_cnn_on_cupy_matches_numpy(tmp_path):
    host = trained_bn(zoo.binary_cnn(channels=(4, 4, 8, 8), hidden=16))
    device = load_model(save_model(host, tmp_path / "cnn.npz")).to_device("gpu")
    x = np.random.default_rng(0).random((5, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(device.predict_scores(x), host.predict_scores(x), rtol=1e-4, atol=1e-4)
