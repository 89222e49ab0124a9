"""Per-layer model summary in the spirit of Larq's ``larq.models.summary``.

:func:`summarize` works on a trained :class:`~lowbit.Model` (one row per layer, weights counted at
the precision their quantizer gives them) and on a :class:`~lowbit.packed.PackedModel` (one row per
stage, and one per layer of a float stage; memory is what the file stores).  Columns:

``kind``         ``binary`` (1-bit weights on 1-bit inputs: XNOR-popcount), ``w<k>a<j>`` (other
                 kernel precisions), ``float``, or the stage kind
``output``       shape of one example's output (``packed``/``acc``: bit-packed / int32 accumulators)
``params``       number of stored values (weights, biases, BatchNorm statistics, thresholds)
``bits/w``       bits per kernel weight (1, k, 16, 32)
``memory``       bytes at that precision (packed model: bytes of the stored arrays)
``binary MACs``  multiply-accumulates per example done as XNOR-popcount
``float MACs``   the other multiply-accumulates per example
``time``         with ``profile=True``: median milliseconds per row for a batch

The totals give the float32-equivalent size (every parameter at 32 bits; for a packed model, its
source model's) and the ratio to the memory.
"""
from __future__ import annotations

import types

import numpy as np

from .layers import Affine, Concat, Conv2D, Dropout, Flatten, MaxPool2D, Residual, Sequential
from .model import Model
from .packed import (
    AccToFloatStage, BinaryConvStage, BinaryDenseStage, BitplaneDenseStage, FloatStage, PackedModel, ResidualStage,
    describe_spec, kernel_bits,
)
from .quant_layers import QuantActivation
from .reactnet import RSign

__all__ = ["Summary", "summarize"]


def _human(n):
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024.0


def _count(n):
    return f"{int(n):,}"


def _shape(shape):
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


class Summary:
    """Rows (dicts) and totals of a model summary; ``str(summary)`` is the table."""

    def __init__(self, title, rows, float32_bytes, notes=(), file_size=None, profiled=False, batch_size=None):
        self.title = title
        self.rows = rows
        self.notes = list(notes)
        self.file_size = file_size
        self.profiled = profiled
        self.batch_size = batch_size
        self.totals = {
            "params": int(sum(r["params"] for r in rows)),
            "memory": int(sum(r["memory"] for r in rows)),
            "binary_macs": int(sum(r["binary_macs"] for r in rows)),
            "float_macs": int(sum(r["float_macs"] for r in rows)),
            "float32_bytes": int(float32_bytes),
        }
        if profiled:
            self.totals["time_ms"] = float(sum(r["time_ms"] for r in rows))

    def to_dict(self):
        return {"title": self.title, "rows": self.rows, "totals": self.totals, "notes": self.notes,
                "file_size": self.file_size}

    def table(self):
        headers = ["#", "layer", "kind", "output", "params", "bits/w", "memory", "binary MACs", "float MACs"]
        if self.profiled:
            headers.append("time ms")
        lines = []
        for r in self.rows:
            cells = [r["index"], r["layer"], r["kind"], r["output"], _count(r["params"]),
                     "-" if r["bits"] is None else str(r["bits"]),
                     _human(r["memory"]) if r["memory"] else "0",
                     _count(r["binary_macs"]), _count(r["float_macs"])]
            if self.profiled:
                cells.append(f"{r['time_ms']:.3f}")
            lines.append(cells)
        t = self.totals
        total = ["", "total", "", "", _count(t["params"]), "", _human(t["memory"]), _count(t["binary_macs"]),
                 _count(t["float_macs"])]
        if self.profiled:
            total.append(f"{t['time_ms']:.3f}")
        widths = [max(len(str(row[i])) for row in [headers] + lines + [total]) for i in range(len(headers))]
        right = {0, 4, 5, 6, 7, 8, 9}

        def fmt(row):
            return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                             for i, (c, w) in enumerate(zip(row, widths))).rstrip()

        rule = "-" * len(fmt(headers))
        out = [self.title, rule, fmt(headers), rule] + [fmt(row) for row in lines] + [rule, fmt(total), rule]
        ratio = t["float32_bytes"] / t["memory"] if t["memory"] else float("inf")
        out.append(f"memory {_human(t['memory'])} ({t['memory']:,} bytes); float32 equivalent "
                   f"{_human(t['float32_bytes'])} ({ratio:.1f}x)")
        macs = t["binary_macs"] + t["float_macs"]
        share = t["binary_macs"] / macs if macs else 0.0
        out.append(f"MACs per example: {_count(macs)} ({_count(t['binary_macs'])} binary = {share:.1%}, "
                   f"{_count(t['float_macs'])} float)")
        if self.file_size is not None:
            out.append(f"file size {_human(self.file_size)} ({self.file_size:,} bytes)")
        if self.profiled:
            out.append(f"time: median of repeated forward passes on a batch of {self.batch_size}")
        out.extend(f"note: {n}" for n in self.notes)
        return "\n".join(out)

    __str__ = table

    def __repr__(self):
        return f"Summary({self.title!r}, {len(self.rows)} rows)"


# -- trained models ---------------------------------------------------------------------------------
def _flat(container, prefix=""):
    out = []
    for i, layer in enumerate(container.layers):
        path = f"{prefix}{i}"
        if type(layer) is Sequential:
            out.extend(_flat(layer, path + "."))
        else:
            out.append((path, layer))
    return out


def _kernel_bits(layer):
    q = getattr(layer, "kernel_quantizer", None)
    return 32 if q is None else q.packed_encoding().bits


def _input_bits(layer, incoming):
    q = getattr(layer, "input_quantizer", None)
    if q is None:
        return incoming
    encoding = q.packed_encoding()
    return incoming if encoding.passthrough else encoding.bits


def _macs(layer, shape, bits):
    """(binary, float) MACs of ``layer`` on one example of ``shape`` with ``bits``-bit input."""
    if isinstance(layer, Sequential):
        binary = floating = 0
        for child in layer.layers:
            b, f = _macs(child, shape, bits)
            binary, floating = binary + b, floating + f
            shape = child.output_shape((1,) + tuple(shape))[1:]
            bits = _next_bits(child, bits)
        return binary, floating
    if isinstance(layer, Residual):
        b, f = _macs(layer.body, shape, bits)
        if layer.shortcut is not None:
            b2, f2 = _macs(layer.shortcut, shape, bits)
            b, f = b + b2, f + f2
        return b, f
    if isinstance(layer, Concat):
        totals = [_macs(branch, shape, bits) for branch in layer.branches]
        return sum(t[0] for t in totals), sum(t[1] for t in totals)
    if isinstance(layer, (Affine, Conv2D)):
        out = layer.output_shape((1,) + tuple(shape))[1:]
        if isinstance(layer, Affine):
            count = layer.in_features * layer.out_features
        else:
            count = int(np.prod(out)) * layer.in_channels * layer.kernel_size ** 2
        binary = _kernel_bits(layer) == 1 and _input_bits(layer, bits) == 1
        return (count, 0) if binary else (0, count)
    return 0, 0


def _next_bits(layer, bits):
    """Bits of the values after ``layer`` (1 stays 1 through no-ops on +-1 values)."""
    if isinstance(layer, QuantActivation):
        encoding = layer.quantizer.packed_encoding()
        return bits if encoding.passthrough else encoding.bits
    if isinstance(layer, (Dropout, Flatten, MaxPool2D)):
        return bits
    if isinstance(layer, RSign):  # a sign with learned thresholds: +-1 values
        return 1
    return 32


def _model_rows(model):
    rows = []
    shape = model.input_shape
    bits = 32
    for path, layer in _flat(model):
        out_shape = layer.output_shape((1,) + tuple(shape))[1:]
        params = memory_bits = 0
        for _, owner, attr in layer.named_arrays():
            size = int(getattr(owner, attr).size)
            params += size
            weight_bits = _kernel_bits(owner) if attr == "W" and isinstance(owner, (Affine, Conv2D)) else 32
            memory_bits += size * weight_bits
        binary, floating = _macs(layer, shape, bits)
        if isinstance(layer, (Affine, Conv2D)):
            kw, ka = _kernel_bits(layer), _input_bits(layer, bits)
            kind = "binary" if kw == 1 and ka == 1 else ("float" if kw == ka == 32 else f"w{kw}a{ka}")
            weight_bits = kw
        else:
            kind = "-"
            if isinstance(layer, QuantActivation) and not layer.quantizer.packed_encoding().passthrough:
                kind = f"a{layer.quantizer.packed_encoding().bits}"
            weight_bits = 32 if params else None
        rows.append({"index": path, "layer": type(layer).__name__, "kind": kind, "output": _shape(out_shape),
                     "params": params, "bits": weight_bits, "memory": (memory_bits + 7) // 8,
                     "binary_macs": int(binary), "float_macs": int(floating), "run": layer})
        shape, bits = out_shape, _next_bits(layer, bits)
    return rows


# -- packed models ----------------------------------------------------------------------------------
def _nbytes(arrays):
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def _packed_rows(packed):
    rows = []
    for index, stage in enumerate(packed.stages):
        if isinstance(stage, ResidualStage):  # one row (one profiled step): the sums of its inner stages
            inner = _packed_rows(types.SimpleNamespace(stages=stage.inner_stages()))
            binary = sum(r["binary_macs"] for r in inner)
            rows.append({"index": str(index), "layer": "residual", "kind": "binary" if binary else "float",
                         "output": describe_spec(stage.output_spec),
                         "params": sum(r["params"] for r in inner), "bits": 1 if binary else None,
                         "memory": sum(r["memory"] for r in inner), "binary_macs": binary,
                         "float_macs": sum(r["float_macs"] for r in inner)})
            continue
        if isinstance(stage, FloatStage):
            shape = stage.input_spec[2]
            for i, layer in enumerate(stage.layers):
                out_shape = layer.output_shape((1,) + tuple(shape))[1:]
                params = int(sum(getattr(o, a).size for _, o, a in layer.named_arrays()))
                info = stage.encodings.get(f"{i}.W", (None,))[0]
                binary, floating = _macs(layer, shape, 32)
                rows.append({"index": f"{index}.{i}", "layer": type(layer).__name__, "kind": "float",
                             "output": _shape(out_shape), "params": params,
                             "bits": kernel_bits(info) if info else (32 if params else None),
                             "memory": _nbytes(stage.layer_arrays(i)), "binary_macs": 0,
                             "float_macs": int(binary + floating)})
                shape = out_shape
            continue
        arrays = stage.arrays()
        params, bits, binary = 0, None, 0
        if isinstance(stage, BinaryDenseStage):
            out = stage.output_spec[2][0]
            params = binary = out * stage.in_features
            bits = 1
        elif isinstance(stage, BitplaneDenseStage):
            out = stage.output_spec[2][0]
            params = out * stage.in_features
            binary = params * stage.bits  # one XNOR GEMM per bit plane
            bits = 1
        elif isinstance(stage, BinaryConvStage):
            out_channels, kh, kw = stage.weights.shape[:3]
            params = out_channels * kh * kw * stage.input_spec[2][0]
            binary = params * stage.output_spec[2][1] * stage.output_spec[2][2]
            bits = 1
        else:
            params = int(sum(np.asarray(a).size for a in arrays.values()))
            if isinstance(stage, AccToFloatStage) and params:
                bits = 32
        rows.append({"index": str(index), "layer": stage.kind, "kind": "binary" if bits == 1 else stage.kind,
                     "output": describe_spec(stage.output_spec), "params": int(params), "bits": bits,
                     "memory": _nbytes(arrays), "binary_macs": int(binary), "float_macs": 0})
    return rows


def _packed_float32_bytes(packed, rows):
    source = packed.source.get("float32_bytes")
    if isinstance(source, int) and source > 0:
        return source
    return 4 * sum(r["params"] for r in rows)


# -- entry points -----------------------------------------------------------------------------------
def summarize(model, profile=False, batch_size=100, repeats=5, seed=0, file_size=None):
    """Build the :class:`Summary` of a :class:`~lowbit.Model` or a :class:`~lowbit.packed.PackedModel`.

    Parameters
    ----------
    model : Model or PackedModel
    profile : bool
        Also time every row: a real forward pass on a batch of ``batch_size`` random images in
        [0, 1], ``repeats`` times after one warm-up pass (which compiles the Numba kernels); the
        median is reported.
    batch_size, repeats, seed : int
    file_size : int, optional
        Bytes of the file the model came from (shown under the table).
    """
    if isinstance(model, PackedModel):
        rows = _packed_rows(model)
        title = f"packed model {model.name!r} (input {_shape(model.input_shape)})"
        float32_bytes = _packed_float32_bytes(model, rows)
        notes = model.notes
    elif isinstance(model, Model):
        rows = _model_rows(model)
        title = f"model {model.name!r} (input {_shape(model.input_shape)})"
        float32_bytes = 4 * sum(r["params"] for r in rows)
        notes = []
    else:
        raise TypeError(f"model must be a lowbit Model or PackedModel, got {type(model).__name__}")
    if profile:
        shape = (batch_size,) + tuple(model.input_shape)
        x = np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32)
        if isinstance(model, PackedModel):
            timings = model.profile(x, repeats)
            for row, (_, _, seconds) in zip(rows, timings):
                row["time_ms"] = 1000.0 * seconds
        else:
            for row, seconds in zip(rows, _profile_model(model, rows, x, repeats)):
                row["time_ms"] = 1000.0 * seconds
    for row in rows:
        row.pop("run", None)
    return Summary(title, rows, float32_bytes, notes, file_size=file_size, profiled=profile,
                   batch_size=batch_size)


def _profile_model(model, rows, x, repeats):
    import time

    xp_model = model._array_module()
    if xp_model is not np:
        x = xp_model.asarray(x)
    times = [[] for _ in rows]
    for repeat in range(repeats + 1):
        value = x
        for i, row in enumerate(rows):
            start = time.perf_counter()
            value = row["run"].forward(value, train=False)
            if xp_model is not np:
                xp_model.cuda.get_current_stream().synchronize()
            if repeat:
                times[i].append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]
