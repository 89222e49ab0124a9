"""Chapter-8 blocks: gradients, shapes, the shortcut's gradient path, and the zoo's deeper networks."""
import numpy as np
import pytest

from lowbit.blocks import bireal_block, inception_block, resnet_block, vgg_stack
from lowbit.layers import Sequential
from lowbit.quant_layers import QuantConv2D
from lowbit.zoo import bireal_resnet, inception_mnist, resnet_mnist, vgg_mnist
from gradcheck import as_float64, check_layer_gradients


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("cin,cout,stride", [(3, 3, 1), (2, 4, 2), (2, 4, 1)])
def test_resnet_block_gradients(cin, cout, stride):
    block = as_float64(Sequential(resnet_block(cin, cout, stride, seed=1)))
    check_layer_gradients(block, rand(3, cin, 6, 6) + 0.3, rtol=1e-4, atol=1e-6)
    shortcut = block.layers[0].shortcut
    assert (shortcut is None) == (cin == cout and stride == 1)


def test_inception_block_gradients_and_channels():
    block = inception_block(3, 2, 2, 3, 1, 2, 2, seed=0)
    x = rand(2, 3, 5, 5)
    assert block.forward(x.astype(np.float32), train=True).shape == (2, 2 + 3 + 2 + 2, 5, 5)
    check_layer_gradients(as_float64(block), x, rtol=1e-4, atol=1e-6)


def test_vgg_stack_shapes():
    layers = Sequential(vgg_stack(1, (4, 8), seed=0))
    assert layers.output_shape((2, 1, 28, 28)) == (2, 8, 7, 7)
    assert layers.forward(np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 8, 7, 7)


def test_bireal_block_is_binary_inside_and_real_outside():
    (block,) = bireal_block(4, 4, seed=0)
    conv = block.body.layers[0]
    assert isinstance(conv, QuantConv2D)
    assert conv.input_quantizer.precision == 1 and conv.kernel_quantizer.precision == 1
    x = rand(2, 4, 6, 6).astype(np.float32)
    out = block.forward(x, train=True)
    # the shortcut carries the real-valued input: subtracting it leaves the BN(binary conv) branch
    np.testing.assert_allclose(out - x, block.body.forward(x, train=True), rtol=1e-6, atol=1e-6)


def test_bireal_shortcut_passes_the_gradient():
    # with sign's straight-through gradient zero everywhere (|x| > 1), the body passes nothing back,
    # so the block's input gradient is exactly the upstream gradient carried by the shortcut
    (block,) = bireal_block(3, 3, seed=0)
    x = (np.sign(rand(2, 3, 5, 5)) * 3).astype(np.float32)
    block.forward(x, train=True)
    dout = rand(2, 3, 5, 5, seed=4).astype(np.float32)
    np.testing.assert_array_equal(block.backward(dout), dout)
    no_skip = Sequential(bireal_block(3, 3, seed=0, shortcut=False))
    no_skip.forward(x, train=True)
    assert not np.any(no_skip.backward(dout))


def test_bireal_options():
    from lowbit.layers import BatchNorm, Flatten, GlobalAvgPool2D

    gap, flat = bireal_resnet(0, widths=(4, 8, 16)), bireal_resnet(0, widths=(4, 8, 16), head="flatten")
    assert isinstance(gap.layers[-2], GlobalAvgPool2D) and gap.layers[-1].W.shape == (16, 10)
    assert isinstance(flat.layers[-2], Flatten) and flat.layers[-1].W.shape == (16 * 7 * 7, 10)
    (block,) = bireal_block(4, 4, seed=0, pre_bn=True)
    assert isinstance(block.body.layers[0], BatchNorm) and isinstance(block.body.layers[1], QuantConv2D)
    with pytest.raises(ValueError, match="head must be 'gap' or 'flatten', got 'max'"):
        bireal_resnet(0, head="max")


@pytest.mark.parametrize("build", [vgg_mnist, resnet_mnist, inception_mnist, bireal_resnet,
                                   lambda seed=0: bireal_resnet(seed, shortcut=False),
                                   lambda seed=0: bireal_resnet(seed, widths=(4, 8), head="flatten", pre_bn=True),
                                   lambda seed=0: resnet_mnist(seed, weight_bits=1, activation_bits=1)])
def test_deeper_networks_run_forward_and_backward(build):
    model = build(seed=0)
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    scores = model.forward(x, train=True)
    assert scores.shape == (2, 10)
    dx = model.backward(np.ones_like(scores))
    assert dx.shape == x.shape
    assert all(getattr(l, "d" + a) is not None for _, l, a in model.named_arrays(buffers=False))
