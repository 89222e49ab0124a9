"""Smoke run of experiments/bench_training.py: one network, one thread, one step per contender."""
import importlib.util
import json
import os

import pytest

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


@pytest.mark.slow
def test_bench_training_writes_ratios_and_the_per_op_table(tmp_path):
    pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("bench_training", os.path.join(EXPERIMENTS, "bench_training.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--networks", "bnn_mlp", "--threads", "1", "--steps", "1", "--repeats", "1", "--warmup", "1",
                "--profile-steps", "1", "--batch-size", "8", "--out", str(out)])
    result = json.loads(out.read_text())
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
    spec = importlib.util.spec_from_file_location("bench_training", os.path.join(EXPERIMENTS, "bench_training.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])
    assert "--repeats must be >= 1, got 0" in capsys.readouterr().err
