"""Layer tests: every backward against numerical gradients, shapes, errors, and a learning task."""
import numpy as np
import pytest

from lowbit.layers import (
    Affine, AvgPool2D, BatchNorm, Concat, Conv2D, Dropout, Flatten, GlobalAvgPool2D, MaxPool2D,
    ReLU, Rescale, Residual, Sequential, layer_from_config,
)
from lowbit.losses import SoftmaxCrossEntropy, SquaredHinge
from gradcheck import as_float64, check_layer_gradients, numerical_grad
from reference import conv2d_direct


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("bias", [True, False])
def test_affine_gradients(bias):
    layer = as_float64(Affine(6, 4, bias=bias, seed=1))
    check_layer_gradients(layer, rand(5, 6))


def test_affine_flattens_images():
    layer = Affine(12, 3, seed=0)
    x = rand(2, 3, 2, 2).astype(np.float32)
    out = layer.forward(x)
    np.testing.assert_allclose(out, x.reshape(2, 12) @ layer.W + layer.b, rtol=1e-6)
    assert layer.backward(np.ones((2, 3), np.float32)).shape == x.shape


@pytest.mark.parametrize("stride,padding,k", [(1, 0, 3), (1, 1, 3), (2, 1, 3), (2, 2, 3), (1, 0, 1),
                                              (3, 1, 2)])
def test_conv_gradients(stride, padding, k):
    layer = as_float64(Conv2D(2, 3, k, stride=stride, padding=padding, seed=2))
    check_layer_gradients(layer, rand(2, 2, 6, 5))


@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 1), (2, 1), (1, 2)])
def test_conv_matches_direct(stride, padding):
    layer = as_float64(Conv2D(3, 4, 3, stride=stride, padding=padding, seed=3))
    layer.b = rand(4, seed=9)
    x = rand(2, 3, 7, 6)
    expected = conv2d_direct(x, layer.W, stride, padding) + layer.b[None, :, None, None]
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", [MaxPool2D, AvgPool2D])
@pytest.mark.parametrize("k,stride,padding", [(2, 2, 0), (3, 2, 1), (2, 1, 0), (3, 3, 1)])
def test_pool_gradients(cls, k, stride, padding):
    # distinct values keep max pooling away from ties, where it is not differentiable
    x = np.random.default_rng(4).permutation(2 * 3 * 6 * 6).reshape(2, 3, 6, 6) / 10.0
    check_layer_gradients(cls(k, stride, padding), x)


def test_maxpool_ties_route_to_first():
    x = np.zeros((1, 1, 2, 2), np.float32)
    pool = MaxPool2D(2)
    pool.forward(x)
    dx = pool.backward(np.ones((1, 1, 1, 1), np.float32))
    assert dx.sum() == 1 and dx[0, 0, 0, 0] == 1


def test_global_avg_pool_gradients():
    check_layer_gradients(GlobalAvgPool2D(), rand(2, 3, 4, 5))


@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 3, 2)])
def test_batchnorm_train_gradients(shape):
    layer = as_float64(BatchNorm(shape[1]))
    layer.gamma = rand(shape[1], seed=5)
    layer.beta = rand(shape[1], seed=6)
    check_layer_gradients(layer, rand(*shape) * 3 + 1, train=True)


def test_batchnorm_eval_gradients_and_running_stats():
    layer = as_float64(BatchNorm(3, momentum=0.0))
    x = rand(50, 3) * 2 + 5
    layer.forward(x, train=True)
    np.testing.assert_allclose(layer.running_mean, x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(layer.running_var, x.var(0), rtol=1e-5)
    check_layer_gradients(layer, rand(4, 3), train=False)


def test_relu_flatten_rescale_gradients():
    x = rand(3, 2, 2, 2)
    x[np.abs(x) < 1e-3] = 0.5  # away from the kink
    check_layer_gradients(Sequential([ReLU(), Flatten(), Rescale(2.0, -1.0)]), x)


def test_dropout_gradients_and_scaling():
    layer = Dropout(0.5, seed=0)
    state = layer.rng.bit_generator.state

    def reseed():
        layer.rng.bit_generator.state = state

    check_layer_gradients(layer, rand(4, 6), reseed=reseed)
    x = np.ones((1000, 100), np.float32)
    out = layer.forward(x, train=True)
    assert set(np.unique(out)) <= {0.0, 2.0}
    assert abs(out.mean() - 1.0) < 0.02
    np.testing.assert_array_equal(layer.forward(x, train=False), x)


def test_residual_gradients_identity_and_projection():
    body = [Conv2D(2, 2, 3, padding=1, seed=1), BatchNorm(2), ReLU(), Conv2D(2, 2, 3, padding=1, seed=2)]
    check_layer_gradients(as_float64(Residual(body)), rand(2, 2, 4, 4), rtol=1e-4, atol=1e-5)
    proj = Residual([Conv2D(2, 4, 3, stride=2, padding=1, seed=3)], shortcut=Conv2D(2, 4, 1, stride=2, seed=4))
    check_layer_gradients(as_float64(proj), rand(2, 2, 4, 4))


def test_residual_passes_upstream_gradient_through_shortcut():
    # a body whose gradient is zero: the block's input gradient must be the upstream gradient itself
    body = Conv2D(2, 2, 3, padding=1, seed=0)
    body.W[...] = 0
    block = Residual([body])
    x = rand(2, 2, 4, 4).astype(np.float32)
    block.forward(x, train=True)
    dout = rand(2, 2, 4, 4, seed=3).astype(np.float32)
    np.testing.assert_array_equal(block.backward(dout), dout)


def test_residual_shape_mismatch_is_clear():
    block = Residual([Conv2D(2, 3, 1)])
    with pytest.raises(ValueError, match="projection shortcut"):
        block.forward(np.zeros((1, 2, 4, 4), np.float32))


def test_concat_gradients():
    block = Concat([
        [Conv2D(3, 2, 1, seed=1)],
        [Conv2D(3, 1, 1, seed=2), Conv2D(1, 2, 3, padding=1, seed=3)],
        [MaxPool2D(3, 1, 1), Conv2D(3, 1, 1, seed=4)],
    ])
    x = np.random.default_rng(0).permutation(2 * 3 * 5 * 5).reshape(2, 3, 5, 5) / 7.0
    check_layer_gradients(as_float64(block), x, rtol=1e-4, atol=1e-6)
    assert block.output_shape((2, 3, 5, 5)) == (2, 5, 5, 5)


@pytest.mark.parametrize("loss_cls", [SoftmaxCrossEntropy, SquaredHinge])
def test_loss_gradients(loss_cls):
    loss = loss_cls()
    scores = rand(6, 4) * 0.7
    labels = np.array([0, 1, 2, 3, 1, 0])
    f = lambda: loss.forward(scores, labels)  # noqa: E731
    f()
    analytic = loss.backward()
    np.testing.assert_allclose(analytic, numerical_grad(f, scores), rtol=1e-4, atol=1e-7)


def test_squared_hinge_value():
    loss = SquaredHinge()
    scores = np.array([[1.0, -1.0], [0.0, 0.5]])
    # targets [[1,-1],[-1,1]]: margins [[0,0],[1,0.5]] -> squares sum 1.25 over 4 elements
    assert loss.forward(scores, np.array([0, 1])) == pytest.approx(1.25 / 4)


@pytest.mark.parametrize("bad,match", [
    (lambda: Conv2D(0, 2), "in_channels must be a positive int"),
    (lambda: Conv2D(2, 2, stride=0), "stride must be a positive int"),
    (lambda: Affine(3, 2, init="nope"), "init must be one of"),
    (lambda: Dropout(1.0), r"ratio must be in \[0, 1\)"),
    (lambda: BatchNorm(3, eps=0), "eps must be > 0"),
])
def test_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_wrong_input_shapes_are_clear():
    with pytest.raises(ValueError, match="expects 3 input channels, got 2"):
        Conv2D(3, 2).forward(np.zeros((1, 2, 5, 5), np.float32))
    with pytest.raises(ValueError, match="expects 10 input features, got 12"):
        Affine(10, 2).forward(np.zeros((1, 12), np.float32))
    with pytest.raises(ValueError, match="does not fit"):
        Conv2D(1, 1, 5).forward(np.zeros((1, 1, 3, 3), np.float32))


def test_pixel_codes_maps_images_onto_the_dyadic_grid():
    from lowbit.layers import PixelCodes

    layer = PixelCodes(8)
    pixels = np.arange(256, dtype=np.uint8)
    x = (pixels.astype(np.float32) / np.float32(255))[None, :]
    y = layer.forward(np.concatenate([x, np.array([[-0.5, 1.5] + [0.5] * 254], np.float32)]), train=True)
    np.testing.assert_array_equal(y[0], (2 * pixels.astype(np.float32) - 255) / 256)
    assert y[1, 0] == -255 / 256 and y[1, 1] == 255 / 256 and y[1, 2] == 1 / 256  # clipped; rint(127.5) = 128
    grad = layer.backward(np.ones_like(y))
    assert grad[0, 0] == np.float32(2 * 255 / 256) and grad[1, 0] == 0 and grad[1, 1] == 0
    assert layer_from_config(layer.spec()).bits == 8
    with pytest.raises(ValueError, match="bits must be an int in 1..16, got 0"):
        PixelCodes(0)
