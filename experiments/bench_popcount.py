"""The CPU's own XNOR-popcount limit, and each binary kernel of lowbit as a share of it.

The limit (``lowbit.kernels.tuning.popcount_peak``): every thread runs ``total += popcount(word XOR
key)`` over its own 8 KiB of L1-resident 64-bit words against 8 keys held in registers (xor,
popcount and add, vectorised by LLVM: ``vpopcntq`` on AVX-512 VPOPCNTDQ); one such step on a
64-bit word is 64 binary multiply-accumulates.  No XNOR-popcount kernel can beat it (it has to load
its operands and store its results besides), so ``kernel MAC/s / limit`` is the kernel's
efficiency on this CPU, whatever the CPU family.

The kernels, timed in the same rounds as the limit (round-robin, so that a shared machine's load
hits all alike; the kernels' medians against the best round of the limit, which load can only
lower, and the median of the per-round ratios):

* ``xnor_gemm`` M = N = K (1024 and 4096; ``--quick``: 1024 and 2048), B prepared;
* the packed MLP's layers: dense 100 x 4096 x 4096 (prepared weights) and the bit-plane first
  layer 100 x 784 x 4096 on 8-bit codes (8 planes: 8 binary MACs per weight and pixel);
* ``binary_conv2d`` 3x3, padding 1, batch 8, on daBNN's 56x56x64, 28x28x128 and 14x14x256 layers
  (prepared weights), and ``binary_conv2d_threshold`` (the packed CNN's fused step) on 28x28x128.
  With 64 channels K is 9 words, so each tile's epilogue and set-up weigh twice as much as at 128.

Each round times every kernel after one untimed call, over a batch of calls lasting at least
``MIN_BATCH_SECONDS`` (the count fixed at the warm-up): a sub-millisecond call timed alone, right
after another kernel, measures the threads' wake-up more than the kernel.  Each at 1 and 2 threads
(``--threads``).  The cache blocking is the tuned one
(``kernels/tuning.py``; the JSON records it); ``LOWBIT_TUNING=0`` times the defaults.

Target (issue 21): every kernel >= 85% of the limit.

Usage::

    python experiments/bench_popcount.py                 # about 1-2 minutes
    python experiments/bench_popcount.py --quick         # about 20 s
    python experiments/bench_popcount.py --results experiments/results   # also write bench_popcount.json

Without ``--results`` nothing is written: the table is printed.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MIN_BATCH_SECONDS = 0.05  # each kernel's timed batch of calls lasts at least this long


def kernel_cases(quick, rng):
    """``{name: (callable, binary MACs per call)}`` on random packed operands."""
    import lowbit.kernels as kernels

    def packed(rows, k):
        return kernels.pack_signs(rng.standard_normal((rows, k)).astype(np.float32))

    cases = {}
    for size in ((1024, 2048) if quick else (1024, 4096)):
        a, b = packed(size, size), kernels.prepare_gemm_weights(packed(size, size), size)
        out = np.empty((size, size), dtype=np.int32)
        cases[f"xnor_gemm {size}^3"] = (lambda a=a, b=b, k=size, out=out: kernels.xnor_gemm(a, b, k, out=out),
                                        size ** 3)
    a, b = packed(100, 4096), kernels.prepare_gemm_weights(packed(4096, 4096), 4096)
    cases["MLP dense 100x4096x4096"] = (lambda: kernels.xnor_gemm(a, b, 4096), 100 * 4096 * 4096)
    codes = rng.integers(0, 256, size=(100, 784)).astype(np.uint8)
    planes, first = kernels.pack_bitplanes(codes, 8), kernels.prepare_gemm_weights(packed(4096, 784), 784)
    cases["MLP bit-plane 100x784x4096 x8"] = (lambda: kernels.xnor_gemm_bitplanes(planes, first, 784),
                                              8 * 100 * 784 * 4096)
    for size, channels in ((56, 64), (28, 128), (14, 256)):
        x = kernels.pack_signs(rng.standard_normal((8, size, size, channels)).astype(np.float32))
        w = kernels.prepare_conv_weights(
            kernels.pack_signs(rng.standard_normal((channels, 3, 3, channels)).astype(np.float32)), channels)
        macs = 8 * size * size * channels * 9 * channels
        cases[f"binary_conv2d 8x{size}x{size}x{channels}"] = (
            lambda x=x, w=w: kernels.binary_conv2d(x, w, None, 1, 1), macs)
        if size == 28:
            threshold = rng.integers(-50, 50, size=channels).astype(np.int64)
            direction = rng.choice(np.array([-1, 1], dtype=np.int8), size=channels)
            cases[f"conv+threshold 8x{size}x{size}x{channels}"] = (
                lambda x=x, w=w: kernels.binary_conv2d_threshold(x, w, threshold, direction, None, 1, 1), macs)
    return cases


def bench_threads(threads, quick, rounds, rng):
    import numba

    from lowbit.kernels.tuning import gemm_blocking, popcount_peak

    numba.set_num_threads(threads)
    blocking = gemm_blocking()  # tunes (or reads the cache) before anything is timed
    cases = kernel_cases(quick, rng)
    # Calls per timed batch: enough for MIN_BATCH_SECONDS (a sub-millisecond call timed alone, or
    # three of them, measures the threads' wake-up more than the kernel), measured at the warm-up.
    repeats = {}
    for name, (function, _) in cases.items():
        function()  # compile / warm up
        start = time.perf_counter()
        function()
        repeats[name] = max(1, math.ceil(MIN_BATCH_SECONDS / max(time.perf_counter() - start, 1e-6)))
    limits, rates = [], {name: [] for name in cases}
    for _ in range(rounds):
        limits.append(popcount_peak(threads, repeats=5000 if quick else 20000, rounds=1)[0])
        for name, (function, macs) in cases.items():
            function()  # untimed: the call after another kernel wakes the threads and fills the caches
            start = time.perf_counter()
            for _ in range(repeats[name]):
                function()
            rates[name].append(repeats[name] * macs / (time.perf_counter() - start))
    limit = max(limits)  # a ceiling that another process's load can only lower: the best round
    kernels_out = {}
    for name, values in rates.items():
        kernels_out[name] = {
            "binary_mac_per_s": statistics.median(values),
            "share_of_limit": statistics.median(values) / limit,
            "share_of_limit_per_round_median": statistics.median(v / lim for v, lim in zip(values, limits)),
            "mac_per_s_rounds": values,
            "calls_per_round": repeats[name],
        }
    return {"threads": threads, "gemm_blocking": list(blocking), "limit_binary_mac_per_s": limit,
            "limit_rounds": limits, "kernels": kernels_out}


def machine():
    from threadpoolctl import threadpool_info

    from lowbit.kernels._intrinsics import HOST_FEATURES, TILE_COLS, TILE_ROWS
    from lowbit.kernels.tuning import cpu_model, tuning_enabled, tuning_file

    return {
        "cpu_model": cpu_model(), "logical_cpus": os.cpu_count(),
        "vpopcntdq": "avx512vpopcntdq" in HOST_FEATURES, "avx512f": "avx512f" in HOST_FEATURES,
        "tile": [TILE_ROWS, TILE_COLS],
        "tuning": {"enabled": tuning_enabled(), "file": str(tuning_file())},
        "blas": [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                 for d in threadpool_info() if d.get("user_api") == "blas"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7; --quick 3)")
    parser.add_argument("--quick", action="store_true", help="smaller GEMMs, 3 rounds (about 20 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=None, metavar="FOLDER",
                        help="write FOLDER/bench_popcount.json (default: print only)")
    args = parser.parse_args(argv)
    import numba

    from _common import command_line, environment, thread_counts

    threads = thread_counts(parser, args.threads)
    rounds = 3 if args.quick else args.rounds
    rng = np.random.default_rng(args.seed)
    load_before = list(os.getloadavg())
    info = machine()
    print(f"CPU: {info['cpu_model']} ({info['logical_cpus']} logical), tile {info['tile']}, load {load_before}, "
          f"BLAS {[b['architecture'] for b in info['blas']]}", flush=True)
    rows = []
    for count in threads:
        row = bench_threads(count, args.quick, rounds, rng)
        rows.append(row)
        print(f"\n{count} thread(s): limit {row['limit_binary_mac_per_s']:.3g} binary MAC/s "
              f"(blocking {row['gemm_blocking']})")
        for name, k in row["kernels"].items():
            print(f"  {name:34s} {k['binary_mac_per_s']:.3g} MAC/s  {100 * k['share_of_limit']:5.1f}% of the limit "
                  f"(per-round median {100 * k['share_of_limit_per_round_median']:.1f}%)", flush=True)
    doc = {
        "benchmark": "XNOR-popcount limit of the CPU and the binary kernels as a share of it",
        "target_share": 0.85, "machine": info, "environment": environment(),
        "numba_threading_layer": numba.threading_layer(), "rounds": rounds,
        "min_batch_seconds": MIN_BATCH_SECONDS,
        "load": {"before": load_before, "after": list(os.getloadavg())},
        "results": rows, "command": command_line(__file__, argv),
    }
    if args.results:
        from lowbit.trainer import write_json_atomic

        path = os.path.join(args.results, "bench_popcount.json")
        write_json_atomic(path, doc)
        print(f"wrote {path}")
    return doc


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    from _common import run_main

    run_main(main)
