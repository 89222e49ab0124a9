"""Does a bfloat16 backward cost binary networks accuracy?  The same runs with float32 and with
bf16-rounded output gradients in the binary layers' backward products (issue 21, item 3).

A bf16 GEMM with float32 accumulation, applied where one operand is +-1 (exact in bf16), changes
one thing: ``dy`` rounded to 8 significant bits.  ``lowbit.bf16.bf16_backward`` makes that change on
numpy (emulated, no faster), so this script can measure its accuracy effect before such a backend
exists; ``experiments/bench_bf16_backward.py`` measured its speed.  For each network and seed it
trains twice from the same initialisation, data order and dropout draws (``--epochs``, Adam, batch
100, cross entropy, constant learning rate), once per backward, and reports the test accuracy after
the last epoch (no selection on the test set) and the largest per-epoch gap of the training loss.

Writes ``bf16_backward_accuracy.json`` under ``--results`` and the trained models, packed, under
``--models``; checkpoints go under ``--runs`` and a run resumes from them.

Usage::

    python experiments/bf16_backward_accuracy.py --networks bnn_mlp binary_cnn --epochs 8 3
"""
from __future__ import annotations

import argparse
import os
import time

from _common import (add_budget_arguments, add_eval_limit_argument, add_output_arguments, command_line, environment,
                     run_main)

NETWORKS = ("bnn_mlp", "binary_cnn")
BNN_HIDDEN = (1024, 1024, 1024)  # bench_training.py's bnn_mlp


def build(name, seed):
    from lowbit.zoo import binary_cnn, bnn_mlp

    return bnn_mlp(seed=seed, hidden=BNN_HIDDEN) if name == "bnn_mlp" else binary_cnn(seed=seed)


def smoke_suffix(args):
    """What a smoke run (``--limit`` / ``--eval-limit``) adds to its file names: it never takes, nor
    resumes, the full run's."""
    return (f"_limit{args.limit}" if args.limit else "") + (f"_eval{args.eval_limit}" if args.eval_limit else "")


def train(args, name, backward, seed, epochs, data):
    """One run; returns its record (and saves its packed model)."""
    import lowbit
    from lowbit.bf16 import bf16_backward
    from lowbit.optimizers import Adam, ConstantLR
    from lowbit.trainer import Trainer

    x_train, y_train, x_test, y_test = data
    model = build(name, seed)
    run = f"bf16_backward_{name}_{backward}{smoke_suffix(args)}_seed{seed}"
    trainer = Trainer(model, "cross_entropy", Adam(lr=args.lr), ConstantLR(args.lr), epochs=epochs,
                      batch_size=100, seed=seed, out_dir=os.path.join(args.runs, run), progress=not args.quiet,
                      time_budget=args.time_budget, checkpoint_every=args.checkpoint_every)
    t0 = time.perf_counter()
    with bf16_backward(backward == "bf16"):
        history = trainer.fit(x_train, y_train, x_test=x_test, y_test=y_test, resume=True)
    wall = time.perf_counter() - t0
    accuracy = model.evaluate(x_test, y_test)
    path = os.path.join(args.models, f"{run}.npz")
    lowbit.convert(model).save(path, {"test_acc": accuracy, "seed": seed, "backward": backward,
                                      "epochs": trainer.epochs})
    return {"network": name, "backward": backward, "seed": seed, "epochs": trainer.epochs, "test_acc": accuracy,
            "train_loss": [epoch["loss"] for epoch in history],
            "test_acc_by_epoch": [epoch["test_acc"] for epoch in history],
            "wall_seconds": wall, "model": os.path.relpath(path, os.path.dirname(os.path.dirname(__file__)))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    parser.add_argument("--epochs", nargs="+", type=int, default=[8, 3],
                        help="epochs per network, in the order of --networks (one value: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
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
            pair = [train(args, name, backward, seed, count, data) for backward in ("fp32", "bf16")]
            runs += pair
            gap = max(abs(a - b) for a, b in zip(pair[0]["train_loss"], pair[1]["train_loss"]))
            for record in pair:
                record["largest_train_loss_gap"] = gap
            print(f"{name} seed {seed}, {count} epochs: test accuracy fp32 backward {pair[0]['test_acc']:.2%}, "
                  f"bf16 backward {pair[1]['test_acc']:.2%} (largest per-epoch train-loss gap {gap:.4f})")
    result = {"experiment": "bf16_backward_accuracy", "bnn_mlp_hidden": list(BNN_HIDDEN),
              "recipe": "Adam, constant lr, batch 100, cross entropy; last-epoch test accuracy",
              "lr": args.lr, "train_images": len(x_train), "test_images": len(y_test), "runs": runs,
              "command": command_line(__file__, argv),
              "environment": environment()}
    write_json_atomic(os.path.join(args.results, f"bf16_backward_accuracy{smoke_suffix(args)}.json"), result)
    return result


if __name__ == "__main__":
    run_main(main)
