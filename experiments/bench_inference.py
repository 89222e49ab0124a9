"""End-to-end inference speed and size of packed binary networks on the 10,000 MNIST test images.

For the binary MLP (``bnn_mlp``, 3x4096) and the binary CNN (``binary_cnn``) it times, in one run,
with the same thread count (``--threads``) and the same batch size:

* ``packed``      the lowbit PackedModel (Numba XNOR-popcount kernels, integer thresholds; the MLP's
                  binary first layer on the 8-bit pixel codes by bit planes, exactly);
* ``sim``         lowbit's float path: the trained model's own float32 simulation;
* ``torch_fp32``  the same architecture in PyTorch CPU, float32 (``bench`` extra), evaluation mode,
                  under ``torch.inference_mode``; binary activations as ``torch.sign`` after BatchNorm.

Repeats alternate between the variants (so all see the same machine load); figures are medians of
``--repeats`` passes over the test set.  It also records each packed file's size against the float32
model file.  Targets (issue 5): packed >= 10x PyTorch float32 for the MLP, >= 5x for the CNN; files
>= 25x smaller.

Models: the committed ``experiments/models/bnn_mlp_det.npz`` / ``bnn_cnn.npz`` are packed files and
have no float twin, so the trained float models are taken from ``--runs`` when present; otherwise
freshly built (untrained) networks of the same architecture are used, which time the same (the JSON
says which).  Predictions of packed and simulation are compared label for label either way.

Writes ``runs/results/bench_inference.json``.

Usage::

    python experiments/bench_inference.py              # batch 100, 5 repeats
    python experiments/bench_inference.py --quick      # 2,000 images, 2 repeats
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

import _common

HERE = os.path.dirname(os.path.abspath(__file__))


def torch_twin(torch, model):
    """A PyTorch float32 network with the same layer shapes as the lowbit model (values irrelevant)."""
    from lowbit.layers import (Affine, BatchNorm, Conv2D, Dropout, Flatten, MaxPool2D, PixelCodes, Rescale)
    from lowbit.quant_layers import QuantActivation

    nn = torch.nn

    class Sign(nn.Module):
        def forward(self, x):
            return torch.where(x >= 0, 1.0, -1.0)

    mods = []
    for layer in model.layers:
        binary_input = getattr(getattr(layer, "input_quantizer", None), "precision", 32) == 1
        if binary_input:
            mods.append(Sign())
        if isinstance(layer, Conv2D):
            mods.append(nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                  layer.stride, layer.padding, bias=layer.bias))
        elif isinstance(layer, Affine):
            if not mods or not isinstance(mods[-1], nn.Flatten):
                mods.append(nn.Flatten())
            mods.append(nn.Linear(layer.in_features, layer.out_features, bias=layer.bias))
        elif isinstance(layer, BatchNorm):
            bn = nn.BatchNorm2d if isinstance(mods[-1], (nn.Conv2d, nn.MaxPool2d)) else nn.BatchNorm1d
            mods.append(bn(layer.num_features, eps=layer.eps))
        elif isinstance(layer, MaxPool2D):
            mods.append(nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding))
        elif isinstance(layer, QuantActivation):
            mods.append(Sign())
        elif isinstance(layer, Flatten):
            mods.append(nn.Flatten())
        elif isinstance(layer, (Dropout, Rescale, PixelCodes)):
            continue
        else:
            raise TypeError(f"no PyTorch twin for {type(layer).__name__}")
    net = nn.Sequential(*mods)
    net.eval()
    return net


def load_or_build(name, runs):
    import lowbit
    from lowbit.zoo import binary_cnn, bnn_mlp

    # the paper's recipe first, then the short-run variant (glorot init) of bnn_mnist.py
    for run in (f"bnn_{name}_seed0", f"bnn_{name}_glorot_seed0"):
        path = os.path.join(runs, run, "best.npz")
        if os.path.exists(path):
            return lowbit.load_model(path), os.path.relpath(path, os.path.dirname(HERE))
    return (bnn_mlp(0) if name == "mlp_det" else binary_cnn(0)), "untrained (same architecture)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", default=_common.default_output("runs"),
                        help=_common.output_help("runs", "bnn_mnist.py's training runs, read"))
    parser.add_argument("--out", default=_common.default_output("results", "bench_inference.json"),
                        help=_common.output_help("results", "results JSON", "bench_inference.json"))
    args = parser.parse_args(argv)

    import numba
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    import lowbit
    from lowbit.data import float_images, load_mnist
    from lowbit.trainer import write_json_atomic

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    mnist = load_mnist(progress=False)
    x = float_images(mnist.x_test)
    y = mnist.y_test
    if args.quick:
        x, y, args.repeats = x[:2000], y[:2000], 2
    bs = args.batch_size

    results = {}
    for name in ("mlp_det", "cnn"):
        model, source = load_or_build(name, args.runs)
        packed = lowbit.convert(model)
        net = torch_twin(torch, model)
        xt = torch.from_numpy(x)

        def run_packed():
            return packed.predict(x, bs)

        def run_sim():
            return model.predict(x, bs)

        def run_torch():
            with torch.inference_mode():
                return np.concatenate([net(xt[i:i + bs]).argmax(1).numpy() for i in range(0, len(x), bs)])

        variants = {"packed": run_packed, "sim": run_sim, "torch_fp32": run_torch}

        for fn in variants.values():
            fn()  # warm-up (Numba compilation, allocator)
        times = {k: [] for k in variants}
        for _ in range(args.repeats):
            for key, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        ips = {k: len(x) / statistics.median(v) for k, v in times.items()}
        with tempfile.TemporaryDirectory() as tmp:
            float_bytes = os.path.getsize(lowbit.save_model(model, os.path.join(tmp, "f.npz")))
            packed_bytes = os.path.getsize(packed.save(os.path.join(tmp, "p.npz")))
        sim_labels = run_sim()
        labels_equal = int((run_packed() == sim_labels).sum())
        results[name] = {
            "model_source": source, "images": len(x), "batch_size": bs,
            "stages": [stage.kind for stage in packed.stages], "notes": packed.notes,
            "seconds": times, "images_per_second": ips,
            "ratio_packed_over_torch_fp32": ips["packed"] / ips["torch_fp32"],
            "ratio_packed_over_sim": ips["packed"] / ips["sim"],
            "packed_labels_equal_sim": labels_equal,
            "float32_file_bytes": float_bytes, "packed_file_bytes": packed_bytes,
            "size_ratio": float_bytes / packed_bytes,
        }

        print(f"{name}: packed {ips['packed']:.0f} img/s, lowbit float {ips['sim']:.0f}, torch fp32 "
              f"{ips['torch_fp32']:.0f} -> {results[name]['ratio_packed_over_torch_fp32']:.1f}x torch; "
              f"file {float_bytes / packed_bytes:.1f}x smaller; labels equal {labels_equal}/{len(x)}")

    doc = {
        "benchmark": "packed inference vs float32 (lowbit simulation, PyTorch CPU)",
        "targets": {"mlp_vs_torch_fp32": 10.0, "cnn_vs_torch_fp32": 5.0, "size_ratio": 25.0},
        "threads": args.threads, "results": results,
        "blas": [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                 for d in threadpool_info()],
        "versions": {"numpy": np.__version__, "torch": torch.__version__, "numba": numba.__version__,
                     "python": platform.python_version()},
        "loadavg": os.getloadavg(),
        "command": "python experiments/bench_inference.py " + " ".join(argv or sys.argv[1:]),
    }
    write_json_atomic(args.out, doc)
    return doc


if __name__ == "__main__":
    from _common import run_main

    run_main(main)
