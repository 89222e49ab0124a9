"""Reproduce the chapter-8 network of *Deep Learning from Scratch* on MNIST (the book reports 99.38%).

What it trains
--------------
``single``   the book's recipe exactly: DeepConvNet, He init, Adam(lr=0.001), batch 100, 20 epochs,
             inputs in [0, 1], no augmentation.  Target: >= 99.38% test accuracy.
``fp16``     half-precision inference of the trained ``single`` model (float16 weights and
             activations, float32 accumulation): its test accuracy against float32.
``mixed16``  the book's recipe trained with mixed precision (float16 forward/backward, float32
             master weights, dynamic loss scaling).  Target: within 0.1 points of ``single``.
``ensemble`` ``--members`` networks trained with data augmentation (shift 2 px, rotation 10 deg,
             scale 0.1) and cosine learning-rate decay, each from its own seed, then averaged
             (softmax outputs).  Target: >= 99.5%.

Results
-------
``experiments/results/deep_convnet_mnist.json`` (and ``..._ensemble.json``): accuracy per epoch, test
accuracy, wall time, seeds, the exact command.  Trained models go to ``experiments/models/``.
Checkpoints live in ``--runs`` (default ``experiments/runs/``, not committed); rerunning the same
command after an interruption resumes where it stopped.

Usage::

    python experiments/deep_convnet_mnist.py single --seed 0
    python experiments/deep_convnet_mnist.py ensemble --members 3 --epochs 20
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

import lowbit
from lowbit.data import float_images, load_mnist
from lowbit.optimizers import Adam, ConstantLR, CosineLR
from lowbit.trainer import Trainer, write_json_atomic
from lowbit.zoo import deep_convnet

from _common import HERE, add_output_arguments, command_line, environment


def train_one(name, seed, epochs, augment, schedule, args, data, precision="fp32"):
    x_train, y_train, x_test, y_test = data
    model = deep_convnet(seed=seed)
    optimizer = Adam(lr=args.lr)
    sched = CosineLR(args.lr, epochs) if schedule == "cosine" else ConstantLR(args.lr)
    run_dir = os.path.join(args.runs, name)
    trainer = Trainer(model, "cross_entropy", optimizer, sched, epochs=epochs, batch_size=100,
                      augment=augment, seed=seed, out_dir=run_dir, progress=not args.quiet,
                      precision=precision)
    t0 = time.perf_counter()
    history = trainer.fit(x_train, y_train, x_test=x_test, y_test=y_test, resume=True)
    wall = time.perf_counter() - t0
    return model, history, wall


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["single", "fp16", "mixed16", "ensemble"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--limit", type=int, default=0, help="use only this many training images (smoke runs)")
    add_output_arguments(parser, "runs", "results", "models")
    args = parser.parse_args(argv)

    mnist = load_mnist()
    x_train, y_train = float_images(mnist.x_train), mnist.y_train
    x_test, y_test = float_images(mnist.x_test), mnist.y_test
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
    data = (x_train, y_train, x_test, y_test)
    command = command_line(__file__, argv)

    if args.mode == "fp16":
        model_path = os.path.join(args.models, "deep_convnet_mnist.npz")
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
        write_json_atomic(os.path.join(args.results, "deep_convnet_mnist_fp16.json"), result)
        print(f"fp32 {acc32:.4%}, fp16 inference {acc16:.4%} "
              f"({result['labels_changed']} of {len(y_test)} labels changed)")
        return result

    if args.mode == "mixed16":
        name = f"deep_convnet_mixed16_seed{args.seed}"
        model, history, wall = train_one(name, args.seed, args.epochs, None, "constant", args, data,
                                         precision="mixed16")
        acc = model.evaluate(x_test, y_test)
        path = os.path.join(args.models, "deep_convnet_mnist_mixed16.npz")
        lowbit.save_model(model, path, {"test_acc": acc, "seed": args.seed, "precision": "mixed16"})
        result = {"experiment": "deep_convnet_mnist_mixed16", "seed": args.seed, "epochs": args.epochs,
                  "test_acc": acc, "wall_seconds": wall, "history": history,
                  "model": os.path.relpath(path, os.path.dirname(HERE)), "command": command,
                  "environment": environment()}
        write_json_atomic(os.path.join(args.results, "deep_convnet_mnist_mixed16.json"), result)
        print(f"mixed-precision test accuracy {acc:.4%}, {wall:.0f} s")
        return result

    if args.mode == "single":
        name = f"deep_convnet_seed{args.seed}"
        model, history, wall = train_one(name, args.seed, args.epochs, None, "constant", args, data)
        acc = model.evaluate(x_test, y_test)
        model_path = os.path.join(args.models, "deep_convnet_mnist.npz")
        lowbit.save_model(model, model_path, {"test_acc": acc, "seed": args.seed, "epochs": args.epochs})
        result = {"experiment": "deep_convnet_mnist", "recipe": "book: Adam 0.001, batch 100, no augmentation",
                  "seed": args.seed, "epochs": args.epochs, "train_images": len(x_train),
                  "test_acc": acc, "target": 0.9938, "wall_seconds": wall, "history": history,
                  "model": os.path.relpath(model_path, os.path.dirname(HERE)), "command": command,
                  "environment": environment()}
        write_json_atomic(os.path.join(args.results, "deep_convnet_mnist.json"), result)
        print(f"test accuracy {acc:.4%} (target 99.38%), {wall:.0f} s")
        return result

    from lowbit.augment import Augment

    augment = Augment(shift=2, rotate=10.0, scale=0.1)
    members = []
    member_results = []
    for i in range(args.members):
        seed = args.seed + i
        name = f"deep_convnet_aug_seed{seed}"
        model, history, wall = train_one(name, seed, args.epochs, augment, "cosine", args, data)
        acc = model.evaluate(x_test, y_test)
        path = os.path.join(args.models, f"deep_convnet_mnist_aug_seed{seed}.npz")
        lowbit.save_model(model, path, {"test_acc": acc, "seed": seed, "epochs": args.epochs,
                                        "augment": augment.config()})
        members.append(model)
        member_results.append({"seed": seed, "test_acc": acc, "wall_seconds": wall, "history": history,
                               "model": os.path.relpath(path, os.path.dirname(HERE))})
        print(f"member {i} (seed {seed}): {acc:.4%}")
    ens_acc = lowbit.Ensemble(members).evaluate(x_test, y_test)
    result = {"experiment": "deep_convnet_mnist_ensemble", "augment": augment.config(),
              "schedule": "cosine", "epochs": args.epochs, "members": member_results,
              "best_member_acc": max(m["test_acc"] for m in member_results),
              "ensemble_acc": ens_acc, "target": 0.995, "command": command,
              "environment": environment()}
    write_json_atomic(os.path.join(args.results, "deep_convnet_mnist_ensemble.json"), result)
    print(f"ensemble of {len(members)}: {ens_acc:.4%} (best member {result['best_member_acc']:.4%})")
    return result


if __name__ == "__main__":
    main()
