"""Does a bfloat16 backward pay for binary layers on this CPU?  (issue 21, item 3)

In a binary layer's backward one operand of each GEMM is +-1 and so exact in bfloat16: the input
gradient ``dx = dy @ sign(W).T`` and the weight gradient ``dW = sign(x).T @ dy``.  Only ``dy`` is
rounded (8 significant bits instead of 24), so a bf16 backward changes the gradient's rounding, never
its sign pattern.  This script measures, in one process, interleaved repeat by repeat (so that every
contender sees the same machine load), at each thread count of ``--threads``:

* the GEMMs at the shapes of ``lowbit.zoo.bnn_mlp`` (batch 100, hidden 1024 and 4096), in the memory
  layouts the layers pass them (``W.T`` and ``x.T`` are transposed views): ``numpy_fp32`` (what lowbit
  runs with bf16 off), ``lowbit_bf16`` (``lowbit.kernels.bf16_gemm``, ``vdpbf16ps``; the rounding and
  packing of both operands included) and ``lowbit_bf16_pm1_packing``, the rounding and packing of
  the +-1 operand alone (part of ``lowbit_bf16``: for ``dx`` done inside the product's loop, tile by
  tile, for ``dW`` a pass of its own; once per step in training); with PyTorch installed also ``torch_fp32``,
  ``torch_bf16`` (oneDNN; operands converted to bfloat16 beforehand, untimed) and
  ``torch_bf16_with_cast`` (the float32 operand's conversion timed too).  Medians, the median paired
  ratio over ``numpy_fp32`` of each, and the relative error ``||product - exact|| / ||exact||``
  against float64;
* a whole training step of ``bnn_mlp(hidden=(1024,) * 3)`` (batch 100, Adam, cross entropy, random
  MNIST-shaped batches, as ``experiments/bench_training.py``): ``fp32`` (bf16 off, the default),
  ``bf16_kernel`` (``lowbit.bf16.bf16_backward()`` on ``bf16_gemm``, which in training runs on one
  Numba thread beside BLAS's, see ``lowbit.bf16.bf16_product``) and ``bf16_emulated``
  (``bf16_backward(backend="emulated")``), and at 2 or more threads ``bf16_kernel_blas_held`` (the
  step inside ``lowbit.functions.one_blas_thread()``: BLAS on one thread, the kernel on all); images
  per second and the median paired ratios over fp32.

At 2 or more threads each contender's timed GEMMs start after a pause (``--pause``), so that the
idle workers of the library timed before it have stopped spinning on the cores.

The JSON records the CPU model, its bf16 flags, the bf16 backend, numpy's BLAS kernel
(threadpoolctl), torch's version (or null) and the load average before and after.  Without PyTorch
the torch columns are left out.  Without AVX-512 BF16 the script says so and exits 2.

Usage::

    python experiments/bench_bf16_backward.py                   # writes runs/bench_bf16_backward.json
    python experiments/bench_bf16_backward.py --results experiments/results
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import blas_info, cpu_model  # noqa: E402

BATCH = 100
BNN_HIDDEN = (1024, 1024, 1024)


def shapes():
    """(name, m, k, n) of each backward GEMM of bnn_mlp at hidden 1024 and 4096 (784 inputs)."""
    out = []
    for hidden in (1024, 4096):
        out.append((f"dx hidden={hidden}: dy({BATCH}x{hidden}) @ W.T({hidden}x{hidden})", BATCH, hidden, hidden))
        out.append((f"dW hidden={hidden}: x.T({hidden}x{BATCH}) @ dy({BATCH}x{hidden})", hidden, BATCH, hidden))
        out.append((f"dW first hidden={hidden}: x.T(784x{BATCH}) @ dy({BATCH}x{hidden})", 784, BATCH, hidden))
    return out


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx"))


def mean_seconds(fn, inner):
    """Seconds per call of ``fn``, averaged over ``inner`` calls (one repeat; the medians are taken
    over repeats)."""
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def operands(name, m, k, n, rng):
    """``a``, ``b`` of one product as the layers pass them, and the +-1 array packed once per step."""
    dy_like = lambda shape: (rng.standard_normal(shape) * 1e-3).astype(np.float32)  # noqa: E731
    signs = lambda shape: np.where(rng.random(shape) < 0.5, -1.0, 1.0).astype(np.float32)  # noqa: E731
    if name.startswith("dx"):
        w = signs((n, k))  # W (in, out): b = W.T
        return dy_like((m, k)), w.T, w
    x = signs((k, m))  # x (batch, in): a = x.T
    return x.T, dy_like((k, n)), x.T


def measure(torch, name, m, k, n, repeats, inner, rng, pause):
    from lowbit.kernels import bf16_gemm
    from lowbit.kernels.bf16 import pack_bf16_rows

    a, b, pm1 = operands(name, m, k, n, rng)
    contenders = {
        "numpy_fp32": lambda: np.matmul(a, b),
        "lowbit_bf16": lambda: bf16_gemm(a, b),
        "lowbit_bf16_pm1_packing": lambda: pack_bf16_rows(pm1),
    }
    if torch is not None:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        ta16, tb16 = ta.to(torch.bfloat16), tb.to(torch.bfloat16)
        float_first = name.startswith("dx")  # dy is a in dx, b in dW; the +-1 operand is converted untimed
        contenders["torch_fp32"] = lambda: torch.matmul(ta, tb)
        contenders["torch_bf16"] = lambda: torch.matmul(ta16, tb16)
        contenders["torch_bf16_with_cast"] = (lambda: torch.matmul(ta.to(torch.bfloat16), tb16)) if float_first \
            else (lambda: torch.matmul(ta16, tb.to(torch.bfloat16)))
    for fn in contenders.values():  # warm up (compilation, oneDNN primitives, page faults)
        fn()
    times = {key: [] for key in contenders}
    for _ in range(repeats):
        for key, fn in contenders.items():
            time.sleep(pause)  # the previous library's idle workers stop spinning on the cores
            times[key].append(mean_seconds(fn, inner))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    norm = np.linalg.norm(exact)
    errors = {"numpy_fp32": np.matmul(a, b), "lowbit_bf16": bf16_gemm(a, b)}
    if torch is not None:
        errors["torch_bf16"] = torch.matmul(ta16, tb16).float().numpy()
    products = {key: v for key, v in times.items() if key != "lowbit_bf16_pm1_packing"}
    return {
        "gemm": name, "m": m, "k": k, "n": n,
        "median_ms": {key: 1e3 * statistics.median(v) for key, v in times.items()},
        "gflops": {key: 2e-9 * m * k * n / statistics.median(v) for key, v in products.items()},
        "speedup_over_numpy_fp32": {
            key: statistics.median(t32 / t for t32, t in zip(times["numpy_fp32"], v))
            for key, v in products.items() if key != "numpy_fp32"},
        "relative_error": {key: float(np.linalg.norm(p.astype(np.float64) - exact) / norm) for key, p in errors.items()},
    }


class Bf16Runner:
    """``bench_training.LowbitRunner`` (bnn_mlp, compiled kernels) with the backward in ``bf16_backward``
    on the given backend, or off (``backend=False``)."""

    def __init__(self, batches, backend, blas_held=False):
        from bench_training import LowbitRunner

        self.runner = LowbitRunner("bnn_mlp", batches, True)
        self.backend = backend
        self.blas_held = blas_held

    def steps(self, n):
        from lowbit.bf16 import bf16_backward
        from lowbit.functions import one_blas_thread

        with one_blas_thread(self.blas_held), bf16_backward(self.backend is not False, backend=self.backend or None):
            self.runner.steps(n)


def measure_training(repeats, steps, threads):
    import bench_training

    bench_training.BNN_HIDDEN = BNN_HIDDEN
    rng = np.random.default_rng(0)
    batches = [(rng.random((BATCH, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, BATCH)) for _ in range(4)]
    runners = {"fp32": Bf16Runner(batches, False), "bf16_kernel": Bf16Runner(batches, "avx512_bf16"),
               "bf16_emulated": Bf16Runner(batches, "emulated")}
    if threads > 1:  # numpy's BLAS on one thread, the kernel (and the float kernels) on all of them
        runners["bf16_kernel_blas_held"] = Bf16Runner(batches, "avx512_bf16", blas_held=True)
    for runner in runners.values():
        runner.steps(2)
    rates = {key: [] for key in runners}
    for _ in range(repeats):
        for key, runner in runners.items():
            t0 = time.perf_counter()
            runner.steps(steps)
            rates[key].append(steps * BATCH / (time.perf_counter() - t0))
    return {
        "network": f"bnn_mlp(hidden={BNN_HIDDEN}), batch {BATCH}, Adam, cross entropy",
        "steps_per_repeat": steps,
        "images_per_second": rates,
        "median_images_per_second": {key: statistics.median(v) for key, v in rates.items()},
        "median_paired_ratio_over_fp32": {
            key: statistics.median(r / f for r, f in zip(v, rates["fp32"])) for key, v in rates.items() if key != "fp32"},
    }


def set_threads(threads, torch):
    """numpy's BLAS, Numba and torch on ``threads`` threads; returns a function that restores them."""
    import numba
    from threadpoolctl import threadpool_limits

    limits = threadpool_limits(threads)
    previous_numba = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    previous_torch = None
    if torch is not None:
        previous_torch = torch.get_num_threads()
        torch.set_num_threads(threads)

    def restore():
        limits.restore_original_limits()
        numba.set_num_threads(previous_numba)
        if torch is not None:
            torch.set_num_threads(previous_torch)
    return restore


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.path.join(os.path.dirname(HERE), "runs"),
                        help="folder of the JSON (default runs/; experiments/results to rewrite the committed one)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats (default 7)")
    parser.add_argument("--inner", type=int, default=10, help="GEMMs per timed repeat (default 10)")
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed repeat (default 5)")
    parser.add_argument("--no-training", action="store_true", help="time the GEMMs only")
    parser.add_argument("--pause", type=float, default=0.2,
                        help="seconds of pause before each contender's timed calls at 2 or more threads, so that the "
                             "previous library's idle workers (OpenBLAS, OpenMP: up to about 0.1 s) stop spinning "
                             "(default 0.2)")
    args = parser.parse_args(argv)
    for name in ("repeats", "inner", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(t < 1 for t in args.threads):
        parser.error(f"--threads must be >= 1, got {args.threads}")
    from lowbit.bf16 import bf16_backend
    from lowbit.kernels import bf16_available

    if not bf16_available():
        print("bench_bf16_backward: this CPU has no AVX-512 BF16 (vdpbf16ps), or NUMBA_CPU_FEATURES leaves it out; "
              "lowbit.kernels.bf16_gemm cannot run here", file=sys.stderr)
        return 2
    try:
        import torch
    except ImportError:
        torch = None
        print("bench_bf16_backward: PyTorch not installed, its columns are left out", file=sys.stderr)
    import llvmlite.binding
    import numba
    from lowbit.kernels.bf16 import bf16_gemm_assembly

    load_before = list(os.getloadavg())
    rng = np.random.default_rng(0)
    runs, training = [], []
    for threads in args.threads:
        restore = set_threads(threads, torch)
        try:
            for name, m, k, n in shapes():
                row = measure(torch, name, m, k, n, args.repeats, args.inner, rng, args.pause if threads > 1 else 0.0)
                row["threads"] = threads
                runs.append(row)
                ms, up = row["median_ms"], row["speedup_over_numpy_fp32"]
                torch_text = f"  torch bf16 x{up['torch_bf16']:.2f}" if torch is not None else ""
                print(f"{threads} thr  {name:<52} numpy fp32 {ms['numpy_fp32']:7.3f} ms  lowbit bf16 "
                      f"{ms['lowbit_bf16']:7.3f} ms (+-1 packing {ms['lowbit_bf16_pm1_packing']:.3f})  "
                      f"x{up['lowbit_bf16']:.2f}{torch_text}", flush=True)
            if not args.no_training:
                step = measure_training(args.repeats, args.steps, threads)
                step["threads"] = threads
                training.append(step)
                print(f"{threads} thr  bnn_mlp training step: " + "  ".join(
                    f"{key} {v:.0f} img/s" for key, v in step["median_images_per_second"].items())
                    + "  bf16 kernel / fp32 x{:.2f}".format(step["median_paired_ratio_over_fp32"]["bf16_kernel"]),
                    flush=True)
        finally:
            restore()
    result = {
        "benchmark": "bench_bf16_backward",
        "command": "python experiments/bench_bf16_backward.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_model(), "cpu_bf16_flags": cpu_flags(), "bf16_backend": bf16_backend(),
        "vdpbf16ps_in_kernel": "vdpbf16ps" in bf16_gemm_assembly(),
        "llvm": ".".join(map(str, llvmlite.binding.llvm_version_info)), "numba": numba.__version__,
        "blas": blas_info(), "torch": torch.__version__ if torch is not None else None,
        "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
        "repeats": args.repeats, "inner": args.inner, "pause_seconds": args.pause, "runs": runs,
        "training_step": training,
    }
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, "bench_bf16_backward.json")
    from lowbit.io import write_bytes_atomic

    write_bytes_atomic(path, (json.dumps(result, indent=1) + "\n").encode())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
