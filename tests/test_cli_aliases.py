"""One name per concept on the command line: ``--weight-bits`` / ``--activation-bits`` everywhere;
the old flags (``quantize --weights/--activations``, ``sweep --act-bits``) still work and print a
deprecation note on stderr.  Also: the CLI package keeps its import surface."""
import numpy as np
import pytest

import lowbit.data
from lowbit import save_model
from lowbit.cli import (
    add_clipping_arguments, add_sweep_arguments, build_parser, main, positive_seconds, sweep_options,
)
from lowbit.data import MNIST
from lowbit.layers import Affine, Flatten, ReLU
from lowbit.model import Model
from lowbit.packed import load_packed


@pytest.fixture
def tiny_mnist(monkeypatch):
    rng = np.random.default_rng(0)
    data = MNIST(rng.integers(0, 256, (120, 28, 28), dtype=np.uint8), rng.integers(0, 10, 120).astype(np.int64),
                 rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), rng.integers(0, 10, 40).astype(np.int64))
    monkeypatch.setattr(lowbit.data, "load_mnist", lambda *args, **kwargs: data)
    return data


def float_model(path):
    model = Model([Flatten(), Affine(784, 16, seed=0), ReLU(), Affine(16, 8, seed=1), ReLU(), Affine(8, 10, seed=2)],
                  name="tiny")
    return save_model(model, path)


def test_quantize_old_and_new_flags_give_the_same_file(tmp_path, tiny_mnist, capsys):
    path = float_model(tmp_path / "float.npz")
    common = ["--calibrate", "20", "--val", "50", "--quiet"]
    assert main(["quantize", str(path), "-o", str(tmp_path / "new.npz"), "--weight-bits", "4",
                 "--activation-bits", "4", *common]) == 0
    new = capsys.readouterr()
    assert "deprecated" not in new.err
    assert main(["quantize", str(path), "-o", str(tmp_path / "old.npz"), "--weights", "4", "--activations", "4",
                 *common]) == 0
    old = capsys.readouterr()
    assert "lowbit quantize: note: --weights is deprecated and will be removed; use --weight-bits" in old.err
    assert "lowbit quantize: note: --activations is deprecated and will be removed; use --activation-bits" in old.err
    assert old.out.replace("old.npz", "new.npz") == new.out
    a, b = load_packed(tmp_path / "new.npz"), load_packed(tmp_path / "old.npz")
    assert a.metadata == b.metadata
    assert a.metadata["post_training_quantization"]["calibration_val_size"] == 50
    x = lowbit.data.float_images(tiny_mnist.x_test)
    np.testing.assert_array_equal(a.predict_scores(x), b.predict_scores(x))


def test_quantize_needs_the_bits(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["quantize", str(tmp_path / "m.npz"), "-o", str(tmp_path / "q.npz"), "--weight-bits", "2"])
    assert stop.value.code == 2
    assert "the following arguments are required: --activation-bits/--activations" in capsys.readouterr().err


def test_quantize_refuses_a_validation_split_larger_than_the_training_set(tmp_path, tiny_mnist, capsys):
    path = float_model(tmp_path / "float.npz")
    assert main(["quantize", str(path), "-o", str(tmp_path / "q.npz"), "--weight-bits", "8",
                 "--activation-bits", "8", "--quiet"]) == 2  # --val 10000 of 120 images
    err = capsys.readouterr().err
    assert "lowbit: error: val_size must be in [0, 120)" in err and "got 10000" in err
    assert not (tmp_path / "q.npz").exists()


def test_sweep_act_bits_is_an_alias_of_activation_bits(capsys):
    parser = build_parser()
    new = parser.parse_args(["sweep", "--arch", "tfc", "--activation-bits", "1", "32"])
    assert "deprecated" not in capsys.readouterr().err
    old = parser.parse_args(["sweep", "--arch", "tfc", "--act-bits", "1", "32"])
    assert "lowbit sweep: note: --act-bits is deprecated and will be removed; use --activation-bits" in \
        capsys.readouterr().err
    assert new.activation_bits == old.activation_bits == [1, 32]
    assert sweep_options(new) == sweep_options(old)


def test_help_states_the_calibration_rule(capsys):
    for command in ("quantize", "sweep"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "left after holding out the --val validation images (default 10000" in text, command
        assert "lowbit.ptq.calibration_images" in text, command


def test_the_cli_package_keeps_its_names():
    import argparse

    assert positive_seconds("2.5") == 2.5
    parser = argparse.ArgumentParser()
    add_sweep_arguments(parser)
    args = parser.parse_args(["--weight-bits", "2", "--activation-bits", "4"])
    assert sweep_options(args)["weight_bits"] == [2]
    clipping = argparse.ArgumentParser()
    add_clipping_arguments(clipping)
    assert clipping.parse_args([]).weight_clipping == "mse"
