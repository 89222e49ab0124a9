"""Speed of the packed binary kernels (lowbit.kernels) against float baselines, same run, same threads.

What it measures (median of repeats; every method runs with the same number of threads: Numba's
``set_num_threads``, ``torch.set_num_threads`` and threadpoolctl's limit on numpy's BLAS):

1. GEMM ``M = N = K`` in {1024, 4096, 8192} (8192 is the size of the BinaryNet paper's kernel
   benchmark): ``xnor_gemm`` on packed operands against numpy float32 ``matmul`` and PyTorch float32
   ``mm``, each allocating its result; the same three with a preallocated output (``out=``); and the
   binary product including ``pack_signs`` of the float32 left operand (weights stay packed).
   Binary multiply-accumulates per second are ``M * N * K / time``.
2. Binary 3x3 convolution, batch 1, padding 1, on daBNN's layer suite (56x56x64, 28x28x128,
   14x14x256, 7x7x512; output channels = input channels; stride 1 and 2): ``binary_conv2d`` on packed
   NHWC activations against float32 im2col + numpy BLAS and PyTorch ``conv2d`` (NCHW).  The main
   figure uses weights prepared once (``prepare_conv_weights``), as an inference engine holds them;
   the ``_unprepared`` columns pass the packed weights, which the call then prepares itself.  Each
   timing is the mean of a batch of calls lasting at least ``CONV_BATCH_SECONDS`` after an untimed
   call (9 such batches per method in 3 round-robin rounds; the median is quoted): a call of about
   100 us timed alone right after the pause between methods measured the threads' wake-up more than
   the kernel, and moved the 56x56x64 row by a third from run to run.
3. Packing throughput: ``pack_signs`` of float32 (GB/s of float32 read), ``unpack_signs`` (GB/s of
   float32 written) and ``threshold_pack`` (GB/s of int32 read).
4. On a CUDA device (when CuPy finds one): 8192^3 ``xnor_gemm`` against cuBLAS float32 and float16
   (``cupy.matmul``), timed with CUDA events.  ``--gpu-only`` runs the GPU part alone (GEMM at 1024,
   4096 and 8192, the shared-memory stage depth ``LOWBIT_TILE_K`` in {4, 8, 16}, ``pack_signs``
   GB/s) without PyTorch or the CPU baselines, and writes ``results/bench_kernels_gpu.json``.

Targets (issue 4; 2-core AMD EPYC Zen 4 with AVX-512 VPOPCNTDQ): GEMM >= 15x PyTorch float32 and
>= 1.0e12 binary MAC/s (the ceiling here is about 1.9e12-2.4e12: xor, vpopcntq and add share two
512-bit ports per core); convolution >= 10x the float baselines; GPU >= 4x cuBLAS float32 on an H100.
Anchors: BMXNet ~10x over BLAS, Larq Compute Engine 8.5-18.5x over float on ARM.

Expected table (``python experiments/bench_kernels.py``; the committed
``experiments/results/bench_kernels.json``, 2 threads; repeated runs on this shared VM move by
10-30 %, the float baselines as much as the binary kernels)::

    GEMM M=N=K   binary      MAC/s     x torch f32   x numpy f32   (out=: x torch / x numpy)
    1024         0.5-0.8 ms  1.4-2.1e12   37-55         16-23        22-28 / 19-22
    4096         37-40 ms    1.7-1.8e12   21-25         18-20        22-29 / 20-21
    8192         261-286 ms  1.9-2.1e12   23-26         20-22        25-27 / 21-22

    3x3 conv, batch 1, pad 1      stride 1: x torch / x im2col    stride 2: x torch / x im2col
    (prepared weights; in brackets x torch with the weights prepared in each call)
    56x56x64                      13.4 (12.2) / 20.6              15.1 (13.3) / 23.5
    28x28x128                     12.2 (11.2) / 16.2              11.3 (10.4) / 21.2
    14x14x256                     25.8 (24.2) / 33.1              10.7 (11.6) / 17.9
    7x7x512                       28.5 (22.9) / 25.0              22.5 (15.3) / 21.1

    packing: pack_signs 29-44 GB/s of float32, unpack_signs 5-7 GB/s, threshold_pack 10-13 GB/s

The conv rows are the committed run (quiet machine, training jobs paused): every layer >= 10x
PyTorch.  With prepared weights (``prepare_conv_weights``: the panels and tap sums made once, as an
inference engine keeps its weights) the stride-2 layers take about 26-34 us in same-process
micro-timings, against 31-52 us when each call prepares them (about 33 us of one thread at 512
channels).  Runs differ by about 20% on this shared VM and single medians more (an earlier run had
28x28x128 stride 1 at 9.0x from one slow round of calls).  Until the batched timing (see 2.) the
pause-then-call pattern added 10-15 us per fast call that a tight loop does not see.

The run waits (up to ``--load-retries`` times) for the 1-minute load average to drop below
``--max-load``; the JSON's ``load`` entry records the load averages and the idle fraction of the
CPUs just before the run (another process on these 2 cores halves every figure).  If
``OPENBLAS_CORETYPE`` or ``OPENBLAS_L2_SIZE`` are set the script re-executes itself without them
and records which OpenBLAS kernel numpy then used (threadpoolctl).

Run: ``python experiments/bench_kernels.py`` (about 3 minutes), ``--quick`` for a short check; add
``--results experiments/results`` to write ``bench_kernels.json`` there (without it nothing is written).
The CPU's own limit and each kernel as a share of it: ``experiments/bench_popcount.py``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time

_BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_UNSET_MARKER = "LOWBIT_BENCH_UNSET_ENV"


def _reexec_without_blas_env():
    """Re-run this process without the OpenBLAS overrides; remember what was unset."""
    present = {name: os.environ[name] for name in _BLAS_ENV if name in os.environ}
    if not present:
        return
    env = {k: v for k, v in os.environ.items() if k not in _BLAS_ENV}
    env[_UNSET_MARKER] = json.dumps(present)
    print(f"re-executing without {sorted(present)} (was {present})", flush=True)
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


if __name__ == "__main__":
    _reexec_without_blas_env()

import numba  # noqa: E402
import numpy as np  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

import lowbit.kernels as kernels  # noqa: E402
from lowbit.backend import cupy  # noqa: E402
from lowbit.kernels._intrinsics import HOST_FEATURES, LANES, TILE_COLS, TILE_ROWS  # noqa: E402

import _common  # noqa: E402

RESULTS = _common.default_output("results", "bench_kernels.json")
DABNN_LAYERS = [(56, 64), (28, 128), (14, 256), (7, 512)]  # (height = width, channels)
TARGETS = {
    "gemm_vs_torch_float32": 15.0,
    "binary_mac_per_s": 1.0e12,
    "conv_vs_float": 10.0,
    "gpu_vs_cublas_float32": 4.0,
}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def measure(methods, repeats, rounds=3, pause=0.05, min_batch_s=0.0):
    """Median seconds per call of each method.

    ``methods`` maps a name to a zero-argument callable.  Each method is warmed up once, then run
    ``repeats`` times split over ``rounds`` round-robin passes (so slow drifts of the machine hit
    every method alike); a short pause between methods lets the idle threads of the previous
    runtime (Numba's and PyTorch's OpenMP pools) stop spinning.

    With ``min_batch_s`` each of the ``repeats`` timings is instead the mean of a batch of calls
    lasting at least that long (the count fixed at the warm-up), after one untimed call: a call of
    about 100 us timed alone right after the pause measures the threads' wake-up more than the
    kernel (as in ``bench_popcount.py``), and a batch is what a loop of inference calls sees.
    """
    counts = {}
    for name, function in methods.items():
        function()
        start = time.perf_counter()
        function()
        elapsed = time.perf_counter() - start
        counts[name] = max(1, math.ceil(min_batch_s / max(elapsed, 1e-7))) if min_batch_s else 1
    times = {name: [] for name in methods}
    per_round = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(rounds)]
    for count in per_round:
        for name, function in methods.items():
            time.sleep(pause)
            if min_batch_s:
                function()  # untimed: wakes the threads after the pause
            for _ in range(count):
                start = time.perf_counter()
                for _ in range(counts[name]):
                    function()
                times[name].append((time.perf_counter() - start) / counts[name])
    return {
        name: {"median_s": float(np.median(t)), "min_s": float(np.min(t)), "times_s": [float(x) for x in t],
               "calls_per_timing": counts[name]}
        for name, t in times.items()
    }


def cpu_idle_fraction(seconds=2.0):
    """Fraction of CPU time idle over the next ``seconds`` (from /proc/stat; None elsewhere)."""
    def sample():
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except OSError:
        return None
    return (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_quiet(max_load, retries, wait_s):
    """Wait until the 1-minute load average is below ``max_load`` (at most ``retries`` waits)."""
    history = []
    for attempt in range(retries + 1):
        load = os.getloadavg()
        history.append({"time": time.time(), "loadavg": list(load)})
        if load[0] <= max_load:
            return history, True
        if attempt < retries:
            print(f"load average {load[0]:.2f} > {max_load}: waiting {wait_s:.0f} s "
                  f"({attempt + 1}/{retries})", flush=True)
            time.sleep(wait_s)
    return history, False


# ---------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------


def bench_gemm(size, repeats, rng, torch):
    a_float = rng.standard_normal((size, size), dtype=np.float32)
    b_float = rng.standard_normal((size, size), dtype=np.float32)
    a_packed, b_packed = kernels.pack_signs(a_float), kernels.pack_signs(b_float)
    b_transposed = np.ascontiguousarray(b_float.T)
    binary_out = np.empty((size, size), dtype=np.int32)
    float_out = np.empty((size, size), dtype=np.float32)
    a_torch, b_torch = torch.from_numpy(a_float), torch.from_numpy(b_float)
    torch_out = torch.empty((size, size), dtype=torch.float32)
    float_repeats = max(3, repeats // 4) if size <= 4096 else 3
    binary = measure(
        {
            "binary_xnor_gemm": lambda: kernels.xnor_gemm(a_packed, b_packed, size),
            "binary_xnor_gemm_out": lambda: kernels.xnor_gemm(a_packed, b_packed, size, out=binary_out),
            "binary_pack_a_and_gemm": lambda: kernels.xnor_gemm(kernels.pack_signs(a_float), b_packed, size),
        },
        repeats,
    )
    floats = measure(
        {
            "numpy_float32_matmul": lambda: a_float @ b_transposed,
            "numpy_float32_matmul_out": lambda: np.matmul(a_float, b_transposed, out=float_out),
            "torch_float32_mm": lambda: torch.mm(a_torch, b_torch.t()),
            "torch_float32_mm_out": lambda: torch.mm(a_torch, b_torch.t(), out=torch_out),
        },
        float_repeats,
        rounds=min(3, float_repeats),
    )
    timings = {**binary, **floats}
    macs = float(size) ** 3
    t = {name: value["median_s"] for name, value in timings.items()}
    ratios = {
        "vs_torch_float32": t["torch_float32_mm"] / t["binary_xnor_gemm"],
        "vs_numpy_float32": t["numpy_float32_matmul"] / t["binary_xnor_gemm"],
        "vs_torch_float32_out": t["torch_float32_mm_out"] / t["binary_xnor_gemm_out"],
        "vs_numpy_float32_out": t["numpy_float32_matmul_out"] / t["binary_xnor_gemm_out"],
        "vs_torch_float32_including_pack": t["torch_float32_mm"] / t["binary_pack_a_and_gemm"],
    }
    rates = {
        "binary_mac_per_s": macs / t["binary_xnor_gemm"],
        "binary_mac_per_s_out": macs / t["binary_xnor_gemm_out"],
        "torch_float32_mac_per_s": macs / t["torch_float32_mm"],
        "numpy_float32_mac_per_s": macs / t["numpy_float32_matmul"],
    }
    return {"size": size, "timings": timings, "ratios": ratios, "rates": rates}


def im2col_conv(x, w_matrix, kernel, stride, padding):
    """Float32 convolution as im2col (NCHW, batch 1) + one BLAS matmul; returns (O, OH * OW)."""
    channels = x.shape[1]
    padded = np.pad(x[0], ((0, 0), (padding, padding), (padding, padding)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kernel, kernel), axis=(1, 2))
    windows = windows[:, ::stride, ::stride]
    columns = windows.transpose(0, 3, 4, 1, 2).reshape(channels * kernel * kernel, -1)  # copies
    return w_matrix @ columns


# Each timing of a batch-1 convolution is the mean of a batch of calls lasting at least this long.
CONV_BATCH_SECONDS = 0.05


def bench_conv(size, channels, stride, repeats, rng, torch):
    x = rng.standard_normal((1, channels, size, size), dtype=np.float32)
    w = rng.standard_normal((channels, channels, 3, 3), dtype=np.float32)
    x_packed = kernels.pack_signs(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
    w_packed = kernels.pack_signs(np.ascontiguousarray(w.transpose(0, 2, 3, 1)))
    w_matrix = np.ascontiguousarray(w.reshape(channels, -1))
    x_torch, w_torch = torch.from_numpy(x), torch.from_numpy(w)
    threshold = np.zeros(channels, dtype=np.int64)
    direction = np.ones(channels, dtype=np.int8)

    def torch_conv():
        with torch.no_grad():
            return torch.nn.functional.conv2d(x_torch, w_torch, stride=stride, padding=1)

    prepared = kernels.prepare_conv_weights(w_packed, channels)

    def binary_conv():
        return kernels.binary_conv2d(x_packed, prepared, channels, stride=stride, padding=1)

    timings = measure(
        {
            "binary_conv2d_prepared": binary_conv,
            "binary_conv2d_unprepared": lambda: kernels.binary_conv2d(
                x_packed, w_packed, channels, stride=stride, padding=1
            ),
            "binary_conv2d_threshold_pack": lambda: kernels.threshold_pack(
                binary_conv(), threshold, direction
            ),
            "float32_im2col_blas": lambda: im2col_conv(x, w_matrix, 3, stride, 1),
            "torch_float32_conv2d": torch_conv,
        },
        repeats,
        min_batch_s=CONV_BATCH_SECONDS,
    )
    t = {name: value["median_s"] for name, value in timings.items()}
    out_size = (size + 2 - 3) // stride + 1
    macs = float(out_size * out_size * channels * channels * 9)
    binary, unprepared = t["binary_conv2d_prepared"], t["binary_conv2d_unprepared"]
    return {
        "layer": f"{size}x{size}x{channels}",
        "stride": stride,
        "macs": macs,
        "timings": timings,
        "ratios": {
            "vs_torch_conv2d": t["torch_float32_conv2d"] / binary,
            "vs_im2col_blas": t["float32_im2col_blas"] / binary,
            "vs_torch_conv2d_unprepared": t["torch_float32_conv2d"] / unprepared,
            "vs_im2col_blas_unprepared": t["float32_im2col_blas"] / unprepared,
            "with_threshold_vs_torch_conv2d": t["torch_float32_conv2d"] / t["binary_conv2d_threshold_pack"],
        },
        "binary_mac_per_s": macs / binary,
    }


def bench_packing(rows, columns, repeats, rng):
    x = rng.standard_normal((rows, columns), dtype=np.float32)
    packed = kernels.pack_signs(x)
    acc = rng.integers(-1000, 1000, size=(rows, columns), dtype=np.int32)
    threshold = rng.integers(-10, 10, size=columns).astype(np.int64)
    direction = np.ones(columns, dtype=np.int8)
    timings = measure(
        {
            "pack_signs_float32": lambda: kernels.pack_signs(x),
            "unpack_signs_float32": lambda: kernels.unpack_signs(packed, columns),
            "threshold_pack_int32": lambda: kernels.threshold_pack(acc, threshold, direction),
        },
        repeats,
    )
    nbytes = float(x.nbytes)
    return {
        "shape": [rows, columns],
        "timings": timings,
        "gb_per_s": {name: nbytes / value["median_s"] / 1e9 for name, value in timings.items()},
    }


def gpu_time(function, repeats):
    """Median of ``repeats`` CUDA-event timings of ``function()`` after one warm-up call."""
    function()
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        function()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return {"median_s": float(np.median(times)), "times_s": times}


def gpu_device():
    """Name, multiprocessors and clock of the current CUDA device, and the 64-bit popcount ceiling."""
    properties = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = properties["name"]
    sms, clock_hz = properties["multiProcessorCount"], properties["clockRate"] * 1e3
    return {
        "device": name.decode() if isinstance(name, bytes) else str(name),
        "compute_capability": f"{properties['major']}.{properties['minor']}",
        "multiprocessors": sms,
        "max_clock_hz": clock_hz,
        # 16 32-bit POPC per clock per multiprocessor (compute capability 7.x-9.0, CUDA programming
        # guide's throughput table): 8 64-bit words per clock, the bound of an XNOR-popcount GEMM.
        "popc64_words_per_s_ceiling": sms * clock_hz * 8,
        "cupy_tf32": os.environ.get("CUPY_TF32", "0"),
    }


def bench_gpu(size, repeats):
    if cupy is None:
        return {"available": False}
    rng = np.random.default_rng(0)
    a_packed = cupy.asarray(kernels.pack_signs(rng.standard_normal((size, size), dtype=np.float32)))
    b_packed = cupy.asarray(kernels.pack_signs(rng.standard_normal((size, size), dtype=np.float32)))
    a32 = cupy.asarray(rng.standard_normal((size, size), dtype=np.float32))
    b32 = cupy.asarray(rng.standard_normal((size, size), dtype=np.float32))
    a16, b16 = a32.astype(cupy.float16), b32.astype(cupy.float16)

    timings = {
        "binary_xnor_gemm": gpu_time(lambda: kernels.xnor_gemm(a_packed, b_packed, size), repeats),
        "cublas_float32": gpu_time(lambda: cupy.matmul(a32, b32), repeats),
        "cublas_float16": gpu_time(lambda: cupy.matmul(a16, b16), repeats),
    }
    t = {name: value["median_s"] for name, value in timings.items()}
    device = gpu_device()
    words_per_s = float(size) ** 2 * a_packed.shape[1] / t["binary_xnor_gemm"]
    return {
        "available": True,
        **device,
        "size": size,
        "timings": timings,
        "ratios": {"vs_cublas_float32": t["cublas_float32"] / t["binary_xnor_gemm"],
                   "vs_cublas_float16": t["cublas_float16"] / t["binary_xnor_gemm"]},
        "binary_mac_per_s": float(size) ** 3 / t["binary_xnor_gemm"],
        "cublas_float32_flop_per_s": 2 * float(size) ** 3 / t["cublas_float32"],
        "fraction_of_popc_ceiling": words_per_s / device["popc64_words_per_s_ceiling"],
    }


def bench_gpu_tile_k(size, repeats, tile_ks=(4, 8, 16)):
    """xnor_gemm.cu built with each ``LOWBIT_TILE_K`` (words of K per shared-memory stage): equal
    output to the shipped build, and its time.  Says whether the shipped value is the right one."""
    from lowbit.kernels import _cuda as cuda_path

    rng = np.random.default_rng(1)
    a = cupy.asarray(kernels.pack_signs(rng.standard_normal((size, size), dtype=np.float32)))
    b = cupy.asarray(kernels.pack_signs(rng.standard_normal((size, size), dtype=np.float32)))
    reference = kernels.xnor_gemm(a, b, size)
    source = (cuda_path.SOURCE_DIR / "xnor_gemm.cu").read_text()
    grid = ((size + cuda_path._GEMM_TILE - 1) // cuda_path._GEMM_TILE,) * 2
    rows = []
    for tile_k in tile_ks:
        function = cupy.RawModule(code=source, options=(f"-DLOWBIT_TILE_K={tile_k}",)).get_function("xnor_gemm")
        out = cupy.empty((size, size), dtype=np.int32)

        def run():
            function(grid, (cuda_path._GEMM_THREADS,),
                     (a, b, out, np.int64(size), np.int64(size), np.int64(a.shape[1]), np.int32(size)))

        timing = gpu_time(run, repeats)
        rows.append({"tile_k": tile_k, "equal_to_shipped": bool((out == reference).all()), **timing})
    return rows


def bench_gpu_packing(rows, columns, repeats):
    """pack_signs on the GPU: GB/s of float32 read."""
    values = cupy.asarray(np.random.default_rng(2).standard_normal((rows, columns), dtype=np.float32))
    timing = gpu_time(lambda: kernels.pack_signs(values), repeats)
    return {"shape": [rows, columns], **timing, "gb_per_s": values.nbytes / timing["median_s"] / 1e9}


def main_gpu(args):
    """``--gpu-only``: the GPU part alone (no PyTorch, no CPU baselines), for the lent GPU machines."""
    if cupy is None:
        raise SystemExit("--gpu-only needs CuPy and a CUDA device; lowbit.backend found none")
    started = time.time()
    sizes = [1024, 2048] if args.quick else [1024, 4096, 8192]
    repeats = 5 if args.quick else 20
    gemm = []
    for size in sizes:
        row = bench_gpu(size, repeats)
        gemm.append(row)
        t, r = {k: v["median_s"] * 1e3 for k, v in row["timings"].items()}, row["ratios"]
        print(f"GPU GEMM {size}^3 on {row['device']}: binary {t['binary_xnor_gemm']:.3f} ms "
              f"({row['binary_mac_per_s']:.3g} MAC/s, {row['fraction_of_popc_ceiling']:.0%} of the popcount "
              f"ceiling), cuBLAS f32 {t['cublas_float32']:.3f} ms ({row['cublas_float32_flop_per_s'] / 1e12:.1f} "
              f"TFLOP/s), f16 {t['cublas_float16']:.3f} ms -> {r['vs_cublas_float32']:.2f}x f32, "
              f"{r['vs_cublas_float16']:.2f}x f16", flush=True)
    tile_k = bench_gpu_tile_k(sizes[-1], repeats)
    for row in tile_k:
        print(f"  xnor_gemm.cu with LOWBIT_TILE_K={row['tile_k']}: {row['median_s'] * 1e3:.3f} ms, "
              f"output equal to the shipped build: {row['equal_to_shipped']}", flush=True)
    packing = bench_gpu_packing(8192 if not args.quick else 2048, 8192, repeats)
    print(f"GPU pack_signs float32 {packing['shape']}: {packing['gb_per_s']:.0f} GB/s", flush=True)
    largest = max(gemm, key=lambda row: row["size"])
    summary = {
        "device": largest["device"],
        "gemm_ratio_vs_cublas_float32": {row["size"]: round(row["ratios"]["vs_cublas_float32"], 2) for row in gemm},
        "gemm_ratio_vs_cublas_float16": {row["size"]: round(row["ratios"]["vs_cublas_float16"], 2) for row in gemm},
        "gemm_binary_mac_per_s": {row["size"]: float(f"{row['binary_mac_per_s']:.3g}") for row in gemm},
        "gemm_fraction_of_popc_ceiling": {row["size"]: round(row["fraction_of_popc_ceiling"], 3) for row in gemm},
        "pack_gb_per_s": round(packing["gb_per_s"], 1),
        "targets_met": {"gpu_vs_cublas_float32": largest["ratios"]["vs_cublas_float32"]
                        >= TARGETS["gpu_vs_cublas_float32"]},
    }
    result = {
        "script": "experiments/bench_kernels.py",
        "arguments": vars(args),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": machine_info(),
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "cupy": cupy.__version__,
                     "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
                     "cuda_driver": cupy.cuda.runtime.driverGetVersion()},
        "targets": {"gpu_vs_cublas_float32": TARGETS["gpu_vs_cublas_float32"]},
        "summary": summary,
        "gemm": gemm,
        "tile_k": tile_k,
        "packing": packing,
    }
    print(json.dumps(summary, indent=1))
    _write(args, result, "_gpu_quick.json" if args.quick else "_gpu.json")
    return result


def _write(args, result, suffix):
    """Write ``result`` to ``--output``, or ``--results``/bench_kernels<suffix>; neither: nothing."""
    if args.output:
        output = args.output
    elif args.results:
        output = os.path.join(args.results, os.path.basename(RESULTS).replace(".json", suffix))
    else:
        return
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as handle:
        json.dump(result, handle, indent=1)
    print(f"wrote {output}")


# ---------------------------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------------------------


def machine_info():
    model, flags = platform.processor(), []
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    break
    except OSError:
        pass
    relevant = ["popcnt", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vpopcntdq", "avx512_bitalg"]
    return {
        "platform": platform.platform(),
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "cpu_flags": {flag: flag in flags for flag in relevant},
        "llvm_host_features": sorted(f for f in HOST_FEATURES if "avx512" in f or f in ("popcnt", "avx2")),
    }


def versions(torch):
    import llvmlite

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "llvmlite": llvmlite.__version__,
        "torch": torch.__version__,
        "cupy": None if cupy is None else cupy.__version__,
    }


def vpopcntq_check():
    from lowbit.kernels.gemm import gemm_assembly

    assembly = gemm_assembly()
    return {
        "vpopcntq_zmm": len(re.findall(r"\bvpopcntq\s+%zmm", assembly)),
        "vpopcntq_any": len(re.findall(r"\bvpopcntq\b", assembly)),
        "popcnt_scalar": len(re.findall(r"(?<![a-z])popcnt[lqw]?\b", assembly)),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (about 20 s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=None, metavar="FOLDER",
                        help="write FOLDER/bench_kernels[_quick|_gpu].json (default: print only)")
    parser.add_argument("--output", default=None, metavar="FILE", help="write the JSON to FILE instead")
    parser.add_argument("--max-load", type=float, default=1.0, help="wait while the 1-min load is above")
    parser.add_argument("--load-retries", type=int, default=5)
    parser.add_argument("--load-wait", type=float, default=60.0, help="seconds per wait")
    parser.add_argument("--gpu-only", action="store_true",
                        help="only the CUDA part (no PyTorch or CPU baselines); with --results written "
                             "to bench_kernels_gpu[_quick].json")
    args = parser.parse_args(argv)
    if args.gpu_only:
        return main_gpu(args)

    import torch

    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    load_history, quiet = wait_for_quiet(args.max_load, args.load_retries, args.load_wait)
    idle_before = cpu_idle_fraction()
    started = time.time()
    gemm_sizes = [1024, 2048] if args.quick else [1024, 4096, 8192]
    gemm_repeats = 5 if args.quick else 21
    conv_repeats = 3 if args.quick else 9  # timed batches of >= CONV_BATCH_SECONDS each
    with threadpool_limits(limits=args.threads):
        blas = [info for info in threadpool_info() if info.get("user_api") == "blas"]
        for info in blas:
            print(f"numpy BLAS: {info.get('internal_api')} {info.get('version')} "
                  f"kernel={info.get('architecture')} threads={info.get('num_threads')}", flush=True)
        gemm = []
        for size in gemm_sizes:
            row = bench_gemm(size, gemm_repeats, rng, torch)
            gemm.append(row)
            t, r = {k: v["median_s"] * 1e3 for k, v in row["timings"].items()}, row["ratios"]
            print(f"GEMM {size}^3: binary {t['binary_xnor_gemm']:.2f} ms "
                  f"({row['rates']['binary_mac_per_s']:.3g} MAC/s), "
                  f"torch f32 {t['torch_float32_mm']:.1f} ms, "
                  f"numpy f32 {t['numpy_float32_matmul']:.1f} ms"
                  f" -> {r['vs_torch_float32']:.1f}x torch, {r['vs_numpy_float32']:.1f}x numpy "
                  f"(out=: {r['vs_torch_float32_out']:.1f}x / {r['vs_numpy_float32_out']:.1f}x)", flush=True)
        conv = []
        for stride in (1, 2):
            for size, channels in DABNN_LAYERS:
                row = bench_conv(size, channels, stride, conv_repeats, rng, torch)
                conv.append(row)
                t, r = {k: v["median_s"] * 1e6 for k, v in row["timings"].items()}, row["ratios"]
                print(f"conv {row['layer']} s{stride}: binary {t['binary_conv2d_prepared']:.0f} us "
                      f"(unprepared weights {t['binary_conv2d_unprepared']:.0f} us), torch "
                      f"{t['torch_float32_conv2d']:.0f} us, im2col+BLAS {t['float32_im2col_blas']:.0f} us -> "
                      f"{r['vs_torch_conv2d']:.1f}x torch ({r['vs_torch_conv2d_unprepared']:.1f}x unprepared), "
                      f"{r['vs_im2col_blas']:.1f}x im2col", flush=True)
        packing = bench_packing(1024 if args.quick else 4096, 4096, 5 if args.quick else 15, rng)
        print("packing GB/s:", {k: round(v, 2) for k, v in packing["gb_per_s"].items()}, flush=True)
        gpu = bench_gpu(4096 if args.quick else 8192, 5 if args.quick else 20)
        if gpu["available"]:
            r = gpu["ratios"]
            print(f"GPU {gpu['device']} {gpu['size']}^3: {r['vs_cublas_float32']:.2f}x cuBLAS f32, "
                  f"{r['vs_cublas_float16']:.2f}x cuBLAS f16", flush=True)
        asm = vpopcntq_check()
    finished = time.time()
    largest = max(gemm, key=lambda row: row["size"])
    gemm_4096 = next((row for row in gemm if row["size"] == 4096), largest)
    def by_size(key, group):
        return {row["size"]: round(row[group][key], 2) for row in gemm}

    def by_size_rate(key):
        return {row["size"]: float(f"{row['rates'][key]:.3g}") for row in gemm}

    def by_layer(key):
        return {f"{row['layer']}/s{row['stride']}": round(row["ratios"][key], 2) for row in conv}

    conv_worst = min(min(row["ratios"]["vs_torch_conv2d"], row["ratios"]["vs_im2col_blas"]) for row in conv)
    summary = {
        "gemm_ratio_vs_torch_float32": by_size("vs_torch_float32", "ratios"),
        "gemm_ratio_vs_numpy_float32": by_size("vs_numpy_float32", "ratios"),
        "gemm_ratio_vs_torch_float32_out": by_size("vs_torch_float32_out", "ratios"),
        "gemm_binary_mac_per_s": by_size_rate("binary_mac_per_s"),
        "conv_ratio_vs_torch": by_layer("vs_torch_conv2d"),
        "conv_ratio_vs_im2col_blas": by_layer("vs_im2col_blas"),
        "conv_ratio_vs_torch_unprepared": by_layer("vs_torch_conv2d_unprepared"),
        "conv_ratio_vs_im2col_blas_unprepared": by_layer("vs_im2col_blas_unprepared"),
        "pack_gb_per_s": round(packing["gb_per_s"]["pack_signs_float32"], 2),
        "targets_met": {
            "gemm_4096_vs_torch_float32": (
                gemm_4096["ratios"]["vs_torch_float32"] >= TARGETS["gemm_vs_torch_float32"]
            ),
            "gemm_4096_binary_mac_per_s": (
                gemm_4096["rates"]["binary_mac_per_s"] >= TARGETS["binary_mac_per_s"]
            ),
            "conv_all_layers_vs_float": conv_worst >= TARGETS["conv_vs_float"],
        },
    }
    if gpu["available"]:
        summary["gpu_ratio_vs_cublas_float32"] = round(gpu["ratios"]["vs_cublas_float32"], 2)
        summary["targets_met"]["gpu_vs_cublas_float32"] = (
            gpu["ratios"]["vs_cublas_float32"] >= TARGETS["gpu_vs_cublas_float32"]
        )
    result = {
        "script": "experiments/bench_kernels.py",
        "arguments": vars(args),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "duration_s": round(finished - started, 1),
        "machine": machine_info(),
        "versions": versions(torch),
        "threads": {
            "requested": args.threads,
            "numba": numba.get_num_threads(),
            "numba_threading_layer": numba.threading_layer(),
            "torch": torch.get_num_threads(),
            "numpy_blas": blas,
        },
        "blas_env_unset": json.loads(os.environ.get(_UNSET_MARKER, "{}")),
        "load": {
            "before": load_history,
            "quiet_when_started": quiet,
            "cpu_idle_fraction_before": idle_before,
            "after": list(os.getloadavg()),
        },
        "cpu_kernel": {"lanes": LANES, "tile_rows": TILE_ROWS, "tile_cols": TILE_COLS, "assembly": asm},
        "targets": TARGETS,
        "summary": summary,
        "gemm": gemm,
        "conv": conv,
        "packing": packing,
        "gpu": gpu,
    }
    print(json.dumps(summary, indent=1))
    _write(args, result, "_quick.json" if args.quick else ".json")
    return result


if __name__ == "__main__":
    from _common import run_main

    run_main(main)
