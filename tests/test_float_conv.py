"""The direct float32 convolution kernels (lowbit.kernels.float_conv, reached through
lowbit.functions.conv2d_direct) against the im2col reference (lowbit.functions.im2col / col2im and a
float32 GEMM): equal to float32 rounding for forward, backward-data and backward-weights, and whole
training steps of deep_convnet on either path."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowbit import functions as F
from lowbit.kernels import float_conv
from lowbit.layers import Conv2D
from lowbit.optimizers import SGD
from lowbit.quant_layers import QuantConv2D
from lowbit.zoo import binary_cnn, deep_convnet
from avx2_build import run_avx2_check
from test_float_ops import train_steps


def im2col_conv(x, w, b, stride, padding):
    """The reference forward and both gradients, as Conv2D computes them on the im2col path."""
    o, c, kh, kw = w.shape
    col = F.im2col(x, kh, kw, stride, padding)
    n, oh, ow = col.shape[3:]
    col2d = col.reshape(-1, n * oh * ow)
    out = w.reshape(o, -1) @ col2d
    if b is not None:
        out += b[:, None]

    def backward(dout):
        d2d = np.ascontiguousarray(dout.transpose(1, 0, 2, 3)).reshape(o, -1)
        dw = (col2d @ d2d.T).T.reshape(w.shape)
        dcol = (w.reshape(o, -1).T @ d2d).reshape(c, kh, kw, n, oh, ow)
        return F.col2im(dcol, x.shape, stride, padding), dw, d2d.sum(axis=1)

    return out.reshape(o, n, oh, ow).transpose(1, 0, 2, 3), backward


def assert_close(fast, ref, terms):
    """Equal to float32 rounding of sums of ``terms`` products of values of order 1."""
    assert fast.shape == ref.shape and fast.dtype == ref.dtype == np.float32
    scale = float(np.abs(ref).max()) + 1.0
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=4e-7 * np.sqrt(terms) * scale * 8)


def check_against_reference(n, c, o, h, w, kh, kw, stride, padding, bias, seed, layout="nchw"):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    if layout == "nhwc_view":  # what the previous direct convolution (and its ReLU) hands on
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    elif layout == "strided":
        x = np.repeat(x, 2, axis=3)[..., ::2]
    weight = rng.standard_normal((o, c, kh, kw)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32) if bias else None
    out, cache = F.conv2d_direct(x, weight, b, stride, padding)
    out_ref, backward = im2col_conv(x, weight, b, stride, padding)
    assert_close(out, out_ref, c * kh * kw)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dx, dw, db = F.conv2d_direct_backward(dout, cache, weight, stride, padding)
    dx_ref, dw_ref, db_ref = backward(dout)
    assert_close(dx, dx_ref, o * kh * kw)
    assert_close(dw, dw_ref, n * out.shape[2] * out.shape[3])
    if bias:
        assert_close(db, db_ref, n * out.shape[2] * out.shape[3])


@given(n=st.integers(1, 3), c=st.integers(1, 20), o=st.integers(1, 40), h=st.integers(1, 11),
       w=st.integers(1, 11), kh=st.integers(1, 4), kw=st.integers(1, 4), stride=st.integers(1, 3),
       padding=st.integers(0, 3), bias=st.booleans(), seed=st.integers(0, 2 ** 16),
       layout=st.sampled_from(["nchw", "nhwc_view", "strided"]))
def test_direct_conv_equals_im2col_within_float32_rounding(n, c, o, h, w, kh, kw, stride, padding, bias, seed,
                                                           layout):
    if padding >= min(kh, kw) or h + 2 * padding < kh or w + 2 * padding < kw:
        return
    check_against_reference(n, c, o, h, w, kh, kw, stride, padding, bias, seed, layout)


@pytest.mark.parametrize("c, o, h, padding", [
    (1, 16, 28, 1), (16, 16, 28, 1), (16, 32, 14, 1), (32, 32, 14, 2), (32, 64, 8, 1), (64, 64, 8, 1),
])
def test_deep_convnet_layer_shapes(c, o, h, padding):
    check_against_reference(2, c, o, h, h, 3, 3, 1, padding, True, 0)


# every register block (output channels in vectors of LANES: 4, 2 or 1 vectors, and one past them),
# odd sizes, stride 2
@pytest.mark.parametrize("o", [1, 15, 16, 17, 32, 48, 64, 80, 128])
@pytest.mark.parametrize("stride", [1, 2])
def test_every_register_block(o, stride):
    check_against_reference(3, 7, o, 9, 10, 3, 3, stride, 1, True, o)


def test_tile_shapes_fit_the_registers():
    registers = 32 if float_conv.LANES == 16 else 16
    for channels in (1, 16, 17, 32, 64, 80, 128):
        padded = -(-channels // float_conv.LANES) * float_conv.LANES
        shapes = [float_conv.tile_shape(channels)] + [float_conv.block_plan(width, channels)
                                                      for width in (1, 5, 8, 14, 16, 28, 224)]
        for rows, vectors in shapes:
            assert padded % (vectors * float_conv.LANES) == 0
            assert rows * vectors + vectors + 1 <= registers
    # the blocks waste no row on deep_convnet's output rows (28, 14, 16, 8 wide) and kernel rows
    # (3 * 16, 3 * 32, 3 * 64 positions)
    for length, channels in ((28, 16), (14, 32), (16, 32), (8, 64), (48, 16), (48, 32), (96, 32), (96, 64),
                             (192, 64)):
        assert length % float_conv.block_plan(length, channels)[0] == 0


# backward-weights' by-channel layout (rows: output channels, vectors along the kernel row), with
# positions past KW * C computed and dropped (47 and 80 of 48 and 96), one or two vectors of
# channels, strides 1 and 2
@pytest.mark.parametrize("c, kw, o", [(16, 3, 16), (47, 1, 16), (16, 3, 17), (20, 4, 32), (16, 3, 1)])
@pytest.mark.parametrize("stride", [1, 2])
def test_backward_weights_by_channel(c, kw, o, stride):
    assert float_conv.weight_plan(kw * c, -(-o // float_conv.LANES) * float_conv.LANES, 2)[0] == "channels"
    check_against_reference(3, c, o, 7, 9, 2, kw, stride, 0, True, c + o)


# ... and its window layout (rows: every position of the window, through an address table) for
# kernel rows too short to fill the registers: gray and two-channel first layers, padding 0 and 1
@pytest.mark.parametrize("c, o, padding", [(1, 16, 1), (1, 32, 0), (2, 16, 1), (1, 17, 1)])
@pytest.mark.parametrize("stride", [1, 2])
def test_backward_weights_window(c, o, padding, stride):
    # (on AVX2's 16 registers the window of a 16-channel layer does not fit: another layout runs)
    assert float_conv.LANES == 8 or float_conv.weight_plan(3 * c, -(-o // 16) * 16, 3)[0] == "window"
    check_against_reference(3, c, o, 9, 8, 3, 3, stride, padding, True, c + o + padding)


def test_weight_plans_fit_the_registers():
    registers = 32 if float_conv.LANES == 16 else 16
    for channels in (16, 32, 48, 64, 128):
        for run in (1, 3, 9, 16, 20, 47, 48, 96, 192, 576):
            for kernel_h in (1, 3):
                layout, rows, vectors = float_conv.weight_plan(run, channels, kernel_h)
                assert rows * vectors + vectors + 1 <= registers
                assert channels % (rows if layout == "channels" else vectors * float_conv.LANES) == 0
                assert layout != "window" or rows == kernel_h * run
    # deep_convnet's 16- and 32-channel kernel rows (3 * 16 and 3 * 32 positions) take it on AVX-512
    assert float_conv.LANES == 8 or [float_conv.weight_plan(run, channels, 3)[0] for run, channels in
                                     ((48, 16), (48, 32), (96, 32))] == ["channels"] * 3
    # and gray first layers (3 * 1 positions a kernel row) the window
    assert float_conv.LANES == 8 or [float_conv.weight_plan(3, channels, 3)[0] for channels in (16, 32)] == \
        ["window"] * 2


def steps_on_both_paths(build, steps):
    """``steps`` SGD steps of ``build()`` on the direct kernels and on im2col (other fast ops on).

    SGD: the parameters move linearly with the gradients (Adam's m / sqrt(v) turns a rounding
    difference in a near-zero gradient into a step of up to lr)."""
    fast = train_steps(build(), steps, 0, opt=SGD(0.01))
    previous = F.use_direct_conv(False)
    try:
        ref = train_steps(build(), steps, 0, opt=SGD(0.01))
    finally:
        F.use_direct_conv(previous)
    return fast, ref


def test_deep_convnet_steps_equal_the_im2col_path():
    fast, ref = steps_on_both_paths(lambda: deep_convnet(seed=3, dropout=0.0), 3)
    np.testing.assert_allclose(fast[0], ref[0], rtol=1e-5)
    for key in ref[1]:
        np.testing.assert_allclose(fast[1][key], ref[1][key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_binary_cnn_steps_follow_the_im2col_path():
    # the binary convolutions' backward runs on the direct kernels after a forward on the bit kernel
    fast, ref = steps_on_both_paths(lambda: binary_cnn(seed=1, channels=(4, 4, 8, 8), hidden=16), 2)
    np.testing.assert_allclose(fast[0], ref[0], rtol=1e-4)
    for key in ref[1]:
        np.testing.assert_allclose(fast[1][key], ref[1][key], rtol=1e-3, atol=1e-4, err_msg=key)


def test_switch_and_fallbacks_choose_the_path():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    layer = Conv2D(3, 5, 3, padding=1, seed=0)
    out = layer.forward(x, train=True)
    assert layer._cache_direct is not None and layer._cache_col is None
    previous = F.use_direct_conv(False)
    try:
        assert not F.direct_conv_enabled()
        out_ref = layer.forward(x, train=True)
        assert layer._cache_direct is None and layer._cache_col is not None
    finally:
        F.use_direct_conv(previous)
    assert_close(out, out_ref, 27)
    with F.reference_ops():
        layer.forward(x, train=True)
        assert layer._cache_col is not None
    # what the kernels do not cover runs on im2col: padding >= kernel, float64, other array types
    wide = Conv2D(3, 5, 3, padding=3, seed=0)
    wide.forward(x, train=True)
    assert wide._cache_col is not None
    w = layer.W
    assert not F.direct_conv_available(x.astype(np.float64), w, 1)
    assert not F.direct_conv_available(x, w, 3)
    assert not F.direct_conv_available(x.tolist(), w, 1)


def test_environment_selects_the_path(monkeypatch):
    monkeypatch.setenv("LOWBIT_CONV", "im2col")
    assert F._conv_path_from_environment() is False
    monkeypatch.setenv("LOWBIT_CONV", "direct")
    assert F._conv_path_from_environment() is True
    monkeypatch.setenv("LOWBIT_CONV", "winograd")
    with pytest.raises(ValueError, match="LOWBIT_CONV must be one of"):
        F._conv_path_from_environment()


def test_quant_conv_layer_float_weights_on_direct_kernels():
    # a quantized twin with 8-bit weights and float inputs takes the direct path like Conv2D
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 7, 7)).astype(np.float32)
    layers = [QuantConv2D(4, 6, 3, padding=1, seed=2, kernel_quantizer="dorefa_weight") for _ in range(2)]
    out = layers[0].forward(x, train=True)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dx = layers[0].backward(dout)
    with F.reference_ops():
        out_ref = layers[1].forward(x, train=True)
        dx_ref = layers[1].backward(dout)
    assert_close(out, out_ref, 36)
    assert_close(dx, dx_ref, 54)
    assert_close(layers[0].dW, layers[1].dW, 98)


def test_kernels_name_bad_arguments():
    x = np.zeros((1, 2, 5, 5), np.float32)
    w = np.zeros((3, 2, 3, 3), np.float32)
    with pytest.raises(TypeError, match="x must"):
        float_conv.conv2d_forward(x.astype(np.float64), w, None, 1, 1)
    with pytest.raises(ValueError, match="x must have 2 channels"):
        float_conv.conv2d_forward(np.zeros((1, 4, 5, 5), np.float32), w, None, 1, 1)
    with pytest.raises(ValueError, match="bias must have shape"):
        float_conv.conv2d_forward(x, w, np.zeros(2, np.float32), 1, 1)
    with pytest.raises(ValueError, match="stride"):
        float_conv.conv2d_forward(x, w, None, 0, 1)
    with pytest.raises(ValueError, match="does not fit"):
        float_conv.conv2d_forward(np.zeros((1, 2, 1, 1), np.float32), w, None, 1, 0)
    with pytest.raises(ValueError, match="dout must have shape"):
        float_conv.conv2d_backward_data(np.zeros((1, 3, 4, 4), np.float32), w, x.shape, 1, 1)
    with pytest.raises(ValueError, match="padding must be smaller"):
        float_conv.conv2d_backward_data(np.zeros((1, 3, 9, 9), np.float32), w, x.shape, 1, 3)
    with pytest.raises(ValueError, match="x_padded must have 2 channels"):
        float_conv.conv2d_backward_weights(np.zeros((1, 3, 5, 5), np.float32), np.zeros((1, 7, 7, 3), np.float32),
                                           w.shape, 1)


def test_threads_setting_keeps_the_results():
    # bit for bit: training runs repeat exactly (resume equals uninterrupted) on any thread count
    rng = np.random.default_rng(4)
    x = rng.standard_normal((11, 8, 9, 9)).astype(np.float32)
    w = rng.standard_normal((32, 8, 3, 3)).astype(np.float32)
    runs = []
    for threads in (1, None):
        previous = float_conv.set_threads(threads)
        try:
            out, cache = float_conv.conv2d_forward(x, w, None, 1, 1)
            dout = np.ones_like(out)
            runs.append((out, float_conv.conv2d_backward_weights(dout, cache, w.shape, 1)[0]))
        finally:
            float_conv.set_threads(previous)
    np.testing.assert_array_equal(runs[0][0], runs[1][0])  # forward: the same sums per pixel
    np.testing.assert_array_equal(runs[0][1], runs[1][1])  # backward-weights: fixed image chunks
    with pytest.raises(ValueError):
        float_conv.set_threads(0)


def test_bench_float_conv_smoke(monkeypatch, capsys):
    import importlib.util
    import os

    experiments = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
    monkeypatch.syspath_prepend(experiments)  # the script imports bench_training beside it
    spec = importlib.util.spec_from_file_location("bench_float_conv", os.path.join(experiments, "bench_float_conv.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--threads", "1", "--repeats", "1", "--batch", "2", "--gemm-size", "32", "--no-torch"])
    (run,) = result["runs"]
    passes = {(r["contender"], r["pass"]) for r in run["rows"]}
    assert {("direct", p) for p in bench.PASSES} <= passes and {("im2col", p) for p in bench.PASSES} <= passes
    assert all(r["best_ms"] > 0 and r["gflops_best"] > 0 for r in run["rows"])
    assert result["machine"]["cpu_model"] and "loadavg_before" in result["machine"]
    assert "| direct |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])


@pytest.mark.parametrize("k, stride", [(2, 2), (3, 3), (2, 3), (3, 2), (1, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_max_pooling_of_channels_last_views_bit_for_bit(k, stride, seed):
    # a direct convolution's output is an NCHW view of an NHWC buffer: pooled as it lies, with the
    # reference's values, ties (first maximum wins), NaN and signed zeros included
    rng = np.random.default_rng(seed)
    edges = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan], dtype=np.float32)
    nhwc = rng.choice(edges, (3, 9, 10, 20)).astype(np.float32)
    x = nhwc.transpose(0, 3, 1, 2)
    out, arg = F.pool_forward(x, k, k, stride, 0, "max")
    assert not out.flags.c_contiguous and out.transpose(0, 2, 3, 1).flags.c_contiguous
    dout = rng.standard_normal(out.shape).astype(np.float32).transpose(0, 2, 3, 1).copy().transpose(0, 3, 1, 2)
    dx = F.pool_backward(dout, arg, x.shape, k, k, stride, 0, "max")
    with F.reference_ops():
        out_ref, arg_ref = F.pool_forward(np.ascontiguousarray(x), k, k, stride, 0, "max")
        dx_ref = F.pool_backward(np.ascontiguousarray(dout), arg_ref, x.shape, k, k, stride, 0, "max")
    bits = lambda a: np.ascontiguousarray(a).view(np.uint32)  # noqa: E731
    np.testing.assert_array_equal(bits(out), bits(out_ref))
    np.testing.assert_array_equal(arg, arg_ref)
    np.testing.assert_array_equal(bits(dx), bits(dx_ref))


def test_channels_last_pool_kernels_name_bad_arguments():
    from lowbit.kernels import float_ops

    x = np.zeros((1, 4, 4, 3), np.float32)
    out, arg = float_ops.maxpool2d_nhwc(x, 2, 2, 2)
    with pytest.raises(ValueError, match="stride must be >="):
        float_ops.maxpool2d_nhwc_backward(out, arg, x.shape, 2, 2, 1)
    with pytest.raises(TypeError, match="argmax must be a numpy int8"):
        float_ops.maxpool2d_nhwc_backward(out, arg.astype(np.int32), x.shape, 2, 2, 2)
    with pytest.raises(ValueError, match="x_shape must be"):
        float_ops.maxpool2d_nhwc_backward(out, arg, (1, 3, 4, 4), 2, 2, 2)


def test_small_products_run_on_one_blas_thread_and_equal_numpy():
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"]

    rng = np.random.default_rng(5)
    a = rng.standard_normal((100, 1024)).astype(np.float32)
    b = rng.standard_normal((1024, 50)).astype(np.float32)
    before = blas_threads()
    np.testing.assert_array_equal(F.matmul(a, b), a @ b)
    assert blas_threads() == before  # the one-thread limit is lifted after the product
    half = F.matmul(a.astype(np.float16), b.astype(np.float16))
    assert half.dtype == np.float16


def test_inference_output_has_the_im2col_layout_and_the_training_values():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 8, 9, 9)).astype(np.float32)
    layer = Conv2D(8, 16, 3, padding=1, seed=1)
    trained = layer.forward(x, train=True)
    inferred = layer.forward(x, train=False)
    assert trained.transpose(0, 2, 3, 1).flags.c_contiguous  # channels-last while training
    assert inferred.transpose(1, 0, 2, 3).flags.c_contiguous  # (O, N, OH, OW), as im2col lays it out
    np.testing.assert_array_equal(inferred, trained)


def test_inference_on_few_input_channels_runs_the_few_channel_kernel():
    # A first layer on gray images: in inference the few-channel kernel (vectorised over pixels) runs,
    # in the im2col layout; its values are within rounding of im2col's and of the training forward's.
    from lowbit.kernels.few_channel_conv import few_channel_conv2d

    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 1, 9, 9)).astype(np.float32)
    layer = Conv2D(1, 16, 3, padding=1, seed=1)
    trained = layer.forward(x, train=True)
    inferred = layer.forward(x, train=False)
    assert inferred.transpose(1, 0, 2, 3).flags.c_contiguous
    np.testing.assert_array_equal(inferred, few_channel_conv2d(x, layer.W, layer.b, 1, 1))
    previous = F.use_direct_conv(False)
    try:
        reference = layer.forward(x, train=False)
    finally:
        F.use_direct_conv(previous)
    np.testing.assert_allclose(inferred, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(inferred, trained, rtol=1e-5, atol=1e-5)


# The float convolutions compiled for AVX2 (8 lanes, 16 registers: other blocks, and other
# backward-weights layouts for the same layer) against im2col, in a subprocess with its own Numba
# cache: the machines that run the suite have AVX-512.
_AVX2_FLOAT_CHECK = """
import numpy as np
from lowbit import functions as F
from lowbit.kernels import float_conv as fc
assert fc.LANES == 8, fc.LANES
rng = np.random.default_rng(0)
layouts = set()
for c, o, h, stride, pad in [(1, 16, 9, 1, 1), (1, 8, 9, 2, 1), (16, 16, 9, 1, 1), (8, 8, 8, 1, 1),
                             (16, 32, 7, 2, 1), (5, 24, 8, 1, 0), (32, 64, 6, 1, 1)]:
    layouts.add(fc.weight_plan(3 * c, -(-o // 8) * 8, 3)[0])
    x = rng.standard_normal((3, c, h, h)).astype(np.float32)
    w = rng.standard_normal((o, c, 3, 3)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    out, xp = fc.conv2d_forward(x, w, b, stride, pad)
    col2d = F.im2col(x, 3, 3, stride, pad).reshape(c * 9, -1)
    oh = out.shape[2]
    ref = (w.reshape(o, -1) @ col2d + b[:, None]).reshape(o, 3, oh, oh).transpose(1, 0, 2, 3)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    d2d = np.ascontiguousarray(dout.transpose(1, 0, 2, 3)).reshape(o, -1)
    dw, db = fc.conv2d_backward_weights(dout, xp, w.shape, stride)
    np.testing.assert_allclose(dw, (col2d @ d2d.T).T.reshape(w.shape), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(db, d2d.sum(axis=1), rtol=1e-4, atol=1e-3)
    if c > 2:
        dx = fc.conv2d_backward_data(dout, w, x.shape, stride, pad)
        dcol = (w.reshape(o, -1).T @ d2d).reshape(c, 3, 3, 3, oh, oh)
        np.testing.assert_allclose(dx, F.col2im(dcol, x.shape, stride, pad), rtol=1e-4, atol=1e-3)
assert layouts == {"positions", "channels", "window"}, layouts
print("ok")
"""


@pytest.mark.slow
def test_avx2_build_of_the_float_convolutions(tmp_path):
    run_avx2_check(_AVX2_FLOAT_CHECK, tmp_path)
