"""The ablation table of issue #27 (recipes on the open rows) from the results of a GPU batch.

Reads every results JSON under a folder written by the jobs of ``experiments/gpu_jobs/recipes_*.jobs``
(``bnn_mnist.py``, ``ablation.py`` or ``bireal_mnist.py``; the variant and seed come from the names,
``recipes_<row>_<variant>_seed<S>.json`` or ``<variant>_seed<S>/...``) and writes, per variant, the mean
+- standard deviation over seeds of the test accuracy at the best validation epoch (the model kept),
the same at the best test epoch beside it, the epochs trained (``E1+E2`` for two stages) and the best validation epochs.

Usage::

    python experiments/recipes_table.py RESULTS/recipes_cnn --out experiments/results/recipes_cnn
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics

from _common import command_line

NAME = re.compile(r"(?:recipes_[a-z]+_)?(?P<variant>[a-z]+)_seed(?P<seed>\d+)")


def runs_of(result):
    """The per-run records of one results JSON, whichever script wrote it."""
    if "variants" in result:  # ablation.py (runs per variant) or bireal_mnist.py (one row per variant)
        out = []
        for row in result["variants"].values():
            out += row.get("runs", [dict(row, seed=result.get("seed"))])
        return out
    return [dict(result, epochs_trained=result.get("epochs"))]


def collect(folder):
    """``{variant: [run, ...]}`` from the results JSONs under ``folder``."""
    table = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if not name.endswith(".json"):
                continue
            path = os.path.join(root, name)
            match = NAME.search(os.path.relpath(path, folder))
            if match is None:
                continue
            with open(path) as fh:
                result = json.load(fh)
            for run in runs_of(result):
                run = dict(run, file=os.path.relpath(path, folder), seed=int(match["seed"]))
                first = run.get("stage1_epochs") or (run.get("stage1") or {}).get("epochs")
                if first:  # two stages: "stage 1 + stage 2" epochs
                    run["epochs_trained"] = f"{first}+{run.get('epochs_trained')}"
                table.setdefault(match["variant"], []).append(run)
    return table


def _mean_std(values):
    values = [100 * v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} +- {std:.2f}"


def markdown(table, title):
    lines = [f"# {title}", "", "Test accuracy (%), mean +- std over seeds: the model of the best validation epoch "
             "(kept and packed), and the best test epoch beside it.", "",
             "| variant | seeds | at the best validation epoch | at the best test epoch | epochs trained | "
             "best validation epochs |", "|---|---|---|---|---|---|"]
    order = ["base"] + sorted(v for v in table if v != "base")
    for variant in [v for v in order if v in table]:
        runs = sorted(table[variant], key=lambda r: r["seed"])
        lines.append(f"| {variant} | {' '.join(str(r['seed']) for r in runs)} | "
                     f"{_mean_std([r.get('test_acc') for r in runs])} | "
                     f"{_mean_std([r.get('test_acc_at_best_test_epoch') for r in runs])} | "
                     f"{'/'.join(str(r.get('epochs_trained')) for r in runs)} | "
                     f"{'/'.join(str(r.get('best_epoch')) for r in runs)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="the results folder of one row's jobs")
    parser.add_argument("--out", required=True, help="output path without extension (.json and .md are written)")
    parser.add_argument("--title", default=None, help="table title (default: the folder's name)")
    args = parser.parse_args(argv)
    from lowbit.trainer import write_json_atomic

    if not os.path.isdir(args.folder):
        parser.error(f"folder must be a results folder, got {args.folder!r}")
    table = collect(args.folder)
    if not table:
        parser.error(f"no recipes results (recipes_<row>_<variant>_seed<S> or <variant>_seed<S>) under {args.folder}")
    title = args.title or f"Recipes ablation: {os.path.basename(os.path.normpath(args.folder))}"
    text = markdown(table, title)
    slim = {variant: [{k: r.get(k) for k in ("seed", "test_acc", "best_epoch", "best_test_epoch",
                                               "test_acc_at_best_test_epoch", "epochs_trained", "file")}
                      for r in runs] for variant, runs in table.items()}
    write_json_atomic(args.out + ".json", {"title": title, "variants": slim, "command": command_line(__file__, argv)})
    with open(args.out + ".md", "w") as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    from _common import run_main

    run_main(main)
