"""The commands ``lowbit sensitivity`` and ``lowbit mixed``: load the model and MNIST, run the library
(:mod:`lowbit.sensitivity`, :mod:`lowbit.mixed_search`), write the files and say what they hold.

This is the command-line layer of the per-layer width search, the one place of it that loads data and
prints; :func:`add_mixed_commands` adds both commands to ``lowbit``'s parser.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..mixed_search import OBJECTIVES, SOLVERS, choose_widths
from ..sensitivity import (WIDTHS, LayerwisePTQ, held_out_images, hessian_traces, measure_sensitivity,
                          read_sensitivity_csv, write_sensitivity_reports)

__all__ = ["sensitivity_command", "mixed_command", "parse_fixed", "add_mixed_commands"]


def sensitivity_command(model_path, out_dir, widths=WIDTHS, images=5000, val_size=10000, seed=0, calibrate=1000,
                        hessian_images=500, hessian_samples=16, per_channel=True, batch_size=100, data=None,
                        progress=True, out=print):
    """``lowbit sensitivity``: measure and report every layer's sensitivity (see the module doc)."""
    from ..data import load_mnist  # looked up at call time: tests replace lowbit.data.load_mnist
    from ..io import load_model

    model = load_model(model_path)
    mnist = data if data is not None else load_mnist(progress=False)
    calibration, x_held, y_held = held_out_images(mnist, val_size, seed, calibrate, images)
    ptq = LayerwisePTQ(model, calibration, per_channel=per_channel, batch_size=batch_size, seed=seed)
    measured = measure_sensitivity(ptq, x_held, y_held, widths, batch_size=batch_size, progress=progress)
    traces = None
    if hessian_samples:
        count = min(int(hessian_images), len(x_held))
        traces = hessian_traces(ptq, x_held[:count], y_held[:count], samples=hessian_samples, seed=seed,
                                progress=progress)
    extra = {"model_file": os.path.basename(os.fspath(model_path)), "val_size": int(val_size), "seed": int(seed),
             "calibration_images": int(calibrate), "per_channel": bool(per_channel)}
    files, rows = write_sensitivity_reports(out_dir, ptq, measured, traces, title=model.name, extra=extra)
    with open(files["table"], encoding="utf-8") as fh:
        out(fh.read())
    out("wrote " + ", ".join(files.values()))
    return files, rows


def parse_fixed(fixed):
    """``{layer: (weight_bits, activation_bits)}`` from ``--fix`` items such as ``"0=w8a8"``."""
    out = {}
    for item in fixed or ():
        layer, _, pair = str(item).partition("=")
        try:
            w, a = pair.lower().replace("w", "").split("a")
            out[int(layer)] = (int(w), int(a))
        except ValueError:
            raise ValueError(f"--fix expects LAYER=W<bits>A<bits> (e.g. 0=w8a8), got {item!r}") from None
    return out


def mixed_command(model_path, out_path, size_kib=None, average_bits=None, bops=None, sensitivity=None,
                  objective="loss", solver="auto", weight_widths=(1, 2, 4, 8), activation_widths=(1, 2, 4, 8),
                  fixed=None, images=5000, val_size=10000, seed=0, calibrate=1000, finetune_epochs=0,
                  finetune_lr=1e-4, finetune_images=10000, limit=0, sweep_dir=None, data=None, progress=True,
                  out=print):
    """``lowbit mixed``: choose per-layer widths under a budget, quantize, optionally fine-tune, convert,
    save the packed model to ``out_path`` (and the quantized model beside it, ``*_model.npz``), and
    report its test accuracy, size, BOPs and agreement with the simulation.

    ``sensitivity`` is a CSV of :func:`lowbit.sensitivity.write_sensitivity_reports` for the same model
    and split (measured now when None).  Returns the result dict (also written as ``*.json``).
    """
    from ..convert import convert
    from ..data import float_images, load_mnist
    from ..io import load_model, save_model
    from ..trainer import write_json_atomic

    if size_kib is None and average_bits is None and bops is None:
        raise ValueError("give a budget: --budget-kib, --average-bits or --budget-bops")
    fixed = parse_fixed(fixed) if fixed and not isinstance(fixed, dict) else fixed
    model = load_model(model_path)
    mnist = data if data is not None else load_mnist(progress=False)
    calibration, x_held, y_held = held_out_images(mnist, val_size, seed, calibrate, images)
    ptq = LayerwisePTQ(model, calibration, seed=seed)
    if sensitivity is None:
        widths = sorted(set(weight_widths) | set(activation_widths))
        rows = measure_sensitivity(ptq, x_held, y_held, widths, progress=progress)["rows"]
    else:
        rows = read_sensitivity_csv(sensitivity)
    choice = choose_widths(ptq, rows, weight_widths, activation_widths, objective, size_kib, average_bits, bops,
                           solver, fixed)
    if choice["widths"] is None:
        raise ValueError(f"no choice of widths fits the budget(s) {choice['budgets']}; raise the budget or allow "
                         "narrower widths")
    widths = choice["widths"]
    quantized = ptq.build(widths)
    history = None
    if finetune_epochs:
        history = _finetune(quantized, mnist, x_held, y_held, val_size, seed, finetune_epochs, finetune_lr,
                            finetune_images, progress)
    held_accuracy = quantized.evaluate(x_held, y_held)
    x_test, y_test = float_images(mnist.x_test), np.asarray(mnist.y_test)
    if limit:
        x_test, y_test = x_test[:limit], y_test[:limit]
    packed = convert(quantized)
    metadata = {"source_file": os.path.basename(os.fspath(model_path)),
                "mixed_precision": {"widths": [list(p) for p in widths], "objective": objective,
                                    "budgets": choice["budgets"], "finetune_epochs": int(finetune_epochs)}}
    packed.save(out_path, metadata=metadata)
    stem = os.path.splitext(os.fspath(out_path))[0]
    save_model(quantized, stem + "_model.npz")
    result = _mixed_result(model_path, out_path, ptq, choice, objective, quantized, packed, x_test, y_test)
    result.update({"held_out_accuracy": held_accuracy, "held_out_images": int(len(y_held)),
                   "finetune_epochs": int(finetune_epochs)})
    if history is not None:
        result["finetune_history"] = history
    write_json_atomic(stem + ".json", result)
    out(f"widths (weight/activation bits per layer): {' '.join(f'{w}/{a}' for w, a in widths)}  "
        f"[{choice['solver']}, objective {objective}]")
    out(f"test accuracy {result['accuracy']:.2%} (simulation {result['simulation_accuracy']:.2%}, labels equal "
        f"{result['labels_equal']}/{len(y_test)}); packed {result['size_bytes'] / 1024:.1f} KiB (estimated "
        f"{result['estimated_bytes'] / 1024:.1f} KiB), {result['bops'] / 1e6:.1f} M BOPs, average weight bits "
        f"{result['average_weight_bits']:.2f}")
    if sweep_dir is not None:
        _add_to_sweep(sweep_dir, result, finetune_epochs)
    return result


def _finetune(quantized, mnist, x_held, y_held, val_size, seed, epochs, lr, images, progress):
    """QAT fine-tuning of the chosen model on the training part of the split; returns its history."""
    from ..data import float_images, train_val_split
    from ..optimizers import get_optimizer
    from ..schedules import build_schedule
    from ..trainer import Trainer

    x_train, y_train, _, _ = train_val_split(np.asarray(mnist.x_train), np.asarray(mnist.y_train),
                                             int(val_size), int(seed))
    count = min(int(images), len(x_train)) if images else len(x_train)
    trainer = Trainer(quantized, "cross_entropy", get_optimizer("adam", lr=lr),
                      build_schedule("cosine", lr, int(epochs)), epochs=int(epochs), seed=seed,
                      progress=progress)
    return trainer.fit(float_images(x_train[:count]), np.asarray(y_train[:count]), x_held, y_held)


def _mixed_result(model_path, out_path, ptq, choice, objective, quantized, packed, x_test, y_test):
    """The result record of ``lowbit mixed`` (the keys its JSON has always had, in that order)."""
    widths = choice["widths"]
    simulation = quantized.predict(x_test)
    labels = packed.predict(x_test)
    return {
        "model_file": os.path.basename(os.fspath(model_path)), "packed_file": os.path.basename(os.fspath(out_path)),
        "widths": [list(p) for p in widths], "layers": [info.path for info in ptq.layers],
        "objective": objective, "solver": choice["solver"], "optimal": choice["optimal"],
        "budgets": choice["budgets"], "predicted_cost": choice["predicted_cost"],
        "estimated_bytes": ptq.model_bytes(widths), "size_bytes": os.path.getsize(out_path),
        "bops": ptq.bops(widths), "average_weight_bits": sum(i.weights * w for i, (w, _) in zip(ptq.layers, widths))
        / sum(i.weights for i in ptq.layers),
        "held_out_accuracy": None, "held_out_images": None,
        "accuracy": float((labels == y_test).mean()), "simulation_accuracy": float((simulation == y_test).mean()),
        "labels_equal": int((simulation == labels).sum()), "test_images": int(len(y_test)),
        "finetune_epochs": None, "notes": list(packed.notes),
    }


def _add_to_sweep(sweep_dir, result, finetune_epochs):
    """Append the point to ``sweep_dir/mixed_points.jsonl`` and rewrite that sweep's reports."""
    from ..sweep import report_sweep

    line = {"label": f"mixed {result['estimated_bytes'] / 1024:.0f} KiB" + (" +QAT" if finetune_epochs else ""),
            **{k: result[k] for k in ("accuracy", "size_bytes", "bops", "widths", "objective", "model_file",
                                      "finetune_epochs")}}
    with open(os.path.join(sweep_dir, "mixed_points.jsonl"), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    report_sweep(sweep_dir)


# -- command line -------------------------------------------------------------------------------------
def _cmd_sensitivity(args):
    from ..io import check_output_path

    check_output_path(args.out, "--out", folder=True)  # before the work, not after it

    sensitivity_command(args.model, args.out, widths=args.widths, images=args.images, val_size=args.val,
                        seed=args.seed, calibrate=args.calibrate, hessian_images=args.hessian_images,
                        hessian_samples=args.hessian_samples, per_channel=not args.per_tensor,
                        progress=not args.quiet)
    return 0


def _cmd_mixed(args):
    from ..io import check_output_path

    check_output_path(args.output, "-o/--output")  # before the work, not after it
    mixed_command(args.model, args.output, size_kib=args.budget_kib, average_bits=args.average_bits,
                  bops=args.budget_bops, sensitivity=args.sensitivity, objective=args.objective, solver=args.solver,
                  weight_widths=args.weight_widths, activation_widths=args.activation_widths, fixed=args.fix,
                  images=args.images, val_size=args.val, seed=args.seed, calibrate=args.calibrate,
                  finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                  finetune_images=args.finetune_images, limit=args.limit, sweep_dir=args.sweep_dir,
                  progress=not args.quiet)
    return 0


def _split_arguments(p):
    p.add_argument("--images", type=int, default=5000,
                   help="held-out training images the sensitivities are measured on")
    p.add_argument("--val", type=int, default=10000,
                   help="the held-out part of the training set (train_val_split, as lowbit train/sweep --val)")
    p.add_argument("--calibrate", type=int, default=1000,
                   help="training images (outside the held-out part) for the activation ranges")
    p.add_argument("--seed", type=int, default=0, help="the split's and the calibration sample's seed")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_mixed_commands(sub):
    """Add ``lowbit sensitivity`` and ``lowbit mixed`` to the CLI's subparsers."""
    p = sub.add_parser("sensitivity", help="per-layer accuracy drop of each weight and activation width, "
                                           "Hessian traces; CSV, table, heatmap")
    p.add_argument("model", metavar="MODEL.npz", help="a trained float model (.npz, or .onnx)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for sensitivity.{csv,md,json,png}")
    p.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--hessian-images", type=int, default=500)
    p.add_argument("--hessian-samples", type=int, default=16, help="Rademacher vectors (0: no Hessian)")
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per layer, not per channel")
    _split_arguments(p)
    p.set_defaults(func=_cmd_sensitivity)

    p = sub.add_parser("mixed", help="per-layer weight/activation widths under a budget (integer program), "
                                     "PTQ, optional QAT, packed")
    p.add_argument("model", metavar="MODEL.npz", help="a trained float model (.npz, or .onnx)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npz", help="the packed model")
    p.add_argument("--budget-kib", type=float, help="estimated model size budget (KiB)")
    p.add_argument("--average-bits", type=float, help="average weight bits over the kernels")
    p.add_argument("--budget-bops", type=float, help="bit operations per image")
    p.add_argument("--sensitivity", metavar="CSV", help="sensitivity.csv of lowbit sensitivity (else measured)")
    p.add_argument("--objective", default="loss", choices=sorted(OBJECTIVES))
    p.add_argument("--solver", default="auto", choices=SOLVERS)
    p.add_argument("--weight-widths", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--activation-widths", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--fix", action="append", metavar="LAYER=WxAy",
                   help="keep a layer's widths, e.g. 0=w8a8 (repeatable)")
    p.add_argument("--finetune-epochs", type=int, default=0, help="QAT fine-tuning epochs after PTQ (0: none)")
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--finetune-images", type=int, default=10000, help="training images per fine-tuning epoch")
    p.add_argument("--limit", type=int, default=0, help="test on the first N test images only")
    p.add_argument("--sweep-dir", metavar="DIR", help="add the point to a sweep folder's Pareto plots")
    _split_arguments(p)
    p.set_defaults(func=_cmd_mixed)
