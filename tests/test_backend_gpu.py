"""The numpy/CuPy backend: the same layers on both.  Skips without a CUDA device."""
import numpy as np
import pytest

from lowbit.backend import cupy, get_array_module, to_device, to_numpy

pytestmark = pytest.mark.gpu


def test_cpu_backend_without_cupy():
    x = np.zeros(3)
    assert get_array_module(x) is np
    assert to_numpy(x) is x
    with pytest.raises(ValueError, match="device must be 'cpu' or 'gpu'"):
        to_device(x, "tpu")
    if cupy is None:
        with pytest.raises(RuntimeError, match="CuPy with a CUDA device is not available"):
            to_device(x, "gpu")


needs_gpu = pytest.mark.skipif(cupy is None, reason="CuPy with a CUDA device is not available")


@needs_gpu
def test_model_runs_the_same_on_gpu():
    from lowbit.zoo import deep_convnet

    x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    model = deep_convnet(seed=1)
    cpu = model.predict_scores(x)
    model.to_device("gpu")
    assert get_array_module(model.layers[0].W) is cupy
    np.testing.assert_allclose(model.predict_scores(x), cpu, rtol=1e-4, atol=1e-4)
    model.to_device("cpu")
    assert get_array_module(model.layers[0].W) is np


@needs_gpu
def test_training_steps_and_optimizer_state_move(tmp_path):
    from lowbit.optimizers import Adam
    from lowbit.trainer import Trainer
    from lowbit.zoo import mlp

    rng = np.random.default_rng(0)
    x = rng.random((64, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    model = mlp(seed=0, hidden=(32,))
    opt = Adam(0.01)
    t = Trainer(model, optimizer=opt, epochs=1, batch_size=16, device="gpu", progress=False,
                out_dir=tmp_path)
    t.fit(x, y)
    assert all(get_array_module(a) is cupy for slots in opt.state.values() for a in slots.values())
    opt.to_device("cpu")
    assert all(get_array_module(a) is np for slots in opt.state.values() for a in slots.values())
    # the checkpoint written from the GPU run resumes on the CPU
    t2 = Trainer(mlp(seed=0, hidden=(32,)), optimizer=Adam(0.01), epochs=1, batch_size=16,
                 progress=False, out_dir=tmp_path)
    assert t2.load_checkpoint() == 1


@needs_gpu
@pytest.mark.parametrize("fused", [True, False])
def test_adam_on_gpu_equals_numpy_bit_for_bit(fused):
    # the fused kernel (one per parameter, --fmad=false) and the op-by-op CuPy path both do the numpy
    # update's float32 operations in its order: equal to the last bit over several steps, a
    # non-contiguous gradient and a tiny learning rate (where rounding shows) included
    from lowbit.optimizers import Adam

    class Holder:
        def __init__(self, W):
            self.W = W
            self.dW = None

    class One:
        def __init__(self, layer):
            self.layer = layer

        def named_arrays(self, buffers=True):
            return [("0.W", self.layer, "W")]

        def constrain(self):
            pass

    rng = np.random.default_rng(3)
    w = rng.standard_normal((37, 53)).astype(np.float32)
    cpu, gpu = One(Holder(w.copy())), One(Holder(cupy.asarray(w)))
    opt_cpu, opt_gpu = Adam(1e-3), Adam(1e-3, fused=fused)
    for step, lr in enumerate((1e-3, 3e-7, 1e-2, 1e-5)):
        g = rng.standard_normal((53, 37)).astype(np.float32).T * np.float32(10.0 ** -step)
        cpu.layer.dW, gpu.layer.dW = g, cupy.asarray(np.ascontiguousarray(g.T)).T
        opt_cpu.step(cpu, lr)
        opt_gpu.step(gpu, lr)
        np.testing.assert_array_equal(cupy.asnumpy(gpu.layer.W), cpu.layer.W, err_msg=f"step {step}")
        for name in ("m", "v"):
            np.testing.assert_array_equal(cupy.asnumpy(opt_gpu.state[name]["0.W"]), opt_cpu.state[name]["0.W"])
