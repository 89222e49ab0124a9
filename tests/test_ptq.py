"""Post-training quantization (lowbit.ptq): the twin converts exactly, the least-squares weight and
activation ranges, calibration, and the one rule for the calibration images."""
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

from lowbit import zoo
from lowbit.convert import convert
from lowbit.data import float_images, train_val_split
from lowbit.layers import Affine, Conv2D
from lowbit.packed import kernel_channel_axis, load_packed
from lowbit.ptq import calibration_images, mse_activation_range, mse_weight_range, post_training_quantize
from lowbit.quant_layers import QuantAffine, QuantConv2D
from lowbit.quantizers import DoReFaActivation, UniformWeight

from test_convert import _float_cnn, assert_exact, images, kinds


# -- the twin ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight_bits, activation_bits, per_channel, binary_stages", [
    (8, 8, True, 0), (4, 4, False, 0), (2, 32, True, 0), (16, 16, True, 0), (1, 1, True, 2), (1, 1, False, 2),
])
def test_post_training_quantization_converts_exactly(weight_bits, activation_bits, per_channel,
                                                     binary_stages, tmp_path):
    model = _float_cnn()
    calibration = images(40, seed=5)
    twin = post_training_quantize(model, weight_bits, activation_bits, calibration, per_channel=per_channel)
    convs = [layer for _, layer in twin.named_layers() if isinstance(layer, (QuantAffine, QuantConv2D))]
    middle = convs[1].kernel_quantizer
    if 2 <= weight_bits <= 8:
        assert middle == UniformWeight(weight_bits, "channel" if per_channel else "tensor")
    if 2 <= activation_bits <= 8:
        assert convs[0].input_quantizer == DoReFaActivation(8, max_value=float(calibration.max()))
        assert all(q.input_quantizer.max_value > 0 and not q.input_quantizer.signed for q in convs[1:])
    packed = convert(twin)
    assert kinds(packed).count("binary_conv") + kinds(packed).count("binary_dense") == binary_stages
    if 2 <= weight_bits <= 8:
        assert packed.stages[0].encodings["3.W"][0]["encoding"] == "codes"
    x = images(30, seed=6)
    assert_exact(twin, packed, x)
    loaded = load_packed(packed.save(tmp_path / "ptq.npz"))
    np.testing.assert_array_equal(loaded.predict_scores(x), packed.predict_scores(x))


# -- the MSE weight range -------------------------------------------------------------------------
def _sq_error(q, w, alpha):
    return float(((q(np.clip(w, -alpha, alpha), channel_axis=1).astype(np.float64) - w) ** 2).sum())


@given(st.integers(2, 8), st.integers(1, 30), st.integers(1, 5), st.booleans(), st.integers(0, 999))
def test_mse_weight_range_never_worse_than_the_max(bits, rows, cols, per_channel, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, (rows, cols)) * rng.uniform(0.01, 2)).astype(np.float32)
    w[:, 0] = 0.0  # an all-zero unit keeps alpha 0 (and stays zero)
    axis = 1 if per_channel else None
    alpha = mse_weight_range(w, bits, axis)
    top = np.abs(w).max(axis=0 if per_channel else None, keepdims=True)
    assert alpha.shape == top.shape and alpha.dtype == np.float32
    assert (alpha <= top).all() and (alpha[top > 0] > 0).all() and (alpha[top == 0] == 0).all()
    q = UniformWeight(bits, "channel" if per_channel else "tensor")
    # UniformWeight's max-abs scale of the clipped weights is alpha itself
    np.testing.assert_array_equal(q._alpha(np.clip(w, -alpha, alpha), 1), np.where(alpha > 0, alpha, 1))
    assert _sq_error(q, w, alpha) <= _sq_error(q, w, top) * (1 + 1e-6)


def test_mse_weight_range_of_gaussian_weights():
    """The least-squares ternary levels of N(0, 1) are +-1.224 (Lloyd-Max); the max-abs scale (about
    3.9 here) rounds most weights to 0 and has over 3x the error."""
    w = np.random.default_rng(1).normal(0, 1, (20000, 2)).astype(np.float32)
    alpha = mse_weight_range(w, 2, channel_axis=1)
    np.testing.assert_allclose(alpha, [[1.224, 1.224]], atol=0.04)
    q = UniformWeight(2, "channel")
    assert 3 * _sq_error(q, w, alpha) < _sq_error(q, w, np.abs(w).max(axis=0, keepdims=True))
    # a tie keeps the larger range: weights already on a ternary grid keep their own
    grid = np.float32([[-0.5, 0.0, 0.5, 0.5]]).T
    assert mse_weight_range(grid, 2)[0, 0] == np.float32(0.5)


def test_mse_weight_range_errors():
    w = np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match="bits must be an int in 2..8, got 1"):
        mse_weight_range(w, 1)
    with pytest.raises(ValueError, match="candidates must be an int >= 1, got 0"):
        mse_weight_range(w, 2, candidates=0)
    with pytest.raises(TypeError, match="mse_weight_range expects a float array, got dtype int64"):
        mse_weight_range(np.ones((3, 2), np.int64), 2)
    w[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mse_weight_range(w, 2)


@pytest.mark.parametrize("bits", [2, 4])
def test_post_training_quantization_clips_weights_to_the_mse_range(bits):
    model = _float_cnn()

    def kernels(m, kinds):
        return [layer for _, layer in m.named_layers() if isinstance(layer, kinds)]

    originals = kernels(model, (Affine, Conv2D))
    clipped = kernels(post_training_quantize(model, bits, 32), (QuantAffine, QuantConv2D))
    plain = kernels(post_training_quantize(model, bits, 32, weight_clipping="max"), (QuantAffine, QuantConv2D))
    for position, (original, a, b) in enumerate(zip(originals, clipped, plain)):
        np.testing.assert_array_equal(b.W, original.W)  # "max" leaves the latent weights alone
        if position in (0, len(originals) - 1):  # kept in float
            np.testing.assert_array_equal(a.W, original.W)
            continue
        alpha = mse_weight_range(original.W, bits, kernel_channel_axis(a))
        np.testing.assert_array_equal(a.W, np.clip(original.W, -alpha, alpha))
        error = [float(((layer.quantized_kernel() - original.W) ** 2).sum()) for layer in (a, b)]
        assert error[0] <= error[1]
    with pytest.raises(ValueError, match=r"weight_clipping must be one of \['mse', 'max'\], got 'min'"):
        post_training_quantize(model, 2, 32, weight_clipping="min")


# -- the MSE activation range ---------------------------------------------------------------------
def _act_error(x, bits, signed, value):
    q = DoReFaActivation(bits, signed=signed, max_value=value).forward(x)
    return float(((q - x).astype(np.float64) ** 2).sum())


@given(st.integers(1, 8), st.booleans(), st.integers(1, 400), st.integers(0, 999))
def test_mse_activation_range_never_worse_than_the_max(bits, signed, n, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(3, n) * rng.uniform(0.01, 5)).astype(np.float32)
    if not signed:
        x = np.abs(x)
    value = mse_activation_range(x, bits, signed=signed)
    top = float(np.abs(x).max())
    assume(top > 0)
    assert isinstance(value, float) and 0 < value <= top
    assert _act_error(x, bits, signed, value) <= _act_error(x, bits, signed, top) * (1 + 1e-9)


def test_mse_activation_range_of_gaussian_activations():
    """Signed 1 bit: the least-squares levels +-m of N(0, 1) are +-E|x| = +-0.798.  Signed 2 bits:
    the best uniform 4-level grid of N(0, 1) has step 0.996 (Max 1960), so m = 1.494.  The max
    (about 4.7 here) has several times the error at 2 bits."""
    x = np.random.default_rng(2).normal(0, 1, 100000).astype(np.float32)
    step = float(np.abs(x).max()) / 128  # the search's resolution
    assert abs(mse_activation_range(x, 1, signed=True) - 0.798) < step
    value = mse_activation_range(x, 2, signed=True)
    assert abs(value - 1.494) < step
    assert 3 * _act_error(x, 2, True, value) < _act_error(x, 2, True, float(np.abs(x).max()))
    # unsigned: negatives clip to 0 whatever the range; the top is the largest x
    assert mse_activation_range(x, 8) <= float(x.max())
    # a tie keeps the larger range: activations on the 2-bit grid keep it
    grid = np.float32([0.0, 1.0, 2.0, 3.0, 3.0])
    assert mse_activation_range(grid, 2) == 3.0
    assert mse_activation_range(np.zeros(5, np.float32), 2) == 1.0
    assert mse_activation_range(-np.ones(5, np.float32), 2) == 1.0  # nothing on the unsigned side


def test_mse_activation_range_errors():
    x = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="bits must be an int in 1..8, got 9"):
        mse_activation_range(x, 9)
    with pytest.raises(ValueError, match="candidates must be an int >= 1, got 0"):
        mse_activation_range(x, 2, candidates=0)
    with pytest.raises(TypeError, match="mse_activation_range expects a float array, got dtype int64"):
        mse_activation_range(np.ones(4, np.int64), 2)
    x[1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mse_activation_range(x, 2)


def test_post_training_quantization_calibrates_activations_to_the_mse_range():
    """With fewer than 2^16 values a layer, the sample is all of the layer's inputs: each range is
    mse_activation_range of them (plus the max, which joins the sample); "max" keeps max|x|."""
    model = _float_cnn()
    calibration = images(40, seed=7)
    inputs = []
    x = calibration
    for layer in model.layers:
        if isinstance(layer, (Affine, Conv2D)):
            inputs.append(x.reshape(-1))
        x = layer.forward(x, train=False)
    mse = post_training_quantize(model, 32, 2, calibration)
    peak = post_training_quantize(model, 32, 2, calibration, activation_clipping="max")
    kinds = (QuantAffine, QuantConv2D)
    pairs = [(a, b) for (_, a), (_, b) in zip(mse.named_layers(), peak.named_layers()) if isinstance(a, kinds)]
    assert len(pairs) == len(inputs) == 4
    for position, ((a, b), values) in enumerate(zip(pairs, inputs)):
        qa, qb = a.input_quantizer, b.input_quantizer
        bits = 8 if position == 0 else 2  # the image's quantizer is 8-bit
        assert qa.bits == qb.bits == bits and qa.signed == qb.signed == bool(values.min() < 0)
        top = float(np.abs(values).max())
        assert qb.max_value == top
        expected = mse_activation_range(np.concatenate([values, np.float32([top])]), bits, signed=qa.signed)
        np.testing.assert_allclose(qa.max_value, expected, rtol=1e-6)
        assert _act_error(values, bits, qa.signed, qa.max_value) <= _act_error(values, bits, qa.signed, top)
    assert mse.layers[-1].input_quantizer.max_value < peak.layers[-1].input_quantizer.max_value
    with pytest.raises(ValueError, match=r"activation_clipping must be one of \['mse', 'max'\], got 'p99'"):
        post_training_quantize(model, 32, 2, calibration, activation_clipping="p99")
    with pytest.raises(ValueError, match=r"percentile \(got 99.0\) sets the 'max' activation range"):
        post_training_quantize(model, 32, 2, calibration, percentile=99.0)
    # a percentile with the max range still works
    p99 = post_training_quantize(model, 32, 2, calibration, percentile=99.0, activation_clipping="max")
    assert p99.layers[-1].input_quantizer.max_value < peak.layers[-1].input_quantizer.max_value


def test_post_training_quantization_errors():
    with pytest.raises(ValueError, match="calibration_images"):
        post_training_quantize(zoo.mlp(hidden=(8,)), 8, 4)
    with pytest.raises(ValueError, match="already quantized"):
        post_training_quantize(zoo.tfc(), 8, 8, images(4))
    with pytest.raises(ValueError, match="weight_bits must be one of"):
        post_training_quantize(zoo.mlp(hidden=(8,)), 12, 8, images(4))




# -- which images calibrate --------------------------------------------------------------------------
def mnist_like(n=300, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("val_size, limit, count, seed", [(100, 0, 50, 0), (100, 30, 50, 3), (0, 0, 20, 1),
                                                          (250, 0, 80, 2)])
def test_calibration_images_are_the_sweeps(val_size, limit, count, seed):
    """The sweep's rule, written out: the split's training part (float images), its first ``limit``,
    their first ``count``."""
    x = mnist_like()
    y = np.zeros(len(x), np.int64)
    x_train, _, _, _ = train_val_split(float_images(x), y, val_size, seed)
    if limit:
        x_train = x_train[:limit]
    expected = x_train[:count]
    got = calibration_images(x, count, seed, val_size=val_size, limit=limit)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    # float images give the same rows
    np.testing.assert_array_equal(calibration_images(float_images(x), count, seed, val_size, limit), expected)


def test_calibration_images_never_include_validation_images():
    x = np.arange(300, dtype=np.float32).reshape(300, 1, 1, 1)  # each image its own row number
    _, _, x_val, _ = train_val_split(x, np.zeros(300, np.int64), 100, 0)
    got = calibration_images(x, 200, 0, val_size=100)
    assert len(got) == 200 and not set(got.ravel()) & set(x_val.ravel())
    assert list(got.ravel()) == sorted(got.ravel())  # in their order in the training set


def test_calibration_images_errors():
    x = mnist_like(50)
    with pytest.raises(ValueError, match=r"val_size must be in \[0, 50\) .the training images., got 10000; "
                                         "pass val_size=0"):
        calibration_images(x, 10)
    with pytest.raises(ValueError, match="count must be an int >= 0, got -1"):
        calibration_images(x, -1, val_size=0)
    with pytest.raises(ValueError, match="limit must be an int >= 0, got 1.5"):
        calibration_images(x, 1, val_size=0, limit=1.5)
