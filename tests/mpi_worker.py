"""Run by ``mpiexec -n N python tests/mpi_worker.py MODE OUT_DIR`` from tests/test_distributed.py.

Modes (each trains :func:`small_model` on :func:`small_data` with ``MPIComm``):

``plain``    no BatchNorm, no Dropout, 3 epochs: the weights must equal one process's with the same
             global batch.
``sync_bn``  BatchNorm with ``sync_batchnorm=True``: likewise.
``dropout``  BatchNorm (per rank) and Dropout, ``EPOCHS`` epochs (env, default 3), resumable.
``hang``     rank 1 stops answering in epoch 3: the other rank must time out with a clear error.
``kill``     rank 1 kills itself (SIGKILL) in epoch 3: the job must end, the checkpoint intact.
"""
import os
import signal
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lowbit.distributed import MPIComm  # noqa: E402
from lowbit.layers import Affine, BatchNorm, Dropout, Flatten, ReLU  # noqa: E402
from lowbit.model import Model  # noqa: E402
from lowbit.optimizers import Adam  # noqa: E402
from lowbit.trainer import Trainer  # noqa: E402

GLOBAL_BATCH = 32


def small_data(n=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 4, 4), dtype=np.float32)
    y = (x.reshape(n, -1)[:, :8].sum(axis=1) > x.reshape(n, -1)[:, 8:].sum(axis=1)).astype(np.int64)
    y += (x[:, 0, 0, 0] > 0.7).astype(np.int64)
    return x, y


def small_model(batchnorm, dropout):
    # no bias in front of BatchNorm: its gradient is rounding noise, which Adam would amplify
    layers = [Flatten(), Affine(16, 32, bias=not batchnorm, seed=1)]
    layers += [BatchNorm(32)] if batchnorm else []
    layers += [ReLU()] + ([Dropout(0.3)] if dropout else []) + [Affine(32, 3, seed=2)]
    return Model(layers, input_shape=(1, 4, 4), name="small")


def trainer(mode, out_dir, comm=None, epochs=3):
    model = small_model(batchnorm=mode in ("sync_bn", "dropout", "hang", "kill"),
                        dropout=mode in ("dropout", "hang", "kill"))
    return Trainer(model, optimizer=Adam(0.01), epochs=epochs, batch_size=GLOBAL_BATCH, seed=5,
                   out_dir=out_dir, progress=False, comm=comm, sync_batchnorm=mode == "sync_bn")


def main():
    mode, out_dir = sys.argv[1], sys.argv[2]
    comm = MPIComm(timeout=120)
    comm.barrier()  # the ranks start together, however loaded the machine: then the test's timeout
    comm.timeout = float(os.environ.get("LOWBIT_TEST_TIMEOUT", "60"))
    run = trainer(mode, out_dir, comm, epochs=int(os.environ.get("EPOCHS", "3")))
    if mode in ("hang", "kill") and comm.rank == 1:
        original = run.train_epoch

        def failing_epoch(x, y, lr):
            if run.epoch == 2:
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)
            return original(x, y, lr)

        run.train_epoch = failing_epoch
    x, y = small_data()
    run.fit(x, y, x[:40], y[:40], resume=True)
    if comm.rank == 0:
        print("stats", comm.stats())


if __name__ == "__main__":
    main()
