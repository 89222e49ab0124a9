"""Quantizer tests: forward values, pseudo-gradients, the registry and bad arguments.

Each property rebuilds the expectation from simpler numpy operations (``np.sign``, ``np.where``, a
float16 cast) and compares exactly; gradients of the DoReFa weight normalisation are compared with
central differences.  The sign convention under test is the one of ``lowbit.kernels``: sign(0) = +1.
"""
import json
import warnings

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from lowbit.backend import cupy, gpu_available
from lowbit.quantizers import (
    QUANTIZERS, DoReFaActivation, DoReFaWeight, Fp16, Identity, SteSign, StochasticBinary,
    get_quantizer, hard_sigmoid, quantizer_for_bits,
)
from gradcheck import numerical_grad

EDGES = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 1e-45, -1e-45, 1e-3]
values32 = st.one_of(st.floats(-1e4, 1e4, width=32), st.sampled_from(EDGES))
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=7)
arrays32 = hnp.arrays(np.float32, shapes, elements=values32)
bits_2_8 = st.integers(2, 8)


def all_quantizers():
    return [Identity(), Fp16(), SteSign(), SteSign(scale="tensor"), StochasticBinary(seed=0),
            DoReFaActivation(2), DoReFaActivation(4, signed=True), DoReFaWeight(3)]


# -- SteSign ----------------------------------------------------------------------------------------
@given(arrays32, st.floats(0.25, 4.0))
def test_ste_sign_is_plus_minus_one_and_gradient_is_hard_tanh(x, clip):
    q = SteSign(clip=clip)
    expected = np.sign(x) + (x == 0)  # np.sign(0) = 0 -> +1, also for -0.0
    np.testing.assert_array_equal(q(x), expected.astype(np.float32))
    dout = np.arange(x.size, dtype=np.float32).reshape(x.shape) + 1
    np.testing.assert_array_equal(q.backward(x, dout), np.where(np.abs(x) > clip, 0, dout))


@pytest.mark.parametrize("zero", [0.0, -0.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls", [SteSign, StochasticBinary])
def test_sign_of_zero_is_plus_one(zero, dtype, cls):
    x = np.full(3, zero, dtype=dtype)
    out = cls()(x, train=False)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, [1, 1, 1])


@pytest.mark.parametrize("cls", [SteSign, StochasticBinary])
def test_gradient_window_includes_its_endpoints(cls):
    x = np.array([-1.5, -1.0, -0.0, 1.0, np.nextafter(np.float32(1), np.float32(2))], np.float32)
    np.testing.assert_array_equal(cls().backward(x, np.ones_like(x)), [0, 1, 1, 1, 0])


@pytest.mark.parametrize("shape,channel_axis,axes", [((6, 4), 1, (0,)), ((4, 3, 2, 2), 0, (1, 2, 3))])
def test_ste_sign_channel_scale_is_mean_abs_per_output_unit(shape, channel_axis, axes):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    alpha = np.abs(w).mean(axis=axes, keepdims=True)
    q = SteSign(scale="channel")
    np.testing.assert_allclose(q(w, channel_axis=channel_axis), np.where(w >= 0, 1, -1) * alpha,
                               rtol=1e-6)
    dout = np.ones_like(w)
    np.testing.assert_allclose(q.backward(w, dout, channel_axis=channel_axis),
                               (np.abs(w) <= 1) * alpha, rtol=1e-6)
    np.testing.assert_allclose(SteSign(scale="tensor")(w), np.where(w >= 0, 1, -1) * np.abs(w).mean(),
                               rtol=1e-6)


def test_ste_sign_channel_scale_needs_an_axis():
    with pytest.raises(ValueError, match="channel_axis"):
        SteSign(scale="channel")(np.ones((2, 2), np.float32))


# -- StochasticBinary ------------------------------------------------------------------------------
def test_stochastic_binary_mean_matches_hard_sigmoid():
    """Mean of n draws vs 2 * hard_sigmoid(x) - 1, within 5 binomial standard deviations."""
    n = 20000
    x = np.array([-3, -1, -0.6, -0.2, 0, 0.3, 0.9, 1, 2], dtype=np.float32)
    q = StochasticBinary(seed=1)(np.broadcast_to(x, (n, x.size)).copy(), train=True)
    assert set(np.unique(q)) <= {-1.0, 1.0}
    p = hard_sigmoid(x.astype(np.float64))
    sigma = 2 * np.sqrt(p * (1 - p) / n)  # std of the mean of +-1 draws; 0 where p is 0 or 1
    assert np.all(np.abs(q.mean(axis=0) - (2 * p - 1)) <= 5 * sigma)


def test_stochastic_binary_same_seed_same_draws_and_eval_setting():
    x = np.random.default_rng(0).uniform(-1, 1, (50, 20)).astype(np.float32)
    a = StochasticBinary(seed=7)(x, train=True)
    np.testing.assert_array_equal(a, StochasticBinary(seed=7)(x, train=True))
    assert not np.array_equal(a, StochasticBinary(seed=8)(x, train=True))
    q = StochasticBinary(seed=7)
    state = q.rng.bit_generator.state
    np.testing.assert_array_equal(q(x, train=False), SteSign()(x))  # deterministic_eval=True
    assert q.rng.bit_generator.state == state  # evaluation draws nothing
    noisy = StochasticBinary(deterministic_eval=False, seed=7)
    np.testing.assert_array_equal(noisy(x, train=False), a)
    dout = np.ones_like(x)
    x[0, 0] = 1.5
    np.testing.assert_array_equal(q.backward(x, dout), SteSign().backward(x, dout))


# -- DoReFa ----------------------------------------------------------------------------------------
@given(arrays32, bits_2_8, st.booleans())
def test_dorefa_activation_levels_idempotent_monotone(x, bits, signed):
    q = DoReFaActivation(bits, signed=signed)
    out = q(x)
    n = 2 ** bits - 1
    assert len(np.unique(out)) <= 2 ** bits
    grid = (out + 1) / 2 * n if signed else out * n
    np.testing.assert_allclose(grid, np.rint(grid), atol=1e-4)
    np.testing.assert_array_equal(q(out), out)
    assert np.all(np.diff(q(np.sort(x.ravel()))) >= 0)


@given(arrays32, st.booleans())
def test_dorefa_activation_gradient_is_zero_outside_the_clip_range(x, signed):
    low = -1 if signed else 0
    dout = np.full_like(x, 3.0)
    expected = np.where((x < low) | (x > 1), 0, dout)
    np.testing.assert_array_equal(DoReFaActivation(2, signed=signed).backward(x, dout), expected)


@given(hnp.arrays(np.float32, shapes, elements=st.floats(-8, 8, width=32)), bits_2_8)
def test_dorefa_weight_levels_and_monotone(w, bits):
    q = DoReFaWeight(bits)(w)
    n = 2 ** bits - 1
    assert len(np.unique(q)) <= 2 ** bits
    np.testing.assert_allclose((q + 1) / 2 * n, np.rint((q + 1) / 2 * n), atol=1e-4)
    assert np.all(np.abs(q) <= 1)
    order = np.argsort(w.ravel(), kind="stable")
    assert np.all(np.diff(q.ravel()[order]) >= 0)
    if np.any(w != 0):
        assert np.abs(q).max() == 1  # the largest |w| maps to +-1


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dorefa_weight_gradient_is_the_derivative_of_the_normalisation(bits, seed):
    """STE on the rounding: the gradient equals d/dw of tanh(w) / max|tanh(w)| (no ties)."""
    w = np.random.default_rng(seed).standard_normal((4, 3)) * 0.8
    r = np.random.default_rng(seed + 10).standard_normal(w.shape)
    q = DoReFaWeight(bits)
    f = lambda: float((r * np.tanh(w) / np.abs(np.tanh(w)).max()).sum())  # noqa: E731
    np.testing.assert_allclose(q.backward(w, r), numerical_grad(f, w), rtol=1e-6, atol=1e-8)


def test_dorefa_weight_degenerate_inputs_stay_finite():
    zero = np.zeros((3, 2), np.float32)
    assert np.all(np.isfinite(DoReFaWeight(2)(zero)))
    np.testing.assert_array_equal(DoReFaWeight(2).backward(zero, np.ones_like(zero)), 1)
    # found by hypothesis: a subnormal maximum must still map to +-1
    np.testing.assert_array_equal(DoReFaWeight(2)(np.array([1e-45, -1e-45], np.float32)), [1, -1])
    tied = np.array([2.0, -2.0, 0.5], np.float32)
    np.testing.assert_array_equal(DoReFaWeight(2)(tied)[:2], [1, -1])
    assert np.all(np.isfinite(DoReFaWeight(2).backward(tied, np.ones_like(tied))))


# -- Fp16 / Identity -------------------------------------------------------------------------------
@given(hnp.arrays(np.float32, shapes, elements=st.floats(width=32, allow_nan=False)))
def test_fp16_is_numpys_half_round_trip_bit_for_bit(x):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # overflow to inf must not warn
        out = Fp16()(x)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).astype(np.float32)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("value,expected", [
    (65504.0, 65504.0),            # largest half
    (65519.0, 65504.0),            # below the rounding boundary
    (65520.0, np.inf),             # the tie at the boundary overflows
    (-1e5, -np.inf),
    (2.0 ** -24, 2.0 ** -24),      # smallest subnormal
    (2.0 ** -25, 0.0),             # tie -> even (zero)
    (3 * 2.0 ** -25, 2.0 ** -23),  # tie -> even
    (2049.0, 2048.0),              # tie -> even
    (2051.0, 2052.0),              # tie -> even
    (1 + 2.0 ** -11, 1.0),         # tie -> even
    (np.inf, np.inf),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fp16_named_cases(value, expected, dtype):
    out = Fp16()(np.array([value], dtype=dtype))
    assert out.dtype == dtype
    assert out[0] == expected


def test_fp16_keeps_the_sign_of_zero_and_identity_gradient():
    out = Fp16()(np.array([-0.0, -1e-9], np.float32))
    assert np.all(np.signbit(out)) and np.all(out == 0)
    dout = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(Fp16().backward(dout * 1e6, dout), dout)
    x = np.arange(4, dtype=np.float32)
    assert Identity()(x) is x
    assert Identity().backward(x, dout) is dout


# -- registry, configs, precision, errors ----------------------------------------------------------
@pytest.mark.parametrize("q", all_quantizers(), ids=lambda q: repr(q))
def test_config_round_trip_and_json(q):
    cfg = q.config()
    json.dumps(cfg)
    again = get_quantizer(cfg)
    assert type(again) is type(q) and again.config() == cfg and again == q
    assert get_quantizer(q) is q


def test_get_quantizer_forms():
    assert isinstance(get_quantizer(None), Identity)
    assert isinstance(get_quantizer("ste_sign"), SteSign)
    assert get_quantizer({"name": "dorefa_weight", "bits": 5}).precision == 5
    with pytest.raises(ValueError) as info:
        get_quantizer("sign")
    for name in QUANTIZERS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="'name' key"):
        get_quantizer({"bits": 2})
    with pytest.raises(TypeError, match="bad arguments for quantizer 'ste_sign'"):
        get_quantizer({"name": "ste_sign", "bits": 2})
    with pytest.raises(TypeError, match="must be None, a name, a dict or a Quantizer"):
        get_quantizer(3)


@pytest.mark.parametrize("bits,kind,stochastic,cls,precision", [
    (1, "weight", False, SteSign, 1), (1, "activation", True, StochasticBinary, 1),
    (2, "weight", False, DoReFaWeight, 2), (8, "activation", False, DoReFaActivation, 8),
    (16, "weight", False, Fp16, 16), (32, "activation", False, Identity, 32),
])
def test_quantizer_for_bits(bits, kind, stochastic, cls, precision):
    q = quantizer_for_bits(bits, kind, stochastic)
    assert type(q) is cls and q.precision == precision


@pytest.mark.parametrize("bits", [0, 9, 12, 15, 33, -1, True, 2.0, "8", None])
def test_quantizer_for_bits_rejects_other_widths(bits):
    with pytest.raises(ValueError, match=f"bits must be one of 1..8, 16, 32, got {bits!r}"):
        quantizer_for_bits(bits)
    with pytest.raises(ValueError, match=r"^bits must be one of 1\.\.8, 16, 32, got 12$"):
        quantizer_for_bits(12)


@pytest.mark.parametrize("bad,error,match", [
    (lambda: quantizer_for_bits(2, kind="bias"), ValueError, "kind must be 'weight' or 'activation'"),
    (lambda: DoReFaWeight(1), ValueError, r"DoReFaWeight bits must be an int in 2\.\.8, got 1"),
    (lambda: DoReFaActivation(9), ValueError, r"DoReFaActivation bits must be an int in 1\.\.8"),
    (lambda: SteSign(clip=0), ValueError, "clip must be a positive finite number"),
    (lambda: SteSign(scale="row"), ValueError, "scale must be one of"),
    (lambda: StochasticBinary(clip=float("inf")), ValueError, "clip must be a positive finite"),
])
def test_bad_constructor_arguments(bad, error, match):
    with pytest.raises(error, match=match):
        bad()


@pytest.mark.parametrize("q", all_quantizers(), ids=lambda q: repr(q))
def test_nan_and_integer_inputs_are_rejected(q):
    x = np.array([0.5, np.nan, -1.0], np.float32)
    with pytest.raises(ValueError, match="NaN"):
        q(x, train=True)
    with pytest.raises(TypeError, match="expects a float array, got dtype int64"):
        q(np.arange(3), train=True)


# -- the same on CuPy (skipped without a CUDA device) ----------------------------------------------
gpu = pytest.mark.skipif(not gpu_available(), reason="CuPy with a CUDA device is not available")


@gpu
@pytest.mark.parametrize("q", all_quantizers(), ids=lambda q: repr(q))
def test_quantizers_on_cupy_match_numpy(q):
    w = np.random.default_rng(0).uniform(-1.5, 1.5, (16, 8)).astype(np.float32)
    dout = np.random.default_rng(1).standard_normal(w.shape).astype(np.float32)
    if isinstance(q, StochasticBinary):
        host, device = StochasticBinary(seed=3), StochasticBinary(seed=3)
    else:
        host = device = q
    out_h = host(w, train=True, channel_axis=1)
    out_d = device(cupy.asarray(w), train=True, channel_axis=1)
    assert isinstance(out_d, cupy.ndarray) and out_d.dtype == out_h.dtype
    np.testing.assert_allclose(cupy.asnumpy(out_d), out_h, rtol=1e-6, atol=1e-6)
    grad_d = device.backward(cupy.asarray(w), cupy.asarray(dout), channel_axis=1)
    np.testing.assert_allclose(cupy.asnumpy(grad_d), host.backward(w, dout, channel_axis=1),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        device(cupy.asarray([np.nan], dtype=cupy.float32))
