"""Data-parallel training (lowbit.distributed and Trainer(comm=...)).

The MPI tests start ``mpiexec -n 2`` on tests/mpi_worker.py (MPI from the ``mpich`` wheel: the
``dist`` extra); they skip, saying why, where mpi4py or mpiexec is missing.  The NCCL communicator is
tested against a stand-in for ``cupy.cuda.nccl`` here and on a real GPU where one is present.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from lowbit.distributed import (CommTimeoutError, GradientReducer, SingleComm, broadcast_model, find_mpiexec,
                                get_comm, mpi_available, synchronize_batchnorm)
from lowbit.io import read_archive
from lowbit.trainer import Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mpi_worker  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpi_worker.py")
MPIEXEC = find_mpiexec()
needs_mpi = pytest.mark.skipif(not (mpi_available() and MPIEXEC),
                               reason="needs mpi4py and mpiexec: pip install -e \".[dist]\" (mpi4py, mpich)")


def run_ranks(mode, out_dir, ranks=2, timeout=120, env=None):
    environment = {**os.environ, **(env or {})}
    start = time.monotonic()
    done = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, WORKER, mode, str(out_dir)],
                          capture_output=True, text=True, timeout=timeout, env=environment)
    return done, time.monotonic() - start


def model_weights(path):
    _, arrays = read_archive(path, ("lowbit.model", "lowbit.checkpoint"))
    return {k.removeprefix("model/"): v for k, v in arrays.items() if not k.startswith("optimizer/")}


def single_process(mode, out_dir, epochs=3):
    x, y = mpi_worker.small_data()
    mpi_worker.trainer(mode, str(out_dir), epochs=epochs).fit(x, y, x[:40], y[:40])
    return model_weights(os.path.join(out_dir, "model.npz"))


# -- without MPI -------------------------------------------------------------------------------------
def test_single_comm_is_the_identity():
    comm = SingleComm()
    buffer = np.arange(5, dtype=np.float32)
    assert comm.allreduce_sum(buffer) is buffer and buffer.tolist() == [0, 1, 2, 3, 4]
    assert comm.bcast_object({"a": 1}) == {"a": 1} and comm.gather_object(3) == [3]
    assert comm.allreduce_values([1, 2]).tolist() == [1.0, 2.0]
    assert comm.stats() == {"allreduces": 1, "allreduce_bytes": 20, "allreduce_seconds": comm.stats()["allreduce_seconds"]}
    with pytest.raises(ValueError, match="flat float32"):
        comm.allreduce_sum(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="comm must be one of"):
        get_comm("tcp")
    assert isinstance(get_comm("auto"), SingleComm)  # not started by mpiexec


def test_trainer_rejects_bad_comm_arguments():
    model = mpi_worker.small_model(False, False)
    with pytest.raises(TypeError, match="comm must be a lowbit.distributed.Communicator"):
        Trainer(model, comm="mpi")

    class TwoRanks(SingleComm):
        size = 2

    with pytest.raises(ValueError, match="at least the number of ranks"):
        Trainer(model, batch_size=1, comm=TwoRanks())
    with pytest.raises(ValueError, match="precision 'mixed16' is not supported"):
        Trainer(model, precision="mixed16", comm=TwoRanks())

    class TwoGpuRanks(TwoRanks):  # as NCCLComm
        devices = ("gpu",)

    with pytest.raises(ValueError, match="device 'cpu' needs another communicator"):
        Trainer(model, device="cpu", comm=TwoGpuRanks())


class _SumOfCopies(SingleComm):
    """A stand-in for N identical ranks: an allreduce multiplies by N."""

    def __init__(self, size):
        super().__init__()
        self.size = size

    def _allreduce(self, buffer):
        buffer *= self.size

    def _allreduce_host(self, values):
        values *= self.size

    def _bcast_array(self, buffer, root):
        pass


def test_reducer_weights_and_sums_into_one_buffer():
    model = mpi_worker.small_model(True, False)
    x, y = mpi_worker.small_data(8)
    from lowbit.losses import get_loss

    loss = get_loss("cross_entropy")
    loss.forward(model.forward(x, train=True), y)
    model.backward(loss.backward())
    grads = {key: getattr(layer, "d" + attr).copy() for key, layer, attr in model.named_arrays(buffers=False)}
    comm = _SumOfCopies(4)
    reducer = GradientReducer(comm)
    reducer.allreduce(model, 0.25)  # four equal shards: the sum of the weighted copies is the gradient
    for key, layer, attr in model.named_arrays(buffers=False):
        np.testing.assert_allclose(getattr(layer, "d" + attr), grads[key], rtol=1e-6)
    assert comm.stats()["allreduces"] == 1
    assert reducer.nbytes == sum(g.nbytes for g in grads.values()) == comm.stats()["allreduce_bytes"]
    broadcast_model(model, comm)  # identity with identical ranks; arrays stay in place
    assert synchronize_batchnorm(model, SingleComm()) == 0


def test_sync_batchnorm_with_identical_ranks_equals_plain():
    """N identical shards: global statistics equal the shard's, and so must every gradient."""
    x, y = mpi_worker.small_data(16)
    from lowbit.losses import get_loss

    results = []
    for sync in (False, True):
        model = mpi_worker.small_model(True, False)
        if sync:
            assert synchronize_batchnorm(model, _SumOfCopies(3)) == 1
        loss = get_loss("cross_entropy")
        loss.forward(model.forward(x, train=True), y)
        dx = model.backward(loss.backward())
        results.append([dx] + [getattr(layer, "d" + attr) for _, layer, attr in model.named_arrays(buffers=False)])
    for plain, synced in zip(*results):
        np.testing.assert_allclose(synced, plain, rtol=1e-4, atol=1e-6)


class _FakeNccl:
    """Records what NCCLComm asks of ``cupy.cuda.nccl``."""

    NCCL_FLOAT32 = 7
    NCCL_SUM = 0
    calls = []

    @staticmethod
    def get_unique_id():
        return tuple(range(128))

    class NcclCommunicator:
        def __init__(self, size, unique_id, rank):
            _FakeNccl.calls.append(("init", size, unique_id[:3], rank))

        def allReduce(self, send, recv, count, dtype, op, stream):  # noqa: N802 (NCCL's name)
            _FakeNccl.calls.append(("allReduce", send, recv, count, dtype, op, stream))

        def abort(self):
            _FakeNccl.calls.append(("abort",))


@needs_mpi
def test_nccl_comm_starts_from_an_mpi_broadcast_id_and_reduces_in_place():
    from lowbit.distributed import NCCLComm

    class Buffer:  # what NCCLComm reads of a CuPy array
        class data:
            ptr = 1234
        size = 10

    comm = NCCLComm(nccl=_FakeNccl, abort_on_error=False)
    assert _FakeNccl.calls[0] == ("init", 1, (0, 1, 2), 0)
    comm._allreduce(Buffer())
    assert _FakeNccl.calls[-1][:6] == ("allReduce", 1234, 1234, 10, 7, 0)
    with pytest.raises(KeyError):
        comm.fail(KeyError("x"))
    assert _FakeNccl.calls[-1] == ("abort",)


@pytest.mark.gpu
def test_nccl_comm_on_a_gpu():
    from lowbit.backend import cupy

    if cupy is None:
        pytest.skip("no CUDA device: NCCLComm runs only with CuPy on a GPU")
    if not mpi_available():
        pytest.skip("needs mpi4py (the dist extra) to start NCCL")
    from lowbit.distributed import NCCLComm

    comm = NCCLComm()
    buffer = cupy.arange(1000, dtype=cupy.float32)
    comm._allreduce(buffer)  # one rank: NCCL's sum is the identity
    assert float(buffer[-1]) == 999.0
    model = mpi_worker.small_model(True, False)
    model.to_device("gpu")
    broadcast_model(model, comm)


# -- with mpiexec ------------------------------------------------------------------------------------
@needs_mpi
@pytest.mark.parametrize("mode", ["plain", "sync_bn"])
def test_two_ranks_equal_one_process_with_the_global_batch(tmp_path, mode):
    done, _ = run_ranks(mode, tmp_path / "ranks")
    assert done.returncode == 0, done.stderr
    parallel = model_weights(tmp_path / "ranks" / "model.npz")
    single = single_process(mode, tmp_path / "single")
    assert parallel.keys() == single.keys()
    for key in single:  # 12 Adam steps; only the order of float32 sums differs
        np.testing.assert_allclose(parallel[key], single[key], rtol=2e-4, atol=2e-5, err_msg=key)
    history = json.loads((tmp_path / "ranks" / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3]


@needs_mpi
def test_two_ranks_resume_exactly_and_draw_per_rank_streams(tmp_path):
    done, _ = run_ranks("dropout", tmp_path / "whole", env={"EPOCHS": "3"})
    assert done.returncode == 0, done.stderr
    for epochs in ("2", "3"):  # interrupted after epoch 2, then resumed on every rank
        done, _ = run_ranks("dropout", tmp_path / "parts", env={"EPOCHS": epochs})
        assert done.returncode == 0, done.stderr
    whole = model_weights(tmp_path / "whole" / "model.npz")
    parts = model_weights(tmp_path / "parts" / "model.npz")
    for key in whole:
        np.testing.assert_array_equal(parts[key], whole[key], err_msg=key)
    manifest, _ = read_archive(tmp_path / "whole" / "checkpoint.npz", "lowbit.checkpoint")
    ranks = manifest["rng"]["ranks"]
    assert len(ranks) == 2 and ranks[0]["layers"] != ranks[1]["layers"]  # independent dropout streams


@needs_mpi
@pytest.mark.parametrize("mode", ["hang", "kill"])
def test_a_lost_rank_ends_the_run_with_the_checkpoint_intact(tmp_path, mode):
    done, seconds = run_ranks(mode, tmp_path, env={"LOWBIT_TEST_TIMEOUT": "8"})
    assert done.returncode != 0
    assert seconds < 60
    if mode == "hang":  # the waiting rank names the problem before the job is aborted
        assert "did not complete within 8 s" in done.stderr and "aborting every rank" in done.stderr
    # mpiexec may kill rank 0 while it writes epoch 2's checkpoint: the file is then epoch 1's (atomic writes)
    manifest, _ = read_archive(tmp_path / "checkpoint.npz", "lowbit.checkpoint")
    assert manifest["epoch"] == 2 if mode == "hang" else manifest["epoch"] in (1, 2)


def test_comm_timeout_error_is_a_runtime_error():
    assert issubclass(CommTimeoutError, RuntimeError)


def test_benchmark_report_computes_the_ring_model_into_the_docs_block(tmp_path):
    """``experiments/bench_distributed.py --report`` on a fabricated measurement: the model's numbers
    follow the ring formula, and the page's block between the markers is replaced (the rest kept)."""
    import importlib.util

    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
    sys.path.insert(0, here)
    try:
        spec = importlib.util.spec_from_file_location("bench_distributed_under_test",
                                                      os.path.join(here, "bench_distributed.py"))
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(here)
    assert bench.ring_seconds(1, 1e6, 1e-4, 1e9) == 0.0
    assert bench.ring_seconds(4, 1e6, 1e-4, 1e9) == pytest.approx(6 * 1e-4 + 1.5 * 1e6 / 1e9)
    network = {"parameters": 1000, "gradient_bytes": 4000, "images_per_second": {"1": 100.0, "2": 180.0},
               "seconds_per_step": {"1": 1.0, "2": 0.55}, "speedup": 1.8, "efficiency": 0.9,
               "allreduce_seconds_per_step": 0.01, "allreduce_bytes_per_step": 4000}
    document = {"machine": {"cpu_model": "test", "cpus": 2, "loadavg_start": [0.1, 0, 0], "loadavg_end": [0.1]},
                "train": {"batch": 100, "threads_per_rank": 1, "networks": {"net": network},
                          "allreduce_2_ranks": {"fit": {"latency_seconds": 1e-5, "bandwidth_bytes_per_second": 1e9}}}}
    page = tmp_path / "page.md"
    page.write_text(f"before\n{bench.MARK_START}\nold\n{bench.MARK_END}\nafter\n")
    bench.write_report(document, str(tmp_path), str(page))
    text = page.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    rows = {(r["link"], r["machines"]): r for r in document["scaling_model"]["networks"]["net"]["rows"]}
    row = rows[("10 Gbit/s Ethernet", 8)]
    allreduce = 14 * 50e-6 + 2 * 7 / 8 * 4000 / 1.25e9
    assert row["allreduce_seconds"] == pytest.approx(allreduce)
    assert row["strong_step_seconds"] == pytest.approx(1.0 / 8 + allreduce)
    assert "| net | 1,000 | 100 | 180 | 1.80 | 90% |" in text
    assert json.loads((tmp_path / "bench_distributed.json").read_text())["scaling_model"]["batch"] == 100
