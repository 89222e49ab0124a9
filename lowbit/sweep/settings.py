"""What a sweep is: its grid, its recipe, the checks of both, and the settings a resumed sweep must keep.

:class:`SweepSettings` holds every argument of :func:`lowbit.sweep.run_sweep` but the data and the
output folder, with the defaults filled in (per architecture, :data:`RECIPES`; for a quick run,
:data:`QUICK`) and each value checked when it is made.  :meth:`SweepSettings.saved` is the part that
decides what a point computes: ``sweep.json``, whose hash (``key``) every point records, so that a
sweep resumed under other settings is refused.  The grid (bits, methods, seeds) and where the work
runs (device, workers) are not part of it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np

from ..device import DEVICES, check_device
from ..losses import LOSSES

ARCHS = ("tfc", "sfc", "lfc", "deep_convnet")
FC_WIDTHS = {"tfc": 64, "sfc": 256, "lfc": 1024}
METHODS = ("ptq", "qat")
WEIGHT_BITS = (1, 2, 4, 8, 16, 32)
ACTIVATION_BITS = (1, 2, 4, 8, 32)
SCHEDULE_NAMES = ("exponential", "cosine", "constant")
QAT_INITS = ("scratch", "ptq")

#: Default recipe per architecture (every point of a sweep uses the same one); why these values:
#: docs/sweep.md.
RECIPES = {
    "tfc": {"epochs": 20, "lr": 1e-2, "init": "glorot"},
    "sfc": {"epochs": 20, "lr": 1e-2, "init": "glorot"},
    "lfc": {"epochs": 20, "lr": 1e-2, "init": "glorot"},
    "deep_convnet": {"epochs": 20, "lr": 1e-3, "init": None},
}

#: The tiny version for CI (``quick=True``): these replace whatever was left at its default.
QUICK = {"epochs": 1, "weight_bits": (1, 32), "activation_bits": (1, 32), "val_size": 500,
         "train_limit": 2000, "test_limit": 300, "calibration": 200}


# -- checks ---------------------------------------------------------------------------------------
def check_arch(arch):
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {list(ARCHS)}, got {arch!r}")
    return arch


def check_bits_list(name, values, kind):
    """``values`` (an int or a sequence of ints, each a width :func:`lowbit.quantizers.quantizer_for_bits`
    knows for ``kind``) as a sorted tuple without repeats."""
    from ..quantizers import quantizer_for_bits

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


def check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_positive_float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
            or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_methods(methods):
    if isinstance(methods, str):
        methods = (methods,)
    methods = list(methods)
    if not methods:
        raise ValueError("methods must not be empty")
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"methods must each be one of {list(METHODS)}, got {method!r}")
    return tuple(m for m in METHODS if m in methods)


def check_seeds(seeds):
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        seeds = (seeds,)
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must not be empty")
    return tuple(dict.fromkeys(check_int("seeds", seed, 0) for seed in seeds))


def default_out_dir(arch, quick=False):
    """``runs/sweep_<arch>`` (``..._quick`` for quick runs), relative to the cwd: git ignores
    ``runs/``, so a sweep rewrites committed results only when ``out_dir`` names them."""
    return os.path.join("runs", f"sweep_{arch}{'_quick' if quick else ''}")


def data_fingerprint(data):
    """A short hash of a data set's images and labels (``x_train``, ``y_train``, ``x_test``, ``y_test``)."""
    digest = hashlib.sha256()
    for name in ("x_train", "y_train", "x_test", "y_test"):
        arr = np.ascontiguousarray(getattr(data, name))
        digest.update(f"{name}{arr.dtype.str}{arr.shape}".encode())
        digest.update(memoryview(arr).cast("B"))
    return digest.hexdigest()[:16]


# -- the settings ----------------------------------------------------------------------------------
@dataclass
class SweepSettings:
    """Every argument of :func:`lowbit.sweep.run_sweep` but ``data``, ``out_dir``, ``progress``,
    ``reports`` and ``only_points``; ``None`` takes the default.  Making one fills in the defaults and
    checks every value (``ValueError`` naming the argument, ``RuntimeError`` for a GPU without CuPy).

    Attributes
    ----------
    arch : str
        One of :data:`ARCHS`.
    weight_bits, activation_bits : sequence of int
        Each one of 1..8, 16 (fp16), 32 (float).  Default (1, 2, 4, 8, 16, 32) by (1, 2, 4, 8, 32);
        (1, 32) by (1, 32) when ``quick``.
    methods : sequence of "ptq", "qat"
    seeds : sequence of int
        One float model and one QAT run per point per seed; tables show mean +- std over seeds.
    epochs : int
        Epochs of every QAT run (default :data:`RECIPES`, 1 when ``quick``).
    float_epochs : int
        Epochs of the float model (default ``epochs``).
    quick : bool
        A tiny sweep for CI (:data:`QUICK`): 1 epoch, 2000 training and 500 validation images,
        300 test images, the grid {1, 32} x {1, 32}.  Only what is left at its default changes.
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
    pretrained : path, optional
        A trained float model file (:func:`lowbit.save_model` format) of ``arch`` for PTQ to start from,
        instead of training one: "quantize *my* model at every width".  Its 32/32 point is that model;
        QAT points train from scratch unless ``qat_init="ptq"``.  The file's SHA-256 enters the
        settings, so a resumed sweep must name the same file content.
    weight_clipping : "mse" or "max"
        PTQ's 2..8-bit weight range (:func:`lowbit.ptq.post_training_quantize`).  It enters the
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
    """

    arch: str
    weight_bits: tuple = None
    activation_bits: tuple = None
    methods: tuple = METHODS
    seeds: tuple = (0,)
    epochs: int = None
    float_epochs: int = None
    quick: bool = False
    lr: float = None
    lr_end: float = None
    schedule: str = "exponential"
    loss: str = "cross_entropy"
    batch_size: int = 100
    init: str = None
    val_size: int = None
    train_limit: int = None
    test_limit: int = None
    calibration: int = None
    keep_checkpoints: bool = False
    pretrained: str = None
    weight_clipping: str = "mse"
    activation_clipping: str = "mse"
    qat_init: str = "scratch"
    track_test: bool = False
    device: str = "cpu"
    workers: int = None
    scheduler: str = None

    #: The fields a Dask worker's one-point sweep takes from the client as they are (its grid, its
    #: pretrained file and where it runs are its own).
    POINT_FIELDS = ("methods", "epochs", "float_epochs", "quick", "lr", "lr_end", "schedule", "loss",
                    "batch_size", "init", "val_size", "train_limit", "test_limit", "calibration",
                    "keep_checkpoints", "weight_clipping", "activation_clipping", "qat_init", "track_test",
                    "device")

    def __post_init__(self):
        self.arch = check_arch(self.arch)
        self.quick = bool(self.quick)
        self._check_grid()
        self._check_recipe()
        self._check_ptq()
        self._check_execution()

    def _default(self, value, key, default):
        if value is not None:
            return value
        return QUICK[key] if self.quick and key in QUICK else default

    def _check_grid(self):
        self.weight_bits = check_bits_list(
            "weight_bits", self._default(self.weight_bits, "weight_bits", WEIGHT_BITS), "weight")
        self.activation_bits = check_bits_list(
            "activation_bits", self._default(self.activation_bits, "activation_bits", ACTIVATION_BITS),
            "activation")
        self.methods = check_methods(self.methods)
        self.seeds = check_seeds(self.seeds)

    def _check_recipe(self):
        recipe = RECIPES[self.arch]
        self.epochs = check_int("epochs", self._default(self.epochs, "epochs", recipe["epochs"]), 1)
        self.float_epochs = check_int("float_epochs", self.epochs if self.float_epochs is None
                                      else self.float_epochs, 1)
        self.lr = check_positive_float("lr", recipe["lr"] if self.lr is None else self.lr)
        self.lr_end = check_positive_float("lr_end", self.lr / 100 if self.lr_end is None else self.lr_end)
        check_choice("schedule", self.schedule, SCHEDULE_NAMES)
        check_choice("loss", self.loss, sorted(LOSSES))
        self.batch_size = check_int("batch_size", self.batch_size, 1)
        if self.arch in FC_WIDTHS:
            from ..initializers import INITIALIZERS

            self.init = check_choice("init", self.init or recipe["init"], sorted(INITIALIZERS))
        else:
            self.init = None
        self.val_size = check_int("val_size", self._default(self.val_size, "val_size", 10000), 0)
        self.train_limit = check_int("train_limit", self._default(self.train_limit, "train_limit", 0) or 0, 0)
        self.test_limit = check_int("test_limit", self._default(self.test_limit, "test_limit", 0) or 0, 0)
        self.calibration = check_int("calibration", self._default(self.calibration, "calibration", 1000), 1)

    def _check_ptq(self):
        from ..ptq import ACTIVATION_CLIPPINGS, WEIGHT_CLIPPINGS

        check_choice("weight_clipping", self.weight_clipping, WEIGHT_CLIPPINGS)  # before any training
        check_choice("activation_clipping", self.activation_clipping, ACTIVATION_CLIPPINGS)
        check_choice("qat_init", self.qat_init, QAT_INITS)
        if self.pretrained is not None:
            self.pretrained = os.fspath(self.pretrained)

    def _check_execution(self):
        check_device(self.device)
        if self.workers is not None and self.scheduler is not None:
            raise ValueError(f"give workers (an embedded cluster) or scheduler (an existing one), not both; "
                             f"got workers={self.workers!r} and scheduler={self.scheduler!r}")
        if self.workers is not None:
            check_int("workers", self.workers, 1)
        if self.scheduler is not None and (not isinstance(self.scheduler, str) or "://" not in self.scheduler):
            raise ValueError("scheduler must be a Dask scheduler address such as 'tcp://host:8786', "
                             f"got {self.scheduler!r}")

    def point_options(self):
        """The keyword arguments of :func:`lowbit.sweep.run_sweep` that give a one-point sweep these
        settings (:data:`POINT_FIELDS`)."""
        return {name: getattr(self, name) for name in self.POINT_FIELDS}

    def saved(self, data):
        """The settings as ``sweep.json`` holds them, for the images and labels ``data``: what must not
        change when the sweep is resumed, and their hash ``key`` that every point records."""
        settings = {
            "arch": self.arch, "epochs": self.epochs, "float_epochs": self.float_epochs, "optimizer": "adam",
            "lr": self.lr, "lr_end": self.lr_end if self.schedule != "constant" else None,
            "schedule": self.schedule, "loss": self.loss, "batch_size": self.batch_size, "init": self.init,
            "val_size": self.val_size, "train_limit": self.train_limit, "test_limit": self.test_limit,
            "calibration": self.calibration, "quick": self.quick, "quantize_first_last": self.arch in FC_WIDTHS,
            "qat": "from scratch" if self.qat_init == "scratch" else "fine-tuning each point's PTQ model",
            "data_sha256": data_fingerprint(data),
        }
        # Each optional entry only when it differs from what older sweeps did, so their keys stay valid.
        if "ptq" in self.methods or self.qat_init == "ptq":
            settings["ptq_weight_clipping"] = self.weight_clipping
            if self.activation_clipping != "max":
                settings["ptq_activation_clipping"] = self.activation_clipping
        if self.track_test:
            settings["track_test"] = True
        if self.pretrained is not None:
            with open(self.pretrained, "rb") as fh:
                settings["pretrained"] = {"file": os.path.basename(self.pretrained),
                                          "sha256": hashlib.sha256(fh.read()).hexdigest()}
        settings["key"] = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        return settings

    def uses_float_model(self, method, weight_bits, activation_bits):
        """Whether the point starts from its seed's trained float model (PTQ, the 32/32 baseline, QAT
        fine-tuned from PTQ)."""
        return method == "ptq" or self.qat_init == "ptq" or self.is_baseline(method, weight_bits, activation_bits)

    def is_baseline(self, method, weight_bits, activation_bits):
        """Whether the point *is* the float model (not trained again): the 32/32 point of PTQ, and of
        QAT from scratch when it would train the float model's recipe."""
        return weight_bits == 32 and activation_bits == 32 and (
            method == "ptq" or (self.qat_init == "scratch" and self.pretrained is None
                                and self.float_epochs == self.epochs))
