"""Properties of lowbit.kernels, every path compared bit for bit with tests/reference.py.

Each property runs on the CPU (Numba) and, when a CUDA device is present, on the GPU (CuPy): the
``device`` fixture moves the inputs there and the results back.  Bit convention and layouts: see
the module docstring of lowbit.kernels.
"""
from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lowbit.kernels as kernels
from lowbit.backend import cupy
from lowbit.kernels._intrinsics import HOST_FEATURES

import reference

DEVICES = [
    "cpu",
    pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(cupy is None, reason="no CUDA device")]),
]


class Device:
    """Moves arrays to one path of the kernels and back."""

    def __init__(self, name):
        self.name = name

    def put(self, array):
        array = np.ascontiguousarray(array)
        return cupy.asarray(array) if self.name == "gpu" else array

    def get(self, array):
        if self.name == "gpu":
            assert isinstance(array, cupy.ndarray), "the CuPy path must return a CuPy array"
            return cupy.asnumpy(array)
        assert isinstance(array, np.ndarray), "the Numba path must return a numpy array"
        return array


@pytest.fixture(scope="module", params=DEVICES)
def device(request):
    return Device(request.param)


def signs(rng, shape, style):
    """Real test values: gaussian, with many exact zeros and -0.0, or a single repeated value."""
    if style == "gaussian":
        return rng.standard_normal(shape)
    if style == "zeros":
        values = rng.choice(np.array([0.0, -0.0, 1.5, -2.0]), size=shape)
        return values
    if style == "negative":
        return -np.ones(shape)
    return np.zeros(shape)  # "positive": all +1 (sign(0) = +1)


STYLES = st.sampled_from(["gaussian", "zeros", "negative", "positive"])
SEEDS = st.integers(0, 2**32 - 1)

# ------------------------------------------------------------------------------------------------
# pack_signs / unpack_signs
# ------------------------------------------------------------------------------------------------

EDGE_FLOATS = st.floats(allow_nan=False, width=32) | st.sampled_from(
    [0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45]
)


@given(
    x=hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64]),
        shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5).flatmap(
            lambda s: st.integers(1, 200).map(lambda k: s[:-1] + (k,))
        ),
        elements=EDGE_FLOATS,
    )
)
def test_pack_matches_loops_and_round_trips(device, x):
    packed = device.get(kernels.pack_signs(device.put(x)))
    np.testing.assert_array_equal(packed, reference.pack_signs_loops(x))
    values = device.get(kernels.unpack_signs(device.put(packed), x.shape[-1]))
    np.testing.assert_array_equal(values, reference.sign_pm1(x))


@pytest.mark.parametrize("k", [1, 63, 64, 65, 127, 128, 129])
def test_pack_padding_bits_are_zero(device, k):
    packed = device.get(kernels.pack_signs(device.put(np.zeros((3, k)))))  # every element is +1
    assert packed.shape == (3, (k + 63) // 64)
    assert np.all(packed[:, :-1] == np.uint64(2**64 - 1))
    assert np.all(packed[:, -1] == np.uint64(2**64 - 1) >> np.uint64(64 * packed.shape[1] - k))


def test_pack_bit_order(device):
    x = -np.ones(130)
    x[[0, 63, 64, 129]] = [0.0, -0.0, 2.0, 5.0]  # 0 and -0.0 are +1
    packed = device.get(kernels.pack_signs(device.put(x)))
    assert packed.tolist() == [1 | (1 << 63), 1, 2]


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint8, np.float16])
def test_pack_other_real_dtypes(device, dtype):
    x = np.array([[0, 1, 5, 7, 0, 2, 100]], dtype=dtype)
    if np.dtype(dtype).kind != "u":
        x = x * np.array([1, -1, 1, -1, -1, 1, -1]).astype(dtype)
    packed = device.get(kernels.pack_signs(device.put(x)))
    np.testing.assert_array_equal(packed, reference.pack_signs_loops(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int8, np.int32])
def test_unpack_dtype(device, dtype):
    packed = kernels.pack_signs(device.put(np.array([[-1.0, 0.0, 3.0]])))
    values = device.get(kernels.unpack_signs(packed, 3, dtype))
    assert values.dtype == dtype
    np.testing.assert_array_equal(values, [[-1, 1, 1]])


@given(k=st.sampled_from([1, 2, 4, 8, 16, 32]), rows=st.integers(1, 300),
       dtype=st.sampled_from([np.float32, np.float64, np.int8]), seed=SEEDS)
def test_pack_narrow_rows_match_loops(k, rows, dtype, seed):
    """Rows of k < 64 elements, k dividing 64 (a narrow convolution's channels-last input): one
    64-lane compare covers several rows (kernels.pack._pack_signs_narrow_cpu); the last rows alone."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)) * 10
    x[rng.random(x.shape) < 0.1] = 0
    x = x.astype(dtype)
    if dtype != np.int8:
        x[rng.random(x.shape) < 0.05] = -0.0
    np.testing.assert_array_equal(kernels.pack_signs(x), reference.pack_signs_loops(x))


@pytest.mark.parametrize("where", [0, 63, 64 * 3 - 1, 64 * 3])
def test_pack_narrow_rows_reject_nan(where):
    x = np.ones(64 * 3 + 32, dtype=np.float32)
    x[where] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        kernels.pack_signs(x.reshape(-1, 32))


def test_pack_rejects_nan(device):
    x = np.zeros((2, 70), dtype=np.float32)
    x[1, 66] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        kernels.pack_signs(device.put(x))


# ------------------------------------------------------------------------------------------------
# xnor_gemm
# ------------------------------------------------------------------------------------------------


def check_gemm(device, m, n, k, seed, style):
    rng = np.random.default_rng(seed)
    a_values, b_values = signs(rng, (m, k), style), signs(rng, (n, k), "gaussian")
    a_packed, b_packed = kernels.pack_signs(a_values), kernels.pack_signs(b_values)
    product = device.get(kernels.xnor_gemm(device.put(a_packed), device.put(b_packed), k))
    assert product.dtype == np.int32 and product.shape == (m, n)
    np.testing.assert_array_equal(product, reference.xnor_gemm_matmul(a_values, b_values))
    np.testing.assert_array_equal(product, reference.xnor_gemm_bitcount(a_packed, b_packed, k))


@given(m=st.integers(1, 300), n=st.integers(1, 300), k=st.integers(1, 400), seed=SEEDS, style=STYLES)
def test_xnor_gemm_equals_integer_matmul(device, m, n, k, seed, style):
    check_gemm(device, m, n, k, seed, style)


@pytest.mark.parametrize(
    "m, n, k",
    [
        (1, 1, 1),  # K = 1
        (1, 1, 64),
        (1, 1, 65),
        (7, 33, 64),  # one row past a tile, one column past a panel
        (6, 32, 128),  # exactly one tile
        (13, 65, 65),
        (130, 129, 1000),
        (2, 300, 1),
    ],
)
def test_xnor_gemm_edge_shapes(device, m, n, k):
    check_gemm(device, m, n, k, seed=m * 1000 + n + k, style="gaussian")


@pytest.mark.parametrize("style", ["zeros", "negative", "positive"])
def test_xnor_gemm_edge_values(device, style):
    check_gemm(device, 9, 40, 130, seed=1, style=style)


def test_xnor_gemm_out_argument(device):
    rng = np.random.default_rng(0)
    a_values, b_values = rng.standard_normal((20, 100)), rng.standard_normal((37, 100))
    out = device.put(np.full((20, 37), 12345, dtype=np.int32))
    a_packed, b_packed = device.put(kernels.pack_signs(a_values)), device.put(kernels.pack_signs(b_values))
    result = kernels.xnor_gemm(a_packed, b_packed, 100, out=out)
    assert result is out
    np.testing.assert_array_equal(device.get(out), reference.xnor_gemm_matmul(a_values, b_values))


def test_xnor_gemm_empty(device):
    empty = device.put(np.zeros((0, 2), dtype=np.uint64))
    full = device.put(np.zeros((3, 2), dtype=np.uint64))
    assert device.get(kernels.xnor_gemm(empty, full, 100)).shape == (0, 3)
    assert device.get(kernels.xnor_gemm(full, empty, 100)).shape == (3, 0)
    no_words = device.put(np.zeros((3, 0), dtype=np.uint64))
    np.testing.assert_array_equal(device.get(kernels.xnor_gemm(no_words, no_words, 0)), np.zeros((3, 3)))
    assert device.get(kernels.pack_signs(device.put(np.zeros((3, 0))))).shape == (3, 0)
    assert device.get(kernels.unpack_signs(no_words, 0)).shape == (3, 0)


# ------------------------------------------------------------------------------------------------
# binary_conv2d
# ------------------------------------------------------------------------------------------------


def check_conv(
    device, batch, channels, n_out, height, width, kernel, stride, padding, seed, style="gaussian", prepared=False
):
    """binary_conv2d against the float convolution; with ``prepared``, prepared weights too (equal)."""
    rng = np.random.default_rng(seed)
    x = signs(rng, (batch, channels, height, width), style)
    w = signs(rng, (n_out, channels) + kernel, "gaussian")
    x_packed = kernels.pack_signs(x.transpose(0, 2, 3, 1).copy())
    w_packed = kernels.pack_signs(w.transpose(0, 2, 3, 1).copy())
    expected = reference.conv2d_direct(reference.sign_pm1(x), reference.sign_pm1(w), stride, padding)
    weights = [device.put(w_packed)]
    if prepared:
        weights.append(kernels.prepare_conv_weights(weights[0], channels))
    # On the CPU the threads share the preparation tasks (weight panels, padded rows) of one call:
    # check with one thread and with the default count.
    for threads in (1, numba.get_num_threads()) if device.name == "cpu" else (None,):
        saved = numba.get_num_threads()
        if threads is not None:
            numba.set_num_threads(threads)
        try:
            outs = [kernels.binary_conv2d(device.put(x_packed), w, channels, stride, padding) for w in weights]
            if prepared:
                outs.append(kernels.binary_conv2d(device.put(x_packed), weights[1], None, stride, padding))
            # float32 results, converted by the kernel as it stores
            floats = [kernels.binary_conv2d(device.put(x_packed), w, channels, stride, padding, dtype=np.float32)
                      for w in weights]
        finally:
            numba.set_num_threads(saved)
        for out in outs:
            out = device.get(out)
            assert out.dtype == np.int32
            np.testing.assert_array_equal(out, expected.transpose(0, 2, 3, 1).astype(np.int64))
        for out in floats:
            out = device.get(out)
            assert out.dtype == np.float32
            np.testing.assert_array_equal(out, expected.transpose(0, 2, 3, 1))


CONV_CASES = dict(
    batch=st.integers(1, 2),
    channels=st.integers(1, 140),
    n_out=st.integers(1, 40),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    seed=SEEDS,
)


@given(**CONV_CASES, style=STYLES)
def test_binary_conv2d_equals_float_convolution(
    device, batch, channels, n_out, height, width, kernel, stride, padding, seed, style
):
    assume(height + 2 * padding[0] >= kernel[0] and width + 2 * padding[1] >= kernel[1])
    check_conv(device, batch, channels, n_out, height, width, kernel, stride, padding, seed, style)


@given(**CONV_CASES)
def test_binary_conv2d_prepared_weights_give_the_same_result(
    device, batch, channels, n_out, height, width, kernel, stride, padding, seed
):
    assume(height + 2 * padding[0] >= kernel[0] and width + 2 * padding[1] >= kernel[1])
    check_conv(device, batch, channels, n_out, height, width, kernel, stride, padding, seed, prepared=True)


@pytest.mark.parametrize(
    "channels, n_out, size, kernel, stride, padding",
    [
        (1, 1, 1, (1, 1), (1, 1), (0, 0)),
        (64, 8, 5, (3, 3), (1, 1), (1, 1)),  # one full word of channels
        (65, 8, 5, (3, 3), (2, 2), (1, 1)),  # one channel past a word
        (3, 33, 4, (3, 3), (1, 1), (2, 2)),  # padding 2: some windows are mostly padding
        (130, 5, 7, (1, 3), (1, 2), (0, 1)),
        (16, 4, 2, (4, 4), (1, 1), (1, 1)),  # kernel larger than the input
        (1, 1, 1, (1, 1), (1, 1), (0, 2)),  # found by hypothesis: windows entirely in the padding
        (5, 3, 2, (2, 2), (1, 1), (2, 2)),  # ... at every corner
        (70, 40, 15, (3, 3), (2, 2), (1, 1)),  # full micro-kernel tiles, a partial panel
        (64, 64, 14, (3, 3), (1, 1), (1, 1)),  # a daBNN-like layer
        (200, 33, 13, (3, 2), (1, 3), (2, 0)),
    ],
)
def test_binary_conv2d_edge_cases(device, channels, n_out, size, kernel, stride, padding):
    check_conv(device, 2, channels, n_out, size, size, kernel, stride, padding, seed=channels + n_out)


def test_binary_conv2d_dtype_checks():
    x = kernels.pack_signs(np.ones((1, 3, 3, 8), dtype=np.float32))
    w = kernels.pack_signs(np.ones((2, 3, 3, 8), dtype=np.float32))
    for bad in (np.int64, np.float64, "bogus", [1]):
        with pytest.raises(ValueError, match="dtype must be numpy.int32 or numpy.float32"):
            kernels.binary_conv2d(x, w, 8, 1, 1, dtype=bad)
    assert kernels.binary_conv2d(x, w, 8, 1, 1, dtype="float32")[0, 1, 1, 0] == 72.0


def test_binary_conv2d_int_stride_and_padding(device):
    check_conv(device, 1, 10, 3, 6, 6, (3, 3), 2, 1, seed=3)


def test_prepared_conv_weights_are_a_copy(device):
    rng = np.random.default_rng(5)
    original = kernels.pack_signs(rng.standard_normal((33, 3, 3, 70)))
    w_packed = device.put(original.copy())
    x_packed = device.put(kernels.pack_signs(rng.standard_normal((1, 6, 6, 70))))
    prepared = kernels.prepare_conv_weights(w_packed, 70)
    assert prepared.channels == 70 and prepared.shape == (33, 3, 3, 2)
    expected = device.get(kernels.binary_conv2d(x_packed, w_packed, 70, 2, 1))
    w_packed[...] = 0  # changing the weights afterwards does not change the prepared ones
    np.testing.assert_array_equal(device.get(kernels.binary_conv2d(x_packed, prepared, None, 2, 1)), expected)
    np.testing.assert_array_equal(device.get(prepared.weights), original)


def test_prepared_conv_weights_raise_clear_errors(device):
    put = device.put
    good = put(np.zeros((4, 3, 3, 2), dtype=np.uint64))
    prepared = kernels.prepare_conv_weights(good, 100)
    x = put(np.zeros((1, 5, 5, 2), dtype=np.uint64))
    with pytest.raises(ValueError, match=r"channels=90 does not match the prepared weights \(channels=100\)"):
        kernels.binary_conv2d(x, prepared, 90)
    with pytest.raises(ValueError, match=r"x_packed must have ceil\(channels / 64\) = 2 words"):
        kernels.binary_conv2d(put(np.zeros((1, 5, 5, 1), dtype=np.uint64)), prepared)
    with pytest.raises(TypeError, match="w_packed must be a numpy or CuPy array or PreparedConvWeights"):
        kernels.binary_conv2d(x, [[0]], 100)
    with pytest.raises(TypeError, match="channels .* is required with packed weights"):
        kernels.binary_conv2d(x, good)
    with pytest.raises(TypeError, match="made by prepare_conv_weights"):
        kernels.PreparedConvWeights(good, 100)
    with pytest.raises(TypeError, match="w_packed must be a numpy or CuPy array"):
        kernels.prepare_conv_weights([[0]], 100)
    with pytest.raises(ValueError, match=r"w_packed must have ceil\(channels / 64\) = 1 words .* channels=64"):
        kernels.prepare_conv_weights(good, 64)
    with pytest.raises(ValueError, match="padding bits"):
        kernels.prepare_conv_weights(put(np.full((4, 3, 3, 2), 2**63, dtype=np.uint64)), 100)
    with pytest.raises(ValueError, match="w_packed must be 4-D"):
        kernels.prepare_conv_weights(put(np.zeros((4, 9, 2), dtype=np.uint64)), 100)
    if cupy is not None and device.name == "cpu":
        with pytest.raises(TypeError, match="must all be numpy or all CuPy"):
            kernels.binary_conv2d(cupy.asarray(x), prepared)


# ------------------------------------------------------------------------------------------------
# bn_sign_threshold / threshold_pack
# ------------------------------------------------------------------------------------------------


def check_threshold(device, acc, gamma, beta, mean, var, eps, dtype=np.float64, order="divide"):
    threshold, direction = kernels.bn_sign_threshold(
        device.put(gamma), device.put(beta), device.put(mean), device.put(var), eps, dtype=dtype, order=order
    )
    packed = device.get(kernels.threshold_pack(device.put(acc), threshold, direction))
    bits = reference.bn_sign_float(acc, gamma, beta, mean, var, eps, dtype, order)
    np.testing.assert_array_equal(packed, reference.pack_signs_loops(2 * bits - 1))


def near_boundary(rng, rows, gamma, beta, mean, var, eps):
    """int32 accumulators around each channel's real boundary (the interesting ones) and far away."""
    root = mean - beta * np.sqrt(var + eps) / np.where(gamma == 0, 1, gamma)
    root = np.clip(np.nan_to_num(root), -(2.0**31), 2.0**31 - 1)
    offsets = rng.integers(-3, 4, size=(rows, gamma.size))
    acc = np.clip(np.floor(root) + offsets, -(2**31), 2**31 - 1)
    far = rng.random((rows, gamma.size)) < 0.2
    acc[far] = rng.integers(-(2**31), 2**31 - 1, size=int(far.sum()))
    return acc.astype(np.int32)


FINITE = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)


@given(
    channels=st.integers(1, 140),
    seed=SEEDS,
    params=st.tuples(FINITE, FINITE, FINITE, st.floats(0, 1e4, width=32)) | st.just(None),
    eps=st.sampled_from([1e-5, 1e-4, 0.0, 1e-3]),
    dtype=st.sampled_from([np.float64, np.float32]),
    order=st.sampled_from(["divide", "inverse"]),
)
def test_threshold_equals_batchnorm_then_sign(device, channels, seed, params, eps, dtype, order):
    rng = np.random.default_rng(seed)
    if params is None:
        gamma = rng.choice([-2.0, -0.5, 0.0, -0.0, 1e-7, 0.5, 3.0], size=channels) * rng.random(channels)
        beta = rng.normal(0, 5, channels).round(rng.integers(0, 3))  # ties on integers and halves
        mean = rng.normal(0, 50, channels).round(rng.integers(0, 2))
        var = rng.choice([0.25, 1.0, 2.0, 1e4], size=channels)
    else:
        gamma, beta, mean, var = (np.full(channels, v, dtype=np.float64) for v in params)
    var = np.maximum(var, 0.0)
    assume(np.all(var + eps > 0))
    acc = near_boundary(rng, 6, gamma, beta, mean, var, eps)
    check_threshold(device, acc, gamma, beta, mean, var, eps, dtype, order)


@pytest.mark.parametrize(
    "gamma, beta, mean, var, eps, dtype",
    [
        (1.0, 0.0, 3.0, 1.0, 0.0, np.float64),  # y(3) = 0 exactly: sign(0) = +1, bit at acc >= 3
        (-1.0, 0.0, 3.0, 1.0, 0.0, np.float64),  # y(3) = -0.0: still +1, bit at acc <= 3
        (2.0, 1.0, 0.5, 4.0, 0.0, np.float64),  # y(0) = 0.5 exactly
        (0.0, -1.0, 7.0, 1.0, 1e-5, np.float64),  # gamma = 0: constant -1
        (-0.0, 0.0, 7.0, 1.0, 1e-5, np.float64),  # gamma = -0.0, beta = 0: constant +1
        (1.0, 0.0, 1e9 + 3.3, 1.0, 0.0, np.float32),  # float32 spacing 64 near 1e9: bisection path
        (1e-30, 1.0, 0.0, 1.0, 1e-5, np.float64),  # root far outside the int32 range: always +1
        (1e-30, -1.0, 0.0, 1.0, 1e-5, np.float64),  # ... never
        (3.0, -2.0, 0.1, 0.01, 1e-4, np.float32),
    ],
)
def test_threshold_edge_cases(device, gamma, beta, mean, var, eps, dtype):
    acc = np.concatenate(
        [np.arange(-8, 9), np.arange(-8, 9) + 3, np.array([2**31 - 1, -(2**31)]),
         np.arange(-100, 100) + 1_000_000_000]
    ).astype(np.int32)[:, None]
    params = [np.array([v], dtype=np.float64) for v in (gamma, beta, mean, var)]
    for order in ("divide", "inverse"):
        check_threshold(device, acc, *params, eps, dtype, order)


def test_threshold_pack_many_channels(device):
    rng = np.random.default_rng(5)
    acc = rng.integers(-50, 50, size=(2, 3, 200)).astype(np.int32)
    threshold = rng.integers(-50, 50, size=200).astype(np.int64)
    direction = rng.choice(np.array([-1, 1], dtype=np.int8), size=200)
    packed = device.get(kernels.threshold_pack(device.put(acc), device.put(threshold), device.put(direction)))
    expected = np.where((acc.astype(np.int64) - threshold) * direction >= 0, 1, -1)
    np.testing.assert_array_equal(packed, reference.pack_signs_loops(expected))


# ------------------------------------------------------------------------------------------------
# maxpool_packed
# ------------------------------------------------------------------------------------------------


# Pooling geometries (the tests ``assume`` away padding >= kernel and inputs smaller than the kernel).
POOLINGS = dict(
    batch=st.integers(1, 2),
    channels=st.integers(1, 140),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    seed=SEEDS,
)


@given(**POOLINGS, style=STYLES)
def test_maxpool_packed_equals_float_maxpool(
    device, batch, channels, height, width, kernel, stride, padding, seed, style
):
    assume(padding[0] < kernel[0] and padding[1] < kernel[1])
    assume(height + 2 * padding[0] >= kernel[0] and width + 2 * padding[1] >= kernel[1])
    x = signs(np.random.default_rng(seed), (batch, height, width, channels), style)
    pooled = device.get(kernels.maxpool_packed(device.put(kernels.pack_signs(x)), kernel, stride, padding))
    expected = reference.maxpool_float(reference.sign_pm1(x), kernel, stride, padding)
    np.testing.assert_array_equal(pooled, reference.pack_signs_loops(expected))


# ------------------------------------------------------------------------------------------------
# threshold_maxpool_pack / threshold_signs (fused output stages)
# ------------------------------------------------------------------------------------------------


@given(**POOLINGS)
def test_threshold_maxpool_equals_pool_then_threshold(
    device, batch, channels, height, width, kernel, stride, padding, seed
):
    assume(padding[0] < kernel[0] and padding[1] < kernel[1])
    assume(height + 2 * padding[0] >= kernel[0] and width + 2 * padding[1] >= kernel[1])
    rng = np.random.default_rng(seed)
    acc = rng.integers(-6, 7, size=(batch, height, width, channels)).astype(np.int32)
    threshold = rng.integers(-7, 8, size=channels).astype(np.int64)
    direction = rng.choice(np.array([-1, 1], dtype=np.int8), size=channels)
    packed = device.get(kernels.threshold_maxpool_pack(
        device.put(acc), device.put(threshold), device.put(direction), kernel, stride, padding))
    pooled = reference.maxpool_float(acc, kernel, stride, padding).astype(np.int64)
    expected = np.where((pooled - threshold) * direction >= 0, 1, -1)
    np.testing.assert_array_equal(packed, reference.pack_signs_loops(expected))


@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 140),
    spatial=st.sampled_from([(), (1, 1), (3, 5), (7, 2)]),
    seed=SEEDS,
    style=STYLES,
)
def test_threshold_signs_equals_compare_then_pack(device, batch, channels, spatial, seed, style):
    rng = np.random.default_rng(seed)
    x = signs(rng, (batch, channels) + spatial, style).astype(np.float32)
    threshold = rng.choice(np.array([0.0, -0.0, 0.5, -1.0, np.inf, -np.inf, np.nan], dtype=np.float32),
                           size=channels)
    direction = rng.choice(np.array([-1, 1], dtype=np.int8), size=channels)
    packed = device.get(kernels.threshold_signs(device.put(x), device.put(threshold), device.put(direction)))
    shape = (1, channels) + (1,) * len(spatial)
    t, d = threshold.reshape(shape), direction.reshape(shape)
    with np.errstate(invalid="ignore"):
        bits = np.where(d > 0, x >= t, x <= t)
    channels_last = np.moveaxis(bits, 1, -1)
    np.testing.assert_array_equal(packed, reference.pack_signs_loops(np.where(channels_last, 1, -1)))
    # a strided view (N, C, ...) of a channels-first-of-all buffer (C, N, ...), as convolutions give
    strided = np.moveaxis(device.put(np.moveaxis(x, 1, 0)), 0, 1)
    assert not strided.flags.c_contiguous or channels == 1 or batch == 1
    np.testing.assert_array_equal(
        device.get(kernels.threshold_signs(strided, device.put(threshold), device.put(direction))), packed)
    # threshold 0, direction +1: pack_signs of the channels-last values
    zeros, ones = np.zeros(channels, np.float32), np.ones(channels, np.int8)
    plain = device.get(kernels.threshold_signs(device.put(x), device.put(zeros), device.put(ones)))
    np.testing.assert_array_equal(plain, reference.pack_signs_loops(np.moveaxis(x, 1, -1)))


def test_threshold_signs_rejects_nan_and_bad_shapes(device):
    x = np.zeros((2, 3, 4, 4), dtype=np.float32)
    x[1, 2, 3, 0] = np.nan
    t, d = device.put(np.zeros(3, np.float32)), device.put(np.ones(3, np.int8))
    with pytest.raises(ValueError, match="NaN"):
        kernels.threshold_signs(device.put(x), t, d)
    with pytest.raises(ValueError, match=r"threshold must have shape \(C,\) = \(4,\)"):
        kernels.threshold_signs(device.put(np.zeros((2, 4), np.float32)), t, device.put(np.ones(4, np.int8)))
    with pytest.raises(TypeError, match="x must have dtype float32"):
        kernels.threshold_signs(device.put(np.zeros((2, 3))), t, d)
    with pytest.raises(ValueError, match="x must be 2-D"):
        kernels.threshold_signs(device.put(np.zeros((2, 3, 4), np.float32)), t, d)
    with pytest.raises(ValueError, match="padding must be smaller"):
        kernels.threshold_maxpool_pack(device.put(np.zeros((1, 4, 4, 3), np.int32)),
                                       device.put(np.zeros(3, np.int64)), d, 2, 2, 2)


# ------------------------------------------------------------------------------------------------
# pack_bitplanes / combine_bitplanes (binary layers on k-bit inputs)
# ------------------------------------------------------------------------------------------------


@given(
    rows=st.integers(1, 12),
    k=st.integers(1, 300),
    n=st.integers(1, 70),
    bits=st.integers(1, 12),
    seed=SEEDS,
)
def test_bitplane_gemm_equals_integer_matmul(device, rows, k, n, bits, seed):
    rng = np.random.default_rng(seed)
    dtype = np.uint8 if bits <= 8 else np.uint16
    codes = rng.integers(0, 2 ** bits, size=(rows, k)).astype(dtype)
    codes[0, : min(k, 3)] = 2 ** bits - 1  # the largest code
    w = rng.choice(np.array([-1, 1]), size=(n, k))
    planes = kernels.pack_bitplanes(device.put(codes), bits)
    assert planes.shape == (bits, rows, (k + 63) // 64)
    products = kernels.xnor_gemm(planes.reshape(bits * rows, -1), device.put(kernels.pack_signs(w)), k)
    totals = device.get(kernels.combine_bitplanes(products.reshape(bits, rows, n)))
    expected = 2 * codes.astype(np.int64) @ w.T - (2 ** bits - 1) * w.sum(axis=1)[None, :]
    np.testing.assert_array_equal(totals, expected)
    # each plane is the packed bit b of the codes
    for b in (0, bits - 1):
        plane_values = np.where((codes >> b) & 1, 1, -1)
        np.testing.assert_array_equal(device.get(planes[b]), reference.pack_signs_loops(plane_values))


def test_bitplane_bad_arguments(device):
    with pytest.raises(TypeError, match="codes must have dtype uint8 or uint16, got int32"):
        kernels.pack_bitplanes(device.put(np.zeros((2, 3), np.int32)), 4)
    with pytest.raises(ValueError, match=r"codes must be below 2 \*\* bits = 16, got a maximum of 16"):
        kernels.pack_bitplanes(device.put(np.full((2, 3), 16, np.uint8)), 4)
    with pytest.raises(ValueError, match="bits must be <= 8 for uint8 codes, got 9"):
        kernels.pack_bitplanes(device.put(np.zeros((2, 3), np.uint8)), 9)
    with pytest.raises(ValueError, match=r"products must be 3-D"):
        kernels.combine_bitplanes(device.put(np.zeros((2, 3), np.int32)))


# ------------------------------------------------------------------------------------------------
# Argument checks
# ------------------------------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors(device):
    put = device.put

    def packed(*shape):
        return put(np.zeros(shape, dtype=np.uint64))

    good = packed(4, 2)
    with pytest.raises(TypeError, match="a_packed must have dtype uint64, got int64"):
        kernels.xnor_gemm(put(np.zeros((4, 2), dtype=np.int64)), good, 100)
    with pytest.raises(ValueError, match=r"b_packed must have ceil\(k / 64\) = 2 words"):
        kernels.xnor_gemm(good, packed(4, 3), 100)
    with pytest.raises(ValueError, match="a_packed must be 2-D"):
        kernels.xnor_gemm(packed(4, 2, 1), good, 100)
    with pytest.raises(ValueError, match="must be C-contiguous"):
        kernels.xnor_gemm(packed(2, 4).T, good, 100)
    with pytest.raises(ValueError, match="padding bits"):
        kernels.xnor_gemm(put(np.full((4, 2), 2**63, dtype=np.uint64)), good, 100)
    with pytest.raises(TypeError, match="k must be an integer"):
        kernels.xnor_gemm(good, good, 100.0)
    with pytest.raises(TypeError, match="real"):
        kernels.pack_signs(put(np.zeros(3, dtype=bool)))
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        kernels.pack_signs(put(np.zeros((4, 6)))[:, ::2])
    with pytest.raises(ValueError, match="channels=65"):
        kernels.binary_conv2d(packed(1, 3, 3, 1), packed(1, 3, 3, 2), 65)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        kernels.binary_conv2d(packed(1, 2, 2, 1), packed(1, 3, 3, 1), 5)
    with pytest.raises(ValueError, match="direction must hold only"):
        acc, threshold = put(np.zeros((2, 3), dtype=np.int32)), put(np.zeros(3, dtype=np.int64))
        kernels.threshold_pack(acc, threshold, put(np.zeros(3, dtype=np.int8)))
    with pytest.raises(ValueError, match="padding must be smaller than the kernel"):
        kernels.maxpool_packed(packed(1, 4, 4, 1), 2, 2, 2)
    with pytest.raises(ValueError, match="var \\+ eps must be positive"):
        kernels.bn_sign_threshold(*(put(np.zeros(2)) for _ in range(4)), 0.0)


def test_mixed_array_kinds_are_refused():
    with pytest.raises(TypeError, match="a_packed must be a numpy or CuPy array"):
        kernels.xnor_gemm([[0]], np.zeros((1, 1), dtype=np.uint64), 1)
    if cupy is not None:
        with pytest.raises(TypeError, match="must all be numpy or all CuPy"):
            kernels.xnor_gemm(np.zeros((1, 1), dtype=np.uint64), cupy.zeros((1, 1), dtype=np.uint64), 1)


# ------------------------------------------------------------------------------------------------
# Code generation
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif("avx512vpopcntdq" not in HOST_FEATURES, reason="CPU without AVX-512 VPOPCNTDQ")
def test_gemm_uses_vpopcntq_on_avx512_vpopcntdq():
    from lowbit.kernels.gemm import gemm_assembly

    assert "vpopcntq" in gemm_assembly()


def test_threshold_matches_lowbit_batchnorm_float32():
    """dtype=float32, order="inverse" reproduces lowbit.layers.BatchNorm (eval mode) then sign."""
    from lowbit.layers import BatchNorm

    rng = np.random.default_rng(11)
    channels = 150
    layer = BatchNorm(channels)
    layer.gamma = rng.normal(size=channels).astype(np.float32)
    layer.beta = rng.normal(size=channels).astype(np.float32)
    layer.running_mean = rng.normal(0, 30, channels).astype(np.float32)
    layer.running_var = (rng.random(channels) * 4 + 0.01).astype(np.float32)
    params = [p.astype(np.float64) for p in (layer.gamma, layer.beta, layer.running_mean, layer.running_var)]
    acc = near_boundary(rng, 50, *params, layer.eps)
    acc = np.clip(acc, -(2**23), 2**23).astype(np.int32)  # the layer sees exact float32 integers
    y = layer.forward(acc.astype(np.float32), train=False)
    threshold, direction = kernels.bn_sign_threshold(
        layer.gamma, layer.beta, layer.running_mean, layer.running_var, layer.eps,
        dtype=np.float32, order="inverse",
    )
    np.testing.assert_array_equal(kernels.threshold_pack(acc, threshold, direction), kernels.pack_signs(y))
