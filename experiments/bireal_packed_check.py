"""Packed Bi-Real ResNets against their own simulation, on all 10,000 MNIST test images.

:func:`lowbit.convert` packs the binary convolution inside every Residual block (issue 22, item 3):
the convolution runs on bits, its integer accumulators come back as the simulation's float32 values
and the real-valued shortcut is added to them as in the simulation.  This script converts each
committed Bi-Real model (``experiments/models/bireal_*.npz``), saves and reloads the packed file,
and compares labels and scores with the model's own evaluation-mode forward pass (same batch size).

Expected: every label equal (10,000 / 10,000) and the scores identical bit for bit.

Writes ``runs/results/bireal_packed_check.json``.

Usage::

    python experiments/bireal_packed_check.py            # every experiments/models/bireal_*.npz
    python experiments/bireal_packed_check.py --limit 500
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time

import numpy as np

import _common


def check(path, x, y, batch_size):
    from lowbit import convert, load_model, load_packed

    model = load_model(path)
    packed = convert(model)
    with tempfile.TemporaryDirectory() as folder:
        packed_path = os.path.join(folder, "packed.npz")
        packed.save(packed_path)
        size = os.path.getsize(packed_path)
        reloaded = load_packed(packed_path)
    t0 = time.perf_counter()
    sim = model.predict_scores(x, batch_size)
    sim_seconds = time.perf_counter() - t0
    reloaded.predict_scores(x[:batch_size], batch_size)  # compiles the kernels
    t0 = time.perf_counter()
    got = reloaded.predict_scores(x, batch_size)
    packed_seconds = time.perf_counter() - t0
    kinds = [stage.kind for stage in packed.stages]
    return {
        "model": os.path.relpath(path, os.path.dirname(_common.HERE)),
        "stages": kinds,
        "residual_stages": kinds.count("residual"),
        "count": int(len(y)),
        "labels_equal": int((sim.argmax(axis=1) == got.argmax(axis=1)).sum()),
        "scores_identical": bool(np.array_equal(sim, got)),
        "max_abs_score_difference": float(np.max(np.abs(sim - got))) if len(y) else 0.0,
        "accuracy_simulation": float((sim.argmax(axis=1) == y).mean()),
        "accuracy_packed": float((got.argmax(axis=1) == y).mean()),
        "file_bytes": {"model": os.path.getsize(path), "packed": size},
        "seconds": {"simulation": sim_seconds, "packed": packed_seconds},
        "notes": packed.notes,
    }


def main(argv=None):
    from lowbit.data import float_images, load_mnist

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=0, help="the first N test images only (default all)")
    parser.add_argument("--batch-size", type=int, default=100)
    _common.add_output_arguments(parser, "results")
    args = parser.parse_args(argv)
    if args.limit < 0:
        parser.error(f"--limit must be >= 0, got {args.limit}")
    mnist = load_mnist(progress=False)
    x, y = float_images(mnist.x_test), np.asarray(mnist.y_test)
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    rows = []
    for path in sorted(glob.glob(os.path.join(_common.HERE, "models", "bireal_*.npz"))):
        row = check(path, x, y, args.batch_size)
        rows.append(row)
        print(f"{row['model']}: {row['residual_stages']} residual stages; labels equal "
              f"{row['labels_equal']}/{row['count']}; scores identical {row['scores_identical']}; "
              f"accuracy {row['accuracy_packed']:.2%}", flush=True)
    out = os.path.join(args.results, "bireal_packed_check.json" if not args.limit
                       else f"bireal_packed_check_limit{args.limit}.json")
    doc = {"command": _common.command_line(__file__, argv), "environment": _common.environment(),
           "batch_size": args.batch_size, "models": rows,
           "all_labels_equal": all(r["labels_equal"] == r["count"] for r in rows)}
    from lowbit.trainer import write_json_atomic

    write_json_atomic(out, doc)
    print(f"wrote {out}")
    return 0 if doc["all_labels_equal"] else 1


if __name__ == "__main__":
    _common.run_main(main)
