"""What each bit costs: MNIST accuracy and model size over weight x activation bits, PTQ and QAT.

A thin wrapper of :func:`lowbit.sweep.run_sweep` (the same as ``lowbit sweep``) with the defaults of
the published runs: for each architecture, weight bits {1, 2, 4, 8, 16 (fp16), 32} by activation bits
{1, 2, 4, 8, 32}, each point by post-training quantization of the trained float model and by
quantization-aware training from scratch, 20 epochs, seeds 0 1 2.

What it reproduces
------------------
The Brevitas BNN-PYNQ MNIST table (TFC 3x64, SFC 3x256, LFC 3x1024), test accuracy (%):

=====  =====  =====  =====
arch   1W1A   1W2A   2W2A
=====  =====  =====  =====
TFC    93.17  94.79  96.60
SFC    97.81  98.31  98.66
LFC    98.88  98.99  -
=====  =====  =====  =====

These are the targets for the QAT cells; the measured tables are in ``experiments/results/sweep_*/``
and the README.  Brevitas trains 1000 epochs (1W1A) or 500 (others); this sweep trains 20 (Adam
1e-2 -> 1e-4, Glorot-initialised latent weights), and quantizes every layer of the MLPs, first and
last included, as Brevitas does.  PTQ has no Brevitas counterpart: expect it far below QAT at 1-2
bits.  The sweep also covers the chapter-8 CNN (``deep_convnet``, 99.38% in float), whose first and
last layers keep float weights under both methods.

Results
-------
``experiments/results/sweep_<arch>/``: ``results.csv`` / ``results.json`` (every point: bits, method,
seed, test accuracy, packed file size, epochs, wall time), ``table.md`` (with a brevitas column for the
reference cells), ``accuracy_vs_bits.png``, ``accuracy_vs_size.png``.  Rerunning the same command after
an interruption continues where it stopped.

Usage::

    python experiments/bitwidth_sweep.py --arch tfc --seeds 0 1 2
    python experiments/bitwidth_sweep.py --arch all
    python experiments/bitwidth_sweep.py --arch tfc --quick       # the tiny CI version, seconds
    python experiments/bitwidth_sweep.py --arch tfc --methods qat --weight-bits 1 2 --act-bits 1 2 \
        --epochs 100 --tag e100                                    # the Brevitas cells, longer
    python experiments/bitwidth_sweep.py --arch deep_convnet --methods ptq --seeds 0 \
        --pretrained experiments/models/deep_convnet_mnist.npz --tag book   # PTQ of the trained book CNN
    python experiments/bitwidth_sweep.py --arch sfc --tag e300 --report-only   # rewrite the reports only
"""
from __future__ import annotations

import argparse
import os

from lowbit.cli import add_sweep_arguments, sweep_options
from lowbit.sweep import ARCHS, report_sweep, run_sweep

from _common import add_output_arguments


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="tfc", choices=list(ARCHS) + ["all"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add_sweep_arguments(parser)
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the tables and plots of the sweep folder from its finished points; "
                             "train nothing (the other options then only name the folder)")
    parser.add_argument("--tag", default="", help="suffix of the results folder (sweep_<arch>_<tag>), to keep "
                                                  "a sweep with other settings (e.g. more epochs) apart")
    add_output_arguments(parser, "results")
    args = parser.parse_args(argv)

    results = {}
    if args.pretrained and args.arch == "all":
        parser.error("--pretrained names one model: give one --arch, not 'all'")
    for arch in (ARCHS if args.arch == "all" else (args.arch,)):
        suffix = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
        out_dir = os.path.join(args.results, f"sweep_{arch}{suffix}")
        if args.report_only:
            result = report_sweep(out_dir)
            with open(result.files["table"]) as fh:
                print(fh.read())
            results[arch] = result
            continue
        result = run_sweep(arch, seeds=args.seeds, out_dir=out_dir, progress=not args.quiet,
                           **sweep_options(args))
        with open(result.files["table"]) as fh:
            print(fh.read())
        results[arch] = result
    return results


if __name__ == "__main__":
    from _common import run_main

    run_main(main)
