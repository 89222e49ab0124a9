"""Seconds per training step on a CUDA GPU, with the fused Adam kernel against the op-by-op update.

For three networks that train on MNIST here (the BNN paper's MLP, 3x4096, deterministic, counter draws;
``lowbit.zoo.binary_cnn``; the Bi-Real ResNet 32-64-128 with the flatten head), times
``Trainer.train_epoch`` over ``--images`` random MNIST-shaped images in batches of 100 after a warm-up
pass (kernel compilation), with ``Adam(fused=True)`` and ``Adam(fused=False)`` interleaved
``--repeats`` times in this one run, and reports the median seconds per step of each and their ratio.
The two settings compute the same values bit for bit (tests/test_backend_gpu.py); only the number of
kernel launches differs (one per parameter against about a dozen).

    python experiments/bench_gpu_step.py       # needs CuPy and a CUDA device

Writes ``runs/results/bench_gpu_step.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics

import numpy as np

from _common import command_line, default_output, environment, interleaved_step_times, output_help


def networks():
    from lowbit.zoo import binary_cnn, bireal_resnet, bnn_mlp

    return {
        "bnn_mlp_3x4096": (lambda: bnn_mlp(0, draws="counter"), "squared_hinge"),
        "binary_cnn": (lambda: binary_cnn(0), "cross_entropy"),
        "bireal_32-64-128_flatten": (lambda: bireal_resnet(0, widths=(32, 64, 128), head="flatten"),
                                     "cross_entropy"),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3000, help="images per timed pass (default 3000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per setting (default 3)")
    parser.add_argument("--output", default=default_output("results", "bench_gpu_step.json"),
                        help=output_help("results", "results JSON", "bench_gpu_step.json"))
    args = parser.parse_args(argv)
    for name in ("images", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    from lowbit.backend import cupy
    from lowbit.optimizers import Adam
    from lowbit.trainer import Trainer, write_json_atomic

    if cupy is None:
        parser.error("needs CuPy and a CUDA device (this benchmark compares two GPU code paths)")
    rng = np.random.default_rng(0)
    x = rng.random((args.images, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, args.images)
    steps = -(-args.images // 100)
    rows = {}
    for name, (build, loss) in networks().items():
        trainers = {}
        for fused in (True, False):
            trainers[fused] = Trainer(build(), loss, Adam(1e-3, fused=fused), epochs=1, batch_size=100,
                                      device="gpu", progress=False)
            trainers[fused].train_epoch(x[:300], y[:300], 1e-3)  # warm-up: kernels compile here
        times = interleaved_step_times(trainers, x, y, 1e-3, args.repeats, "gpu")
        fused, unfused = statistics.median(times[True]), statistics.median(times[False])
        params = sum(1 for _ in trainers[True].model.named_arrays(buffers=False))
        rows[name] = {"fused_s_per_step": fused, "unfused_s_per_step": unfused, "speedup": unfused / fused,
                      "parameter_arrays": params, "fused_samples": times[True], "unfused_samples": times[False]}
        print(f"{name:>26}: {unfused * 1e3:7.2f} ms/step op by op, {fused * 1e3:7.2f} ms/step fused "
              f"({params} parameter arrays): {unfused / fused:.2f}x")
    result = {"images": args.images, "repeats": args.repeats, "steps_per_pass": steps, "batch_size": 100,
              "networks": rows, "gpu": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
              "command": command_line(__file__, argv), "environment": environment()}
    write_json_atomic(args.output, result)
    return result


if __name__ == "__main__":
    from _common import run_main

    run_main(main)
