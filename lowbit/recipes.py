"""Training recipes for binary networks: distillation from a teacher, two-stage training, Bop, label
smoothing (see ``docs/recipes.md``).

The pieces live where they belong -- :class:`~lowbit.losses.Distillation` and label smoothing in
:mod:`lowbit.losses`, :class:`~lowbit.optimizers.Bop` in :mod:`lowbit.optimizers`, RSign and RPReLU in
:mod:`lowbit.reactnet` -- and this module ties them to :class:`~lowbit.trainer.Trainer`:

:class:`Teacher`
    Scores of a teacher network (a lowbit :class:`~lowbit.Model`, a :class:`~lowbit.PackedModel`, or a
    file of either) for every training batch; ``Trainer(..., teacher=Teacher(...))`` with a
    ``Distillation`` loss.
:func:`binary_activation_stage`
    The first stage of two-stage training (Real-to-Binary, Martinez et al. 2020; ReActNet): the same
    network with binary activations and real-valued weights (every 1-bit kernel quantizer removed).
:func:`fit_stages`
    One training run, or the two stages in one call: stage 1 trains the binary-activation copy, stage
    2 starts from its final weights with binary weights too.  Each stage has its own checkpoints
    (stage 1 in ``<out_dir>/stage1``, stage 2 in ``out_dir`` itself, so ``best.npz`` and
    ``model.npz`` are the binary network's) and resumes.
:func:`add_recipe_arguments` and ``recipe_*``
    The command-line options ``lowbit train`` and the experiment scripts share.
"""
from __future__ import annotations

import argparse
import hashlib
import os

import numpy as np

from .backend import cupy, to_numpy
from .io import assign_model_arrays, model_arrays
from .layers import layer_from_config
from .losses import Distillation, get_loss
from .model import Model
from .quantizers import get_quantizer

__all__ = [
    "Teacher", "binary_activation_stage", "fit_stages", "stages_option", "add_recipe_arguments",
    "recipe_loss", "recipe_teacher", "recipe_optimizer", "recipe_tag", "recipe_config", "best_test_epoch",
]


class Teacher:
    """The scores a teacher network gives a batch (evaluation mode), for distillation.

    Parameters
    ----------
    source : Model, PackedModel, str or any scorer
        A lowbit model object, a packed model, the path of a file of either (``lowbit.load_any``), or
        any other (imported) network wrapped as an object with ``predict_scores(x, batch_size)`` (float
        images ``(N, C, H, W)`` on the host -> scores ``(N, classes)``) and ``input_shape``.
    device : 'cpu' or 'gpu'
        Where the student trains: a :class:`~lowbit.Model` teacher moves there (its forward runs on
        the student's batches in place); a packed teacher runs on the host and its scores are copied.
    input_shape : tuple or None
        The student's input shape (without the batch axis); a teacher that takes another is refused.

    ``scores(x)`` returns float32 ``(N, classes)`` on the array module of ``x``.
    """

    def __init__(self, source, device="cpu", input_shape=None, batch_size=100):
        from .device import check_device
        from .packed import load_any

        check_device(device)
        self.path = None
        if isinstance(source, (str, os.PathLike)):
            self.path = os.fspath(source)
            with open(self.path, "rb") as fh:
                self.sha256 = hashlib.sha256(fh.read()).hexdigest()
            source = load_any(self.path)
        elif isinstance(source, Model) or (callable(getattr(source, "predict_scores", None))
                                           and hasattr(source, "input_shape")):
            self.sha256 = None
        else:
            raise TypeError("teacher must be a lowbit Model, a PackedModel, a file path or an object with "
                            f"predict_scores(x, batch_size) and input_shape, got {type(source).__name__}")
        self.model = source
        self.packed = not isinstance(source, Model)  # scored on the host, batch by batch
        self.batch_size = int(batch_size)
        shape = tuple(source.input_shape)
        if input_shape is not None and tuple(input_shape) != shape:
            raise ValueError(f"the teacher takes inputs of shape {shape}, the student {tuple(input_shape)}")
        self.device = device
        if not self.packed and device == "gpu":
            source.to_device("gpu")

    def config(self):
        """What identifies the teacher in a checkpoint: the file (name and sha256) or the model's name."""
        from .packed import PackedModel

        kind = "model" if not self.packed else ("packed" if isinstance(self.model, PackedModel) else "external")
        out = {"kind": kind, "name": getattr(self.model, "name", type(self.model).__name__)}
        if self.path is not None:
            out.update(file=os.path.basename(self.path), sha256=self.sha256)
        return out

    def scores(self, x):
        if self.packed:
            scores = self.model.predict_scores(np.asarray(to_numpy(x), dtype=np.float32), self.batch_size)
            scores = np.asarray(scores, dtype=np.float32)
            return cupy.asarray(scores) if cupy is not None and not isinstance(x, np.ndarray) else scores
        return self.model.forward(x.astype(self.model.compute_dtype, copy=False), train=False).astype(
            np.float32, copy=False)


def _drop_binary_kernels(spec):
    """A copy of a layer spec whose 1-bit kernel quantizers are removed (None)."""
    out = dict(spec)
    config = dict(spec.get("config", {}))
    if spec.get("type") in ("QuantAffine", "QuantConv2D") and config.get("kernel_quantizer") is not None \
            and get_quantizer(config["kernel_quantizer"]).precision == 1:
        config["kernel_quantizer"] = None
    out["config"] = config
    if "children" in spec:
        out["children"] = [[name, _drop_binary_kernels(child)] for name, child in spec["children"]]
    return out


def binary_activation_stage(model):
    """Stage 1 of two-stage training: a copy of ``model`` whose binary kernels are real-valued.

    Every :class:`~lowbit.quant_layers.QuantAffine` / ``QuantConv2D`` with a 1-bit kernel quantizer
    gets ``kernel_quantizer=None`` (the float latent weights are used as they are; the clip
    constraint stays); activations, other layers and every array are as in ``model``.  The copy's
    arrays have the same names, so ``assign_model_arrays(model, model_arrays(copy))`` hands the
    trained weights back for stage 2.

    Raises ValueError when ``model`` has no binary kernel (two-stage training would be one stage twice).
    """
    if not isinstance(model, Model):
        raise TypeError(f"model must be a lowbit Model, got {type(model).__name__}")
    spec = model.spec()
    stage = _drop_binary_kernels(spec)
    if stage == spec:
        raise ValueError(f"model {model.name!r} has no binary kernel: two-stage training needs one")
    copy = layer_from_config(stage)
    assign_model_arrays(copy, model_arrays(model), source="model")
    return copy


def fit_stages(model, make_trainer, epochs, data, out_dir=None, stages=None, time_budget=None, resume=True):
    """Train ``model`` in one stage or two; returns ``(trainer, stage1)``.

    Parameters
    ----------
    model : Model
        The network to train (binary weights and activations); trained in place.
    make_trainer : callable
        ``make_trainer(model, epochs, out_dir, time_budget) -> Trainer`` with a fresh optimizer and
        schedule for those epochs.
    epochs : int
        Epochs of the single stage (ignored when ``stages`` is given).
    data : tuple
        ``(x_train, y_train, x_val, y_val, x_test, y_test)`` for ``Trainer.fit``.
    out_dir : str or None
        Stage 2 (or the single stage) writes here, stage 1 to ``<out_dir>/stage1``.
    stages : None or (int, int)
        Epochs of stage 1 (binary activations, real weights: :func:`binary_activation_stage`) and of
        stage 2 (binary weights too, starting from stage 1's final weights).
    time_budget : float or None
        Seconds for everything, shared between the stages in proportion to their epochs.

    Returns
    -------
    trainer : Trainer
        The last stage's trainer (its ``history`` is stage 2's).
    stage1 : dict or None
        ``{"epochs": ..., "history": [...]}`` of stage 1; None for one stage.
    """
    if stages is None:
        trainer = make_trainer(model, epochs, out_dir, time_budget)
        trainer.fit(*data, resume=resume)
        return trainer, None
    first_epochs, second_epochs = _check_stages(stages)
    total = first_epochs + second_epochs
    budgets = (None, None) if time_budget is None else (time_budget * first_epochs / total,
                                                        time_budget * second_epochs / total)
    first = binary_activation_stage(model)
    first_dir = None if out_dir is None else os.path.join(out_dir, "stage1")
    trainer = make_trainer(first, first_epochs, first_dir, budgets[0])
    trainer.fit(*data, resume=resume)
    stage1 = {"epochs": trainer.epochs, "history": trainer.history}
    assign_model_arrays(model, model_arrays(first), source="stage 1")
    trainer = make_trainer(model, second_epochs, out_dir, budgets[1])
    trainer.fit(*data, resume=resume)
    return trainer, stage1


def _check_stages(stages):
    if not (isinstance(stages, (tuple, list)) and len(stages) == 2 and all(
            isinstance(e, (int, np.integer)) and not isinstance(e, bool) and e >= 1 for e in stages)):
        raise ValueError(f"stages must be two positive epoch counts (stage 1, stage 2), got {stages!r}")
    return int(stages[0]), int(stages[1])


def stages_option(text):
    """argparse type of ``--stages E1,E2``: epochs of stage 1 (binary activations, real weights) and
    of stage 2 (binary weights too)."""
    parts = str(text).split(",")
    try:
        stages = tuple(int(p) for p in parts)
        return _check_stages(stages)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two positive epoch counts 'E1,E2' (stage 1, stage 2), got {text!r}") from None


def _temperature(text):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive temperature, got {text!r}")
    return value


def _fraction(low_open=False):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        ok = (0.0 <= value < 1.0) if low_open else (0.0 <= value <= 1.0)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected a number in [0, {'1)' if low_open else '1]'}, got {text!r}")
        return value
    return parse


def add_recipe_arguments(parser, optimizer=True, stages=True):
    """The recipe options: ``--teacher``, ``--temperature``, ``--distill-weight``,
    ``--label-smoothing``, ``--bop-threshold``, ``--bop-gamma``, ``--stages`` and (``optimizer=True``)
    ``--optimizer adam|bop``."""
    group = parser.add_argument_group("recipes (docs/recipes.md)")
    group.add_argument("--teacher", metavar="MODEL.npz", default=None,
                       help="distil from this trained or packed model (its scores of every training batch)")
    group.add_argument("--temperature", type=_temperature, default=4.0,
                       help="distillation temperature (default 4)")
    group.add_argument("--distill-weight", type=_fraction(), default=0.5,
                       help="weight of the teacher's term, the labels' term gets 1 - it (default 0.5)")
    group.add_argument("--label-smoothing", type=_fraction(low_open=True), default=0.0,
                       help="label smoothing of the cross-entropy loss (default 0)")
    if optimizer:
        group.add_argument("--optimizer", choices=("adam", "bop"), default="adam",
                           help="adam (default) or bop: Bop flips the binary weights, Adam trains the rest")
    group.add_argument("--bop-threshold", type=float, default=1e-8, help="Bop's flip threshold (default 1e-8)")
    group.add_argument("--bop-gamma", type=float, default=1e-4,
                       help="Bop's adaptivity rate gamma (default 1e-4)")
    if stages:
        group.add_argument("--stages", type=stages_option, default=None, metavar="E1,E2",
                           help="two-stage training: E1 epochs with binary activations and real weights, then "
                                "E2 with binary weights too, from stage 1's weights (replaces --epochs)")


def recipe_loss(args, base):
    """The loss object for ``base`` ('cross_entropy' or 'squared_hinge') with the recipe options."""
    if args.label_smoothing and base != "cross_entropy":
        raise ValueError(f"--label-smoothing applies to the cross_entropy loss, got {base!r}")
    loss = get_loss(base, label_smoothing=args.label_smoothing) if base == "cross_entropy" else get_loss(base)
    if args.teacher:
        loss = Distillation(loss, args.temperature, args.distill_weight)
    return loss


def recipe_teacher(args, device="cpu", input_shape=None):
    """``Teacher(args.teacher)`` or None."""
    return Teacher(args.teacher, device, input_shape) if args.teacher else None


def recipe_optimizer(args, lr):
    """``Adam(lr)`` or ``Bop(lr, threshold, gamma)`` by ``args.optimizer``."""
    from .optimizers import Adam, Bop

    if getattr(args, "optimizer", "adam") == "bop":
        return Bop(lr, threshold=args.bop_threshold, gamma=args.bop_gamma)
    return Adam(lr)


def recipe_tag(args):
    """A name suffix for the recipe options in use ('' when none is)."""
    tag = ""
    if args.teacher:
        stem = os.path.splitext(os.path.basename(args.teacher))[0]
        tag += f"_kd-{stem}-T{args.temperature:g}-w{args.distill_weight:g}"
    if args.label_smoothing:
        tag += f"_ls{args.label_smoothing:g}"
    if getattr(args, "optimizer", "adam") == "bop":
        tag += f"_bop{args.bop_threshold:g}-{args.bop_gamma:g}"
    if getattr(args, "stages", None):
        tag += f"_2stage{args.stages[0]}-{args.stages[1]}"
    return tag


def recipe_config(args):
    """The recipe options for a results file."""
    return {"teacher": args.teacher, "temperature": args.temperature if args.teacher else None,
            "distill_weight": args.distill_weight if args.teacher else None,
            "label_smoothing": args.label_smoothing, "optimizer": getattr(args, "optimizer", "adam"),
            "bop": ({"threshold": args.bop_threshold, "gamma": args.bop_gamma}
                    if getattr(args, "optimizer", "adam") == "bop" else None),
            "stages": list(args.stages) if getattr(args, "stages", None) else None}


def best_test_epoch(history):
    """``(epoch, test_acc)`` of the epoch with the best test accuracy (the first of ties), or
    ``(None, None)`` when the history has none: reported beside the validation-chosen model."""
    rows = [(record["test_acc"], -record["epoch"]) for record in history if record.get("test_acc") is not None]
    if not rows:
        return None, None
    acc, negative_epoch = max(rows)
    return -negative_epoch, acc
