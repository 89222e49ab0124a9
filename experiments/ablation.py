"""What helps accuracy (Deep Learning from Scratch, 8.1.3): augmentation, learning-rate decay, ensembles.

For one architecture (``--arch deep_convnet``, the chapter-8 CNN, or ``binary_cnn``, the binary CNN
of ``lowbit.zoo``) it trains one change at a time, each with ``--seeds``:

=============  ===============================================================================
``base``       Adam at a constant learning rate, no augmentation (the book's recipe)
``decay``      + cosine learning-rate decay to 0 over the run
``aug``        + augmentation (shift 2 px, rotation 10 deg, scale 0.1), constant learning rate
``aug+decay``  both
=============  ===============================================================================

and, per variant, the ensemble of its seeds (mean softmax).  binary_cnn's BatchNorm statistics are
recalibrated on 10,000 clean training images after every epoch in *every* variant
(``--bn-recalibrate``, :func:`lowbit.trainer.recalibrate_batchnorm`): running averages of augmented
batches shift the thresholds before its signs, which would charge augmentation with a BatchNorm
artefact (see ``experiments/results/bnn_cnn_aug.json``).  Every run holds out 10,000 training
images (split by the seed) and reports the test accuracy of its best validation epoch; the table
gives mean, standard deviation and range over seeds, and the ensemble.  Runs checkpoint every epoch
in ``--runs`` and resume: rerunning the same command continues where it stopped, and finished runs
are read back, not retrained.

Writes ``runs/results/ablation_<arch>.json`` and ``ablation_<arch>.md``, and each run's best
model to ``runs/models/ablation/<arch>_<variant>_seed<S>.npz``: the float model for
deep_convnet (0.5 MB), the packed model for binary_cnn (its labels are checked against the
simulation's), so ``lowbit eval`` reproduces every cell and ensemble of the table.  Model files are
named by arch, variant and seed only (the committed tables point to those names) and record their
``epochs``: a run with other ``--epochs`` into a ``--models`` folder that holds them is refused before
any training (files written before this check, without ``epochs``, are replaced as before), so give
such runs their own ``--models``.

Cost on 2 cores: deep_convnet about 80 s per epoch, binary_cnn about 140 s (each alone).  ``--device
gpu`` trains (and evaluates) with CuPy; the runs are the same recipe, so a run resumes on either device.

Usage::

    python experiments/ablation.py --arch deep_convnet --epochs 12 --seeds 0 1 2
    python experiments/ablation.py --arch binary_cnn --epochs 12 --seeds 0 1 2
    python experiments/ablation.py --arch deep_convnet --epochs 1 --seeds 0 1 --limit 2000   # smoke run

Recipes (``docs/recipes.md``) apply to every variant of a run: ``--teacher MODEL.npz`` (distillation),
``--label-smoothing``, and for binary_cnn ``--optimizer bop``, ``--stages E1,E2`` (two-stage
training) and ``--rsign``; ``--time-budget`` bounds each run.  They tag the run folders, the model
files and the results (``ablation_<arch><tag>.json``), so the recipe-free files are never touched.
Every run also records its best test epoch beside the validation-chosen one.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from _common import (HERE, add_budget_arguments, add_eval_limit_argument, add_output_arguments, command_line,
                     environment)
VARIANTS = ("base", "decay", "aug", "aug+decay")
LEARNING_RATES = {"deep_convnet": 1e-3, "binary_cnn": 1e-3}
BN_RECALIBRATE = {"deep_convnet": 0, "binary_cnn": 10000}  # deep_convnet has no BatchNorm


def build(arch, seed, rsign=False):
    from lowbit.zoo import binary_cnn, deep_convnet

    return deep_convnet(seed=seed) if arch == "deep_convnet" else binary_cnn(seed, rsign=rsign)


def recipe_suffix(args):
    """The name suffix of the recipe options ('' without any)."""
    from lowbit.recipes import recipe_tag

    return ("_rsign" if args.rsign else "") + recipe_tag(args) + (
        f"_tb{args.time_budget:g}" if args.time_budget else "")


def train(arch, variant, seed, args, data):
    """Train (or resume, or read back) one run; returns (best model, run summary)."""
    import lowbit
    from lowbit.augment import Augment
    from lowbit.optimizers import ConstantLR, CosineLR
    from lowbit.recipes import best_test_epoch, fit_stages, recipe_loss, recipe_optimizer, recipe_teacher
    from lowbit.trainer import Trainer

    x_train, y_train, x_val, y_val, x_test, y_test = data
    lr = args.lr or LEARNING_RATES[arch]
    augment = Augment(shift=2, rotate=10.0, scale=0.1) if "aug" in variant else None
    run_dir = os.path.join(args.runs, f"ablation_{arch}_{variant.replace('+', '_')}_e{args.epochs}"
                                      + (f"_limit{args.limit}" if args.limit else "")
                                      + (f"_eval{args.eval_limit}" if args.eval_limit else "")
                           + (f"_bn{args.bn_recalibrate}" if args.bn_recalibrate else "") + recipe_suffix(args)
                           + f"_seed{seed}")
    model = build(arch, seed, args.rsign)
    loss = recipe_loss(args, "cross_entropy")
    teacher = recipe_teacher(args, args.device, model.input_shape)

    def make_trainer(net, epochs, out_dir, time_budget):
        schedule = CosineLR(lr, epochs) if "decay" in variant else ConstantLR(lr)
        return Trainer(net, loss, recipe_optimizer(args, lr), schedule, epochs=epochs, batch_size=100,
                       augment=augment, seed=seed, out_dir=out_dir, progress=not args.quiet,
                       bn_recalibrate=args.bn_recalibrate, device=args.device, time_budget=time_budget,
                       checkpoint_every=args.checkpoint_every, teacher=teacher)

    start = time.perf_counter()
    trainer, stage1 = fit_stages(model, make_trainer, args.epochs, data, out_dir=run_dir, stages=args.stages,
                                 time_budget=args.time_budget)
    history = trainer.history
    test_epoch, test_best = best_test_epoch(history)
    best = lowbit.load_model(os.path.join(run_dir, "best.npz"))
    return best, {"seed": seed, "best_epoch": best.metadata["epoch"], "val_acc": best.metadata["val_acc"],
                  "best_test_epoch": test_epoch, "test_acc_at_best_test_epoch": test_best,
                  "epochs_trained": trainer.epochs, "stage1_epochs": stage1["epochs"] if stage1 else None,
                  "wall_seconds_this_call": time.perf_counter() - start, "epochs_run": len(history),
                  "run_dir": os.path.relpath(run_dir, os.path.dirname(HERE))}


def model_path(arch, variant, seed, args):
    return os.path.join(args.models, "ablation", f"{arch}_{variant.replace('+', '_')}" + recipe_suffix(args)
                        + (f"_limit{args.limit}" if args.limit else "")
                        + (f"_eval{args.eval_limit}" if args.eval_limit else "") + f"_seed{seed}.npz")


def other_epochs(path, epochs):
    """The epochs recorded in the model file at ``path`` when they differ from ``epochs``, else None
    (no file, the same epochs, or a file written before models recorded them)."""
    from lowbit.packed import load_any

    if not os.path.exists(path):
        return None
    recorded = load_any(path).metadata.get("epochs")
    return recorded if recorded is not None and recorded != epochs else None


def save_best(arch, variant, seed, model, args, x_test):
    """Save a run's best model under ``--models/ablation/`` (packed for binary_cnn); returns the fields
    the run's summary gains."""
    import lowbit

    path = model_path(arch, variant, seed, args)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    metadata = {"arch": arch, "variant": variant, "seed": seed, "epochs": args.epochs,
                "epoch": model.metadata["epoch"], "val_acc": model.metadata["val_acc"]}
    fields = {"model": os.path.relpath(path, os.path.dirname(HERE))}
    if arch == "binary_cnn":
        packed = lowbit.convert(model)
        packed.save(path, metadata)
        fields["packed_labels_equal"] = int((packed.predict(x_test) == model.predict(x_test)).sum())
    else:
        lowbit.save_model(model, path, metadata)
    return fields


def table(arch, args, rows):
    lines = [f"# What helps accuracy: {arch} on MNIST", "",
             f"Test accuracy (%) at the best validation epoch; {args.epochs} epochs, Adam, batch 100, "
             f"seeds {' '.join(map(str, args.seeds))}"
             + (f", first {args.limit} training images only" if args.limit else "")
             + (f", first {args.eval_limit} validation and test images only" if args.eval_limit else "")
             + (f", BatchNorm recalibrated on up to {args.bn_recalibrate} training images after every epoch"
                if args.bn_recalibrate else "")
             + (f"; recipe options {recipe_suffix(args)[1:]}" if recipe_suffix(args) else "") + ".", "",
             "| variant | mean | std | min | max | ensemble of the seeds | mean at the best test epoch | epochs |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, row in rows.items():
        accs = [100 * acc for acc in row["test_acc"]]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        at_test = [100 * r["test_acc_at_best_test_epoch"] for r in row["runs"]]
        epochs = "/".join(str(r["epochs_trained"]) for r in row["runs"])
        lines.append(f"| {variant} | {statistics.mean(accs):.2f} | {std:.2f} | {min(accs):.2f} | {max(accs):.2f} | "
                     f"{100 * row['ensemble_acc']:.2f} | {statistics.mean(at_test):.2f} | {epochs} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=sorted(LEARNING_RATES), required=True)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--lr", type=float, default=None, help="Adam's (initial) learning rate")
    parser.add_argument("--limit", type=int, default=0, help="train on the first N images only (smoke runs)")
    parser.add_argument("--bn-recalibrate", type=int, default=None,
                        help="after every epoch set the BatchNorm statistics from this many training images "
                             "(default: 10000 for binary_cnn, 0 for deep_convnet)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="train on the CPU (numpy) or a CUDA GPU (CuPy); default cpu")
    parser.add_argument("--rsign", action="store_true",
                        help="binary_cnn: learned sign thresholds (ReActNet's RSign) in front of its binary layers")
    add_eval_limit_argument(parser)
    add_budget_arguments(parser)
    from lowbit.recipes import add_recipe_arguments, recipe_config

    add_recipe_arguments(parser)
    add_output_arguments(parser, "runs", "results", "models")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.arch == "deep_convnet" and (args.rsign or args.stages or args.optimizer == "bop"):
        parser.error("--rsign, --stages and --optimizer bop need binary layers: use them with --arch binary_cnn")
    if args.bn_recalibrate is None:
        args.bn_recalibrate = BN_RECALIBRATE[args.arch]
    if args.bn_recalibrate < 0:
        parser.error(f"--bn-recalibrate must be >= 0, got {args.bn_recalibrate}")

    from lowbit.data import load_mnist, mnist_splits
    from lowbit.ensemble import Ensemble
    from lowbit.trainer import write_json_atomic

    clashes = []
    for variant in args.variants:
        for seed in args.seeds:
            path = model_path(args.arch, variant, seed, args)
            found = other_epochs(path, args.epochs)
            if found is not None:
                clashes.append(f"{path} ({found} epochs)")
    if clashes:
        parser.error(f"--models {args.models} holds models of runs with other --epochs: {', '.join(clashes)}; "
                     f"this run trains {args.epochs}; give it its own --models folder")

    mnist = load_mnist(progress=not args.quiet)
    rows = {}
    for variant in args.variants:
        models, runs = [], []
        for seed in args.seeds:
            data = mnist_splits(mnist, 10000, seed, args.limit, args.eval_limit)
            x_test, y_test = data[4:]
            model, run = train(args.arch, variant, seed, args, data)
            if args.device == "gpu":  # evaluate, and ensemble, where it trained (conversion reads it back)
                model.to_device("gpu")
            run["test_acc"] = model.evaluate(x_test, y_test)
            run.update(save_best(args.arch, variant, seed, model, args, x_test))
            print(f"{args.arch} {variant} seed {seed}: {run['test_acc']:.2%} (best epoch {run['best_epoch']})")
            models.append(model)
            runs.append(run)
        ensemble_acc = Ensemble(models).evaluate(x_test, y_test) if len(models) > 1 else runs[0]["test_acc"]
        rows[variant] = {"runs": runs, "test_acc": [r["test_acc"] for r in runs], "ensemble_acc": ensemble_acc}
    text = table(args.arch, args, rows)
    result = {"experiment": f"ablation_{args.arch}", "arch": args.arch, "epochs": args.epochs, "seeds": args.seeds,
              "limit": args.limit, "eval_limit": args.eval_limit, "lr": args.lr or LEARNING_RATES[args.arch],
              "bn_recalibrate": args.bn_recalibrate, "rsign": args.rsign, "recipe": recipe_config(args),
              "time_budget": args.time_budget,
              "augment": {"shift": 2, "rotate": 10.0, "scale": 0.1}, "decay": "cosine to 0", "device": args.device,
              "variants": rows,
              "command": command_line(__file__, argv), "environment": environment()}
    suffix = "_smoke" if args.limit or args.eval_limit else ""
    stem = f"ablation_{args.arch}{recipe_suffix(args)}{suffix}"
    write_json_atomic(os.path.join(args.results, f"{stem}.json"), result)
    with open(os.path.join(args.results, f"{stem}.md"), "w") as fh:
        fh.write(text)
    print(text)
    return result


if __name__ == "__main__":
    from _common import run_main

    run_main(main)
