"""The direct float32 convolution kernels (``lowbit.kernels.float_conv``) on the chapter-8 network's
layer shapes, against the im2col path they replace and the machine's float32 GEMM (issue 21, item 2).

For each convolution of ``lowbit.zoo.deep_convnet`` (batch ``--batch``, 3x3 kernels, 1/16/16/32/32/64
input channels) the script times, interleaved repeat by repeat so that all see the same load:

* ``direct``: forward, backward-data and backward-weights of ``lowbit.kernels.float_conv``
  (``lowbit.functions.conv2d_direct`` / ``conv2d_direct_backward``), input layout as in training
  (each layer's input an NCHW view of the previous layer's channels-last output, the first layer's
  NCHW);
* ``im2col``: the same three through ``lowbit.functions.im2col`` / ``col2im`` and numpy's SGEMM
  (the path ``Conv2D`` takes with ``lowbit.functions.use_direct_conv(False)``);
* ``torch`` (if installed): ``torch.nn.functional.conv2d`` and ``torch.nn.grad.conv2d_input`` /
  ``conv2d_weight``;
* ``sgemm``: numpy's float32 GEMM on a ``--gemm-size`` square, the machine's float32 GEMM peak
  that the issue measures the kernels against (>= 80% asked).

Figures: the fastest of ``--repeats`` repeats (what the code reaches when the shared machine lets
it) and the median, of elapsed time or, with ``--clock cpu``, of the process's CPU time (at one
thread the time the work itself took, which other processes on a shared machine do not inflate).
GFLOP/s count ``2 * N * OH * OW * O * C * KH * KW`` for the forward and backward-weights and
``2 * N * H * W * C * O * KH * KW`` for backward-data (one sum of ``O * KH * KW`` terms per input
pixel: fewer terms than the forward's when the padding is wider than ``KH // 2``).  The JSON records
the CPU model (lscpu), the BLAS kernel (threadpoolctl) and the load average before and after.  In
training, a first layer with at most a quarter vector of input channels (conv1 here) gets its
backward-data from one GEMM and col2im instead (``lowbit.functions.conv2d_direct_backward``).

Usage::

    python experiments/bench_float_conv.py                       # prints the table, threads 1 2
    python experiments/bench_float_conv.py --threads 1 --repeats 5
    python experiments/bench_float_conv.py --threads 1 --clock cpu     # on a busy machine
    python experiments/bench_float_conv.py --results             # also writes
                                                                 # experiments/results/bench_float_conv.json
    python experiments/bench_float_conv.py --results DIR         # ... into DIR instead
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from _common import blas_info, cpu_model
from bench_training import check_counts, unset_openblas_env

HERE = os.path.dirname(os.path.abspath(__file__))
# (input channels, output channels, input size, padding, input is a channels-last view) of
# deep_convnet's convolutions: all but the first get the previous convolution's channels-last output
# (through ReLU, and the max pool, which keeps the layout)
LAYERS = ((1, 16, 28, 1, False), (16, 16, 28, 1, True), (16, 32, 14, 1, True), (32, 32, 14, 2, True),
          (32, 64, 8, 1, True), (64, 64, 8, 1, True))
PASSES = ("forward", "backward_data", "backward_weights")


def direct_passes(x, w, b, dout, padding):
    from lowbit.kernels import float_conv

    cache = {}

    def forward():
        cache["x"] = float_conv.conv2d_forward(x, w, b, 1, padding)[1]

    def backward_data():
        float_conv.conv2d_backward_data(dout, w, x.shape, 1, padding)

    def backward_weights():
        float_conv.conv2d_backward_weights(dout, cache["x"], w.shape, 1)

    forward()
    return {"forward": forward, "backward_data": backward_data, "backward_weights": backward_weights}


def im2col_passes(x, w, b, dout, padding):
    """The three passes as ``Conv2D`` runs them on the im2col path (layers.py)."""
    from lowbit.functions import col2im, im2col

    o, c, k, _ = w.shape
    w2d = w.reshape(o, -1)
    col = im2col(x, k, k, 1, padding)
    col2d = col.reshape(c * k * k, -1)

    def forward():
        out = w2d @ im2col(x, k, k, 1, padding).reshape(c * k * k, -1)
        out += b[:, None]

    def backward_data():
        d = np.ascontiguousarray(dout.transpose(1, 0, 2, 3)).reshape(o, -1)
        col2im((w2d.T @ d).reshape(col.shape), x.shape, 1, padding)

    def backward_weights():
        d = np.ascontiguousarray(dout.transpose(1, 0, 2, 3)).reshape(o, -1)
        (col2d @ d.T).T.reshape(w.shape)
        d.sum(axis=1)

    return {"forward": forward, "backward_data": backward_data, "backward_weights": backward_weights}


def torch_passes(torch, x, w, b, dout, padding):
    tx, tw, tb = (torch.from_numpy(np.ascontiguousarray(a)) for a in (x, w, b))
    td = torch.from_numpy(np.ascontiguousarray(dout))
    grad = torch.nn.grad
    fn = torch.nn.functional
    with torch.no_grad():
        return {"forward": lambda: fn.conv2d(tx, tw, tb, 1, padding),
                "backward_data": lambda: grad.conv2d_input(tx.shape, tw, td, 1, padding),
                "backward_weights": lambda: (grad.conv2d_weight(tx, tw.shape, td, 1, padding), td.sum((0, 2, 3)))}


def best_and_median(times):
    return {"best_ms": 1000 * min(times), "median_ms": 1000 * statistics.median(times)}


def bench(threads, args, torch, progress):
    rng = np.random.default_rng(0)
    gemm = rng.standard_normal((args.gemm_size, args.gemm_size)).astype(np.float32)
    timers = {("sgemm", "", ""): lambda: gemm @ gemm}
    flops = {("sgemm", "", ""): 2.0 * args.gemm_size ** 3}
    for index, (c, o, size, padding, channels_last) in enumerate(LAYERS):
        x = rng.standard_normal((args.batch, c, size, size)).astype(np.float32)
        if channels_last:
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        w = (rng.standard_normal((o, c, 3, 3)) * 0.1).astype(np.float32)
        b = rng.standard_normal(o).astype(np.float32)
        out_size = size + 2 * padding - 2
        dout = rng.standard_normal((args.batch, out_size, out_size, o)).astype(np.float32).transpose(0, 3, 1, 2)
        layer = f"conv{index + 1} {c}->{o} {size}x{size} pad {padding}"
        contenders = {"direct": direct_passes(x, w, b, dout, padding),
                      "im2col": im2col_passes(x, w, b, dout, padding)}
        if torch is not None:
            contenders["torch"] = torch_passes(torch, x, w, b, dout, padding)
        for name, passes in contenders.items():
            for pass_name, fn in passes.items():
                timers[(name, layer, pass_name)] = fn
                pixels = size * size if pass_name == "backward_data" else out_size * out_size
                flops[(name, layer, pass_name)] = 2.0 * args.batch * pixels * o * c * 9
    for fn in timers.values():  # compile, warm up
        fn()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = {key: [] for key in timers}
    for _ in range(args.repeats):
        for key, fn in timers.items():
            t0 = clock()
            fn()
            times[key].append(clock() - t0)
        progress.update(1)
    peak = flops[("sgemm", "", "")] / min(times[("sgemm", "", "")]) / 1e9
    rows = []
    for key, values in times.items():
        row = {"contender": key[0], "layer": key[1], "pass": key[2], **best_and_median(values),
               "gflops_best": flops[key] / min(values) / 1e9}
        row["share_of_sgemm_peak"] = row["gflops_best"] / peak
        rows.append(row)
    totals = {}
    for row in rows:
        if row["contender"] != "sgemm":
            key = f"{row['contender']} {row['pass']}"
            totals[key] = totals.get(key, 0.0) + row["best_ms"]
    return {"threads": threads, "sgemm_gflops_best": peak, "rows": rows, "total_best_ms": totals}


def markdown(result):
    lines = [f"# {result['benchmark']}", "", f"CPU: {result['machine']['cpu_model']}; BLAS: {result['blas_kernel']}; "
             f"load average before/after: {result['machine']['loadavg_before']} / {result['machine']['loadavg_after']}",
             "", f"Command: `{result['command']}`", ""]
    for run in result["runs"]:
        lines += [f"## {run['threads']} thread(s): numpy SGEMM {result['gemm_size']}^3 "
                  f"{run['sgemm_gflops_best']:.1f} GFLOP/s (best of {result['repeats']}, {result['clock']} clock)", "",
                  "| layer | pass | direct ms | GFLOP/s | share of SGEMM | im2col ms | torch ms |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        by_key = {(r["contender"], r["layer"], r["pass"]): r for r in run["rows"]}
        for (contender, layer, pass_name), row in by_key.items():
            if contender != "direct":
                continue
            ref = by_key[("im2col", layer, pass_name)]
            torch_row = by_key.get(("torch", layer, pass_name))
            torch_ms = f"{torch_row['best_ms']:.2f}" if torch_row else "-"
            lines.append(f"| {layer} | {pass_name} | {row['best_ms']:.2f} | {row['gflops_best']:.1f} | "
                         f"{100 * row['share_of_sgemm_peak']:.0f}% | {ref['best_ms']:.2f} | {torch_ms} |")
        lines += ["", "| contender | " + " | ".join(PASSES) + " | all |", "| --- |" + " ---: |" * (len(PASSES) + 1)]
        for contender in ("direct", "im2col", "torch"):
            values = [run["total_best_ms"].get(f"{contender} {p}") for p in PASSES]
            if None in values:
                continue
            lines.append(f"| {contender} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {sum(values):.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--gemm-size", type=int, default=2048)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: the process's CPU time (time.process_time), which a "
                             "shared machine's other processes do not inflate; meaningful at 1 thread, "
                             "where it is the time the work took on its core")
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument("--results", nargs="?", const=os.path.join(HERE, "results"), default=None,
                        metavar="FOLDER",
                        help="write bench_float_conv.json and .md into FOLDER (without FOLDER: the committed "
                             "experiments/results/; without the option: print only)")
    parser.add_argument("--unset-openblas-env", action="store_true",
                        help="re-run without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (this process only)")
    args = parser.parse_args(argv)
    check_counts(parser, args, ("repeats", "batch", "gemm_size"))
    unset = unset_openblas_env(args.unset_openblas_env)

    import numba
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm


    torch = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            torch = None
    load_before = os.getloadavg()
    started = time.perf_counter()
    runs = []
    with tqdm(total=len(args.threads) * args.repeats, desc="repeats") as progress:
        for threads in args.threads:
            previous = numba.get_num_threads(), torch.get_num_threads() if torch else None
            with threadpool_limits(threads):
                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
                if torch:
                    torch.set_num_threads(threads)
                try:
                    runs.append(bench(threads, args, torch, progress))
                finally:
                    numba.set_num_threads(previous[0])
                    if torch:
                        torch.set_num_threads(previous[1])
    blas = blas_info()
    from lowbit.kernels.float_conv import LANES

    result = {
        "benchmark": "Direct float32 convolution kernels on deep_convnet's layers vs im2col + SGEMM and PyTorch",
        "batch": args.batch, "repeats": args.repeats, "gemm_size": args.gemm_size, "vector_lanes": LANES,
        "clock": args.clock,
        "runs": runs, "unset_env": unset, "blas": blas,
        "blas_kernel": ", ".join(f"{b.get('internal_api')} {b.get('version')} {b.get('architecture')}"
                                 for b in blas if b.get("internal_api") in ("openblas", "mkl", "blis")),
        "torch": torch.__version__ if torch else None, "numpy": np.__version__, "numba": numba.__version__,
        "machine": {"cpu_model": cpu_model(), "cpus": os.cpu_count(),
                    "loadavg_before": [round(v, 2) for v in load_before],
                    "loadavg_after": [round(v, 2) for v in os.getloadavg()]},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "command": "python experiments/bench_float_conv.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    table = markdown(result)
    print(table)
    if args.results:
        from lowbit.io import write_bytes_atomic, write_json_atomic

        os.makedirs(args.results, exist_ok=True)
        out = os.path.join(args.results, "bench_float_conv.json")
        write_json_atomic(out, result)
        md = os.path.splitext(out)[0] + ".md"
        write_bytes_atomic(md, table.encode())
        print(f"-> {out}, {md}")
    return result


if __name__ == "__main__":
    from _common import run_main

    run_main(main)
