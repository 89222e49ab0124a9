"""Training speed of the chapter-8 DeepConvNet: lowbit (numpy) against the same network in PyTorch CPU.

Both train the identical architecture (see ``lowbit.zoo.deep_convnet``) with Adam(lr=0.001),
cross-entropy, batch size 100, float32, on the same random MNIST-shaped batches, with the same number
of threads (``--threads``, default: all cores; numpy's BLAS through threadpoolctl, torch through
``torch.set_num_threads``).  Repeats alternate between the two frameworks so that both see the same
machine load; the figure is the median images per second over ``--repeats`` repeats of ``--steps``
steps each (after warm-up steps).

Goal (issue 2): lowbit at least as fast as PyTorch CPU (ratio >= 1.0).

A third contender, ``lowbit_mixed16``, trains the same network with lowbit's mixed precision
(:func:`lowbit.mixed_precision.mixed_precision_step`: float16 forward/backward, float32 master
weights, dynamic loss scaling) in the same repeats; ``ratio_mixed16_over_fp32`` is what the float16
emulation costs on numpy (a CPU has no float16 matrix units: it is there to match a GPU's numerics,
not to be fast).

If ``OPENBLAS_CORETYPE``/``OPENBLAS_L2_SIZE`` are set they slow numpy's OpenBLAS; ``--unset-openblas-env``
re-executes this script without them (for this process only) and the JSON records which BLAS
kernel numpy then used.

Writes ``experiments/results/bench_training.json``.

Usage::

    python experiments/bench_training.py              # full: 7 repeats x 20 steps
    python experiments/bench_training.py --quick      # 3 repeats x 5 steps
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def blas_info():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"note": "threadpoolctl not installed"}]
    return [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads",
                                   "filepath")} for d in threadpool_info()]


def torch_deep_convnet(torch):
    nn = torch.nn
    layers = [
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=2), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(1024, 50), nn.ReLU(), nn.Dropout(0.5), nn.Linear(50, 10),
        nn.Dropout(0.5),
    ]
    for m in layers:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--unset-openblas-env", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "bench_training.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.warmup = 5, 3, 1

    unset = []
    if args.unset_openblas_env:
        unset = [v for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if v in os.environ]
        if unset:
            env = {k: v for k, v in os.environ.items() if k not in unset}
            os.execve(sys.executable, [sys.executable] + sys.argv, env)

    from threadpoolctl import threadpool_limits
    import torch

    from lowbit.losses import SoftmaxCrossEntropy
    from lowbit.mixed_precision import LossScaler, mixed_precision_step
    from lowbit.optimizers import Adam
    from lowbit.trainer import write_json_atomic
    from lowbit.zoo import deep_convnet

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    rng = np.random.default_rng(0)
    bs = args.batch_size
    batches = [(rng.random((bs, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, bs))
               for _ in range(8)]

    model = deep_convnet(seed=0)
    loss = SoftmaxCrossEntropy()
    opt = Adam(0.001)

    def lowbit_steps(n):
        for i in range(n):
            x, y = batches[i % len(batches)]
            scores = model.forward(x, train=True)
            loss.forward(scores, y)
            model.backward(loss.backward())
            opt.step(model)

    mixed_model, mixed_loss, mixed_opt, scaler = deep_convnet(seed=0), SoftmaxCrossEntropy(), Adam(0.001), LossScaler()

    def mixed16_steps(n):
        for i in range(n):
            x, y = batches[i % len(batches)]
            mixed_precision_step(mixed_model, mixed_loss, mixed_opt, scaler, x, y, 0.001)

    tmodel = torch_deep_convnet(torch)
    tmodel.train()
    topt = torch.optim.Adam(tmodel.parameters(), lr=0.001)
    tbatches = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches]
    tloss = torch.nn.CrossEntropyLoss()

    def torch_steps(n):
        for i in range(n):
            x, y = tbatches[i % len(tbatches)]
            topt.zero_grad(set_to_none=True)
            out = tloss(tmodel(x), y)
            out.backward()
            topt.step()

    contenders = (("lowbit", lowbit_steps), ("torch", torch_steps), ("lowbit_mixed16", mixed16_steps))
    for _, fn in contenders:
        fn(args.warmup)
    rates = {name: [] for name, _ in contenders}
    for _ in range(args.repeats):
        for name, fn in contenders:
            t0 = time.perf_counter()
            fn(args.steps)
            rates[name].append(args.steps * bs / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["lowbit"] / med["torch"]
    mixed_ratio = med["lowbit_mixed16"] / med["lowbit"]
    result = {
        "benchmark": "DeepConvNet training images/s, lowbit vs PyTorch CPU",
        "batch_size": bs, "steps_per_repeat": args.steps, "repeats": args.repeats,
        "threads": args.threads, "images_per_second": rates, "median_images_per_second": med,
        "ratio_lowbit_over_torch": ratio, "goal": ">= 1.0",
        "ratio_mixed16_over_fp32": mixed_ratio, "mixed16_skipped_steps": scaler.skipped_steps,
        "unset_env": unset, "blas": blas_info(), "torch": torch.__version__, "numpy": np.__version__,
        "torch_backends": {"mkldnn": bool(torch.backends.mkldnn.is_available())},
        "machine": {"python": platform.python_version(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "loadavg_before_after": os.getloadavg()},
        "command": "python experiments/bench_training.py " + " ".join(argv or sys.argv[1:]),
    }
    write_json_atomic(args.out, result)
    print(f"lowbit {med['lowbit']:.0f} img/s, torch {med['torch']:.0f} img/s, ratio {ratio:.2f} "
          f"(goal >= 1.0); lowbit mixed16 {med['lowbit_mixed16']:.0f} img/s, {mixed_ratio:.2f}x float32 "
          f"-> {args.out}")
    return result


if __name__ == "__main__":
    from _common import run_main

    run_main(main)
