"""Does a bfloat16 backward cost binary networks accuracy?  The same runs with float32 and with
bf16-rounded output gradients in the binary layers' backward products (issue 21, item 3).

A bf16 GEMM with float32 accumulation, applied where one operand is +-1 (exact in bf16), changes
one thing: ``dy`` rounded to 8 significant bits.  ``lowbit.bf16.bf16_backward`` makes that change,
on one of two backends (``lowbit.bf16``): ``emulated`` (numpy's float32 GEMMs of the rounded ``dy``)
or ``avx512_bf16`` (``lowbit.kernels.bf16_gemm``, the same values summed in the kernel's order);
``experiments/bench_bf16_backward.py`` measures their speed.  For each network and seed it trains
once per backward of ``--backwards`` from the same initialisation, data order and dropout draws
(``--epochs``, Adam, batch 100, cross entropy, constant learning rate), and reports the test accuracy
after the last epoch (no selection on the test set) and the largest per-epoch gap of the training
loss to the first backward's run.  Backwards: ``fp32`` (bf16 off), ``bf16`` (the emulated backend,
the name of the first committed run) and ``bf16_kernel`` (the kernel; the script stops if this CPU
lacks it).  Each record names the backend that ran.

Writes ``bf16_backward_accuracy.json`` under ``--results`` (with ``--backwards`` other than the
default ``fp32 bf16``: ``bf16_backward_accuracy_<backwards>.json``) and the trained models, packed,
under ``--models``; checkpoints go under ``--runs`` and a run resumes from them.

Usage::

    python experiments/bf16_backward_accuracy.py --networks bnn_mlp binary_cnn --epochs 8 3
    python experiments/bf16_backward_accuracy.py --networks bnn_mlp --epochs 8 --backwards fp32 bf16_kernel
"""
from __future__ import annotations

import argparse
import os
import time

from _common import (add_budget_arguments, add_eval_limit_argument, add_output_arguments, command_line, environment,
                     run_main)

NETWORKS = ("bnn_mlp", "binary_cnn")
BACKWARDS = ("fp32", "bf16", "bf16_kernel")
DEFAULT_BACKWARDS = ["fp32", "bf16"]
BNN_HIDDEN = (1024, 1024, 1024)  # bench_training.py's bnn_mlp


def build(name, seed):
    from lowbit.zoo import binary_cnn, bnn_mlp

    return bnn_mlp(seed=seed, hidden=BNN_HIDDEN) if name == "bnn_mlp" else binary_cnn(seed=seed)


def smoke_suffix(args):
    """What a smoke run (``--limit`` / ``--eval-limit``) adds to its file names: it never takes, nor
    resumes, the full run's."""
    return (f"_limit{args.limit}" if args.limit else "") + (f"_eval{args.eval_limit}" if args.eval_limit else "")


def results_suffix(args):
    """What ``--backwards`` other than the default adds to the results file's name."""
    return "" if args.backwards == DEFAULT_BACKWARDS else "_" + "_".join(args.backwards)


def train(args, name, backward, seed, epochs, data):
    """One run; returns its record (and saves its packed model)."""
    import lowbit
    from lowbit.bf16 import bf16_backend, bf16_backward
    from lowbit.optimizers import Adam, ConstantLR
    from lowbit.trainer import Trainer

    x_train, y_train, x_test, y_test = data
    model = build(name, seed)
    run = f"bf16_backward_{name}_{backward}{smoke_suffix(args)}_seed{seed}"
    trainer = Trainer(model, "cross_entropy", Adam(lr=args.lr), ConstantLR(args.lr), epochs=epochs,
                      batch_size=100, seed=seed, out_dir=os.path.join(args.runs, run), progress=not args.quiet,
                      time_budget=args.time_budget, checkpoint_every=args.checkpoint_every)
    t0 = time.perf_counter()
    backend = {"fp32": None, "bf16": "emulated", "bf16_kernel": "avx512_bf16"}[backward]
    with bf16_backward(backend is not None, backend=backend):
        ran = bf16_backend() if backend is not None else None
        history = trainer.fit(x_train, y_train, x_test=x_test, y_test=y_test, resume=True)
    wall = time.perf_counter() - t0
    accuracy = model.evaluate(x_test, y_test)
    path = os.path.join(args.models, f"{run}.npz")
    lowbit.convert(model).save(path, {"test_acc": accuracy, "seed": seed, "backward": backward,
                                      "epochs": trainer.epochs})
    return {"network": name, "backward": backward, "bf16_backend": ran, "seed": seed, "epochs": trainer.epochs, "test_acc": accuracy,
            "train_loss": [epoch["loss"] for epoch in history],
            "test_acc_by_epoch": [epoch["test_acc"] for epoch in history],
            "wall_seconds": wall, "model": os.path.relpath(path, os.path.dirname(os.path.dirname(__file__)))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    parser.add_argument("--epochs", nargs="+", type=int, default=[8, 3],
                        help="epochs per network, in the order of --networks (one value: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--backwards", nargs="+", choices=BACKWARDS, default=DEFAULT_BACKWARDS,
                        help="backwards to train with, the first the reference of the loss gaps (default fp32 bf16)")
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--limit", type=int, default=0, help="train on the first N images only (smoke runs)")
    add_budget_arguments(parser)
    add_eval_limit_argument(parser)
    add_output_arguments(parser, "runs", "results", "models")
    args = parser.parse_args(argv)
    epochs = args.epochs * len(args.networks) if len(args.epochs) == 1 else args.epochs
    if len(epochs) != len(args.networks) or min(epochs) < 1:
        parser.error(f"--epochs takes one positive count or one per network ({len(args.networks)}), "
                     f"got {args.epochs}")
    if len(set(args.backwards)) != len(args.backwards):
        parser.error(f"--backwards names each backward once, got {args.backwards}")
    if "bf16_kernel" in args.backwards:
        from lowbit.kernels import bf16_available

        if not bf16_available():
            parser.error("--backwards bf16_kernel needs a CPU with AVX-512 BF16 (lowbit.kernels.bf16_available())")

    import numpy as np

    from lowbit.data import float_images, load_mnist
    from lowbit.io import write_json_atomic

    mnist = load_mnist(progress=not args.quiet)
    x_train, y_train = float_images(mnist.x_train), np.asarray(mnist.y_train)
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
    x_test, y_test = float_images(mnist.x_test), np.asarray(mnist.y_test)
    if args.eval_limit:
        x_test, y_test = x_test[:args.eval_limit], y_test[:args.eval_limit]
    data = (x_train, y_train, x_test, y_test)
    runs = []
    for name, count in zip(args.networks, epochs):
        for seed in args.seeds:
            group = [train(args, name, backward, seed, count, data) for backward in args.backwards]
            runs += group
            for record in group:
                record["largest_train_loss_gap"] = max(
                    abs(a - b) for a, b in zip(group[0]["train_loss"], record["train_loss"]))
            print(f"{name} seed {seed}, {count} epochs: test accuracy " + ", ".join(
                f"{r['backward']} backward {r['test_acc']:.2%} (largest per-epoch train-loss gap to "
                f"{group[0]['backward']} {r['largest_train_loss_gap']:.4f})" for r in group))
    result = {"experiment": "bf16_backward_accuracy", "bnn_mlp_hidden": list(BNN_HIDDEN),
              "recipe": "Adam, constant lr, batch 100, cross entropy; last-epoch test accuracy",
              "lr": args.lr, "train_images": len(x_train), "test_images": len(y_test), "runs": runs,
              "command": command_line(__file__, argv),
              "environment": environment()}
    write_json_atomic(os.path.join(args.results, f"bf16_backward_accuracy{results_suffix(args)}{smoke_suffix(args)}.json"),
                      result)
    return result


if __name__ == "__main__":
    run_main(main)
