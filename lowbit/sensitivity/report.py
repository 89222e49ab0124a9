"""The sensitivity reports: CSV, Markdown table, JSON and heatmap."""
from __future__ import annotations

import csv
import io
import json
import os

import numpy as np

from .hessian import hessian_scores, rank_correlation
from .layerwise import KINDS


# -- reports ------------------------------------------------------------------------------------------
_FIELDS = ("layer", "path", "type", "weights", "macs", "kind", "bits", "accuracy", "loss", "accuracy_drop",
           "loss_increase", "hessian_trace", "hessian_score")


def sensitivity_table(ptq, measured, scores=None, traces=None):
    """Rows of the sensitivity CSV: ``measured`` rows with the layer's type, size, MACs and (when given)
    its Hessian trace and HAWQ score."""
    rows = []
    for row in measured["rows"]:
        info = ptq.layers[row["layer"]]
        out = {**row, "type": info.kind, "weights": info.weights, "macs": info.macs,
               "hessian_trace": None, "hessian_score": None}
        if traces is not None:
            out["hessian_trace"] = traces[f"{row['kind']}_trace"][row["layer"]]
        if scores is not None:
            out["hessian_score"] = scores.get((row["layer"], row["kind"], row["bits"]))
        rows.append(out)
    return rows


def _csv_text(rows, fields):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    return buffer.getvalue()


def read_sensitivity_csv(path):
    """The rows of a sensitivity CSV written by :func:`write_sensitivity_reports` (numbers parsed)."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"layer", "kind", "bits", "accuracy_drop", "loss_increase"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} is not a sensitivity CSV: columns {sorted(missing)} are missing")
        rows = []
        for row in reader:
            parsed = dict(row)
            for key in ("layer", "bits", "weights", "macs"):
                if row.get(key) not in (None, ""):
                    parsed[key] = int(row[key])
            for key in ("accuracy", "loss", "accuracy_drop", "loss_increase", "hessian_trace", "hessian_score"):
                if row.get(key) not in (None, ""):
                    parsed[key] = float(row[key])
                else:
                    parsed[key] = None
            rows.append(parsed)
    return rows


def _correlations(rows):
    """Spearman correlations of the HAWQ score with the measured loss increase and accuracy drop, per
    kind (every layer and width) and per kind and width (across layers)."""
    out = {}
    for kind in KINDS:
        chosen = [r for r in rows if r["kind"] == kind and r.get("hessian_score") is not None and r["bits"] < 32]
        if not chosen:
            continue
        groups = {"all widths": chosen}
        for bits in sorted({r["bits"] for r in chosen}):
            groups[f"{bits} bits"] = [r for r in chosen if r["bits"] == bits]
        for name, group in groups.items():
            score = [r["hessian_score"] for r in group]
            out[f"{kind}, {name}"] = {
                "pairs": len(group),
                "spearman_loss_increase": rank_correlation(score, [r["loss_increase"] for r in group]),
                "spearman_accuracy_drop": rank_correlation(score, [r["accuracy_drop"] for r in group]),
            }
    return out


def _markdown(ptq, rows, measured, correlations, title):
    widths = sorted({r["bits"] for r in rows})
    lines = [f"# Per-layer sensitivity: {title}", "",
             f"Each layer quantized alone (the rest float), post-training; accuracy on {measured['images']} "
             f"held-out training images (float model: {measured['baseline']['accuracy']:.2%}, loss "
             f"{measured['baseline']['loss']:.4f}).  Cells: accuracy drop in points / loss increase.", ""]
    for kind in KINDS:
        chosen = [r for r in rows if r["kind"] == kind]
        if not chosen:
            continue
        lines += [f"## {kind.capitalize()}s", "",
                  "| layer | type | weights | " + " | ".join(f"{b} bits" for b in widths) + " | Hessian trace / n |",
                  "|---|---|---|" + "---|" * len(widths) + "---|"]
        for index, info in enumerate(ptq.layers):
            cells = []
            for bits in widths:
                match = [r for r in chosen if r["layer"] == index and r["bits"] == bits]
                cells.append(f"{100 * match[0]['accuracy_drop']:+.2f} / {match[0]['loss_increase']:+.4f}"
                             if match else "-")
            trace = next((r["hessian_trace"] for r in chosen if r["layer"] == index), None)
            lines.append(f"| {index} ({info.path}) | {info.kind} | {info.weights} | " + " | ".join(cells)
                         + f" | {'-' if trace is None else f'{trace:.3g}'} |")
        lines.append("")
    if correlations:
        lines += ["## How well the Hessian score ranks the measured sensitivity", "",
                  "HAWQ's estimate 0.5 x (Hessian trace / n) x ||Q(z) - z||^2 against the measurement, Spearman's "
                  "rank correlation.", "",
                  "| group | pairs | vs loss increase | vs accuracy drop |", "|---|---|---|---|"]
        for name, entry in correlations.items():
            lines.append(f"| {name} | {entry['pairs']} | {entry['spearman_loss_increase']:.3f} | "
                         f"{entry['spearman_accuracy_drop']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def draw_heatmap(path, ptq, rows, title):
    """The heatmap of the accuracy drops of ``rows`` (layers by widths, one panel per kind)."""
    from matplotlib.figure import Figure

    from ..plots import save_figure

    widths = sorted({r["bits"] for r in rows})
    kinds = [k for k in KINDS if any(r["kind"] == k for r in rows)]
    figure = Figure(figsize=(5.2 * len(kinds) + 1, 0.45 * len(ptq.layers) + 1.8), layout="constrained")
    axes = figure.subplots(1, len(kinds), squeeze=False)[0]
    for ax, kind in zip(axes, kinds):
        grid = np.full((len(ptq.layers), len(widths)), np.nan)
        for r in rows:
            if r["kind"] == kind:
                grid[r["layer"], widths.index(r["bits"])] = 100 * r["accuracy_drop"]
        image = ax.imshow(np.clip(grid, 0, None), cmap="Reds", aspect="auto", vmin=0)
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(widths)))
        ax.set_xticklabels([str(b) for b in widths])
        ax.set_yticks(range(len(ptq.layers)))
        ax.set_yticklabels([f"{i} {info.kind} {info.weights}" for i, info in enumerate(ptq.layers)], fontsize=7)
        ax.set_xlabel(f"{kind} bits")
        ax.set_title(f"{title}: {kind}s alone", fontsize=8)
        figure.colorbar(image, ax=ax, label="accuracy drop (points)")
    save_figure(figure, path)


def write_sensitivity_reports(out_dir, ptq, measured, traces=None, title="model", extra=None):
    """Write ``sensitivity.csv``, ``sensitivity.md``, ``sensitivity.json`` and ``sensitivity.png``
    into ``out_dir``; returns the paths by name and the rows."""
    from ..io import write_bytes_atomic

    os.makedirs(out_dir, exist_ok=True)
    scores = hessian_scores(ptq, traces, sorted({r["bits"] for r in measured["rows"]})) if traces else None
    rows = sensitivity_table(ptq, measured, scores, traces)
    correlations = _correlations(rows) if scores else {}
    files = {name: os.path.join(out_dir, f"sensitivity.{ext}")
             for name, ext in (("csv", "csv"), ("table", "md"), ("json", "json"), ("heatmap", "png"))}
    write_bytes_atomic(files["csv"], _csv_text(rows, _FIELDS).encode())
    write_bytes_atomic(files["table"], _markdown(ptq, rows, measured, correlations, title).encode())
    document = {"title": title, "baseline": measured["baseline"], "images": measured["images"],
                "layers": [info._asdict() for info in ptq.layers], "correlations": correlations,
                "hessian": None if traces is None else {k: v for k, v in traces.items() if k != "inputs"},
                **(extra or {}), "rows": rows}
    write_bytes_atomic(files["json"], (json.dumps(document, indent=1) + "\n").encode())
    draw_heatmap(files["heatmap"], ptq, rows, title)
    return files, rows
