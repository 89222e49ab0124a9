"""The compiled float32 training kernels (lowbit.kernels.float_ops) against the numpy reference bodies
of lowbit.functions (selected by ``reference_ops()``): bit for bit where the arithmetic is the same,
float32 tolerance for BatchNorm, and whole training steps of the zoo's networks."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowbit import bit_products
from lowbit import functions as F
from lowbit.kernels import float_ops, pack_sign_columns, pack_signs
from lowbit.losses import SoftmaxCrossEntropy
from lowbit.optimizers import Adam
from lowbit.quant_layers import QuantAffine, QuantConv2D
from lowbit.zoo import binary_cnn, bnn_mlp, deep_convnet

# values with ties, signed zeros and infinities: where max, sign and select differ if done carelessly
EDGE_VALUES = np.array([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, np.inf, -np.inf, 1e-30], dtype=np.float32)


def bits(a):
    return np.ascontiguousarray(a).view(np.uint32)


def assert_same_bits(fast, ref):
    assert fast.dtype == ref.dtype and fast.shape == ref.shape
    np.testing.assert_array_equal(bits(fast), bits(ref))


def draw_array(rng, shape, edges):
    x = rng.standard_normal(shape).astype(np.float32)
    if edges:
        pick = rng.random(shape) < 0.4
        x[pick] = rng.choice(EDGE_VALUES, size=int(pick.sum()))
    return x


def both(fn, *args):
    """``fn(*args)`` through the compiled kernels and through the numpy reference."""
    fast = fn(*args)
    with F.reference_ops():
        ref = fn(*args)
    return fast, ref


@given(n=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 9), w=st.integers(1, 9),
       k=st.integers(1, 4), stride=st.integers(1, 3), padding=st.integers(0, 3),
       seed=st.integers(0, 2 ** 16), edges=st.booleans())
def test_maxpool_forward_backward_bit_for_bit(n, c, h, w, k, stride, padding, seed, edges):
    if padding >= k or h + 2 * padding < k or w + 2 * padding < k:
        return  # no window (or one all padding): the op refuses such shapes
    rng = np.random.default_rng(seed)
    x = draw_array(rng, (n, c, h, w), edges)
    (out, arg), (out_ref, arg_ref) = both(F.pool_forward, x, k, k, stride, padding, "max")
    assert_same_bits(out, out_ref)
    np.testing.assert_array_equal(arg, arg_ref)
    dout = draw_array(rng, out.shape, edges)
    with np.errstate(invalid="ignore"):  # inf + -inf where windows overlap: NaN in both
        dx, dx_ref = both(F.pool_backward, dout, arg_ref, x.shape, k, k, stride, padding, "max")
        assert_same_bits(dx, dx_ref)


def test_maxpool_takes_non_contiguous_input_and_names_bad_arguments():
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32).transpose(0, 3, 1, 2)
    (out, arg), (out_ref, arg_ref) = both(F.pool_forward, x, 2, 2, 2, 0, "max")
    assert_same_bits(out, out_ref)
    with pytest.raises(TypeError, match="x must have dtype float32, got float64"):
        float_ops.maxpool2d(np.zeros((1, 1, 4, 4)), 2, 2, 2, 0)
    with pytest.raises(ValueError, match="does not fit"):
        float_ops.maxpool2d(np.zeros((1, 1, 2, 2), np.float32), 3, 3, 1, 0)
    with pytest.raises(ValueError, match="argmax must have the shape of dout"):
        float_ops.maxpool2d_backward(np.ascontiguousarray(out), np.ascontiguousarray(arg[:, :, :1]), x.shape,
                                     2, 2, 2, 0)


@pytest.mark.parametrize("size", [7, 70_000])  # one thread, and the prange path
def test_relu_bit_for_bit(size):
    rng = np.random.default_rng(size)
    x = draw_array(rng, size, True)
    x[::97] = np.nan
    y, y_ref = both(F.relu, x)
    assert_same_bits(y, y_ref)
    dout = draw_array(rng, size, True)
    dx, dx_ref = both(F.relu_backward, y, dout)
    assert_same_bits(dx, dx_ref)


@pytest.mark.parametrize("size", [5, 100_003])
def test_sign_and_ste_grad_bit_for_bit(size):
    rng = np.random.default_rng(size)
    x = draw_array(rng, size, True)
    q, q_ref = both(F.sign, x)
    assert_same_bits(q, q_ref)
    dout = draw_array(rng, size, True)
    for clip in (1.0, 0.3, 2.5):
        g, g_ref = both(F.ste_grad, x, dout, clip)
        assert_same_bits(g, g_ref)


@pytest.mark.parametrize("size", [5, 100_003])
@pytest.mark.parametrize("fast", [True, False])
def test_sign_refuses_nan_wherever_it_is(size, fast):
    x = np.ones(size, dtype=np.float32)
    x[size - 1] = np.nan
    with F.reference_ops() if not fast else np.errstate():
        with pytest.raises(ValueError, match="SteSign got NaN input"):
            F.sign(x, "SteSign")


@given(shape=st.sampled_from([(1, 3), (7, 5), (100, 130), (2, 3, 1, 1), (3, 4, 5, 6), (16, 8, 7, 7)]),
       seed=st.integers(0, 2 ** 16), offset=st.floats(-3, 3))
def test_batchnorm_within_float32_rounding(shape, seed, offset):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = rng.standard_normal(shape).astype(np.float32) * 2 + np.float32(offset)
    gamma = rng.standard_normal(c).astype(np.float32)
    beta = rng.standard_normal(c).astype(np.float32)
    fast, ref = both(F.batchnorm_forward, x, gamma, beta, 1e-4)
    for a, b in zip(fast, ref):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    dout = rng.standard_normal(shape).astype(np.float32)
    fast_grads, ref_grads = both(F.batchnorm_backward, dout, ref[1], gamma, ref[4])
    # dx cancels to ~0 for tiny batches: measure its error against the size of the terms it sums
    scales = (np.abs(dout).max() * np.abs(gamma * ref[4]).max(), np.abs(dout).sum(), np.abs(dout).sum())
    for a, b, scale in zip(fast_grads, ref_grads, scales):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def channels_last(x):
    """``x`` (N, C, H, W) as the NCHW view of an NHWC buffer (a convolution's training output)."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


@given(shape=st.sampled_from([(2, 3, 1, 2), (3, 4, 5, 6), (16, 8, 7, 7), (5, 64, 3, 3)]),
       seed=st.integers(0, 2 ** 16), offset=st.floats(-3, 3), dout_layout=st.sampled_from(["nchw", "nhwc"]))
def test_batchnorm_on_channels_last_views(shape, seed, offset, dout_layout):
    """A channels-last input is normalised as it lies: outputs in its layout, values within float32
    rounding of the reference on the NCHW copy; the backward takes dout in either layout."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = rng.standard_normal(shape).astype(np.float32) * 2 + np.float32(offset)
    gamma, beta = (rng.standard_normal(c).astype(np.float32) for _ in range(2))
    fast = F.batchnorm_forward(channels_last(x), gamma, beta, 1e-4)
    with F.reference_ops():
        ref = F.batchnorm_forward(x, gamma, beta, 1e-4)
    assert F.channels_last(fast[0]) and F.channels_last(fast[1])
    for a, b in zip(fast, ref):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    dout = rng.standard_normal(shape).astype(np.float32)
    grads = F.batchnorm_backward(channels_last(dout) if dout_layout == "nhwc" else dout, fast[1], gamma,
                                 fast[4])
    with F.reference_ops():
        ref_grads = F.batchnorm_backward(dout, ref[1], gamma, ref[4])
    assert F.channels_last(grads[0])
    scales = (np.abs(dout).max() * np.abs(gamma * ref[4]).max(), np.abs(dout).sum(), np.abs(dout).sum())
    for a, b, scale in zip(grads, ref_grads, scales):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_batchnorm_channels_last_on_threads_repeats_on_any_thread_count():
    """A large channels-last BatchNorm runs on the threads (row blocks with float64 sums of their
    own, added in block order): the same bits on 1 and 2 threads, within float32 rounding of the
    reference."""
    import numba

    rng = np.random.default_rng(7)
    shape = (16, 64, 16, 16)  # 262,144 values: the parallel kernels' threshold
    x = channels_last(rng.standard_normal(shape).astype(np.float32) * 3 + 1)
    gamma, beta = (rng.standard_normal(64).astype(np.float32) for _ in range(2))
    dout = channels_last(rng.standard_normal(shape).astype(np.float32))
    previous = float_ops.set_threads(None)
    results = []
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            forward = float_ops.run_on_threads(threads, float_ops.batchnorm_forward, x, gamma, beta, 1e-4)
            backward = float_ops.run_on_threads(threads, float_ops.batchnorm_backward, dout, forward[1], gamma,
                                                forward[4])
            results.append(forward + backward)
    finally:
        float_ops.set_threads(previous)
    for a, b in zip(*results):
        assert_same_bits(np.ascontiguousarray(a), np.ascontiguousarray(b))
    with F.reference_ops():
        ref = F.batchnorm_forward(np.ascontiguousarray(x), gamma, beta, 1e-4)
    for a, b in zip(results[0][:5], ref):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_batchnorm_kernel_refuses_mixed_layouts():
    x = channels_last(np.ones((2, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="xn must have the layout of dout"):
        float_ops.batchnorm_backward(x, np.ones((2, 3, 4, 4), np.float32), np.ones(3, np.float32),
                                     np.ones(3, np.float32))


@given(n=st.integers(1, 3), c=st.sampled_from([1, 2, 4, 8, 16, 32, 64, 70]), h=st.integers(1, 7),
       w=st.integers(1, 7), o=st.integers(1, 9), padding=st.integers(0, 1), stride=st.integers(1, 2),
       layout=st.sampled_from(["nchw", "nhwc"]), seed=st.integers(0, 2 ** 16))
def test_binary_conv2d_pm1_channels_last_bit_for_bit(n, c, h, w, o, padding, stride, layout, seed):
    """The training layout of the bit kernel's output (an NCHW view of its NHWC result), from either
    input layout, holds the values of the contiguous one and of the float convolution."""
    if h + 2 * padding < 3 or w + 2 * padding < 3:
        return
    rng = np.random.default_rng(seed)
    xq = np.where(rng.random((n, c, h, w)) < 0.5, -1, 1).astype(np.float32)
    wq = np.where(rng.random((o, c, 3, 3)) < 0.5, -1, 1).astype(np.float32)
    x_in = channels_last(xq) if layout == "nhwc" else xq
    last = bit_products.binary_conv2d_pm1(x_in, wq, stride, padding, channels_last=True)
    flat = bit_products.binary_conv2d_pm1(xq, wq, stride, padding)
    assert flat.flags.c_contiguous and last.transpose(0, 2, 3, 1).flags.c_contiguous
    assert_same_bits(last, flat)
    col = F.im2col(xq, 3, 3, stride, padding).reshape(c * 9, -1)
    ref = (wq.reshape(o, -1) @ col).reshape(o, n, *flat.shape[2:]).transpose(1, 0, 2, 3)
    assert_same_bits(flat, np.ascontiguousarray(ref))


@pytest.mark.parametrize("size", [9, 50_001])
@pytest.mark.parametrize("bounds", [None, (-1.0, 1.0)])
def test_adam_update_bit_for_bit(size, bounds):
    rng = np.random.default_rng(size)
    arrays = [rng.standard_normal(size).astype(np.float32) for _ in range(2)]
    m0 = rng.standard_normal(size).astype(np.float32) * 0.1
    v0 = rng.random(size).astype(np.float32) * 0.01
    results = []
    for reference in (False, True):
        p, g, m, v = arrays[0] * 2, arrays[1].copy(), m0.copy(), v0.copy()
        with F.reference_ops() if reference else np.errstate():
            F.adam_update(p, g, m, v, 0.1, 0.001, 0.003, 1e-8, bounds)
        results.append((p, m, v))
    for a, b in zip(*results):
        assert_same_bits(a, b)
    if bounds is not None:
        assert np.abs(results[0][0]).max() <= 1.0


def train_steps(model, steps, seed, shape=(1, 28, 28), opt=None):
    rng = np.random.default_rng(seed)
    loss, opt = SoftmaxCrossEntropy(), Adam(0.01) if opt is None else opt
    losses = []
    for _ in range(steps):
        x = rng.random((8,) + shape, dtype=np.float32)
        y = rng.integers(0, 10, 8)
        losses.append(loss.forward(model.forward(x, train=True), y))
        model.backward(loss.backward())
        opt.step(model)
    return losses, {path: np.array(getattr(layer, attr)) for path, layer, attr in model.named_arrays()}


def test_deep_convnet_steps_equal_the_reference_bit_for_bit():
    # no BatchNorm: every kernel on this path (pool, ReLU, Adam) is exact, so the runs are identical;
    # the direct convolutions are not (float32 rounding, tests/test_float_conv.py): im2col here
    previous = F.use_direct_conv(False)
    try:
        fast = train_steps(deep_convnet(seed=3), 2, 0)
    finally:
        F.use_direct_conv(previous)
    with F.reference_ops():
        ref = train_steps(deep_convnet(seed=3), 2, 0)
    assert fast[0] == ref[0]
    for key in ref[1]:
        assert_same_bits(fast[1][key], ref[1][key])


@pytest.mark.parametrize("build", [
    lambda: bnn_mlp(seed=1, hidden=(64, 64)),
    lambda: binary_cnn(seed=1, channels=(4, 4, 8, 8), hidden=16),
], ids=["bnn_mlp", "binary_cnn"])
def test_binary_network_steps_follow_the_reference(build):
    # BatchNorm's sums differ in the last bits, and a sign may flip with them: compare closely,
    # not bit for bit
    model = build()
    fast = train_steps(model, 3, 0)
    with F.reference_ops():
        ref = train_steps(build(), 3, 0)
    np.testing.assert_allclose(fast[0], ref[0], rtol=1e-4)
    for key in ref[1]:
        np.testing.assert_allclose(fast[1][key], ref[1][key], rtol=1e-3, atol=1e-4, err_msg=key)
    clipped = [layer for _, layer in model.named_layers() if getattr(layer, "kernel_constraint", None)]
    assert clipped and all(np.abs(layer.W).max() <= 1.0 for layer in clipped)


@pytest.mark.parametrize("k,stride,padding", [(2, 2, 0), (3, 2, 1), (3, 1, 0), (2, 1, 1)])
def test_maxpool_nan_and_ties_bit_for_bit(k, stride, padding):
    rng = np.random.default_rng(k + stride + padding)
    x = rng.choice(np.array([np.nan, 1.0, 1.0, -np.inf, 0.0, -0.0], dtype=np.float32), (2, 3, 9, 8))
    (out, arg), (out_ref, arg_ref) = both(F.pool_forward, x, k, k, stride, padding, "max")
    assert_same_bits(out, out_ref)
    np.testing.assert_array_equal(arg, arg_ref)


@given(n=st.integers(1, 3), c=st.integers(1, 70), o=st.integers(1, 9), h=st.integers(1, 8),
       w=st.integers(1, 8), k=st.sampled_from([1, 2, 3]), stride=st.integers(1, 2),
       padding=st.integers(0, 2), bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_binary_conv_layer_on_bit_kernels_equals_float_simulation(n, c, o, h, w, k, stride, padding,
                                                                  bias, seed):
    if h + 2 * padding < k or w + 2 * padding < k:
        return
    rng = np.random.default_rng(seed)
    layers = [QuantConv2D(c, o, k, stride=stride, padding=padding, bias=bias, seed=seed,
                          input_quantizer="ste_sign", kernel_quantizer="ste_sign") for _ in range(2)]
    if bias:
        b = rng.standard_normal(o).astype(np.float32)
        for layer in layers:
            layer.b[:] = b
    x = rng.choice(EDGE_VALUES[:-3], (n, c, h, w)).astype(np.float32)  # zeros: sign(+-0) = +1
    out = layers[0].forward(x, train=True)
    assert layers[0]._cache_col is None  # the bit kernel ran
    with F.reference_ops():
        out_ref = layers[1].forward(x, train=True)
    assert_same_bits(out, out_ref)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    previous = F.use_direct_conv(False)  # the direct backward rounds differently: test_float_conv.py
    try:
        dx = layers[0].backward(dout)
    finally:
        F.use_direct_conv(previous)
    with F.reference_ops():
        dx_ref = layers[1].backward(dout)
    assert_same_bits(dx, dx_ref)
    assert_same_bits(layers[0].dW, layers[1].dW)


@given(n=st.integers(1, 12), k=st.integers(1, 200), m=st.integers(1, 70),
       scale=st.sampled_from([2.0, 1.25, 4.0, 0.5]), keep=st.floats(0.0, 1.0), bias=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_binary_affine_on_dropout_outputs_equals_float_simulation(n, k, m, scale, keep, bias, seed):
    """A +-1-weight QuantAffine without input quantizer (a BNN hidden layer after Dropout) runs
    dropout's {0, +-c} inputs on the masked XNOR-popcount product, bit for bit the float one."""
    rng = np.random.default_rng(seed)
    layers = [QuantAffine(k, m, bias=bias, seed=seed, kernel_quantizer="ste_sign") for _ in range(2)]
    x = (rng.choice(np.array([-1.0, 1.0]), (n, k)) * (rng.random((n, k)) < keep) * scale).astype(np.float32)
    x[x == 0] = rng.choice(np.array([0.0, -0.0], dtype=np.float32), int((x == 0).sum()))
    assert layers[0].binary_weight_float_input()
    assert bit_products.masked_binary_matmul(x, layers[0].effective_weight()) is not None or not np.any(x)
    out = layers[0].forward(x, train=True)
    with F.reference_ops():
        out_ref = layers[1].forward(x, train=True)
    assert_same_bits(out, out_ref)


@pytest.mark.parametrize("scale", [1.0, 2.0, 1.25])
@pytest.mark.parametrize("k", [64, 100])
def test_binary_affine_on_signs_without_zeros_equals_float_simulation(scale, k):
    """+-c without zeros (a hidden layer at evaluation, dropout off): the plain sign product."""
    rng = np.random.default_rng(k)
    layers = [QuantAffine(k, 9, bias=False, seed=3, kernel_quantizer="ste_sign") for _ in range(2)]
    x = (rng.choice(np.array([-1.0, 1.0]), (6, k)) * scale).astype(np.float32)
    out = layers[0].forward(x, train=False)
    with F.reference_ops():
        out_ref = layers[1].forward(x, train=False)
    assert_same_bits(out, out_ref)


def test_masked_product_only_for_dropout_outputs():
    from lowbit.kernels import masked_scale

    w = np.ones((64, 3), np.float32)
    assert masked_scale(np.array([0, -0.0, 2, -2], np.float32)) == 2.0
    for x in ([0, 2, 1], [0, 0], [2, np.nan], [np.inf, -np.inf]):
        assert masked_scale(np.array(x, np.float32)) == 0.0
    mixed = np.full((2, 64), 0.5, np.float32) + np.eye(2, 64, dtype=np.float32)  # 0.5 and 1.5
    assert bit_products.masked_binary_matmul(mixed, w) is None
    # c = 1 / 0.7 has a 24-bit mantissa: sums of it round, so the float product is kept
    assert bit_products.masked_binary_matmul(np.full((2, 64), 1 / 0.7, np.float32), w) is None
    with pytest.raises(TypeError, match="float32"):
        masked_scale(np.zeros(3))


@pytest.mark.parametrize("n,k,m", [(1, 1, 1), (5, 63, 3), (7, 64, 65), (3, 130, 17), (100, 3136, 256)])
def test_binary_affine_on_bit_kernels_equals_float_simulation(n, k, m):
    rng = np.random.default_rng(k)
    layers = [QuantAffine(k, m, bias=True, seed=k, input_quantizer="ste_sign", kernel_quantizer="ste_sign")
              for _ in range(2)]
    x = rng.standard_normal((n, k)).astype(np.float32)
    x[0, 0] = -0.0
    out = layers[0].forward(x, train=True)
    with F.reference_ops():
        out_ref = layers[1].forward(x, train=True)
    assert_same_bits(out, out_ref)
    w = rng.standard_normal((k, m)).astype(np.float32)
    np.testing.assert_array_equal(pack_sign_columns(w), pack_signs(np.ascontiguousarray(w.T)))
    w[k // 2, m // 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pack_sign_columns(w)


@pytest.mark.parametrize("layouts", [("c", "c"), ("t", "t"), ("t", "c"), ("c", "t"), ("s", "c")])
def test_elementwise_ops_take_permuted_views_as_they_lie(layouts):
    # "t": the NCHW view of a CNHW buffer (what Conv2D returns), "s": a strided slice (copied)
    rng = np.random.default_rng(7)

    def make(kind):
        if kind == "t":
            return draw_array(rng, (4, 3, 5, 6), True).transpose(1, 0, 2, 3)
        if kind == "s":
            return draw_array(rng, (3, 8, 5, 6), True)[:, ::2]
        return draw_array(rng, (3, 4, 5, 6), True)

    x, dout = make(layouts[0]), make(layouts[1])
    y, y_ref = both(F.relu, x)
    assert_same_bits(np.ascontiguousarray(y), np.ascontiguousarray(y_ref))
    if layouts[0] == "t":
        assert y.strides == x.strides  # no transposed copy
    for fn, args in ((F.relu_backward, (y_ref, dout)), (F.ste_grad, (x, dout, 1.0)), (F.sign, (x,))):
        fast, ref = both(fn, *args)
        assert_same_bits(np.ascontiguousarray(fast), np.ascontiguousarray(ref))
    with pytest.raises(ValueError, match="dout must have the layout of y"):
        float_ops.relu_backward(y_ref, np.ascontiguousarray(dout).transpose(0, 1, 3, 2).copy().transpose(0, 1, 3, 2))


def test_set_threads_caps_only_these_kernels_and_keeps_the_results():
    import numba

    x = draw_array(np.random.default_rng(3), (4, 8, 130, 130), True)  # above the parallel size
    before = numba.get_num_threads()
    previous = float_ops.set_threads(1)
    assert previous == 1  # the default: one thread beside BLAS's
    try:
        one = [F.relu(x), F.sign(x), F.pool_forward(x, 2, 2, 2, 0, "max")[0],
               F.batchnorm_forward(x, np.ones(8, np.float32), np.zeros(8, np.float32), 1e-4)[0]]
        assert numba.get_num_threads() == before  # restored after each kernel
        assert float_ops.set_threads(None) == 1  # now Numba's count
        every = [F.relu(x), F.sign(x), F.pool_forward(x, 2, 2, 2, 0, "max")[0],
                 F.batchnorm_forward(x, np.ones(8, np.float32), np.zeros(8, np.float32), 1e-4)[0]]
    finally:
        float_ops.set_threads(previous)
    for a, b in zip(one, every):
        assert_same_bits(a, b)
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        float_ops.set_threads(0)
