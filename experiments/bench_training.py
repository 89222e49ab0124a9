"""Training speed on the CPU: lowbit against the same networks in PyTorch, and lowbit's compiled
kernels against its numpy reference ops (issue 21).

Three networks, batch 100, float32, Adam, cross-entropy, random MNIST-shaped batches:

* ``deep_convnet``: the chapter-8 DeepConvNet (``lowbit.zoo.deep_convnet``), float.
* ``bnn_mlp``: ``lowbit.zoo.bnn_mlp(hidden=(1024,) * 3)``, binary weights and activations.
* ``binary_cnn``: ``lowbit.zoo.binary_cnn()``, binary convolutions.

The PyTorch side of the two binary networks is their float simulation, layer for layer: the sign is
Larq's ``ste_sign`` (forward ``+1 if x >= 0 else -1``, backward ``dy * (|x| <= 1)``, a
``torch.autograd.Function``) on the binary layers' latent weights and inputs, the weights are
multiplied in float32 (``F.linear`` / ``F.conv2d``), BatchNorm as ``nn.BatchNorm1d/2d(eps=1e-4,
momentum=0.1)``, Adam (``torch.optim.Adam``, BinaryNet's per-layer Glorot learning-rate factor for
``bnn_mlp`` as lowbit), then the latent weights clipped to [-1, 1] (``clamp_`` under ``no_grad``).
8-bit input codes (``PixelCodes`` / ``DoReFaActivation(8)``) are rounded with a straight-through
gradient on both sides.

Contenders, timed in one process and interleaved repeat by repeat (so both see the same machine
load): ``lowbit`` (compiled kernels, ``lowbit.kernels.float_ops``), ``lowbit_reference`` (the
numpy reference ops, ``lowbit.functions.use_fast_ops(False)``), ``torch``, and at 2 or more threads
``lowbit_kernels_all_threads`` (the compiled float kernels on every thread,
``lowbit.kernels.float_ops.set_threads(None)``, where lowbit's default holds them to one while BLAS
and the binary kernels keep all: whether their ``prange`` pays beside BLAS's threads); with ``--mixed16`` also ``lowbit_mixed16``,
deep_convnet in lowbit's mixed precision (float16 emulated on numpy: what matching a GPU's numerics
costs on a CPU, ``lowbit_mixed16_over_lowbit``); with ``--im2col-contender`` also ``lowbit_im2col``,
the compiled kernels with the convolutions on im2col + BLAS (``lowbit.functions.use_direct_conv(False)``:
what the direct convolution kernels of ``lowbit.kernels.float_conv`` give, ``lowbit_over_lowbit_im2col``).
Figures are medians over ``--repeats`` repeats of ``--steps`` steps, and the median of the per-repeat paired ratios.
Each thread count in ``--threads`` sets numpy's BLAS (threadpoolctl), Numba's and torch's threads.
The per-op table times every layer type's forward and backward and the optimizer step for both
lowbit contenders (median over ``--profile-steps`` instrumented steps, run apart from the timed
repeats), and a summary by op group: convolution forward, backward-data and backward-weights (the
direct kernels' own time), the rest of the convolutions' backward, max pooling, everything else.  The
JSON records the CPU model (lscpu), the BLAS kernel (threadpoolctl) and the load.

If ``OPENBLAS_CORETYPE``/``OPENBLAS_L2_SIZE`` are set they slow numpy's OpenBLAS;
``--unset-openblas-env`` re-executes this script without them (for this process only) and the JSON
records the BLAS kernel numpy then used.

Writes ``runs/results/bench_training.json`` and a Markdown table beside it.

Usage::

    python experiments/bench_training.py                      # 7 repeats x 10 steps, threads 1 2
    python experiments/bench_training.py --quick              # 3 repeats x 3 steps
    python experiments/bench_training.py --networks bnn_mlp --threads 1
    python experiments/bench_training.py --retain-freed-memory    # no page faults (lowbit.memory)
    python experiments/bench_training.py --networks deep_convnet --mixed16
    python experiments/bench_training.py --networks deep_convnet --im2col-contender
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
if HERE not in sys.path:  # loaded by path (tests), not run as python experiments/bench_training.py
    sys.path.insert(0, HERE)
import _common  # noqa: E402
from _common import blas_info, cpu_model  # noqa: E402

NETWORKS = ("deep_convnet", "bnn_mlp", "binary_cnn")
BNN_HIDDEN = (1024, 1024, 1024)


def check_counts(parser, args, names):
    """``parser.error`` unless every ``args.<name>`` and every thread count in ``args.threads`` is >= 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(t < 1 for t in args.threads):
        parser.error(f"--threads must be >= 1, got {args.threads}")


def unset_openblas_env(enabled):
    """With ``enabled``, re-execute this script without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE when
    either is set (this process only); returns the names that were unset (in the re-executed run:
    none, as they are gone)."""
    if not enabled:
        return []
    unset = [v for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if v in os.environ]
    if unset:
        env = {k: v for k, v in os.environ.items() if k not in unset}
        os.execve(sys.executable, [sys.executable] + sys.argv, env)
    return unset


# -- PyTorch twins ---------------------------------------------------------------------------------


def torch_modules(torch):
    nn = torch.nn
    fn = torch.nn.functional

    class SteSign(torch.autograd.Function):
        """Larq's ste_sign: sign with sign(0) = +1, gradient dy * (|x| <= 1)."""

        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

        @staticmethod
        def backward(ctx, dy):
            (x,) = ctx.saved_tensors
            return dy * (x.abs() <= 1).to(dy.dtype)

    class RoundCodes(torch.autograd.Function):
        """rint(clip(x, 0, 1) * 255) / 255 with a straight-through gradient inside [0, 1]."""

        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.round(x.clamp(0, 1) * 255) / 255

        @staticmethod
        def backward(ctx, dy):
            (x,) = ctx.saved_tensors
            return dy * ((x >= 0) & (x <= 1)).to(dy.dtype)

    class BinaryLinear(nn.Linear):
        def __init__(self, n_in, n_out, sign_input, bias=False):
            super().__init__(n_in, n_out, bias=bias)
            self.sign_input = sign_input
            nn.init.uniform_(self.weight, -1, 1)

        def forward(self, x):
            if self.sign_input:
                x = SteSign.apply(x)
            return fn.linear(x, SteSign.apply(self.weight), self.bias)

    class BinaryConv(nn.Conv2d):
        def __init__(self, c_in, c_out):
            super().__init__(c_in, c_out, 3, padding=1, bias=False)
            nn.init.xavier_uniform_(self.weight)

        def forward(self, x):
            return fn.conv2d(SteSign.apply(x), SteSign.apply(self.weight), None, 1, 1)

    class Sign(nn.Module):
        def forward(self, x):
            return SteSign.apply(x)

    class Codes(nn.Module):
        def forward(self, x):
            return RoundCodes.apply(x)

    return SteSign, BinaryLinear, BinaryConv, Sign, Codes


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
    model = nn.Sequential(*layers)
    return model, torch.optim.Adam(model.parameters(), lr=0.001), []


def torch_bnn_mlp(torch):
    nn = torch.nn
    _, BinaryLinear, _, Sign, Codes = torch_modules(torch)
    layers = [Codes(), nn.Flatten(), nn.Dropout(0.2)]
    width = 784
    binary = []
    groups = []
    for h in BNN_HIDDEN + (10,):
        dense = BinaryLinear(width, h, sign_input=False)
        binary.append(dense)
        groups.append({"params": [dense.weight], "lr": 0.001 / (1.5 / (width + h)) ** 0.5})
        layers += [dense, nn.BatchNorm1d(h, eps=1e-4, momentum=0.1)]
        if h != 10:
            layers += [Sign(), nn.Dropout(0.5)]
        width = h
    model = nn.Sequential(*layers)
    others = [p for m in model.modules() if isinstance(m, nn.BatchNorm1d) for p in m.parameters()]
    groups.append({"params": others, "lr": 0.001})
    return model, torch.optim.Adam(groups), [m.weight for m in binary]


def torch_binary_cnn(torch):
    nn = torch.nn
    _, BinaryLinear, BinaryConv, Sign, Codes = torch_modules(torch)
    first = nn.Conv2d(1, 32, 3, padding=1, bias=False)
    convs = [BinaryConv(32, 32), BinaryConv(32, 64), BinaryConv(64, 64)]
    dense = BinaryLinear(64 * 7 * 7, 256, sign_input=True)
    nn.init.xavier_uniform_(dense.weight)

    class FloatLast(nn.Module):  # sign on the input, float weights and bias (keep_last=True)
        def __init__(self, linear, sign):
            super().__init__()
            self.linear, self.sign = linear, sign

        def forward(self, x):
            return self.linear(self.sign(x))

    def bn(c):
        return nn.BatchNorm2d(c, eps=1e-4, momentum=0.1)

    model = nn.Sequential(
        Codes(), first, bn(32),
        convs[0], nn.MaxPool2d(2), bn(32),
        convs[1], bn(64),
        convs[2], nn.MaxPool2d(2), bn(64),
        nn.Flatten(), dense, nn.BatchNorm1d(256, eps=1e-4, momentum=0.1),
        FloatLast(nn.Linear(256, 10), Sign()),
    )
    return model, torch.optim.Adam(model.parameters(), lr=0.001), [c.weight for c in convs] + [dense.weight]


TORCH_BUILDERS = {"deep_convnet": torch_deep_convnet, "bnn_mlp": torch_bnn_mlp,
                  "binary_cnn": torch_binary_cnn}


def lowbit_model(name):
    from lowbit.zoo import binary_cnn, bnn_mlp, deep_convnet

    if name == "deep_convnet":
        return deep_convnet(seed=0)
    if name == "bnn_mlp":
        return bnn_mlp(seed=0, hidden=BNN_HIDDEN)
    return binary_cnn(seed=0)


# -- timing ----------------------------------------------------------------------------------------


class LowbitRunner:
    """One lowbit model trained with the compiled kernels (``fast``) or the reference ops."""

    def __init__(self, name, batches, fast, kernel_threads="default", direct_conv=True):
        from lowbit.losses import SoftmaxCrossEntropy
        from lowbit.optimizers import Adam

        self.model = lowbit_model(name)
        self.loss = SoftmaxCrossEntropy()
        self.opt = Adam(0.001)
        self.batches = batches
        self.fast = fast
        self.kernel_threads = kernel_threads
        self.direct_conv = direct_conv
        self.i = 0

    def steps(self, n):
        from lowbit.functions import use_direct_conv, use_fast_ops
        from lowbit.kernels import float_ops

        previous = use_fast_ops(self.fast)
        previous_conv = use_direct_conv(self.direct_conv)
        default = self.kernel_threads == "default"  # lowbit's own setting, untouched
        threads = None if default else float_ops.set_threads(self.kernel_threads)
        try:
            for _ in range(n):
                x, y = self.batches[self.i % len(self.batches)]
                self.i += 1
                self.loss.forward(self.model.forward(x, train=True), y)
                self.model.backward(self.loss.backward(), input_grad=False)
                self.opt.step(self.model)
        finally:
            use_fast_ops(previous)
            use_direct_conv(previous_conv)
            if not default:
                float_ops.set_threads(threads)

    def profile(self, n):
        """Per-op milliseconds per step (median over ``n`` steps): every layer type's forward and
        backward, and the optimizer step (with the weight clip)."""
        records = []
        timers = {}
        layers = [layer for _, layer in self.model.named_layers() if not layer.children()]

        def wrap(layer, method):
            key = f"{type(layer).__name__}.{method}"
            setattr(layer, method, timed_function(getattr(layer, method), key, timers))

        for layer in layers:
            wrap(layer, "forward")
            wrap(layer, "backward")
        # the direct convolution kernels, which lowbit.functions reaches through the module
        from lowbit.kernels import float_conv

        kernel_names = {"conv2d_forward": "conv kernel: forward", "conv2d_backward_data": "conv kernel: backward-data",
                        "conv2d_backward_weights": "conv kernel: backward-weights"}
        originals = {name: getattr(float_conv, name) for name in kernel_names}
        for name, key in kernel_names.items():
            setattr(float_conv, name, timed_function(originals[name], key, timers))
        self.opt.step = timed_function(self.opt.step, "Adam.step+clip", timers)
        try:
            for _ in range(n):
                timers.clear()
                t0 = time.perf_counter()
                self.steps(1)
                timers["total"] = time.perf_counter() - t0
                records.append(dict(timers))
        finally:
            for layer in layers:
                del layer.forward, layer.backward  # back to the class methods
            del self.opt.step
            for name, original in originals.items():
                setattr(float_conv, name, original)
        keys = sorted({k for r in records for k in r})
        self.summary = {}  # op_summary of each step, then medians: its rows add up within a step
        summaries = [op_summary(r) for r in records]
        for key in summaries[0]:
            self.summary[key] = 1000 * statistics.median(s[key] for s in summaries)
        return {k: 1000 * statistics.median(r.get(k, 0.0) for r in records) for k in keys}


def timed_function(function, key, timers):
    """``function`` that adds its seconds to ``timers[key]``."""
    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = function(*args, **kwargs)
        timers[key] = timers.get(key, 0.0) + time.perf_counter() - t0
        return out
    return timed


def op_summary(ops):
    """One step's per-op seconds grouped as issue 21 asks: convolution (Conv2D, QuantConv2D) forward, backward-data and
    backward-weights (the direct kernels' own time; what else Conv2D.backward spends (layouts, bias,
    im2col for a first layer) is ``conv backward, other``, and all of it when the convolutions ran on
    im2col, where the two passes are not timed apart), max pooling, and the rest of the step."""
    def total_of(kind, method):  # Conv2D and QuantConv2D alike
        return sum(v for k, v in ops.items() if k.split(".")[0].endswith(kind) and k.endswith("." + method))

    conv_forward, conv_backward = total_of("Conv2D", "forward"), total_of("Conv2D", "backward")
    data = ops.get("conv kernel: backward-data", 0.0)
    weights = ops.get("conv kernel: backward-weights", 0.0)
    pool = total_of("MaxPool2D", "forward") + total_of("MaxPool2D", "backward")
    total = ops.get("total", 0.0)
    return {"conv forward": conv_forward, "conv backward-data": data, "conv backward-weights": weights,
            "conv backward, other": conv_backward - data - weights, "max pool": pool,
            "rest": total - conv_forward - conv_backward - pool, "total": total}


class MixedRunner(LowbitRunner):
    """lowbit's mixed precision (float16 forward/backward emulated on numpy, float32 master weights,
    dynamic loss scaling: :func:`lowbit.mixed_precision.mixed_precision_step`), compiled kernels on."""

    def __init__(self, name, batches):
        from lowbit.mixed_precision import LossScaler

        super().__init__(name, batches, True)
        self.scaler = LossScaler()

    def steps(self, n):
        from lowbit.mixed_precision import mixed_precision_step

        for _ in range(n):
            x, y = self.batches[self.i % len(self.batches)]
            self.i += 1
            mixed_precision_step(self.model, self.loss, self.opt, self.scaler, x, y, 0.001)


class TorchRunner:
    def __init__(self, torch, name, batches):
        self.torch = torch
        self.model, self.opt, self.clipped = TORCH_BUILDERS[name](torch)
        self.model.train()
        self.loss = torch.nn.CrossEntropyLoss()
        self.batches = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches]
        self.i = 0

    def steps(self, n):
        for _ in range(n):
            x, y = self.batches[self.i % len(self.batches)]
            self.i += 1
            self.opt.zero_grad(set_to_none=True)
            self.loss(self.model(x), y).backward()
            self.opt.step()
            if self.clipped:
                with self.torch.no_grad():
                    for w in self.clipped:
                        w.clamp_(-1, 1)


def set_threads(threads, torch):
    """numpy's BLAS, torch and Numba on ``threads`` threads; returns a function that restores them."""
    import numba
    from threadpoolctl import threadpool_limits

    limits = threadpool_limits(threads)
    previous = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))

    def restore():
        limits.restore_original_limits()
        torch.set_num_threads(previous[0])
        numba.set_num_threads(previous[1])
    return restore


def bench_network(name, threads, args, torch, progress):
    rng = np.random.default_rng(0)
    bs = args.batch_size
    batches = [(rng.random((bs, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, bs))
               for _ in range(4)]
    runners = {"lowbit": LowbitRunner(name, batches, True),
               "lowbit_reference": LowbitRunner(name, batches, False),
               "torch": TorchRunner(torch, name, batches)}
    if args.mixed16 and name == "deep_convnet":
        runners["lowbit_mixed16"] = MixedRunner(name, batches)
    if args.im2col_contender:
        # the compiled kernels with the convolutions on im2col + BLAS (use_direct_conv(False))
        runners["lowbit_im2col"] = LowbitRunner(name, batches, True, direct_conv=False)
    if threads > 1:
        # the compiled kernels on every thread (lowbit's default: one) beside BLAS's: whether their
        # prange pays here
        runners["lowbit_kernels_all_threads"] = LowbitRunner(name, batches, True, kernel_threads=None)
    for runner in runners.values():
        runner.steps(args.warmup)
    rates = {key: [] for key in runners}
    for _ in range(args.repeats):
        for key, runner in runners.items():
            t0 = time.perf_counter()
            runner.steps(args.steps)
            rates[key].append(args.steps * bs / (time.perf_counter() - t0))
        progress.update(1)
    med = {k: statistics.median(v) for k, v in rates.items()}
    paired = {
        "lowbit_over_torch": statistics.median(a / b for a, b in zip(rates["lowbit"], rates["torch"])),
        "lowbit_reference_over_torch": statistics.median(
            a / b for a, b in zip(rates["lowbit_reference"], rates["torch"])),
        "lowbit_over_lowbit_reference": statistics.median(
            a / b for a, b in zip(rates["lowbit"], rates["lowbit_reference"])),
    }
    if "lowbit_mixed16" in rates:
        paired["lowbit_mixed16_over_lowbit"] = statistics.median(
            a / b for a, b in zip(rates["lowbit_mixed16"], rates["lowbit"]))
    if "lowbit_im2col" in rates:
        paired["lowbit_over_lowbit_im2col"] = statistics.median(
            a / b for a, b in zip(rates["lowbit"], rates["lowbit_im2col"]))
        paired["lowbit_im2col_over_torch"] = statistics.median(
            a / b for a, b in zip(rates["lowbit_im2col"], rates["torch"]))
    if "lowbit_kernels_all_threads" in rates:
        paired["lowbit_kernels_all_threads_over_lowbit"] = statistics.median(
            a / b for a, b in zip(rates["lowbit_kernels_all_threads"], rates["lowbit"]))
    # profile() wraps the layers of a LowbitRunner's model; the mixed runner is left out
    profiled = {"after": runners["lowbit"], "before": runners["lowbit_reference"]}
    if args.im2col_contender:
        profiled["im2col"] = runners["lowbit_im2col"]
    ops = {key: runner.profile(args.profile_steps) for key, runner in profiled.items()}
    return {"images_per_second": rates, "median_images_per_second": med,
            "median_paired_ratio": paired, "op_ms_per_step": ops,
            "op_summary_ms_per_step": {key: runner.summary for key, runner in profiled.items()}}


def markdown(result):
    lines = [f"# {result['benchmark']}", "",
             f"CPU: {result['machine']['cpu_model']}; BLAS: {result['blas_kernel']}; "
             f"retain_freed_memory: {result['retain_freed_memory']}; "
             f"load average before/after: {result['machine']['loadavg_before']} / "
             f"{result['machine']['loadavg_after']}", "",
             f"Command: `{result['command']}`", "",
             "| network | threads | lowbit img/s | reference ops img/s | PyTorch img/s | lowbit / PyTorch "
             "| reference / PyTorch | lowbit / reference | kernels on all threads / on one (default) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in result["runs"]:
        med, ratio = run["median_images_per_second"], run["median_paired_ratio"]
        lines.append(f"| {run['network']} | {run['threads']} | {med['lowbit']:.0f} | "
                     f"{med['lowbit_reference']:.0f} | {med['torch']:.0f} | "
                     f"{ratio['lowbit_over_torch']:.2f}x | {ratio['lowbit_reference_over_torch']:.2f}x | "
                     f"{ratio['lowbit_over_lowbit_reference']:.2f}x | "
                     f"{ratio.get('lowbit_kernels_all_threads_over_lowbit', 1.0):.2f}x |")
    for run in result["runs"]:
        summary = run.get("op_summary_ms_per_step")
        if not summary:
            continue
        columns = [k for k in ("before", "im2col", "after") if k in summary]
        names = {"before": "reference ops", "im2col": "compiled kernels, convolutions on im2col",
                 "after": "compiled kernels, direct convolutions"}
        lines += ["", f"## {run['network']}, {run['threads']} thread(s): ms per step by op group", "",
                  "| op | " + " | ".join(names[k] for k in columns) + " |", "| --- |" + " ---: |" * len(columns)]
        for key in summary[columns[0]]:
            lines.append(f"| {key} | " + " | ".join(f"{summary[c][key]:.2f}" for c in columns) + " |")
    for run in result["runs"]:
        ops = run["op_ms_per_step"]
        lines += ["", f"## {run['network']}, {run['threads']} thread(s): ms per step, before (reference "
                  "ops) and after (compiled kernels)", "", "| op | before | after |", "| --- | ---: | ---: |"]
        keys = sorted(set(ops["before"]) | set(ops["after"]), key=lambda k: (k == "total", k))
        for key in keys:
            lines.append(f"| {key} | {ops['before'].get(key, 0):.2f} | {ops['after'].get(key, 0):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--profile-steps", type=int, default=5, help="instrumented steps for the per-op table")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="3 repeats x 3 steps, 3 profiled steps")
    parser.add_argument("--mixed16", action="store_true",
                        help="also time deep_convnet in lowbit's mixed precision (float16 emulated on numpy)")
    parser.add_argument("--im2col-contender", action="store_true",
                        help="also time lowbit with the convolutions on im2col + BLAS (use_direct_conv(False)): "
                             "what the direct convolution kernels give")
    parser.add_argument("--unset-openblas-env", action="store_true")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="lowbit.memory.retain_freed_memory() first: freed blocks stay in the heap, "
                             "no page faults for per-step buffers (applies to the whole process: torch too)")
    parser.add_argument("--out", default=_common.default_output("results", "bench_training.json"),
                        help=_common.output_help("results", "results JSON (and a Markdown table beside it)",
                                                 "bench_training.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.warmup, args.profile_steps = 3, 3, 1, 3
    check_counts(parser, args, ("steps", "repeats", "profile_steps", "batch_size"))
    unset = unset_openblas_env(args.unset_openblas_env)

    import torch
    from tqdm import tqdm

    from lowbit.io import write_bytes_atomic, write_json_atomic

    retained = False
    if args.retain_freed_memory:
        from lowbit.memory import retain_freed_memory

        retained = retain_freed_memory()
    load_before = os.getloadavg()
    started = time.perf_counter()
    runs = []
    with tqdm(total=len(args.networks) * len(args.threads) * args.repeats, desc="repeats") as progress:
        for threads in args.threads:
            restore = set_threads(threads, torch)
            try:
                for name in args.networks:
                    torch.manual_seed(0)
                    runs.append({"network": name, "threads": threads,
                                 **bench_network(name, threads, args, torch, progress)})
            finally:
                restore()
    blas = blas_info()
    result = {
        "benchmark": "Training images/s on the CPU: lowbit (compiled kernels and reference ops) vs PyTorch",
        "networks": {"deep_convnet": "lowbit.zoo.deep_convnet()", "bnn_mlp": f"lowbit.zoo.bnn_mlp(hidden={BNN_HIDDEN})",
                     "binary_cnn": "lowbit.zoo.binary_cnn()"},
        "torch_formulation": "float simulation; sign = Larq ste_sign (x >= 0 -> +1, grad dy * (|x| <= 1)) "
                             "on binary weights and inputs; Adam, then latent binary weights clamp_(-1, 1)",
        "batch_size": args.batch_size, "steps_per_repeat": args.steps, "repeats": args.repeats,
        "warmup_steps": args.warmup, "profile_steps": args.profile_steps, "runs": runs,
        "unset_env": unset, "retain_freed_memory": retained, "blas": blas,
        "blas_kernel": ", ".join(f"{b.get('internal_api')} {b.get('version')} {b.get('architecture')}"
                                 for b in blas if b.get("internal_api") in ("openblas", "mkl", "blis")),
        "torch": torch.__version__, "numpy": np.__version__,
        "torch_backends": {"mkldnn": bool(torch.backends.mkldnn.is_available())},
        "machine": {"cpu_model": cpu_model(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "loadavg_before": [round(v, 2) for v in load_before],
                    "loadavg_after": [round(v, 2) for v in os.getloadavg()]},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "command": "python experiments/bench_training.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    write_json_atomic(args.out, result)
    md = os.path.splitext(args.out)[0] + ".md"
    write_bytes_atomic(md, markdown(result).encode())
    for run in runs:
        r = run["median_paired_ratio"]
        im2col = (f", lowbit/lowbit_im2col {r['lowbit_over_lowbit_im2col']:.2f}x"
                  if "lowbit_over_lowbit_im2col" in r else "")
        print(f"{run['network']:>13} {run['threads']} thread(s): lowbit/torch {r['lowbit_over_torch']:.2f}x, "
              f"reference/torch {r['lowbit_reference_over_torch']:.2f}x, "
              f"lowbit/reference {r['lowbit_over_lowbit_reference']:.2f}x{im2col}")
    print(f"{result['wall_seconds']} s -> {args.out}, {md}")
    return result


if __name__ == "__main__":
    from _common import run_main

    run_main(main)
