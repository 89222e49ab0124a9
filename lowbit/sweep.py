"""Bit-width sweeps: what each bit of weights and activations costs, for one architecture.

:func:`run_sweep` takes one architecture (:data:`ARCHS`) and a grid of weight bits by activation
bits (1..8, 16 = float16, 32 = float) and measures every point two ways:

``ptq``
    Post-training quantization of the trained float model (:func:`lowbit.convert.post_training_quantize`,
    activation ranges calibrated on training images, 2..8-bit weights and activations both clipped to
    their range of least squared error), no retraining.
``qat``
    Quantization-aware training, by default **from scratch** (``qat_init="scratch"``): every point
    starts from the architecture's own initialisation and gets the same recipe and (by default) the
    same epochs as the float model, so the two methods differ only in when the bits are imposed.
    With ``qat_init="ptq"`` each QAT point is instead **fine-tuned from that point's PTQ model** (the
    trained float weights, clipped, and the calibrated activation ranges) for ``epochs`` epochs: a
    few epochs at a small ``lr`` recover much of what PTQ loses, at a fraction of training from
    scratch (the route for the chapter-8 CNN, 27 minutes per epoch-20 point from scratch here).

Each point is converted to a packed model (:func:`lowbit.convert.convert`), saved, and evaluated;
its accuracy is the packed model's test accuracy (equal to the quantized simulation's, which is
recorded too) and its *model size* is the byte size of the packed ``.npz`` file.

The architectures
-----------------
``tfc``, ``sfc``, ``lfc``
    The Brevitas BNN-PYNQ MLPs (3 x 64, 256, 1024).  QAT: :func:`lowbit.zoo.tfc` etc. built with
    ``(weight_bits, act_bits)``; every layer is quantized (first and last too, as in Brevitas) and the
    input is quantized to ``act_bits`` (1 bit: the pixel's sign).  At 16 and 32 activation bits the
    builder's hidden "activation" is only fp16 rounding or the identity, which would leave a linear
    network, so a ReLU is put in front of it (the builder's own layers are otherwise kept).
    The float model is the same MLP with plain ``Affine`` layers and ReLU
    (``Rescale - Flatten - Dropout - [Affine - BatchNorm - ReLU - Dropout] x 3 - Affine - BatchNorm``);
    PTQ quantizes all its layers, first and last included, to compare with QAT like for like.
``deep_convnet``
    The chapter-8 CNN (:func:`lowbit.zoo.deep_convnet`).  QAT: ``quantized_twin(deep_convnet(seed), wb,
    ab)`` trained from scratch; PTQ: ``post_training_quantize`` of the float model.  Both keep the
    first and last layers' weights in float (the defaults of both functions; the usual practice of
    XNOR-Net and DoReFa), and at 1-bit activations the ReLUs go (the sign of the pre-activation).

The point where both widths are 32 is the float baseline: for both methods it *is* the float model
(not trained twice) when ``float_epochs == epochs``.

The recipe (every point of one sweep alike)
-------------------------------------------
Adam, an exponential learning-rate decay from ``lr`` to ``lr_end`` over the epochs (``schedule`` may
be ``"cosine"`` or ``"constant"``), batch 100, cross-entropy loss, ``val_size`` (10,000) training
images held out (:func:`lowbit.data.train_val_split`, split by the seed); the reported model is the
one of the best validation epoch (``best.npz``), as the BinaryNet paper reports (``val_size=0``:
every training image is trained on and the last epoch's model is reported).  Defaults per
architecture are in :data:`RECIPES`: for the MLPs Adam 1e-2 -> 1e-4 with Glorot-initialised latent
weights (Brevitas initialises U(-1, 1) and trains 500-1000 epochs; in short runs the scale of the
initial weights against the step size matters most), for deep_convnet the book's Adam 1e-3,
decaying to 1e-5.  ``init``, ``lr``, ``lr_end``, ``schedule`` and ``loss`` override them.

The evidence for these defaults is one short check, not a tuning run (TFC, 3 epochs on 20k training
images, exponential decay to lr / 30, 2000 test images, seed 0): 1W1A reached 86.3% with Glorot
init and lr 1e-2, 77.9% with Glorot and 1e-3, 80.6% with U(-1, 1) and 1e-2, 44.0% with U(-1, 1) and
1e-3; the float MLP 92.4% with Glorot and 1e-2 against 87.7% (U(-1, 1), 1e-2) and 86.8% (Glorot,
1e-3).  Cross-entropy rather than Brevitas' squared hinge: in the same check cross-entropy was as
good or better in all four init/lr pairs (86.3% against 85.6% at the chosen one, 44.0% against
39.3% at the worst); ``loss="squared_hinge"`` remains an option.

Files in ``out_dir``
--------------------
``sweep.json``        the settings (what must not change when a sweep is resumed).
``points.jsonl``      one JSON line per finished point, appended, flushed and fsynced.
``results.csv``, ``results.json``  every point (bits, method, seed, accuracy, sizes, epochs, times).
``table.md``          accuracy tables (rows weight bits, columns activation bits), one per method,
                      mean +- sample standard deviation over seeds; sizes; Brevitas comparison.
``accuracy_vs_bits.png``, ``accuracy_vs_size.png``   the plots.
``pareto_size.png``, ``pareto_bops.png``   accuracy against packed size and against bit operations, the
                      front marked, with any mixed-precision points of ``mixed_points.jsonl``
                      (``lowbit mixed --sweep-dir``; :func:`lowbit.mixed_search.sweep_pareto`).
``histories/``        each point's per-epoch history (``<method>_w<W>a<A>_seed<s>.json``: loss, train,
                      validation and, with ``track_test``, test accuracy, lr and seconds per epoch),
                      copied from ``runs/`` whenever the reports are written; small, and the only
                      record of the trajectory once ``runs/`` is gone (it is not committed).
``points/``           the packed model of every point.
``runs/``             training runs (``float_seed<s>``, ``qat_w<W>a<A>_seed<s>``): ``best.npz``,
                      ``history.json``, ``result.json``; the checkpoint while a run is unfinished.

Columns of ``results.csv`` (one row per point and seed)
-------------------------------------------------------
``accuracy`` (test, packed model, 0..1), ``simulation_accuracy`` (the quantized model's own forward;
equal by construction), ``val_accuracy`` (best validation epoch of the run; empty for PTQ and when ``val_size=0``),
``best_epoch``, ``epochs`` (of the run the point comes from: the float model's for PTQ),
``size_bytes`` (packed file), ``float_file_bytes`` (the training-format ``best.npz`` it came from:
float32 latent weights and BatchNorm statistics), ``float32_bytes`` (4 bytes per parameter and
buffer), ``parameters``, ``train_seconds`` (sum of the training epochs' times, the float model's
for PTQ), ``wall_seconds`` (this point's own work in the call that finished it: for QAT what was
left of its training, for PTQ quantization and calibration; conversion and evaluation for both),
``test_images``, ``source``, ``packed_file``, ``run_dir``, ``finished_at``, ``settings_key``.

Parallel and distributed sweeps
-------------------------------
``workers=N`` runs the points on an embedded Dask cluster of N single-threaded processes, and
``scheduler="tcp://host:8786"`` on an existing Dask cluster of many machines; the client writes
``points.jsonl``, the model files and the reports itself (:mod:`lowbit.dask_sweep`).

Resuming
--------
Rerunning the same call continues: points already in ``points.jsonl`` are skipped, and an unfinished
training run continues from its last epoch's checkpoint (:class:`lowbit.trainer.Trainer`).  The grid
(bits, methods, seeds) may grow between runs; any other setting may not (``ValueError`` naming it).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import time
from datetime import datetime, timezone
from typing import NamedTuple

import numpy as np

from .io import write_bytes_atomic
from .losses import LOSSES

__all__ = [
    "ARCHS", "METHODS", "QAT_INITS", "RECIPES", "BREVITAS_MNIST", "SweepResult", "run_sweep", "report_sweep",
    "write_reports", "default_out_dir", "float_model", "qat_model",
]

ARCHS = ("tfc", "sfc", "lfc", "deep_convnet")
FC_WIDTHS = {"tfc": 64, "sfc": 256, "lfc": 1024}
METHODS = ("ptq", "qat")
METHOD_TITLES = {"ptq": "post-training quantization of the float model",
                 "qat": "quantization-aware training from scratch"}
WEIGHT_BITS = (1, 2, 4, 8, 16, 32)
ACT_BITS = (1, 2, 4, 8, 32)
SCHEDULE_NAMES = ("exponential", "cosine", "constant")
QAT_INITS = ("scratch", "ptq")

#: Default recipe per architecture (every point of a sweep uses the same one).
RECIPES = {
    "tfc": {"epochs": 20, "lr": 1e-2, "init": "glorot"},
    "sfc": {"epochs": 20, "lr": 1e-2, "init": "glorot"},
    "lfc": {"epochs": 20, "lr": 1e-2, "init": "glorot"},
    "deep_convnet": {"epochs": 20, "lr": 1e-3, "init": None},
}

#: The tiny version for CI (``quick=True``): these replace whatever was left at its default.
QUICK = {"epochs": 1, "weight_bits": (1, 32), "act_bits": (1, 32), "val_size": 500,
         "train_limit": 2000, "test_limit": 300, "calibration": 200}

#: Brevitas BNN-PYNQ MNIST test accuracy (%), by (weight bits, activation bits).
BREVITAS_MNIST = {
    "tfc": {(1, 1): 93.17, (1, 2): 94.79, (2, 2): 96.60},
    "sfc": {(1, 1): 97.81, (1, 2): 98.31, (2, 2): 98.66},
    "lfc": {(1, 1): 98.88, (1, 2): 98.99},
}
_REFERENCE_CELLS = ((1, 1), (1, 2), (2, 2))

CSV_FIELDS = ("arch", "method", "weight_bits", "act_bits", "seed", "accuracy", "simulation_accuracy",
              "val_accuracy", "best_epoch", "epochs", "size_bytes", "float_file_bytes", "float32_bytes",
              "parameters", "train_seconds", "wall_seconds", "test_images", "source", "packed_file",
              "run_dir", "finished_at", "settings_key")
#: The columns a ``track_test`` sweep adds (only then, so the reports of other sweeps stay as they were).
CSV_TRACK_TEST_FIELDS = ("best_test_accuracy", "best_test_epoch")


class SweepResult(NamedTuple):
    """What :func:`run_sweep` returns.

    ``records``: every finished point of ``out_dir`` (dicts, the rows of ``results.csv``);
    ``new_points``: how many this call computed; ``skipped_points``: how many of this call's grid were
    already done; ``files``: the report files by name (``csv``, ``json``, ``table``, ``bits_plot``,
    ``size_plot``).
    """

    records: list
    new_points: int
    skipped_points: int
    files: dict


# -- arguments -------------------------------------------------------------------------------------
def _check_arch(arch):
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {list(ARCHS)}, got {arch!r}")
    return arch


def _check_bits_list(name, values, kind):
    from .quantizers import quantizer_for_bits

    if isinstance(values, (int, np.integer)) and not isinstance(values, bool):
        values = (values,)
    try:
        values = list(values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}") from None
    if not values:
        raise ValueError(f"{name} must not be empty")
    for bits in values:
        try:
            quantizer_for_bits(bits, kind)
        except ValueError:
            raise ValueError(
                f"{name} must each be one of 1..8, 16 (fp16), 32 (float), got {bits!r}") from None
    return tuple(sorted({int(b) for b in values}))


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_positive_float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
            or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_methods(methods):
    if isinstance(methods, str):
        methods = (methods,)
    methods = list(methods)
    if not methods:
        raise ValueError("methods must not be empty")
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"methods must each be one of {list(METHODS)}, got {method!r}")
    return tuple(m for m in METHODS if m in methods)


def _check_seeds(seeds):
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        seeds = (seeds,)
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must not be empty")
    checked = []
    for seed in seeds:
        checked.append(_check_int("seeds", seed, 0))
    return tuple(dict.fromkeys(checked))


def default_out_dir(arch, quick=False):
    """``runs/sweep_<arch>`` (``..._quick`` for quick runs), relative to the cwd: git ignores
    ``runs/``, so a sweep rewrites committed results only when ``out_dir`` names them."""
    return os.path.join("runs", f"sweep_{arch}{'_quick' if quick else ''}")


# -- models ----------------------------------------------------------------------------------------
def _spawn_seeds(seed, n):
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(n)]


def float_model(arch, seed=0, init=None):
    """The float model of ``arch`` that PTQ starts from (see the module docstring)."""
    from . import zoo
    from .layers import Affine, BatchNorm, Dropout, Flatten, ReLU, Rescale
    from .model import Model

    _check_arch(arch)
    if arch == "deep_convnet":
        return zoo.deep_convnet(seed=seed)
    width = FC_WIDTHS[arch]
    init = init or RECIPES[arch]["init"]
    s = _spawn_seeds(seed, 4)

    def bn(n):  # the builder's BatchNorm settings
        return BatchNorm(n, momentum=0.9, eps=1e-4)

    layers = [Rescale(2.0, -1.0), Flatten(), Dropout(0.2)]
    n_in = 28 * 28
    for i in range(3):
        layers += [Affine(n_in, width, bias=False, init=init, seed=s[i]), bn(width), ReLU(), Dropout(0.2)]
        n_in = width
    layers += [Affine(n_in, 10, bias=False, init=init, seed=s[3]), bn(10)]
    return Model(layers, input_shape=(1, 28, 28), name=f"{arch}_float").seed(seed)


def qat_model(arch, weight_bits, act_bits, seed=0, init=None):
    """The untrained model that quantization-aware training of one point starts from."""
    from . import zoo
    from .layers import BatchNorm, ReLU
    from .quant_layers import QuantActivation
    from .quantize import quantized_twin

    _check_arch(arch)
    if arch == "deep_convnet":
        return quantized_twin(zoo.deep_convnet(seed=seed), weight_bits, act_bits, seed=seed)
    model = zoo.MODELS[arch](seed=seed, weight_bits=weight_bits, act_bits=act_bits,
                             init=init or RECIPES[arch]["init"])
    if act_bits in (16, 32):
        # The builder's hidden activation at 16/32 bits is fp16 rounding / the identity: give it a
        # nonlinearity, as the float model has.
        layers = []
        previous = None
        for layer in model.layers:
            if isinstance(layer, QuantActivation) and isinstance(previous, BatchNorm):
                layers.append(ReLU())
                if act_bits == 16:
                    layers.append(layer)
            else:
                layers.append(layer)
            previous = layer
        model.layers = layers
    return model


# -- data ------------------------------------------------------------------------------------------
class _Split(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _fingerprint(data):
    digest = hashlib.sha256()
    for name in ("x_train", "y_train", "x_test", "y_test"):
        arr = np.ascontiguousarray(getattr(data, name))
        digest.update(f"{name}{arr.dtype.str}{arr.shape}".encode())
        digest.update(memoryview(arr).cast("B"))
    return digest.hexdigest()[:16]


def _split(data, settings, seed):
    from .data import float_images, train_val_split

    x, y = float_images(data.x_train), np.asarray(data.y_train)
    x_train, y_train, x_val, y_val = train_val_split(x, y, settings["val_size"], seed)
    if settings["train_limit"]:
        x_train, y_train = x_train[:settings["train_limit"]], y_train[:settings["train_limit"]]
    x_test, y_test = float_images(data.x_test), np.asarray(data.y_test)
    if settings["test_limit"]:
        x_test, y_test = x_test[:settings["test_limit"]], y_test[:settings["test_limit"]]
    return _Split(x_train, y_train, x_val, y_val, x_test, y_test)


# -- training --------------------------------------------------------------------------------------
def _schedule(settings, epochs):
    from .optimizers import get_schedule

    name = settings["schedule"]
    if name == "exponential":
        return get_schedule("exponential", lr=settings["lr"], lr_end=settings["lr_end"], epochs=epochs)
    if name == "cosine":
        return get_schedule("cosine", lr=settings["lr"], epochs=epochs, lr_min=settings["lr_end"])
    return get_schedule("constant", lr=settings["lr"])


def _train(model, run_dir, split, settings, epochs, seed, progress, keep_checkpoints=False, device="cpu"):
    """Train ``model`` with the sweep's recipe in ``run_dir``, resumably; returns ``(best, info)``.

    ``best`` is the model of the best validation epoch, or of the last epoch when the split holds no
    validation images (``val_size=0``; ``val_accuracy`` is then None); ``info`` (also
    ``run_dir/result.json``) has ``best_epoch``, ``val_accuracy``, ``epochs``, ``train_seconds`` (sum
    of the epochs' times, across interruptions) and ``history``.  A finished run (``result.json``
    present) is only loaded.
    """
    from .distributed import SingleComm  # under mpiexec (e.g. dask-mpi workers) too: points are independent
    from .io import load_model
    from .optimizers import Adam
    from .trainer import Trainer, write_json_atomic

    done = os.path.join(run_dir, "result.json")
    best_path = os.path.join(run_dir, "best.npz")
    if os.path.exists(done) and os.path.exists(best_path):
        with open(done) as fh:
            info = json.load(fh)
        if info.get("epochs") == epochs and info.get("settings_key") == settings["key"]:
            return load_model(best_path), info
    trainer = Trainer(model, settings["loss"], Adam(settings["lr"]), _schedule(settings, epochs),
                      epochs=epochs, batch_size=settings["batch_size"], seed=seed, out_dir=run_dir,
                      progress=progress, device=device, comm=SingleComm())
    test = (split.x_test, split.y_test) if settings.get("track_test") else (None, None)
    validated = len(split.y_val) > 0
    val = (split.x_val, split.y_val) if validated else (None, None)
    history = trainer.fit(split.x_train, split.y_train, *val, *test, resume=True)
    if validated:
        best_index = int(np.argmax([record["val_acc"] for record in history]))  # first best, as Trainer
    else:  # nothing to choose by: the last epoch's model is the run's
        best_index = len(history) - 1
        shutil.copyfile(os.path.join(run_dir, "model.npz"), best_path)
    info = {"epochs": epochs, "best_epoch": best_index + 1,
            "val_accuracy": float(history[best_index]["val_acc"]) if validated else None,
            "train_seconds": float(sum(record["seconds"] for record in history)),
            "settings_key": settings["key"], "history": history}
    if settings.get("track_test"):  # Brevitas' selection: the epoch of best test accuracy
        best_test = int(np.argmax([record["test_acc"] for record in history]))
        info.update(best_test_accuracy=float(history[best_test]["test_acc"]), best_test_epoch=best_test + 1)
    write_json_atomic(done, info)
    if not keep_checkpoints:
        for name in ("checkpoint.npz", "model.npz"):  # best.npz is the one the sweep uses
            path = os.path.join(run_dir, name)
            if os.path.exists(path):
                os.unlink(path)
    return load_model(best_path), info


# -- the results file ------------------------------------------------------------------------------
def _point_key(record):
    return (record["method"], int(record["weight_bits"]), int(record["act_bits"]), int(record["seed"]))


def _load_points(path, key, repair=True):
    """Records of ``points.jsonl``, each checked to carry the settings ``key``; an unterminated last
    line (a crash mid-write, or a sweep still writing it) is dropped, and with ``repair`` also cut
    from the file."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw and not raw.endswith(b"\n"):
        raw = raw[:raw.rfind(b"\n") + 1]
        if repair:
            _write_atomic(path, raw)
    records = {}
    for number, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {number}: not JSON ({exc}); remove that line to continue") \
                from None
        if record.get("settings_key") != key:
            raise ValueError(f"{path} holds points made with other settings (key "
                             f"{record.get('settings_key')!r}, now {key!r}); use another out_dir")
        records[_point_key(record)] = record
    return list(records.values())


def _append_point(path, record):
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _write_atomic(path, payload):
    """Write bytes or str ``payload`` (UTF-8) to ``path`` atomically (:func:`lowbit.io.write_bytes_atomic`)."""
    write_bytes_atomic(path, payload.encode("utf-8") if isinstance(payload, str) else payload)


def _check_settings(out_dir, settings):
    """Write ``sweep.json`` the first time; refuse a resumption under other settings."""
    from .trainer import write_json_atomic

    path = os.path.join(out_dir, "sweep.json")
    if os.path.exists(path):
        with open(path) as fh:
            saved = json.load(fh)
        differ = [key for key in sorted(set(saved) | set(settings)) if saved.get(key) != settings.get(key)]
        if differ:
            detail = "; ".join(f"{key}: {saved.get(key)!r} there, {settings.get(key)!r} now"
                               for key in differ)
            raise ValueError(f"{out_dir} holds a sweep made with other settings ({detail}); use another "
                             "out_dir, or the same settings to resume it")
    else:
        write_json_atomic(path, settings)


# -- one point -------------------------------------------------------------------------------------
def _evaluate_point(model, packed_path, split, metadata):
    from .convert import convert

    packed = convert(model)
    packed.save(packed_path, metadata=metadata)
    accuracy = packed.evaluate(split.x_test, split.y_test)
    simulation = model.evaluate(split.x_test, split.y_test)
    return {"accuracy": accuracy, "simulation_accuracy": simulation,
            "size_bytes": os.path.getsize(packed_path),
            "float32_bytes": int(packed.source["float32_bytes"]),
            "parameters": int(packed.source["parameters"]), "packing_notes": len(packed.notes)}


def run_sweep(arch, weight_bits=None, act_bits=None, methods=METHODS, seeds=(0,), epochs=None,
              float_epochs=None, out_dir=None, quick=False, progress=True, lr=None, lr_end=None,
              schedule="exponential", loss="cross_entropy", batch_size=100, init=None, val_size=None,
              train_limit=None, test_limit=None, calibration=None, keep_checkpoints=False, data=None,
              pretrained=None, weight_clipping="mse", activation_clipping="mse", qat_init="scratch",
              track_test=False, device="cpu", workers=None, scheduler=None, reports=True,
              only_points=None):
    """Run (or resume) a bit-width sweep of ``arch`` and write its reports; see the module docstring.

    Parameters
    ----------
    arch : str
        One of :data:`ARCHS`.
    weight_bits, act_bits : sequence of int
        Each one of 1..8, 16 (fp16), 32 (float).  Default (1, 2, 4, 8, 16, 32) by (1, 2, 4, 8, 32);
        (1, 32) by (1, 32) when ``quick``.
    methods : sequence of "ptq", "qat"
    seeds : sequence of int
        One float model and one QAT run per point per seed; tables show mean +- std over seeds.
    epochs : int
        Epochs of every QAT run (default :data:`RECIPES`, 1 when ``quick``).
    float_epochs : int
        Epochs of the float model (default ``epochs``).
    out_dir : path
        Default :func:`default_out_dir`.
    quick : bool
        A tiny sweep for CI (:data:`QUICK`): 1 epoch, 2000 training and 500 validation images,
        300 test images, the grid {1, 32} x {1, 32}.  Only what is left at its default changes.
    progress : bool
        A tqdm bar over the points (and the Trainer's bars).
    lr, lr_end, schedule : float, float, str
        Adam's learning rate (default by architecture, :data:`RECIPES`), decaying to ``lr_end``
        (default ``lr / 100``) by ``schedule`` ("exponential", "cosine" or "constant").
    loss : "cross_entropy" or "squared_hinge"
    batch_size : int
    init : str
        Latent-weight initialiser of the MLPs (default "glorot"; Brevitas' is "uniform"); ignored
        for deep_convnet.
    val_size : int
        Training images held out for validation (default 10000, 500 when ``quick``).  0 trains on
        every training image and reports each run's last-epoch model (no validation accuracy);
        with ``track_test`` that is Brevitas' protocol exactly (all 60,000 images, best test epoch).
    train_limit, test_limit : int
        Use only the first so many training / test images (0 or None: all).
    calibration : int
        Training images that calibrate PTQ's activation ranges (default 1000, 200 when ``quick``).
    keep_checkpoints : bool
        Keep each finished run's ``checkpoint.npz`` and last-epoch ``model.npz`` (default: only
        ``best.npz`` stays).
    data : MNIST-like, optional
        ``x_train``, ``y_train``, ``x_test``, ``y_test`` (uint8 images (N, 28, 28), int labels); default
        :func:`lowbit.data.load_mnist`.
    pretrained : path, optional
        A trained float model file (:func:`lowbit.save_model` format) of ``arch`` for PTQ to start from,
        instead of training one: "quantize *my* model at every width".  Its 32/32 point is that model;
        QAT points train from scratch unless ``qat_init="ptq"``.  The file's SHA-256 enters the settings, so a resumed
        sweep must name the same file content.
    weight_clipping : "mse" or "max"
        PTQ's 2..8-bit weight range (:func:`lowbit.convert.post_training_quantize`).  It enters the
        settings only when ``methods`` has "ptq", so QAT-only sweeps keep their keys; sweeps made
        before it existed used "max".
    activation_clipping : "mse" or "max"
        PTQ's 2..8-bit activation range, likewise; it enters the settings only as "mse" (sweeps made
        before it existed used "max", and keep their keys).
    qat_init : "scratch" or "ptq"
        Where QAT points start: the architecture's initialisation, or the point's PTQ model (then
        ``weight_clipping`` and ``activation_clipping`` shape the start, and the settings record
        them even for a QAT-only sweep).  With "ptq" the 32/32 QAT point fine-tunes the float model
        too, rather than being it.
    track_test : bool
        Also evaluate the test set after every training epoch and record, for each trained point,
        ``best_test_accuracy`` and ``best_test_epoch``: the selection Brevitas' BNN-PYNQ figures use
        (the epoch of best *test* accuracy), reported beside the validation-chosen ``accuracy`` so the
        two protocols can be compared.  It changes no training step and no chosen model; it enters the
        settings (a new folder) only when on.
    device : 'cpu' or 'gpu'
        Where the training runs go (:class:`lowbit.trainer.Trainer`'s ``device``); not part of the
        settings, so a sweep may be continued on the other device.  Points trained on the GPU record
        ``"device": "gpu"``.  Quantization and evaluation run on the CPU.
    workers : int, optional
        Run the points in parallel on an embedded Dask LocalCluster of this many single-threaded
        worker processes (:mod:`lowbit.dask_sweep`; needs the ``dist`` extra).  Not part of the
        settings: a sweep may be continued with or without workers.
    scheduler : str, optional
        Address of an existing Dask scheduler (``"tcp://host:8786"``) to run the points on instead.
    reports : bool
        Write the reports at the end (default); False only appends to ``points.jsonl``.
    only_points : sequence of (method, weight_bits, act_bits, seed), optional
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
    arch = _check_arch(arch)
    recipe = RECIPES[arch]
    quick = bool(quick)

    def pick(value, key, default):
        if value is not None:
            return value
        return QUICK[key] if quick and key in QUICK else default

    weight_bits = _check_bits_list("weight_bits", pick(weight_bits, "weight_bits", WEIGHT_BITS), "weight")
    act_bits = _check_bits_list("act_bits", pick(act_bits, "act_bits", ACT_BITS), "activation")
    methods = _check_methods(methods)
    seeds = _check_seeds(seeds)
    epochs = _check_int("epochs", pick(epochs, "epochs", recipe["epochs"]), 1)
    float_epochs = _check_int("float_epochs", epochs if float_epochs is None else float_epochs, 1)
    lr = _check_positive_float("lr", recipe["lr"] if lr is None else lr)
    lr_end = _check_positive_float("lr_end", lr / 100 if lr_end is None else lr_end)
    if schedule not in SCHEDULE_NAMES:
        raise ValueError(f"schedule must be one of {list(SCHEDULE_NAMES)}, got {schedule!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    batch_size = _check_int("batch_size", batch_size, 1)
    if arch in FC_WIDTHS:
        init = init or recipe["init"]
        from .initializers import INITIALIZERS

        if init not in INITIALIZERS:
            raise ValueError(f"init must be one of {sorted(INITIALIZERS)}, got {init!r}")
    else:
        init = None
    val_size = _check_int("val_size", pick(val_size, "val_size", 10000), 0)
    train_limit = _check_int("train_limit", pick(train_limit, "train_limit", 0) or 0, 0)
    test_limit = _check_int("test_limit", pick(test_limit, "test_limit", 0) or 0, 0)
    calibration = _check_int("calibration", pick(calibration, "calibration", 1000), 1)
    from .convert import _check_activation_clipping, _check_weight_clipping

    _check_weight_clipping(weight_clipping)  # before any training
    _check_activation_clipping(activation_clipping)
    if qat_init not in QAT_INITS:
        raise ValueError(f"qat_init must be one of {list(QAT_INITS)}, got {qat_init!r}")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if device == "gpu":
        from .backend import cupy

        if cupy is None:
            raise RuntimeError("device='gpu' needs CuPy and a CUDA device; neither was found")
    if workers is not None and scheduler is not None:
        raise ValueError(f"give workers (an embedded cluster) or scheduler (an existing one), not both; "
                         f"got workers={workers!r} and scheduler={scheduler!r}")
    if workers is not None:
        _check_int("workers", workers, 1)
    if scheduler is not None and (not isinstance(scheduler, str) or "://" not in scheduler):
        raise ValueError(f"scheduler must be a Dask scheduler address such as 'tcp://host:8786', got {scheduler!r}")
    out_dir = os.fspath(out_dir if out_dir is not None else default_out_dir(arch, quick))

    if data is None:
        from .data import load_mnist

        data = load_mnist(progress=progress)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        if not hasattr(data, name):
            raise TypeError(f"data must have x_train, y_train, x_test, y_test; it has no {name}")
    if not 0 <= val_size < len(data.x_train):
        raise ValueError(f"val_size must be in [0, {len(data.x_train)}), got {val_size}")
    pretrained_model = None
    if pretrained is not None:
        from .io import load_model

        pretrained = os.fspath(pretrained)
        pretrained_model = load_model(pretrained)
        expected = float_model(arch, 0, init).name
        # An imported ONNX model has its own architecture: --arch then only picks the recipe.
        if pretrained_model.name != expected and not pretrained.lower().endswith(".onnx"):
            raise ValueError(f"pretrained must be a float {arch} model (name {expected!r}); "
                             f"{pretrained} holds {pretrained_model.name!r}")

    settings = {
        "arch": arch, "epochs": epochs, "float_epochs": float_epochs, "optimizer": "adam", "lr": lr,
        "lr_end": lr_end if schedule != "constant" else None, "schedule": schedule, "loss": loss,
        "batch_size": batch_size, "init": init, "val_size": val_size, "train_limit": train_limit,
        "test_limit": test_limit, "calibration": calibration, "quick": quick,
        "quantize_first_last": arch in FC_WIDTHS,
        "qat": "from scratch" if qat_init == "scratch" else "fine-tuning each point's PTQ model",
        "data_sha256": _fingerprint(data),
    }
    if "ptq" in methods or qat_init == "ptq":  # only then, so that QAT-only sweeps keep their keys
        settings["ptq_weight_clipping"] = weight_clipping
        if activation_clipping != "max":  # the keys of sweeps made before the option stay valid
            settings["ptq_activation_clipping"] = activation_clipping
    if track_test:  # only then, so that the keys of earlier sweeps stay valid
        settings["track_test"] = True
    if pretrained is not None:  # only then, so that the keys of earlier sweeps stay valid
        with open(pretrained, "rb") as fh:
            settings["pretrained"] = {"file": os.path.basename(pretrained),
                                      "sha256": hashlib.sha256(fh.read()).hexdigest()}
    settings["key"] = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    os.makedirs(out_dir, exist_ok=True)
    _check_settings(out_dir, settings)
    points_path = os.path.join(out_dir, "points.jsonl")
    done = {_point_key(r) for r in _load_points(points_path, settings["key"])}

    grid = [(method, wb, ab, seed) for seed in seeds for method in methods
            for wb in weight_bits for ab in act_bits]
    todo = [point for point in grid if point not in done]
    if only_points is not None:
        only = {tuple(point) for point in only_points}
        todo = [point for point in todo if point in only]
    skipped = len(grid) - len(todo)

    def is_baseline(method, wb, ab):
        return wb == 32 and ab == 32 and (
            method == "ptq" or (qat_init == "scratch" and pretrained is None and float_epochs == epochs))

    if workers is not None or scheduler is not None:
        from .dask_sweep import run_points

        call = dict(epochs=epochs, float_epochs=float_epochs, lr=lr, lr_end=lr_end, schedule=schedule,
                    loss=loss, batch_size=batch_size, init=init, val_size=val_size, train_limit=train_limit,
                    test_limit=test_limit, calibration=calibration, keep_checkpoints=keep_checkpoints,
                    weight_clipping=weight_clipping, activation_clipping=activation_clipping,
                    qat_init=qat_init, track_test=track_test, device=device, quick=quick, methods=methods)
        try:
            new = run_points(arch, todo, call, settings, out_dir, data, pretrained,
                             lambda p: p[0] == "ptq" or is_baseline(*p[:3]) or qat_init == "ptq",
                             workers=workers, scheduler=scheduler, progress=progress)
        except KeyboardInterrupt:
            _interrupted(out_dir, points_path, settings)
            raise
        return _finish(out_dir, points_path, settings, new, skipped, reports)

    from .progress import tqdm

    bar = tqdm(total=len(grid), initial=skipped, desc=f"sweep {arch}", unit="point", disable=not progress)
    splits = {}
    floats = {}
    new = 0

    def split_for(seed):
        if seed not in splits:
            splits.clear()  # one split in memory at a time
            splits[seed] = _split(data, settings, seed)
        return splits[seed]

    def ptq_of(model, wb, ab, split, seed):
        from .convert import post_training_quantize

        keep = not settings["quantize_first_last"]
        return post_training_quantize(model, wb, ab, calibration_images=split.x_train[:calibration],
                                      keep_first=keep, keep_last=keep, seed=seed,
                                      weight_clipping=weight_clipping, activation_clipping=activation_clipping)

    def float_for(seed):
        """``(model, info, run_dir, file)`` of the float model that seed's PTQ points start from."""
        if pretrained_model is not None:
            meta = pretrained_model.metadata or {}
            info = {"val_accuracy": meta.get("val_acc"), "best_epoch": meta.get("epoch"),
                    "train_seconds": None, "epochs": meta.get("epochs", meta.get("epoch"))}
            return pretrained_model, info, os.path.dirname(os.path.abspath(pretrained)), pretrained
        if seed not in floats:
            run_dir = os.path.join(out_dir, "runs", f"float_seed{seed}")
            model, info = _train(float_model(arch, seed, init), run_dir, split_for(seed), settings,
                                 float_epochs, seed, progress, keep_checkpoints, device)
            floats.clear()
            floats[seed] = (model, info, run_dir, os.path.join(run_dir, "best.npz"))
        return floats[seed]

    try:
        for method, wb, ab, seed in todo:
            bar.set_postfix_str(f"{method} w{wb}a{ab} seed {seed}")
            t0 = time.perf_counter()
            split = split_for(seed)
            name = f"{method}_w{wb}a{ab}_seed{seed}"
            metadata = {"sweep": {"arch": arch, "method": method, "weight_bits": wb, "act_bits": ab,
                                  "seed": seed, "settings_key": settings["key"]}}
            baseline = is_baseline(method, wb, ab)
            if method == "ptq" or baseline:
                model, info, run_dir, float_file = float_for(seed)
                t0 = time.perf_counter()  # the float model's own training is its train_seconds
                trained_epochs = float_epochs if pretrained is None else info["epochs"]
                if baseline:
                    point_model = model
                    source = "the float model"
                else:
                    point_model = ptq_of(model, wb, ab, split, seed)
                    source = "post-training quantization of the float model" + (
                        f" {os.path.basename(pretrained)}" if pretrained is not None else "")
            else:
                run_dir = os.path.join(out_dir, "runs", f"qat_w{wb}a{ab}_seed{seed}")
                if qat_init == "ptq":
                    trained_float = float_for(seed)[0]
                    t0 = time.perf_counter()  # the float model's own training is not this point's
                    start = ptq_of(trained_float, wb, ab, split, seed)
                    source = "quantization-aware fine-tuning of the point's PTQ model"
                else:
                    start = qat_model(arch, wb, ab, seed, init)
                    source = "quantization-aware training from scratch"
                point_model, info = _train(start, run_dir, split, settings, epochs, seed, progress,
                                           keep_checkpoints, device)
                trained_epochs = epochs
                float_file = os.path.join(run_dir, "best.npz")
            packed_path = os.path.join(out_dir, "points", f"{name}.npz")
            measured = _evaluate_point(point_model, packed_path, split, metadata)
            trained = baseline or method == "qat"  # the point is the model of its own training run
            record = {
                "arch": arch, "method": method, "weight_bits": wb, "act_bits": ab, "seed": seed,
                **measured,
                "val_accuracy": info["val_accuracy"] if trained else None,
                "best_epoch": info["best_epoch"], "epochs": trained_epochs,
                **({field: info.get(field) if trained else None for field in ("best_test_accuracy", "best_test_epoch")}
                   if settings.get("track_test") else {}),
                "float_file_bytes": os.path.getsize(float_file),
                "train_seconds": info["train_seconds"], "wall_seconds": time.perf_counter() - t0,
                "test_images": int(len(split.y_test)), "source": source,
                "packed_file": os.path.relpath(packed_path, out_dir),
                "run_dir": os.path.relpath(run_dir, out_dir),
                "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "settings_key": settings["key"],
                **({"device": device} if device != "cpu" else {}),  # where its training ran, when not here
            }
            _append_point(points_path, record)
            new += 1
            bar.update(1)
            if progress:
                tqdm.write(f"{name}: test accuracy {record['accuracy']:.2%}, "
                           f"{record['size_bytes'] / 1024:.1f} KiB, {record['wall_seconds']:.1f} s")
    except KeyboardInterrupt:
        bar.close()
        _interrupted(out_dir, points_path, settings)
        raise
    bar.close()
    return _finish(out_dir, points_path, settings, new, skipped, reports)


def _interrupted(out_dir, points_path, settings):
    records = _load_points(points_path, settings["key"], repair=False)
    write_reports(out_dir, records, settings)
    print(f"\nsweep interrupted: {len(records)} points done in {out_dir}; rerun the same command to "
          "continue (an unfinished training run resumes from its last epoch)")


def _finish(out_dir, points_path, settings, new, skipped, reports=True):
    # The reports cover every point in points.jsonl, also those that another sweep process on the
    # same folder (other cells of the grid) appended while this one ran.
    records = _load_points(points_path, settings["key"], repair=False)
    files = write_reports(out_dir, records, settings) if reports else {}
    return SweepResult(sorted(records, key=_sort_key), new, skipped, files)


# -- reports ---------------------------------------------------------------------------------------
def _method_title(method, settings):
    """The title of ``method``'s table and plot: QAT's says where its points started."""
    if method == "qat" and settings.get("qat") not in (None, "from scratch"):
        return "quantization-aware training " + settings["qat"]
    return METHOD_TITLES[method]


def _sort_key(record):
    return (METHODS.index(record["method"]), record["weight_bits"], record["act_bits"], record["seed"])


def _bits_label(bits):
    return {16: "16 (fp16)", 32: "32 (float)"}.get(bits, str(bits))


def _aggregate(records):
    """``{(method, wb, ab): {"mean", "std", "n", "seeds", "size_bytes"}}``; accuracies in percent,
    std the sample standard deviation (ddof 1; 0 for one seed).  Groups whose every point has a
    ``best_test_accuracy`` (``track_test``) also get ``"best_test": {"mean", "std", "n"}``."""
    groups = {}
    for record in records:
        groups.setdefault((record["method"], record["weight_bits"], record["act_bits"]), []).append(record)
    summary = {}
    for key, group in groups.items():
        accuracy = np.array([r["accuracy"] * 100 for r in group])
        summary[key] = {
            "mean": float(accuracy.mean()),
            "std": float(accuracy.std(ddof=1)) if len(accuracy) > 1 else 0.0,
            "n": len(group), "seeds": sorted(r["seed"] for r in group),
            "size_bytes": float(np.mean([r["size_bytes"] for r in group])),
        }
        best_test = [r.get("best_test_accuracy") for r in group]
        if all(value is not None for value in best_test):  # a track_test sweep's trained points
            best_test = np.array(best_test) * 100
            summary[key]["best_test"] = {"mean": float(best_test.mean()), "n": len(group),
                                         "std": float(best_test.std(ddof=1)) if len(group) > 1 else 0.0}
    return summary


def _epochs(n):
    return f"{n} epoch{'' if n == 1 else 's'}"


def _cell(entry, seeds_total):
    if entry is None:
        return "-"
    text = f"{entry['mean']:.2f}" if entry["n"] == 1 else f"{entry['mean']:.2f} ± {entry['std']:.2f}"
    if entry["n"] != seeds_total and seeds_total > 1:
        text += f" (n={entry['n']})"
    return text


def _recipe_text(settings, trained):
    """The recipe sentence of ``table.md`` (without its closing clauses)."""
    pretrained = settings.get("pretrained")
    clipping = settings.get("ptq_weight_clipping")
    clipping = (f", PTQ's 2..8-bit weights over their {'least-squared-error' if clipping == 'mse' else 'max-abs'}"
                " range" if clipping else "")
    if clipping:
        clipping += (" and activations over theirs" if settings.get("ptq_activation_clipping") == "mse"
                     else " and activations over their calibrated maximum")
    source = (f"PTQ of the trained float model {pretrained['file']} (sha256 {pretrained['sha256'][:12]}...), "
              f"activation ranges calibrated on {settings['calibration']} training images{clipping}"
              if pretrained else None)
    if pretrained and not trained:
        return "Method: " + source
    training = (f"Recipe: Adam lr {settings['lr']:g}"
                + (f" -> {settings['lr_end']:g} ({settings['schedule']})" if settings["lr_end"] else " (constant)")
                + f", batch {settings['batch_size']}, {settings['loss']} loss, "
                f"{_epochs(settings['epochs'])} per QAT run, "
                + (source if pretrained else f"{_epochs(settings['float_epochs'])} for the float model"
                   + clipping)
                + (f"; {settings['val_size']} training images held out, the model of the best validation "
                   "epoch reported" if settings["val_size"] else
                   "; trained on every training image (no validation), the last epoch's model reported"))
    return training + (f"; latent weights initialised '{settings['init']}'" if settings["init"] else "")


def _markdown(records, settings, summary):
    arch = settings["arch"]
    methods = [m for m in METHODS if any(r["method"] == m for r in records)]
    weight_bits = sorted({r["weight_bits"] for r in records})
    act_bits = sorted({r["act_bits"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    test_images = sorted({r["test_images"] for r in records})
    lines = [f"# Bit-width sweep: {arch} on MNIST", ""]
    spread = ("mean ± sample standard deviation over seeds " + ", ".join(map(str, seeds))
              if len(seeds) > 1 else f"seed {seeds[0]}" if seeds else "no seeds")
    lines += [
        f"Test accuracy (%) of each point's packed model on {', '.join(map(str, test_images))} test images, "
        f"{spread}.  Rows: weight bits; columns: activation bits.",
        "",
        _recipe_text(settings, trained="qat" in methods)
        + ("; every layer quantized, first and last included" if settings["quantize_first_last"]
           else "; first and last layers' weights kept in float")
        + (f"; training on the first {settings['train_limit']} images"
           if settings["train_limit"] and ("qat" in methods or not settings.get("pretrained")) else "")
        + (" (quick run: not a result)" if settings["quick"] else "") + ".",
        "",
    ]
    header = "| W \\ A | " + " | ".join(_bits_label(a) for a in act_bits) + " |"
    rule = "|---|" + "---|" * len(act_bits)
    for method in methods:
        lines += [f"## {method.upper()}: {_method_title(method, settings)}", "", header, rule]
        for wb in weight_bits:
            cells = [_cell(summary.get((method, wb, ab)), len(seeds)) for ab in act_bits]
            lines.append(f"| {_bits_label(wb)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Packed model size (KiB)", "",
              "| method, W \\ A | " + " | ".join(_bits_label(a) for a in act_bits) + " |", rule]
    for method in methods:
        for wb in weight_bits:
            cells = []
            for ab in act_bits:
                entry = summary.get((method, wb, ab))
                cells.append("-" if entry is None else f"{entry['size_bytes'] / 1024:.1f}")
            lines.append(f"| {method.upper()}, {_bits_label(wb)} | " + " | ".join(cells) + " |")
    lines.append("")
    reference = BREVITAS_MNIST.get(arch)
    if reference:
        tracked = [m for m in methods if any("best_test" in e for (mm, _, _), e in summary.items() if mm == m)]
        lines += [f"## Against Brevitas BNN-PYNQ ({arch.upper()}, MNIST)", "",
                  "Brevitas (bnn_pynq_train.py's defaults) trains on all 60,000 training images with "
                  "Adam 0.02 halved every 40 epochs and squared hinge loss, up to 1000 epochs, and keeps "
                  "the epoch of best *test* accuracy; the cells here are this sweep's, "
                  + ("chosen by its held-out validation images." if settings["val_size"] else
                     "each run's last-epoch model (no images held out).")
                  + (" The 'best test epoch' columns apply Brevitas' selection to the same training runs "
                     "(test accuracy of the simulated model at its best test epoch): a like-for-like "
                     "comparison with the reference, optimistic as a measure of the model." if tracked else ""),
                  "",
                  "| W/A | brevitas | " + " | ".join(f"lowbit {m.upper()}" for m in methods)
                  + "".join(f" | lowbit {m.upper()}, best test epoch" for m in tracked) + " |",
                  "|---|---|" + "---|" * (len(methods) + len(tracked))]
        for wb, ab in _REFERENCE_CELLS:
            ref = reference.get((wb, ab))
            cells = [_cell(summary.get((m, wb, ab)), len(seeds)) for m in methods]
            cells += [_cell(summary.get((m, wb, ab), {}).get("best_test"), len(seeds)) for m in tracked]
            ref_text = "-" if ref is None else f"{ref:.2f}"
            lines.append(f"| {wb}W{ab}A | {ref_text} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _csv(records):
    fields = CSV_FIELDS + (CSV_TRACK_TEST_FIELDS if any("best_test_accuracy" in r for r in records) else ())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: ("" if record.get(k) is None else record.get(k)) for k in fields})
    return buffer.getvalue()


def _save_figure(figure, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    _write_atomic(path, buffer.getvalue())


def _plot_bits(path, summary, settings):
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    methods = [m for m in METHODS if any(k[0] == m for k in summary)]
    weight_bits = sorted({k[1] for k in summary})
    act_bits = sorted({k[2] for k in summary})
    figure = Figure(figsize=(5.5 * max(1, len(methods)), 4.2))
    axes = figure.subplots(1, max(1, len(methods)), squeeze=False, sharey=True)[0]
    colours = {ab: f"C{i}" for i, ab in enumerate(act_bits)}
    reference = BREVITAS_MNIST.get(settings["arch"], {})
    for ax, method in zip(axes, methods):
        for ab in act_bits:
            points = [(wb, summary[(method, wb, ab)]) for wb in weight_bits if (method, wb, ab) in summary]
            if not points:
                continue
            ax.errorbar([p[0] for p in points], [p[1]["mean"] for p in points],
                        yerr=[p[1]["std"] for p in points], marker="o", capsize=3, color=colours[ab],
                        label=f"A = {_bits_label(ab)}")
        if method == "qat":
            for (wb, ab), value in reference.items():
                if wb not in weight_bits or ab not in act_bits:
                    continue
                ax.plot([wb], [value], marker="x", color=colours[ab], markersize=9, linestyle="none",
                        label=f"Brevitas {wb}W{ab}A")
        ax.set_xscale("log", base=2)
        ax.set_xticks(weight_bits)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([_bits_label(b).replace(" ", "\n") for b in weight_bits])
        ax.set_xlabel("weight bits")
        ax.set_title(f"{settings['arch']}: {method.upper()} ({_method_title(method, settings)})", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("test accuracy (%), mean ± std over seeds")
    _save_figure(figure, path)


def _plot_size(path, summary, settings):
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    figure = Figure(figsize=(6.5, 4.5))
    ax = figure.subplots()
    markers = {"ptq": "o", "qat": "s"}
    act_bits = sorted({k[2] for k in summary})
    colours = {ab: f"C{i}" for i, ab in enumerate(act_bits)}
    for (method, wb, ab), entry in sorted(summary.items()):
        ax.errorbar([entry["size_bytes"] / 1024], [entry["mean"]], yerr=[entry["std"]],
                    marker=markers[method], color=colours[ab], capsize=2, linestyle="none",
                    markerfacecolor="none" if method == "ptq" else colours[ab])
        ax.annotate(f"W{wb}A{ab}", (entry["size_bytes"] / 1024, entry["mean"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    handles = [Line2D([], [], marker=markers[m], color="k", linestyle="none",
                      markerfacecolor="none" if m == "ptq" else "k", label=m.upper())
               for m in METHODS if any(k[0] == m for k in summary)]
    handles += [Line2D([], [], marker="o", color=colours[ab], linestyle="none",
                       label=f"A = {_bits_label(ab)}")
                for ab in act_bits]
    ax.legend(handles=handles, fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(
        lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else ""))
    ax.set_xlabel("packed model file size (KiB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{settings['arch']}: accuracy against model size", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    _save_figure(figure, path)


def write_reports(out_dir, records, settings):
    """Write ``results.csv``, ``results.json``, ``table.md`` and the two PNGs for ``records``.

    Returns the paths by name (``csv``, ``json``, ``table``, ``bits_plot``, ``size_plot``, and
    ``histories``, the folder of per-epoch histories, when there are any: see :func:`_write_histories`).
    """
    # each record's keys sorted, as points.jsonl stores them: a resumed sweep's reports equal a fresh one's
    records = [dict(sorted(record.items())) for record in sorted(records, key=_sort_key)]
    summary = _aggregate(records)
    files = {"csv": os.path.join(out_dir, "results.csv"), "json": os.path.join(out_dir, "results.json"),
             "table": os.path.join(out_dir, "table.md"),
             "bits_plot": os.path.join(out_dir, "accuracy_vs_bits.png"),
             "size_plot": os.path.join(out_dir, "accuracy_vs_size.png")}
    _write_atomic(files["csv"], _csv(records))
    reference = {f"{wb}W{ab}A": value for (wb, ab), value in BREVITAS_MNIST.get(settings["arch"], {}).items()}
    document = {
        "arch": settings["arch"], "settings": settings, "brevitas_reference": reference,
        "summary": [{"method": m, "weight_bits": wb, "act_bits": ab, "accuracy_mean_percent": e["mean"],
                     "accuracy_std_percent": e["std"], "seeds": e["seeds"], "size_bytes": e["size_bytes"],
                     **({"best_test_accuracy_mean_percent": e["best_test"]["mean"],
                         "best_test_accuracy_std_percent": e["best_test"]["std"]} if "best_test" in e else {})}
                    for (m, wb, ab), e in sorted(summary.items(), key=lambda kv: (METHODS.index(kv[0][0]),)
                                                 + kv[0][1:])],
        "points": records,
    }
    _write_atomic(files["json"], json.dumps(document, indent=2, sort_keys=False) + "\n")
    _write_atomic(files["table"], _markdown(records, settings, summary))
    if summary:
        _plot_bits(files["bits_plot"], summary, settings)
        _plot_size(files["size_plot"], summary, settings)
        from .mixed_search import sweep_pareto  # the front by size and by BOPs, with mixed points (issue 26)

        files.update(sweep_pareto(out_dir, records, settings))
    if _write_histories(out_dir, records):
        files["histories"] = os.path.join(out_dir, "histories")
    return files


def _history_name(record):
    return f"{record['method']}_w{record['weight_bits']}a{record['act_bits']}_seed{record['seed']}.json"


def _write_histories(out_dir, records):
    """Copy each point's per-epoch history from its training run (``runs/<run>/result.json``, which
    is not committed) to ``histories/<point>.json``, which is small and meant to be committed, so the
    trajectory behind ``best_epoch`` and ``best_test_epoch`` outlives the run folder.  A history
    whose run folder is gone (a fresh checkout) is left as it is.  PTQ points share their float
    model's history.  Returns the number of history files present."""
    present = 0
    for record in records:
        target = os.path.join(out_dir, "histories", _history_name(record))
        source = os.path.join(out_dir, record.get("run_dir") or "", "result.json")
        if record.get("run_dir") and os.path.exists(source):
            with open(source) as fh:
                info = json.load(fh)
            if info.get("settings_key") == record.get("settings_key") and "history" in info:
                document = {"point": {key: record[key] for key in ("arch", "method", "weight_bits",
                                                                   "act_bits", "seed", "settings_key")},
                            "run_dir": record["run_dir"], "best_epoch": info.get("best_epoch"),
                            **({"best_test_epoch": info["best_test_epoch"]} if "best_test_epoch" in info else {}),
                            "history": info["history"]}
                payload = json.dumps(document, indent=1, sort_keys=True) + "\n"
                current = None
                if os.path.exists(target):
                    with open(target, encoding="utf-8") as fh:
                        current = fh.read()
                if current != payload:
                    _write_atomic(target, payload)
        present += os.path.exists(target)
    return present


def report_sweep(out_dir):
    """Rewrite the reports of the sweep in ``out_dir`` from its ``sweep.json`` and ``points.jsonl``,
    training and evaluating nothing (e.g. after lowbit's report format changed, or to see a sweep
    that another process is still running).  Returns :class:`SweepResult` (no new points)."""
    out_dir = os.fspath(out_dir)
    settings_path = os.path.join(out_dir, "sweep.json")
    points_path = os.path.join(out_dir, "points.jsonl")
    if not os.path.exists(settings_path):
        raise FileNotFoundError(f"{out_dir} holds no sweep (no sweep.json): give the folder a sweep wrote")
    with open(settings_path) as fh:
        settings = json.load(fh)
    # without repairing: a sweep may still be appending to points.jsonl
    records = _load_points(points_path, settings.get("key"), repair=False)
    files = write_reports(out_dir, records, settings)
    return SweepResult(sorted(records, key=_sort_key), 0, len(records), files)
