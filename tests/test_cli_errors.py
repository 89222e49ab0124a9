"""Issue 22: every CLI subcommand fed a bad input exits non-zero with one line on stderr (no
traceback).  The commands run as subprocesses (``python -m lowbit``), all started at once.

Bad inputs: a missing file, a file that is not a lowbit file, a truncated one, a crafted one that
declares a huge layer, an unused array, a negative ``--limit``, an output that cannot be written,
a float model given to ``convert``, and no MNIST to be had (offline, empty data folder).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from lowbit import convert, save_model
from lowbit.io import read_archive, write_archive
from lowbit.layers import Affine, Flatten
from lowbit.model import Model
from lowbit.zoo import build_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    quantized = build_model("bnn_mlp", hidden=(32, 32))
    paths = {"quantized": save_model(quantized, folder / "quantized.npz"),
             "float": save_model(Model([Flatten(), Affine(784, 10)], name="float"), folder / "float.npz"),
             "packed": convert(quantized).save(folder / "packed.npz"),
             "missing": folder / "missing.npz", "empty": folder / "empty"}
    (folder / "text.npz").write_text("not a model\n")
    paths["text"] = folder / "text.npz"
    raw = open(paths["quantized"], "rb").read()
    (folder / "truncated.npz").write_bytes(raw[:len(raw) // 2])
    paths["truncated"] = folder / "truncated.npz"
    manifest, arrays = read_archive(paths["float"], "lowbit.model")
    huge = dict(manifest["model"])
    huge["children"] = [manifest["model"]["children"][0],
                        ["1", {"type": "Affine", "config": {"in_features": 10 ** 7, "out_features": 10 ** 7}}]]
    paths["huge"] = write_archive(folder / "huge.npz", "lowbit.model", arrays, {"model": huge})
    arrays["7.W"] = np.zeros(3, np.float32)
    paths["unused"] = write_archive(folder / "unused.npz", "lowbit.model", arrays, {"model": manifest["model"]})
    (folder / "a_file").write_text("")
    paths["unwritable"] = folder / "a_file" / "out.npz"  # its folder is a file
    paths["unwritable_dir"] = folder / "a_file" / "run"
    paths["empty"].mkdir()
    return {k: os.fspath(v) for k, v in paths.items()}


def cases(f):
    """(subcommand, arguments) -> a bad input each."""
    out = []
    for bad in ("missing", "text", "truncated", "huge", "unused"):
        out += [(f"eval {bad}", ["eval", f[bad]]),
                (f"quantize {bad}", ["quantize", f[bad], "-o", f["empty"] + "/q.npz", "--weight-bits", "1",
                                     "--activation-bits", "1"]),
                (f"convert {bad}", ["convert", f[bad], "-o", f["empty"] + "/c.npz"]),
                (f"summary {bad}", ["summary", f[bad]])]
    out += [
        ("eval --limit -5", ["eval", f["packed"], "--limit", "-5"]),
        ("quantize --limit -5", ["quantize", f["float"], "-o", f["empty"] + "/q.npz", "--weight-bits", "1",
                                 "--activation-bits", "1", "--limit", "-5"]),
        ("convert --limit -5", ["convert", f["quantized"], "-o", f["empty"] + "/c.npz", "--limit", "-5"]),
        ("train --limit -5", ["train", "--limit", "-5", "--out", f["empty"] + "/run"]),
        ("eval --json unwritable", ["eval", f["packed"], "--json", f["unwritable"]]),
        ("quantize -o unwritable", ["quantize", f["float"], "-o", f["unwritable"], "--weight-bits", "1",
                                    "--activation-bits", "1"]),
        ("convert -o unwritable", ["convert", f["quantized"], "-o", f["unwritable"]]),
        ("train --out unwritable", ["train", "--out", f["unwritable_dir"], "--epochs", "1"]),
        ("sweep --out unwritable", ["sweep", "--arch", "tfc", "--quick", "--out", f["unwritable_dir"]]),
        ("convert float model", ["convert", f["float"], "-o", f["empty"] + "/c.npz"]),
        ("eval without MNIST", ["eval", f["packed"]]),
        ("train without MNIST", ["train", "--limit", "10", "--epochs", "1", "--out", f["empty"] + "/run"]),
        ("quantize without MNIST", ["quantize", f["float"], "-o", f["empty"] + "/q.npz", "--weight-bits", "1",
                                    "--activation-bits", "1"]),
        ("convert without MNIST", ["convert", f["quantized"], "-o", f["empty"] + "/c.npz"]),
        ("sweep-report missing folder", ["sweep-report", f["empty"] + "/nothing"]),
        ("unknown subcommand", ["frobnicate"]),
    ]
    return out


@pytest.mark.slow  # 34 interpreters (about 45 s on 2 busy cores)
def test_every_subcommand_answers_each_bad_input_with_one_line(files, tmp_path):
    env = dict(os.environ, LOWBIT_DATA=files["empty"], LOWBIT_OFFLINE="1", PYTHONWARNINGS="ignore")
    env.pop("LOWBIT_DEBUG", None)
    running = {name: subprocess.Popen([sys.executable, "-m", "lowbit", *argv], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
               for name, argv in cases(files)}
    failures = []
    for name, proc in running.items():
        out, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        if proc.returncode == 0 or len(lines) != 1 or "Traceback" in err or "internal error" in err:
            failures.append(f"{name}: exit {proc.returncode}, stderr {err!r}")
    assert not failures, "\n".join(failures)
    assert not os.path.exists(os.path.join(files["empty"], "c.npz"))  # nothing written after the errors


def test_eval_refuses_a_negative_limit(files):
    proc = subprocess.run([sys.executable, "-m", "lowbit", "eval", files["packed"], "--limit", "-5"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--limit: expected a whole number >= 0" in proc.stderr


def test_version_and_python_dash_m():
    import lowbit

    for command in (["-m", "lowbit", "--version"], ["-c", "from lowbit.cli import main; main(['--version'])"]):
        proc = subprocess.run([sys.executable, *command], capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.strip() == f"lowbit {lowbit.__version__}"


def test_convert_of_a_float_model_points_to_quantize(files, tmp_path):
    from lowbit.cli.convert import convert_command

    with pytest.raises(ValueError, match="float model .no quantized layer.: convert has nothing to pack.*lowbit quantize"):
        convert_command(files["float"], tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()


def test_unwritable_outputs_are_refused_before_the_work(files, tmp_path):
    from lowbit.cli.convert import convert_command
    from lowbit.io import check_output_path

    with pytest.raises(ValueError, match="output: cannot write .*a_file is a file, not a folder"):
        convert_command(files["quantized"], files["unwritable"])  # refused before MNIST is loaded
    with pytest.raises(ValueError, match="--out: .* is a file, expected a folder"):
        check_output_path(files["float"], "--out", folder=True)
    with pytest.raises(ValueError, match="-o: .* is a folder, expected a file name"):
        check_output_path(tmp_path, "-o")
    assert check_output_path(tmp_path / "new" / "deeper" / "m.npz", "-o") is not None
    assert not (tmp_path / "new").exists()


def test_commands_announce_their_steps(files, tmp_path, capsys):
    from lowbit.cli.convert import convert_command

    class Tiny:
        x_test = np.zeros((3, 28, 28), np.uint8)
        y_test = np.zeros(3, np.int64)

    convert_command(files["quantized"], tmp_path / "c.npz", data=Tiny(), out=lambda line: None)
    assert "lowbit: converting" in capsys.readouterr().err
