"""Training speed of the BNN MLP with host-generator draws against counter draws (lowbit.draws).

For the deterministic and the stochastic MLP of the BNN paper (``lowbit.zoo.bnn_mlp``, 3 hidden
layers of ``--width``), times ``Trainer.train_epoch`` over ``--images`` random MNIST-shaped images in
batches of 100 (squared hinge, Adam 3e-3), after one warm-up pass (kernel compilation), with
``draws="generator"`` and ``draws="counter"`` interleaved ``--repeats`` times in this one run, and
reports the median seconds per step of each and the ratio generator / counter.  Also times the bare
draw of one step's values (every latent weight for the stochastic MLP) both ways.

    python experiments/bench_draws.py --device gpu      # on a CUDA GPU (the case it is for)
    python experiments/bench_draws.py --width 1024      # on this CPU, a smaller MLP

Writes ``runs/results/bench_draws_<device>.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from _common import command_line, default_output, environment, interleaved_step_times, output_help


def _sync(device):
    if device == "gpu":
        from lowbit.backend import cupy

        cupy.cuda.Device().synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--width", type=int, default=4096, help="hidden width (default 4096, the paper's)")
    parser.add_argument("--images", type=int, default=5000, help="images per timed pass (default 5000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per setting (default 3)")
    parser.add_argument("--output", default=None,
                        help=output_help("results", "results JSON, bench_draws_<device>.json in the folder"))
    args = parser.parse_args(argv)
    for name in ("width", "images", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    from lowbit.backend import cupy
    from lowbit.draws import uniform
    from lowbit.optimizers import Adam
    from lowbit.trainer import Trainer
    from lowbit.zoo import bnn_mlp

    xp = cupy if args.device == "gpu" else np
    rng = np.random.default_rng(0)
    x = rng.random((args.images, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, args.images)
    settings = [(kind, draws) for kind in ("deterministic", "stochastic") for draws in ("generator", "counter")]
    trainers = {}
    for kind, draws in settings:
        model = bnn_mlp(0, hidden=(args.width,) * 3, stochastic="weights" if kind == "stochastic" else False,
                        draws=draws)
        trainers[kind, draws] = Trainer(model, "squared_hinge", Adam(3e-3), epochs=1, batch_size=100,
                                        device=args.device, progress=False)
        trainers[kind, draws].train_epoch(x[:300], y[:300], 3e-3)  # warm-up: kernels compile here
    steps = -(-args.images // 100)
    times = interleaved_step_times(trainers, x, y, 3e-3, args.repeats, args.device)
    n_weights = 784 * args.width + 2 * args.width ** 2 + args.width * 10
    draw_times = {}
    for draws in ("generator", "counter"):
        gen = np.random.default_rng(1)
        uniform(gen, draws, (n_weights,), xp)  # warm-up
        samples = []
        for _ in range(max(3, args.repeats)):
            _sync(args.device)
            t0 = time.perf_counter()
            uniform(gen, draws, (n_weights,), xp)
            _sync(args.device)
            samples.append(time.perf_counter() - t0)
        draw_times[draws] = statistics.median(samples)

    rows = {}
    for kind in ("deterministic", "stochastic"):
        gen, cnt = (statistics.median(times[kind, d]) for d in ("generator", "counter"))
        rows[kind] = {"generator_s_per_step": gen, "counter_s_per_step": cnt, "speedup": gen / cnt,
                      "generator_samples": times[kind, "generator"], "counter_samples": times[kind, "counter"]}
        print(f"{kind:>13} MLP {args.width}: {gen * 1e3:8.2f} ms/step with generator draws, "
              f"{cnt * 1e3:8.2f} ms/step with counter draws: {gen / cnt:.2f}x")
    print(f"one step's {n_weights:,} weight draws: generator {draw_times['generator'] * 1e3:.1f} ms, "
          f"counter {draw_times['counter'] * 1e3:.1f} ms ({draw_times['generator'] / draw_times['counter']:.2f}x)")
    result = {"device": args.device, "width": args.width, "images": args.images, "repeats": args.repeats,
              "steps_per_pass": steps, "training": rows,
              "weight_draws": {"values": n_weights, "generator_s": draw_times["generator"],
                               "counter_s": draw_times["counter"],
                               "speedup": draw_times["generator"] / draw_times["counter"]},
              "gpu": (cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
                      if args.device == "gpu" else None),
              "command": command_line(__file__, argv), "environment": environment()}
    output = args.output or default_output("results", f"bench_draws_{args.device}.json")
    from lowbit.trainer import write_json_atomic

    write_json_atomic(output, result)
    return result


if __name__ == "__main__":
    from _common import run_main

    run_main(main)
