"""Smoke run of experiments/bench_training.py: one network, one thread, one step per contender."""
import importlib.util
import json
import os

import pytest

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_training", os.path.join(EXPERIMENTS, "bench_training.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def smoke_run(tmp_path, network, *extra):
    """One step per contender at one thread; returns the results JSON."""
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    load_bench().main(["--networks", network, "--threads", "1", "--steps", "1", "--repeats", "1", "--warmup", "1",
                       "--profile-steps", "1", "--batch-size", "4", "--out", str(out), *extra])
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_training_writes_ratios_and_the_per_op_table(tmp_path):
    result = smoke_run(tmp_path, "bnn_mlp")
    (run,) = result["runs"]
    assert run["network"] == "bnn_mlp" and run["threads"] == 1
    assert set(run["median_images_per_second"]) == {"lowbit", "lowbit_reference", "torch"}
    assert all(v > 0 for v in run["median_images_per_second"].values())
    ops = run["op_ms_per_step"]
    assert {"QuantAffine.forward", "BatchNorm.backward", "Adam.step+clip", "total"} <= set(ops["after"])
    assert set(ops["before"]) == set(ops["after"])
    assert result["machine"]["cpu_model"] and result["blas"]
    assert "| bnn_mlp | 1 |" in (tmp_path / "bench.md").read_text()


def test_bench_training_names_bad_arguments(capsys):
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])
    assert "--repeats must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_training_mixed16_contender(tmp_path):
    (run,) = smoke_run(tmp_path, "deep_convnet", "--mixed16")["runs"]
    assert run["median_images_per_second"]["lowbit_mixed16"] > 0
    assert run["median_paired_ratio"]["lowbit_mixed16_over_lowbit"] > 0


@pytest.mark.slow
def test_bench_training_im2col_contender_and_op_groups(tmp_path):
    (run,) = smoke_run(tmp_path, "deep_convnet", "--im2col-contender")["runs"]
    assert run["median_paired_ratio"]["lowbit_over_lowbit_im2col"] > 0
    summary = run["op_summary_ms_per_step"]
    assert set(summary) == {"before", "after", "im2col"}
    after = summary["after"]
    assert after["conv forward"] > 0 and after["conv backward-data"] > 0 and after["conv backward-weights"] > 0
    assert summary["im2col"]["conv backward-data"] == 0  # not timed apart on im2col
    parts = sum(v for k, v in after.items() if k != "total")
    assert parts == pytest.approx(after["total"], rel=0.05)
    assert "ms per step by op group" in (tmp_path / "bench.md").read_text()


def test_op_summary_groups_quantized_convolutions():
    summary = load_bench().op_summary({"QuantConv2D.forward": 1.0, "Conv2D.forward": 2.0, "QuantConv2D.backward": 5.0,
                                       "conv kernel: backward-data": 2.0, "conv kernel: backward-weights": 1.5,
                                       "MaxPool2D.backward": 0.5, "ReLU.forward": 0.25, "total": 10.25})
    assert summary["conv forward"] == 3.0 and summary["conv backward, other"] == 1.5
    assert summary["max pool"] == 0.5 and summary["rest"] == 10.25 - 3.0 - 5.0 - 0.5
