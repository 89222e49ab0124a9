"""Per-layer sensitivity and the mixed-precision search (issue 26).

The integer program's choice is checked against enumeration on small problems; a layer at 32 bits
has sensitivity exactly 0; per-layer PTQ with only weights (or only activations) quantized equals
``post_training_quantize``; a mixed model's packed labels equal its simulation's.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lowbit.data
from lowbit.convert import convert
from lowbit.ptq import post_training_quantize
from lowbit.data import MNIST
from lowbit.io import save_model
from lowbit.layers import Affine, BatchNorm, Conv2D, Flatten, MaxPool2D, ReLU
from lowbit.mixed_search import (
    above_front, choose_widths, enumerate_allocation, pareto_front, solve_allocation,
)
from lowbit.model import Model
from lowbit.sensitivity import (
    LayerwisePTQ, hessian_traces, measure_sensitivity, rank_correlation, write_sensitivity_reports,
)



def small_cnn(seed=0):
    layers = [Conv2D(1, 4, 3, padding=1, seed=seed), ReLU(), MaxPool2D(2, 2), Conv2D(4, 6, 3, padding=1, seed=seed + 1),
              BatchNorm(6), ReLU(), MaxPool2D(2, 2), Flatten(), Affine(6 * 7 * 7, 16, seed=seed + 2), ReLU(),
              Affine(16, 10, seed=seed + 3)]
    return Model(layers, input_shape=(1, 28, 28), name="small_cnn")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    x = rng.random((120, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 120)
    return x, y


@pytest.fixture(scope="module")
def ptq(images):
    return LayerwisePTQ(small_cnn(), images[0][:60], seed=0)


# -- the integer program --------------------------------------------------------------------------------
def random_problem(draw_layers, draw_options, budgets_count, rng, integer=True):
    costs, resources = [], []
    for _ in range(draw_layers):
        n = int(rng.integers(1, draw_options + 1))
        costs.append(rng.random(n).round(3).tolist())
        r = rng.integers(0, 20, (n, budgets_count)).astype(float) if integer else rng.random((n, budgets_count)) * 20
        resources.append(r)
    low = sum(r.min(axis=0) for r in resources)
    high = sum(r.max(axis=0) for r in resources)
    budgets = low + rng.random(budgets_count) * (high - low + 3) - 1
    return costs, resources, budgets


@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 4), st.integers(1, 2))
def test_integer_program_matches_enumeration(seed, layers, options, budgets_count):
    pytest.importorskip("scipy")
    costs, resources, budgets = random_problem(layers, options, budgets_count, np.random.default_rng(seed))
    expected, expected_cost = enumerate_allocation(costs, resources, budgets)
    got = solve_allocation(costs, resources, budgets, solver="milp")
    if expected is None:
        assert got["choice"] is None
    else:
        assert got["optimal"] and got["cost"] == pytest.approx(expected_cost, abs=1e-9)
        assert np.all(np.array(got["used"]) <= budgets + 1e-9)


@given(st.integers(0, 10_000), st.integers(1, 5), st.integers(1, 4))
def test_dynamic_program_matches_enumeration(seed, layers, options):
    costs, resources, budgets = random_problem(layers, options, 1, np.random.default_rng(seed))
    expected, expected_cost = enumerate_allocation(costs, resources, budgets)
    got = solve_allocation(costs, [r[:, 0] for r in resources], budgets[0], solver="dp")
    if expected is None:
        assert got["choice"] is None
    else:
        assert got["cost"] == pytest.approx(expected_cost, abs=1e-9)
        assert got["used"][0] <= budgets[0] + 1e-9


def test_hand_made_knapsack_where_greedy_is_not_optimal():
    # Two layers, options (cost, size): the best is the middle option of both (cost 2, size 10), which
    # the greedy descent from the cheapest-cost options misses.
    costs = [[0.0, 1.0, 5.0], [0.0, 1.0, 5.0]]
    sizes = [np.array([8.0, 5.0, 1.0]), np.array([8.0, 5.0, 1.0])]
    expected, cost = enumerate_allocation(costs, sizes, 10.0)
    assert expected == [1, 1] and cost == 2.0
    assert solve_allocation(costs, sizes, 10.0, solver="dp")["choice"] == [1, 1]
    greedy = solve_allocation(costs, sizes, 10.0, solver="greedy")
    assert not greedy["optimal"] and greedy["used"][0] <= 10.0
    if importlib.util.find_spec("scipy") is not None:
        assert solve_allocation(costs, sizes, 10.0, solver="milp")["choice"] == [1, 1]
    assert solve_allocation(costs, sizes, 1.0)["choice"] is None  # nothing fits


def test_solver_errors_name_the_argument():
    with pytest.raises(ValueError, match="solver must be one of"):
        solve_allocation([[1.0]], [np.array([1.0])], 1.0, solver="best")
    with pytest.raises(ValueError, match="layer 0"):
        solve_allocation([[1.0, 2.0]], [np.array([1.0])], 1.0)
    with pytest.raises(ValueError, match="one budget"):
        solve_allocation([[1.0]], [np.array([[1.0, 1.0]])], [1.0, 1.0], solver="dp")


# -- sensitivity -----------------------------------------------------------------------------------------
def test_layer_at_32_bits_has_zero_sensitivity(ptq, images):
    x, y = images
    measured = measure_sensitivity(ptq, x, y, widths=(32, 4, 1), progress=False)
    rows = measured["rows"]
    assert len(rows) == len(ptq.layers) * 2 * 3
    for row in rows:
        if row["bits"] == 32:
            assert row["accuracy_drop"] == 0.0 and row["loss_increase"] == 0.0
    # the suffix-only evaluation is the whole model's evaluation
    for row in rows[:6]:
        pair = (row["bits"], 32) if row["kind"] == "weight" else (32, row["bits"])
        widths = [(32, 32)] * len(ptq.layers)
        widths[row["layer"]] = pair
        assert ptq.build(widths).evaluate(x, y) == row["accuracy"]


def test_uniform_weight_only_and_activation_only_equal_post_training_quantize(images):
    model = small_cnn(3)
    x = images[0]
    ptq = LayerwisePTQ(model, x[:60], seed=0)
    n = len(ptq.layers)
    for bits in (1, 2, 8):
        expected = post_training_quantize(model, bits, 32).predict_scores(x)
        got = ptq.build([(32, 32)] + [(bits, 32)] * (n - 2) + [(32, 32)]).predict_scores(x)
        assert np.array_equal(got, expected)
    for bits in (2, 4, 8):
        expected = post_training_quantize(model, 32, bits, x[:60]).predict_scores(x)
        got = ptq.build([(32, 8)] + [(32, bits)] * (n - 1)).predict_scores(x)
        assert np.array_equal(got, expected)


def test_mixed_model_packed_labels_equal_simulation(ptq, images):
    x = images[0]
    widths = [(8, 8), (1, 2), (2, 1), (4, 16)]
    model = ptq.build(widths)
    packed = convert(model)
    assert np.array_equal(packed.predict(x), model.predict(x))
    assert ptq.model_bytes(widths) < ptq.model_bytes([(8, 8)] * 4)
    assert ptq.bops(widths) == sum(i.macs * w * a for i, (w, a) in zip(ptq.layers, widths))


def test_widths_are_checked(ptq):
    with pytest.raises(ValueError, match="one \\(weight_bits, activation_bits\\) pair per quantizable layer"):
        ptq.build([(4, 4)])
    with pytest.raises(ValueError, match="widths\\[1\\] weight bits must be one of"):
        ptq.build([(4, 4), (3.5, 4), (4, 4), (4, 4)])


def test_hessian_traces_are_positive_and_scores_reported(ptq, images, tmp_path):
    x, y = images
    traces = hessian_traces(ptq, x[:40], y[:40], samples=3, progress=False)
    assert all(t > 0 for t in traces["weight_trace"]) and all(t > 0 for t in traces["activation_trace"])
    measured = measure_sensitivity(ptq, x, y, widths=(1, 2), progress=False)
    files, rows = write_sensitivity_reports(str(tmp_path), ptq, measured, traces, title="small")
    assert all(r["hessian_score"] is not None and r["hessian_score"] >= 0 for r in rows)
    assert open(files["heatmap"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "Spearman" in open(files["table"]).read()


def test_rank_correlation():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)  # ties share ranks
    assert np.isnan(rank_correlation([1, 1], [2, 3]))


def test_choose_widths_respects_the_budget_and_prefers_insensitive_layers(ptq):
    # Hand-made sensitivities: layer 1's weights are very sensitive below 8 bits, the others not at all.
    rows = []
    for layer in range(len(ptq.layers)):
        for kind in ("weight", "activation"):
            for bits in (1, 2, 4, 8):
                loss = (1.0 / bits if (layer == 1 and kind == "weight" and bits < 8) else 0.001 / bits)
                rows.append({"layer": layer, "kind": kind, "bits": bits, "loss_increase": loss, "accuracy_drop": 0.0})
    budget = ptq.model_bytes([(2, 8)] * len(ptq.layers)) / 1024
    choice = choose_widths(ptq, rows, size_kib=budget)
    assert ptq.model_bytes(choice["widths"]) <= budget * 1024 + 1e-9
    assert choice["widths"][1][0] == 8
    assert choose_widths(ptq, rows, size_kib=budget, solver="dp")["predicted_cost"] == pytest.approx(
        choice["predicted_cost"])


# -- the front ------------------------------------------------------------------------------------------
def test_pareto_front_and_above_front():
    sizes = [10, 20, 20, 30, 40]
    accuracy = [0.9, 0.95, 0.93, 0.95, 0.97]
    assert pareto_front(sizes, accuracy).tolist() == [True, True, False, False, True]
    assert above_front(25, 0.96, sizes, accuracy)
    assert not above_front(25, 0.95, sizes, accuracy)  # equal is not above
    assert above_front(5, 0.1, sizes, accuracy)  # nothing uniform that small


# -- the commands ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fake_mnist():
    rng = np.random.default_rng(0)
    return MNIST(rng.integers(0, 256, (10_300, 28, 28), dtype=np.uint8), rng.integers(0, 10, 10_300).astype(np.int64),
                 rng.integers(0, 256, (100, 28, 28), dtype=np.uint8), rng.integers(0, 10, 100).astype(np.int64))


def test_sensitivity_and_mixed_commands(tmp_path, fake_mnist, monkeypatch, capsys):
    from lowbit.cli import main

    monkeypatch.setattr(lowbit.data, "load_mnist", lambda *args, **kwargs: fake_mnist)
    path = tmp_path / "float.npz"
    save_model(small_cnn(), str(path))
    out = tmp_path / "sens"
    assert main(["sensitivity", str(path), "--out", str(out), "--images", "100", "--calibrate", "100",
                 "--hessian-images", "20", "--hessian-samples", "2", "--quiet"]) == 0
    assert (out / "sensitivity.csv").exists() and (out / "sensitivity.png").exists()
    packed = tmp_path / "mixed.npz"
    assert main(["mixed", str(path), "-o", str(packed), "--budget-kib", "6", "--sensitivity",
                 str(out / "sensitivity.csv"), "--images", "100", "--calibrate", "100", "--fix", "0=w8a8",
                 "--finetune-epochs", "1", "--finetune-images", "200", "--quiet"]) == 0
    result = json.loads((tmp_path / "mixed.json").read_text())
    assert result["labels_equal"] == result["test_images"] == 100
    assert result["widths"][0] == [8, 8] and result["estimated_bytes"] <= 6 * 1024
    assert main(["mixed", str(path), "-o", str(packed), "--budget-kib", "0.01", "--sensitivity",
                 str(out / "sensitivity.csv"), "--quiet"]) == 2
    assert "no choice of widths fits" in capsys.readouterr().err


@pytest.mark.slow
def test_experiment_script_smoke(tmp_path, fake_mnist, monkeypatch):
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
    monkeypatch.syspath_prepend(here)
    monkeypatch.setattr(lowbit.data, "load_mnist", lambda *args, **kwargs: fake_mnist)
    spec = importlib.util.spec_from_file_location("_experiment_mixed_precision", os.path.join(here, "mixed_precision.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "load_mnist", lambda *args, **kwargs: fake_mnist)
    argv = ["--arch", "sfc", "--limit", "50", "--images", "100", "--sfc-epochs", "1", "--hessian-images", "20",
            "--hessian-samples", "2", "--finetune-images", "100", "--calibrate", "100", "--keep-act-bits", "4",
            "--quiet"]
    for name in ("results", "models", "runs"):
        argv += [f"--{name}", str(tmp_path / name)]
    try:
        assert module.main(argv) == 0
    finally:
        sys.modules.pop("_common", None)
    folder = tmp_path / "results" / "mixed_sfc_limit50"
    document = json.loads((folder / "results.json").read_text())
    mixed = [p for p in document["points"] if p["kind"] == "mixed"]
    assert mixed and all(p["labels_equal"] == p["test_images"] for p in mixed)
    assert (folder / "pareto_size.png").exists() and (folder / "pareto_bops.png").exists()
    assert not (tmp_path / "models" / "sfc_float.npz").exists()  # a smoke run keeps its model elsewhere


def test_sweep_reports_draw_the_front_with_mixed_points(tmp_path):
    from lowbit.mixed_search import sweep_pareto

    records = [{"method": "ptq", "weight_bits": wb, "act_bits": ab, "seed": 0, "accuracy": 0.9 + 0.01 * wb,
                "size_bytes": 1000 * wb} for wb in (1, 2, 4) for ab in (2, 4)]
    (tmp_path / "mixed_points.jsonl").write_text(json.dumps(
        {"label": "mixed", "accuracy": 0.95, "size_bytes": 2500, "bops": 10_000}) + "\n")
    files = sweep_pareto(str(tmp_path), records, {"arch": "tfc", "quantize_first_last": True})
    for path in files.values():
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
