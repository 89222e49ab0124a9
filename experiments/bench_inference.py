"""End-to-end inference speed and size of packed binary networks on MNIST test images, and how
closely the packed pipeline keeps up with its kernels.

For the binary MLP (``bnn_mlp``, 3x4096) and the binary CNN (``binary_cnn``) it times, in one run,
at each thread count of ``--threads`` (default 1 and 2) and the same batch size:

* ``packed``      the lowbit PackedModel (Numba XNOR-popcount kernels, integer thresholds; the MLP's
                  binary first layer on the 8-bit pixel codes by bit planes, exactly; conv +
                  threshold (+ max-pool) fused into one step);
* ``kernels``     only the binary kernel calls of that pipeline (``xnor_gemm``,
                  ``xnor_gemm_bitplanes``, ``binary_conv2d``) on the same inputs with the same
                  prepared weights: what the pipeline would cost if everything between its kernels
                  were free.  ``pipeline_efficiency = kernels time / packed time``;
* ``sim``         lowbit's float path: the trained model's own float32 simulation (timed with
                  ``--time-sim``; it always runs once, for the label check);
* ``torch_fp32``  the same architecture in PyTorch CPU, float32 (``bench`` extra), evaluation mode,
                  under ``torch.inference_mode``; binary activations as ``torch.sign`` after BatchNorm.

Repeats alternate between the variants (so all see the same machine load); figures are medians of
``--repeats`` passes over ``--images`` test images.  It also records the binary MACs per image
(bit planes counted: 8 per weight of the MLP's first layer), the packed pipeline's binary MAC/s as
a share of the CPU's XNOR-popcount limit measured in the same run
(``lowbit.kernels.tuning.popcount_peak``), the CPU model, numpy's BLAS (threadpoolctl) and the
load average, and each packed file's size against the float32 model file.  Targets (issue 21):
packed >= 8x PyTorch float32 for both networks, MLP pipeline efficiency >= 80%; files >= 25x
smaller.

Models: the committed ``experiments/models/bnn_mlp_det.npz`` / ``bnn_cnn.npz`` are packed files and
have no float twin, so the trained float models are taken from ``--runs`` when present; otherwise
freshly built (untrained) networks of the same architecture are used, which time the same (the JSON
says which).  Predictions of packed and simulation are compared label for label either way.

Usage::

    python experiments/bench_inference.py                # 3,000 images, 7 repeats, 1 and 2 threads (about 1.5 min)
    python experiments/bench_inference.py --quick        # 2,000 images, 2 repeats
    python experiments/bench_inference.py --results experiments/results   # also write bench_inference.json

Without ``--results`` nothing is written: the table is printed.
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


def kernel_steps(packed, batch):
    """``(callables, binary MACs per image)``: the pipeline's binary kernel calls on the inputs the
    stages receive for ``batch``, with the stages' prepared weights (the ``kernels`` variant)."""
    from lowbit import kernels
    from lowbit.packed import BinaryConvStage, BinaryDenseStage, BitplaneDenseStage
    from lowbit.packed.binary_stages import _prepared_gemm

    steps, macs = [], 0
    value = batch
    n = batch.shape[0]
    for stage in packed.stages:
        if isinstance(stage, BitplaneDenseStage):
            planes = kernels.pack_bitplanes(stage.codes(value), stage.bits)
            weights = _prepared_gemm(stage)
            steps.append(lambda planes=planes, weights=weights, k=stage.in_features:
                         kernels.xnor_gemm_bitplanes(planes, weights, k))
            macs += stage.bits * stage.in_features * weights.shape[0]
        elif isinstance(stage, BinaryDenseStage):
            rows = np.ascontiguousarray(value.reshape(n, -1))
            weights = _prepared_gemm(stage)
            steps.append(lambda rows=rows, weights=weights, k=stage.k: kernels.xnor_gemm(rows, weights, k))
            macs += stage.in_features * weights.shape[0]
        elif isinstance(stage, BinaryConvStage):
            weights = stage._prepared_weights()
            steps.append(lambda x=value, weights=weights, stage=stage:
                         kernels.binary_conv2d(x, weights, None, stage.stride, stage.padding))
            out_channels, out_h, out_w = stage.output_spec[2]
            macs += out_h * out_w * out_channels * stage.kernel_size ** 2 * stage.input_spec[2][0]
        value = stage.run(value)
    return steps, macs


def bench_model(name, model, source, x, bs, repeats, threads, torch, time_sim):
    import lowbit

    packed = lowbit.convert(model)
    net = torch_twin(torch, model)
    xt = torch.from_numpy(x)
    steps, macs_per_image = kernel_steps(packed, x[:bs])
    batches = -(-len(x) // bs)

    def run_packed():
        return packed.predict(x, bs)

    def run_kernels():
        with packed._blas_limit("auto"):
            for _ in range(batches):
                for step in steps:
                    step()

    def run_sim():
        return model.predict(x, bs)

    def run_torch():
        with torch.inference_mode():
            return np.concatenate([net(xt[i:i + bs]).argmax(1).numpy() for i in range(0, len(x), bs)])

    variants = {"packed": run_packed, "kernels": run_kernels, "torch_fp32": run_torch}
    if time_sim:
        variants["sim"] = run_sim
    for fn in variants.values():
        fn()  # warm-up (Numba compilation, allocator)
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for key, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    ips = {k: len(x) / statistics.median(v) for k, v in times.items()}
    ratio_rounds = [t / p for t, p in zip(times["torch_fp32"], times["packed"])]
    efficiency_rounds = [k / p for k, p in zip(times["kernels"], times["packed"])]
    labels_equal = int((run_packed() == run_sim()).sum())
    with tempfile.TemporaryDirectory() as tmp:
        float_bytes = os.path.getsize(lowbit.save_model(model, os.path.join(tmp, "f.npz")))
        packed_bytes = os.path.getsize(packed.save(os.path.join(tmp, "p.npz")))
    return {
        "model_source": source, "threads": threads, "images": len(x), "batch_size": bs,
        "stages": [stage.kind for stage in packed.stages],
        "fused_steps": len(packed.stages) - len(packed._plan()), "notes": packed.notes,
        "seconds": times, "images_per_second": ips,
        "ratio_packed_over_torch_fp32": ips["packed"] / ips["torch_fp32"],
        "ratio_packed_over_torch_fp32_per_round_median": statistics.median(ratio_rounds),
        "ratio_packed_over_sim": ips["packed"] / ips["sim"] if time_sim else None,
        "pipeline_efficiency": ips["packed"] / ips["kernels"],
        "pipeline_efficiency_per_round_median": statistics.median(efficiency_rounds),
        "binary_mac_per_image": macs_per_image,
        "packed_binary_mac_per_s": macs_per_image * ips["packed"],
        "kernels_binary_mac_per_s": macs_per_image * ips["kernels"],
        "packed_labels_equal_sim": labels_equal,
        "float32_file_bytes": float_bytes, "packed_file_bytes": packed_bytes,
        "size_ratio": float_bytes / packed_bytes,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7,
                        help="interleaved rounds (default 7: with 3, the packed MLP's two-thread pipeline "
                             "efficiency read 70-85%% across runs of one day)")
    parser.add_argument("--images", type=int, default=3000, help="test images per pass (default 3,000)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--quick", action="store_true", help="2,000 images, 2 repeats")
    parser.add_argument("--time-sim", action="store_true",
                        help="also time lowbit's float simulation (slow; it always runs once for the labels)")
    parser.add_argument("--runs", default=_common.default_output("runs"),
                        help=_common.output_help("runs", "bnn_mnist.py's training runs, read"))
    parser.add_argument("--results", default=None, metavar="FOLDER",
                        help="write FOLDER/bench_inference.json (default: print only)")
    args = parser.parse_args(argv)

    import numba
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    from _common import command_line, environment
    from lowbit.data import float_images, load_mnist
    from lowbit.kernels.tuning import cpu_model, gemm_blocking, popcount_peak
    from lowbit.trainer import write_json_atomic

    thread_counts = _common.thread_counts(parser, args.threads)
    mnist = load_mnist(progress=False)
    images = 2000 if args.quick else args.images
    repeats = 2 if args.quick else args.repeats
    x = float_images(mnist.x_test[:images])
    load_before = list(os.getloadavg())
    print(f"CPU: {cpu_model()}, load {load_before}", flush=True)

    results, limits = {}, {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        threadpool_limits(threads)
        numba.set_num_threads(threads)
        # the limit is a ceiling that another process's load can only lower: the best of the rounds
        limits[threads] = {"limit_binary_mac_per_s": max(popcount_peak(threads)[1]),
                           "gemm_blocking": list(gemm_blocking())}
        for name in ("mlp_det", "cnn"):
            model, source = load_or_build(name, args.runs)
            row = bench_model(name, model, source, x, args.batch_size, repeats, threads, torch, args.time_sim)
            row["share_of_limit"] = row["packed_binary_mac_per_s"] / limits[threads]["limit_binary_mac_per_s"]
            results[f"{name}/{threads}t"] = row
            ips = row["images_per_second"]
            print(f"{name} {threads} thread(s): packed {ips['packed']:.0f} img/s, kernels alone {ips['kernels']:.0f} "
                  f"(pipeline efficiency {100 * row['pipeline_efficiency']:.0f}%), "
                  + (f"lowbit float {ips['sim']:.0f}, " if "sim" in ips else "") + f"torch fp32 {ips['torch_fp32']:.0f} -> {row['ratio_packed_over_torch_fp32']:.1f}x torch "
                  f"(per-round median {row['ratio_packed_over_torch_fp32_per_round_median']:.1f}x); "
                  f"{row['packed_binary_mac_per_s']:.3g} binary MAC/s = {100 * row['share_of_limit']:.0f}% of the "
                  f"limit; file {row['size_ratio']:.1f}x smaller; labels equal "
                  f"{row['packed_labels_equal_sim']}/{len(x)}", flush=True)

    doc = {
        "benchmark": "packed inference vs float32 (lowbit simulation, PyTorch CPU) and vs its own kernels",
        "targets": {"vs_torch_fp32": 8.0, "mlp_pipeline_efficiency": 0.8, "size_ratio": 25.0},
        "cpu_model": cpu_model(), "limits": limits, "results": results,
        "blas": [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                 for d in threadpool_info()],
        "numba_threading_layer": numba.threading_layer(),
        "versions": {"numpy": np.__version__, "torch": torch.__version__, "numba": numba.__version__,
                     "python": platform.python_version()},
        "environment": environment(),
        "load": {"before": load_before, "after": list(os.getloadavg())},
        "command": command_line(__file__, argv),
    }
    if args.results:
        path = os.path.join(args.results, "bench_inference.json")
        write_json_atomic(path, doc)
        print(f"wrote {path}")
    return doc


if __name__ == "__main__":
    from _common import run_main

    run_main(main)
