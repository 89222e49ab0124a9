"""Model passes whose convolutions run on the Numba kernels hold numpy's BLAS to one thread
(``lowbit.functions.one_blas_thread``); the results do not change."""
import numpy as np
import pytest

from lowbit.functions import blas_controller, one_blas_thread, reference_ops
from lowbit.kernels import float_ops
from lowbit.layers import Affine, Conv2D, Flatten, Layer, ReLU
from lowbit.model import Model


def _blas_threads():
    return [info["num_threads"] for info in blas_controller().info() if info["user_api"] == "blas"]


class _Spy(Layer):
    """Records numpy's BLAS threads and the float kernels' thread setting in each pass."""

    def __init__(self):
        self.seen = []

    def _record(self):
        previous = float_ops.set_threads(None)
        float_ops.set_threads(previous)
        self.seen.append((_blas_threads(), previous))

    def forward(self, x, train=False):
        self._record()
        return x

    def backward(self, dout):
        self._record()
        return dout


def test_one_blas_thread_holds_blas_and_frees_the_float_kernels():
    outside = _blas_threads(), float_ops.set_threads(1)
    float_ops.set_threads(outside[1])
    with one_blas_thread():
        assert all(n == 1 for n in _blas_threads())
        assert float_ops.set_threads(None) is None  # Numba's thread count inside
    assert _blas_threads() == outside[0]
    assert float_ops.set_threads(outside[1]) == outside[1]  # restored
    with one_blas_thread(False):
        assert _blas_threads() == outside[0]


@pytest.mark.parametrize("conv", [True, False])
def test_model_passes_hold_blas_only_with_convolutions(conv):
    spy = _Spy()
    head = [Conv2D(1, 2, 3, padding=1, seed=0), ReLU()] if conv else [ReLU()]
    model = Model(head + [spy, Flatten(), Affine((2 if conv else 1) * 36, 3, seed=1)], input_shape=(1, 6, 6))
    x = np.random.default_rng(0).standard_normal((4, 1, 6, 6)).astype(np.float32)
    out = model.forward(x, train=True)
    model.backward(np.ones_like(out))
    outside = _blas_threads(), float_ops.set_threads(None)
    float_ops.set_threads(outside[1])
    for blas, kernel_threads in spy.seen:
        if conv:
            assert all(n == 1 for n in blas) and kernel_threads is None
        else:
            assert (blas, kernel_threads) == outside
    with reference_ops():  # no Numba kernels: BLAS keeps its threads
        spy.seen.clear()
        model.forward(x, train=True)
        assert spy.seen == [outside]


def test_results_equal_with_and_without_the_hold():
    rng = np.random.default_rng(2)
    model = Model([Conv2D(1, 4, 3, padding=1, seed=0), ReLU(), Flatten(), Affine(4 * 100, 300, seed=1), ReLU(),
                   Affine(300, 5, seed=2)], input_shape=(1, 10, 10))
    x = rng.standard_normal((64, 1, 10, 10)).astype(np.float32)
    held = model.forward(x, train=True)
    plain = super(Model, model).forward(x, train=True)  # Sequential's pass: no hold
    np.testing.assert_array_equal(held, plain)
