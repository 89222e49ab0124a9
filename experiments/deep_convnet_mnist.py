"""Reproduce the chapter-8 network of *Deep Learning from Scratch* on MNIST (the book reports 99.38%).

What it trains
--------------
``single``   the book's recipe exactly: DeepConvNet, He init, Adam(lr=0.001), batch 100, 20 epochs,
             inputs in [0, 1], no augmentation.  Target: >= 99.38% test accuracy.
``fp16``     half-precision inference of the trained ``single`` model (float16 weights and
             activations, float32 accumulation): its test accuracy against float32.
``mixed16``  the book's recipe trained with mixed precision (float16 forward/backward, float32
             master weights, dynamic loss scaling).  Target: within 0.1 points of ``single``.
             With ``--schedule cosine`` both ``single`` and ``mixed16`` decay the learning rate to 0
             over ``--epochs`` and write per-seed results to ``results/precision_cosine/``
             (``fp32_seed<S>.json``, ``mixed16_seed<S>.json``), so the two precisions can be compared
             at a settled accuracy rather than at the last epoch of a constant learning rate.
``precision-report``  reads ``results/precision_cosine/`` and writes ``summary.json`` and
             ``table.md`` there: last-epoch test accuracy of each seed, mean and spread of each
             precision, and the gap.
``ensemble`` ``--members`` networks trained with data augmentation (shift 2 px, rotation 10 deg,
             scale 0.1) and cosine learning-rate decay, each from its own seed, then averaged
             (softmax outputs).  Target: >= 99.5%.

Results
-------
``experiments/results/deep_convnet_mnist.json`` (and ``..._ensemble.json``): accuracy per epoch, test
accuracy, wall time, seeds, the exact command.  Trained models go to ``runs/models/``.
Checkpoints live in ``--runs`` (default ``experiments/runs/``, not committed); rerunning the same
command after an interruption resumes where it stopped.

Usage::

    python experiments/deep_convnet_mnist.py single --seed 0
    python experiments/deep_convnet_mnist.py ensemble --members 3 --epochs 20
    python experiments/deep_convnet_mnist.py mixed16 --schedule cosine --epochs 12 --seed 1
    python experiments/deep_convnet_mnist.py precision-report
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time

import numpy as np

import lowbit
from lowbit.data import float_images, load_mnist
from lowbit.optimizers import Adam, ConstantLR, CosineLR
from lowbit.trainer import Trainer, write_json_atomic
from lowbit.zoo import deep_convnet

from _common import HERE, add_output_arguments, command_line, environment, model_input


def train_one(name, seed, epochs, augment, schedule, args, data, precision="fp32"):
    x_train, y_train, x_test, y_test = data
    model = deep_convnet(seed=seed)
    optimizer = Adam(lr=args.lr)
    sched = CosineLR(args.lr, epochs) if schedule == "cosine" else ConstantLR(args.lr)
    run_dir = os.path.join(args.runs, name)
    trainer = Trainer(model, "cross_entropy", optimizer, sched, epochs=epochs, batch_size=100,
                      augment=augment, seed=seed, out_dir=run_dir, progress=not args.quiet,
                      precision=precision, device=args.device)
    t0 = time.perf_counter()
    history = trainer.fit(x_train, y_train, x_test=x_test, y_test=y_test, resume=True)
    wall = time.perf_counter() - t0
    return model, history, wall


def train_and_save(args, data, name, seed, model_file, model_meta, *, augment=None, schedule="constant",
                   precision="fp32"):
    """What every training mode does: train (or resume) run ``name`` for ``--epochs``, evaluate it on
    the test set, save it as ``--models/model_file`` with ``model_meta`` (plus its test accuracy and
    seed).  Returns the model and the fields every result file has: seed, test_acc, wall_seconds,
    history and the model's path relative to the repository."""
    model, history, wall = train_one(name, seed, args.epochs, augment, schedule, args, data, precision)
    acc = model.evaluate(data[2], data[3])
    path = os.path.join(args.models, model_file)
    lowbit.save_model(model, path, {"test_acc": acc, "seed": seed, **model_meta})
    return model, {"seed": seed, "test_acc": acc, "wall_seconds": wall, "history": history,
                   "model": os.path.relpath(path, os.path.dirname(HERE))}


PRECISION_DIR = "precision_cosine"


def precision_pair(args, data, command):
    """One ``single`` or ``mixed16`` run with cosine decay; its result goes to
    ``results/precision_cosine/<precision>_seed<S>.json``."""
    precision = "mixed16" if args.mode == "mixed16" else "fp32"
    smoke = f"_limit{args.limit}" if args.limit else ""  # smoke runs keep out of the full runs' files
    name = f"deep_convnet_{precision}_cosine_e{args.epochs}{smoke}_seed{args.seed}"
    _, run = train_and_save(args, data, name, args.seed,
                            f"deep_convnet_mnist_cosine_{precision}{smoke}_seed{args.seed}.npz",
                            {"epochs": args.epochs, "precision": precision, "schedule": "cosine"},
                            schedule="cosine", precision=precision)
    acc, wall = run["test_acc"], run["wall_seconds"]
    result = {"experiment": "deep_convnet_mnist_precision_cosine", "precision": precision,
              "recipe": "book network and batch, Adam with cosine decay from --lr to 0, no augmentation",
              "epochs": args.epochs, "lr": args.lr, "train_images": len(data[0]), **run,
              "command": command, "environment": environment()}
    write_json_atomic(os.path.join(args.results, PRECISION_DIR + smoke, f"{precision}_seed{args.seed}.json"), result)
    print(f"{precision}, cosine decay, seed {args.seed}: test accuracy {acc:.4%}, {wall:.0f} s")
    return result


def precision_report(args, command):
    """Summarise ``results/precision_cosine/``: mixed16 against fp32 over the seeds both have."""
    folder = os.path.join(args.results, PRECISION_DIR)
    runs = {"fp32": {}, "mixed16": {}}
    for path in sorted(glob.glob(os.path.join(folder, "*_seed*.json"))):
        with open(path) as f:
            run = json.load(f)
        runs[run["precision"]][run["seed"]] = run
    seeds = sorted(set(runs["fp32"]) & set(runs["mixed16"]))
    if not seeds:
        raise SystemExit(f"no seed has both an fp32 and a mixed16 run in {folder}; found "
                         f"fp32 seeds {sorted(runs['fp32'])}, mixed16 seeds {sorted(runs['mixed16'])}")
    for field in ("epochs", "train_images", "lr"):
        values = {runs[p][s][field] for p in runs for s in seeds}
        if len(values) != 1:
            raise SystemExit(f"the runs in {folder} differ in {field} ({sorted(values)}); "
                             "compare like with like")
    acc = {p: np.array([runs[p][s]["test_acc"] for s in seeds]) for p in runs}
    skipped = [sum(h.get("skipped_steps", 0) for h in runs["mixed16"][s]["history"]) for s in seeds]
    summary = {"experiment": "deep_convnet_mnist_precision_cosine_summary", "epochs": runs["fp32"][seeds[0]]["epochs"],
               "seeds": seeds,
               "test_acc": {p: [float(a) for a in acc[p]] for p in acc},
               "mean": {p: float(acc[p].mean()) for p in acc},
               "std": {p: float(acc[p].std(ddof=1)) if len(seeds) > 1 else 0.0 for p in acc},
               "gap_points": float(100 * (acc["fp32"].mean() - acc["mixed16"].mean())),
               "per_seed_gap_points": [float(100 * (a - b)) for a, b in zip(acc["fp32"], acc["mixed16"])],
               "mixed16_skipped_steps": skipped,
               "wall_seconds": {p: [runs[p][s]["wall_seconds"] for s in seeds] for p in runs},
               "target": "mixed16 within 0.1 points of fp32", "command": command}
    lines = ["| seed | fp32 | mixed16 | fp32 - mixed16 (points) | skipped steps |",
             "| --- | --- | --- | --- | --- |"]
    for i, s in enumerate(seeds):
        lines.append(f"| {s} | {acc['fp32'][i]:.2%} | {acc['mixed16'][i]:.2%} | "
                     f"{summary['per_seed_gap_points'][i]:+.2f} | {skipped[i]} |")
    lines.append(f"| mean ± std | {summary['mean']['fp32']:.2%} ± {100 * summary['std']['fp32']:.2f} | "
                 f"{summary['mean']['mixed16']:.2%} ± {100 * summary['std']['mixed16']:.2f} | "
                 f"{summary['gap_points']:+.2f} | |")
    table = "\n".join(lines) + "\n"
    write_json_atomic(os.path.join(folder, "summary.json"), summary)
    with open(os.path.join(folder, "table.md"), "w") as f:
        f.write(table)
    print(table, end="")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["single", "fp16", "mixed16", "ensemble", "precision-report"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="train on the CPU (numpy) or a CUDA GPU (CuPy); default cpu")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                        help="learning rate of single and mixed16: the book's constant rate (default), "
                             "or cosine decay to 0, which writes to results/precision_cosine/")
    parser.add_argument("--limit", type=int, default=0, help="use only this many training images (smoke runs)")
    add_output_arguments(parser, "runs", "results", "models")
    args = parser.parse_args(argv)
    if args.schedule != "constant" and args.mode not in ("single", "mixed16"):
        parser.error(f"--schedule applies to single and mixed16, not to {args.mode!r}")
    command = command_line(__file__, argv)
    if args.mode == "precision-report":
        return precision_report(args, command)

    mnist = load_mnist()
    x_train, y_train = float_images(mnist.x_train), mnist.y_train
    x_test, y_test = float_images(mnist.x_test), mnist.y_test
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
    data = (x_train, y_train, x_test, y_test)
    # A smoke run (--limit) has its own runs, models and results, so it neither resumes nor replaces
    # those of the full runs.
    smoke = f"_limit{args.limit}" if args.limit else ""
    if args.schedule == "cosine":
        return precision_pair(args, data, command)

    if args.mode == "fp16":
        model_path = model_input(args.models, f"deep_convnet_mnist{smoke}.npz")
        model = lowbit.load_model(model_path)
        acc32 = model.evaluate(x_test, y_test)
        labels32 = model.predict(x_test)
        model.astype(np.float16)
        labels16 = model.predict(x_test)
        acc16 = float((labels16 == y_test).mean())
        result = {"experiment": "deep_convnet_mnist_fp16_inference", "model": model_path,
                  "test_acc_fp32": acc32, "test_acc_fp16": acc16,
                  "labels_changed": int((labels16 != labels32).sum()), "command": command,
                  "environment": environment()}
        write_json_atomic(os.path.join(args.results, f"deep_convnet_mnist_fp16{smoke}.json"), result)
        print(f"fp32 {acc32:.4%}, fp16 inference {acc16:.4%} "
              f"({result['labels_changed']} of {len(y_test)} labels changed)")
        return result

    if args.mode == "mixed16":
        _, run = train_and_save(args, data, f"deep_convnet_mixed16{smoke}_seed{args.seed}", args.seed,
                                f"deep_convnet_mnist_mixed16{smoke}.npz", {"precision": "mixed16"},
                                precision="mixed16")
        result = {"experiment": "deep_convnet_mnist_mixed16", "epochs": args.epochs, **run,
                  "command": command, "environment": environment()}
        write_json_atomic(os.path.join(args.results, f"deep_convnet_mnist_mixed16{smoke}.json"), result)
        print(f"mixed-precision test accuracy {run['test_acc']:.4%}, {run['wall_seconds']:.0f} s")
        return result

    if args.mode == "single":
        _, run = train_and_save(args, data, f"deep_convnet{smoke}_seed{args.seed}", args.seed,
                                f"deep_convnet_mnist{smoke}.npz", {"epochs": args.epochs})
        result = {"experiment": "deep_convnet_mnist", "recipe": "book: Adam 0.001, batch 100, no augmentation",
                  "epochs": args.epochs, "train_images": len(x_train), "target": 0.9938, **run,
                  "command": command, "environment": environment()}
        write_json_atomic(os.path.join(args.results, f"deep_convnet_mnist{smoke}.json"), result)
        print(f"test accuracy {run['test_acc']:.4%} (target 99.38%), {run['wall_seconds']:.0f} s")
        return result

    from lowbit.augment import Augment

    augment = Augment(shift=2, rotate=10.0, scale=0.1)
    members = []
    member_results = []
    for i in range(args.members):
        seed = args.seed + i
        model, run = train_and_save(args, data, f"deep_convnet_aug{smoke}_seed{seed}", seed,
                                    f"deep_convnet_mnist_aug{smoke}_seed{seed}.npz",
                                    {"epochs": args.epochs, "augment": augment.config()},
                                    augment=augment, schedule="cosine")
        members.append(model)
        member_results.append(run)
        print(f"member {i} (seed {seed}): {run['test_acc']:.4%}")
    ens_acc = lowbit.Ensemble(members).evaluate(x_test, y_test)
    result = {"experiment": "deep_convnet_mnist_ensemble", "augment": augment.config(),
              "schedule": "cosine", "epochs": args.epochs, "members": member_results,
              "best_member_acc": max(m["test_acc"] for m in member_results),
              "ensemble_acc": ens_acc, "target": 0.995, "command": command,
              "environment": environment()}
    write_json_atomic(os.path.join(args.results, f"deep_convnet_mnist_ensemble{smoke}.json"), result)
    print(f"ensemble of {len(members)}: {ens_acc:.4%} (best member {result['best_member_acc']:.4%})")
    return result


if __name__ == "__main__":
    from _common import run_main

    run_main(main)
