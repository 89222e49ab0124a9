"""Would a bfloat16 backward pay for binary layers on this CPU?  (issue 21, item 3)

In a binary layer's backward one operand of each GEMM is +-1 and so exact in bfloat16: the input
gradient ``dx = dy @ sign(W).T`` and the weight gradient ``dW = sign(x).T @ dy``.  Only ``dy`` would be
rounded (8 significant bits instead of 24), so a bf16 backward changes the gradient's rounding, never
its sign pattern.  Before building such an option (it would need a bf16 GEMM that numpy does not have),
this script measures the two things that decide whether it is worth it:

* speed: the same GEMMs, at the shapes of ``lowbit.zoo.bnn_mlp`` (batch 100, hidden 1024 and 4096),
  in float32 through numpy (what lowbit runs today), in float32 through PyTorch and in bfloat16 through
  PyTorch (oneDNN; ``avx512_bf16``/AMX where the CPU has them), interleaved repeat by repeat; the
  medians and the median paired ratio bf16 / numpy-fp32;
* rounding: the relative error of the bf16 products against float32 (``||bf16 - fp32|| / ||fp32||``)
  with ``dy`` drawn like a real gradient (normal, scaled).

The JSON records the CPU model, its bf16 flags, numpy's BLAS kernel, torch's version and the load.
PyTorch is needed (``pip install torch``); without it the script says so and exits 2.

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


def measure(torch, name, m, k, n, repeats, inner, rng):
    # One operand is +-1 (exact in bf16), the other a gradient-like float32 array.
    if name.startswith("dx"):
        a = (rng.standard_normal((m, k)) * 1e-3).astype(np.float32)           # dy
        b = np.where(rng.random((k, n)) < 0.5, -1.0, 1.0).astype(np.float32)  # sign(W).T
    else:
        a = np.where(rng.random((m, k)) < 0.5, -1.0, 1.0).astype(np.float32)  # sign(x).T
        b = (rng.standard_normal((k, n)) * 1e-3).astype(np.float32)           # dy
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ta16, tb16 = ta.to(torch.bfloat16), tb.to(torch.bfloat16)
    contenders = {
        "numpy_fp32": lambda: np.matmul(a, b),
        "torch_fp32": lambda: torch.matmul(ta, tb),
        "torch_bf16": lambda: torch.matmul(ta16, tb16),
    }
    for fn in contenders.values():  # warm up (oneDNN primitives, page faults)
        fn()
    times = {key: [] for key in contenders}
    for _ in range(repeats):
        for key, fn in contenders.items():
            times[key].append(mean_seconds(fn, inner))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    bf16 = torch.matmul(ta16, tb16).float().numpy().astype(np.float64)
    fp32 = np.matmul(a, b).astype(np.float64)
    norm = np.linalg.norm(exact)
    ratios = [n32 / b16 for n32, b16 in zip(times["numpy_fp32"], times["torch_bf16"])]
    return {
        "gemm": name, "m": m, "k": k, "n": n,
        "median_ms": {key: 1e3 * statistics.median(v) for key, v in times.items()},
        "gflops": {key: 2e-9 * m * k * n / statistics.median(v) for key, v in times.items()},
        "bf16_speedup_over_numpy_fp32": statistics.median(ratios),
        "bf16_speedup_over_torch_fp32": statistics.median(
            t32 / b16 for t32, b16 in zip(times["torch_fp32"], times["torch_bf16"])),
        "relative_error_bf16": float(np.linalg.norm(bf16 - exact) / norm),
        "relative_error_fp32": float(np.linalg.norm(fp32 - exact) / norm),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.path.join(os.path.dirname(HERE), "runs"),
                        help="folder of the JSON (default runs/; experiments/results to rewrite the committed one)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats (default 7)")
    parser.add_argument("--inner", type=int, default=10, help="GEMMs per timed repeat (default 10)")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_bf16_backward: PyTorch is needed for its bfloat16 GEMM (pip install torch)", file=sys.stderr)
        return 2
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    runs = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        with threadpool_limits(threads):
            for name, m, k, n in shapes():
                row = measure(torch, name, m, k, n, args.repeats, args.inner, rng)
                row["threads"] = threads
                runs.append(row)
                print(f"{threads} thr  {name:<52} numpy fp32 {row['median_ms']['numpy_fp32']:7.3f} ms  "
                      f"torch bf16 {row['median_ms']['torch_bf16']:7.3f} ms  "
                      f"x{row['bf16_speedup_over_numpy_fp32']:.2f}  rel.err {row['relative_error_bf16']:.1e}",
                      flush=True)
    result = {
        "benchmark": "bench_bf16_backward",
        "command": "python experiments/bench_bf16_backward.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_model(), "cpu_bf16_flags": cpu_flags(), "blas": blas_info(),
        "torch": torch.__version__, "load_average": list(os.getloadavg()),
        "repeats": args.repeats, "inner": args.inner, "runs": runs,
    }
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, "bench_bf16_backward.json")
    from lowbit.io import write_bytes_atomic

    write_bytes_atomic(path, (json.dumps(result, indent=1) + "\n").encode())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
