"""What the experiment scripts share: their output flags and the provenance written into results.

Every script writes under the git-ignored ``runs/`` by default (``runs/results``, ``runs/models``,
``runs/checkpoints``); the committed results and models are rewritten only when a script is given
their folders: ``--results experiments/results`` (``--out``/``--output`` with a file there for the
benchmarks) and ``--models experiments/models``.

The scripts run as ``python3 experiments/<script>.py``, which puts this folder first on ``sys.path``,
so they ``import _common``; it is not part of the installed package.
"""
from __future__ import annotations

import os
import platform
import shlex
import sys

import numpy as np

from lowbit.cli import positive_seconds

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: Where the scripts write unless told otherwise: ``runs/`` at the repository root, which git ignores,
#: so that a run never overwrites what is committed.
RUNS = os.path.join(ROOT, "runs")
#: The committed results and models: rewritten only when a script is given them
#: (``--results experiments/results``, ``--models experiments/models``).
COMMITTED = {"results": os.path.join(HERE, "results"), "models": os.path.join(HERE, "models")}
OUTPUTS = {
    "runs": ("checkpoints of every training run (resumable)", os.path.join(RUNS, "checkpoints")),
    "results": ("the results JSON (and tables)", os.path.join(RUNS, "results")),
    "models": ("the trained or packed models", os.path.join(RUNS, "models")),
}


def default_output(name, *parts):
    """The default path of output ``name`` (a key of :data:`OUTPUTS`), joined with ``parts``: under the
    git-ignored ``runs/``."""
    if name not in OUTPUTS:
        raise ValueError(f"name must be one of {sorted(OUTPUTS)}, got {name!r}")
    return os.path.join(OUTPUTS[name][1], *parts)


def output_help(name, what, *parts):
    """The help text of an output option that defaults to :func:`default_output` ``(name, *parts)``."""
    where = os.path.relpath(default_output(name, *parts), ROOT)
    committed = (f"; under experiments/{name} it rewrites the committed "
                 + ("file" if parts else "ones")) if name in COMMITTED else ""
    return f"{what} (default {where}, which git ignores{committed})"


def add_output_arguments(parser, *outputs):
    """``--runs``/``--results``/``--models`` (those named, each defaulting to a folder under the
    git-ignored ``runs/``: :data:`OUTPUTS`) and ``--quiet``."""
    for name in outputs:
        if name not in OUTPUTS:
            raise ValueError(f"outputs must be among {sorted(OUTPUTS)}, got {name!r}")
        what, default = OUTPUTS[name]
        parser.add_argument(f"--{name}", default=default, help=output_help(name, f"folder of {what}"))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def model_input(models, name):
    """The model file ``name`` a script reads: the one in ``models`` (the run's ``--models``) when it is
    there, else the committed ``experiments/models/<name>``."""
    path = os.path.join(models, name)
    committed = os.path.join(COMMITTED["models"], name)
    return path if os.path.exists(path) or not os.path.exists(committed) else committed


def _positive_int(text):
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def add_budget_arguments(parser):
    """``--time-budget`` and ``--checkpoint-every``, passed to :class:`lowbit.Trainer` as
    ``time_budget`` and ``checkpoint_every``."""
    parser.add_argument("--time-budget", type=positive_seconds, default=None, metavar="SECONDS",
                        help="train as many epochs as fit in SECONDS (at most --epochs), fixed after the "
                             "first epoch, the schedule stretched to them; the results record the number, "
                             "and --epochs N without this option repeats the run (default: --epochs)")
    parser.add_argument("--checkpoint-every", type=_positive_int, default=1, metavar="N",
                        help="write the resumable checkpoint every N epochs and after the last (default 1)")


def add_eval_limit_argument(parser):
    """``--eval-limit N``: validate and test on the first N images of each set (smoke runs; the results
    record it), passed to :func:`lowbit.data.mnist_splits` as ``eval_limit``."""
    parser.add_argument("--eval-limit", type=_positive_int, default=0, metavar="N",
                        help="validate and test on the first N images of each set only (smoke runs; "
                             "default: all 10,000 of each)")


def interleaved_step_times(trainers, x, y, lr, repeats, device):
    """Seconds per step of ``Trainer.train_epoch(x, y, lr)`` for each of ``trainers`` (a dict), timed
    ``repeats`` times in turn (so that drifts of a shared machine hit all alike), synchronising the GPU
    around each pass when ``device == "gpu"``; returns ``{key: [seconds per step, ...]}``.  Warm the
    trainers up first: the first pass compiles kernels."""
    import time

    def sync():
        if device == "gpu":
            from lowbit.backend import cupy

            cupy.cuda.Device().synchronize()

    steps = -(-len(x) // next(iter(trainers.values())).batch_size)
    times = {key: [] for key in trainers}
    for _ in range(repeats):
        for key, trainer in trainers.items():
            sync()
            t0 = time.perf_counter()
            trainer.train_epoch(x, y, lr)
            sync()
            times[key].append((time.perf_counter() - t0) / steps)
    return times


def command_line(script, argv=None):
    """The command that reproduces this run, as the results quote it:
    ``python experiments/<script> <arguments, shell-quoted>``."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"experiments/{os.path.basename(script)}"] + [shlex.quote(a) for a in args])


def environment():
    """Versions and machine of the run."""
    import lowbit

    return {"python": platform.python_version(), "numpy": np.__version__, "lowbit": lowbit.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count()}


def run_main(main):
    """Run a script's ``main()``; Ctrl-C ends it with one line on stderr and exit status 130 instead of
    a traceback.  The training scripts keep a checkpoint after every epoch (``--checkpoint-every``)
    and resume from it by themselves: running the same command again continues the run."""
    try:
        status = main()
    except KeyboardInterrupt:
        print("interrupted; run the same command again to continue from the last checkpoint "
              "(the scripts resume by themselves)", file=sys.stderr)
        sys.exit(130)
    sys.exit(status if isinstance(status, int) else 0)


def thread_counts(parser, text):
    """``--threads 1,2`` of the benchmarks: the thread counts, each between 1 and Numba's maximum
    (``parser.error`` otherwise)."""
    import numba

    try:
        counts = [int(t) for t in text.split(",")]
    except ValueError:
        counts = []
    if not counts or any(t < 1 or t > numba.config.NUMBA_NUM_THREADS for t in counts):
        parser.error(f"--threads must be comma-separated counts between 1 and {numba.config.NUMBA_NUM_THREADS}, "
                     f"got {text!r}")
    return counts


def cpu_model():
    """The CPU's model name, as every benchmark records it (:func:`lowbit.kernels.tuning.cpu_model`,
    the name the kernel tuning cache is keyed by)."""
    from lowbit.kernels.tuning import cpu_model as model

    return model()


def blas_info():
    """numpy's BLAS libraries as threadpoolctl reports them (API, version, kernel, threads, file)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"note": "threadpoolctl not installed"}]
    return [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "filepath")}
            for d in threadpool_info()]
