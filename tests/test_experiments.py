"""Smoke runs of the experiment scripts, end to end, on a small fabricated MNIST.

Each script's ``main(argv)`` runs in this process with ``load_mnist`` replaced by a random data set
of the real image shape (10,300 training images, so that the scripts' 10,000 held-out validation
images exist, and 200 test images) and every output folder under ``tmp_path``.  The runs are
one epoch on a few hundred images (``--limit``, ``--eval-limit``): they check the plumbing the
committed results depend on (training, resuming, conversion to the packed model, the results JSON,
the file names of smoke runs), not accuracy.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

import lowbit
import lowbit.data
from lowbit.data import MNIST
from lowbit.packed import load_any

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
N_TRAIN, N_TEST = 10_300, 200


@pytest.fixture(scope="module")
def fake_mnist():
    rng = np.random.default_rng(0)
    return MNIST(rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
                 rng.integers(0, 10, N_TRAIN).astype(np.int64),
                 rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
                 rng.integers(0, 10, N_TEST).astype(np.int64))


@pytest.fixture
def script(monkeypatch, fake_mnist):
    """``script(name)``: the experiment module ``experiments/<name>.py``, loaded afresh, reading the
    fabricated MNIST."""
    monkeypatch.syspath_prepend(EXPERIMENTS)  # the scripts import _common from their folder
    monkeypatch.setattr(lowbit.data, "load_mnist", lambda *args, **kwargs: fake_mnist)

    def load(name):
        spec = importlib.util.spec_from_file_location(f"_experiment_{name}", os.path.join(EXPERIMENTS, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if hasattr(module, "load_mnist"):  # imported at the top of the script
            monkeypatch.setattr(module, "load_mnist", lambda *args, **kwargs: fake_mnist)
        return module

    yield load
    sys.modules.pop("_common", None)


def outputs(tmp_path, *names):
    args = []
    for name in names:
        args += [f"--{name}", str(tmp_path / name)]
    return args + ["--quiet"]


def read_json(path):
    with open(path) as fh:
        return json.load(fh)


@pytest.mark.parametrize("config, extra", [("mlp_det", ["--width", "32"]),
                                           ("mlp_stoch", ["--width", "32", "--draws", "counter"]),
                                           ("cnn", [])])
def test_bnn_mnist_smoke_run_writes_packed_model_and_results(script, tmp_path, config, extra):
    argv = ["--config", config, "--epochs", "1", "--limit", "200", "--eval-limit", "100", *extra,
            *outputs(tmp_path, "runs", "results", "models")]
    result = script("bnn_mnist").main(argv)
    name = result["experiment"]
    assert name.endswith("_limit200_eval100")  # a smoke run never takes the full run's file names
    assert read_json(tmp_path / "results" / f"{name}.json") == json.loads(json.dumps(result))
    assert result["limit"] == 200 and result["eval_limit"] == 100 and result["epochs"] == 1
    assert len(result["history"]) == 1 and 0.0 <= result["test_acc"] <= 1.0
    # The packed model gives the simulated model's labels on every test image, and is what was saved.
    assert result["packed_labels_equal"] == 100
    packed = load_any(str(tmp_path / "models" / f"{name}.npz"))
    x_test = lowbit.data.float_images(lowbit.data.load_mnist().x_test[:100])
    best = lowbit.load_model(str(tmp_path / "runs" / f"{name}_seed0" / "best.npz"))
    np.testing.assert_array_equal(packed.predict(x_test), best.predict(x_test))
    assert result["command"].startswith("python experiments/bnn_mnist.py --config")


def test_bnn_mnist_rerun_resumes_the_finished_run(script, tmp_path):
    argv = ["--config", "mlp_det", "--width", "16", "--epochs", "1", "--limit", "100", "--eval-limit", "50",
            *outputs(tmp_path, "runs", "results", "models")]
    module = script("bnn_mnist")
    first = module.main(argv)
    second = module.main(argv)  # nothing left to train: the same history and model come back
    assert second["history"] == first["history"]
    assert second["test_acc"] == first["test_acc"]


def test_bireal_mnist_smoke_run_both_variants(script, tmp_path):
    argv = ["--widths", "4", "8", "8", "--blocks", "1", "--epochs", "1", "--limit", "200", "--eval-limit", "100",
            "--bn-recalibrate", "200", "--probe-batch", "20", *outputs(tmp_path, "runs", "results", "models")]
    result = script("bireal_mnist").main(argv)
    saved = read_json(tmp_path / "results" / "bireal_mnist_smoke.json")
    assert saved["eval_limit"] == 100 and saved["limit"] == 200
    assert set(result["variants"]) == {"shortcut", "noshortcut"}
    for row in result["variants"].values():
        assert 0.0 <= row["test_acc"] <= 1.0 and row["model"] is None  # smoke runs save no model
        assert all(np.isfinite(v) and v > 0 for v in row["grad_norms_at_init"].values())
    assert not (tmp_path / "models").exists()


def test_ablation_smoke_run_ensembles_and_refuses_other_epochs(script, tmp_path, capsys):
    def argv(epochs):
        return ["--arch", "binary_cnn", "--epochs", str(epochs), "--seeds", "0", "1", "--variants", "base", "aug",
                "--limit", "100", "--eval-limit", "50", "--bn-recalibrate", "100",
                *outputs(tmp_path, "runs", "results", "models")]

    module = script("ablation")
    result = module.main(argv(1))
    assert result["eval_limit"] == 50
    for row in result["variants"].values():
        assert len(row["test_acc"]) == 2 and 0.0 <= row["ensemble_acc"] <= 1.0
        assert all(run["packed_labels_equal"] == 50 for run in row["runs"])
    table = (tmp_path / "results" / "ablation_binary_cnn_smoke.md").read_text()
    assert "first 50 validation and test images only" in table and "| aug |" in table
    with pytest.raises(SystemExit):  # the saved models record 1 epoch; a 2-epoch run may not replace them
        module.main(argv(2))
    assert "holds models of runs with other --epochs" in capsys.readouterr().err


def test_deep_convnet_mnist_modes_and_ensemble_script(script, tmp_path):
    module = script("deep_convnet_mnist")
    common = ["--epochs", "1", "--limit", "200", *outputs(tmp_path, "runs", "results", "models")]
    single = module.main(["single", *common])
    assert single["train_images"] == 200 and len(single["history"]) == 1
    assert (tmp_path / "results" / "deep_convnet_mnist_limit200.json").exists()
    fp16 = module.main(["fp16", *common])  # half-precision inference of the model just saved
    assert fp16["model"].endswith("deep_convnet_mnist_limit200.npz")
    assert fp16["test_acc_fp32"] == single["test_acc"] and 0 <= fp16["labels_changed"] <= N_TEST
    mixed = module.main(["mixed16", *common])
    assert np.isfinite(mixed["history"][0]["loss"]) and "loss_scale" in mixed["history"][0]
    ensemble = module.main(["ensemble", "--members", "2", *common])
    assert len(ensemble["members"]) == 2 and ensemble["best_member_acc"] == max(
        m["test_acc"] for m in ensemble["members"])
    assert not (tmp_path / "models" / "deep_convnet_mnist.npz").exists()  # the full run's name stays free

    members = [str(tmp_path / "models" / f"deep_convnet_mnist_aug_limit200_seed{s}.npz") for s in (0, 1)]
    result = script("ensemble_mnist").main([*members, "--name", "smoke", "--limit", "100",
                                            *outputs(tmp_path, "results")])
    assert result["images"] == 100 and result["ensembles_total"] == 1
    assert [m["test_acc"] for m in result["members"]] == [
        float((load_any(p).predict(lowbit.data.float_images(lowbit.data.load_mnist().x_test[:100]))
               == lowbit.data.load_mnist().y_test[:100]).mean()) for p in members]


def test_recipe_options_in_the_scripts_and_the_ablation_table(script, tmp_path):
    teacher = tmp_path / "teacher.npz"
    from lowbit.zoo import mlp

    lowbit.save_model(mlp(0, hidden=(8,)), str(teacher))
    recipe = ["--stages", "1,1", "--teacher", str(teacher), "--optimizer", "bop", "--rsign"]
    results = tmp_path / "table"
    bnn = script("bnn_mnist").main(
        ["--config", "mlp_det", "--width", "32", "--limit", "200", "--eval-limit", "100", "--loss", "cross_entropy",
         "--label-smoothing", "0.1", *recipe, "--name", "recipes_mlp_all_seed0", "--results", str(results),
         *outputs(tmp_path, "runs", "models")])
    assert bnn["packed_labels_equal"] == 100 and bnn["stage1"]["epochs"] == 1
    assert bnn["recipe"]["optimizer"] == "bop" and bnn["best_test_epoch"] == 1
    bireal = script("bireal_mnist").main(
        ["--widths", "4", "8", "--blocks", "1", "--variants", "shortcut", "--limit", "200", "--eval-limit", "100",
         "--bn-recalibrate", "200", "--probe-batch", "20", "--rprelu", *recipe, "--name", "recipes_bireal_all_seed0",
         "--results", str(results), *outputs(tmp_path, "runs", "models")])
    row = bireal["variants"]["shortcut"]
    assert row["packed_labels_equal"] == 100 and row["stage1"]["epochs"] == 1 and bireal["rprelu"]
    table = script("recipes_table").main([str(results), "--out", str(tmp_path / "recipes")])
    assert table == 0
    text = (tmp_path / "recipes.md").read_text()
    assert "| all | 0 0 |" in text and "| 1+1/1+1 |" in text  # both seeds-0 runs, two stages of 1 epoch


def test_bf16_backward_accuracy_smoke_run(script, tmp_path):
    argv = ["--networks", "bnn_mlp", "--epochs", "1", "--limit", "200", "--eval-limit", "100",
            *outputs(tmp_path, "runs", "results", "models")]
    result = script("bf16_backward_accuracy").main(argv)
    assert [run["backward"] for run in result["runs"]] == ["fp32", "bf16"]
    assert result["test_images"] == 100 and result["train_images"] == 200
    assert (tmp_path / "results" / "bf16_backward_accuracy_limit200_eval100.json").exists()
    models = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert models == ["bf16_backward_bnn_mlp_bf16_limit200_eval100_seed0.npz",
                      "bf16_backward_bnn_mlp_fp32_limit200_eval100_seed0.npz"]
    fp32, bf16 = result["runs"]
    assert fp32["train_loss"] != bf16["train_loss"]  # the rounding reached the weights


def test_outputs_default_to_the_ignored_runs_folder(script, tmp_path):
    """A script run without output options writes under ``runs/`` (git-ignored); the committed
    ``experiments/results`` and ``experiments/models`` are written only when named."""
    import argparse

    script("fuzz_loaders")  # puts experiments/ on sys.path for _common
    import _common

    root = os.path.dirname(EXPERIMENTS)
    with open(os.path.join(root, ".gitignore")) as fh:
        assert "/runs/" in fh.read().split()
    parser = argparse.ArgumentParser()
    _common.add_output_arguments(parser, "runs", "results", "models")
    defaults = vars(parser.parse_args([]))
    for name in ("runs", "results", "models"):
        assert os.path.commonpath([defaults[name], os.path.join(root, "runs")]) == os.path.join(root, "runs")
    asked = vars(parser.parse_args(["--results", "experiments/results", "--models", "experiments/models"]))
    assert (asked["results"], asked["models"]) == ("experiments/results", "experiments/models")
    # a model a script reads is the run's own when there is one, else the committed one
    committed = sorted(name for name in os.listdir(os.path.join(EXPERIMENTS, "models")) if name.endswith(".npz"))[0]
    assert _common.model_input(str(tmp_path), committed) == os.path.join(EXPERIMENTS, "models", committed)
    (tmp_path / committed).write_bytes(b"")
    assert _common.model_input(str(tmp_path), committed) == str(tmp_path / committed)
