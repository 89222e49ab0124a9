"""Packed models (lowbit.convert, lowbit.packed): conversion is exact against the training-time
simulation, files round-trip and refuse tampering, integer codes, post-training quantization."""
import os
import types

import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from lowbit import load_model, save_model, zoo
from lowbit.backend import gpu_available
from lowbit.data import float_images
from lowbit.kernels import pack_signs
from lowbit.cli.convert import convert_command
from lowbit.cli.quantize import quantize_command
from lowbit.convert import compare_predictions, convert
from lowbit.ptq import mse_activation_range, mse_weight_range, post_training_quantize
from lowbit.io import ModelFileError, read_archive, write_archive
from lowbit.layers import (
    Affine, BatchNorm, Conv2D, Dropout, Flatten, MaxPool2D, ReLU, Rescale, Residual,
)
from lowbit.losses import SoftmaxCrossEntropy
from lowbit.model import Model
from lowbit.optimizers import Adam
from lowbit.packed import (
    IntMaxPoolStage, PackedModel, kernel_channel_axis, ThresholdStage, make_spec, decode_kernel, encode_kernel, load_any, load_packed, pack_codes, unpack_codes,
)
from lowbit.quant_layers import QuantActivation, QuantAffine, QuantConv2D
from lowbit.quantizers import (
    DoReFaActivation, DoReFaWeight, Fp16, SteSign, StochasticBinary, UniformWeight, quantize_k,
)


# -- helpers -----------------------------------------------------------------------------------------
def images(n, seed=0, shape=(1, 28, 28)):
    """Images in [0, 1] with exact 0.5 pixels (Rescale(2, -1) maps them to 0: sign(0) = +1) and 0s."""
    x = np.random.default_rng(seed).random((n,) + shape, dtype=np.float32)
    x.reshape(n, -1)[:, ::5] = 0.5
    x.reshape(n, -1)[:, 1::11] = 0.0
    return x


def stress_batchnorm(model, seed=0):
    """BatchNorm statistics that put sign flips on attainable integers: integer means with beta = 0
    (BN(acc) is exactly 0 there), negative and zero gamma, small and large variances."""
    rng = np.random.default_rng(seed)
    for _, layer in model.named_layers():
        if isinstance(layer, BatchNorm):
            c = layer.num_features
            layer.gamma = (rng.choice([-1.0, 1.0], c) * rng.uniform(0.2, 3.0, c)).astype(np.float32)
            layer.gamma[::6] = 0.0
            layer.beta = np.where(rng.random(c) < 0.5, 0.0, rng.normal(0, 1, c)).astype(np.float32)
            halves = np.where(rng.random(c) < 0.2, 0.5, 0.0)
            layer.running_mean = (rng.integers(-8, 9, c) + halves).astype(np.float32)
            layer.running_var = rng.uniform(0.25, 40.0, c).astype(np.float32)
    return model


def assert_exact(model, packed, x, batch_size=100):
    """Scores bit for bit: every packed model here ends with an integer-exact or float tail that
    repeats the simulation's own operations."""
    expected = model.predict_scores(x, batch_size)
    got = packed.predict_scores(x, batch_size)
    np.testing.assert_array_equal(got, expected)


def kinds(packed):
    return [stage.kind for stage in packed.stages]


def fake_mnist(n_train=300, n_test=200, seed=0):
    rng = np.random.default_rng(seed)
    prototypes = rng.random((10, 28, 28)) < 0.3

    def draw(n):
        y = rng.integers(0, 10, n)
        noisy = prototypes[y] ^ (rng.random((n, 28, 28)) < 0.1)
        return (noisy * 255).astype(np.uint8), y.astype(np.int64)

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return types.SimpleNamespace(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def as_images(x_uint8):
    return (x_uint8.astype(np.float32) / np.float32(255))[:, None]


# -- the zoo's binary networks -------------------------------------------------------------------------
ZOO = {
    "bnn_mlp": (lambda: zoo.bnn_mlp(hidden=(128, 70)),
                ["bitplane_dense", "binary_dense", "threshold", "binary_dense", "acc_to_float", "float"]),
    "bnn_mlp_stochastic": (lambda: zoo.bnn_mlp(hidden=(70,), stochastic=True),
                           ["bitplane_dense", "binary_dense", "acc_to_float", "float"]),
    "bnn_mlp_rescale": (lambda: zoo.bnn_mlp(hidden=(70,), input_bits=None),
                        ["float", "pack", "binary_dense", "acc_to_float", "float"]),
    "binary_cnn": (lambda: zoo.binary_cnn(channels=(8, 8, 16, 70), hidden=32),
                   ["float", "pack", "binary_conv", "threshold_maxpool", "binary_conv",
                    "threshold", "binary_conv", "threshold_maxpool", "flatten", "binary_dense",
                    "threshold", "unpack", "float"]),
    "binary_cnn_binary_last": (
        lambda: zoo.binary_cnn(channels=(70, 8, 64, 8), hidden=70, keep_last=False, dropout=0.2),
        ["float", "pack", "binary_conv", "threshold_maxpool", "binary_conv", "threshold",
         "binary_conv", "threshold_maxpool", "flatten", "binary_dense", "threshold",
         "binary_dense", "acc_to_float", "float"]),
    "tfc": (lambda: zoo.tfc(),
            ["float", "pack"] + ["binary_dense", "threshold"] * 3
            + ["binary_dense", "acc_to_float", "float"]),
    "tfc_w2a2": (lambda: zoo.tfc(weight_bits=2, act_bits=2), ["float"]),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_convert_exactly(name):
    build, expected_kinds = ZOO[name]
    model = stress_batchnorm(build())
    packed = convert(model)
    assert kinds(packed) == expected_kinds
    assert_exact(model, packed, images(150))


def test_small_trained_model_converts_exactly():
    """bnn_mlp and binary_cnn trained a few dozen steps on synthetic digits: same labels and scores."""
    data = fake_mnist(n_train=256, n_test=200)
    x_train, y_train = as_images(data.x_train), data.y_train
    for model, steps in ((zoo.bnn_mlp(hidden=(64, 64), init="glorot"), 60),
                         (zoo.binary_cnn(channels=(8, 8, 16, 16), hidden=32), 16)):
        loss, optimizer = SoftmaxCrossEntropy(), Adam(lr=0.01)
        rng = np.random.default_rng(0)
        for _ in range(steps):
            batch = rng.choice(len(x_train), 32, replace=False)
            loss.forward(model.forward(x_train[batch], train=True), y_train[batch])
            model.backward(loss.backward())
            optimizer.step(model)
        x_test = as_images(data.x_test)
        assert model.evaluate(x_test, data.y_test) > 0.3  # it learned something
        packed = convert(model)
        assert "binary_dense" in kinds(packed)
        result = compare_predictions(model, packed, x_test)
        assert result["labels_equal"] == len(x_test) and result["scores_identical"]


# -- random binary stacks (hypothesis) -----------------------------------------------------------------
def _binary_affine(n_in, n_out, bias, seed):
    layer = QuantAffine(n_in, n_out, bias=bias, input_quantizer="ste_sign", kernel_quantizer="ste_sign")
    rng = np.random.default_rng(seed)
    layer.W = rng.normal(0, 1, (n_in, n_out)).astype(np.float32)
    layer.W.flat[::9] = 0.0  # sign(0) = +1
    if bias:
        layer.b = np.round(rng.normal(0, 3, n_out) * 2).astype(np.float32) / 2  # half-integers: ties
    return layer


@given(st.integers(1, 150), st.lists(st.integers(1, 130), min_size=1, max_size=3), st.booleans(),
       st.sampled_from(["none", "relu", "rescale", "dropout"]), st.integers(0, 2 ** 16))
def test_random_dense_stacks_convert_exactly(n_in, widths, bias, extra, seed):
    layers = []
    width = n_in
    for i, w in enumerate(widths):
        layers += [_binary_affine(width, w, bias, seed + i), BatchNorm(w)]
        layers += {"none": [], "relu": [ReLU()], "rescale": [Rescale(-0.5, 0.25)],
                   "dropout": [Dropout(0.3)]}[extra]
        width = w
    layers += [_binary_affine(width, 3, False, seed + 99), BatchNorm(3)]
    model = stress_batchnorm(Model(layers, input_shape=(n_in,)), seed)
    x = np.random.default_rng(seed).normal(0, 1, (30, n_in)).astype(np.float32)
    x[:, ::4] = 0.0
    packed = convert(model)
    assert kinds(packed).count("threshold") == len(widths)
    assert_exact(model, packed, x)


def _binary_conv(c_in, c_out, k, stride, padding, seed):
    layer = QuantConv2D(c_in, c_out, k, stride=stride, padding=padding, bias=False,
                        input_quantizer="ste_sign", kernel_quantizer="ste_sign")
    layer.W = np.random.default_rng(seed).normal(0, 1, layer.W.shape).astype(np.float32)
    return layer


@given(st.sampled_from([1, 3, 8, 64, 70]), st.integers(3, 8), st.sampled_from([1, 5, 64, 70]),
       st.integers(1, 3), st.integers(1, 2), st.integers(0, 1),
       st.sampled_from(["none", "pool_before_bn", "pool_after_bn", "pool_after_relu"]), st.booleans(),
       st.integers(0, 2 ** 16))
def test_random_conv_stacks_convert_exactly(c_in, size, c_mid, k, stride, padding, pool, pad_pool, seed):
    """conv -> [pool] BN [pool] -> (sign) conv -> BN -> flatten -> (sign) dense -> BN, with C not a
    multiple of 64, pools on either side of a BatchNorm with negative gamma, zero padding."""
    conv1 = _binary_conv(c_in, c_mid, k, stride, padding, seed)
    layers = [conv1]
    pool_layer = MaxPool2D(2, stride=2 if not pad_pool else 1, padding=1 if pad_pool else 0)
    if pool == "pool_before_bn":
        layers += [pool_layer, BatchNorm(c_mid)]
    elif pool == "pool_after_bn":
        layers += [BatchNorm(c_mid), pool_layer]
    elif pool == "pool_after_relu":
        layers += [BatchNorm(c_mid), ReLU(), pool_layer]
    else:
        layers += [BatchNorm(c_mid)]
    model = Model(layers, input_shape=(c_in, size, size))
    try:
        shape = model.output_shape((1, c_in, size, size))
        conv2 = _binary_conv(c_mid, 6, 3, 1, 1, seed + 1)
        shape = conv2.output_shape(shape)
    except ValueError:
        assume(False)
    flat = int(np.prod(shape[1:]))
    model.layers += [conv2, BatchNorm(6), Flatten(), _binary_affine(flat, 4, False, seed + 2), BatchNorm(4)]
    stress_batchnorm(model, seed)
    x = np.random.default_rng(seed).normal(0, 1, (12, c_in, size, size)).astype(np.float32)
    x[:, :, ::3] = 0.0
    packed = convert(model)
    assert kinds(packed).count("binary_conv") + kinds(packed).count("float") >= 2
    assert_exact(model, packed, x, batch_size=5)


# -- what is fused, what falls back --------------------------------------------------------------------
def _pool_model(first_gamma, second_gamma):
    conv = _binary_conv(3, 4, 3, 1, 1, 0)
    bn1, bn2 = BatchNorm(4), BatchNorm(4)
    model = Model([conv, bn1, MaxPool2D(2), bn2, QuantActivation("ste_sign"), Flatten(),
                   _binary_affine(4 * 4 * 4, 2, False, 1), BatchNorm(2)], input_shape=(3, 8, 8))
    stress_batchnorm(model)
    for bn, gamma in ((bn1, first_gamma), (bn2, second_gamma)):
        bn.gamma = np.full(4, gamma, np.float32)
        bn.beta = np.array([0.0, 0.3, -0.3, 1.0], np.float32)
    return model


@pytest.mark.parametrize("first_gamma, second_gamma, expected", [
    (1.0, -2.0, "threshold_maxpool"),  # non-decreasing before the pool: pool the integers
    (-1.0, 2.0, "packed_maxpool"),    # decreasing before, increasing after: OR the sign bits
    (-1.0, -2.0, None),               # decreasing on both sides: no fusion, float tail
])
def test_pool_inside_the_fused_chain(first_gamma, second_gamma, expected):
    model = _pool_model(first_gamma, second_gamma)
    packed = convert(model)
    if expected is None:
        assert "acc_to_float" in kinds(packed) and any("not monotone the same way" in n for n in packed.notes)
    else:
        assert expected in kinds(packed)
    assert_exact(model, packed, np.random.default_rng(3).normal(0, 1, (40, 3, 8, 8)).astype(np.float32))


def test_scaled_binary_kernels():
    """XNOR-Net scales: exact only when every j * alpha is a float32; otherwise a float stage."""
    def build(alpha_bits):
        rng = np.random.default_rng(0)
        layers = [QuantActivation("ste_sign")]
        for n_in, n_out in ((30, 20), (20, 5)):
            layer = QuantAffine(n_in, n_out, input_quantizer="ste_sign",
                                kernel_quantizer=SteSign(scale="channel"))
            w = rng.normal(0, 1, (n_in, n_out)).astype(np.float32)
            if alpha_bits:
                alpha = np.round(np.abs(w).mean(axis=0) * 2 ** alpha_bits) / 2 ** alpha_bits
                w = np.where(w >= 0, alpha, -alpha).astype(np.float32)
            layer.W = w
            layers += [layer, BatchNorm(n_out)]
        return stress_batchnorm(Model(layers, input_shape=(30,)))

    x = np.random.default_rng(1).normal(0, 1, (50, 30)).astype(np.float32)
    short = build(alpha_bits=8)
    packed = convert(short)
    assert kinds(packed).count("binary_dense") == 2 and packed.stages[-2].scale is not None
    assert_exact(short, packed, x)
    full = build(alpha_bits=0)
    packed = convert(full)
    assert "binary_dense" not in kinds(packed) and any("round" in n for n in packed.notes)
    assert_exact(full, packed, x)
    assert kinds(convert(full, allow_inexact=True)).count("binary_dense") == 2


@pytest.mark.parametrize("spatial", [False, True])
def test_pack_stage_absorbs_the_float_layers_before_the_sign(spatial):
    """BatchNorm (zero and negative gamma), Rescale with a negative scale and ReLU before a sign become
    float thresholds of the pack stage; inputs on and next to every threshold give the simulation's bits."""
    c = 70
    shape = (c, 2, 3) if spatial else (c,)
    bn = BatchNorm(c)
    first = (QuantConv2D(c, 4, 1, input_quantizer="ste_sign", kernel_quantizer="ste_sign", bias=False)
             if spatial else QuantAffine(c, 4, input_quantizer="ste_sign", kernel_quantizer="ste_sign"))
    layers = [bn, Rescale(-1.5, 0.25)] + ([ReLU(), BatchNorm(c)] if spatial else []) + [first]
    model = stress_batchnorm(Model(layers + ([Flatten()] if spatial else []), input_shape=shape))
    packed = convert(model)
    assert kinds(packed)[:2] == ["pack", "binary_conv" if spatial else "binary_dense"]
    stage = packed.stages[0]
    assert stage.threshold.dtype == np.float32 and set(np.unique(stage.direction)) <= {-1, 1}
    rng = np.random.default_rng(0)
    edges = np.where(np.isfinite(stage.threshold), stage.threshold, 0).astype(np.float32)
    near = np.stack([edges, np.nextafter(edges, np.float32(np.inf)), np.nextafter(edges, np.float32(-np.inf)),
                     np.zeros(c, np.float32), -np.zeros(c, np.float32)])
    x = np.concatenate([near, rng.normal(0, 5, (40, c)).astype(np.float32)])
    if spatial:
        x = np.repeat(x[:, :, None, None], 6, axis=3).reshape(-1, *shape)
    assert_exact(model, packed, x)


def test_pixel_codes_first_layer_runs_on_bit_planes_exactly(tmp_path):
    """bnn_mlp starts with PixelCodes: its binary first layer runs on the integer codes by bit planes and
    the scores equal the simulation's bit for bit, also with BatchNorm thresholds on attainable sums and
    on inputs that are not 8-bit images."""
    model = stress_batchnorm(zoo.bnn_mlp(hidden=(96, 70)))
    packed = convert(model)
    assert kinds(packed)[:2] == ["bitplane_dense", "binary_dense"] and not packed.notes
    codes = np.random.default_rng(4).integers(0, 256, (120, 28, 28)).astype(np.uint8)
    codes[:5] = 0
    codes[5:10] = 255
    x = np.concatenate([float_images(codes), images(60), images(20) * 3 - 1])  # also outside [0, 1]
    assert_exact(model, packed, x)
    first, bn, sign = model.layers[3], model.layers[4], model.layers[5].quantizer
    w = np.where(first.W >= 0, 1, -1).astype(np.int64)
    totals = 2 * codes.reshape(len(codes), -1).astype(np.int64) @ w - 255 * w.sum(axis=0)
    y = (totals / 256.0).astype(np.float32)  # the simulation's first-layer output, exactly
    expected = pack_signs(np.asarray(sign(bn.forward(y, train=False), train=False)))
    np.testing.assert_array_equal(packed.stages[0].run(float_images(codes)), expected)
    loaded = load_packed(packed.save(tmp_path / "bitplane.npz"))
    np.testing.assert_array_equal(loaded.predict_scores(x), packed.predict_scores(x))
    # Rescale(2, -1) instead (the paper's input): the sums round, so the first layer stays a float stage
    assert kinds(convert(zoo.bnn_mlp(hidden=(32,), input_bits=None)))[:2] == ["float", "pack"]


def test_files_with_separate_int_maxpool_and_threshold_stages_still_run(packed_file, tmp_path):
    """Older converters wrote int_maxpool + threshold where threshold_maxpool now does both."""
    model, packed, _ = packed_file
    stages = []
    for stage in packed.stages:
        if stage.kind == "threshold_maxpool":
            pooled = make_spec("acc", "nhwc", stage.output_spec[2])
            stages += [IntMaxPoolStage(stage.input_spec, pooled, stage.kernel, stage.stride, stage.padding),
                       ThresholdStage(pooled, stage.output_spec, stage.threshold, stage.direction)]
        else:
            stages.append(stage)
    old = load_packed(PackedModel(stages, packed.input_shape, name="old").save(tmp_path / "old.npz"))
    assert kinds(old).count("int_maxpool") == 2
    x = images(50)
    np.testing.assert_array_equal(old.predict_scores(x), packed.predict_scores(x))


def test_residual_binary_conv_runs_on_bits_and_first_layer_stays_float(tmp_path):
    block = Residual([QuantConv2D(4, 4, 3, padding=1, input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                                  bias=False), BatchNorm(4)])
    model = stress_batchnorm(Model([
        QuantConv2D(1, 4, 3, padding=1, kernel_quantizer="ste_sign"), BatchNorm(4), block, Flatten(),
        QuantAffine(4 * 6 * 6, 3, input_quantizer="ste_sign", kernel_quantizer="ste_sign"), BatchNorm(3),
    ], input_shape=(1, 6, 6)))
    packed = convert(model)
    assert kinds(packed) == ["float", "residual", "float", "pack", "binary_dense", "acc_to_float", "float"]
    assert [s.kind for s in packed.stages[1].body] == ["pack", "binary_conv", "acc_to_float", "float"]
    assert packed.stages[0].encodings["0.W"][0]["encoding"] == "signs"  # first layer: bits, run in float
    assert any("layer 2 (Residual)" in note and "BatchNorm" in note for note in packed.notes)
    assert_exact(model, packed, images(20, shape=(1, 6, 6)))
    reloaded = load_packed(packed.save(tmp_path / "residual.npz"))
    np.testing.assert_array_equal(reloaded.predict_scores(images(20, shape=(1, 6, 6))),
                                  packed.predict_scores(images(20, shape=(1, 6, 6))))


def test_bireal_resnet_packs_every_block_and_equals_the_simulation(tmp_path):
    """Issue 22 item 3: a Bi-Real ResNet used to convert to one float stage with empty notes."""
    from lowbit.zoo import bireal_resnet

    model = stress_batchnorm(bireal_resnet(seed=3, widths=(8, 16), blocks_per_stage=1))
    packed = convert(model)
    residuals = [s for s in packed.stages if s.kind == "residual"]
    assert len(residuals) == 2
    assert all("binary_conv" in [inner.kind for inner in s.body] for s in residuals)
    assert len(packed.notes) == 2 and "shortcut AvgPool2D, Conv2D, BatchNorm" in packed.notes[1]
    x = images(30)
    assert_exact(model, packed, x)
    np.testing.assert_array_equal(load_packed(packed.save(tmp_path / "b.npz")).predict_scores(x),
                                  model.predict_scores(x))


def test_float_residual_block_stays_one_float_stage_with_a_note():
    from lowbit.blocks import resnet_block

    model = Model([Conv2D(1, 4, 3, padding=1)] + resnet_block(4, 4) + [Flatten(), Affine(4 * 6 * 6, 3)],
                  input_shape=(1, 6, 6))
    packed = convert(model)
    assert kinds(packed) == ["float"]
    assert any("no binary layer" in note for note in packed.notes)
    assert_exact(model, packed, images(10, shape=(1, 6, 6)))


def test_convert_refuses_what_it_cannot_reproduce():
    with pytest.raises(TypeError, match="lowbit Model"):
        convert(zoo.bnn_mlp(hidden=(8,)).layers)
    model = Model([QuantAffine(4, 2, input_quantizer=StochasticBinary(deterministic_eval=False),
                               kernel_quantizer="ste_sign")], input_shape=(4,))
    with pytest.raises(ValueError, match="stochastic at evaluation"):
        convert(model)


def test_convert_leaves_the_model_alone():
    model = stress_batchnorm(zoo.tfc())
    before = {k: v.copy() for k, v in ((p, getattr(l, a)) for p, l, a in model.named_arrays())}
    convert(model)
    for path, layer, attr in model.named_arrays():
        np.testing.assert_array_equal(getattr(layer, attr), before[path])


# -- files -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packed_file(tmp_path_factory):
    model = stress_batchnorm(zoo.binary_cnn(channels=(8, 8, 16, 70), hidden=32))
    packed = convert(model)
    path = packed.save(tmp_path_factory.mktemp("packed") / "cnn.npz")
    return model, packed, path


def test_file_round_trip_predicts_identically(packed_file, tmp_path):
    model, packed, path = packed_file
    loaded = load_packed(path)
    x = images(60)
    np.testing.assert_array_equal(loaded.predict_scores(x), packed.predict_scores(x))
    assert kinds(loaded) == kinds(packed) and loaded.name == packed.name
    assert isinstance(load_any(path), PackedModel)
    model_path = save_model(model, tmp_path / "model.npz")
    assert isinstance(load_any(model_path), Model)
    with pytest.raises(ModelFileError, match="holds a 'lowbit.model' file, expected lowbit.packed"):
        load_packed(model_path)
    with pytest.raises(ModelFileError, match="expected lowbit.model"):
        load_model(path)


def test_truncated_packed_file(packed_file, tmp_path):
    data = open(packed_file[2], "rb").read()
    for cut in (len(data) // 3, len(data) - 50):
        p = tmp_path / f"cut{cut}.npz"
        p.write_bytes(data[:cut])
        with pytest.raises(ModelFileError):
            load_packed(p)


def _edited(path, tmp_path, edit):
    manifest, arrays = read_archive(path, "lowbit.packed")
    edit(manifest["model"], arrays)
    return write_archive(tmp_path / "edited.npz", "lowbit.packed", arrays, {"model": manifest["model"]})


def _set(stage_index, key, value):
    def edit(doc, arrays):
        doc["stages"][stage_index]["config"][key] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda doc, arrays: doc["stages"][2].update(type="os.system"), "unknown type 'os.system'"),
    (lambda doc, arrays: doc["stages"].insert(3, doc["stages"].pop(4)), r"stage 3 \(binary_conv\)"),
    (_set(2, "stride", 2), r"stage 2 \(binary_conv\) is invalid: the convolution gives dims"),
    (lambda doc, arrays: arrays.update({"stages.3.threshold": arrays["stages.3.threshold"][:3]}),
     r"'threshold' must have shape \(8,\)"),
    (lambda doc, arrays: arrays.update(
        {"stages.3.threshold": arrays["stages.3.threshold"].astype(np.float32)}),
     r"'threshold' must be int32, got float32"),
    (lambda doc, arrays: arrays.update({"stages.3.direction": np.full(8, 3, np.int8)}), r"only \+1 and -1"),
    (lambda doc, arrays: arrays.update({"stages.2.weights": arrays["stages.2.weights"] | np.uint64(1 << 63)}),
     "padding bits"),
    (lambda doc, arrays: arrays.update({"stages.9.extra": np.zeros(2)}), "belong to no stage"),
    (lambda doc, arrays: doc["stages"][0]["config"]["layers"][0].update(type="Evil"),
     "unknown layer type 'Evil'"),
    (lambda doc, arrays: [doc["stages"].pop(), doc["stages"].pop()]
     + [arrays.pop(k) for k in list(arrays) if k.startswith("stages.12.")], "must return float scores"),
    (lambda doc, arrays: doc.update(input_shape=[1, 28]), r"stage 0 \(float\)"),
    (lambda doc, arrays: arrays.update({"stages.1.threshold": arrays["stages.1.threshold"].astype(np.float64)}),
     r"stage 1 \(pack\) is invalid: array 'threshold' must be float32"),
    (lambda doc, arrays: arrays.pop("stages.1.direction"), r"stage 1 \(pack\) lacks arrays \['direction'\]"),
])
def test_tampered_packed_manifest(packed_file, tmp_path, edit, message):
    path = _edited(packed_file[2], tmp_path, edit)
    with pytest.raises(ModelFileError, match=message):
        load_packed(path)


def test_tampered_packed_array_bytes(packed_file, tmp_path):
    import zipfile

    with zipfile.ZipFile(packed_file[2]) as zin, zipfile.ZipFile(tmp_path / "t.npz", "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "stages.3.threshold.npy":
                data = data[:-1] + bytes([data[-1] ^ 1])
            zout.writestr(item.filename, data)
    with pytest.raises(ModelFileError, match="checksum"):
        load_packed(tmp_path / "t.npz")


def test_packed_file_is_25x_smaller_than_float32(tmp_path):
    model = zoo.bnn_mlp(hidden=(1024, 1024, 1024))
    float_size = os.path.getsize(save_model(model, tmp_path / "float.npz"))
    packed_size = os.path.getsize(convert(model).save(tmp_path / "packed.npz"))
    assert float_size / packed_size >= 25, (float_size, packed_size)


# -- integer codes and kernel encodings -------------------------------------------------------------
@given(st.integers(2, 8), st.integers(1, 40), st.integers(1, 6), st.sampled_from(["tensor", "channel"]),
       st.integers(0, 999))
def test_codes_rebuild_the_quantized_kernel_bit_for_bit(bits, rows, cols, scale, seed):
    w = np.random.default_rng(seed).normal(0, 0.5, (rows, cols)).astype(np.float32)
    w.flat[::5] = 0.0
    for q in (DoReFaWeight(bits), UniformWeight(bits, scale)):
        codes, params = q.codes(w, channel_axis=1)
        assert codes.dtype == np.uint8 and int(codes.max()) < 2 ** bits
        stored = unpack_codes(pack_codes(codes, bits), bits, codes.size).reshape(codes.shape)
        rebuilt = q.from_codes(stored, **params)
        np.testing.assert_array_equal(rebuilt.view(np.uint32), q(w, channel_axis=1).view(np.uint32))


def test_uniform_weight_levels_and_scale():
    w = np.array([[1.0, -0.2], [-0.6, 0.0], [0.26, 0.1]], np.float32)
    q = UniformWeight(2, "channel")  # ternary {-alpha, 0, alpha} per column, half to even
    np.testing.assert_array_equal(q(w, channel_axis=1), np.float32([[1.0, -0.2], [-1.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_array_equal(UniformWeight(2, "tensor")(w), [[1, 0], [-1, 0], [0, 0]])
    levels = UniformWeight(2, "tensor")(w)
    assert not (np.signbit(levels) & (levels == 0)).any()  # no -0.0
    assert len(np.unique(UniformWeight(3, "tensor")(np.linspace(-1, 1, 101, dtype=np.float32)))) == 7
    assert UniformWeight(8).backward(w, w) is w and UniformWeight(5).precision == 5
    with pytest.raises(ValueError, match="channel_axis"):
        UniformWeight(4, "channel")(w)


def test_dorefa_activation_max_value():
    x = np.linspace(-3, 3, 61, dtype=np.float32)
    plain = DoReFaActivation(3)
    assert plain.config() == {"name": "dorefa_activation", "bits": 3, "signed": False}
    wide = DoReFaActivation(3, max_value=2.0)
    np.testing.assert_array_equal(wide(x), quantize_k(np.clip(x / 2, 0, 1), 3) * 2)
    signed = DoReFaActivation(2, signed=True, max_value=2.0)
    np.testing.assert_allclose(np.unique(signed(x)), [-2.0, -2 / 3, 2 / 3, 2.0], rtol=1e-6)
    np.testing.assert_array_equal(signed.backward(x, np.ones_like(x)), (np.abs(x) <= 2).astype(np.float32))
    assert DoReFaActivation(**{k: v for k, v in wide.config().items() if k != "name"}) == wide
    with pytest.raises(ValueError, match="max_value"):
        DoReFaActivation(2, max_value=0.0)


@pytest.mark.parametrize("make, encoding", [
    (lambda w: (np.where(w >= 0, 1, -1).astype(np.float32), None), "signs"),
    (lambda w: (SteSign(scale="channel")(w, channel_axis=1), None), "signs"),
    (lambda w: (DoReFaWeight(3)(w), DoReFaWeight(3)), "codes"),
    (lambda w: (Fp16()(w), None), "float16"),
    (lambda w: (w, None), "float32"),
])
def test_encode_kernel_picks_the_compact_exact_encoding(make, encoding):
    w = np.random.default_rng(0).normal(0, 1, (70, 9)).astype(np.float32)
    w_eff, quantizer = make(w)
    info, arrays = encode_kernel(w_eff, 1, quantizer, latent=w)
    assert info["encoding"] == encoding
    np.testing.assert_array_equal(decode_kernel(info, arrays).view(np.uint32), w_eff.view(np.uint32))


# -- the commands ----------------------------------------------------------------------------------
def _float_cnn():
    return Model([Conv2D(1, 6, 3, padding=1, seed=1), ReLU(), MaxPool2D(2),
                  Conv2D(6, 8, 3, padding=1, seed=2), ReLU(), MaxPool2D(2), Flatten(),
                  Affine(8 * 7 * 7, 20, seed=3), ReLU(), Affine(20, 10, seed=4)], name="tiny_cnn")


def test_quantize_and_convert_commands(tmp_path):
    data = fake_mnist()
    model_path = save_model(_float_cnn(), tmp_path / "float.npz")
    lines = []
    result = quantize_command(model_path, 1, 1, tmp_path / "w1a1.npz", calibrate=50, data=data,
                              out=lines.append, val_size=100)  # 300 training images: fewer than 10,000
    assert result["labels_equal"] == result["count"] == 200
    assert result["size_after"] == os.path.getsize(tmp_path / "w1a1.npz") and result["ratio"] > 1
    assert "test accuracy" in lines[0] and "smaller" in lines[1] and "200/200 labels equal" in lines[2]
    assert load_packed(tmp_path / "w1a1.npz").metadata["post_training_quantization"]["weight_bits"] == 1
    binary_path = save_model(stress_batchnorm(zoo.tfc()), tmp_path / "tfc.npz")
    lines = []
    result = convert_command(binary_path, tmp_path / "tfc_packed.npz", data=data, out=lines.append)
    assert result["labels_equal"] == 200 and result["scores_identical"]
    assert "(identical)" in lines[1]


# -- GPU ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="CuPy with a CUDA device is not available")
@pytest.mark.parametrize("name", ["tfc", "binary_cnn", "bnn_mlp"])
def test_packed_model_on_gpu_equals_gpu_simulation(name):
    model = stress_batchnorm(ZOO[name][0]())
    packed = convert(model).to_device("gpu")
    assert packed.device == "gpu"
    x = images(120)
    got = packed.predict_scores(x)
    np.testing.assert_array_equal(got, model.to_device("gpu").predict_scores(x))
    if name == "tfc":  # no float product before the first sign: equal to the CPU simulation too
        np.testing.assert_array_equal(got, model.to_device("cpu").predict_scores(x))
