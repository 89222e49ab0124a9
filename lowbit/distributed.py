"""Data-parallel training: communicators, the one gradient allreduce per step, synchronised BatchNorm.

The design is ChainerMN's, for numpy/CuPy code.  ``mpiexec -n N`` starts N copies of the same
training script; each builds the same model and the same :class:`~lowbit.trainer.Trainer`, passing
it a communicator (``Trainer(..., comm=MPIComm())``).  Then, every step:

1. every rank draws the same permutation of the training set (the data-order generator is seeded
   by the run's seed alone), takes the same global batch of ``batch_size`` images and keeps its own
   contiguous shard of it (``batch_size / N`` images; shards differ by one image at most; a last
   batch with fewer images than ranks is left out of the epoch);
2. forward and backward on the shard; each parameter gradient is the mean over the shard;
3. :class:`GradientReducer` copies every gradient, weighted by ``shard / batch``, into one flat
   float32 buffer and sums it over the ranks with **one** allreduce; the sum is the gradient of the
   global batch's mean loss, which is then written back to the layers;
4. every rank applies the same optimizer update to the same weights, so weights and optimizer
   state stay identical without ever being sent again (they are broadcast from rank 0 once, when
   :meth:`~lowbit.trainer.Trainer.fit` starts).

BatchNorm normalises with each rank's own shard statistics by default (ChainerMN's default; with a
shard of 50 images or more the difference is small); :func:`synchronize_batchnorm` makes it use the
statistics of the whole global batch (two small allreduces in the forward pass, one in the backward
pass), which makes N ranks compute exactly what one process with the global batch computes, up to the
order of floating-point sums.  Stochastic layers (Dropout, stochastic quantizers) and augmentation
draw from per-rank streams derived from the run's seed and the rank.

Rank 0 evaluates, prints, and writes the history and the checkpoints; the other ranks wait for it
in a collective.  Every collective waits at most ``timeout`` seconds: a rank that died or hangs makes
the others raise :class:`CommTimeoutError` naming the operation, the rank and the timeout, after which
the trainer aborts the whole MPI job (``MPI_Abort``) rather than leaving processes behind.  (With
MPICH's default launcher a rank killed by a signal already ends the job: mpiexec kills the others.)

Communicators
-------------
:class:`SingleComm`
    One process; every collective is the identity.  The trainer's default.
:class:`MPIComm`
    mpi4py on numpy buffers (``Iallreduce`` on the flat float32 gradient, polled until done or timed
    out).  MPI from the ``mpich`` wheel on PyPI works: ``pip install -e ".[dist]"`` puts ``mpiexec``
    in the virtual environment's ``bin`` (:func:`find_mpiexec`).
:class:`NCCLComm`
    CuPy arrays on GPUs: the gradient allreduce goes through NCCL (``cupy.cuda.nccl``) on the current
    CUDA stream, MPI only starts it (the NCCL unique id is broadcast over MPI) and carries the small
    Python objects.  One GPU per rank: rank ``r`` uses device ``r % visible devices``.

Every communicator counts its allreduces: ``comm.stats()`` gives the number, the bytes per rank and
the seconds spent in them, which ``experiments/bench_distributed.py`` reports.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
import time
import types

import numpy as np

from .backend import get_array_module

__all__ = [
    "CommTimeoutError", "Communicator", "SingleComm", "MPIComm", "NCCLComm", "GradientReducer",
    "broadcast_model", "synchronize_batchnorm", "find_mpiexec", "mpi_available", "get_comm",
]

#: Seconds a collective waits for the other ranks before :class:`CommTimeoutError` (rank 0's
#: evaluation and checkpoint happen while the others wait, so it must exceed them).
DEFAULT_TIMEOUT = 600.0


class CommTimeoutError(RuntimeError):
    """A collective did not complete within the communicator's timeout: a rank died or hangs."""


def mpi_available() -> bool:
    """True when mpi4py imports and finds an MPI library."""
    try:
        from mpi4py import MPI  # noqa: F401
    except Exception:  # ImportError, or mpi4py without a loadable libmpi
        return False
    return True


def find_mpiexec():
    """Path of ``mpiexec``: the one next to this Python (the ``mpich`` wheel installs it in the
    environment's scripts folder), else the first on ``PATH``; None when there is none."""
    folders = [os.path.dirname(sys.executable), sysconfig.get_path("scripts")]
    try:  # pip install --user puts the mpich wheel's scripts here
        folders.append(sysconfig.get_path("scripts", f"{os.name}_user"))
    except KeyError:
        pass
    for folder in folders:
        candidate = os.path.join(folder, "mpiexec")
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("mpiexec")


def _check_timeout(timeout):
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0 \
            or not np.isfinite(timeout):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


class Communicator:
    """What the trainer needs from a communicator.

    Attributes ``rank`` and ``size``; ``allreduce_sum(buffer)`` sums a flat float32 array over the
    ranks in place; ``bcast_object``/``gather_object`` move JSON-serialisable objects;
    ``allreduce_values`` sums a few float64 numbers; ``fail(exc)`` ends the job after an error on one
    rank.  Subclasses implement the ``_``-prefixed primitives; the public methods count the traffic.
    """

    rank = 0
    size = 1
    name = "single"
    #: Where the arrays it reduces may live (the trainer's ``device`` must be one of them).
    devices = ("cpu", "gpu")

    def __init__(self):
        self.reset_stats()

    @property
    def is_root(self):
        return self.rank == 0

    def reset_stats(self):
        self._allreduces = 0
        self._allreduce_bytes = 0
        self._allreduce_seconds = 0.0

    def stats(self) -> dict:
        """``{"allreduces", "allreduce_bytes", "allreduce_seconds"}`` since the last reset; bytes are
        the buffer sizes one rank contributed (a ring allreduce sends 2 (N - 1) / N times that)."""
        return {"allreduces": self._allreduces, "allreduce_bytes": self._allreduce_bytes,
                "allreduce_seconds": self._allreduce_seconds}

    def allreduce_sum(self, buffer):
        """Sum the flat float32 ``buffer`` over the ranks, in place; returns it."""
        if buffer.ndim != 1 or buffer.dtype != np.float32:
            raise ValueError(f"buffer must be a flat float32 array, got shape {buffer.shape} and "
                             f"dtype {buffer.dtype}")
        start = time.perf_counter()
        if self.size > 1:
            self._allreduce(buffer)
        self._allreduce_seconds += time.perf_counter() - start
        self._allreduces += 1
        self._allreduce_bytes += buffer.nbytes
        return buffer

    def allreduce_values(self, values):
        """Sum a few numbers over the ranks; returns float64 (n,) on the host."""
        values = np.array(values, dtype=np.float64).reshape(-1)
        if self.size > 1:
            self._allreduce_host(values)
        return values

    def bcast_object(self, obj, root=0):
        """``obj`` of rank ``root`` on every rank (JSON-serialisable objects, or bytes)."""
        return obj if self.size == 1 else self._bcast_object(obj, root)

    def gather_object(self, obj, root=0):
        """List of every rank's ``obj`` on ``root``, None elsewhere."""
        return [obj] if self.size == 1 else self._gather_object(obj, root)

    def bcast_array(self, buffer, root=0):
        """Overwrite the flat float32 ``buffer`` with rank ``root``'s, in place; returns it."""
        if self.size > 1:
            self._bcast_array(buffer, root)
        return buffer

    def barrier(self):
        if self.size > 1:
            self._barrier()

    def fail(self, exc):
        """Called by the trainer when ``exc`` ends the run on this rank: a single process re-raises;
        an MPI job is aborted so that no rank waits for this one."""
        raise exc

    def describe(self) -> str:
        return f"{self.name} communicator, rank {self.rank} of {self.size}"

    # primitives (the multi-process communicators implement them)
    def _allreduce(self, buffer):
        raise NotImplementedError

    def _allreduce_host(self, values):
        raise NotImplementedError

    def _bcast_object(self, obj, root):
        raise NotImplementedError

    def _gather_object(self, obj, root):
        raise NotImplementedError

    def _bcast_array(self, buffer, root):
        raise NotImplementedError

    def _barrier(self):
        raise NotImplementedError


class SingleComm(Communicator):
    """One process: every collective is the identity (the trainer's default)."""


def _encode(obj) -> np.ndarray:
    if isinstance(obj, (bytes, bytearray)):
        payload = b"B" + bytes(obj)
    else:
        payload = b"J" + json.dumps(obj).encode("utf-8")
    return np.frombuffer(payload, dtype=np.uint8)


def _decode(raw: np.ndarray):
    payload = raw.tobytes()
    return payload[1:] if payload[:1] == b"B" else json.loads(payload[1:].decode("utf-8"))


class MPIComm(Communicator):
    """Communicator over MPI (mpi4py), for numpy arrays.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        Default ``MPI.COMM_WORLD``.
    timeout : float
        Seconds every collective may wait for the other ranks before :class:`CommTimeoutError`
        (default 600).  Rank 0 evaluates and writes the checkpoint while the others wait in the next
        collective, so it must be longer than that.
    abort_on_error : bool
        ``fail(exc)`` prints the error and calls ``MPI_Abort`` (default), ending every rank of the
        job; False re-raises instead (the other ranks then time out).
    """

    name = "mpi"
    devices = ("cpu",)

    def __init__(self, comm=None, timeout=DEFAULT_TIMEOUT, abort_on_error=True):
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise ImportError("MPIComm needs mpi4py and an MPI library: pip install -e \".[dist]\" "
                              "(mpi4py and the mpich wheel)") from exc
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        if not isinstance(self.comm, MPI.Comm):
            raise TypeError(f"comm must be an mpi4py.MPI.Comm, got {type(self.comm).__name__}")
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.timeout = _check_timeout(timeout)
        self.abort_on_error = bool(abort_on_error)
        super().__init__()

    def _wait(self, request, what):
        """Poll ``request`` until it completes; spin briefly (MPI progresses inside ``Test``), then
        sleep in growing steps so that a rank waiting for rank 0's evaluation leaves the core free."""
        deadline = time.monotonic() + self.timeout
        spins = 0
        pause = 2e-5
        while not request.Test():
            spins += 1
            if spins > 2000:
                time.sleep(pause)
                pause = min(pause * 1.5, 2e-3)
                if time.monotonic() > deadline:
                    raise CommTimeoutError(
                        f"rank {self.rank} of {self.size}: {what} did not complete within "
                        f"{self.timeout:g} s; another rank died or hangs (raise the timeout if rank 0's "
                        "evaluation and checkpoint take longer)")

    def _allreduce(self, buffer):
        if get_array_module(buffer) is not np:
            raise TypeError("MPIComm reduces host (numpy) buffers; use NCCLComm for CuPy arrays")
        self._wait(self.comm.Iallreduce(self._MPI.IN_PLACE, buffer, op=self._MPI.SUM), "the gradient allreduce")

    def _allreduce_host(self, values):
        self._wait(self.comm.Iallreduce(self._MPI.IN_PLACE, values, op=self._MPI.SUM), "an allreduce")

    def _bcast_bytes(self, raw, root, what):
        length = np.array([0 if raw is None else raw.size], dtype=np.int64)
        self._wait(self.comm.Ibcast(length, root=root), what)
        if self.rank != root:
            raw = np.empty(int(length[0]), dtype=np.uint8)
        self._wait(self.comm.Ibcast(raw, root=root), what)
        return raw

    def _bcast_object(self, obj, root):
        raw = _encode(obj) if self.rank == root else None
        return _decode(self._bcast_bytes(raw, root, "a broadcast"))

    def _gather_object(self, obj, root):
        raw = _encode(obj)
        lengths = np.zeros(self.size, dtype=np.int64)
        self._wait(self.comm.Igather(np.array([raw.size], dtype=np.int64), lengths, root=root), "a gather")
        if self.rank != root:
            self._wait(self.comm.Igatherv(raw, None, root=root), "a gather")
            return None
        received = np.empty(int(lengths.sum()), dtype=np.uint8)
        self._wait(self.comm.Igatherv(raw, (received, lengths), root=root), "a gather")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        return [_decode(received[offsets[i]:offsets[i + 1]]) for i in range(self.size)]

    def _bcast_array(self, buffer, root):
        if get_array_module(buffer) is not np:
            raise TypeError("MPIComm broadcasts host (numpy) buffers; use NCCLComm for CuPy arrays")
        self._wait(self.comm.Ibcast(buffer, root=root), "a parameter broadcast")

    def _barrier(self):
        self._wait(self.comm.Ibarrier(), "a barrier")

    def fail(self, exc):
        if not self.abort_on_error:
            raise exc
        sys.stderr.write(f"\nlowbit: rank {self.rank} of {self.size} stops: {type(exc).__name__}: {exc}\n"
                         "lowbit: aborting every rank of the MPI job (the last checkpoint is intact)\n")
        sys.stderr.flush()
        # MPI_Abort tears the job down at once, and the process manager may drop output it has not
        # forwarded yet: give it a moment, so that the user sees why every rank ended.
        time.sleep(1.0)
        self.comm.Abort(1)


class NCCLComm(MPIComm):
    """Communicator for CuPy arrays: NCCL allreduce of the gradient buffer on the GPU.

    MPI starts the job: rank 0 creates the NCCL unique id and broadcasts it, then every rank opens
    its ``cupy.cuda.nccl.NcclCommunicator``.  The small objects (history, random states) still go
    over MPI.  Rank ``r`` selects CUDA device ``r % device_count`` before anything is allocated.

    Parameters are :class:`MPIComm`'s; ``nccl`` is the module to use (default ``cupy.cuda.nccl``,
    replaceable for tests).
    """

    name = "nccl"
    devices = ("gpu",)

    def __init__(self, comm=None, timeout=DEFAULT_TIMEOUT, abort_on_error=True, nccl=None):
        super().__init__(comm, timeout, abort_on_error)
        from .backend import cupy

        if nccl is None:
            if cupy is None:
                raise RuntimeError("NCCLComm needs CuPy and a CUDA device; neither was found")
            try:
                from cupy.cuda import nccl
            except ImportError as exc:
                raise RuntimeError("NCCLComm needs CuPy built with NCCL (cupy.cuda.nccl did not "
                                   "import); install the nccl wheel for your CUDA version") from exc
            if not getattr(nccl, "available", True):
                raise RuntimeError("CuPy's NCCL support is not available (cupy.cuda.nccl.available "
                                   "is False); install nvidia-nccl-cu12 / -cu13")
            devices = cupy.cuda.runtime.getDeviceCount()
            cupy.cuda.Device(self.rank % devices).use()
        self._nccl = nccl
        unique_id = nccl.get_unique_id() if self.rank == 0 else None
        unique_id = self.bcast_object(list(unique_id) if unique_id is not None else None)
        self._nccl_comm = nccl.NcclCommunicator(self.size, tuple(unique_id), self.rank)

    def _allreduce(self, buffer):
        from .backend import cupy

        stream = cupy.cuda.get_current_stream() if cupy is not None else None
        self._nccl_comm.allReduce(buffer.data.ptr, buffer.data.ptr, buffer.size, self._nccl.NCCL_FLOAT32,
                                  self._nccl.NCCL_SUM, 0 if stream is None else stream.ptr)
        if stream is not None:
            self._wait(_StreamRequest(stream), "the NCCL gradient allreduce")

    def _bcast_array(self, buffer, root):
        from .backend import cupy

        stream = cupy.cuda.get_current_stream() if cupy is not None else None
        self._nccl_comm.bcast(buffer.data.ptr, buffer.size, self._nccl.NCCL_FLOAT32, root,
                              0 if stream is None else stream.ptr)
        if stream is not None:
            self._wait(_StreamRequest(stream), "the NCCL parameter broadcast")

    def fail(self, exc):
        try:
            self._nccl_comm.abort()
        finally:
            super().fail(exc)


class _StreamRequest:
    """A CUDA stream looked at as an MPI request: ``Test()`` is True once its work is done."""

    def __init__(self, stream):
        self.stream = stream

    def Test(self):  # noqa: N802 (the name MPIComm._wait calls)
        return self.stream.done


def get_comm(kind="auto", timeout=DEFAULT_TIMEOUT):
    """The communicator for this process: ``"single"``, ``"mpi"``, ``"nccl"``, or ``"auto"``
    (MPI when this process was started by mpiexec with more than one rank, else single)."""
    if kind == "single":
        return SingleComm()
    if kind == "mpi":
        return MPIComm(timeout=timeout)
    if kind == "nccl":
        return NCCLComm(timeout=timeout)
    if kind != "auto":
        raise ValueError(f"comm must be one of 'auto', 'single', 'mpi', 'nccl', got {kind!r}")
    launched = any(name in os.environ for name in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE",
                                                   "PMIX_RANK", "MPI_LOCALNRANKS"))
    if launched and mpi_available():
        comm = MPIComm(timeout=timeout)
        if comm.size > 1:
            return comm
    return SingleComm()


# -- the gradient allreduce --------------------------------------------------------------------------
class GradientReducer:
    """Average parameter gradients over the ranks with one allreduce of one flat buffer per step.

    The buffer (float32, on the model's device) is allocated once, for the parameters that have a
    gradient after the first backward pass, and reused every step.
    """

    def __init__(self, comm):
        self.comm = comm
        self.layout = None  # [(layer, attr, offset, shape)]
        self.buffer = None

    def _build(self, model):
        layout = []
        offset = 0
        xp = np
        for _, layer, attr in model.named_arrays(buffers=False):
            grad = getattr(layer, "d" + attr, None)
            if grad is None:
                continue
            xp = get_array_module(grad)
            layout.append((layer, attr, offset, grad.shape))
            offset += grad.size
        if not layout:
            raise ValueError("no parameter of the model has a gradient: run backward before reducing")
        self.layout = layout
        self.buffer = xp.zeros(offset, dtype=np.float32)

    @property
    def nbytes(self):
        return 0 if self.buffer is None else self.buffer.nbytes

    def allreduce(self, model, weight):
        """Replace every gradient by the sum over the ranks of ``weight * gradient``.

        ``weight`` is this rank's share of the global batch (its images / the batch's images), so the
        sum is the gradient of the global batch's mean loss.  A rank with no images in the batch
        """
        if self.layout is None:
            self._build(model)
        buffer = self.buffer
        xp = get_array_module(buffer)
        for layer, attr, offset, shape in self.layout:
            grad = getattr(layer, "d" + attr)
            if grad is None or grad.shape != shape:
                raise ValueError(f"gradient {attr} of {type(layer).__name__} changed shape or vanished "
                                 "between steps; the reducer's buffer layout no longer fits")
            size = int(np.prod(shape))
            xp.multiply(grad.reshape(-1), np.float32(weight), out=buffer[offset:offset + size])
        self.comm.allreduce_sum(buffer)
        for layer, attr, offset, shape in self.layout:
            size = int(np.prod(shape))
            setattr(layer, "d" + attr, buffer[offset:offset + size].reshape(shape))


def broadcast_model(model, comm, root=0):
    """Copy rank ``root``'s parameters and buffers to every rank (one flat broadcast)."""
    if comm.size == 1:
        return model
    entries = [(layer, attr) for _, layer, attr in model.named_arrays()]
    arrays = [getattr(layer, attr) for layer, attr in entries]
    for (layer, attr), arr in zip(entries, arrays):
        if arr.dtype != np.float32:
            raise TypeError(f"broadcast_model handles float32 arrays; {type(layer).__name__}.{attr} is "
                            f"{arr.dtype}")
    xp = get_array_module(*arrays)
    flat = xp.concatenate([arr.reshape(-1) for arr in arrays]) if arrays else xp.zeros(0, np.float32)
    comm.bcast_array(flat, root)
    offset = 0
    for (layer, attr), arr in zip(entries, arrays):
        setattr(layer, attr, flat[offset:offset + arr.size].reshape(arr.shape).copy())
        offset += arr.size
    for _, layer in model.named_layers():
        layer._clear_cache()
    return model


# -- synchronised BatchNorm ------------------------------------------------------------------------
def synchronize_batchnorm(model, comm):
    """Make every BatchNorm of ``model`` normalise with the statistics of the global batch.

    The forward pass sums each channel's values, then its squared deviations from the global mean,
    over the ranks (two allreduces of 2 x channels + 1 numbers); the backward pass sums the two
    per-channel reductions of the BatchNorm gradient (one allreduce).  The layers keep their class
    and their file format: only these instances' ``forward``/``backward`` are replaced.  Returns the
    number of layers changed (0 with one rank: nothing to synchronise).
    """
    from .layers import BatchNorm

    if comm.size == 1:
        return 0
    count = 0
    for _, layer in model.named_layers():
        if isinstance(layer, BatchNorm):
            layer._comm = comm
            layer.forward = types.MethodType(_sync_bn_forward, layer)
            layer.backward = types.MethodType(_sync_bn_backward, layer)
            count += 1
    return count


def _reduce_channels(comm, xp, values):
    """Sum float64 per-channel arrays (and counts) over the ranks; on the host, as MPI's are."""
    host = np.concatenate([np.asarray(v.get() if hasattr(v, "get") else v, dtype=np.float64).reshape(-1)
                           for v in values])
    summed = comm.allreduce_values(host)
    out = []
    offset = 0
    for v in values:
        size = int(np.prod(np.shape(v)))
        out.append(xp.asarray(summed[offset:offset + size].reshape(np.shape(v))))
        offset += size
    return out


def _sync_bn_forward(self, x, train=False):
    from .functions import batchnorm_axes
    from .layers import BatchNorm

    if not train:
        return BatchNorm.forward(self, x, train=False)
    axes, bshape = batchnorm_axes(x)
    out_dtype = x.dtype
    if x.dtype == np.float16:
        x = x.astype(np.float32)
    if x.shape[1] != self.num_features:
        raise ValueError(f"BatchNorm expects {self.num_features} features on axis 1, got shape {x.shape}")
    xp = get_array_module(x)
    local = x.size // x.shape[1]
    total, count = _reduce_channels(self._comm, xp, [x.sum(axis=axes, dtype=np.float64),
                                                     np.array([local], dtype=np.float64)])
    count = float(count[0])
    mean = (total / count).astype(np.float32)
    xc = x - mean.reshape(bshape)
    (squares,) = _reduce_channels(self._comm, xp, [(xc * xc).sum(axis=axes, dtype=np.float64)])
    var = (squares / count).astype(np.float32)
    m = self.momentum
    self.running_mean = (m * self.running_mean + (1 - m) * mean).astype(np.float32)
    self.running_var = (m * self.running_var + (1 - m) * var).astype(np.float32)
    inv_std = (1.0 / xp.sqrt(var + np.float32(self.eps))).astype(x.dtype, copy=False)
    xn = xc * inv_std.reshape(bshape)
    self._cache = (xn, inv_std, axes, bshape, True, local, count)
    out = self.gamma.reshape(bshape) * xn + self.beta.reshape(bshape)
    return out.astype(out_dtype, copy=False)


def _sync_bn_backward(self, dout):
    """The gradient of BatchNorm over the global batch.

    Each rank's ``dout`` is the gradient of its own shard's mean loss, i.e. (global batch / shard)
    times its part of the global loss's gradient; the per-channel sums are brought to global units
    with the shard's weight (shard / global batch), summed over the ranks, and brought back by
    dividing by the shard's size, which makes the result what one process computes for its shard's
    rows of the global batch, in the same units as the rest of this rank's backward pass.
    """
    from .layers import BatchNorm

    cache = self._cache
    if len(cache) == 5:  # an evaluation-mode forward: running statistics, nothing to synchronise
        return BatchNorm.backward(self, dout)
    xn, inv_std, axes, bshape, _, local, count = cache
    out_dtype = dout.dtype
    dout = dout.astype(xn.dtype, copy=False)
    self.dbeta = dout.sum(axis=axes)
    self.dgamma = (dout * xn).sum(axis=axes)
    dxn = dout * self.gamma.reshape(bshape)
    xp = get_array_module(dout)
    weight = local / count
    sum_dxn, sum_dxn_xn = _reduce_channels(self._comm, xp, [dxn.sum(axis=axes, dtype=np.float64) * weight,
                                                            (dxn * xn).sum(axis=axes, dtype=np.float64) * weight])
    dx = (dxn - (sum_dxn / local).astype(np.float32).reshape(bshape)
          - xn * (sum_dxn_xn / local).astype(np.float32).reshape(bshape)) * inv_std.reshape(bshape)
    return dx.astype(out_dtype, copy=False)
