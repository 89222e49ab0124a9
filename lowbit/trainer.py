"""Minibatch training with progress bars, per-epoch evaluation, atomic checkpoints and exact resume.

Files written to ``out_dir`` (each atomically: temporary file, then rename):

``checkpoint.npz``
    After every epoch: parameters, buffers, optimizer state, every random generator's state (data
    shuffling, augmentation, dropout and stochastic quantizers) and the history.  ``resume=True``
    continues from it and produces the same weights, bit for bit, as a run that was never interrupted.
``history.json``
    One record per epoch: loss, train/validation/test accuracy, learning rate, seconds.
``model.npz``
    The final model (:func:`lowbit.save_model` format); ``best.npz`` too when a validation set is given
    (the model of the epoch with the best validation accuracy, as the BinaryNet paper reports).

Data-parallel training (``comm=``, :mod:`lowbit.distributed`): every rank runs the same Trainer on
its shard of each global batch; rank 0 alone evaluates and writes these files; ``resume=True``
restarts every rank from rank 0's checkpoint (sent to the others, so no shared filesystem is needed).
"""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from .augment import Augment
from .backend import cupy, to_numpy
from .checkpoint import CheckpointMixin, ResumeMismatchError, config_differences
from .device import check_device
from .distributed import Communicator, GradientReducer, broadcast_model, get_comm, synchronize_batchnorm
from .io import save_model, write_json_atomic
from .losses import get_loss
from .mixed_precision import PRECISIONS, LossScaler, mixed_precision_step
from .optimizers import Adam, ConstantLR, Optimizer
from .progress import step, tqdm
from .recalibration import recalibrate_batchnorm

__all__ = ["ResumeMismatchError", "Trainer", "config_differences", "recalibrate_batchnorm", "write_json_atomic"]

_clock = time.perf_counter  # module-level so that tests can drive the time budget with a fake clock

def _check_data(name, x, y, input_shape):
    if x is None:
        return
    if not hasattr(x, "shape") or x.ndim != len(input_shape) + 1 or tuple(x.shape[1:]) != input_shape:
        raise ValueError(f"{name} images must have shape (N, {', '.join(map(str, input_shape))}), "
                         f"got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype != np.float32:
        raise TypeError(f"{name} images must be float32 in [0, 1], got dtype {x.dtype}")
    if y is None or np.asarray(y).shape != (x.shape[0],):
        raise ValueError(f"{name} labels must have shape ({x.shape[0]},), got "
                         f"{None if y is None else np.asarray(y).shape}")


def _check_teacher(teacher, loss):
    """``teacher`` (None or an object with ``scores(x)`` and ``config()``) fits ``loss``."""
    if teacher is None:
        return None
    if not (callable(getattr(teacher, "scores", None)) and callable(getattr(teacher, "config", None))):
        raise TypeError(f"teacher must be a lowbit.recipes.Teacher (scores, config), got {type(teacher).__name__}")
    if not hasattr(loss, "teacher_scores"):
        raise ValueError(f"a teacher needs a distillation loss (lowbit.losses.Distillation), got {type(loss).__name__}")
    return teacher


def _check_comm(comm, precision, device, batch_size):
    """The communicator a Trainer runs on (``None``: :func:`lowbit.distributed.get_comm`), checked
    against the settings that several ranks cannot take."""
    chosen = get_comm("auto") if comm is None else comm
    if not isinstance(chosen, Communicator):
        raise TypeError(f"comm must be a lowbit.distributed.Communicator or None, got {type(comm).__name__}")
    if chosen.size > 1 and precision != "fp32":
        raise ValueError(f"precision {precision!r} is not supported with more than one rank "
                         "(the ranks would have to agree on every skipped step); use 'fp32'")
    if chosen.size > 1 and device not in chosen.devices:
        raise ValueError(f"device {device!r} needs another communicator: {type(chosen).__name__} "
                         f"reduces arrays on {' or '.join(chosen.devices)} (MPIComm: cpu, NCCLComm: gpu)")
    if chosen.size > 1 and batch_size < chosen.size:
        raise ValueError(f"batch_size is the global batch and must be at least the number of ranks "
                         f"({chosen.size}), got {batch_size}")
    return chosen


class Trainer(CheckpointMixin):
    """Train a :class:`~lowbit.model.Model`.

    Parameters
    ----------
    model : Model
    loss : str or loss object
        'cross_entropy' or 'squared_hinge', or a loss object of :mod:`lowbit.losses` (e.g.
        ``SoftmaxCrossEntropy(label_smoothing=0.1)``, or ``Distillation(...)`` with ``teacher``).
    optimizer : Optimizer
        Default ``Adam(lr=0.001)``.
    schedule : callable or None
        ``schedule(epoch) -> lr``; default: the optimizer's constant ``lr``.
    epochs, batch_size : int
    augment : callable or None
        ``augment(x_batch, rng) -> x_batch`` (see :mod:`lowbit.augment`); off by default.  The
        identity ``Augment()`` counts as off (None), here and when resuming a checkpoint saved with it.
    seed : int
        Seeds data order, augmentation and every stochastic layer; equal seeds give equal runs.
    out_dir : str or None
        Where checkpoints, history and the final model go; nothing is written when None.
    device : 'cpu' or 'gpu'
    progress : bool
        Show tqdm bars.
    precision : 'fp32' or 'mixed16'
        'mixed16': float16 forward/backward with float32 master weights and dynamic loss scaling
        (:mod:`lowbit.mixed_precision`).
    bn_recalibrate : int
        After every epoch, before evaluating, set the BatchNorm running statistics from this many
        (unaugmented) training images with :func:`recalibrate_batchnorm`; 0 (default) keeps the
        running averages of training.  Binary networks with real-valued shortcuts need it.
    time_budget : float or None
        Seconds for the whole of :meth:`fit`.  ``epochs`` is then the most it may train: after the first
        epoch the trainer times it (the second half of its batches, which excludes one-off costs such as
        compiling GPU kernels, plus evaluation and the checkpoint), fixes the number of epochs to what
        fits in the rest of the budget (at least 1, at most ``epochs``) and stretches the schedule to it
        (``schedule.with_epochs``).  The first epoch's learning rate does not depend on the length, so
        the run is the one ``epochs=N`` would give with the N it chose (``trainer.epochs`` after
        :meth:`fit`, also in the checkpoint and, as ``epochs_fixed``, in the record of the epoch that
        fixed it).  None
        (default): train exactly ``epochs``.
    checkpoint_every : int
        Write ``checkpoint.npz`` after every this many epochs and after the last (default 1: every
        epoch).  A large model on a fast device spends a good part of each epoch writing it; an
        interrupted run resumes from the last one written.
    comm : lowbit.distributed.Communicator or None
        Data-parallel training over the ranks of ``comm`` (:mod:`lowbit.distributed`):
        ``batch_size`` is then the *global* batch, split between the ranks; one gradient allreduce
        per step; rank 0 evaluates and writes the files; :meth:`fit` returns rank 0's model on every
        rank.  None (default): MPI when the process was started by ``mpiexec`` with several ranks
        (so ``mpiexec -n N python3 experiments/<script>.py`` trains data-parallel), else one process;
        ``lowbit.distributed.SingleComm()`` forces one process.
    sync_batchnorm : bool
        With ``comm``: BatchNorm layers normalise with the statistics of the global batch instead
        of each rank's shard (:func:`lowbit.distributed.synchronize_batchnorm`).
    teacher : lowbit.recipes.Teacher or None
        Knowledge distillation: the teacher's scores of every training batch (augmented as the
        student sees it) are handed to ``loss``, which must then be a
        :class:`~lowbit.losses.Distillation`.  See :mod:`lowbit.recipes`.
    """

    def __init__(self, model, loss="cross_entropy", optimizer=None, schedule=None, epochs=10,
                 batch_size=100, augment=None, seed=0, out_dir=None, device="cpu", progress=True,
                 eval_batch_size=100, precision="fp32", loss_scaler=None, bn_recalibrate=0,
                 time_budget=None, checkpoint_every=1, comm=None, sync_batchnorm=False, teacher=None):
        if not isinstance(epochs, (int, np.integer)) or epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        check_device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if isinstance(bn_recalibrate, bool) or not isinstance(bn_recalibrate, (int, np.integer)) \
                or bn_recalibrate < 0:
            raise ValueError(f"bn_recalibrate must be an int >= 0 (training images; 0: off), got {bn_recalibrate!r}")
        self.bn_recalibrate = int(bn_recalibrate)
        if time_budget is not None and (isinstance(time_budget, bool) or not isinstance(time_budget, (int, float))
                                        or not time_budget > 0 or not np.isfinite(time_budget)):
            raise ValueError(f"time_budget must be a positive number of seconds or None, got {time_budget!r}")
        self.time_budget = None if time_budget is None else float(time_budget)
        self.budget_fixed = False  # True once the time budget has fixed self.epochs
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, (int, np.integer)) \
                or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be a positive int (epochs), got {checkpoint_every!r}")
        self.checkpoint_every = int(checkpoint_every)
        self.comm = _check_comm(comm, precision, device, batch_size)
        distributed = self.comm.size > 1
        self._reducer = GradientReducer(self.comm) if distributed else None
        self._marks = {}
        self.precision = precision
        self.scaler = (loss_scaler or LossScaler()) if precision == "mixed16" else None
        self.model = model
        self.loss = get_loss(loss) if isinstance(loss, str) else loss
        self.loss_name = loss if isinstance(loss, str) else getattr(self.loss, "config", lambda: self.loss.name)()
        self.teacher = _check_teacher(teacher, self.loss)
        self.optimizer = optimizer if optimizer is not None else Adam(0.001)
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(f"optimizer must be a lowbit Optimizer, got {type(self.optimizer).__name__}")
        self.schedule = schedule if schedule is not None else ConstantLR(self.optimizer.lr)
        self.epochs = self.max_epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.augment = None if isinstance(augment, Augment) and augment == Augment() else augment
        self.seed = int(seed)
        self.out_dir = out_dir
        self.device = device
        self.progress = bool(progress) and self.comm.is_root
        self.eval_batch_size = int(eval_batch_size)
        self.history: list[dict] = []
        self.epoch = 0  # epochs completed
        # The data order is the same on every rank; augmentation and stochastic layers draw per rank.
        self.rng = np.random.default_rng(np.random.SeedSequence([self.seed, 1]))
        self._seed_rank_streams(() if not distributed else (self.comm.rank,))
        self.sync_batchnorm = bool(sync_batchnorm)
        if self.sync_batchnorm:
            synchronize_batchnorm(self.model, self.comm)
        self.best_val = -1.0
        if device == "gpu":
            self.model.to_device("gpu")
            self.optimizer.to_device("gpu")

    def _seed_rank_streams(self, key):
        self.aug_rng = np.random.default_rng(np.random.SeedSequence([self.seed, 2, *key]))
        self.model.seed(np.random.SeedSequence([self.seed, 3, *key]).generate_state(1)[0])

    # -- bookkeeping -----------------------------------------------------------------------------
    def _path(self, name):
        return os.path.join(self.out_dir, name)

    def run_config(self) -> dict:
        """What must not change between an interrupted run and its resumption."""
        config = {
            "loss": self.loss_name,
            "optimizer": {"name": self.optimizer.name, **self.optimizer.config()},
            "schedule": getattr(self.schedule, "config", lambda: repr(self.schedule))(),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "precision": self.precision,
            "augment": getattr(self.augment, "config", lambda: self.augment is not None)(),
            "model": self.model.spec(),
        }
        if self.bn_recalibrate:  # only when on, so that older checkpoints still resume
            config["bn_recalibrate"] = self.bn_recalibrate
        if self.time_budget is not None:  # likewise
            config["time_budget"] = {"seconds": self.time_budget, "max_epochs": self.max_epochs}
        if self.sync_batchnorm and self.comm.size > 1:  # likewise
            config["sync_batchnorm"] = True
        if self.teacher is not None:
            config["teacher"] = self.teacher.config()
        return config

    # -- the time budget -------------------------------------------------------------------------
    def _fix_epochs(self, epochs):
        self.epochs = int(epochs)
        if hasattr(self.schedule, "with_epochs"):
            self.schedule = self.schedule.with_epochs(self.epochs)
        self.budget_fixed = True

    def _apply_time_budget(self, elapsed):
        """After the first epoch of this call of :meth:`fit` (``elapsed`` seconds into it): fix
        ``self.epochs`` to what fits in the rest of the budget."""
        marks = self._marks
        train = marks["train_end"] - marks["train_start"]
        if marks.get("half") is not None:  # the second half of the batches: no one-off warm-up costs
            train = 2.0 * (marks["train_end"] - marks["half"])
        per_epoch = train + (marks["epoch_end"] - marks["train_end"])
        more = int(max(0.0, self.time_budget - elapsed) // max(per_epoch, 1e-9))
        self._fix_epochs(min(self.max_epochs, self.epoch + more))
        self.history[-1]["epochs_fixed"] = self.epochs
        self.history[-1]["epoch_seconds_estimate"] = per_epoch
        if self.progress:
            tqdm.write(f"time budget {self.time_budget:g} s: {self.epochs} epochs "
                       f"(about {per_epoch:.3g} s each, {elapsed:.3g} s spent on the first)")

    # -- the loop ---------------------------------------------------------------------------------
    def _to_device(self, x):
        return cupy.asarray(x) if self.device == "gpu" else x

    def train_epoch(self, x, y, lr):
        n = x.shape[0]
        order = self.rng.permutation(n)
        batches = range(0, n, self.batch_size)
        total_loss = 0.0
        correct = 0
        seen = 0
        bar = tqdm(batches, desc=f"epoch {self.epoch + 1}/{self.epochs}", leave=False,
                   disable=not self.progress, unit="batch")
        half = len(batches) // 2 if len(batches) >= 4 else None
        self._marks = {"train_start": _clock(), "half": None}
        for number, start in enumerate(bar):
            if number == half:
                self._marks["half"] = _clock()
            idx = order[start:start + self.batch_size]
            if self._reducer is not None:  # this rank's contiguous shard of the global batch
                batch = len(idx)
                if batch < self.comm.size:
                    continue  # too few images for every rank to get one: left out on every rank
                rank, size = self.comm.rank, self.comm.size
                idx = idx[batch * rank // size:batch * (rank + 1) // size]
            xb = x[idx]
            if self.augment is not None:
                xb = self.augment(xb, self.aug_rng)
            yb = y[idx]
            xb_d = self._to_device(xb)
            yb_d = self._to_device(yb)
            if self.teacher is not None:
                self.loss.teacher_scores = self.teacher.scores(xb_d)
            if self.precision == "mixed16":
                loss, scores, _ = mixed_precision_step(self.model, self.loss, self.optimizer,
                                                       self.scaler, xb_d, yb_d, lr)
                if self.scaler.skipped_in_a_row >= 50:
                    raise FloatingPointError(
                        f"50 mixed-precision steps in a row overflowed (loss scale now "
                        f"{self.scaler.scale:g}); the float16 forward pass itself overflows"
                    )
                if not np.isfinite(loss):
                    continue
            else:
                scores = self.model.forward(xb_d, train=True)
                loss = self.loss.forward(scores, yb_d)
                if not np.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {loss} at epoch {self.epoch + 1}, batch "
                        f"{start // self.batch_size}; lower the learning rate"
                    )
                # nothing reads the input gradient: the first layer skips it (Sequential.backward)
                self.model.backward(self.loss.backward(), input_grad=False)
                if self._reducer is not None:
                    self._reducer.allreduce(self.model, len(idx) / batch)
                self.optimizer.step(self.model, lr)
            total_loss += loss * len(idx)
            correct += int((to_numpy(scores.argmax(axis=1)) == yb).sum())
            seen += len(idx)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}")
        bar.close()
        if self._reducer is not None:  # the epoch's loss and accuracy over every rank's images
            total_loss, correct, seen = self.comm.allreduce_values([total_loss, correct, seen])
        self._marks["train_end"] = _clock()
        if seen == 0:
            raise FloatingPointError("every step of the epoch overflowed in float16")
        return total_loss / seen, correct / seen

    def fit(self, x_train, y_train, x_val=None, y_val=None, x_test=None, y_test=None, resume=False):
        """Train for the remaining epochs; returns the history (list of per-epoch dicts)."""
        shape = self.model.input_shape
        _check_data("x_train", x_train, y_train, shape)
        _check_data("x_val", x_val, y_val, shape)
        _check_data("x_test", x_test, y_test, shape)
        y_train = np.asarray(y_train)
        if resume:
            if self.out_dir is None:
                raise ValueError("resume=True needs out_dir, where the checkpoint lives")
            if self.comm.size > 1:
                self._resume_ranks()
            elif os.path.exists(self._path("checkpoint.npz")):
                self.load_checkpoint()
            step(f"resuming from {self._path('checkpoint.npz')} after epoch {self.epoch}", self.progress and self.epoch)
        if self.comm.size > 1:
            broadcast_model(self.model, self.comm)  # every rank starts from rank 0's weights
        try:
            return self._fit(x_train, y_train, x_val, y_val, x_test, y_test)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            if self.comm.size > 1:
                self.comm.fail(exc)  # MPI: abort every rank rather than leave them waiting
            raise

    def _replica_digest(self):
        digest = hashlib.sha256()
        for _, layer, attr in self.model.named_arrays(buffers=False):
            digest.update(np.ascontiguousarray(to_numpy(getattr(layer, attr))).tobytes())
        return digest.hexdigest()

    def _check_replicas(self):
        """Every rank must hold the same weights after an epoch (one hash each, compared on rank 0)."""
        digests = self.comm.gather_object(self._replica_digest())
        if self.comm.is_root and len(set(digests)) > 1:
            differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
            raise RuntimeError(f"after epoch {self.epoch} the weights of rank(s) {differ} differ from rank "
                               "0's: the ranks ran different code or data")

    def _fit(self, x_train, y_train, x_val, y_val, x_test, y_test):
        root = self.comm.is_root
        epoch_bar = tqdm(total=self.epochs, initial=self.epoch, desc="training", unit="epoch",
                         disable=not self.progress)
        fit_start = _clock()
        try:
            while self.epoch < self.epochs:
                record = self._run_epoch(x_train, y_train, x_val, y_val, x_test, y_test)
                self.epoch += 1
                self.history.append(record)
                new_best = x_val is not None and record["val_acc"] > self.best_val
                if new_best:
                    self.best_val = record["val_acc"]
                if self.out_dir is not None:
                    self._write_epoch_files(record, new_best)
                if self.time_budget is not None and not self.budget_fixed:
                    record = self._fix_length(fit_start)
                    epoch_bar.total = self.epochs
                epoch_bar.update(1)
                epoch_bar.set_postfix({k: f"{v:.4f}" for k, v in record.items()
                                       if k.endswith("acc")})
                if self.progress:
                    tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in record.items()))
        except KeyboardInterrupt:
            epoch_bar.close()
            if self.out_dir is not None and root:
                step(f"interrupted during epoch {self.epoch + 1}; the checkpoint after epoch "
                     f"{self.epoch} is in {self.out_dir}: to continue, run again with resume "
                     "(lowbit train --resume; the experiment scripts resume by themselves)")
            raise
        epoch_bar.close()
        if self.comm.size > 1:  # every rank returns rank 0's model, BatchNorm statistics included
            broadcast_model(self.model, self.comm)
        if self.out_dir is not None and root:
            save_model(self.model, self._path("model.npz"),
                       {"epochs": self.epoch, "history": self.history})
        return self.history

    def _run_epoch(self, x_train, y_train, x_val, y_val, x_test, y_test):
        """Train one epoch, recalibrate, evaluate (rank 0); returns the epoch's record (rank 0's)."""
        root = self.comm.is_root
        lr = float(self.schedule(self.epoch))
        t0 = _clock()
        loss, train_acc = self.train_epoch(x_train, y_train, lr)
        seconds = _clock() - t0
        record = {"epoch": self.epoch + 1, "lr": lr, "loss": loss, "train_acc": train_acc, "seconds": seconds}
        if self.scaler is not None:
            record["loss_scale"] = self.scaler.scale
            record["skipped_steps"] = self.scaler.skipped_steps
        if self.bn_recalibrate:  # on every rank: synchronised BatchNorm takes part from each
            recalibrate_batchnorm(self.model, x_train[:self.bn_recalibrate], self.batch_size)
        if x_val is not None and root:
            record["val_acc"] = self.model.evaluate(x_val, y_val, self.eval_batch_size)
        if x_test is not None and root:
            record["test_acc"] = self.model.evaluate(x_test, y_test, self.eval_batch_size)
        if self.comm.size > 1:
            self._check_replicas()
            record = self.comm.bcast_object(record)  # rank 0's, with its evaluation
        return record

    def _write_epoch_files(self, record, new_best):
        """``best.npz`` on a new best validation accuracy, the checkpoint when due, ``history.json``."""
        root = self.comm.is_root
        if new_best and root:
            save_model(self.model, self._path("best.npz"),
                       {"epoch": self.epoch, "val_acc": record["val_acc"], "test_acc": record.get("test_acc")})
        if self.epoch % self.checkpoint_every == 0 or self.epoch >= self.epochs:
            self.save_checkpoint()
        if root:
            write_json_atomic(self._path("history.json"), self.history)

    def _fix_length(self, fit_start):
        """The time budget's decision after the first epoch (rank 0's clock decides for every rank);
        returns the epoch's record, which now says how many epochs were fixed."""
        root = self.comm.is_root
        self._marks["epoch_end"] = _clock()
        if root:
            self._apply_time_budget(self._marks["epoch_end"] - fit_start)
        if self.comm.size > 1:
            fixed = self.comm.bcast_object([self.epochs, self.history[-1]])
            self._fix_epochs(fixed[0])
            self.history[-1] = fixed[1]
        if self.out_dir is not None:  # the fixed length is part of the resumable state
            self.save_checkpoint()
            if root:
                write_json_atomic(self._path("history.json"), self.history)
        return self.history[-1]
