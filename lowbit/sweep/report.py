"""A sweep's reports, written from its settings and points alone (so they can be rewritten at any time).

Files in ``out_dir``
--------------------
``sweep.json``        the settings (what must not change when a sweep is resumed).
``points.jsonl``      one JSON line per finished point, appended, flushed and fsynced.
``results.csv``, ``results.json``  every point (bits, method, seed, accuracy, sizes, epochs, times).
``table.md``          accuracy tables (rows weight bits, columns activation bits), one per method,
                      mean +- sample standard deviation over seeds; sizes; Brevitas comparison.
``accuracy_vs_bits.png``, ``accuracy_vs_size.png``   the plots.
``pareto_size.png``, ``pareto_bops.png``   accuracy against packed size and against bit operations, the
                      front marked, with any mixed-precision points of ``mixed_points.jsonl``
                      (``lowbit mixed --sweep-dir``; :func:`lowbit.mixed_search.sweep_pareto`).
``histories/``        each point's per-epoch history (``<method>_w<W>a<A>_seed<s>.json``: loss, train,
                      validation and, with ``track_test``, test accuracy, lr and seconds per epoch),
                      copied from ``runs/`` whenever the reports are written; small, and the only
                      record of the trajectory once ``runs/`` is gone (it is not committed).
``points/``           the packed model of every point.
``runs/``             training runs (``float_seed<s>``, ``qat_w<W>a<A>_seed<s>``): ``best.npz``,
                      ``history.json``, ``result.json``; the checkpoint while a run is unfinished.

Columns of ``results.csv`` (one row per point and seed)
-------------------------------------------------------
``accuracy`` (test, packed model, 0..1), ``simulation_accuracy`` (the quantized model's own forward;
equal by construction), ``val_accuracy`` (best validation epoch of the run; empty for PTQ and when
``val_size=0``), ``best_epoch``, ``epochs`` (of the run the point comes from: the float model's for
PTQ), ``size_bytes`` (packed file), ``float_file_bytes`` (the training-format ``best.npz`` it came
from: float32 latent weights and BatchNorm statistics), ``float32_bytes`` (4 bytes per parameter and
buffer), ``parameters``, ``train_seconds`` (sum of the training epochs' times, the float model's
for PTQ), ``wall_seconds`` (this point's own work in the call that finished it: for QAT what was
left of its training, for PTQ quantization and calibration; conversion and evaluation for both),
``test_images``, ``source``, ``packed_file``, ``run_dir``, ``finished_at``, ``settings_key``; a
``track_test`` sweep adds ``best_test_accuracy`` and ``best_test_epoch``.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import NamedTuple

import numpy as np

from ..io import write_bytes_atomic
from ..plots import save_figure
from .settings import METHODS
from .store import POINTS_FILE, load_points, load_settings

METHOD_TITLES = {"ptq": "post-training quantization of the float model",
                 "qat": "quantization-aware training from scratch"}

#: Brevitas BNN-PYNQ MNIST test accuracy (%), by (weight bits, activation bits).
BREVITAS_MNIST = {
    "tfc": {(1, 1): 93.17, (1, 2): 94.79, (2, 2): 96.60},
    "sfc": {(1, 1): 97.81, (1, 2): 98.31, (2, 2): 98.66},
    "lfc": {(1, 1): 98.88, (1, 2): 98.99},
}
REFERENCE_CELLS = ((1, 1), (1, 2), (2, 2))

CSV_FIELDS = ("arch", "method", "weight_bits", "act_bits", "seed", "accuracy", "simulation_accuracy",
              "val_accuracy", "best_epoch", "epochs", "size_bytes", "float_file_bytes", "float32_bytes",
              "parameters", "train_seconds", "wall_seconds", "test_images", "source", "packed_file",
              "run_dir", "finished_at", "settings_key")
#: The columns a ``track_test`` sweep adds (only then, so the reports of other sweeps stay as they were).
CSV_TRACK_TEST_FIELDS = ("best_test_accuracy", "best_test_epoch")


class SweepResult(NamedTuple):
    """What :func:`lowbit.sweep.run_sweep` returns.

    ``records``: every finished point of ``out_dir`` (dicts, the rows of ``results.csv``);
    ``new_points``: how many this call computed; ``skipped_points``: how many of this call's grid were
    already done; ``files``: the report files by name (``csv``, ``json``, ``table``, ``bits_plot``,
    ``size_plot``).
    """

    records: list
    new_points: int
    skipped_points: int
    files: dict


def sort_key(record):
    """Records in report order: method, weight bits, activation bits, seed."""
    return (METHODS.index(record["method"]), record["weight_bits"], record["act_bits"], record["seed"])


def _write_text(path, text):
    write_bytes_atomic(path, text.encode("utf-8"))


def _method_title(method, settings):
    """The title of ``method``'s table and plot: QAT's says where its points started."""
    if method == "qat" and settings.get("qat") not in (None, "from scratch"):
        return "quantization-aware training " + settings["qat"]
    return METHOD_TITLES[method]


def _bits_label(bits):
    return {16: "16 (fp16)", 32: "32 (float)"}.get(bits, str(bits))


def _mean_std(values):
    values = np.asarray(values)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def aggregate(records):
    """``{(method, wb, ab): {"mean", "std", "n", "seeds", "size_bytes"}}``; accuracies in percent,
    std the sample standard deviation (ddof 1; 0 for one seed).  Groups whose every point has a
    ``best_test_accuracy`` (``track_test``) also get ``"best_test": {"mean", "std", "n"}``."""
    groups = {}
    for record in records:
        groups.setdefault((record["method"], record["weight_bits"], record["act_bits"]), []).append(record)
    summary = {}
    for key, group in groups.items():
        mean, std = _mean_std([r["accuracy"] * 100 for r in group])
        summary[key] = {"mean": mean, "std": std, "n": len(group), "seeds": sorted(r["seed"] for r in group),
                        "size_bytes": float(np.mean([r["size_bytes"] for r in group]))}
        best_test = [r.get("best_test_accuracy") for r in group]
        if all(value is not None for value in best_test):  # a track_test sweep's trained points
            mean, std = _mean_std(np.array(best_test) * 100)
            summary[key]["best_test"] = {"mean": mean, "n": len(group), "std": std}
    return summary


# -- table.md --------------------------------------------------------------------------------------
def _epochs(n):
    return f"{n} epoch{'' if n == 1 else 's'}"


def _cell(entry, seeds_total):
    if entry is None:
        return "-"
    text = f"{entry['mean']:.2f}" if entry["n"] == 1 else f"{entry['mean']:.2f} ± {entry['std']:.2f}"
    if entry["n"] != seeds_total and seeds_total > 1:
        text += f" (n={entry['n']})"
    return text


def _clipping_text(settings):
    clipping = settings.get("ptq_weight_clipping")
    if not clipping:
        return ""
    text = (f", PTQ's 2..8-bit weights over their {'least-squared-error' if clipping == 'mse' else 'max-abs'}"
            " range")
    return text + (" and activations over theirs" if settings.get("ptq_activation_clipping") == "mse"
                   else " and activations over their calibrated maximum")


def _recipe_text(settings, trained):
    """The recipe sentence of ``table.md`` (without its closing clauses)."""
    pretrained = settings.get("pretrained")
    clipping = _clipping_text(settings)
    source = (f"PTQ of the trained float model {pretrained['file']} (sha256 {pretrained['sha256'][:12]}...), "
              f"activation ranges calibrated on {settings['calibration']} training images{clipping}"
              if pretrained else None)
    if pretrained and not trained:
        return "Method: " + source
    training = (f"Recipe: Adam lr {settings['lr']:g}"
                + (f" -> {settings['lr_end']:g} ({settings['schedule']})" if settings["lr_end"] else " (constant)")
                + f", batch {settings['batch_size']}, {settings['loss']} loss, "
                f"{_epochs(settings['epochs'])} per QAT run, "
                + (source if pretrained else f"{_epochs(settings['float_epochs'])} for the float model"
                   + clipping)
                + (f"; {settings['val_size']} training images held out, the model of the best validation "
                   "epoch reported" if settings["val_size"] else
                   "; trained on every training image (no validation), the last epoch's model reported"))
    return training + (f"; latent weights initialised '{settings['init']}'" if settings["init"] else "")


def _grid(records):
    """Methods, weight bits, activation bits and seeds present in ``records``, in report order."""
    return ([m for m in METHODS if any(r["method"] == m for r in records)],
            sorted({r["weight_bits"] for r in records}), sorted({r["act_bits"] for r in records}),
            sorted({r["seed"] for r in records}))


def _header(records, settings, methods, seeds):
    test_images = sorted({r["test_images"] for r in records})
    spread = ("mean ± sample standard deviation over seeds " + ", ".join(map(str, seeds))
              if len(seeds) > 1 else f"seed {seeds[0]}" if seeds else "no seeds")
    return [
        f"# Bit-width sweep: {settings['arch']} on MNIST", "",
        f"Test accuracy (%) of each point's packed model on {', '.join(map(str, test_images))} test images, "
        f"{spread}.  Rows: weight bits; columns: activation bits.",
        "",
        _recipe_text(settings, trained="qat" in methods)
        + ("; every layer quantized, first and last included" if settings["quantize_first_last"]
           else "; first and last layers' weights kept in float")
        + (f"; training on the first {settings['train_limit']} images"
           if settings["train_limit"] and ("qat" in methods or not settings.get("pretrained")) else "")
        + (" (quick run: not a result)" if settings["quick"] else "") + ".",
        "",
    ]


def _accuracy_and_size_tables(summary, settings, grid):
    methods, weight_bits, act_bits, seeds = grid
    header = "| W \\ A | " + " | ".join(_bits_label(a) for a in act_bits) + " |"
    rule = "|---|" + "---|" * len(act_bits)
    lines = []
    for method in methods:
        lines += [f"## {method.upper()}: {_method_title(method, settings)}", "", header, rule]
        for wb in weight_bits:
            cells = [_cell(summary.get((method, wb, ab)), len(seeds)) for ab in act_bits]
            lines.append(f"| {_bits_label(wb)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Packed model size (KiB)", "",
              "| method, W \\ A | " + " | ".join(_bits_label(a) for a in act_bits) + " |", rule]
    for method in methods:
        for wb in weight_bits:
            cells = []
            for ab in act_bits:
                entry = summary.get((method, wb, ab))
                cells.append("-" if entry is None else f"{entry['size_bytes'] / 1024:.1f}")
            lines.append(f"| {method.upper()}, {_bits_label(wb)} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _brevitas_section(summary, settings, methods, seeds):
    arch = settings["arch"]
    reference = BREVITAS_MNIST.get(arch)
    if not reference:
        return []
    tracked = [m for m in methods if any("best_test" in e for (mm, _, _), e in summary.items() if mm == m)]
    lines = [f"## Against Brevitas BNN-PYNQ ({arch.upper()}, MNIST)", "",
             "Brevitas (bnn_pynq_train.py's defaults) trains on all 60,000 training images with "
             "Adam 0.02 halved every 40 epochs and squared hinge loss, up to 1000 epochs, and keeps "
             "the epoch of best *test* accuracy; the cells here are this sweep's, "
             + ("chosen by its held-out validation images." if settings["val_size"] else
                "each run's last-epoch model (no images held out).")
             + (" The 'best test epoch' columns apply Brevitas' selection to the same training runs "
                "(test accuracy of the simulated model at its best test epoch): a like-for-like "
                "comparison with the reference, optimistic as a measure of the model." if tracked else ""),
             "",
             "| W/A | brevitas | " + " | ".join(f"lowbit {m.upper()}" for m in methods)
             + "".join(f" | lowbit {m.upper()}, best test epoch" for m in tracked) + " |",
             "|---|---|" + "---|" * (len(methods) + len(tracked))]
    for wb, ab in REFERENCE_CELLS:
        ref = reference.get((wb, ab))
        cells = [_cell(summary.get((m, wb, ab)), len(seeds)) for m in methods]
        cells += [_cell(summary.get((m, wb, ab), {}).get("best_test"), len(seeds)) for m in tracked]
        ref_text = "-" if ref is None else f"{ref:.2f}"
        lines.append(f"| {wb}W{ab}A | {ref_text} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def markdown(records, settings, summary):
    """The text of ``table.md``."""
    grid = _grid(records)
    methods, _, _, seeds = grid
    lines = _header(records, settings, methods, seeds)
    lines += _accuracy_and_size_tables(summary, settings, grid)
    lines += _brevitas_section(summary, settings, methods, seeds)
    return "\n".join(lines)


def csv_text(records):
    """The text of ``results.csv``."""
    fields = CSV_FIELDS + (CSV_TRACK_TEST_FIELDS if any("best_test_accuracy" in r for r in records) else ())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: ("" if record.get(k) is None else record.get(k)) for k in fields})
    return buffer.getvalue()


def results_document(records, settings, summary):
    """The content of ``results.json``."""
    reference = {f"{wb}W{ab}A": value for (wb, ab), value in BREVITAS_MNIST.get(settings["arch"], {}).items()}
    ordered = sorted(summary.items(), key=lambda kv: (METHODS.index(kv[0][0]),) + kv[0][1:])
    return {
        "arch": settings["arch"], "settings": settings, "brevitas_reference": reference,
        "summary": [{"method": m, "weight_bits": wb, "act_bits": ab, "accuracy_mean_percent": e["mean"],
                     "accuracy_std_percent": e["std"], "seeds": e["seeds"], "size_bytes": e["size_bytes"],
                     **({"best_test_accuracy_mean_percent": e["best_test"]["mean"],
                         "best_test_accuracy_std_percent": e["best_test"]["std"]} if "best_test" in e else {})}
                    for (m, wb, ab), e in ordered],
        "points": records,
    }


# -- plots -----------------------------------------------------------------------------------------
def _plot_method(ax, method, summary, settings, colours, weight_bits, act_bits):
    from matplotlib.ticker import NullLocator

    for ab in act_bits:
        points = [(wb, summary[(method, wb, ab)]) for wb in weight_bits if (method, wb, ab) in summary]
        if not points:
            continue
        ax.errorbar([p[0] for p in points], [p[1]["mean"] for p in points],
                    yerr=[p[1]["std"] for p in points], marker="o", capsize=3, color=colours[ab],
                    label=f"A = {_bits_label(ab)}")
    if method == "qat":
        for (wb, ab), value in BREVITAS_MNIST.get(settings["arch"], {}).items():
            if wb not in weight_bits or ab not in act_bits:
                continue
            ax.plot([wb], [value], marker="x", color=colours[ab], markersize=9, linestyle="none",
                    label=f"Brevitas {wb}W{ab}A")
    ax.set_xscale("log", base=2)
    ax.set_xticks(weight_bits)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([_bits_label(b).replace(" ", "\n") for b in weight_bits])
    ax.set_xlabel("weight bits")
    ax.set_title(f"{settings['arch']}: {method.upper()} ({_method_title(method, settings)})", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def plot_bits(path, summary, settings):
    """``accuracy_vs_bits.png``: accuracy against weight bits, one line per activation width, one panel
    per method (Brevitas' cells marked on QAT's)."""
    from matplotlib.figure import Figure

    methods = [m for m in METHODS if any(k[0] == m for k in summary)]
    weight_bits = sorted({k[1] for k in summary})
    act_bits = sorted({k[2] for k in summary})
    figure = Figure(figsize=(5.5 * max(1, len(methods)), 4.2))
    axes = figure.subplots(1, max(1, len(methods)), squeeze=False, sharey=True)[0]
    colours = {ab: f"C{i}" for i, ab in enumerate(act_bits)}
    for ax, method in zip(axes, methods):
        _plot_method(ax, method, summary, settings, colours, weight_bits, act_bits)
    axes[0].set_ylabel("test accuracy (%), mean ± std over seeds")
    save_figure(figure, path)


def plot_size(path, summary, settings):
    """``accuracy_vs_size.png``: accuracy against packed file size, every point labelled."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    figure = Figure(figsize=(6.5, 4.5))
    ax = figure.subplots()
    markers = {"ptq": "o", "qat": "s"}
    act_bits = sorted({k[2] for k in summary})
    colours = {ab: f"C{i}" for i, ab in enumerate(act_bits)}
    for (method, wb, ab), entry in sorted(summary.items()):
        ax.errorbar([entry["size_bytes"] / 1024], [entry["mean"]], yerr=[entry["std"]],
                    marker=markers[method], color=colours[ab], capsize=2, linestyle="none",
                    markerfacecolor="none" if method == "ptq" else colours[ab])
        ax.annotate(f"W{wb}A{ab}", (entry["size_bytes"] / 1024, entry["mean"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    handles = [Line2D([], [], marker=markers[m], color="k", linestyle="none",
                      markerfacecolor="none" if m == "ptq" else "k", label=m.upper())
               for m in METHODS if any(k[0] == m for k in summary)]
    handles += [Line2D([], [], marker="o", color=colours[ab], linestyle="none",
                       label=f"A = {_bits_label(ab)}")
                for ab in act_bits]
    ax.legend(handles=handles, fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(
        lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else ""))
    ax.set_xlabel("packed model file size (KiB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{settings['arch']}: accuracy against model size", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    save_figure(figure, path)


# -- histories -------------------------------------------------------------------------------------
def history_name(record):
    """``<method>_w<W>a<A>_seed<s>.json``: a point's file in ``histories/``."""
    return f"{record['method']}_w{record['weight_bits']}a{record['act_bits']}_seed{record['seed']}.json"


def _history_document(record, info):
    return {"point": {key: record[key] for key in ("arch", "method", "weight_bits", "act_bits", "seed",
                                                   "settings_key")},
            "run_dir": record["run_dir"], "best_epoch": info.get("best_epoch"),
            **({"best_test_epoch": info["best_test_epoch"]} if "best_test_epoch" in info else {}),
            "history": info["history"]}


def write_histories(out_dir, records):
    """Copy each point's per-epoch history from its training run (``runs/<run>/result.json``, which
    is not committed) to ``histories/<point>.json``, which is small and meant to be committed, so the
    trajectory behind ``best_epoch`` and ``best_test_epoch`` outlives the run folder.  A history
    whose run folder is gone (a fresh checkout) is left as it is, and one that would not change is not
    rewritten.  PTQ points share their float model's history.  Returns the number of history files
    present."""
    present = 0
    for record in records:
        target = os.path.join(out_dir, "histories", history_name(record))
        source = os.path.join(out_dir, record.get("run_dir") or "", "result.json")
        if record.get("run_dir") and os.path.exists(source):
            with open(source) as fh:
                info = json.load(fh)
            if info.get("settings_key") == record.get("settings_key") and "history" in info:
                payload = json.dumps(_history_document(record, info), indent=1, sort_keys=True) + "\n"
                current = None
                if os.path.exists(target):
                    with open(target, encoding="utf-8") as fh:
                        current = fh.read()
                if current != payload:
                    _write_text(target, payload)
        present += os.path.exists(target)
    return present


# -- all of them -----------------------------------------------------------------------------------
def write_reports(out_dir, records, settings):
    """Write ``results.csv``, ``results.json``, ``table.md`` and the plots for ``records``.

    Returns the paths by name (``csv``, ``json``, ``table``, ``bits_plot``, ``size_plot``, the Pareto
    plots ``pareto_size`` and ``pareto_bops``, and ``histories``, the folder of per-epoch histories,
    when there are any: see :func:`write_histories`).
    """
    # each record's keys sorted, as points.jsonl stores them: a resumed sweep's reports equal a fresh one's
    records = [dict(sorted(record.items())) for record in sorted(records, key=sort_key)]
    summary = aggregate(records)
    files = {"csv": os.path.join(out_dir, "results.csv"), "json": os.path.join(out_dir, "results.json"),
             "table": os.path.join(out_dir, "table.md"),
             "bits_plot": os.path.join(out_dir, "accuracy_vs_bits.png"),
             "size_plot": os.path.join(out_dir, "accuracy_vs_size.png")}
    _write_text(files["csv"], csv_text(records))
    _write_text(files["json"], json.dumps(results_document(records, settings, summary), indent=2,
                                          sort_keys=False) + "\n")
    _write_text(files["table"], markdown(records, settings, summary))
    if summary:
        plot_bits(files["bits_plot"], summary, settings)
        plot_size(files["size_plot"], summary, settings)
        from ..mixed_search import sweep_pareto  # the front by size and by BOPs, with mixed points (issue 26)

        files.update(sweep_pareto(out_dir, records, settings))
    if write_histories(out_dir, records):
        files["histories"] = os.path.join(out_dir, "histories")
    return files


def report_sweep(out_dir):
    """Rewrite the reports of the sweep in ``out_dir`` from its ``sweep.json`` and ``points.jsonl``,
    training and evaluating nothing (e.g. after lowbit's report format changed, or to see a sweep
    that another process is still running).  Returns :class:`SweepResult` (no new points)."""
    out_dir = os.fspath(out_dir)
    settings = load_settings(out_dir)
    # without repairing: a sweep may still be appending to points.jsonl
    records = load_points(os.path.join(out_dir, POINTS_FILE), settings.get("key"), repair=False)
    files = write_reports(out_dir, records, settings)
    return SweepResult(sorted(records, key=sort_key), 0, len(records), files)
