"""Bit-width sweeps: the quick sweep's files, resumption after a finished or interrupted run, errors.

Everything runs on synthetic digits (no network, no MNIST cache) with the quick grid W {1, 32} x
A {1, 32} and both methods: 8 points per seed.
"""
import csv
import json
import os
import shutil
import types

import numpy as np
import pytest

from lowbit import sweep
from lowbit.cli import main as cli_main
from lowbit.trainer import Trainer

GRID_POINTS = 8  # 2 weight widths x 2 activation widths x 2 methods


def synthetic_mnist(n_train=1100, n_test=200, seed=0):
    """Ten 28x28 binary class templates, each image a copy with 10% of its pixels flipped."""
    rng = np.random.default_rng(seed)
    templates = rng.random((10, 28, 28)) < 0.3

    def draw(n):
        y = rng.integers(0, 10, n)
        noisy = templates[y] ^ (rng.random((n, 28, 28)) < 0.1)
        return (noisy * 255).astype(np.uint8), y.astype(np.int64)

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return types.SimpleNamespace(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


DATA = synthetic_mnist()


def quick(out_dir, **options):
    options.setdefault("progress", False)
    return sweep.run_sweep("tfc", out_dir=str(out_dir), quick=True, data=DATA, **options)


def read_lines(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def test_quick_sweep_writes_every_report_and_resumes(tmp_path):
    result = quick(tmp_path)
    assert (result.new_points, result.skipped_points) == (GRID_POINTS, 0)
    for name in ("results.csv", "results.json", "table.md", "accuracy_vs_bits.png",
                 "accuracy_vs_size.png", "points.jsonl", "sweep.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == GRID_POINTS
    assert {(r["method"], r["weight_bits"], r["act_bits"]) for r in rows} == {
        (m, w, a) for m in ("ptq", "qat") for w in ("1", "32") for a in ("1", "32")}
    doc = json.loads((tmp_path / "results.json").read_text())
    assert len(doc["points"]) == GRID_POINTS and doc["brevitas_reference"]["1W1A"] == 93.17
    for point in doc["points"]:
        assert 0 <= point["accuracy"] <= 1
        assert point["accuracy"] == point["simulation_accuracy"]  # packed == simulation
        assert point["size_bytes"] == os.path.getsize(tmp_path / point["packed_file"])
        assert point["epochs"] == 1 and point["test_images"] == 200
    sizes = {(p["method"], p["weight_bits"], p["act_bits"]): p["size_bytes"] for p in doc["points"]}
    assert sizes["qat", 1, 1] * 5 < sizes["qat", 32, 32]  # the binary model is much smaller
    # The float baseline is one model for both methods.
    ptq_float = [p for p in doc["points"] if p["weight_bits"] == p["act_bits"] == 32]
    assert ptq_float[0]["accuracy"] == ptq_float[1]["accuracy"]
    table = (tmp_path / "table.md").read_text()
    assert "## PTQ" in table and "## QAT" in table and "| 1W1A | 93.17 |" in table
    assert (tmp_path / "accuracy_vs_bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = (tmp_path / "points.jsonl").read_bytes()
    reports = {name: (tmp_path / name).read_bytes() for name in ("results.csv", "results.json", "table.md")}
    again = quick(tmp_path)
    assert (again.new_points, again.skipped_points) == (0, GRID_POINTS)
    assert (tmp_path / "points.jsonl").read_bytes() == before
    assert len(again.records) == GRID_POINTS
    # a resumed sweep (its records read back from points.jsonl) writes the same reports as a fresh one
    for name, content in reports.items():
        assert (tmp_path / name).read_bytes() == content, name

    # the reports alone, from the points: the same files, nothing trained
    for name in reports:
        (tmp_path / name).unlink()
    result = sweep.report_sweep(tmp_path)
    assert (result.new_points, result.skipped_points, len(result.records)) == (0, GRID_POINTS, GRID_POINTS)
    for name, content in reports.items():
        assert (tmp_path / name).read_bytes() == content, name
    assert cli_main(["sweep-report", str(tmp_path)]) == 0
    assert (tmp_path / "points.jsonl").read_bytes() == before
    # a line still being written by a running sweep is skipped, and the file is left alone
    with open(tmp_path / "points.jsonl", "ab") as fh:
        fh.write(b'{"accuracy": 0.5, "arch"')
    assert len(sweep.report_sweep(tmp_path).records) == GRID_POINTS
    assert (tmp_path / "points.jsonl").read_bytes() == before + b'{"accuracy": 0.5, "arch"'
    with pytest.raises(FileNotFoundError, match="holds no sweep"):
        sweep.report_sweep(tmp_path / "runs")



def test_reports_include_points_of_another_process(tmp_path, monkeypatch):
    """Two sweeps on one folder, each on its own cells: the reports written at the end of one include
    the points the other appended meanwhile, with no ``sweep-report`` needed."""
    first = quick(tmp_path, methods=["ptq"], weight_bits=[32], activation_bits=[32])
    (other,) = first.records
    other_line = json.dumps(dict(other, seed=7)) + "\n"  # a point "another process" finishes
    real_append = sweep.runner.append_point

    def append_then_other(path, record):
        real_append(path, record)
        with open(path, "a") as fh:
            fh.write(other_line)

    monkeypatch.setattr(sweep.runner, "append_point", append_then_other)
    result = quick(tmp_path, methods=["ptq"], weight_bits=[32], activation_bits=[1])
    assert result.new_points == 1
    points = json.loads((tmp_path / "results.json").read_text())["points"]
    assert sorted((p["act_bits"], p["seed"]) for p in points) == [(1, 0), (32, 0), (32, 7)]
    assert len(result.records) == 3

def test_interrupted_sweep_resumes_mid_training(tmp_path, monkeypatch):
    """Interrupted in the second epoch of the first QAT run: the rerun skips the finished points and
    continues that run from its checkpoint."""
    real_epoch = Trainer.train_epoch
    calls = []

    def interrupting(self, x, y, lr):
        calls.append(self.out_dir)
        if len(calls) == 4:  # float model: epochs 1, 2; first QAT run: epoch 1, then here
            raise KeyboardInterrupt
        return real_epoch(self, x, y, lr)

    monkeypatch.setattr(Trainer, "train_epoch", interrupting)
    with pytest.raises(KeyboardInterrupt):
        quick(tmp_path, epochs=2)
    done = read_lines(tmp_path / "points.jsonl")
    assert sorted((p["method"], p["weight_bits"], p["act_bits"]) for p in done) == [
        ("ptq", w, a) for w in (1, 32) for a in (1, 32)]
    assert os.path.exists(tmp_path / "runs" / "qat_w1a1_seed0" / "checkpoint.npz")
    assert json.loads((tmp_path / "results.json").read_text())["points"]  # reports of what finished

    calls.clear()
    monkeypatch.setattr(Trainer, "train_epoch", lambda self, x, y, lr: (
        calls.append(self.out_dir), real_epoch(self, x, y, lr))[1])
    result = quick(tmp_path, epochs=2)
    assert (result.new_points, result.skipped_points) == (4, 4)
    # 1 epoch left of the interrupted run, 2 each for w1a32 and w32a1, none for w32a32 (the float model)
    assert len(calls) == 5
    assert sum(os.path.basename(c) == "qat_w1a1_seed0" for c in calls) == 1
    history = json.loads((tmp_path / "runs" / "qat_w1a1_seed0" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert not os.path.exists(tmp_path / "runs" / "qat_w1a1_seed0" / "checkpoint.npz")  # cleaned up
    assert len(read_lines(tmp_path / "points.jsonl")) == GRID_POINTS


def test_torn_last_line_is_dropped_and_redone(tmp_path):
    quick(tmp_path, methods=("ptq",))
    path = tmp_path / "points.jsonl"
    raw = path.read_bytes()
    path.write_bytes(raw[:-20])  # the last record half-written
    result = quick(tmp_path, methods=("ptq",))
    assert (result.new_points, result.skipped_points) == (1, 3)
    assert len(read_lines(path)) == 4


def test_several_seeds_show_the_spread(tmp_path):
    result = quick(tmp_path, seeds=(0, 1), methods=("ptq",), weight_bits=(1,), activation_bits=(32,))
    assert result.new_points == 2
    accuracies = [r["accuracy"] * 100 for r in result.records]
    table = (tmp_path / "table.md").read_text()
    expected = f"{np.mean(accuracies):.2f} ± {np.std(accuracies, ddof=1):.2f}"
    assert expected in table


def test_changed_settings_are_refused(tmp_path):
    quick(tmp_path, methods=("ptq",), weight_bits=(32,), activation_bits=(32,))
    with pytest.raises(ValueError, match="other settings.*epochs: 1 there, 2 now"):
        quick(tmp_path, methods=("ptq",), weight_bits=(32,), activation_bits=(32,), epochs=2)
    # a larger grid is fine
    result = quick(tmp_path, methods=("ptq",), weight_bits=(1, 32), activation_bits=(32,))
    assert (result.new_points, result.skipped_points) == (1, 1)


@pytest.mark.parametrize("options, message", [
    ({"arch": "resnet"}, r"arch must be one of \['tfc', 'sfc', 'lfc', 'deep_convnet'\], got 'resnet'"),
    ({"weight_bits": (1, 12)}, r"weight_bits must each be one of 1..8, 16 \(fp16\), 32 \(float\), got 12"),
    ({"activation_bits": (0,)}, r"activation_bits must each be one of 1..8, 16 \(fp16\), 32 \(float\), got 0"),
    ({"methods": ("ptq", "finetune")}, r"methods must each be one of \['ptq', 'qat'\], got 'finetune'"),
    ({"seeds": (-1,)}, r"seeds must be an int >= 0, got -1"),
    ({"epochs": 0}, r"epochs must be an int >= 1, got 0"),
    ({"schedule": "step"}, r"schedule must be one of"),
    ({"val_size": 5000}, r"val_size must be in \[0, 1100\), got 5000"),
    ({"val_size": -1}, r"val_size must be an int >= 0, got -1"),
    ({"device": "tpu"}, r"device must be 'cpu' or 'gpu', got 'tpu'"),
])
def test_bad_arguments_are_clear(tmp_path, options, message):
    arch = options.pop("arch", "tfc")
    with pytest.raises(ValueError, match=message):
        sweep.run_sweep(arch, out_dir=str(tmp_path), quick=True, data=DATA, progress=False, **options)
    assert not os.path.exists(tmp_path / "points.jsonl")


def test_gpu_device_without_cupy_is_refused_before_any_training(tmp_path, monkeypatch):
    from lowbit import backend

    monkeypatch.setattr(backend, "cupy", None)
    with pytest.raises(RuntimeError, match="device='gpu' needs CuPy and a CUDA device"):
        sweep.run_sweep("tfc", out_dir=str(tmp_path), quick=True, data=DATA, progress=False, device="gpu")
    assert not os.path.exists(tmp_path / "points.jsonl")


def test_three_bits_are_valid():
    assert sweep.settings.check_bits_list("weight_bits", (3, 1, 3), "weight") == (1, 3)


@pytest.mark.parametrize("arch", ["tfc", "deep_convnet"])
def test_models_per_point(arch):
    from lowbit.layers import Affine, ReLU
    from lowbit.quant_layers import QuantAffine, QuantConv2D

    kinds = {type(layer) for _, layer in sweep.float_model(arch).named_layers()}
    assert {Affine} <= kinds and not kinds & {QuantAffine, QuantConv2D}  # PTQ can take it
    for act_bits in (1, 32):
        model = sweep.qat_model(arch, 1, act_bits)
        kinds = [type(layer) for _, layer in model.named_layers()]
        assert QuantAffine in kinds
        assert (ReLU in kinds) == (act_bits == 32)  # never a linear network at 32-bit activations


def test_cli_sweep(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("lowbit.data.load_mnist", lambda progress=True: DATA)
    out = tmp_path / "cli"
    code = cli_main(["sweep", "--arch", "tfc", "--quick", "--methods", "ptq", "--weight-bits", "32",
                     "--act-bits", "1", "32", "--out", str(out), "--quiet"])
    assert code == 0
    assert "2 new points, 0 already done" in capsys.readouterr().out
    assert cli_main(["sweep", "--arch", "tfc", "--quick", "--weight-bits", "12", "--out", str(out),
                     "--quiet"]) == 2
    assert "weight_bits must each be one of 1..8, 16 (fp16), 32 (float), got 12" in capsys.readouterr().err
    model_file = tmp_path / "float.npz"
    import lowbit
    lowbit.save_model(sweep.float_model("tfc"), str(model_file))
    assert cli_main(["sweep", "--arch", "tfc", "--quick", "--methods", "ptq", "--weight-bits", "32",
                     "--act-bits", "32", "--pretrained", str(model_file), "--out", str(tmp_path / "pre"),
                     "--quiet"]) == 0
    assert json.loads((tmp_path / "pre" / "sweep.json").read_text())["pretrained"]["file"] == "float.npz"
    with pytest.raises(SystemExit):
        cli_main(["sweep", "--arch", "vgg"])
    assert "invalid choice: 'vgg'" in capsys.readouterr().err



def test_cli_passes_every_sweep_option(tmp_path, monkeypatch):
    """``lowbit sweep``, the one entry point of sweeps (``experiments/bitwidth_sweep.py`` is gone): its
    flags reach :func:`run_sweep` as its keyword arguments."""
    calls = []

    class Recorded(Exception):
        pass

    def record(arch, **kwargs):
        calls.append((arch, kwargs))
        raise Recorded  # stop before any report is read

    monkeypatch.setattr(sweep, "run_sweep", record)
    flags = ["--arch", "sfc", "--seeds", "1", "2", "--methods", "qat", "--weight-bits", "1", "--act-bits", "2",
             "--epochs", "3", "--lr", "0.02", "--lr-end", "0.001", "--schedule", "cosine", "--limit", "500",
             "--val", "100", "--init", "uniform", "--loss", "squared_hinge", "--qat-init", "ptq",
             "--activation-clipping", "max", "--track-test", "--quiet"]
    with pytest.raises(Recorded):
        cli_main(["sweep"] + flags + ["--out", str(tmp_path / "sweep_sfc")])
    ((arch, direct),) = calls
    assert arch == "sfc"
    assert direct["out_dir"] == str(tmp_path / "sweep_sfc")
    assert direct["schedule"] == "cosine" and direct["lr_end"] == 0.001 and direct["train_limit"] == 500
    assert direct["init"] == "uniform" and direct["seeds"] == [1, 2] and direct["progress"] is False
    assert direct["track_test"] is True


def test_ptq_of_a_pretrained_model(tmp_path):
    """``pretrained``: PTQ starts from the given file; its 32/32 point is that model, nothing is trained."""
    import lowbit
    from lowbit.data import float_images

    model = sweep.float_model("tfc", seed=3)
    Trainer(model, epochs=1, batch_size=100, progress=False).fit(float_images(DATA.x_train[:500]),
                                                                 DATA.y_train[:500])
    path = tmp_path / "mine.npz"
    lowbit.save_model(model, str(path), {"epoch": 1})
    out = tmp_path / "sweep"
    result = quick(out, methods=("ptq",), weight_bits=(2, 32), activation_bits=(32,), pretrained=str(path))
    assert result.new_points == 2
    assert not (out / "runs").exists()  # no float model trained
    points = {r["weight_bits"]: r for r in result.records}
    x_test = float_images(DATA.x_test[:300])
    assert points[32]["accuracy"] == model.evaluate(x_test, DATA.y_test[:300])
    assert points[32]["float_file_bytes"] == os.path.getsize(path)
    assert "mine.npz" in points[2]["source"]
    settings = json.loads((out / "sweep.json").read_text())
    assert settings["pretrained"]["file"] == "mine.npz" and len(settings["pretrained"]["sha256"]) == 64
    assert "PTQ of the trained float model mine.npz" in (out / "table.md").read_text()
    assert settings["ptq_weight_clipping"] == "mse" and "least-squared-error range" in (out / "table.md").read_text()
    assert settings["ptq_activation_clipping"] == "mse" and "activations over theirs" in (out / "table.md").read_text()
    with pytest.raises(ValueError, match="ptq_weight_clipping: 'mse' there, 'max' now"):
        quick(out, methods=("ptq",), weight_bits=(2, 32), activation_bits=(32,), pretrained=str(path),
              weight_clipping="max")
    # the activations' "max" adds no key (sweeps made before the option keep theirs) and says so
    quick(tmp_path / "amax", methods=("ptq",), weight_bits=(2,), activation_bits=(2,), pretrained=str(path),
          activation_clipping="max")
    assert "ptq_activation_clipping" not in json.loads((tmp_path / "amax" / "sweep.json").read_text())
    assert "activations over their calibrated maximum" in (tmp_path / "amax" / "table.md").read_text()
    # another file content under the same out_dir is refused; a model of another arch too
    lowbit.save_model(sweep.float_model("tfc", seed=4), str(path))
    with pytest.raises(ValueError, match="other settings.*pretrained"):
        quick(out, methods=("ptq",), weight_bits=(2, 32), activation_bits=(32,), pretrained=str(path))
    lowbit.save_model(sweep.float_model("sfc"), str(tmp_path / "sfc.npz"))
    with pytest.raises(ValueError, match="pretrained must be a float tfc model .* holds 'sfc_float'"):
        quick(tmp_path / "other", methods=("ptq",), pretrained=str(tmp_path / "sfc.npz"))


def test_qat_fine_tuned_from_the_ptq_model(tmp_path, monkeypatch):
    """qat_init="ptq": each QAT point starts from that point's PTQ model (so, untrained, it scores
    what PTQ scores), trains for ``epochs``, and the settings and reports say so."""
    import lowbit
    from lowbit.data import float_images

    model = sweep.float_model("tfc", seed=3)
    Trainer(model, epochs=1, batch_size=100, progress=False).fit(float_images(DATA.x_train[:500]),
                                                                 DATA.y_train[:500])
    path = tmp_path / "float.npz"
    lowbit.save_model(model, str(path), {"epoch": 1})
    starts = []

    def no_training(start, run_dir, split, settings, epochs, seed, progress, keep_checkpoints=False, device="cpu"):
        starts.append((os.path.basename(run_dir), epochs))
        os.makedirs(run_dir, exist_ok=True)
        lowbit.save_model(start, os.path.join(run_dir, "best.npz"))
        return start, {"val_accuracy": 0.5, "best_epoch": 0, "train_seconds": 0.0, "epochs": epochs}

    monkeypatch.setattr(sweep.runner, "train", no_training)
    out = tmp_path / "ft"
    result = quick(out, methods=("ptq", "qat"), weight_bits=(2, 32), activation_bits=(2, 32), pretrained=str(path),
                   qat_init="ptq", epochs=3)
    assert sorted(starts) == [(f"qat_w{w}a{a}_seed0", 3) for w in (2, 32) for a in (2, 32)]
    by = {(r["method"], r["weight_bits"], r["act_bits"]): r for r in result.records}
    for w in (2, 32):
        for a in (2, 32):
            assert by["qat", w, a]["accuracy"] == by["ptq", w, a]["accuracy"]
            assert by["qat", w, a]["source"] == "quantization-aware fine-tuning of the point's PTQ model"
    settings = json.loads((out / "sweep.json").read_text())
    assert settings["qat"] == "fine-tuning each point's PTQ model"
    assert "## QAT: quantization-aware training fine-tuning each point's PTQ model" in (out / "table.md").read_text()
    # a QAT-only sweep fine-tuned from PTQ records the clippings that shaped its start
    quick(tmp_path / "qat_only", methods=("qat",), weight_bits=(2,), activation_bits=(2,), pretrained=str(path),
          qat_init="ptq")
    settings = json.loads((tmp_path / "qat_only" / "sweep.json").read_text())
    assert settings["ptq_weight_clipping"] == settings["ptq_activation_clipping"] == "mse"
    with pytest.raises(ValueError, match=r"qat_init must be one of \['scratch', 'ptq'\], got 'float'"):
        quick(tmp_path / "bad", qat_init="float")


def test_qat_only_sweeps_keep_their_settings_key(tmp_path):
    """PTQ's weight clipping enters the settings only when the sweep has PTQ points, so QAT-only
    sweeps made before it existed still resume."""
    quick(tmp_path, methods=("qat",), weight_bits=(32,), activation_bits=(32,))
    settings = json.loads((tmp_path / "sweep.json").read_text())
    assert "ptq_weight_clipping" not in settings and "ptq_activation_clipping" not in settings
    with pytest.raises(ValueError, match="weight_clipping must be one of"):
        quick(tmp_path / "bad", weight_clipping="none")
    with pytest.raises(ValueError, match="activation_clipping must be one of"):
        quick(tmp_path / "bad", activation_clipping="none")
    assert not (tmp_path / "bad").exists()  # refused before any work


def test_val_size_zero_trains_on_every_image_and_reports_the_last_epoch(tmp_path, monkeypatch):
    """``val_size=0`` (Brevitas' protocol with ``track_test``): no validation, every training image in
    each epoch, and each point is its run's last-epoch model."""
    seen = []
    fit = Trainer.fit

    def recording_fit(self, x_train, y_train, x_val=None, y_val=None, *rest, **options):
        seen.append((len(x_train), x_val))
        return fit(self, x_train, y_train, x_val, y_val, *rest, **options)

    monkeypatch.setattr(Trainer, "fit", recording_fit)
    grid = dict(seeds=(0,), weight_bits=(1,), activation_bits=(1,), epochs=2, val_size=0, track_test=True,
                keep_checkpoints=True)
    result = quick(tmp_path, **grid)
    assert seen == [(len(DATA.x_train), None)] * 2  # the float model (for PTQ) and the QAT run
    for record in result.records:
        assert record["val_accuracy"] is None and record["best_epoch"] == 2 and record["epochs"] == 2
        run = tmp_path / record["run_dir"]
        history = json.loads((run / "result.json").read_text())["history"]
        assert len(history) == 2 and all("val_acc" not in epoch for epoch in history)
        assert (run / "best.npz").read_bytes() == (run / "model.npz").read_bytes()  # the last epoch's
        if record["method"] == "qat":
            assert record["best_test_accuracy"] == max(epoch["test_acc"] for epoch in history)
            assert record["simulation_accuracy"] == history[-1]["test_acc"]
    assert json.loads((tmp_path / "sweep.json").read_text())["val_size"] == 0
    table = (tmp_path / "table.md").read_text()
    assert "trained on every training image (no validation), the last epoch's model reported" in table
    assert "each run's last-epoch model (no images held out)" in table and "held-out" not in table
    again = quick(tmp_path, **grid)
    assert (again.new_points, again.skipped_points) == (0, 2) and len(seen) == 2


def test_histories_are_copied_beside_the_reports_and_outlive_the_runs(tmp_path):
    """Each point's per-epoch history goes to ``histories/<point>.json`` (committed with the results),
    equal to its run's; a fresh checkout, where ``runs/`` is gone, keeps the copies as they are."""
    result = quick(tmp_path, seeds=(0,), weight_bits=(1,), activation_bits=(1,), epochs=2, track_test=True)
    assert result.files["histories"] == os.path.join(str(tmp_path), "histories")
    names = sorted(p.name for p in (tmp_path / "histories").iterdir())
    assert names == ["ptq_w1a1_seed0.json", "qat_w1a1_seed0.json"]
    for record in result.records:
        copy = json.loads((tmp_path / "histories" / f"{record['method']}_w1a1_seed0.json").read_text())
        run = json.loads((tmp_path / record["run_dir"] / "result.json").read_text())
        assert copy["history"] == run["history"] and len(copy["history"]) == 2
        assert copy["point"]["settings_key"] == record["settings_key"] == run["settings_key"]
        assert copy["best_epoch"] == record["best_epoch"]
        if record["method"] == "qat":
            assert copy["best_test_epoch"] == record["best_test_epoch"]
            tests = [epoch["test_acc"] for epoch in copy["history"]]
            assert max(tests) == record["best_test_accuracy"]
    before = {name: (tmp_path / "histories" / name).read_bytes() for name in names}
    shutil.rmtree(tmp_path / "runs")
    again = sweep.report_sweep(tmp_path)
    assert again.files["histories"] == os.path.join(str(tmp_path), "histories")
    assert {name: (tmp_path / "histories" / name).read_bytes() for name in names} == before


def test_track_test_reports_the_best_test_epoch_and_changes_nothing_else(tmp_path):
    """``track_test`` adds Brevitas' selection (the epoch of best test accuracy) beside the
    validation-chosen accuracy: same points, same accuracies, a new settings key and table column."""
    grid = dict(seeds=(0,), weight_bits=(1, 32), activation_bits=(1,), epochs=3)
    plain = quick(tmp_path / "plain", **grid)
    tracked = quick(tmp_path / "tracked", track_test=True, **grid)
    settings = json.loads((tmp_path / "tracked" / "sweep.json").read_text())
    assert settings["track_test"] is True
    assert "track_test" not in json.loads((tmp_path / "plain" / "sweep.json").read_text())
    assert settings["key"] != json.loads((tmp_path / "plain" / "sweep.json").read_text())["key"]
    for a, b in zip(plain.records, tracked.records):
        assert (a["method"], a["weight_bits"], a["accuracy"], a["best_epoch"], a["val_accuracy"]) == \
            (b["method"], b["weight_bits"], b["accuracy"], b["best_epoch"], b["val_accuracy"])
        assert "best_test_accuracy" not in a
        if b["method"] == "ptq":  # quantized after training (no 32/32 point here): no epochs of its own
            assert b["best_test_accuracy"] is None and b["best_test_epoch"] is None
            continue
        run = json.loads((tmp_path / "tracked" / b["run_dir"] / "result.json").read_text())
        tests = [record["test_acc"] for record in run["history"]]
        assert b["best_test_accuracy"] == max(tests)
        assert b["best_test_epoch"] == tests.index(max(tests)) + 1
    table = (tmp_path / "tracked" / "table.md").read_text()
    assert "lowbit QAT, best test epoch" in table and "best test epoch" not in (tmp_path / "plain" / "table.md").read_text()
    ptq, qat = (next(r for r in tracked.records if r["method"] == m and r["weight_bits"] == 1) for m in ("ptq", "qat"))
    assert (f"| 1W1A | 93.17 | {ptq['accuracy'] * 100:.2f} | {qat['accuracy'] * 100:.2f} | "
            f"{qat['best_test_accuracy'] * 100:.2f} |") in table
    with open(tmp_path / "tracked" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {row["best_test_epoch"] for row in rows if row["method"] == "ptq"} == {""}
    assert all(row["best_test_epoch"] for row in rows if row["method"] == "qat")
    summary = json.loads((tmp_path / "tracked" / "results.json").read_text())["summary"]
    assert any("best_test_accuracy_mean_percent" in entry for entry in summary)


def test_act_bits_is_a_deprecated_name_of_activation_bits(tmp_path):
    """The Python API says ``activation_bits``; ``act_bits`` works for a release with a warning that
    names the new name and points at the caller.  On disk the record key stays ``act_bits``."""
    from lowbit import zoo

    with pytest.warns(DeprecationWarning, match=r"tfc\(\): act_bits is deprecated .*; use activation_bits") as caught:
        old = zoo.tfc(act_bits=2)
    assert caught[0].filename == __file__
    assert old.name == zoo.tfc(activation_bits=2).name == "tfc_w1a2"
    with pytest.raises(TypeError, match="give only activation_bits"):
        zoo.sfc(act_bits=2, activation_bits=2)
    with pytest.warns(DeprecationWarning, match=r"qat_model\(\): act_bits is deprecated"):
        model = sweep.qat_model("tfc", 1, act_bits=32)
    assert [type(layer) for layer in model.layers] == [type(layer) for layer in sweep.qat_model("tfc", 1, 32).layers]
    with pytest.warns(DeprecationWarning, match=r"run_sweep\(\): act_bits is deprecated"):
        result = quick(tmp_path, methods=("ptq",), weight_bits=(32,), act_bits=(32,))
    assert [(r["weight_bits"], r["act_bits"]) for r in result.records] == [(32, 32)]
    assert json.loads((tmp_path / "points.jsonl").read_text())["act_bits"] == 32
    with pytest.warns(DeprecationWarning, match="use ACTIVATION_BITS"):
        assert sweep.ACT_BITS == sweep.ACTIVATION_BITS == (1, 2, 4, 8, 32)


@pytest.mark.parametrize("folder", ["sweep_lfc_e300_all_track", "sweep_deep_convnet_book"])
def test_committed_reports_round_trip_byte_for_byte(tmp_path, folder):
    """``report_sweep`` on a copy of a committed sweep folder writes every committed report file again,
    byte for byte (experiments/check_reports.py checks them all): one with ``track_test`` and
    histories, one PTQ sweep of a pretrained CNN."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("check_reports_under_test",
                                                  os.path.join(root, "experiments", "check_reports.py"))
    check_reports = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_reports)
    outcome = check_reports.check_folder(os.path.join(root, "experiments", "results", folder), str(tmp_path))
    assert outcome["different"] == []
    assert {"results.csv", "results.json", "table.md", "accuracy_vs_bits.png"} <= set(outcome["same"])
