"""Counter-based draws (lowbit.draws): the formula, its statistics, and the layers that use it.
The CuPy half (same values bit for bit on the GPU) skips without a CUDA device."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lowbit.draws as draws_module
from lowbit.backend import cupy
from lowbit.draws import DRAWS, check_draws, counter_uniform, uniform
from lowbit.layers import Dropout, layer_from_config
from lowbit.quantizers import StochasticBinary, get_quantizer, hard_sigmoid, quantizer_for_bits

needs_gpu = pytest.mark.skipif(cupy is None, reason="CuPy with a CUDA device is not available")
MASK = (1 << 64) - 1


def splitmix_reference(key, i):
    """Element ``i`` by the module docstring's formula, in Python integers."""
    z = (key + (i + 1) * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    z ^= z >> 31
    return (z >> 40) / 2 ** 24


@given(st.integers(0, 2 ** 64 - 1), st.integers(1, 300))
def test_counter_uniform_is_the_formula(key, n):
    u = counter_uniform(key, (n,))
    assert u.dtype == np.float32 and u.shape == (n,)
    assert [float(v) for v in u] == [splitmix_reference(key, i) for i in range(n)]


def test_counter_uniform_shape_chunks_and_keys(monkeypatch):
    whole = counter_uniform(12345, (3, 50, 7))
    assert whole.shape == (3, 50, 7)
    assert np.all((whole >= 0) & (whole < 1)) and np.all(whole * 2 ** 24 == np.round(whole * 2 ** 24))
    monkeypatch.setattr(draws_module, "_CHUNK", 64)  # many passes: the same values
    np.testing.assert_array_equal(counter_uniform(12345, (3, 50, 7)), whole)
    assert counter_uniform(12345, 5).shape == (5,)
    assert not np.array_equal(counter_uniform(12346, (3, 50, 7)), whole)


def test_counter_uniform_statistics():
    # 10^6 values: mean and variance of U[0, 1) within 5 standard errors; 16 equal bins, chi-square
    # with 15 degrees of freedom below 40 (p < 1e-3 for a uniform source); neighbours uncorrelated.
    u = counter_uniform(2026, (1_000_000,)).astype(np.float64)
    n = u.size
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / n)
    counts = np.bincount((u * 16).astype(int), minlength=16)
    assert ((counts - n / 16) ** 2 / (n / 16)).sum() < 40
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 5 / np.sqrt(n)


def test_bad_arguments_are_clear():
    assert check_draws("counter") == "counter" and DRAWS == ("generator", "counter")
    with pytest.raises(ValueError, match=r"draws must be one of \('generator', 'counter'\), got 'gpu'"):
        check_draws("gpu")
    with pytest.raises(ValueError, match="draws must be one of"):
        Dropout(0.5, draws="philox")
    with pytest.raises(ValueError, match="draws must be one of"):
        StochasticBinary(draws=None)
    for key in (-1, 2 ** 64, 1.5, True):
        with pytest.raises(ValueError, match=r"key must be an int in \[0, 2\*\*64\)"):
            counter_uniform(key, (3,))
    with pytest.raises(ValueError, match="xp must be numpy or cupy"):
        counter_uniform(1, (3,), xp=pytest)


def test_uniform_generator_is_the_old_draw():
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    np.testing.assert_array_equal(uniform(a, "generator", (4, 5)), b.random((4, 5), dtype=np.float32))
    c, d = np.random.default_rng(7), np.random.default_rng(7)
    key = d.integers(0, 2 ** 64, dtype=np.uint64)  # one key per call from the layer's generator
    np.testing.assert_array_equal(uniform(c, "counter", (4, 5)), counter_uniform(key, (4, 5)))
    assert c.bit_generator.state == d.bit_generator.state


def test_dropout_with_counter_draws():
    x = np.ones((200, 500), np.float32)
    layer = Dropout(0.3, seed=3, draws="counter")
    y = layer.forward(x, train=True)
    kept = (y != 0).mean()
    assert abs(kept - 0.7) < 5 * np.sqrt(0.21 / x.size)
    np.testing.assert_allclose(y[y != 0], 1 / 0.7, rtol=1e-6)
    np.testing.assert_array_equal(layer.backward(x), y)  # the same mask
    np.testing.assert_array_equal(Dropout(0.3, seed=3, draws="counter").forward(x, train=True), y)
    assert not np.array_equal(Dropout(0.3, seed=3).forward(x, train=True), y)  # other draws
    assert layer.forward(x, train=False) is x
    assert layer.config() == {"ratio": 0.3, "draws": "counter"}
    assert Dropout(0.3).config() == {"ratio": 0.3}  # files of the default unchanged
    assert layer_from_config({"type": "Dropout", "config": layer.config()}).draws == "counter"


def test_stochastic_binary_with_counter_draws():
    x = np.linspace(-1.5, 1.5, 13, dtype=np.float32)
    q = StochasticBinary(seed=11, draws="counter")
    draws = np.stack([q.forward(x, train=True) for _ in range(4000)])
    assert set(np.unique(draws)) <= {-1.0, 1.0}
    expected = 2 * hard_sigmoid(x) - 1
    # mean of 4000 +-1 draws: standard error at most 1/sqrt(4000) = 0.016; 5 of them
    np.testing.assert_allclose(draws.mean(axis=0), expected, atol=0.08)
    again = StochasticBinary(seed=11, draws="counter")
    np.testing.assert_array_equal(again.forward(x, train=True), draws[0])
    assert q.config()["draws"] == "counter" and "draws" not in StochasticBinary().config()
    assert get_quantizer(q.config()).draws == "counter"
    assert quantizer_for_bits(1, "weight", True, "counter").draws == "counter"


def test_bnn_mlp_with_counter_draws_trains_and_resumes(tmp_path):
    from lowbit.optimizers import Adam
    from lowbit.trainer import Trainer
    from lowbit.zoo import bnn_mlp

    rng = np.random.default_rng(0)
    x = rng.random((120, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 120)

    def run(epochs, out):
        model = bnn_mlp(3, hidden=(32, 32), stochastic="weights", draws="counter")
        trainer = Trainer(model, "squared_hinge", Adam(3e-3), epochs=epochs, batch_size=40, seed=1,
                          progress=False, out_dir=out)
        trainer.fit(x, y, resume=True)
        return model

    full = run(2, tmp_path / "full")
    run(1, tmp_path / "part")
    resumed = run(2, tmp_path / "part")
    for (name, layer, attr) in full.named_arrays():
        other = dict(((n, a), l) for n, l, a in resumed.named_arrays())[(name, attr)]
        np.testing.assert_array_equal(getattr(layer, attr), getattr(other, attr), err_msg=f"{name}.{attr}")


@needs_gpu
@given(st.integers(0, 2 ** 64 - 1), st.lists(st.integers(1, 70), min_size=1, max_size=3))
def test_counter_uniform_equal_on_gpu(key, shape):
    np.testing.assert_array_equal(cupy.asnumpy(counter_uniform(key, tuple(shape), cupy)),
                                  counter_uniform(key, tuple(shape)))


@needs_gpu
def test_layers_with_counter_draws_equal_on_gpu():
    x = np.random.default_rng(1).standard_normal((64, 300)).astype(np.float32)
    for make in (lambda: Dropout(0.5, seed=4, draws="counter"),
                 lambda: StochasticBinary(seed=4, draws="counter")):
        cpu, gpu = make(), make()
        for _ in range(3):
            np.testing.assert_array_equal(cupy.asnumpy(gpu.forward(cupy.asarray(x), train=True)),
                                          cpu.forward(x, train=True))
