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
