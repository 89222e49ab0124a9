"""Per-layer sensitivity, mixed-precision search and the accuracy-size Pareto front (issue 26).

For one float model (the chapter-8 CNN, ``experiments/models/deep_convnet_mnist.npz``; or SFC, the
3 x 256 MLP, trained here first when ``<models>/sfc_float.npz`` is missing) this script

1. calibrates post-training quantization once (:class:`lowbit.sensitivity.LayerwisePTQ`, 1000
   training images outside the held-out part of ``train_val_split(10000, seed 0)``: the split and
   calibration images ``lowbit sweep`` uses);
2. measures each layer's sensitivity (weights and inputs alone at 1, 2, 4, 8 bits) on 5000 held-out
   training images, and the Hutchinson Hessian traces on 500 of them: ``sensitivity.*``;
3. measures the uniform W x A grid (W, A in 1, 2, 4, 8) with the same calibration, two ways: every
   layer quantized (``uniform``) and first/last kernels kept in float with an 8-bit image
   (``uniform, first/last float``, the CNN sweep's policy);
4. chooses per-layer widths by the integer program (:func:`lowbit.mixed_search.choose_widths`) under
   size budgets (fractions of uniform W4A4's size) and BOPs budgets (fractions of W4A4's bit
   operations), quantizes, converts each to a packed model and checks its labels against the
   simulation on all 10,000 test images; one point is also fine-tuned (QAT) for a short while;
5. writes ``points.jsonl`` (every point, appended as it finishes, so a rerun continues),
   ``results.csv``, ``results.json``, ``table.md`` and ``pareto_size.png``, ``pareto_bops.png``.

Expected (issue 26): at least three mixed points strictly above the uniform front (higher test
accuracy than every uniform point of equal or smaller packed size), e.g. the CNN within 0.1 points of
uniform W4A4 at no more than 60% of its size.

    python experiments/mixed_precision.py --arch deep_convnet
    python experiments/mixed_precision.py --arch sfc
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time

import numpy as np

import _common

from lowbit.convert import convert
from lowbit.data import float_images, load_mnist, train_val_split
from lowbit.io import load_model, save_model
from lowbit.mixed_search import above_front, choose_widths, pareto_front, plot_pareto
from lowbit.sensitivity import (
    LayerwisePTQ, draw_heatmap, hessian_traces, held_out_images, measure_sensitivity, write_sensitivity_reports,
)
from lowbit.io import write_bytes_atomic

WIDTHS = (1, 2, 4, 8)
#: Size budgets as fractions of uniform W4A4's estimated size; BOPs budgets as fractions of its BOPs.
SIZE_FRACTIONS = (0.35, 0.45, 0.55, 0.6, 0.8)
BOPS_FRACTIONS = (0.3, 0.5, 1.0)


def sfc_float(path, epochs, seed, data, progress, train_images=0):
    """Train the float SFC (``lowbit.sweep.float_model("sfc")``, the sweep's recipe) on the training part of
    ``train_val_split(10000, seed)`` (its first ``train_images``; 0: all) and save it to ``path``."""
    from lowbit.optimizers import get_optimizer, get_schedule
    from lowbit.sweep import RECIPES, float_model
    from lowbit.trainer import Trainer

    model = float_model("sfc", seed)
    x_train, y_train, x_val, y_val = train_val_split(float_images(data.x_train), np.asarray(data.y_train), 10000,
                                                     seed)
    if train_images:
        x_train, y_train = x_train[:train_images], y_train[:train_images]
    lr = RECIPES["sfc"]["lr"]
    trainer = Trainer(model, "cross_entropy", get_optimizer("adam", lr=lr),
                      get_schedule("exponential", lr=lr, lr_end=lr / 100, epochs=epochs), epochs=epochs,
                      seed=seed, progress=progress)
    history = trainer.fit(x_train, y_train, x_val, y_val)
    model = trainer.model
    save_model(model, path, metadata={"arch": "sfc", "epochs": epochs, "seed": seed, "val_size": 10000,
                                      "train_images": int(len(x_train)),
                                      "val_acc": model.evaluate(x_val, y_val),
                                      "recipe": f"adam {lr} -> {lr / 100} exponential, batch 100"})
    return model, history


def evaluate_point(ptq, widths, name, packed_dir, x_test, y_test, check_packed, model=None):
    """Test accuracy, packed size, BOPs (and, with ``check_packed``, the packed model's labels against
    the simulation's) of one assignment."""
    model = model if model is not None else ptq.build(widths, name=name)
    t0 = time.perf_counter()
    packed = convert(model)
    path = os.path.join(packed_dir, f"{name}.npz")
    packed.save(path)
    simulation = model.predict(x_test)
    record = {"name": name, "widths": [list(p) for p in widths], "size_bytes": os.path.getsize(path),
              "estimated_bytes": ptq.model_bytes(widths), "bops": ptq.bops(widths),
              "average_weight_bits": sum(i.weights * w for i, (w, _) in zip(ptq.layers, widths))
              / sum(i.weights for i in ptq.layers),
              "accuracy": float((simulation == y_test).mean()), "test_images": int(len(y_test))}
    if check_packed:
        labels = packed.predict(x_test)
        record.update({"packed_accuracy": float((labels == y_test).mean()),
                       "labels_equal": int((labels == simulation).sum())})
    record["seconds"] = time.perf_counter() - t0
    return record


def load_points(path):
    points = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    record = json.loads(line)
                    points[record["name"]] = record
    return points


def append_point(path, record):
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def uniform_widths(count, wb, ab, keep):
    widths = [(wb, ab)] * count
    if keep:
        widths[0], widths[-1] = (32, 8), (32, ab)
    return widths


def table(records, w4a4, summary):
    lines = [f"# Mixed precision against the uniform grid: {summary['arch']}", "",
             f"Float model `{summary['model_file']}`: test accuracy {100 * summary['float_accuracy']:.2f}%.  "
             f"Calibration {summary['calibration_images']} training images; sensitivities on "
             f"{summary['held_out_images']} held-out training images.  Size: the packed file; BOPs: "
             "MACs x weight bits x activation bits per image.  Widths per layer as weight/activation bits.", "",
             "| point | kind | test acc. (%) | packed KiB | % of W4A4 size | M BOPs | avg. W bits | above uniform front "
             "| packed = simulation | widths |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: r["size_bytes"]):
        check = "-" if "labels_equal" not in r else f"{r['labels_equal']}/{r['test_images']}"
        above = "-" if r["kind"] == "uniform" else ("yes" if r["above_uniform_front"] else "no")
        lines.append(f"| {r['label']} | {r['kind']} | {100 * r['accuracy']:.2f} | {r['size_bytes'] / 1024:.1f} | "
                     f"{100 * r['size_bytes'] / w4a4['size_bytes']:.0f} | {r['bops'] / 1e6:.1f} | "
                     f"{r['average_weight_bits']:.2f} | {above} | {check} | "
                     + " ".join(f"{w}/{a}" for w, a in r["widths"]) + " |")
    lines += ["", f"Mixed points strictly above the uniform front (size): {summary['above_front_size']}; "
              f"(BOPs): {summary['above_front_bops']}.", ""]
    if summary.get("w4a4_claim"):
        claim = summary["w4a4_claim"]
        lines += [f"Uniform W4A4 (every layer): {100 * w4a4['accuracy']:.2f}% at {w4a4['size_bytes'] / 1024:.1f} KiB.  "
                  f"Best mixed point at <= 60% of that size: "
                  + (f"{claim['label']}, {100 * claim['accuracy']:.2f}% at {claim['size_bytes'] / 1024:.1f} KiB "
                     f"({100 * claim['size_fraction']:.0f}%), {100 * claim['difference']:+.2f} points."
                     if claim.get("label") else "none."), ""]
    lines += [f"Command: `{summary['command']}`", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("deep_convnet", "sfc"), required=True)
    parser.add_argument("--model", help="the float model (default: the committed one of --arch)")
    parser.add_argument("--sfc-epochs", type=int, default=20, help="epochs of the float SFC when it is trained here")
    parser.add_argument("--sfc-train-images", type=int, default=0,
                        help="training images of the float SFC when it is trained here (0: all 50,000)")
    parser.add_argument("--images", type=int, default=5000, help="held-out training images for the sensitivities")
    parser.add_argument("--hessian-images", type=int, default=500)
    parser.add_argument("--hessian-samples", type=int, default=8)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--finetune-images", type=int, default=10000)
    parser.add_argument("--finetune-points", nargs="+", default=[f"size{SIZE_FRACTIONS[0]:g}"],
                        help="mixed points to fine-tune (QAT), by name without 'mixed_' (e.g. size0.45)")
    parser.add_argument("--limit", type=int, default=0, help="test images (0: all 10,000); smoke runs only")
    parser.add_argument("--keep-act-bits", type=int, nargs="+", default=list(WIDTHS),
                        help="activation widths of the uniform grid with float first/last kernels")
    parser.add_argument("--calibrate", type=int, default=1000, help="calibration images")
    parser.add_argument("--part", choices=("all", "uniform", "mixed", "report"), default="all",
                        help="uniform: only the uniform grid, in reverse order, no reports; mixed: only the mixed "
                             "points, in reverse order, then the reports (both beside a full run, which has written "
                             "sensitivity.json; each skips the points another has written to points.jsonl); "
                             "report: the reports from points.jsonl and sensitivity.json alone")
    parser.add_argument("--seed", type=int, default=0)
    _common.add_output_arguments(parser, "results", "models", "runs")
    args = parser.parse_args(argv)
    progress = not args.quiet
    smoke = f"_limit{args.limit}" if args.limit else ""
    out_dir = os.path.join(args.results, f"mixed_{args.arch}{smoke}")
    packed_dir = os.path.join(args.runs, f"mixed_{args.arch}{smoke}")
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(packed_dir, exist_ok=True)
    data = load_mnist(progress=False)
    # the float model: the run's own (--models) or the committed one; a smoke run trains its own SFC
    model_name = "deep_convnet_mnist.npz" if args.arch == "deep_convnet" else "sfc_float.npz"
    model_path = args.model or (os.path.join(packed_dir, model_name) if smoke and args.arch == "sfc"
                                else _common.model_input(args.models, model_name))
    if args.arch == "sfc" and args.model is None and not os.path.exists(model_path):
        sfc_float(model_path, args.sfc_epochs, args.seed, data, progress, args.sfc_train_images)
    model = load_model(model_path)
    x_test, y_test = float_images(data.x_test), np.asarray(data.y_test)
    if args.limit:
        x_test, y_test = x_test[:args.limit], y_test[:args.limit]
    calibration, x_held, y_held = held_out_images(data, 10000, args.seed, args.calibrate, args.images)
    t0 = time.perf_counter()
    ptq = LayerwisePTQ(model, calibration, seed=args.seed)
    timings = {"calibration_seconds": time.perf_counter() - t0}

    # 1. sensitivity and Hessian (reused from sensitivity.json when it was measured with these settings)
    settings = {"model_file": os.path.basename(model_path), "images": int(len(y_held)),
                "calibration_images": int(len(calibration)), "hessian_images": args.hessian_images,
                "hessian_samples": args.hessian_samples, "seed": args.seed}
    sensitivity_json = os.path.join(out_dir, "sensitivity.json")
    previous = None
    if args.part != "uniform" and os.path.exists(sensitivity_json):
        with open(sensitivity_json, encoding="utf-8") as fh:
            previous = json.load(fh)
    if args.part == "uniform":
        rows = None
    elif previous is not None and previous.get("settings") == settings:
        rows, timings = previous["rows"], previous.get("timings", timings)
        if args.part == "report":  # the heatmap again, in the current style
            draw_heatmap(os.path.join(out_dir, "sensitivity.png"), ptq, rows, previous["title"])
    elif args.part != "all":
        raise SystemExit(f"--part {args.part} needs {sensitivity_json} written with these settings by a full run")
    else:
        t0 = time.perf_counter()
        measured = measure_sensitivity(ptq, x_held, y_held, WIDTHS, progress=progress)
        timings["sensitivity_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        count = min(args.hessian_images, len(x_held))
        traces = hessian_traces(ptq, x_held[:count], y_held[:count], samples=args.hessian_samples, seed=args.seed,
                                progress=progress)
        timings["hessian_seconds"] = time.perf_counter() - t0
        _, rows = write_sensitivity_reports(out_dir, ptq, measured, traces, title=f"{args.arch} ({model.name})",
                                            extra={"settings": settings, "timings": timings,
                                                   "command": _common.command_line(__file__, argv)})

    # 2. the uniform grid (same calibration)
    points_path = os.path.join(out_dir, "points.jsonl")
    done = load_points(points_path)
    grid = [(wb, ab, False) for wb in WIDTHS for ab in WIDTHS]
    grid += [(wb, ab, True) for wb in WIDTHS for ab in args.keep_act_bits]
    for wb, ab, keep in (grid[::-1] if args.part == "uniform" else grid if args.part == "all" else []):
        name = f"uniform_w{wb}a{ab}" + ("_keep" if keep else "")
        done = load_points(points_path)  # another process may have written it meanwhile
        if name in done:
            continue
        record = evaluate_point(ptq, uniform_widths(len(ptq.layers), wb, ab, keep), name, packed_dir, x_test, y_test,
                                check_packed=False)
        record.update({"kind": "uniform", "label": f"W{wb}A{ab}" + (" f/l float" if keep else "")})
        append_point(points_path, record)
        done[name] = record
        if progress:
            print(f"{name}: {record['accuracy']:.2%}, {record['size_bytes'] / 1024:.1f} KiB", flush=True)
    if args.part == "uniform":
        return 0
    done = load_points(points_path)

    # 3. mixed points: size budgets and BOPs budgets (fractions of uniform W4A4's estimated size and BOPs)
    w4a4_widths = uniform_widths(len(ptq.layers), 4, 4, False)
    w4a4_kib, w4a4_bops = ptq.model_bytes(w4a4_widths) / 1024, ptq.bops(w4a4_widths)
    budgets = [("size", f, dict(size_kib=f * w4a4_kib), WIDTHS) for f in SIZE_FRACTIONS]
    budgets += [("size_a4", 0.6, dict(size_kib=0.6 * w4a4_kib), (4,))]
    budgets += [("bops", f, dict(bops=f * w4a4_bops), WIDTHS) for f in BOPS_FRACTIONS]
    for kind, fraction, budget, activation_widths in (budgets[::-1] if args.part == "mixed" else budgets
                                                      if args.part == "all" else []):
        name = f"mixed_{kind}{fraction:g}"
        done = load_points(points_path)  # another process may have written it meanwhile
        if name in done:
            continue
        choice = choose_widths(ptq, rows, WIDTHS, activation_widths, "loss", **budget)
        if choice["widths"] is None:
            print(f"{name}: no assignment fits {choice['budgets']}", flush=True)
            continue
        record = evaluate_point(ptq, choice["widths"], name, packed_dir, x_test, y_test, check_packed=True)
        label = {"size": f"size <= {fraction:g} x W4A4", "size_a4": f"size <= {fraction:g} x W4A4, A4",
                 "bops": f"BOPs <= {fraction:g} x W4A4"}[kind]
        record.update({"kind": "mixed", "label": label, "budget": choice["budgets"], "solver": choice["solver"],
                       "predicted_loss_increase": choice["predicted_cost"]})
        append_point(points_path, record)
        done[name] = record
        if progress:
            print(f"{name}: {record['accuracy']:.2%}, {record['size_bytes'] / 1024:.1f} KiB, "
                  f"{record['labels_equal']}/{record['test_images']} labels equal", flush=True)

    # 4. points fine-tuned (QAT) from their PTQ models
    for point in (args.finetune_points if args.finetune_epochs and args.part != "report" else []):
        name = f"mixed_{point}_qat" + (f"{args.finetune_epochs}" if args.finetune_epochs != 1 else "")
        done = load_points(points_path)
        if name not in done and f"mixed_{point}" in done:
            from lowbit.optimizers import get_optimizer, get_schedule
            from lowbit.trainer import Trainer

            source = done[f"mixed_{point}"]
            widths = [tuple(p) for p in source["widths"]]
            quantized = ptq.build(widths, name=name)
            x_train, y_train, _, _ = train_val_split(np.asarray(data.x_train), np.asarray(data.y_train), 10000,
                                                     args.seed)
            lr = 1e-4
            trainer = Trainer(quantized, "cross_entropy", get_optimizer("adam", lr=lr),
                              get_schedule("cosine", lr=lr, epochs=args.finetune_epochs), epochs=args.finetune_epochs,
                              seed=args.seed, progress=progress)
            t0 = time.perf_counter()
            history = trainer.fit(float_images(x_train[:args.finetune_images]),
                                  np.asarray(y_train[:args.finetune_images]), x_held, y_held)
            record = evaluate_point(ptq, widths, name, packed_dir, x_test, y_test, check_packed=True,
                                    model=trainer.model)
            record.update({"kind": "mixed", "label": f"{source['label']} + QAT {args.finetune_epochs} ep.",
                           "finetune": {"epochs": args.finetune_epochs, "images": args.finetune_images, "lr": lr,
                                        "seconds": time.perf_counter() - t0, "history": history}})
            append_point(points_path, record)
            done[name] = record

    # 5. reports
    done = load_points(points_path)
    if "uniform_w4a4" not in done:
        raise SystemExit(f"uniform W4A4 is not in {points_path} yet; no reports")
    w4a4 = done["uniform_w4a4"]
    records = list(done.values())
    uniform = [r for r in records if r["kind"] == "uniform"]
    mixed = [r for r in records if r["kind"] == "mixed"]
    for r in mixed:
        r["above_uniform_front"] = above_front(r["size_bytes"], r["accuracy"], [u["size_bytes"] for u in uniform],
                                               [u["accuracy"] for u in uniform])
        r["above_uniform_front_bops"] = above_front(r["bops"], r["accuracy"], [u["bops"] for u in uniform],
                                                    [u["accuracy"] for u in uniform])
    front = pareto_front([r["size_bytes"] for r in records], [r["accuracy"] for r in records])
    for r, on in zip(records, front):
        r["on_front"] = bool(on)
    under = [r for r in mixed if r["size_bytes"] <= 0.6 * w4a4["size_bytes"]]
    best = max(under, key=lambda r: r["accuracy"]) if under else None
    summary = {
        "arch": args.arch, "model_file": os.path.basename(model_path), "float_accuracy": model.evaluate(x_test, y_test),
        "calibration_images": int(len(calibration)), "held_out_images": int(len(y_held)),
        "above_front_size": sum(r["above_uniform_front"] for r in mixed),
        "above_front_bops": sum(r["above_uniform_front_bops"] for r in mixed),
        "w4a4_claim": {} if best is None else {
            "label": best["label"], "accuracy": best["accuracy"], "size_bytes": best["size_bytes"],
            "size_fraction": best["size_bytes"] / w4a4["size_bytes"], "difference": best["accuracy"] - w4a4["accuracy"],
            "within_0.1_points": best["accuracy"] >= w4a4["accuracy"] - 0.001},
        "command": _common.command_line(__file__, argv), "environment": _common.environment(), "timings": timings,
    }
    fields = ["name", "kind", "label", "accuracy", "packed_accuracy", "labels_equal", "test_images", "size_bytes",
              "estimated_bytes", "bops", "average_weight_bits", "above_uniform_front", "above_uniform_front_bops",
              "on_front", "widths"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in sorted(records, key=lambda r: (r["kind"], r["size_bytes"])):
        writer.writerow({k: (" ".join(f"{w}/{a}" for w, a in r[k]) if k == "widths" else r.get(k, "")) for k in fields})
    write_bytes_atomic(os.path.join(out_dir, "results.csv"), buffer.getvalue().encode())
    document = {"summary": summary, "layers": [info._asdict() for info in ptq.layers], "points": records}
    write_bytes_atomic(os.path.join(out_dir, "results.json"), (json.dumps(document, indent=1) + "\n").encode())
    write_bytes_atomic(os.path.join(out_dir, "table.md"), table(records, w4a4, summary).encode())
    plot_pareto(os.path.join(out_dir, "pareto_size.png"), uniform, mixed, "size_bytes",
                f"{args.arch}: test accuracy against packed model size (PTQ, same calibration)")
    plot_pareto(os.path.join(out_dir, "pareto_bops.png"), uniform, mixed, "bops",
                f"{args.arch}: test accuracy against bit operations per image",
                x_label="bit operations per image (MACs x W bits x A bits, log scale)")
    print(table(records, w4a4, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
