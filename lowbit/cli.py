"""The ``lowbit`` command line.

``lowbit train``     train a model from :data:`lowbit.zoo.MODELS` on MNIST (checkpoints, ``--resume``);
                     data-parallel under ``mpiexec -n N`` (:mod:`lowbit.distributed`).
``lowbit eval``      test accuracy of saved models (several files: each, and their ensemble).
``lowbit quantize``  post-training quantization of a float model (fp16, k-bit, binary) to a packed file.
``lowbit convert``   a trained quantized model to a packed model, checked against the simulation.
``lowbit summary``   per-layer table of a trained or packed model (``--profile`` times each layer).
``lowbit sweep``     accuracy and model size over a grid of weight x activation bits, PTQ and QAT
                     (:mod:`lowbit.sweep`; resumable; ``--workers N`` / ``--scheduler`` on Dask).
``lowbit import``    an ONNX model -> a lowbit model file (every command also takes the .onnx itself).
``lowbit export``    a trained, quantized or packed model -> ONNX (standard ops; :mod:`lowbit.onnx_io`).
``lowbit sensitivity``  per-layer sensitivity to each weight/activation width (:mod:`lowbit.sensitivity`).
``lowbit mixed``     per-layer widths under a size/BOPs budget, packed (:mod:`lowbit.mixed_search`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time

import numpy as np

__all__ = ["main"]


def _model_options(pairs):
    """Parse ``key=value`` pairs (values as JSON where possible) for a model builder."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"lowbit: --model-option expects key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line on stderr (``lowbit train: error: ... (see lowbit train --help)``)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_seconds(text):
    """argparse type of ``--time-budget``: a positive finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _count(text):
    """argparse type of ``--limit`` and the like: an int >= 0 (0: all)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0 (0: all), got {value}")
    return value


def _one_line(exc) -> str:
    """An error as one line: MNIST's list of sources folded, any other newlines too."""
    one_line = getattr(exc, "one_line", None)
    text = one_line() if callable(one_line) else str(exc)
    return "; ".join(part.strip(" -") for part in text.splitlines() if part.strip())


def _schedule(args, epochs):
    from .optimizers import get_schedule

    if args.schedule == "constant":
        return get_schedule("constant", lr=args.lr)
    if args.schedule == "step":
        return get_schedule("step", lr=args.lr, step_size=args.step_size, gamma=args.gamma)
    if args.schedule == "exponential":
        return get_schedule("exponential", lr=args.lr, lr_end=args.lr_end, epochs=epochs)
    return get_schedule("cosine", lr=args.lr, epochs=epochs, lr_min=args.lr_end if args.lr_end else 0.0)


def cmd_train(args):
    from .data import float_images as _float_images
    from .data import load_mnist
    from .optimizers import get_optimizer
    from .recipes import fit_stages, recipe_config, recipe_loss, recipe_optimizer, recipe_teacher
    from .trainer import Trainer, write_json_atomic
    from .distributed import get_comm
    from .zoo import build_model

    from .io import check_output_path

    check_output_path(args.out, "--out", folder=True)  # before training, not after it
    comm = get_comm(args.comm, timeout=args.comm_timeout)  # before any work: NCCL picks the rank's GPU
    augment = args.augment  # an Augment, or None for none (lowbit.augment.augment_option)
    model = build_model(args.model, seed=args.seed, **_model_options(args.model_option))
    loss = recipe_loss(args, args.loss)
    teacher = recipe_teacher(args, args.device, model.input_shape)
    mnist = load_mnist(progress=not args.quiet and comm.is_root)
    x_train, y_train = _float_images(mnist.x_train), mnist.y_train
    x_test, y_test = _float_images(mnist.x_test), mnist.y_test
    x_val = y_val = None
    if args.val:
        from .data import train_val_split

        x_train, y_train, x_val, y_val = train_val_split(x_train, y_train, args.val, args.seed)
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
    def make_trainer(net, epochs, out_dir, time_budget):
        optimizer = (recipe_optimizer(args, args.lr) if args.optimizer == "bop"
                     else get_optimizer(args.optimizer, lr=args.lr))
        return Trainer(net, loss, optimizer, _schedule(args, epochs), epochs=epochs,
                       batch_size=args.batch_size, augment=augment, seed=args.seed, out_dir=out_dir,
                       device=args.device, progress=not args.quiet, precision=args.precision,
                       time_budget=time_budget, teacher=teacher,
                       comm=comm, sync_batchnorm=args.sync_bn)

    t0 = time.perf_counter()
    trainer, stage1 = fit_stages(model, make_trainer, args.epochs, (x_train, y_train, x_val, y_val, x_test, y_test),
                                 out_dir=args.out, stages=args.stages, time_budget=args.time_budget,
                                 resume=args.resume)
    history = trainer.history
    if not comm.is_root:  # rank 0 reports and writes
        return 0
    acc = model.evaluate(x_test, y_test)
    summary = {"model": args.model, "epochs": trainer.epochs, "seed": args.seed, "test_acc": acc,
               "seconds": time.perf_counter() - t0, "recipe": recipe_config(args), "stage1": stage1,
               "history": history,
               **({"ranks": comm.size, "communicator": comm.name, **comm.stats()} if comm.size > 1 else {})}
    write_json_atomic(os.path.join(args.out, "result.json"), summary)
    print(f"test accuracy {acc:.4%}; model saved to {os.path.join(args.out, 'model.npz')}")
    return 0


def cmd_eval(args):
    from .data import float_images as _float_images
    from .data import load_mnist
    from .ensemble import Ensemble
    from .io import check_output_path
    from .packed import load_any
    from .progress import batched_scores

    if args.json:
        check_output_path(args.json, "--json")  # before the work, not after it
    loaded = [load_any(path) for path in args.models]  # every file checked before any is evaluated
    mnist = load_mnist(progress=not args.quiet)
    x_test, y_test = _float_images(mnist.x_test), mnist.y_test
    if args.limit:
        x_test, y_test = x_test[:args.limit], y_test[:args.limit]
    models, rows = [], []
    for path, model in zip(args.models, loaded):  # trained model files or packed ones
        scores = batched_scores(model, x_test, desc=os.path.basename(path), progress=not args.quiet)
        acc = float((scores.argmax(axis=1) == y_test).mean())
        print(f"{path}: test accuracy {acc:.4%} on {len(y_test)} images")
        models.append(_Scored(scores))
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        rows.append({"file": path, "sha256": digest, "bytes": os.path.getsize(path), "test_accuracy": acc,
                     "metadata": getattr(model, "metadata", None) or {}})
    ensemble_acc = None
    if len(models) > 1:
        ensemble_acc = Ensemble(models).evaluate(x_test, y_test)
        print(f"ensemble of {len(models)} (mean softmax): test accuracy {ensemble_acc:.4%}")
    if args.json:
        from .trainer import write_json_atomic

        command = ["lowbit", "eval", *args.models] + (["--limit", str(args.limit)] if args.limit else [])
        write_json_atomic(args.json, {"command": " ".join(shlex.quote(a) for a in command + ["--json", args.json]),
                                      "test_images": int(len(y_test)), "models": rows,
                                      "ensemble_test_accuracy": ensemble_acc})
        print(f"wrote {args.json}")
    return 0


class _Scored:
    """A model's scores on the test images, computed once: the ensemble reuses them."""

    def __init__(self, scores):
        self.scores = scores

    def predict_scores(self, x, batch_size=100):
        return self.scores


def cmd_quantize(args):
    from .convert import quantize_command

    quantize_command(args.model, args.weights, args.activations, args.output,
                     calibrate=args.calibrate, per_channel=not args.per_tensor,
                     percentile=args.percentile, limit=args.limit, seed=args.seed,
                     weight_clipping=args.weight_clipping, activation_clipping=args.activation_clipping,
                     progress=not args.quiet)
    return 0


def cmd_convert(args):
    from .convert import convert_command

    convert_command(args.model, args.output, limit=args.limit, allow_inexact=args.allow_inexact,
                    progress=not args.quiet)
    return 0


def cmd_summary(args):
    from .summary import summary_command

    summary_command(args.model, profile=args.profile, batch_size=args.batch_size,
                    repeats=args.repeats)
    return 0


def cmd_sweep(args):
    from .sweep import default_out_dir, run_sweep

    from .io import check_output_path

    out = args.out or default_out_dir(args.arch, args.quick)
    check_output_path(out, "--out", folder=True)  # before the sweep, not after it
    result = run_sweep(args.arch, seeds=args.seeds, out_dir=out, progress=not args.quiet,
                       **sweep_options(args))
    print(f"{result.new_points} new points, {result.skipped_points} already done; "
          f"{len(result.records)} points in {out}")
    for path in result.files.values():
        print(f"  {path}")
    return 0


def cmd_sweep_report(args):
    from .sweep import report_sweep

    result = report_sweep(args.folder)
    print(f"{len(result.records)} points in {args.folder}")
    for path in result.files.values():
        print(f"  {path}")
    return 0


def cmd_import(args):
    from .io import check_output_path, save_model
    from .onnx_io import load_onnx

    check_output_path(args.output, "-o/--output")
    model = load_onnx(args.model)
    save_model(model, args.output, metadata=model.metadata)
    print(f"{args.model}: {len(model.layers)} top-level layers, {model.num_parameters():,} parameters, "
          f"input {model.input_shape}; saved to {args.output}")
    return 0


def cmd_export(args):
    from .io import check_output_path
    from .onnx_io import export_onnx
    from .packed import load_any

    check_output_path(args.output, "-o/--output")
    model = load_any(args.model)
    export_onnx(model, args.output, opset=args.opset, batchnorm=args.batchnorm)
    print(f"{args.model} -> {args.output} (ONNX opset {args.opset}, {os.path.getsize(args.output):,} bytes)")
    return 0


def add_clipping_arguments(parser, act_max="the maximum"):
    """``--weight-clipping`` and ``--activation-clipping``, the ranges of post-training quantization
    (:func:`lowbit.convert.post_training_quantize`); ``act_max`` says what "max" means for the
    activations.  Shared by ``lowbit quantize``, ``lowbit sweep`` and ``experiments/bitwidth_sweep.py``."""
    from .quantizers import ACTIVATION_CLIPPINGS, WEIGHT_CLIPPINGS

    parser.add_argument("--weight-clipping", choices=WEIGHT_CLIPPINGS, default="mse",
                        help="PTQ's 2..8-bit weights: clip to the range of least squared error (mse, "
                             "default) or keep the full max-abs range (max)")
    parser.add_argument("--activation-clipping", choices=ACTIVATION_CLIPPINGS, default="mse",
                        help="PTQ's 2..8-bit activations: calibrated range of least squared error (mse, "
                             f"default) or {act_max} (max)")


def add_sweep_arguments(parser):
    """The options of a sweep's grid and training, shared by ``lowbit sweep`` and
    ``experiments/bitwidth_sweep.py`` (each adds its own ``--arch``, ``--seeds`` and output folder);
    :func:`sweep_options` turns them into :func:`lowbit.sweep.run_sweep`'s keyword arguments."""
    from .losses import LOSSES
    from .sweep import METHODS, QAT_INITS, SCHEDULE_NAMES

    p = parser
    p.add_argument("--weight-bits", type=int, nargs="+", metavar="BITS",
                   help="weight bits, each 1..8, 16 (fp16) or 32 (float); default 1 2 4 8 16 32")
    p.add_argument("--act-bits", type=int, nargs="+", metavar="BITS",
                   help="activation bits, each 1..8, 16 or 32; default 1 2 4 8 32")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="ptq: post-training quantization of the float model; qat: quantization-aware "
                        "training (from scratch, or see --qat-init)")
    p.add_argument("--epochs", type=int, help="epochs per QAT run (default 20; 1 with --quick)")
    p.add_argument("--float-epochs", type=int, help="epochs of the float model (default: --epochs)")
    p.add_argument("--pretrained", metavar="MODEL.npz",
                   help="a trained float model of --arch for PTQ to start from, instead of training one "
                        "(or any imported .onnx model; --arch then picks the training recipe)")
    add_clipping_arguments(p)
    p.add_argument("--qat-init", choices=QAT_INITS, default="scratch",
                   help="QAT points train from scratch (default) or fine-tune each point's PTQ model "
                        "(then give a small --lr and few --epochs)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default by arch: 1e-2 MLPs, 1e-3 CNN)")
    p.add_argument("--lr-end", type=float, help="final learning rate (default lr / 100)")
    # dest differs from "schedule": main()'s check that an exponential schedule has --lr-end is for
    # ``train``; the sweep's --lr-end has a default.
    p.add_argument("--schedule", dest="sweep_schedule", default="exponential", choices=SCHEDULE_NAMES)
    p.add_argument("--loss", default="cross_entropy", choices=list(LOSSES))
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--init", help="latent-weight init of the MLPs (default glorot; Brevitas: uniform)")
    p.add_argument("--val", type=int, help="training images held out for validation (default 10000; 0: train on all of them and "
                   "report each run's last epoch)")
    p.add_argument("--limit", type=int, help="train on the first N images only")
    p.add_argument("--test-limit", type=int, help="evaluate on the first N test images only")
    p.add_argument("--calibrate", type=int, help="training images calibrating PTQ (default 1000)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep finished runs' checkpoint.npz and model.npz (default: best.npz only)")
    p.add_argument("--track-test", action="store_true",
                   help="also test after every epoch and report each trained point's best test epoch "
                        "(Brevitas' selection) beside the validation-chosen accuracy")
    p.add_argument("--quick", action="store_true",
                   help="tiny sweep for CI: 1 epoch, 2000 images, W {1, 32} x A {1, 32}")
    p.add_argument("--device", dest="sweep_device", default="cpu", choices=["cpu", "gpu"],
                   help="train on the CPU (numpy, default) or a CUDA GPU (CuPy); the recipe, and so the "
                        "sweep's settings key, is the same on both, and a run resumes on either")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, nargs="?", const=os.cpu_count() or 1, metavar="N",
                       help="run the points in parallel on an embedded Dask cluster of N single-threaded "
                            "worker processes (no N: one per core)")
    where.add_argument("--scheduler", metavar="tcp://HOST:8786",
                       help="run the points on an existing Dask cluster (workers need lowbit installed, "
                            "not the output folder)")


def sweep_options(args):
    """:func:`lowbit.sweep.run_sweep`'s keyword arguments from the options of :func:`add_sweep_arguments`."""
    return dict(weight_bits=args.weight_bits, act_bits=args.act_bits, methods=args.methods,
                epochs=args.epochs, float_epochs=args.float_epochs, quick=args.quick, lr=args.lr,
                lr_end=args.lr_end, schedule=args.sweep_schedule, loss=args.loss,
                batch_size=args.batch_size, init=args.init, val_size=args.val, train_limit=args.limit,
                test_limit=args.test_limit, calibration=args.calibrate,
                keep_checkpoints=args.keep_checkpoints, pretrained=args.pretrained,
                weight_clipping=args.weight_clipping, activation_clipping=args.activation_clipping,
                qat_init=args.qat_init, track_test=args.track_test, device=args.sweep_device,
                workers=args.workers, scheduler=args.scheduler)


def build_parser():
    from .augment import augment_option
    from .losses import LOSSES
    from .optimizers import OPTIMIZERS, SCHEDULES
    from .recipes import add_recipe_arguments
    from .zoo import MODELS

    from . import __version__

    parser = _Parser(prog="lowbit", description="Binarized and low-precision networks.")
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model on MNIST")
    p.add_argument("--model", default="deep_convnet", choices=sorted(MODELS))
    p.add_argument("--model-option", action="append", metavar="KEY=VALUE",
                   help="builder option, e.g. hidden=[1024,1024] (repeatable)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--loss", default="cross_entropy", choices=list(LOSSES))
    p.add_argument("--optimizer", default="adam", choices=sorted(OPTIMIZERS))
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--schedule", default="constant", choices=sorted(SCHEDULES))
    p.add_argument("--lr-end", type=float, default=0.0, help="final lr (exponential, cosine)")
    p.add_argument("--step-size", type=int, default=10, help="epochs per step (step schedule)")
    p.add_argument("--gamma", type=float, default=0.1, help="decay factor (step schedule)")
    p.add_argument("--augment", type=augment_option, default=None,
                   help='e.g. "shift=2,rotate=10,scale=0.1" (off by default; "none" also means off)')
    p.add_argument("--val", type=_count, default=0, help="hold out this many training images for validation")
    p.add_argument("--limit", type=_count, default=0, help="train on the first N images only (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "mixed16"],
                   help="mixed16: float16 passes, float32 master weights, dynamic loss scaling")
    p.add_argument("--out", default="runs/train", help="folder for checkpoints, history and model.npz")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    p.add_argument("--time-budget", type=positive_seconds, default=None, metavar="SECONDS",
                   help="train as many epochs as fit in SECONDS (at most --epochs; lowbit.Trainer time_budget)")
    add_recipe_arguments(p, optimizer=False)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--comm", default="auto", choices=["auto", "single", "mpi", "nccl"],
                   help="data-parallel communicator: auto (MPI when started by mpiexec with several ranks), "
                        "single, mpi (numpy), nccl (CuPy on GPUs); --batch-size is then the global batch")
    p.add_argument("--comm-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long a rank waits for the others before ending the run with an error "
                        "(longer than rank 0's evaluation and checkpoint)")
    p.add_argument("--sync-bn", action="store_true",
                   help="with several ranks: BatchNorm statistics of the global batch, not each rank's")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="test accuracy of saved or packed models (and of their ensemble)")
    p.add_argument("models", nargs="+", metavar="MODEL.npz")
    p.add_argument("--limit", type=_count, default=0, help="evaluate the first N test images only")
    p.add_argument("--json", metavar="PATH", help="also write the accuracies (and each file's sha256) to PATH")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", help="post-training quantization of a float model to a packed file")
    p.add_argument("model", metavar="MODEL.npz")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npz")
    p.add_argument("--weights", type=int, required=True, help="weight bits: 1..8, 16 or 32")
    p.add_argument("--activations", type=int, required=True, help="activation bits: 1..8, 16 or 32")
    p.add_argument("--calibrate", type=_count, default=1000,
                   help="training images used to calibrate activation ranges")
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per layer, not per channel")
    p.add_argument("--percentile", type=float, default=100.0,
                   help="with --activation-clipping max: this percentile of |activation| (100 = max)")
    add_clipping_arguments(p, "the --percentile of |activation|")
    p.add_argument("--limit", type=_count, default=0, help="evaluate on the first N test images only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no step lines or progress bars")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("convert", help="trained quantized model -> packed model (checked exact)")
    p.add_argument("model", metavar="MODEL.npz")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npz")
    p.add_argument("--limit", type=_count, default=0, help="check on the first N test images only")
    p.add_argument("--allow-inexact", action="store_true",
                   help="fuse scaled binary layers whose float rounding may differ in rare cases")
    p.add_argument("--quiet", action="store_true", help="no step lines or progress bars")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("summary", help="per-layer table of a trained or packed model")
    p.add_argument("model", metavar="MODEL.npz")
    p.add_argument("--profile", action="store_true", help="also measure the time of every layer")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.set_defaults(func=cmd_summary)

    from .sweep import ARCHS

    p = sub.add_parser("sweep", help="accuracy and size over weight x activation bits, PTQ and QAT")
    p.add_argument("--arch", required=True, choices=ARCHS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    add_sweep_arguments(p)
    p.add_argument("--out", help="output folder (default runs/sweep_<arch>[_quick]; committed results live in experiments/results/sweep_*)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("sweep-report", help="rewrite a sweep folder's tables and plots from its points "
                                            "(trains nothing)")
    p.add_argument("folder", metavar="SWEEP_DIR", help="a folder written by lowbit sweep")
    p.set_defaults(func=cmd_sweep_report)

    p = sub.add_parser("import", help="an ONNX model (NCHW, float32) -> a lowbit model file")
    p.add_argument("model", metavar="MODEL.onnx")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npz")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="a trained, quantized or packed model -> ONNX (standard ops)")
    p.add_argument("model", metavar="MODEL.npz")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    p.add_argument("--opset", type=int, default=13, help="ONNX opset, 13..21 (default 13)")
    p.add_argument("--batchnorm", choices=["folded", "op"], default="folded",
                   help="BatchNorm as Sub/Mul/Mul/Add, bit for bit lowbit's arithmetic (folded, default), "
                        "or as one BatchNormalization node (op)")
    p.set_defaults(func=cmd_export)

    from .mixed_cli import add_mixed_commands  # lowbit sensitivity, lowbit mixed (issue 26)

    add_mixed_commands(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "schedule", None) == "exponential" and not args.lr_end:
        parser.error("--schedule exponential needs --lr-end")
    from .data import MNISTUnavailableError
    from .io import ModelFileError

    try:
        return args.func(args)
    except (OSError, ModelFileError, ValueError, TypeError, MNISTUnavailableError, MemoryError,
            ImportError) as exc:
        print(f"lowbit: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: one line on the command line, the traceback on request
        if argv is not None or os.environ.get("LOWBIT_DEBUG"):
            raise  # main([...]) called from Python: the caller sees the exception
        print(f"lowbit: internal error: {type(exc).__name__}: {_one_line(exc)} (set LOWBIT_DEBUG=1 for the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
