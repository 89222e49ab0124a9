"""Does an ensemble beat its best member?  Test accuracy of saved MNIST models alone and averaged.

Chapter 8 of *Deep Learning from Scratch* lists ensembling among what helps accuracy.  For the model
files given (lowbit models or packed models), this script scores each one on the 10,000 MNIST test
images, then every ensemble of two or more of them (mean of the softmax outputs, as
``lowbit.ensemble`` and ``lowbit eval A.npz B.npz ...``), and reports for each ensemble its accuracy
against its best member.  Each model is run once; the subsets reuse its probabilities.

Writes ``runs/results/ensemble_<name>.json``.

Usage::

    python experiments/ensemble_mnist.py --name deep_convnet \\
        experiments/models/deep_convnet_mnist.npz experiments/models/deep_convnet_mnist_aug_seed*.npz
"""
from __future__ import annotations

import argparse
import itertools
import os

import numpy as np

from _common import HERE, add_output_arguments, command_line, environment


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", metavar="MODEL.npz")
    parser.add_argument("--name", required=True, help="results go to ensemble_<name>.json")
    parser.add_argument("--limit", type=int, default=0, help="use the first N test images only")
    add_output_arguments(parser, "results")
    args = parser.parse_args(argv)
    if len(args.models) < 2:
        parser.error(f"an ensemble needs at least 2 models, got {len(args.models)}")

    from lowbit.data import float_images, load_mnist
    from lowbit.ensemble import softmax_np
    from lowbit.packed import load_any
    from lowbit.trainer import write_json_atomic

    mnist = load_mnist(progress=not args.quiet)
    x, y = float_images(mnist.x_test), np.asarray(mnist.y_test)
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    root = os.path.dirname(HERE)
    names = [os.path.relpath(os.path.abspath(path), root) for path in args.models]
    probabilities = []
    members = []
    for name, path in zip(names, args.models):
        p = softmax_np(np.asarray(load_any(path).predict_scores(x), dtype=np.float64))
        probabilities.append(p)
        members.append({"model": name, "test_acc": float((p.argmax(axis=1) == y).mean())})
        print(f"{name}: {members[-1]['test_acc']:.2%}")

    ensembles = []
    for size in range(2, len(names) + 1):
        for subset in itertools.combinations(range(len(names)), size):
            mean = sum(probabilities[i] for i in subset) / size
            acc = float((mean.argmax(axis=1) == y).mean())
            best = max(members[i]["test_acc"] for i in subset)
            ensembles.append({"members": [names[i] for i in subset], "test_acc": acc,
                              "best_member_acc": best, "gain_points": 100 * (acc - best)})
    full = ensembles[-1]
    beats = sum(e["test_acc"] > e["best_member_acc"] for e in ensembles)
    ties = sum(e["test_acc"] == e["best_member_acc"] for e in ensembles)
    result = {
        "experiment": f"ensemble_{args.name}", "images": int(len(y)), "members": members,
        "ensembles": ensembles, "all_members": full,
        "ensembles_beating_their_best_member": beats, "ensembles_tying": ties,
        "ensembles_total": len(ensembles),
        "command": command_line(__file__, argv), "environment": environment(),
    }
    write_json_atomic(os.path.join(args.results, f"ensemble_{args.name}.json"), result)
    print(f"ensemble of all {len(names)}: {full['test_acc']:.2%} (best member {full['best_member_acc']:.2%}, "
          f"{full['gain_points']:+.2f} points); {beats} of {len(ensembles)} ensembles beat their best member, "
          f"{ties} tie")
    return result


if __name__ == "__main__":
    from _common import run_main

    run_main(main)
