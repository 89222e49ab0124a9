"""Bit-width sweeps: what each bit of weights and activations costs, for one architecture.

:func:`run_sweep` (``lowbit sweep``) takes one architecture (:data:`ARCHS`) and a grid of weight bits
by activation bits (1..8, 16 = float16, 32 = float) and measures every point two ways:

``ptq``
    Post-training quantization of the trained float model (:func:`lowbit.ptq.post_training_quantize`,
    activation ranges calibrated on training images, 2..8-bit weights and activations both clipped to
    their range of least squared error), no retraining.
``qat``
    Quantization-aware training, by default **from scratch** (``qat_init="scratch"``): every point
    starts from the architecture's own initialisation and gets the same recipe and (by default) the
    same epochs as the float model, so the two methods differ only in when the bits are imposed.
    With ``qat_init="ptq"`` each QAT point is instead **fine-tuned from that point's PTQ model** (the
    trained float weights, clipped, and the calibrated activation ranges) for ``epochs`` epochs: a
    few epochs at a small ``lr`` recover much of what PTQ loses, at a fraction of training from
    scratch.

Each point is converted to a packed model (:func:`lowbit.convert.convert`), saved, and evaluated;
its accuracy is the packed model's test accuracy (equal to the quantized simulation's, which is
recorded too) and its *model size* is the byte size of the packed ``.npz`` file.  The point where
both widths are 32 is the float baseline: for both methods it *is* the float model (not trained
twice) when ``float_epochs == epochs``.

The recipe, the same for every point of one sweep: Adam, an exponential learning-rate decay from
``lr`` to ``lr_end`` over the epochs (``schedule`` may be ``"cosine"`` or ``"constant"``), batch 100,
cross-entropy loss, ``val_size`` (10,000) training images held out (:func:`lowbit.data.train_val_split`,
split by the seed); the reported model is the one of the best validation epoch (``best.npz``), as the
BinaryNet paper reports (``val_size=0``: every training image is trained on and the last epoch's model
is reported).  Defaults per architecture are in :data:`RECIPES` (why those values: docs/sweep.md).

Resuming: rerunning the same call continues; points already in ``points.jsonl`` are skipped, and an
unfinished training run continues from its last epoch's checkpoint (:class:`lowbit.trainer.Trainer`).
The grid (bits, methods, seeds) may grow between runs; any other setting may not (``ValueError``
naming it).  ``workers=N`` or ``scheduler="tcp://host:8786"`` run the points on Dask; the client
writes ``points.jsonl``, the model files and the reports itself (:mod:`lowbit.dask_sweep`).

The package
-----------
:mod:`~lowbit.sweep.settings`  :class:`SweepSettings` (the arguments, their defaults and checks; what
                               ``sweep.json`` keeps)
:mod:`~lowbit.sweep.models`    :func:`float_model` and :func:`qat_model`, the architectures
:mod:`~lowbit.sweep.store`     ``sweep.json`` and ``points.jsonl``: load, append, repair, refuse other settings
:mod:`~lowbit.sweep.runner`    one point trained or quantized, converted and evaluated; :func:`run_sweep`
:mod:`~lowbit.sweep.report`    the files a sweep writes (listed there), :func:`write_reports`, :func:`report_sweep`
"""
from __future__ import annotations

from .models import float_model, qat_model
from .report import (BREVITAS_MNIST, CSV_FIELDS, CSV_TRACK_TEST_FIELDS, METHOD_TITLES, SweepResult, report_sweep,
                     write_reports)
from .runner import PointRunner, run_settings, run_sweep
from .settings import (ACTIVATION_BITS, ARCHS, FC_WIDTHS, METHODS, QAT_INITS, QUICK, RECIPES, SCHEDULE_NAMES,
                       WEIGHT_BITS, SweepSettings, default_out_dir)
from .store import append_point, load_points, point_key

__all__ = [
    "ARCHS", "METHODS", "QAT_INITS", "RECIPES", "BREVITAS_MNIST", "SweepResult", "run_sweep", "report_sweep",
    "write_reports", "default_out_dir", "float_model", "qat_model", "SweepSettings", "run_settings",
    "PointRunner", "append_point", "load_points", "point_key", "SCHEDULE_NAMES", "WEIGHT_BITS",
    "ACTIVATION_BITS", "FC_WIDTHS", "QUICK", "CSV_FIELDS", "CSV_TRACK_TEST_FIELDS", "METHOD_TITLES",
]


def __getattr__(name):
    """``ACT_BITS``, the deprecated name of :data:`ACTIVATION_BITS`, with a DeprecationWarning."""
    if name == "ACT_BITS":
        import warnings

        warnings.warn("lowbit.sweep.ACT_BITS is deprecated and will be removed in the next release; use "
                      "ACTIVATION_BITS", DeprecationWarning, stacklevel=2)
        return ACTIVATION_BITS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
