import os

import numpy as np
import pytest

import lowbit
from lowbit.ensemble import Ensemble, softmax_np


class Fixed:
    def __init__(self, scores):
        self.scores = np.asarray(scores, np.float32)

    def predict_scores(self, x, batch_size=100):
        return self.scores


def test_mean_of_softmax_not_of_scores():
    a = Fixed([[10.0, 0.0, 0.0]])   # very sure of class 0
    b = Fixed([[0.0, 1.0, 0.9]])    # unsure, leaning to 1
    c = Fixed([[0.0, 1.0, 0.9]])
    proba = Ensemble([a, b, c]).predict_proba(np.zeros((1, 1)))
    expected = (softmax_np(a.scores) + 2 * softmax_np(b.scores)) / 3
    np.testing.assert_allclose(proba, expected, rtol=1e-6)
    assert Ensemble([a, b, c]).predict(np.zeros((1, 1)))[0] == 0


def test_ensemble_of_saved_models(tmp_path):
    from lowbit.zoo import mlp

    paths = [lowbit.save_model(mlp(seed=s, hidden=(16,)), tmp_path / f"m{s}.npz") for s in range(3)]
    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    ens = lowbit.ensemble(paths)
    assert ens.predict(x).shape == (5,)
    assert 0.0 <= ens.evaluate(x, np.zeros(5, int)) <= 1.0


def test_bad_members():
    with pytest.raises(ValueError, match="at least one member"):
        Ensemble([])
    with pytest.raises(TypeError, match=r"members\[0\] has no predict_scores"):
        Ensemble([object()])


def test_eval_reads_trained_and_packed_files(tmp_path, monkeypatch, capsys):
    """``lowbit eval`` and ``lowbit.ensemble`` take packed files as well as trained ones: each
    member's accuracy and the ensemble's are those of the loaded models."""
    import types

    from lowbit import data
    from lowbit.cli import main as cli_main
    from lowbit.zoo import tfc

    rng = np.random.default_rng(0)
    fake = types.SimpleNamespace(x_test=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
                                 y_test=rng.integers(0, 10, 40))
    monkeypatch.setattr(data, "load_mnist", lambda **kwargs: fake)
    x = data.float_images(fake.x_test)
    trained = tfc(seed=1)
    trained.forward(x, train=True)  # BatchNorm statistics other than the initial ones
    float_path = lowbit.save_model(trained, tmp_path / "float.npz")
    packed = lowbit.convert(tfc(seed=2))
    packed_path = tmp_path / "packed.npz"
    packed.save(packed_path)
    assert cli_main(["eval", str(float_path), str(packed_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    members = [lowbit.load_model(float_path), lowbit.load_packed(packed_path)]
    assert f"float.npz: test accuracy {members[0].evaluate(x, fake.y_test):.4%} on 40 images" in out
    assert f"packed.npz: test accuracy {members[1].evaluate(x, fake.y_test):.4%} on 40 images" in out
    expected = Ensemble(members).evaluate(x, fake.y_test)
    assert f"ensemble of 2 (mean softmax): test accuracy {expected:.4%}" in out
    assert lowbit.ensemble([float_path, packed_path]).evaluate(x, fake.y_test) == expected

    # --json writes the same figures, with each file's digest and size, and the command that made it
    import hashlib
    import json

    report_path = tmp_path / "eval.json"
    assert cli_main(["eval", str(float_path), str(packed_path), "--quiet", "--limit", "30",
                     "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["test_images"] == 30
    assert [row["file"] for row in report["models"]] == [str(float_path), str(packed_path)]
    for row, member in zip(report["models"], members):
        assert row["test_accuracy"] == member.evaluate(x[:30], fake.y_test[:30])
        assert row["sha256"] == hashlib.sha256(open(row["file"], "rb").read()).hexdigest()
        assert row["bytes"] == os.path.getsize(row["file"])
    assert report["ensemble_test_accuracy"] == Ensemble(members).evaluate(x[:30], fake.y_test[:30])
    assert report["command"] == f"lowbit eval {float_path} {packed_path} --limit 30 --json {report_path}"
