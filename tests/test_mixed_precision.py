"""Mixed-precision training (float16 passes, float32 masters, dynamic loss scaling) and fp16 inference."""
import numpy as np
import pytest

from lowbit.functions import matmul, use_direct_conv
from lowbit.layers import Affine, Conv2D, MaxPool2D, ReLU
from lowbit.mixed_precision import LossScaler, mixed_precision_step
from lowbit.losses import SoftmaxCrossEntropy
from lowbit.model import Model
from lowbit.optimizers import Adam, SGD
from lowbit.trainer import Trainer
from test_trainer import blobs, small_cnn


def test_fp16_matmul_is_fp32_accumulation_rounded_once():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 300)).astype(np.float16)
    b = rng.standard_normal((300, 4)).astype(np.float16)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    out = matmul(a, b)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, (a.astype(np.float32) @ b.astype(np.float32)).astype(np.float16))
    # one rounding to half precision: within half an ulp (plus fp32 accumulation noise)
    assert np.all(np.abs(out - exact) <= np.abs(exact) * 2.0 ** -11 + 1e-3)


def test_fp16_matmul_mixed_operands_and_keep_float32():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((6, 50)).astype(np.float16)
    b = rng.standard_normal((50, 3)).astype(np.float16)
    product = a.astype(np.float32) @ b.astype(np.float32)
    np.testing.assert_array_equal(matmul(a.astype(np.float32), b), product.astype(np.float16))
    np.testing.assert_array_equal(matmul(a, b.astype(np.float32)), product.astype(np.float16))
    kept = matmul(a, b, keep_float32=True)
    assert kept.dtype == np.float32
    np.testing.assert_array_equal(kept, product)
    assert matmul(a.astype(np.float32), b.astype(np.float32), keep_float32=True).dtype == np.float32


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0), (2, 1)])
def test_fp16_conv_is_the_float32_conv_of_fp16_values_rounded_once(stride, padding):
    """Forward and backward of a float16 Conv2D on numpy: float32 products, each result rounded once."""
    rng = np.random.default_rng(2)
    conv = Conv2D(3, 4, 3, stride=stride, padding=padding, bias=True, seed=0)
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float16)
    conv.W = conv.W.astype(np.float16)
    conv.b = rng.standard_normal(4).astype(np.float16)
    ref = Conv2D(3, 4, 3, stride=stride, padding=padding, bias=True, seed=0)
    ref.W, ref.b = conv.W.astype(np.float32), conv.b.astype(np.float32)

    out = conv.forward(x, train=True)
    # the float32 reference on im2col, the float16 path's arithmetic (the direct kernels sum in
    # another order, and a float16 rounding may then differ by one unit)
    previous = use_direct_conv(False)
    try:
        out_ref = ref.forward(x.astype(np.float32), train=True)
    finally:
        use_direct_conv(previous)
    assert out.dtype == np.float16
    # the float16 path adds the bias after rounding the product, the float32 one before
    np.testing.assert_allclose(out, out_ref, rtol=2.0 ** -9, atol=2.0 ** -9)
    dout = rng.standard_normal(out.shape).astype(np.float16)
    dx = conv.backward(dout)
    dx_ref = ref.backward(dout.astype(np.float32))  # the im2col path, as its forward ran there
    assert dx.dtype == np.float16
    np.testing.assert_array_equal(dx, dx_ref.astype(np.float16))
    np.testing.assert_array_equal(conv.dW, ref.dW.astype(np.float16))


@pytest.mark.parametrize("layer, exact", [(ReLU(), True), (MaxPool2D(2, 2), True),
                                          (MaxPool2D(3, 1, padding=1), False)])
def test_fp16_relu_and_maxpool_match_float32(layer, exact):
    """Selects are exact in float16; overlapping pooling windows sum their gradients in float16."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float16)
    out16 = layer.forward(x, train=True)
    dout = rng.standard_normal(out16.shape).astype(np.float16)
    dx16 = layer.backward(dout)
    out32 = layer.forward(x.astype(np.float32), train=True)
    dx32 = layer.backward(dout.astype(np.float32))
    assert out16.dtype == dx16.dtype == np.float16
    np.testing.assert_array_equal(out16, out32.astype(np.float16))
    if exact:
        np.testing.assert_array_equal(dx16, dx32.astype(np.float16))
    else:
        np.testing.assert_allclose(dx16, dx32, rtol=2.0 ** -8, atol=2.0 ** -10)

def test_mixed_training_learns_and_keeps_fp32_masters():
    x, y = blobs()
    model = small_cnn()
    t = Trainer(model, optimizer=Adam(0.01), epochs=6, batch_size=20, progress=False,
                precision="mixed16")
    t.fit(x, y)
    assert all(getattr(l, a).dtype == np.float32 for _, l, a in model.named_arrays())
    assert model.evaluate(x, y) > 0.9
    assert t.history[-1]["loss_scale"] > 0


def test_loss_scaler_rules():
    s = LossScaler(init_scale=1024.0, growth_interval=3)
    s.update(overflow=True)
    assert s.scale == 512.0 and s.skipped_steps == 1
    for _ in range(3):
        s.update(overflow=False)
    assert s.scale == 1024.0 and s.good_steps == 0
    with pytest.raises(ValueError, match="backoff_factor must be in"):
        LossScaler(backoff_factor=1.5)


def test_overflow_skips_the_step_and_backs_off():
    model = Model([Affine(2, 2, seed=0)], input_shape=(2,))
    model.layers[0].W[...] = 10.0
    before = model.layers[0].W.copy()
    scaler = LossScaler(init_scale=2.0 ** 24)
    x = np.array([[6e4, 6e4]], np.float32)  # the float16 forward overflows
    loss, _, stepped = mixed_precision_step(model, SoftmaxCrossEntropy(), SGD(0.1), scaler, x,
                                            np.array([0]), 0.1)
    assert not stepped and scaler.scale == 2.0 ** 23
    np.testing.assert_array_equal(model.layers[0].W, before)


class TinyGradientLoss:
    """A loss whose gradient (1e-9) lies below float16's smallest subnormal (6e-8)."""

    def forward(self, scores, labels):
        self._shape = scores.shape
        return 0.0

    def backward(self):
        return np.full(self._shape, 1e-9, np.float32)


def test_loss_scaling_rescues_gradients_below_fp16_range():
    model = Model([Affine(1, 2, bias=False, seed=0)], input_shape=(1,))
    model.layers[0].W[...] = 0
    x = np.ones((1, 1), np.float32)
    for scale, expect_update in ((1.0, False), (2.0 ** 20, True)):
        w = model.layers[0].W.copy()
        mixed_precision_step(model, TinyGradientLoss(), SGD(1.0), LossScaler(scale, dynamic=False),
                             x, np.array([0]), 1.0)
        assert (not np.array_equal(model.layers[0].W, w)) == expect_update
    np.testing.assert_allclose(model.layers[0].W, -1e-9, rtol=1e-3)


def test_mixed_resume_equals_uninterrupted(tmp_path):
    x, y = blobs(200)
    full = small_cnn()
    Trainer(full, optimizer=Adam(0.01), epochs=2, batch_size=32, seed=1, progress=False,
            precision="mixed16", out_dir=tmp_path / "a").fit(x, y)
    part = small_cnn()
    Trainer(part, optimizer=Adam(0.01), epochs=1, batch_size=32, seed=1, progress=False,
            precision="mixed16", out_dir=tmp_path / "b").fit(x, y)
    again = small_cnn()
    Trainer(again, optimizer=Adam(0.01), epochs=2, batch_size=32, seed=1, progress=False,
            precision="mixed16", out_dir=tmp_path / "b").fit(x, y, resume=True)
    for (k, l1, a1), (_, l2, a2) in zip(full.named_arrays(), again.named_arrays()):
        np.testing.assert_array_equal(getattr(l1, a1), getattr(l2, a2), err_msg=k)


def test_fp16_inference_close_to_fp32():
    x, y = blobs(300)
    model = small_cnn()
    Trainer(model, optimizer=Adam(0.01), epochs=4, batch_size=20, progress=False).fit(x, y)
    scores32 = model.predict_scores(x)
    model.astype(np.float16)
    assert model.layers[0].W.dtype == np.float16
    scores16 = model.predict_scores(x)
    assert scores16.dtype == np.float32
    np.testing.assert_allclose(scores16, scores32, rtol=2e-2, atol=2e-2)
    assert (scores16.argmax(1) == scores32.argmax(1)).mean() > 0.98


def test_bad_precision():
    with pytest.raises(ValueError, match="precision must be one of"):
        Trainer(small_cnn(), precision="bf16")
