"""The ``lowbit`` command line: one module per subcommand (or group), each with its ``add_parser``.

``lowbit train``     train a model from :data:`lowbit.zoo.MODELS` on MNIST (:mod:`lowbit.cli.train`).
``lowbit eval``      test accuracy of saved models, and of their ensemble (:mod:`lowbit.cli.evaluate`).
``lowbit quantize``  post-training quantization of a float model to a packed file (:mod:`lowbit.cli.quantize`).
``lowbit convert``   a trained quantized model to a packed model, checked (:mod:`lowbit.cli.convert`).
``lowbit summary``   per-layer table of a trained or packed model (:mod:`lowbit.cli.summary`).
``lowbit sweep``     accuracy and model size over weight x activation bits, PTQ and QAT; ``lowbit
                     sweep-report`` rewrites a sweep's reports (:mod:`lowbit.cli.sweep`).
``lowbit import``    an ONNX model -> a lowbit model file; ``lowbit export`` the other way
                     (:mod:`lowbit.cli.onnx`).
``lowbit sensitivity``, ``lowbit mixed``  per-layer widths (:func:`lowbit.mixed_search.add_mixed_commands`).

The library modules neither print nor load data; the commands here do both.  Every error is one
line on stderr: usage errors and bad input exit with status 2, an unexpected exception with 1
(``LOWBIT_DEBUG=1`` shows its traceback), an interrupt with 130.
"""
from __future__ import annotations

import os
import sys

from .common import Parser, one_line, positive_seconds
from .quantize import add_clipping_arguments
from .sweep import add_sweep_arguments, sweep_options

__all__ = ["main", "build_parser", "positive_seconds", "add_sweep_arguments", "sweep_options",
           "add_clipping_arguments"]


def build_parser():
    """The ``lowbit`` parser with every subcommand."""
    from .. import __version__
    from .mixed import add_mixed_commands  # lowbit sensitivity, lowbit mixed (issue 26)
    from . import convert, evaluate, onnx, quantize, summary, sweep, train

    parser = Parser(prog="lowbit", description="Binarized and low-precision networks.")
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train.add_parser(sub)
    evaluate.add_parser(sub)
    quantize.add_parser(sub)
    convert.add_parser(sub)
    summary.add_parser(sub)
    sweep.add_parsers(sub)
    onnx.add_parsers(sub)
    add_mixed_commands(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "schedule", None) == "exponential" and not args.lr_end:
        parser.error("--schedule exponential needs --lr-end")
    from ..data import MNISTUnavailableError
    from ..io import ModelFileError

    try:
        return args.func(args)
    except (OSError, ModelFileError, ValueError, TypeError, MNISTUnavailableError, MemoryError,
            ImportError) as exc:
        print(f"lowbit: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: one line on the command line, the traceback on request
        if argv is not None or os.environ.get("LOWBIT_DEBUG"):
            raise  # main([...]) called from Python: the caller sees the exception
        print(f"lowbit: internal error: {type(exc).__name__}: {one_line(exc)} (set LOWBIT_DEBUG=1 for the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
