"""Fuzzing every lowbit loader: 1,000 mutated files each (issue 22).

For each loader -- trained models (``load_model``), packed models (``load_packed``), training
checkpoints (``Trainer.load_checkpoint``) and the MNIST cache (``load_mnist``, offline) -- it takes
valid reference files and loads ``--count`` mutations of them (:mod:`lowbit.fuzzing`: truncated,
bits flipped, manifest JSON edited, an array's dtype or shape changed, a ``.npy`` header edited, a
member added; corruptions, and crafted edits whose checksums were recomputed).  Every mutated file
must either load to the identical object or be refused with the loader's error
(``ModelFileError``; ``ResumeMismatchError`` for a crafted checkpoint of other run settings;
``MNISTUnavailableError`` for the cache), or -- crafted files only -- load as what they now describe.
Anything else is an *escape*: another exception, or a corruption that loads to something else.

The references: a small Bi-Real ResNet (Residual blocks) and a small binary MLP (saved and
converted), a checkpoint of a small MLP run, and a fabricated MNIST (600 + 100 images, with its own
pinned digests, so that each load takes milliseconds; the cache code is the one real MNIST uses).

Expected: 0 escaped for every loader.  Writes ``runs/results/fuzz_loaders.json``.

Usage::

    python experiments/fuzz_loaders.py                 # 1,000 mutations per loader
    python experiments/fuzz_loaders.py --count 50      # quick
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import os
import tempfile
import time
import warnings

import numpy as np

import _common


def _references(folder):
    """``{loader name: (Loader, [(path, reference object)])}``."""
    from lowbit import convert, fuzzing, save_model
    from lowbit.layers import Affine, BatchNorm, Flatten, ReLU
    from lowbit.model import Model
    from lowbit.optimizers import Adam
    from lowbit.trainer import Trainer
    from lowbit.zoo import bireal_resnet, build_model

    models = [bireal_resnet(seed=1, widths=(4, 8), blocks_per_stage=1),
              build_model("bnn_mlp", seed=2, hidden=(64, 64))]
    model_loader, packed_loader = fuzzing.model_loader(), fuzzing.packed_loader()
    model_refs, packed_refs = [], []
    for index, model in enumerate(models):
        path = save_model(model, os.path.join(folder, f"model{index}.npz"))
        model_refs.append((path, model_loader.load(path)))
        path = convert(model).save(os.path.join(folder, f"packed{index}.npz"))
        packed_refs.append((path, packed_loader.load(path)))

    def mlp():
        return Model([Flatten(), Affine(16, 8, seed=0), BatchNorm(8), ReLU(), Affine(8, 3, seed=1)],
                     input_shape=(1, 4, 4), name="mlp")

    def trainer(out_dir, epochs=2):
        return Trainer(mlp(), optimizer=Adam(0.01), epochs=epochs, batch_size=20, progress=False,
                       out_dir=out_dir)

    run = os.path.join(folder, "run")
    rng = np.random.default_rng(0)
    trainer(run, epochs=1).fit(rng.random((40, 1, 4, 4), dtype=np.float32), np.arange(40) % 3)
    checkpoint_loader = fuzzing.checkpoint_loader(lambda: trainer(os.path.join(folder, "unused")))
    path = os.path.join(run, "checkpoint.npz")
    checkpoint_refs = [(path, checkpoint_loader.load(path))]

    mnist_loader = fuzzing.mnist_loader()
    cache = os.path.join(folder, "mnist", "mnist.npz")
    mnist = _fabricated_mnist(cache)
    return {"model": (model_loader, model_refs), "packed": (packed_loader, packed_refs),
            "checkpoint": (checkpoint_loader, checkpoint_refs), "mnist": (mnist_loader, [(cache, mnist)])}


def _fabricated_mnist(cache):
    """A small MNIST-shaped data set written as the cache, with ``lowbit.data.PINS`` set to its digests."""
    from lowbit import data

    rng = np.random.default_rng(0)
    mnist = data.MNIST(rng.integers(0, 256, (600, 28, 28), dtype=np.uint8), rng.integers(0, 10, 600),
                       rng.integers(0, 256, (100, 28, 28), dtype=np.uint8), rng.integers(0, 10, 100))
    data.PINS = dataclasses.replace(
        data.PINS, n_train=600, n_test=100,
        content_sha256={f: data.idx_digest(getattr(mnist, f)) for f in data.MNIST._fields},
        train_mean_pixel=float(mnist.x_train.mean(dtype=np.float64)), mean_tolerance=1e-9)
    data.write_cache(data.Path(cache), mnist)
    return mnist


def fuzz(loader, references, count, seed, folder, progress):
    from lowbit import fuzzing
    from lowbit.progress import tqdm

    rng = np.random.default_rng(seed)
    choose = fuzzing.rng_chooser(rng)
    raws = [(open(path, "rb").read(), path, reference) for path, reference in references]
    outcomes = collections.Counter()
    by_kind = collections.defaultdict(collections.Counter)
    escapes = []
    start = time.perf_counter()
    for index in tqdm(range(count), desc=loader.name, disable=not progress):
        raw, path, reference = raws[index % len(raws)]
        mutation = fuzzing.mutate_file(raw, choose)
        target = os.path.join(folder, loader.name, os.path.basename(path))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as fh:
            fh.write(mutation.data)
        outcome = fuzzing.classify(loader, target, reference, mutation)
        label = "escaped" if fuzzing.is_escape(outcome) else outcome
        outcomes[label] += 1
        by_kind[mutation.kind][label + (" (crafted)" if mutation.crafted else "")] += 1
        if fuzzing.is_escape(outcome):
            escapes.append({"kind": mutation.kind, "crafted": mutation.crafted,
                            "mutation": mutation.description, "outcome": outcome})
    return {"tried": count, "escaped": outcomes["escaped"], "outcomes": dict(outcomes),
            "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())}, "escapes": escapes[:20],
            "references": len(references), "seconds": time.perf_counter() - start}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=_common._positive_int, default=1000, help="mutations per loader")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loaders", nargs="+", choices=["model", "packed", "checkpoint", "mnist"],
                        default=["model", "packed", "checkpoint", "mnist"])
    _common.add_output_arguments(parser, "results")
    args = parser.parse_args(argv)
    logging.getLogger("lowbit").setLevel(logging.ERROR)  # the cache's "invalid, rebuilding" warnings
    warnings.simplefilter("ignore")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        references = _references(folder)
        for name in args.loaders:
            loader, refs = references[name]
            results[name] = fuzz(loader, refs, args.count, args.seed, folder, not args.quiet)
            print(f"{name}: {results[name]['tried']} tried, {results[name]['escaped']} escaped "
                  f"({results[name]['outcomes']})", flush=True)
    name = "fuzz_loaders.json" if args.count == 1000 and len(args.loaders) == 4 else \
        f"fuzz_loaders_{args.count}_{'_'.join(args.loaders)}.json"
    out = os.path.join(args.results, name)
    from lowbit.trainer import write_json_atomic

    write_json_atomic(out, {"command": _common.command_line(__file__, argv), "environment": _common.environment(),
                            "seed": args.seed, "loaders": results,
                            "total_escaped": sum(r["escaped"] for r in results.values())})
    print(f"wrote {out}")
    return 0 if all(r["escaped"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    _common.run_main(main)
