"""ONNX import and export on MNIST: models from PyTorch come in, lowbit's models go out (issue 25).

What it measures (all 10,000 MNIST test images)
-----------------------------------------------
``import``  trains a small CNN (conv-BN-ReLU-pool x 2, dense) and an MLP (784-128-128-10) with
            PyTorch (CPU, seeded, deterministic algorithms, 1 thread), exports them with
            ``torch.onnx.export`` (opset 13; the CNN with its BatchNormalization nodes kept), imports them
            with :func:`lowbit.load_onnx`, and compares lowbit's scores with onnxruntime's and torch's:
            the largest absolute difference (target <= 1e-4) and the number of equal labels (target
            10,000).  It also quantizes the imported CNN after training (W4A4 PTQ) to show the path
            "my PyTorch model, quantized by lowbit".  The two .onnx files are written to
            ``experiments/models/torch_{cnn,mlp}_mnist.onnx`` (under 1 MB each; committed), so
            ``--reuse`` imports the committed files instead of retraining.
``export``  exports with :func:`lowbit.export_onnx` the chapter-8 float model
            (``experiments/models/deep_convnet_mnist.npz``), its W4A4 post-training quantization (the
            defaults of ``lowbit quantize``: 1000 calibration images, seed 0, MSE clipping), the packed
            binary CNN (``experiments/models/bnn_cnn.npz``) and the binary Bi-Real ResNet, runs them in
            onnxruntime and counts the labels equal to lowbit's own (target 10,000 each).  The k-bit
            model is run twice: with onnxruntime's integer QDQ fusions off
            (``session.disable_quant_qdq``; the graph's float semantics, which lowbit simulates) and with
            its defaults (its fused integer kernels, which also re-quantize the float first layer's
            weights to int8, so a few labels may differ).  Round trip: ``load_onnx(export(m))`` predicts
            like ``m`` (packed model included).

Results: ``experiments/results/onnx/onnx_mnist.json``.  Exported .onnx files go to ``--work``
(default ``experiments/runs/onnx``, not committed).

Usage::

    python experiments/onnx_mnist.py             # train with torch, export, import, compare
    python experiments/onnx_mnist.py --reuse     # import the committed torch_*.onnx instead
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import _common
import lowbit
from lowbit.data import float_images, load_mnist
from lowbit.trainer import write_json_atomic

MODELS = os.path.join(_common.HERE, "models")
TORCH_FILES = {"cnn": "torch_cnn_mnist.onnx", "mlp": "torch_mlp_mnist.onnx"}


def ort_session(path, float_qdq=True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 2
    if float_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ort_scores(path, x, float_qdq=True, batch=500):
    session = ort_session(path, float_qdq)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def compare(reference, other, y):
    """Largest |difference|, equal labels, and both accuracies."""
    return {"max_abs_diff": float(np.abs(reference - other).max()),
            "labels_equal": int((reference.argmax(1) == other.argmax(1)).sum()),
            "accuracy_lowbit": float((reference.argmax(1) == y).mean()),
            "accuracy_other": float((other.argmax(1) == y).mean())}


# -- PyTorch side ------------------------------------------------------------------------------------
def torch_nets():
    import torch.nn as nn

    cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Dropout(0.25), nn.Linear(64, 10))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                        nn.Linear(128, 10))
    return {"cnn": cnn, "mlp": mlp}


def train_torch(kind, x, y, epochs, seed, quiet):
    """Train one of :func:`torch_nets` with Adam (lr 1e-3, batch 100); returns (net, seconds)."""
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    net = torch_nets()[kind]
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    generator = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        for start in tqdm(range(0, len(xt), 100), desc=f"torch {kind} epoch {epoch + 1}", disable=quiet,
                          leave=False):
            batch = order[start:start + 100]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(xt[batch]), yt[batch])
            loss.backward()
            optimizer.step()
    net.eval()
    return net, time.perf_counter() - t0


def export_torch(net, path):
    import io

    import torch

    buffer = io.BytesIO()
    # do_constant_folding=False keeps BatchNormalization as its own node (folding merges it into Conv)
    torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), buffer, dynamo=False, opset_version=13,
                      input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "n"}},
                      do_constant_folding=False)
    from lowbit.io import write_bytes_atomic

    write_bytes_atomic(path, buffer.getvalue())


def run_import(args, mnist, x_test, y_test, results):
    rows = {}
    for kind in ("cnn", "mlp"):
        path = (_common.model_input(args.models, TORCH_FILES[kind]) if args.reuse
                else os.path.join(args.models, TORCH_FILES[kind]))
        row = {"file": os.path.relpath(path, _common.HERE)}
        torch_scores = None
        if not args.reuse:
            import torch

            count = args.train_limit or len(mnist.x_train)
            net, seconds = train_torch(kind, float_images(mnist.x_train[:count]), np.asarray(mnist.y_train[:count]),
                                       args.epochs, args.seed, args.quiet)
            export_torch(net, path)
            with torch.no_grad():
                torch_scores = np.concatenate([net(torch.from_numpy(x_test[i:i + 500])).numpy()
                                               for i in range(0, len(x_test), 500)])
            row.update({"torch_epochs": args.epochs, "torch_train_seconds": round(seconds, 1),
                        "torch_version": torch.__version__})
        row["bytes"] = os.path.getsize(path)
        model = lowbit.load_onnx(path)
        row["lowbit_layers"] = [type(layer).__name__ for layer in model.layers]
        ours = model.predict_scores(x_test)
        row["lowbit_vs_onnxruntime"] = compare(ours, ort_scores(path, x_test), y_test)
        if torch_scores is not None:
            row["lowbit_vs_torch"] = compare(ours, torch_scores, y_test)
        if kind == "cnn":  # quantize the imported model (PTQ W4A4, lowbit quantize's defaults)
            twin = ptq(model, mnist)
            row["ptq_w4a4_accuracy"] = float(twin.evaluate(x_test, y_test))
        rows[kind] = row
        check = row["lowbit_vs_onnxruntime"]
        print(f"import {kind}: lowbit accuracy {check['accuracy_lowbit']:.2%}, max |lowbit - onnxruntime| "
              f"{check['max_abs_diff']:.2e}, labels equal {check['labels_equal']}/{len(y_test)}")
    results["import"] = rows


# -- export -------------------------------------------------------------------------------------------
def ptq(model, mnist, bits=4, seed=0, count=1000):
    """W{bits}A{bits} post-training quantization with ``lowbit quantize``'s defaults (its calibration
    rule, :func:`lowbit.ptq.calibration_images`: the first ``count`` training images after the
    10,000-image validation split of ``seed``)."""
    from lowbit.ptq import calibration_images

    return lowbit.post_training_quantize(model, bits, bits, calibration_images(mnist.x_train, count, seed), seed=seed)


def run_export(args, mnist, x_test, y_test, results):
    os.makedirs(args.work, exist_ok=True)
    chapter8 = lowbit.load_model(os.path.join(MODELS, "deep_convnet_mnist.npz"))
    cases = [
        ("deep_convnet_float", "experiments/models/deep_convnet_mnist.npz", chapter8),
        ("deep_convnet_ptq_w4a4", "PTQ W4A4 of experiments/models/deep_convnet_mnist.npz", ptq(chapter8, mnist)),
        ("bnn_cnn_packed", "experiments/models/bnn_cnn.npz", lowbit.load_any(os.path.join(MODELS, "bnn_cnn.npz"))),
        ("bireal_resnet_binary", "experiments/models/bireal_resnet.npz",
         lowbit.load_model(os.path.join(MODELS, "bireal_resnet.npz"))),
    ]
    rows = {}
    for name, source, model in cases:
        path = os.path.join(args.work, f"{name}.onnx")
        t0 = time.perf_counter()
        lowbit.export_onnx(model, path)
        import onnx

        ops = sorted({n.op_type for n in onnx.load(path).graph.node})
        ours = model.predict_scores(x_test)
        row = {"source": source, "onnx_bytes": os.path.getsize(path), "ops": ops,
               "onnxruntime": compare(ours, ort_scores(path, x_test), y_test)}
        if "QuantizeLinear" in ops:
            row["onnxruntime_integer_qdq_fusions"] = compare(ours, ort_scores(path, x_test, float_qdq=False), y_test)
        again = lowbit.load_onnx(path)
        row["round_trip"] = compare(ours, again.predict_scores(x_test), y_test)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows[name] = row
        check = row["onnxruntime"]
        print(f"export {name}: onnxruntime labels equal {check['labels_equal']}/{len(y_test)} "
              f"(accuracy {check['accuracy_other']:.2%}, lowbit {check['accuracy_lowbit']:.2%})"
              + (f"; round trip labels equal {row['round_trip']['labels_equal']}" if "round_trip" in row else ""))
    results["export"] = rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reuse", action="store_true",
                        help="import the committed experiments/models/torch_*.onnx instead of training them")
    parser.add_argument("--epochs", type=int, default=2, help="torch training epochs of each model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="test on the first N images only (smoke runs)")
    parser.add_argument("--train-limit", type=int, default=0, help="train torch on the first N images only")
    parser.add_argument("--work", default=os.path.join(_common.RUNS, "onnx"),
                        help="folder of the exported .onnx files (default runs/onnx)")
    parser.add_argument("--parts", nargs="+", choices=["import", "export"], default=["import", "export"])
    _common.add_output_arguments(parser, "results", "models")
    args = parser.parse_args(argv)
    import onnx
    import onnxruntime

    mnist = load_mnist(progress=not args.quiet)
    x_test, y_test = float_images(mnist.x_test), np.asarray(mnist.y_test)
    if args.limit:
        x_test, y_test = x_test[:args.limit], y_test[:args.limit]
    results = {"command": _common.command_line(__file__, argv), "environment": {
        **_common.environment(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "test_images": int(len(y_test))}
    if "import" in args.parts:
        run_import(args, mnist, x_test, y_test, results)
    if "export" in args.parts:
        run_export(args, mnist, x_test, y_test, results)
    smoke = args.limit or args.train_limit
    out = os.path.join(args.results, "onnx", "onnx_mnist.json" if not smoke else "onnx_mnist_smoke.json")
    write_json_atomic(out, results)
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
