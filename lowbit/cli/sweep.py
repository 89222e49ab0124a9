"""``lowbit sweep`` (accuracy and model size over a grid of weight x activation bits, PTQ and QAT;
:mod:`lowbit.sweep`, resumable, ``--workers N`` / ``--scheduler`` on Dask) and ``lowbit sweep-report``
(a sweep folder's tables and plots rewritten from its points)."""
from __future__ import annotations

import os

from ..device import DEVICES
from .common import DeprecatedAliases
from .quantize import CALIBRATION_RULE, add_clipping_arguments


def cmd_sweep(args):
    from ..io import check_output_path
    from ..sweep import default_out_dir, run_sweep

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
    from ..sweep import report_sweep

    result = report_sweep(args.folder)
    print(f"{len(result.records)} points in {args.folder}")
    for path in result.files.values():
        print(f"  {path}")
    return 0


def add_sweep_arguments(parser):
    """The options of a sweep's grid and training of ``lowbit sweep`` (which adds ``--arch``, ``--seeds``
    and the output folder);
    :func:`sweep_options` turns them into :func:`lowbit.sweep.run_sweep`'s keyword arguments."""
    from ..losses import LOSSES
    from ..sweep import METHODS, QAT_INITS, SCHEDULE_NAMES

    p = parser
    p.add_argument("--weight-bits", type=int, nargs="+", metavar="BITS",
                   help="weight bits, each 1..8, 16 (fp16) or 32 (float); default 1 2 4 8 16 32")
    p.add_argument("--activation-bits", "--act-bits", dest="activation_bits", type=int, nargs="+", metavar="BITS",
                   action=DeprecatedAliases, deprecated=("--act-bits",),
                   help="activation bits, each 1..8, 16 or 32; default 1 2 4 8 32 (--act-bits: the old name, "
                        "deprecated)")
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
    p.add_argument("--calibrate", type=int, metavar="N",
                   help=f"training images calibrating PTQ (default 1000, 200 with --quick): {CALIBRATION_RULE} "
                        "(with --limit: among the first --limit of them)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep finished runs' checkpoint.npz and model.npz (default: best.npz only)")
    p.add_argument("--track-test", action="store_true",
                   help="also test after every epoch and report each trained point's best test epoch "
                        "(Brevitas' selection) beside the validation-chosen accuracy")
    p.add_argument("--quick", action="store_true",
                   help="tiny sweep for CI: 1 epoch, 2000 images, W {1, 32} x A {1, 32}")
    p.add_argument("--device", dest="sweep_device", default="cpu", choices=DEVICES,
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
    return dict(weight_bits=args.weight_bits, activation_bits=args.activation_bits, methods=args.methods,
                epochs=args.epochs, float_epochs=args.float_epochs, quick=args.quick, lr=args.lr,
                lr_end=args.lr_end, schedule=args.sweep_schedule, loss=args.loss,
                batch_size=args.batch_size, init=args.init, val_size=args.val, train_limit=args.limit,
                test_limit=args.test_limit, calibration=args.calibrate,
                keep_checkpoints=args.keep_checkpoints, pretrained=args.pretrained,
                weight_clipping=args.weight_clipping, activation_clipping=args.activation_clipping,
                qat_init=args.qat_init, track_test=args.track_test, device=args.sweep_device,
                workers=args.workers, scheduler=args.scheduler)


def add_parsers(sub):
    from ..sweep import ARCHS

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
