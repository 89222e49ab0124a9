"""The CuPy path equals the Numba path bit for bit (skipped without a CUDA device).

The properties against the references run for both paths in ``test_kernels.py`` (its ``device``
fixture has a "gpu" parameter); here the two paths are compared with each other directly, on
drawn shapes, and the GPU kernels also run at a size that spans many thread blocks.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import lowbit.kernels as kernels
from lowbit.backend import cupy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(cupy is None, reason="no CUDA device")]

SEEDS = st.integers(0, 2**32 - 1)


def both(function, *arrays, **options):
    """(CPU result, GPU result brought back to the host) of one kernel call."""
    on_cpu = function(*arrays, **options)
    on_gpu = function(*(cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in arrays), **options)
    assert isinstance(on_gpu, cupy.ndarray)
    return on_cpu, cupy.asnumpy(on_gpu)


@given(rows=st.integers(1, 50), k=st.integers(1, 300), seed=SEEDS)
def test_pack_cpu_equals_gpu(rows, k, seed):
    x = np.random.default_rng(seed).standard_normal((rows, k)).astype(np.float32)
    x[:, ::7] = 0.0
    cpu, gpu = both(kernels.pack_signs, x)
    np.testing.assert_array_equal(cpu, gpu)


@given(m=st.integers(1, 300), n=st.integers(1, 300), k=st.integers(1, 400), seed=SEEDS)
def test_xnor_gemm_cpu_equals_gpu(m, n, k, seed):
    rng = np.random.default_rng(seed)
    a = kernels.pack_signs(rng.standard_normal((m, k)))
    b = kernels.pack_signs(rng.standard_normal((n, k)))
    cpu, gpu = both(kernels.xnor_gemm, a, b, k)
    np.testing.assert_array_equal(cpu, gpu)


def test_xnor_gemm_large():
    rng = np.random.default_rng(0)
    a = kernels.pack_signs(rng.standard_normal((1000, 3001)))
    b = kernels.pack_signs(rng.standard_normal((777, 3001)))
    cpu, gpu = both(kernels.xnor_gemm, a, b, 3001)
    np.testing.assert_array_equal(cpu, gpu)


@given(
    channels=st.integers(1, 140),
    n_out=st.integers(1, 40),
    size=st.integers(1, 12),
    kernel=st.integers(1, 4),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    seed=SEEDS,
)
def test_binary_conv2d_cpu_equals_gpu(channels, n_out, size, kernel, stride, padding, seed):
    assume(size + 2 * padding >= kernel)
    rng = np.random.default_rng(seed)
    x = kernels.pack_signs(rng.standard_normal((2, size, size, channels)))
    w = kernels.pack_signs(rng.standard_normal((n_out, kernel, kernel, channels)))
    cpu, gpu = both(kernels.binary_conv2d, x, w, channels, stride=stride, padding=padding)
    np.testing.assert_array_equal(cpu, gpu)


@given(channels=st.integers(1, 140), seed=SEEDS)
def test_threshold_pack_cpu_equals_gpu(channels, seed):
    rng = np.random.default_rng(seed)
    acc = rng.integers(-30, 30, size=(4, 5, channels)).astype(np.int32)
    threshold, direction = kernels.bn_sign_threshold(
        rng.normal(size=channels), rng.normal(size=channels), rng.normal(0, 10, channels).round(),
        rng.random(channels) + 0.1, 1e-5,
    )
    cpu, gpu = both(kernels.threshold_pack, acc, threshold, direction)
    np.testing.assert_array_equal(cpu, gpu)


@given(channels=st.integers(1, 140), size=st.integers(2, 12), kernel=st.integers(1, 3), seed=SEEDS)
def test_maxpool_cpu_equals_gpu(channels, size, kernel, seed):
    x = kernels.pack_signs(np.random.default_rng(seed).standard_normal((2, size, size, channels)))
    assume(size >= kernel)
    cpu, gpu = both(kernels.maxpool_packed, x, kernel, kernel)
    np.testing.assert_array_equal(cpu, gpu)
