"""Running a sweep: each point of the grid trained or quantized, converted, evaluated and recorded.

One process computes the points in turn (:class:`PointRunner`), keeping one data split and one
float model in memory at a time; with ``workers`` or ``scheduler`` the points go to Dask instead
(:mod:`lowbit.dask_sweep`).  Every finished point is appended to ``points.jsonl`` before the next
starts, and the reports cover every point of the folder when the call ends or is interrupted.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timezone
from typing import NamedTuple

import numpy as np

from ..deprecation import renamed_argument
from .models import float_model, qat_model
from .report import SweepResult, sort_key, write_reports
from .settings import METHODS, SweepSettings, default_out_dir
from .store import POINTS_FILE, append_point, check_settings, load_points, point_key


class Split(NamedTuple):
    """One seed's training, validation and test images (float, (N, 1, 28, 28)) and labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def split(data, settings, seed):
    """The images of ``data`` as the sweep uses them: ``val_size`` training images held out (by
    ``seed``), then the first ``train_limit`` training and ``test_limit`` test images."""
    from ..data import float_images, train_val_split

    x, y = float_images(data.x_train), np.asarray(data.y_train)
    x_train, y_train, x_val, y_val = train_val_split(x, y, settings["val_size"], seed)
    if settings["train_limit"]:
        x_train, y_train = x_train[:settings["train_limit"]], y_train[:settings["train_limit"]]
    x_test, y_test = float_images(data.x_test), np.asarray(data.y_test)
    if settings["test_limit"]:
        x_test, y_test = x_test[:settings["test_limit"]], y_test[:settings["test_limit"]]
    return Split(x_train, y_train, x_val, y_val, x_test, y_test)


# -- training --------------------------------------------------------------------------------------
def schedule(settings, epochs):
    """The learning-rate schedule of the sweep's recipe over ``epochs`` (:func:`lowbit.schedules.build_schedule`)."""
    from ..schedules import build_schedule

    return build_schedule(settings["schedule"], settings["lr"], epochs, lr_end=settings["lr_end"])


def _finished_run(run_dir, settings, epochs):
    """``(model, info)`` of a finished run in ``run_dir`` with these settings and epochs, else None."""
    from ..io import load_model

    done = os.path.join(run_dir, "result.json")
    best_path = os.path.join(run_dir, "best.npz")
    if os.path.exists(done) and os.path.exists(best_path):
        with open(done) as fh:
            info = json.load(fh)
        if info.get("epochs") == epochs and info.get("settings_key") == settings["key"]:
            return load_model(best_path), info
    return None


def _run_info(history, settings, epochs, validated):
    """``result.json`` of a finished run: the chosen epoch and what the run took."""
    if validated:
        best_index = int(np.argmax([record["val_acc"] for record in history]))  # first best, as Trainer
    else:  # nothing to choose by: the last epoch's model is the run's
        best_index = len(history) - 1
    info = {"epochs": epochs, "best_epoch": best_index + 1,
            "val_accuracy": float(history[best_index]["val_acc"]) if validated else None,
            "train_seconds": float(sum(record["seconds"] for record in history)),
            "settings_key": settings["key"], "history": history}
    if settings.get("track_test"):  # Brevitas' selection: the epoch of best test accuracy
        best_test = int(np.argmax([record["test_acc"] for record in history]))
        info.update(best_test_accuracy=float(history[best_test]["test_acc"]), best_test_epoch=best_test + 1)
    return info


def train(model, run_dir, data_split, settings, epochs, seed, progress, keep_checkpoints=False, device="cpu"):
    """Train ``model`` with the sweep's recipe in ``run_dir``, resumably; returns ``(best, info)``.

    ``best`` is the model of the best validation epoch, or of the last epoch when the split holds no
    validation images (``val_size=0``; ``val_accuracy`` is then None); ``info`` (also
    ``run_dir/result.json``) has ``best_epoch``, ``val_accuracy``, ``epochs``, ``train_seconds`` (sum
    of the epochs' times, across interruptions) and ``history``.  A finished run (``result.json``
    present) is only loaded.
    """
    from ..distributed import SingleComm  # under mpiexec (e.g. dask-mpi workers) too: points are independent
    from ..io import load_model
    from ..optimizers import Adam
    from ..trainer import Trainer, write_json_atomic

    finished = _finished_run(run_dir, settings, epochs)
    if finished is not None:
        return finished
    trainer = Trainer(model, settings["loss"], Adam(settings["lr"]), schedule(settings, epochs),
                      epochs=epochs, batch_size=settings["batch_size"], seed=seed, out_dir=run_dir,
                      progress=progress, device=device, comm=SingleComm())
    test = (data_split.x_test, data_split.y_test) if settings.get("track_test") else (None, None)
    validated = len(data_split.y_val) > 0
    val = (data_split.x_val, data_split.y_val) if validated else (None, None)
    history = trainer.fit(data_split.x_train, data_split.y_train, *val, *test, resume=True)
    best_path = os.path.join(run_dir, "best.npz")
    if not validated:
        shutil.copyfile(os.path.join(run_dir, "model.npz"), best_path)
    info = _run_info(history, settings, epochs, validated)
    write_json_atomic(os.path.join(run_dir, "result.json"), info)
    if not keep_checkpoints:
        for name in ("checkpoint.npz", "model.npz"):  # best.npz is the one the sweep uses
            path = os.path.join(run_dir, name)
            if os.path.exists(path):
                os.unlink(path)
    return load_model(best_path), info


def evaluate_point(model, packed_path, data_split, metadata):
    """Convert ``model``, save the packed file, and measure it on the test images."""
    from ..convert import convert

    packed = convert(model)
    packed.save(packed_path, metadata=metadata)
    accuracy = packed.evaluate(data_split.x_test, data_split.y_test)
    simulation = model.evaluate(data_split.x_test, data_split.y_test)
    return {"accuracy": accuracy, "simulation_accuracy": simulation,
            "size_bytes": os.path.getsize(packed_path),
            "float32_bytes": int(packed.source["float32_bytes"]),
            "parameters": int(packed.source["parameters"]), "packing_notes": len(packed.notes)}


# -- one point -------------------------------------------------------------------------------------
class _PointModel(NamedTuple):
    model: object
    info: dict  # the training run's result (the float model's for PTQ)
    run_dir: str
    float_file: str  # the training-format file the point comes from
    epochs: int
    source: str
    started: float  # perf_counter when this point's own work began


class PointRunner:
    """Computes the points of one sweep in this process: ``runner.run(point)`` returns its record.

    ``options`` is the :class:`SweepSettings`, ``settings`` the saved settings (with their ``key``),
    ``pretrained_model`` the loaded ``options.pretrained`` (or None).
    """

    def __init__(self, options, settings, data, out_dir, progress, pretrained_model=None):
        self.options, self.settings, self.data = options, settings, data
        self.out_dir, self.progress, self.pretrained_model = out_dir, progress, pretrained_model
        self._splits = {}
        self._floats = {}

    def split_for(self, seed):
        if seed not in self._splits:
            self._splits.clear()  # one split in memory at a time
            self._splits[seed] = split(self.data, self.settings, seed)
        return self._splits[seed]

    def ptq_of(self, model, weight_bits, activation_bits, data_split, seed):
        from ..ptq import calibration_images, post_training_quantize

        keep = not self.settings["quantize_first_last"]
        images = calibration_images(self.data.x_train, self.options.calibration, seed,
                                    val_size=self.settings["val_size"], limit=self.settings["train_limit"])
        return post_training_quantize(model, weight_bits, activation_bits, calibration_images=images,
                                      keep_first=keep, keep_last=keep, seed=seed,
                                      weight_clipping=self.options.weight_clipping,
                                      activation_clipping=self.options.activation_clipping)

    def _train(self, model, run_dir, seed, epochs):
        o = self.options
        return train(model, run_dir, self.split_for(seed), self.settings, epochs, seed, self.progress,
                     o.keep_checkpoints, o.device)

    def float_for(self, seed):
        """``(model, info, run_dir, file)`` of the float model that seed's PTQ points start from."""
        pretrained = self.options.pretrained
        if self.pretrained_model is not None:
            meta = self.pretrained_model.metadata or {}
            info = {"val_accuracy": meta.get("val_acc"), "best_epoch": meta.get("epoch"),
                    "train_seconds": None, "epochs": meta.get("epochs", meta.get("epoch"))}
            return self.pretrained_model, info, os.path.dirname(os.path.abspath(pretrained)), pretrained
        if seed not in self._floats:
            run_dir = os.path.join(self.out_dir, "runs", f"float_seed{seed}")
            model, info = self._train(float_model(self.options.arch, seed, self.options.init), run_dir, seed,
                                      self.options.float_epochs)
            self._floats.clear()
            self._floats[seed] = (model, info, run_dir, os.path.join(run_dir, "best.npz"))
        return self._floats[seed]

    def _from_float(self, method, wb, ab, seed, data_split):
        """A point made from the float model: PTQ, or the 32/32 baseline that is the float model."""
        o = self.options
        model, info, run_dir, float_file = self.float_for(seed)
        started = time.perf_counter()  # the float model's own training is its train_seconds
        epochs = o.float_epochs if o.pretrained is None else info["epochs"]
        if o.is_baseline(method, wb, ab):
            return _PointModel(model, info, run_dir, float_file, epochs, "the float model", started)
        source = "post-training quantization of the float model" + (
            f" {os.path.basename(o.pretrained)}" if o.pretrained is not None else "")
        return _PointModel(self.ptq_of(model, wb, ab, data_split, seed), info, run_dir, float_file, epochs,
                           source, started)

    def _trained(self, wb, ab, seed, data_split, started):
        """A QAT point: trained from scratch, or fine-tuned from the point's PTQ model."""
        o = self.options
        run_dir = os.path.join(self.out_dir, "runs", f"qat_w{wb}a{ab}_seed{seed}")
        if o.qat_init == "ptq":
            trained_float = self.float_for(seed)[0]
            started = time.perf_counter()  # the float model's own training is not this point's
            start = self.ptq_of(trained_float, wb, ab, data_split, seed)
            source = "quantization-aware fine-tuning of the point's PTQ model"
        else:
            start = qat_model(o.arch, wb, ab, seed, o.init)
            source = "quantization-aware training from scratch"
        model, info = self._train(start, run_dir, seed, o.epochs)
        return _PointModel(model, info, run_dir, os.path.join(run_dir, "best.npz"), o.epochs, source, started)

    def run(self, point):
        """Compute ``point`` = ``(method, weight_bits, activation_bits, seed)``; returns its record."""
        method, wb, ab, seed = point
        o, settings = self.options, self.settings
        started = time.perf_counter()
        data_split = self.split_for(seed)
        baseline = o.is_baseline(method, wb, ab)
        if method == "ptq" or baseline:
            made = self._from_float(method, wb, ab, seed, data_split)
        else:
            made = self._trained(wb, ab, seed, data_split, started)
        packed_path = os.path.join(self.out_dir, "points", f"{method}_w{wb}a{ab}_seed{seed}.npz")
        metadata = {"sweep": {"arch": o.arch, "method": method, "weight_bits": wb, "act_bits": ab,
                              "seed": seed, "settings_key": settings["key"]}}
        measured = evaluate_point(made.model, packed_path, data_split, metadata)
        trained = baseline or method == "qat"  # the point is the model of its own training run
        info = made.info
        return {
            "arch": o.arch, "method": method, "weight_bits": wb, "act_bits": ab, "seed": seed,
            **measured,
            "val_accuracy": info["val_accuracy"] if trained else None,
            "best_epoch": info["best_epoch"], "epochs": made.epochs,
            **({field: info.get(field) if trained else None for field in ("best_test_accuracy", "best_test_epoch")}
               if settings.get("track_test") else {}),
            "float_file_bytes": os.path.getsize(made.float_file),
            "train_seconds": info["train_seconds"], "wall_seconds": time.perf_counter() - made.started,
            "test_images": int(len(data_split.y_test)), "source": made.source,
            "packed_file": os.path.relpath(packed_path, self.out_dir),
            "run_dir": os.path.relpath(made.run_dir, self.out_dir),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "settings_key": settings["key"],
            **({"device": o.device} if o.device != "cpu" else {}),  # where its training ran, when not here
        }


# -- the sweep -------------------------------------------------------------------------------------
def _check_data(data, val_size, progress):
    """``data`` (MNIST when None), checked to hold the four arrays and more than ``val_size`` training
    images."""
    if data is None:
        from ..data import load_mnist

        data = load_mnist(progress=progress)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        if not hasattr(data, name):
            raise TypeError(f"data must have x_train, y_train, x_test, y_test; it has no {name}")
    if not 0 <= val_size < len(data.x_train):
        raise ValueError(f"val_size must be in [0, {len(data.x_train)}), got {val_size}")
    return data


def _load_pretrained(options):
    """The model in ``options.pretrained`` (None when not given), checked to be a float ``arch`` model."""
    if options.pretrained is None:
        return None
    from ..io import load_model

    model = load_model(options.pretrained)
    expected = float_model(options.arch, 0, options.init).name
    # An imported ONNX model has its own architecture: --arch then only picks the recipe.
    if model.name != expected and not options.pretrained.lower().endswith(".onnx"):
        raise ValueError(f"pretrained must be a float {options.arch} model (name {expected!r}); "
                         f"{options.pretrained} holds {model.name!r}")
    return model


def sweep_grid(options):
    """Every point of the grid, ``(method, weight_bits, activation_bits, seed)``, in the order they run."""
    return [(method, wb, ab, seed) for seed in options.seeds for method in options.methods
            for wb in options.weight_bits for ab in options.activation_bits]


def run_settings(options, out_dir=None, data=None, progress=True, reports=True, only_points=None):
    """Run (or resume) the sweep of :class:`SweepSettings` ``options``: :func:`run_sweep` without its
    many arguments.  ``only_points`` limits the grid to those points; ``reports=False`` only appends
    to ``points.jsonl``."""
    out_dir = os.fspath(out_dir if out_dir is not None else default_out_dir(options.arch, options.quick))
    data = _check_data(data, options.val_size, progress)
    pretrained_model = _load_pretrained(options)
    settings = options.saved(data)
    os.makedirs(out_dir, exist_ok=True)
    check_settings(out_dir, settings)
    points_path = os.path.join(out_dir, POINTS_FILE)
    done = {point_key(r) for r in load_points(points_path, settings["key"])}
    grid = sweep_grid(options)
    todo = [point for point in grid if point not in done]
    if only_points is not None:
        only = {tuple(point) for point in only_points}
        todo = [point for point in todo if point in only]
    skipped = len(grid) - len(todo)
    try:
        if options.workers is not None or options.scheduler is not None:
            from ..dask_sweep import run_points

            new = run_points(options.arch, todo, options.point_options(), settings, out_dir, data,
                             options.pretrained, lambda p: options.uses_float_model(*p[:3]),
                             workers=options.workers, scheduler=options.scheduler, progress=progress)
        else:
            runner = PointRunner(options, settings, data, out_dir, progress, pretrained_model)
            new = _run_here(runner, todo, len(grid), skipped, points_path, progress)
    except KeyboardInterrupt:
        _interrupted(out_dir, points_path, settings)
        raise
    return _finish(out_dir, points_path, settings, new, skipped, reports)


def _run_here(runner, todo, total, skipped, points_path, progress):
    """Compute ``todo`` in this process, appending each record; returns how many were computed."""
    from ..progress import tqdm

    bar = tqdm(total=total, initial=skipped, desc=f"sweep {runner.options.arch}", unit="point",
               disable=not progress)
    new = 0
    try:
        for point in todo:
            method, wb, ab, seed = point
            bar.set_postfix_str(f"{method} w{wb}a{ab} seed {seed}")
            record = runner.run(point)
            append_point(points_path, record)
            new += 1
            bar.update(1)
            if progress:
                tqdm.write(f"{method}_w{wb}a{ab}_seed{seed}: test accuracy {record['accuracy']:.2%}, "
                           f"{record['size_bytes'] / 1024:.1f} KiB, {record['wall_seconds']:.1f} s")
    finally:
        bar.close()
    return new


def _interrupted(out_dir, points_path, settings):
    records = load_points(points_path, settings["key"], repair=False)
    write_reports(out_dir, records, settings)
    from ..progress import step

    step(f"sweep interrupted: {len(records)} points done in {out_dir}; rerun the same command to "
         "continue (an unfinished training run resumes from its last epoch)")


def _finish(out_dir, points_path, settings, new, skipped, reports=True):
    # The reports cover every point in points.jsonl, also those that another sweep process on the
    # same folder (other cells of the grid) appended while this one ran.
    records = load_points(points_path, settings["key"], repair=False)
    files = write_reports(out_dir, records, settings) if reports else {}
    return SweepResult(sorted(records, key=sort_key), new, skipped, files)


def run_sweep(arch, weight_bits=None, activation_bits=None, methods=METHODS, seeds=(0,), epochs=None,
              float_epochs=None, out_dir=None, quick=False, progress=True, lr=None, lr_end=None,
              schedule="exponential", loss="cross_entropy", batch_size=100, init=None, val_size=None,
              train_limit=None, test_limit=None, calibration=None, keep_checkpoints=False, data=None,
              pretrained=None, weight_clipping="mse", activation_clipping="mse", qat_init="scratch",
              track_test=False, device="cpu", workers=None, scheduler=None, reports=True,
              only_points=None, *, act_bits=None):
    """Run (or resume) a bit-width sweep of ``arch`` and write its reports; see :mod:`lowbit.sweep`.

    Every argument but the five below is a field of :class:`SweepSettings`, documented and checked
    there (``act_bits`` is the deprecated name of ``activation_bits``); :func:`run_settings` takes
    a :class:`SweepSettings` instead.

    Parameters
    ----------
    out_dir : path
        Default :func:`default_out_dir`.
    data : MNIST-like, optional
        ``x_train``, ``y_train``, ``x_test``, ``y_test`` (uint8 images (N, 28, 28), int labels); default
        :func:`lowbit.data.load_mnist`.
    progress : bool
        A tqdm bar over the points (and the Trainer's bars).
    reports : bool
        Write the reports at the end (default); False only appends to ``points.jsonl``.
    only_points : sequence of (method, weight_bits, activation_bits, seed), optional
        Compute only these points of the grid (how a Dask worker runs one point under the sweep's
        settings, which depend on ``methods``).

    Returns
    -------
    SweepResult

    Raises
    ------
    ValueError
        An argument is out of range, or ``out_dir`` holds a sweep made with other settings.
    KeyboardInterrupt
        Passed on after the reports of the finished points are written; rerun to continue.
    """
    activation_bits = renamed_argument("run_sweep", "act_bits", act_bits, "activation_bits", activation_bits)
    options = SweepSettings(
        arch, weight_bits=weight_bits, activation_bits=activation_bits, methods=methods, seeds=seeds,
        epochs=epochs, float_epochs=float_epochs, quick=quick, lr=lr, lr_end=lr_end, schedule=schedule,
        loss=loss, batch_size=batch_size, init=init, val_size=val_size, train_limit=train_limit,
        test_limit=test_limit, calibration=calibration, keep_checkpoints=keep_checkpoints,
        pretrained=pretrained, weight_clipping=weight_clipping, activation_clipping=activation_clipping,
        qat_init=qat_init, track_test=track_test, device=device, workers=workers, scheduler=scheduler)
    return run_settings(options, out_dir=out_dir, data=data, progress=progress, reports=reports,
                        only_points=only_points)
