"""lowbit.kernels.bf16_gemm: the AVX-512 BF16 product, bit for bit against a replay of ``vdpbf16ps``."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.bf16 import round_bfloat16
from lowbit.kernels import bf16 as bf16_gemm_module
from lowbit.kernels import bf16_available, bf16_gemm

needs_bf16 = pytest.mark.skipif(not bf16_available(), reason="the CPU lacks AVX-512 BF16 (vdpbf16ps)")

SMALLEST_NORMAL = np.float32(2.0 ** -126)


def replay_vdpbf16ps(a, b):
    """``a @ b`` as ``vdpbf16ps`` computes it (Intel SDM): both operands rounded to bfloat16, bfloat16
    denormals read as zero; per output, pairs ``p = 0, 1, ...`` of K (an odd K padded with a zero),
    ``acc += a[2p+1] * b[2p+1]`` then ``acc += a[2p] * b[2p]``, each one rounding of the exact
    ``acc + product`` to float32 (float64 holds it: the product has 16 significant bits, and a
    float64 sum of a 24- and a 16-bit value rounds once more to the same float32), a denormal
    result flushed to zero.  Slow and simple: numpy over all outputs, a loop over K."""
    def operand(x):
        x = round_bfloat16(np.ascontiguousarray(x, dtype=np.float32)).astype(np.float64)
        return np.where(np.abs(x) < SMALLEST_NORMAL, np.copysign(0.0, x), x)  # DAZ, keeping the sign

    a, b = operand(a), operand(b)
    m, k = a.shape
    acc = np.zeros((m, b.shape[1]), np.float32)
    with np.errstate(all="ignore"):
        for p in range(0, k, 2):
            for element in (p + 1, p):
                if element < k:
                    exact = acc.astype(np.float64) + a[:, element, None] * b[None, element, :]
                    acc = exact.astype(np.float32)
                    acc = np.where(np.abs(acc) < SMALLEST_NORMAL, np.copysign(np.float32(0.0), acc), acc)  # FTZ
    return acc


def assert_same_bits(actual, expected):
    """Equal bit patterns, NaN matching any NaN."""
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    np.testing.assert_array_equal(actual.view(np.uint32)[~nan], expected.view(np.uint32)[~nan])


SPECIAL = [0.0, -0.0, 1.0, -1.0, 3.0e38, -3.0e38, 1e-39, -1e-39, 1e-30, 65504.0, np.inf, -np.inf, np.nan,
           1.00390625, 1.005859375]  # a tie of bf16 rounding (rounds to even), and one past it


def values(draw, shape, kind):
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    if kind == "pm1":
        return np.where(rng.random(shape) < 0.5, -1.0, 1.0).astype(np.float32)
    x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-30, 30, shape)).astype(np.float32)
    if kind == "special":
        mask = rng.random(shape) < 0.2
        x[mask] = rng.choice(np.array(SPECIAL, np.float32), size=int(mask.sum()))
    if kind == "zeros":
        x[rng.random(shape) < 0.5] = 0.0
    return x


@st.composite
def operands(draw):
    m, k, n = (draw(st.integers(1, 100)) for _ in range(3))
    a = values(draw, (m, k), draw(st.sampled_from(["pm1", "gauss", "special", "zeros"])))
    b = values(draw, (k, n), draw(st.sampled_from(["pm1", "gauss", "special", "zeros"])))
    if draw(st.booleans()):
        a = np.ascontiguousarray(a.T).T
    if draw(st.booleans()):
        b = np.ascontiguousarray(b.T).T
    return a, b


@needs_bf16
@settings(max_examples=60, deadline=None)
@given(operands())
def test_bf16_gemm_replays_vdpbf16ps_bit_for_bit(ab):
    a, b = ab
    assert_same_bits(bf16_gemm(a, b), replay_vdpbf16ps(a, b))


@needs_bf16
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (6, 2, 64), (7, 3, 65), (12, 101, 100), (100, 64, 17), (5, 0, 3)])
def test_bf16_gemm_edge_tiles_and_odd_k(m, k, n):
    rng = np.random.default_rng(m * 1000 + k * 10 + n)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = np.where(rng.random((k, n)) < 0.5, -1.0, 1.0).astype(np.float32)
    out = np.full((m, n), np.nan, np.float32)
    result = bf16_gemm(a, b, out=out)
    assert result is out
    assert_same_bits(out, replay_vdpbf16ps(a, b) if k else np.zeros((m, n), np.float32))


@needs_bf16
@settings(max_examples=30, deadline=None)
@given(st.integers(1, 100), st.integers(1, 100), st.integers(1, 100), st.integers(0, 2 ** 32 - 1))
def test_bf16_gemm_close_to_float64_of_the_rounded_operands(m, k, n, seed):
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((m, k)) * 1e-3).astype(np.float32)
    b = np.where(rng.random((k, n)) < 0.5, -1.0, 1.0).astype(np.float32)
    exact = round_bfloat16(a).astype(np.float64) @ b.astype(np.float64)
    bound = k * 2.0 ** -24 * (np.abs(round_bfloat16(a)).astype(np.float64) @ np.abs(b).astype(np.float64))
    assert np.all(np.abs(bf16_gemm(a, b) - exact) <= bound)


@needs_bf16
def test_bf16_gemm_threads_give_the_same_bits():
    import numba

    rng = np.random.default_rng(3)
    a = rng.standard_normal((50, 300)).astype(np.float32)
    b = rng.standard_normal((300, 200)).astype(np.float32)
    previous = numba.get_num_threads()
    results = []
    for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
        numba.set_num_threads(threads)
        try:
            results.append(bf16_gemm(a, b))
        finally:
            numba.set_num_threads(previous)
    for result in results[1:]:
        assert_same_bits(result, results[0])


@needs_bf16
def test_bf16_gemm_assembly_has_vdpbf16ps():
    assert "vdpbf16ps" in bf16_gemm_module.bf16_gemm_assembly()


def test_bf16_gemm_bad_arguments_name_them():
    a = np.zeros((3, 4), np.float32)
    with pytest.raises(TypeError, match="a must have dtype float32"):
        bf16_gemm(a.astype(np.float64), a.T)
    with pytest.raises(ValueError, match="b must be 2-D"):
        bf16_gemm(a, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="agree on K"):
        bf16_gemm(a, np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match=r"out must have shape \(3, 2\)"):
        bf16_gemm(a, np.zeros((4, 2), np.float32), out=np.zeros((2, 3), np.float32))
    with pytest.raises(TypeError, match="b must be a numpy array"):
        bf16_gemm(a, [[1.0]])


def test_bf16_gemm_raises_where_the_cpu_lacks_avx512_bf16(monkeypatch):
    monkeypatch.setattr(bf16_gemm_module, "HOST_FEATURES", frozenset({"avx512f", "avx2"}))
    assert not bf16_available()
    with pytest.raises(RuntimeError, match="AVX-512 BF16"):
        bf16_gemm(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32))
