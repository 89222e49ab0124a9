"""Training: a synthetic task that must be learned, exact resume, schedules and optimizers."""
import json
import math

import numpy as np
import pytest

import lowbit
from lowbit.layers import Affine, BatchNorm, Conv2D, Dropout, Flatten, MaxPool2D, ReLU
from lowbit.model import Model
from lowbit.optimizers import (AdaGrad, Adam, CosineLR, ExponentialLR, Momentum, SGD, StepLR,
                               get_optimizer, get_schedule)
from lowbit.trainer import Trainer


def blobs(n=600, seed=0):
    """Three classes of 4x4 images, each a noisy copy of a class template."""
    rng = np.random.default_rng(seed)
    templates = rng.random((3, 1, 4, 4)).astype(np.float32)
    y = rng.integers(0, 3, n)
    x = np.clip(templates[y] + 0.25 * rng.standard_normal((n, 1, 4, 4)), 0, 1).astype(np.float32)
    return x, y


def small_cnn(seed=0):
    return Model([
        Conv2D(1, 4, 3, padding=1, seed=seed), BatchNorm(4), ReLU(), MaxPool2D(2),
        Flatten(), Affine(16, 8, seed=seed + 1), ReLU(), Dropout(0.2), Affine(8, 3, seed=seed + 2),
    ], input_shape=(1, 4, 4))


@pytest.mark.parametrize("opt", [SGD(0.1), Momentum(0.05), AdaGrad(0.05), Adam(0.01)])
def test_learns_synthetic_task(opt):
    x, y = blobs()
    model = small_cnn()
    Trainer(model, optimizer=opt, epochs=8, batch_size=20, progress=False).fit(x, y)
    xt, yt = blobs(300, seed=0)
    assert model.evaluate(xt, yt) > 0.9


def test_squared_hinge_training():
    x, y = blobs()
    model = small_cnn(3)
    Trainer(model, loss="squared_hinge", optimizer=Adam(0.01), epochs=6, batch_size=20,
            progress=False).fit(x, y)
    assert model.evaluate(x, y) > 0.9


def _weights(model):
    return {k: getattr(l, a).copy() for k, l, a in model.named_arrays()}


def test_resume_equals_uninterrupted(tmp_path):
    x, y = blobs(200)
    full = small_cnn()
    Trainer(full, optimizer=Adam(0.01), epochs=3, batch_size=32, seed=7, progress=False,
            out_dir=tmp_path / "full").fit(x, y)

    # a run stopped after its first epoch ...
    first = small_cnn()
    Trainer(first, optimizer=Adam(0.01), epochs=1, batch_size=32, seed=7, progress=False,
            out_dir=tmp_path / "part").fit(x, y)
    # ... and continued by a fresh process (fresh objects) with resume
    again = small_cnn()
    trainer = Trainer(again, optimizer=Adam(0.01), epochs=3, batch_size=32, seed=7, progress=False,
                      out_dir=tmp_path / "part")
    history = trainer.fit(x, y, resume=True)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    a, b = _weights(full), _weights(again)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    saved = json.loads((tmp_path / "part" / "history.json").read_text())
    assert [h["loss"] for h in saved] == [h["loss"] for h in history]
    assert lowbit.load_model(tmp_path / "part" / "model.npz").spec() == again.spec()


def test_resume_refuses_other_settings(tmp_path):
    x, y = blobs(100)
    Trainer(small_cnn(), epochs=1, batch_size=32, progress=False, out_dir=tmp_path).fit(x, y)
    t = Trainer(small_cnn(), epochs=2, batch_size=16, progress=False, out_dir=tmp_path)
    with pytest.raises(ValueError, match="'batch_size' setting differs"):
        t.fit(x, y, resume=True)


def test_interrupt_keeps_last_checkpoint(tmp_path):
    x, y = blobs(100)
    calls = {"n": 0}

    def boom(xb, rng):
        calls["n"] += 1
        if calls["n"] > 5:  # during the second epoch (4 batches per epoch)
            raise KeyboardInterrupt
        return xb

    t = Trainer(small_cnn(), epochs=3, batch_size=25, augment=boom, progress=False, out_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        t.fit(x, y)
    assert (tmp_path / "checkpoint.npz").exists()
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    t2 = Trainer(small_cnn(), epochs=3, batch_size=25, augment=boom, progress=False, out_dir=tmp_path)
    assert t2.load_checkpoint() == 1


def test_best_model_by_validation(tmp_path):
    x, y = blobs(300)
    t = Trainer(small_cnn(), optimizer=Adam(0.01), epochs=3, batch_size=30, progress=False,
                out_dir=tmp_path)
    hist = t.fit(x[:200], y[:200], x[200:], y[200:], x[200:], y[200:])
    best = max(hist, key=lambda h: h["val_acc"])
    meta = lowbit.load_model(tmp_path / "best.npz").metadata
    assert meta["val_acc"] == best["val_acc"] and meta["epoch"] == best["epoch"]


def test_same_seed_same_run():
    x, y = blobs(120)
    runs = []
    for _ in range(2):
        m = small_cnn()
        Trainer(m, epochs=2, batch_size=30, seed=3, progress=False).fit(x, y)
        runs.append(_weights(m))
    for key in runs[0]:
        np.testing.assert_array_equal(runs[0][key], runs[1][key])


def test_bad_data_is_clear():
    t = Trainer(small_cnn(), epochs=1, progress=False)
    with pytest.raises(TypeError, match="must be float32"):
        t.fit(np.zeros((4, 1, 4, 4), np.uint8), np.zeros(4, int))
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        t.fit(np.zeros((4, 1, 4, 4), np.float32), np.zeros(5, int))


def test_schedules():
    assert StepLR(1.0, step_size=2, gamma=0.5)(5) == 0.25
    e = ExponentialLR(3e-3, 3e-7, 1000)
    assert e(0) == pytest.approx(3e-3) and e(999) == pytest.approx(3e-7)
    c = CosineLR(1.0, 10)
    assert c(0) == 1.0 and c(5) == pytest.approx(0.5) and c(10) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="schedule must be one of"):
        get_schedule("linear", lr=1)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        get_optimizer("rmsprop")


def test_adam_first_step_moves_by_lr():
    model = Model([Affine(2, 1, bias=False, seed=0)], input_shape=(2,))
    w0 = model.layers[0].W.copy()
    model.layers[0].dW = np.array([[3.0], [-0.5]], np.float32)
    Adam(0.1).step(model)
    np.testing.assert_allclose(model.layers[0].W - w0, [[-0.1], [0.1]], rtol=1e-5)
    assert math.isfinite(float(model.layers[0].W.sum()))


# --------------------------------------------------------------------------------------------------
# BatchNorm recalibration ("precise BN")
# --------------------------------------------------------------------------------------------------

def _two_bn_mlp():
    return Model([Flatten(), Affine(16, 6, seed=1), BatchNorm(6), ReLU(), Dropout(0.5),
                  Affine(6, 5, seed=2), BatchNorm(5, momentum=0.7)], input_shape=(1, 4, 4))


def test_recalibrate_batchnorm_is_the_mean_of_batch_statistics():
    from lowbit.trainer import recalibrate_batchnorm

    x, _ = blobs(50)
    model = _two_bn_mlp()
    fc1, bn1, _, drop, fc2, bn2 = model.layers[1:]
    expected = [[], []]
    for start in range(0, 50, 20):  # batches of 20, 20 and 10, Dropout off
        h = x[start:start + 20].reshape(-1, 16).astype(np.float64) @ fc1.W + fc1.b
        m, v = h.mean(0), h.var(0)
        expected[0].append((m, v))
        h = np.maximum((h - m) / np.sqrt(v + bn1.eps) * bn1.gamma + bn1.beta, 0) @ fc2.W + fc2.b
        expected[1].append((h.mean(0), h.var(0)))
    states = model.rng_states()
    assert recalibrate_batchnorm(model, x, batch_size=20) == 2
    for bn, stats in zip((bn1, bn2), expected):
        np.testing.assert_allclose(bn.running_mean, np.mean([m for m, _ in stats], 0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.running_var, np.mean([v for _, v in stats], 0), rtol=1e-5, atol=1e-6)
        assert bn.running_mean.dtype == bn.running_var.dtype == np.float32
    assert (bn1.momentum, bn2.momentum, drop.ratio) == (0.9, 0.7, 0.5)  # settings restored
    assert json.dumps(model.rng_states()) == json.dumps(states)  # no random draws consumed
    # idempotent: the statistics come from the batches, not from the running values
    before = bn2.running_var.copy()
    recalibrate_batchnorm(model, x, batch_size=20)
    np.testing.assert_allclose(bn2.running_var, before, rtol=1e-6)


def test_recalibrate_batchnorm_without_batchnorm_and_bad_arguments():
    from lowbit.trainer import recalibrate_batchnorm

    x, _ = blobs(10)
    no_bn = Model([Flatten(), Affine(16, 3, seed=0)], input_shape=(1, 4, 4))
    assert recalibrate_batchnorm(no_bn, x) == 0
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        recalibrate_batchnorm(_two_bn_mlp(), x, batch_size=0)
    with pytest.raises(ValueError, match="at least one image"):
        recalibrate_batchnorm(_two_bn_mlp(), x[:0])


def test_trainer_bn_recalibrate_after_every_epoch(tmp_path):
    from lowbit.trainer import recalibrate_batchnorm

    x, y = blobs(200)
    model = small_cnn()
    trainer = Trainer(model, epochs=2, batch_size=20, progress=False, bn_recalibrate=100,
                      out_dir=str(tmp_path))
    trainer.fit(x, y, x[:40], y[:40])
    bn = model.layers[1]
    mean, var = bn.running_mean.copy(), bn.running_var.copy()
    recalibrate_batchnorm(model, x[:100], 20)  # what the trainer did after the last epoch
    np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(bn.running_var, var, rtol=1e-6, atol=1e-7)
    assert trainer.run_config()["bn_recalibrate"] == 100
    assert "bn_recalibrate" not in Trainer(small_cnn(), progress=False).run_config()  # old checkpoints resume
    # resuming with another setting is refused
    with pytest.raises(ValueError, match="bn_recalibrate"):
        Trainer(small_cnn(), epochs=3, batch_size=20, progress=False, bn_recalibrate=50,
                out_dir=str(tmp_path)).fit(x, y, x[:40], y[:40], resume=True)
    with pytest.raises(ValueError, match="bn_recalibrate must be an int >= 0"):
        Trainer(small_cnn(), bn_recalibrate=-1)


def test_identity_augment_is_off_and_resumes_old_checkpoints(tmp_path, monkeypatch):
    """``Augment()`` (what ``--augment none`` parsed to) counts as no augmentation; a checkpoint saved
    with it in its run settings still resumes in a run without augmentation."""
    from lowbit.augment import Augment

    assert Trainer(small_cnn(), augment=Augment(), progress=False).augment is None
    x, y = blobs(50)
    t = Trainer(small_cnn(), epochs=1, batch_size=25, progress=False, out_dir=tmp_path)
    real = Trainer.run_config
    monkeypatch.setattr(Trainer, "run_config", lambda self: {**real(self), "augment": Augment().config()})
    t.fit(x, y)  # its checkpoint names the identity Augment, as older lowbit wrote it
    monkeypatch.setattr(Trainer, "run_config", real)
    assert Trainer(small_cnn(), epochs=2, batch_size=25, progress=False, out_dir=tmp_path).load_checkpoint() == 1
    shifted = Trainer(small_cnn(), epochs=2, batch_size=25, augment=Augment(shift=1), progress=False,
                      out_dir=tmp_path)
    with pytest.raises(ValueError, match="'augment' setting differs"):
        shifted.load_checkpoint()


class _StepClock:
    """A clock that reads the number of optimizer steps taken: one step = one second."""

    def __init__(self, monkeypatch, trainer, stop_after=None):
        self.steps = 0
        step = trainer.optimizer.step

        def counted(*args, **kwargs):
            if stop_after is not None and self.steps == stop_after:
                raise KeyboardInterrupt
            self.steps += 1
            return step(*args, **kwargs)

        monkeypatch.setattr(trainer.optimizer, "step", counted)
        monkeypatch.setattr(lowbit.trainer, "_clock", lambda: float(self.steps))


def _budget_trainer(out_dir=None, budget=25.0, epochs=6, model=None):
    return Trainer(model or small_cnn(), optimizer=Adam(0.01), schedule=CosineLR(0.01, epochs), epochs=epochs,
                   batch_size=25, seed=5, progress=False, out_dir=out_dir, time_budget=budget)


def _assert_same_as_plain_3_epochs(model, x, y):
    """``model`` has the weights of a plain 3-epoch run with the budget trainers' other settings."""
    plain = small_cnn()
    Trainer(plain, optimizer=Adam(0.01), schedule=CosineLR(0.01, 3), epochs=3, batch_size=25, seed=5,
            progress=False).fit(x, y)
    a, b = _weights(model), _weights(plain)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_time_budget_fixes_epochs_and_equals_the_plain_run(monkeypatch, tmp_path):
    # 200 images in batches of 25: 8 steps (seconds) an epoch, timed on its second half (4 s, x2);
    # after the first epoch 8 s are spent, so a 25 s budget leaves room for 2 more: 3 epochs in all.
    x, y = blobs(200)
    budget = _budget_trainer(tmp_path / "budget")
    _StepClock(monkeypatch, budget)
    history = budget.fit(x, y)
    assert budget.epochs == 3 and len(history) == 3 and budget.budget_fixed
    assert history[0]["epochs_fixed"] == 3 and history[0]["epoch_seconds_estimate"] == 8.0
    assert budget.schedule.config() == CosineLR(0.01, 3).config()
    assert [h["lr"] for h in history] == [CosineLR(0.01, 3)(e) for e in range(3)]
    monkeypatch.undo()
    _assert_same_as_plain_3_epochs(budget.model, x, y)


def test_time_budget_bounds(monkeypatch):
    x, y = blobs(200)
    for budget, epochs in ((1.0, 1), (1e9, 6)):  # spent on the first epoch; room for more than the most
        trainer = _budget_trainer(budget=budget)
        _StepClock(monkeypatch, trainer)
        assert len(trainer.fit(x, y)) == epochs and trainer.epochs == epochs
    for bad in (0, -1.0, float("nan"), True, "60"):
        with pytest.raises(ValueError, match="time_budget must be a positive number of seconds"):
            _budget_trainer(budget=bad)


def test_time_budget_resumes_with_the_fixed_length(monkeypatch, tmp_path):
    x, y = blobs(200)
    interrupted = _budget_trainer(tmp_path)
    _StepClock(monkeypatch, interrupted, stop_after=12)  # during the second of the 3 epochs it fixes
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(x, y)
    monkeypatch.undo()
    resumed = _budget_trainer(tmp_path)  # real clock: the saved length holds, not a new estimate
    history = resumed.fit(x, y, resume=True)
    assert resumed.epochs == 3 and [h["epoch"] for h in history] == [1, 2, 3]
    _assert_same_as_plain_3_epochs(resumed.model, x, y)
    # another budget is another run
    with pytest.raises(ValueError, match="'time_budget' setting differs"):
        _budget_trainer(tmp_path, budget=50.0).fit(x, y, resume=True)


def test_checkpoint_every(tmp_path, monkeypatch):
    x, y = blobs(100)
    saved = []
    trainer = Trainer(small_cnn(), epochs=5, batch_size=25, progress=False, out_dir=tmp_path, checkpoint_every=2)
    monkeypatch.setattr(trainer, "save_checkpoint", lambda: saved.append(trainer.epoch))
    trainer.fit(x, y)
    assert saved == [2, 4, 5]  # every second epoch and the last
    assert len(json.loads((tmp_path / "history.json").read_text())) == 5  # the history after every epoch
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="checkpoint_every must be a positive int"):
            Trainer(small_cnn(), checkpoint_every=bad)


def test_adam_fused_changes_nothing_on_the_cpu():
    # the fused kernel is CuPy-only; on numpy both settings take the same path, and it is no setting
    runs = []
    for fused in (False, True):
        model = small_cnn()
        Trainer(model, optimizer=Adam(0.01, fused=fused), epochs=1, batch_size=25, seed=2,
                progress=False).fit(*blobs(100))
        runs.append(_weights(model))
    for key in runs[0]:
        np.testing.assert_array_equal(runs[0][key], runs[1][key], err_msg=key)
    assert Adam(0.01, fused=True).config() == Adam(0.01).config()
