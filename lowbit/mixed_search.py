"""Mixed-precision search: per-layer weight and activation widths under a size or BOPs budget.

The measured per-layer sensitivities (:mod:`lowbit.sensitivity`: the loss increase, or accuracy drop,
of quantizing one layer's weights, or its inputs, alone) are taken as additive, as HAWQ-V3 does (Yao
et al. 2021, arXiv 2011.10680): the cost of giving layer ``l`` weights of ``w`` bits and inputs of
``a`` bits is ``s_weight(l, w) + s_activation(l, a)``.  :func:`solve_allocation` picks one option per
layer to minimise the summed cost under linear budgets -- a multiple-choice knapsack, solved as an
integer program:

``milp``
    :func:`scipy.optimize.milp` (HiGHS; binary ``x[l, o]``, one option per layer, each budget a row);
    exact, any number of budgets.  Needs SciPy (the ``mixed`` extra).
``dp``
    Dynamic programming over the one budget's integer resource (bits, or BOPs divided by their common
    divisor): exact, no dependency; refused when the table would exceed ``dp_cells``.
``greedy``
    Start from each layer's cheapest-cost option, then repeatedly make the move that saves the most
    resource per unit of cost added until the budgets hold.  Feasible, not always optimal: the
    fallback when neither exact solver can run.
``auto``
    ``milp`` when SciPy imports, else ``dp`` for one budget when it fits, else ``greedy``.

Budgets (:func:`budget_rows`): model size in KiB (the quantized kernels' bits plus a float32 scale per
output unit, plus every other array in float32, :meth:`LayerwisePTQ.model_bytes`), average weight
bits (over the quantizable kernels' entries) and bit operations per image (``sum(macs * w * a)``).

:func:`pareto_front` marks the points no other point beats (at most the size, at least the accuracy,
one of them strictly); :func:`plot_pareto` draws uniform and mixed points with the front.
"""
from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np

from .deprecation import moved_names

__all__ = [
    "SOLVERS", "OBJECTIVES", "solve_allocation", "layer_costs", "budget_rows", "choose_widths",
    "pareto_front", "plot_pareto", "sweep_pareto", "enumerate_allocation",
]

SOLVERS = ("auto", "milp", "dp", "greedy")
#: What the search minimises: the summed measured loss increase, the summed measured accuracy drop,
#: or the summed Hessian (HAWQ) estimate of the loss increase.
OBJECTIVES = {"loss": "loss_increase", "accuracy": "accuracy_drop", "hessian": "hessian_score"}


def _check_problem(costs, resources, budgets):
    if not isinstance(costs, (list, tuple)) or not costs:
        raise ValueError(f"costs must be a non-empty list (one list of option costs per layer), got {costs!r}")
    budgets = np.asarray(budgets, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(budgets)):
        raise ValueError(f"budgets must be finite numbers, got {budgets.tolist()}")
    if len(resources) != len(costs):
        raise ValueError(f"resources must have one entry per layer ({len(costs)}), got {len(resources)}")
    out_costs, out_resources = [], []
    for layer, (c, r) in enumerate(zip(costs, resources)):
        c = np.asarray(c, dtype=np.float64).reshape(-1)
        r = np.asarray(r, dtype=np.float64)
        if r.ndim == 1:
            r = r[:, None]
        if len(c) == 0 or r.shape != (len(c), len(budgets)):
            raise ValueError(f"layer {layer}: {len(c)} option costs need resources of shape ({len(c)}, "
                             f"{len(budgets)}) (one column per budget), got {r.shape}")
        if not (np.all(np.isfinite(c)) and np.all(np.isfinite(r))):
            raise ValueError(f"layer {layer}: costs and resources must be finite")
        out_costs.append(c)
        out_resources.append(r)
    return out_costs, out_resources, budgets


def _total(costs, resources, choice):
    cost = float(sum(c[o] for c, o in zip(costs, choice)))
    used = np.sum([r[o] for r, o in zip(resources, choice)], axis=0)
    return cost, used


def enumerate_allocation(costs, resources, budgets):
    """The optimal choice by trying every combination (for tests and tiny problems): ``(choice, cost)``,
    ``(None, inf)`` when nothing fits."""
    costs, resources, budgets = _check_problem(costs, resources, budgets)
    best, best_cost = None, math.inf
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        cost, used = _total(costs, resources, choice)
        if np.all(used <= budgets + 1e-9 * np.abs(budgets)) and cost < best_cost:
            best, best_cost = list(choice), cost
    return best, best_cost


def _milp(costs, resources, budgets):
    from scipy.optimize import Bounds, LinearConstraint, milp

    sizes = [len(c) for c in costs]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n = int(offsets[-1])
    c = np.concatenate(costs)
    one = np.zeros((len(costs), n))
    for layer in range(len(costs)):
        one[layer, offsets[layer]:offsets[layer + 1]] = 1
    usage = np.concatenate(resources, axis=0).T  # (budgets, n)
    # Scale each budget row to O(1) so that HiGHS' feasibility tolerance is relative.
    scale = np.maximum(np.abs(budgets), np.abs(usage).max(axis=1, initial=0))
    scale = np.where(scale > 0, scale, 1.0)
    constraints = [LinearConstraint(one, 1, 1),
                   LinearConstraint(usage / scale[:, None], -np.inf, budgets / scale)]
    result = milp(c, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1),
                  options={"mip_rel_gap": 0.0})
    if result.status == 2 or result.x is None:
        return None
    if result.status != 0:
        raise RuntimeError(f"scipy.optimize.milp did not finish: {result.message}")
    x = np.round(result.x).astype(int)
    return [int(np.argmax(x[offsets[i]:offsets[i + 1]])) for i in range(len(costs))]


def _integer_resource(resources, budget):
    """The one budget's resources as integers divided by their gcd, and the budget in those units (or
    None when the resources are not integers)."""
    values = np.concatenate([r[:, 0] for r in resources])
    if not np.all(values == np.round(values)) or np.any(values < 0):
        return None
    values = values.astype(np.int64)
    divisor = int(np.gcd.reduce(values[values > 0])) if np.any(values > 0) else 1
    scaled = [(r[:, 0].astype(np.int64) // divisor) for r in resources]
    return scaled, int(math.floor(budget / divisor + 1e-9))


def _dp(costs, resources, budget, max_cells):
    integer = _integer_resource(resources, budget)
    if integer is None:
        return "unsuitable"
    scaled, capacity = integer
    if capacity < 0:
        return None
    minimum = sum(int(s.min()) for s in scaled)
    if minimum > capacity:
        return None
    # Only the resource above each layer's minimum matters; the table spans what is left.
    capacity -= minimum
    extra = [s - s.min() for s in scaled]
    capacity = min(capacity, sum(int(e.max()) for e in extra))
    if (capacity + 1) * len(costs) > max_cells:
        return "too large"
    best = np.zeros(capacity + 1)  # best[b]: least cost of the layers so far using at most b
    choices = np.zeros((len(costs), capacity + 1), dtype=np.int32)
    for layer, (c, e) in enumerate(zip(costs, extra)):
        new = np.full(capacity + 1, np.inf)
        pick = np.zeros(capacity + 1, dtype=np.int32)
        for option in range(len(c)):
            shifted = np.full(capacity + 1, np.inf)
            if e[option] <= capacity:
                shifted[e[option]:] = best[:capacity + 1 - e[option]] + c[option]
            better = shifted < new
            new[better] = shifted[better]
            pick[better] = option
        best, choices[layer] = new, pick
    if not np.isfinite(best[capacity]):
        return None
    choice, left = [], capacity
    for layer in range(len(costs) - 1, -1, -1):
        option = int(choices[layer][left])
        choice.append(option)
        left -= int(extra[layer][option])
    return choice[::-1]


def _greedy(costs, resources, budgets):
    choice = [int(np.argmin(c)) for c in costs]
    scale = np.where(np.abs(budgets) > 0, np.abs(budgets), 1.0)
    while True:
        _, used = _total(costs, resources, choice)
        over = np.maximum(used - budgets, 0) / scale
        if not np.any(over > 1e-12):
            return choice
        best = None
        for layer, (c, r) in enumerate(zip(costs, resources)):
            for option in range(len(c)):
                saved = float((np.minimum((r[choice[layer]] - r[option]) / scale, over) * (over > 0)).sum())
                if saved <= 0:
                    continue
                ratio = max(c[option] - c[choice[layer]], 0.0) / saved
                if best is None or ratio < best[0]:
                    best = (ratio, layer, option)
        if best is None:
            return None
        choice[best[1]] = best[2]


def solve_allocation(costs, resources, budgets, solver="auto", dp_cells=50_000_000):
    """Choose one option per layer minimising the summed cost with every budget respected.

    Parameters
    ----------
    costs : list of sequences of float
        ``costs[l][o]``: the cost of option ``o`` of layer ``l``.
    resources : list of arrays
        ``resources[l][o, k]``: what option ``o`` of layer ``l`` uses of budget ``k`` (a 1-D array
        for a single budget).
    budgets : float or sequence of float
        The limit of each budget (``sum_l resources[l][choice_l, k] <= budgets[k]``).
    solver : "auto", "milp", "dp" or "greedy"
        See the module docstring.
    dp_cells : int
        The largest dynamic-programming table (layers x resource values) ``dp`` accepts.

    Returns
    -------
    dict
        ``choice`` (option per layer, or None when no choice fits the budgets), ``cost``, ``used``
        (per budget), ``solver`` (the one that ran), ``optimal`` (True for milp and dp).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {list(SOLVERS)}, got {solver!r}")
    costs, resources, budgets = _check_problem(costs, resources, budgets)
    order = [solver] if solver != "auto" else ["milp", "dp", "greedy"]
    ran = None
    choice = "unset"
    for name in order:
        if name == "milp":
            try:
                import scipy.optimize  # noqa: F401
            except ImportError:
                if solver == "milp":
                    raise ImportError("solver='milp' needs SciPy (pip install 'lowbit[mixed]')") from None
                continue
            choice, ran = _milp(costs, resources, budgets), name
            break
        if name == "dp":
            if len(budgets) != 1:
                if solver == "dp":
                    raise ValueError(f"solver='dp' takes one budget, got {len(budgets)}")
                continue
            result = _dp(costs, resources, float(budgets[0]), int(dp_cells))
            if isinstance(result, str):
                if solver == "dp":
                    raise ValueError(f"solver='dp' cannot run this problem: the resources are "
                                     f"{'not non-negative integers' if result == 'unsuitable' else 'too many'}"
                                     f" for its table (dp_cells={dp_cells})")
                continue
            choice, ran = result, name
            break
        choice, ran = _greedy(costs, resources, budgets), name
        break
    if choice is None:
        return {"choice": None, "cost": math.inf, "used": None, "solver": ran, "optimal": ran != "greedy"}
    cost, used = _total(costs, resources, choice)
    return {"choice": list(choice), "cost": cost, "used": used.tolist(), "solver": ran,
            "optimal": ran in ("milp", "dp")}


# -- from sensitivities to a choice --------------------------------------------------------------------
def layer_costs(rows, layers, widths, objective="loss", clip_negative=True):
    """``{(layer, kind, bits): cost}`` from sensitivity rows (:func:`lowbit.sensitivity.measure_sensitivity`
    or :func:`lowbit.sensitivity.read_sensitivity_csv`); 32 bits costs 0.  A negative measurement (the
    quantized layer did better on the held-out images, noise) counts as 0 with ``clip_negative``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    field = OBJECTIVES[objective]
    table = {}
    for row in rows:
        value = row.get(field)
        if value is None:
            continue
        table[(int(row["layer"]), row["kind"], int(row["bits"]))] = float(value)
    out = {}
    for layer in range(layers):
        for kind in ("weight", "activation"):
            for bits in widths:
                if bits == 32:
                    out[(layer, kind, 32)] = 0.0
                    continue
                if (layer, kind, bits) not in table:
                    raise ValueError(f"the sensitivity rows have no {field} for layer {layer}'s {kind}s at "
                                     f"{bits} bits; measure widths {sorted(widths)}")
                value = table[(layer, kind, bits)]
                out[(layer, kind, bits)] = max(value, 0.0) if clip_negative else value
    return out


def budget_rows(ptq, options, size_kib=None, average_bits=None, bops=None):
    """Per-layer resources (one array per layer: options x budgets) and the budgets' limits.

    ``size_kib``: estimated model size (:meth:`LayerwisePTQ.model_bytes`) in KiB, as kernel bits
    against ``size_kib * 8192`` minus the fixed float32 bits.  ``average_bits``: kernel entries times
    weight bits against ``average_bits`` times all kernel entries.  ``bops``: bit operations per image.
    Returns ``(resources, budgets, names)``."""
    columns, budgets, names = [], [], []
    if size_kib is not None:
        if not size_kib > 0:
            raise ValueError(f"size budget (KiB) must be > 0, got {size_kib!r}")
        columns.append(lambda layer, w, a: ptq.kernel_bits(layer, w))
        budgets.append(size_kib * 8192.0 - ptq.fixed_bits())
        names.append("size")
    if average_bits is not None:
        if not average_bits > 0:
            raise ValueError(f"average_bits must be > 0, got {average_bits!r}")
        columns.append(lambda layer, w, a: ptq.layers[layer].weights * w)
        budgets.append(average_bits * sum(info.weights for info in ptq.layers))
        names.append("average_bits")
    if bops is not None:
        if not bops > 0:
            raise ValueError(f"bops budget must be > 0, got {bops!r}")
        columns.append(lambda layer, w, a: ptq.layers[layer].macs * w * a)
        budgets.append(float(bops))
        names.append("bops")
    if not columns:
        raise ValueError("give at least one budget: size_kib, average_bits or bops")
    resources = [np.array([[column(layer, w, a) for column in columns] for w, a in options[layer]],
                          dtype=np.float64) for layer in range(len(ptq.layers))]
    return resources, budgets, names


def choose_widths(ptq, rows, weight_widths=(1, 2, 4, 8), activation_widths=(1, 2, 4, 8), objective="loss",
                  size_kib=None, average_bits=None, bops=None, solver="auto", fixed=None):
    """The per-layer ``(weight_bits, activation_bits)`` of least summed sensitivity under the budgets.

    ``fixed`` maps a layer index to a pair it must keep (e.g. ``{0: (8, 8)}``).  Returns the
    :func:`solve_allocation` result with ``widths`` (list of pairs, or None) and ``predicted_cost``.
    """
    widths = sorted(set(weight_widths) | set(activation_widths))
    costs_table = layer_costs(rows, len(ptq.layers), widths, objective)
    options = []
    for layer in range(len(ptq.layers)):
        if fixed and layer in fixed:
            options.append([tuple(fixed[layer])])
        else:
            options.append([(w, a) for w in weight_widths for a in activation_widths])
    for layer, pairs in enumerate(options):
        for w, a in pairs:
            for kind, bits in (("weight", w), ("activation", a)):
                if (layer, kind, bits) not in costs_table:
                    costs_table[(layer, kind, bits)] = layer_costs(rows, len(ptq.layers), [bits], objective)[
                        (layer, kind, bits)]
    costs = [[costs_table[(layer, "weight", w)] + costs_table[(layer, "activation", a)] for w, a in pairs]
             for layer, pairs in enumerate(options)]
    resources, budgets, names = budget_rows(ptq, options, size_kib, average_bits, bops)
    result = solve_allocation(costs, resources, budgets, solver=solver)
    result["widths"] = None if result["choice"] is None else [options[l][o] for l, o in enumerate(result["choice"])]
    result["predicted_cost"] = result.pop("cost")
    result["budgets"] = dict(zip(names, budgets))
    result["objective"] = objective
    return result


# -- the front -----------------------------------------------------------------------------------------
def pareto_front(sizes, accuracies):
    """Boolean mask of the points that no other point dominates (size <= and accuracy >=, one strictly)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    accuracies = np.asarray(accuracies, dtype=np.float64)
    if sizes.shape != accuracies.shape or sizes.ndim != 1:
        raise ValueError(f"sizes and accuracies must be 1-D of one length, got {sizes.shape} and {accuracies.shape}")
    mask = np.ones(len(sizes), dtype=bool)
    for i in range(len(sizes)):
        dominated = (sizes <= sizes[i]) & (accuracies >= accuracies[i]) & (
            (sizes < sizes[i]) | (accuracies > accuracies[i]))
        mask[i] = not dominated.any()
    return mask


def above_front(size, accuracy, uniform_sizes, uniform_accuracies):
    """True when (size, accuracy) has a higher accuracy than every uniform point of equal or smaller
    size (strictly above the uniform front)."""
    uniform_sizes = np.asarray(uniform_sizes, dtype=np.float64)
    uniform_accuracies = np.asarray(uniform_accuracies, dtype=np.float64)
    beaten = uniform_accuracies[uniform_sizes <= size]
    return bool(len(beaten) == 0 or accuracy > beaten.max())


def plot_pareto(path, uniform, mixed, x_key="size_bytes", title="", x_label=None):
    """Accuracy against ``x_key`` for ``uniform`` and ``mixed`` points (dicts with ``accuracy`` in
    0..1, ``x_key`` and ``label``), the front of all points and the uniform points' front drawn as
    steps."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    from .plots import save_figure

    scale = 1024.0 if x_key == "size_bytes" else 1.0
    figure = Figure(figsize=(7, 4.8))
    ax = figure.subplots()
    every = list(uniform) + list(mixed)
    xs = np.array([p[x_key] / scale for p in every], dtype=np.float64)
    ys = np.array([100 * p["accuracy"] for p in every], dtype=np.float64)
    front = pareto_front(xs, ys)
    for group, marker, colour, name in ((uniform, "o", "C0", "uniform W x A"), (mixed, "*", "C3", "mixed precision")):
        if not group:
            continue
        gx = [p[x_key] / scale for p in group]
        gy = [100 * p["accuracy"] for p in group]
        ax.scatter(gx, gy, marker=marker, color=colour, s=60 if marker == "*" else 25, label=name, zorder=3)
        for p, x, y in zip(group, gx, gy):
            ax.annotate(p.get("label", ""), (x, y), fontsize=5.5, xytext=(3, -8 if marker == "o" else 4),
                        textcoords="offset points")
    if uniform:
        ux = np.array([p[x_key] / scale for p in uniform])
        uy = np.array([100 * p["accuracy"] for p in uniform])
        keep = pareto_front(ux, uy)
        order = np.argsort(ux[keep])
        ax.step(ux[keep][order], uy[keep][order], where="post", color="C0", alpha=0.5, linestyle="--",
                label="uniform front")
    order = np.argsort(xs[front])
    ax.plot(xs[front][order], ys[front][order], color="k", linewidth=1, alpha=0.7, label="front (all points)")
    ax.scatter(xs[front], ys[front], facecolors="none", edgecolors="k", s=110, linewidths=0.8, zorder=4)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_xlabel(x_label or ("model size (KiB, log scale)" if x_key == "size_bytes" else f"{x_key} (log scale)"))
    ax.set_ylabel("test accuracy (%)")
    finite = ys[np.isfinite(ys)]
    if len(finite):
        top = finite.max()
        ax.set_ylim(max(finite.min(), top - 12) - 0.2, top + 0.3)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    save_figure(figure, path)


def _uniform_widths(count, weight_bits, act_bits, keep_first_last):
    widths = [(weight_bits, act_bits)] * count
    if keep_first_last:
        widths[0] = (32, 8 if act_bits <= 8 else act_bits)
        widths[-1] = (32, act_bits)
    return widths


def sweep_pareto(out_dir, records, settings):
    """The Pareto plots of a sweep folder (:func:`lowbit.sweep.write_reports` calls it): its points and
    any mixed-precision points in ``mixed_points.jsonl`` (written by ``lowbit mixed --sweep-dir``), by
    packed file size and by BOPs.  Returns the paths written."""
    from .sensitivity import LayerwisePTQ
    from .sweep import float_model

    mixed = []
    path = os.path.join(out_dir, "mixed_points.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            mixed = [json.loads(line) for line in fh if line.strip()]
    groups = {}
    for record in records:
        groups.setdefault((record["method"], record["weight_bits"], record["act_bits"]), []).append(record)
    if not groups:
        return {}
    ptq = LayerwisePTQ(float_model(settings["arch"]))
    keep = not settings.get("quantize_first_last", False)
    uniform = []
    for (method, wb, ab), group in sorted(groups.items()):
        widths = _uniform_widths(len(ptq.layers), wb, ab, keep)
        uniform.append({"label": f"{method.upper()} W{wb}A{ab}", "accuracy": float(np.mean([r["accuracy"] for r in group])),
                        "size_bytes": float(np.mean([r["size_bytes"] for r in group])), "bops": ptq.bops(widths)})
    files = {"pareto_size": os.path.join(out_dir, "pareto_size.png"),
             "pareto_bops": os.path.join(out_dir, "pareto_bops.png")}
    plot_pareto(files["pareto_size"], uniform, mixed, "size_bytes",
                f"{settings['arch']}: accuracy against packed model size")
    plot_pareto(files["pareto_bops"], uniform, [p for p in mixed if "bops" in p], "bops",
                f"{settings['arch']}: accuracy against bit operations per image",
                x_label="bit operations per image (MACs x weight bits x activation bits, log scale)")
    return files


# The command moved to the command-line layer (issue 23); the old name still works for a release.
__getattr__ = moved_names(__name__, {"mixed_command": "lowbit.cli.mixed"})
