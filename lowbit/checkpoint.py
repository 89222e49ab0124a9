"""Checkpoints of a training run: what :class:`~lowbit.trainer.Trainer` saves after an epoch, and how a
run resumes from it exactly (same weights, bit for bit, as a run never interrupted).

``checkpoint.npz`` (the :mod:`lowbit.io` container, format ``lowbit.checkpoint``) holds parameters,
buffers, optimizer state, every random generator's state (data order, augmentation, dropout and
stochastic quantizers; one set per rank in data-parallel runs) and the history.  A checkpoint whose
run settings differ from the resuming run's is refused with :class:`ResumeMismatchError`, naming the
entries that differ (:func:`config_differences`).
"""
from __future__ import annotations

import json
import os
import tempfile

from .augment import Augment
from .io import ModelFileError, assign_model_arrays, model_arrays, read_archive, write_archive
from .progress import step

__all__ = ["ResumeMismatchError", "config_differences", "CheckpointMixin"]


class ResumeMismatchError(ValueError):
    """A checkpoint's run settings differ from the run that would resume from it."""


def _short(value, width=60):
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def config_differences(saved, current, path=""):
    """``["key.sub: <saved> in the checkpoint, <current> now", ...]``: only the entries that differ,
    walking into nested dicts (and lists of equal length), each value shortened to 60 characters."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in list(current) + [k for k in saved if k not in current]:
            out += config_differences(saved.get(key), current.get(key), f"{path}.{key}" if path else str(key))
        return out
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        out = []
        for index, (a, b) in enumerate(zip(saved, current)):
            out += config_differences(a, b, f"{path}[{index}]")
        return out
    if saved == current:
        return []
    return [f"{path or 'settings'}: {_short(saved)} in the checkpoint, {_short(current)} now"]


class CheckpointMixin:
    """The checkpoint half of :class:`~lowbit.trainer.Trainer`: save, load and the resume of every rank."""

    def save_checkpoint(self):
        """Write ``checkpoint.npz`` (rank 0; every rank must call it: the ranks' random states are
        gathered into it)."""
        ranks = self.comm.gather_object({"augment": self.aug_rng.bit_generator.state,
                                         "layers": self.model.rng_states()})
        if not self.comm.is_root:
            return
        arrays = {f"model/{k}": v for k, v in model_arrays(self.model).items()}
        arrays.update({f"optimizer/{k}": v for k, v in self.optimizer.state_arrays().items()})
        manifest = {
            "run": self.run_config(),
            "epoch": self.epoch,
            "epochs": self.epochs,
            "optimizer_steps": self.optimizer.steps,
            "history": self.history,
            "best_val": self.best_val,
            "budget_fixed": self.budget_fixed,
            "loss_scaler": self.scaler.state() if self.scaler else None,
            "rng": {
                "data": self.rng.bit_generator.state,
                "augment": self.aug_rng.bit_generator.state,
                "layers": self.model.rng_states(),
                **({"ranks": ranks} if self.comm.size > 1 else {}),
            },
        }
        write_archive(self._path("checkpoint.npz"), "lowbit.checkpoint", arrays, manifest)

    def load_checkpoint(self, path=None):
        """Restore the run from a checkpoint; returns its epoch.

        Raises :class:`ResumeMismatchError` (a ValueError) when the checkpoint's settings differ from
        this run's, :class:`~lowbit.io.ModelFileError` when the file is not a valid checkpoint.
        """
        path = path or self._path("checkpoint.npz")
        manifest, arrays = read_archive(path, "lowbit.checkpoint")
        try:
            return self._restore(manifest, arrays, path)
        except (ModelFileError, ResumeMismatchError):
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as exc:
            raise ModelFileError(f"{path}: not a valid checkpoint ({type(exc).__name__}: {exc})") from None

    def _restore(self, manifest, arrays, path):
        if self.time_budget is not None and manifest.get("budget_fixed") and not self.budget_fixed:
            self._fix_epochs(int(manifest["epochs"]))
        saved = json.loads(json.dumps(manifest["run"]))
        current = json.loads(json.dumps(self.run_config()))
        if saved.get("augment") == json.loads(json.dumps(Augment().config())):
            saved["augment"] = False  # saved by a Trainer that ran the identity Augment: off
        for key in current:
            differences = config_differences(saved.get(key), current[key], key)
            if differences:  # only the entries that differ, not the whole (model) config twice
                more = f"; and {len(differences) - 5} more" if len(differences) > 5 else ""
                raise ResumeMismatchError(f"cannot resume from {path}: its {key!r} setting differs from this run's ("
                                 + "; ".join(differences[:5]) + more + ")")
        assign_model_arrays(self.model, {k[len("model/"):]: v for k, v in arrays.items()
                                         if k.startswith("model/")}, source=path)
        self.optimizer.load_state_arrays(
            {k[len("optimizer/"):]: v for k, v in arrays.items() if k.startswith("optimizer/")},
            manifest["optimizer_steps"], device=self.device)
        if self.device == "gpu":
            self.model.to_device("gpu")
        self.epoch = int(manifest["epoch"])
        self.history = list(manifest["history"])
        self.best_val = float(manifest.get("best_val", -1.0))
        if self.scaler is not None:
            self.scaler.load_state(manifest["loss_scaler"])
        self.rng.bit_generator.state = manifest["rng"]["data"]
        self.aug_rng.bit_generator.state = manifest["rng"]["augment"]
        self.model.set_rng_states(manifest["rng"]["layers"])
        if self.comm.size > 1:
            ranks = manifest["rng"].get("ranks")
            if ranks is not None and len(ranks) == self.comm.size:
                self.aug_rng.bit_generator.state = ranks[self.comm.rank]["augment"]
                self.model.set_rng_states(ranks[self.comm.rank]["layers"])
            else:  # saved by another number of ranks: fresh per-rank streams for the epochs to come
                self._seed_rank_streams((self.comm.rank, self.comm.size, self.epoch))
                step(f"{path} was written by {len(ranks) if ranks else 1} rank(s), this run has "
                     f"{self.comm.size}: augmentation and stochastic layers draw new streams", self.progress)
        return self.epoch

    def _resume_ranks(self):
        """Rank 0 reads its checkpoint and sends the bytes; every rank loads them."""
        path = self._path("checkpoint.npz")
        payload = b""
        if self.comm.is_root and os.path.exists(path):
            with open(path, "rb") as fh:
                payload = fh.read()
        payload = self.comm.bcast_object(payload)
        if not payload:
            return
        if self.comm.is_root:
            self.load_checkpoint(path)
            return
        with tempfile.TemporaryDirectory(prefix="lowbit-resume-") as folder:
            copy = os.path.join(folder, "checkpoint.npz")
            with open(copy, "wb") as fh:
                fh.write(payload)
            self.load_checkpoint(copy)
