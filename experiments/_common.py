"""What the experiment scripts share: their output flags and the provenance written into results.

The scripts run as ``python3 experiments/<script>.py``, which puts this folder first on ``sys.path``,
so they ``import _common``; it is not part of the installed package.
"""
from __future__ import annotations

import os
import platform
import shlex
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUTPUTS = {
    "runs": "checkpoints of every training run (resumable)",
    "results": "the results JSON (and tables)",
    "models": "the trained or packed models",
}


def add_output_arguments(parser, *outputs):
    """``--runs``/``--results``/``--models`` (those named, each defaulting to ``experiments/<name>``)
    and ``--quiet``."""
    for name in outputs:
        if name not in OUTPUTS:
            raise ValueError(f"outputs must be among {sorted(OUTPUTS)}, got {name!r}")
        parser.add_argument(f"--{name}", default=os.path.join(HERE, name),
                            help=f"folder of {OUTPUTS[name]} (default experiments/{name})")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _positive_seconds(text):
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_budget_arguments(parser):
    """``--time-budget`` and ``--checkpoint-every``, passed to :class:`lowbit.Trainer` as
    ``time_budget`` and ``checkpoint_every``."""
    parser.add_argument("--time-budget", type=_positive_seconds, default=None, metavar="SECONDS",
                        help="train as many epochs as fit in SECONDS (at most --epochs), fixed after the "
                             "first epoch, the schedule stretched to them; the results record the number, "
                             "and --epochs N without this option repeats the run (default: --epochs)")
    parser.add_argument("--checkpoint-every", type=int, default=1, metavar="N",
                        help="write the resumable checkpoint every N epochs and after the last (default 1)")


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
