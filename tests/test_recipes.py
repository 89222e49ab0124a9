"""Recipes for binary networks: label smoothing, distillation, Bop, RSign/RPReLU, two-stage training."""
import argparse
import json
import os

import numpy as np
import pytest

import lowbit
from lowbit.io import model_arrays
from lowbit.layers import Affine, BatchNorm, Flatten
from lowbit.losses import Distillation, SoftmaxCrossEntropy, SquaredHinge, get_loss
from lowbit.model import Model
from lowbit.optimizers import Adam, Bop, get_optimizer
from lowbit.quant_layers import QuantActivation, QuantAffine
from lowbit.reactnet import RPReLU, RSign
from lowbit.recipes import (Teacher, best_test_epoch, binary_activation_stage, fit_stages, stages_option)
from lowbit.trainer import Trainer
from lowbit.zoo import binary_cnn, bireal_resnet, bnn_mlp, mlp

from gradcheck import as_float64, check_layer_gradients, numerical_grad


def _scores_labels(seed=0, n=6, classes=5):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 3, (n, classes)), rng.integers(0, classes, n)


# -- label smoothing ------------------------------------------------------------------------------
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_label_smoothing_loss_equals_the_smoothed_targets_cross_entropy(smoothing):
    scores, labels = _scores_labels()
    loss = SoftmaxCrossEntropy(label_smoothing=smoothing)
    value = loss.forward(scores, labels)
    classes = scores.shape[1]
    target = np.full(scores.shape, smoothing / classes)
    target[np.arange(len(labels)), labels] += 1 - smoothing
    log_p = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
    assert value == pytest.approx(float(-(target * log_p).sum(axis=1).mean()), rel=1e-12)
    grad = numerical_grad(lambda: SoftmaxCrossEntropy(smoothing).forward(scores, labels), scores)
    np.testing.assert_allclose(loss.backward(), grad, rtol=1e-6, atol=1e-9)


def test_label_smoothing_matches_torch():
    torch = pytest.importorskip("torch")
    scores, labels = _scores_labels(1)
    ours = SoftmaxCrossEntropy(0.2).forward(scores, labels)
    theirs = torch.nn.functional.cross_entropy(torch.tensor(scores), torch.tensor(labels), label_smoothing=0.2)
    assert ours == pytest.approx(float(theirs), rel=1e-10)


@pytest.mark.parametrize("bad", [-0.1, 1.0, True, "0.1"])
def test_label_smoothing_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="label_smoothing"):
        SoftmaxCrossEntropy(bad)


def test_get_loss_passes_options_and_names_unknown_losses():
    assert get_loss("cross_entropy", label_smoothing=0.1).config() == {"name": "cross_entropy",
                                                                       "label_smoothing": 0.1}
    assert get_loss("cross_entropy").config() == "cross_entropy"
    with pytest.raises(ValueError, match="loss must be one of"):
        get_loss("hinge")


# -- distillation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("base", [SoftmaxCrossEntropy, SquaredHinge])
@pytest.mark.parametrize("temperature,weight", [(1.0, 0.5), (4.0, 0.9), (2.0, 1.0), (3.0, 0.0)])
def test_distillation_loss_and_gradient(base, temperature, weight):
    scores, labels = _scores_labels(2)
    teacher = np.random.default_rng(3).normal(0, 3, scores.shape)

    def value():
        loss = Distillation(base(), temperature, weight)
        loss.teacher_scores = teacher
        return loss.forward(scores, labels)

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p, q = softmax(teacher / temperature), softmax(scores / temperature)
    kl = (p * (np.log(p) - np.log(q))).sum(axis=1).mean()
    expected = (1 - weight) * base().forward(scores, labels) + weight * temperature ** 2 * kl
    loss = Distillation(base(), temperature, weight)
    loss.teacher_scores = teacher
    assert loss.forward(scores, labels) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(loss.backward(), numerical_grad(value, scores), rtol=1e-5, atol=1e-8)


def test_distillation_refuses_a_missing_teacher_and_bad_settings():
    scores, labels = _scores_labels()
    loss = Distillation(SoftmaxCrossEntropy())
    with pytest.raises(ValueError, match="teacher_scores"):
        loss.forward(scores, labels)
    loss.teacher_scores = np.zeros((2, 2))
    with pytest.raises(ValueError, match="shape"):
        loss.forward(scores, labels)
    with pytest.raises(ValueError, match="temperature"):
        Distillation(SoftmaxCrossEntropy(), temperature=0)
    with pytest.raises(ValueError, match="weight"):
        Distillation(SoftmaxCrossEntropy(), weight=1.5)
    with pytest.raises(TypeError, match="base"):
        Distillation("cross_entropy")


def _tiny_data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, n)
    return x, y


def _tiny_binary(seed=0, rsign=False):
    return bnn_mlp(seed, hidden=(16,), dropout_in=0, dropout_hidden=0, init="glorot", rsign=rsign)


def test_trainer_with_a_teacher_hands_it_every_batch_and_resumes(tmp_path):
    x, y = _tiny_data()
    teacher_model = mlp(5, hidden=(8,))
    seen = []

    class Spy(Teacher):
        def scores(self, batch):
            seen.append(batch.shape[0])
            return super().scores(batch)

    def trainer(epochs, out):
        return Trainer(_tiny_binary(), Distillation(SoftmaxCrossEntropy(), 2.0, 0.7), Adam(1e-3), epochs=epochs,
                       batch_size=20, out_dir=str(out), progress=False, teacher=Spy(teacher_model))

    full = trainer(2, tmp_path / "full")
    full.fit(x, y)
    assert seen == [20] * 6
    assert full.run_config()["teacher"] == {"kind": "model", "name": teacher_model.name}
    assert full.run_config()["loss"]["temperature"] == 2.0
    half = trainer(1, tmp_path / "half")
    half.fit(x, y)
    again = trainer(2, tmp_path / "half")
    again.fit(x, y, resume=True)
    for key, value in model_arrays(full.model).items():
        np.testing.assert_array_equal(value, model_arrays(again.model)[key])


def test_trainer_refuses_a_teacher_without_a_distillation_loss():
    with pytest.raises(ValueError, match="distillation loss"):
        Trainer(_tiny_binary(), "cross_entropy", teacher=Teacher(mlp(0, hidden=(4,))), progress=False)
    with pytest.raises(TypeError, match="teacher"):
        Trainer(_tiny_binary(), Distillation(SoftmaxCrossEntropy()), teacher=object(), progress=False)


def test_teacher_from_files_trained_and_packed(tmp_path):
    x, _ = _tiny_data(10)
    model = _tiny_binary(1)
    lowbit.save_model(model, str(tmp_path / "t.npz"))
    lowbit.convert(model).save(str(tmp_path / "p.npz"))
    float_teacher = Teacher(str(tmp_path / "t.npz"))
    packed_teacher = Teacher(str(tmp_path / "p.npz"))
    np.testing.assert_array_equal(float_teacher.scores(x), model.forward(x, train=False))
    np.testing.assert_array_equal(packed_teacher.scores(x).argmax(axis=1), model.predict(x))
    assert packed_teacher.config()["kind"] == "packed" and len(packed_teacher.config()["sha256"]) == 64
    with pytest.raises(ValueError, match="shape"):
        Teacher(model, input_shape=(3, 32, 32))
    with pytest.raises(TypeError, match="teacher"):
        Teacher(42)


# -- Bop --------------------------------------------------------------------------------------------
def test_bop_flips_binary_weights_and_steps_the_rest_with_adam():
    rng = np.random.default_rng(0)
    binary = QuantAffine(6, 4, bias=False, kernel_quantizer="ste_sign", kernel_constraint="clip", seed=0)
    real = Affine(4, 3, seed=1)
    model = Model([binary, BatchNorm(4), real], input_shape=(6,))
    twin = Model([Affine(6, 4, bias=False), BatchNorm(4), Affine(4, 3)], input_shape=(6,))
    lowbit.io.assign_model_arrays(twin, model_arrays(model))
    bop, adam = Bop(0.01, threshold=1e-3, gamma=0.5), Adam(0.01)
    for _ in range(3):
        w_before = np.where(binary.W >= 0, 1.0, -1.0).astype(np.float32)
        m_before = bop.state["bop_m"].get("0.W", np.zeros_like(binary.W)).copy()
        grads = [rng.normal(0, 0.01, a.shape).astype(np.float32) for a in (binary.W, real.W, real.b)]
        binary.dW, (real.dW, real.db) = grads[0], grads[1:]
        twin[2].dW, twin[2].db = grads[1].copy(), grads[2].copy()
        bop.step(model)
        adam.step(twin)
        m = m_before + np.float32(0.5) * (grads[0] - m_before)
        np.testing.assert_array_equal(bop.state["bop_m"]["0.W"], m)
        np.testing.assert_array_equal(binary.W, np.where(w_before * m > 1e-3, -w_before, w_before))
        np.testing.assert_array_equal(real.W, twin[2].W)  # Adam's step, bit for bit
        np.testing.assert_array_equal(real.b, twin[2].b)
    assert set(np.unique(binary.W)) <= {-1.0, 1.0}


def test_bop_checkpoint_resumes_exactly(tmp_path):
    x, y = _tiny_data()

    def trainer(epochs, out):
        return Trainer(_tiny_binary(), "cross_entropy", Bop(1e-3, threshold=1e-6, gamma=1e-2), epochs=epochs,
                       batch_size=20, out_dir=str(out), progress=False)

    full = trainer(2, tmp_path / "a")
    full.fit(x, y)
    trainer(1, tmp_path / "b").fit(x, y)
    again = trainer(2, tmp_path / "b")
    again.fit(x, y, resume=True)
    for key, value in model_arrays(full.model).items():
        np.testing.assert_array_equal(value, model_arrays(again.model)[key])
    assert get_optimizer("bop", lr=0.1, gamma=0.01).config()["gamma"] == 0.01


@pytest.mark.parametrize("options,match", [({"threshold": -1}, "threshold"), ({"gamma": 0}, "gamma"),
                                           ({"gamma": 2}, "gamma")])
def test_bop_refuses_bad_settings(options, match):
    with pytest.raises(ValueError, match=match):
        Bop(**options)


# -- RSign and RPReLU ---------------------------------------------------------------------------------
def test_rsign_forward_and_straight_through_gradient():
    rng = np.random.default_rng(0)
    layer = RSign(3, clip=1.0)
    layer.threshold = np.array([0.5, -0.2, 0.0], np.float32)
    x = rng.normal(0, 1.5, (5, 3, 2, 2)).astype(np.float32)
    x[0, 2, 0, 0] = 0.0  # sign(0) = +1
    u = x - layer.threshold.reshape(1, 3, 1, 1)
    np.testing.assert_array_equal(layer.forward(x, train=True), np.where(u >= 0, 1.0, -1.0))
    dout = rng.normal(size=x.shape).astype(np.float32)
    dx = layer.backward(dout)
    np.testing.assert_array_equal(dx, dout * (np.abs(u) <= 1))
    np.testing.assert_allclose(layer.dthreshold, -(dout * (np.abs(u) <= 1)).sum(axis=(0, 2, 3)), rtol=1e-6)
    with pytest.raises(ValueError, match="RSign expects"):
        layer.forward(np.zeros((2, 4), np.float32))


@pytest.mark.parametrize("shape", [(7, 4), (3, 4, 2, 3)])
def test_rprelu_gradients(shape):
    rng = np.random.default_rng(1)
    layer = RPReLU(4)
    layer.shift_in = rng.normal(0, 0.5, 4).astype(np.float32)
    layer.slope = rng.normal(0.2, 0.3, 4).astype(np.float32)
    layer.shift_out = rng.normal(0, 0.5, 4).astype(np.float32)
    check_layer_gradients(as_float64(layer), rng.normal(0, 2, shape))


def _randomise(model, seed=0):
    """Give BatchNorm, RSign and RPReLU arrays values away from their defaults."""
    rng = np.random.default_rng(seed)
    for _, layer, attr in model.named_arrays():
        value = getattr(layer, attr)
        if attr in ("running_mean", "beta", "threshold", "shift_in", "shift_out"):
            setattr(layer, attr, rng.normal(0, 0.5, value.shape).astype(np.float32))
        elif attr == "slope":
            setattr(layer, attr, rng.random(value.shape).astype(np.float32))
    return model


def _float_stage_layers(stages):
    names = []
    for stage in stages:
        names += [type(layer).__name__ for layer in getattr(stage, "layers", [])]
        names += _float_stage_layers(getattr(stage, "body", [])) + _float_stage_layers(getattr(stage, "shortcut", []))
    return names


@pytest.mark.parametrize("build", [
    lambda: bnn_mlp(0, hidden=(32, 32), rsign=True),
    lambda: binary_cnn(0, channels=(8, 8, 16, 16), hidden=32, rsign=True),
    lambda: bireal_resnet(0, widths=(8, 16), blocks_per_stage=1, rsign=True, rprelu=True),
    lambda: bireal_resnet(0, widths=(8,), blocks_per_stage=2, shortcut=False, rsign=True, rprelu=True),
], ids=["bnn_mlp", "binary_cnn", "bireal", "bireal_noshortcut"])
def test_rsign_and_rprelu_convert_to_packed_thresholds_with_equal_labels(build, tmp_path):
    model = _randomise(build())
    x, _ = _tiny_data(50, seed=4)
    packed = lowbit.convert(model)
    assert "RSign" not in _float_stage_layers(packed.stages)  # every learned threshold is folded
    np.testing.assert_array_equal(packed.predict(x), model.predict(x))
    np.testing.assert_array_equal(packed.predict_scores(x), model.predict_scores(x))
    packed.save(str(tmp_path / "p.npz"))
    np.testing.assert_array_equal(lowbit.load_packed(str(tmp_path / "p.npz")).predict(x), model.predict(x))
    lowbit.save_model(model, str(tmp_path / "m.npz"))
    np.testing.assert_array_equal(lowbit.load_model(str(tmp_path / "m.npz")).predict(x), model.predict(x))


def test_rprelu_with_negative_slopes_before_a_sign_stays_exact():
    # not monotone: no threshold can reproduce it, so it stays a float stage, still exact
    layers = [Flatten(), QuantAffine(784, 8, bias=False, kernel_quantizer="ste_sign", input_quantizer="ste_sign",
                                     seed=0),
              BatchNorm(8), RPReLU(8, slope=-0.5), QuantActivation("ste_sign"),
              QuantAffine(8, 10, kernel_quantizer="ste_sign", seed=1)]
    model = _randomise(Model(layers, input_shape=(1, 28, 28)), seed=2)
    model.layers[3].slope = np.full(8, -0.5, np.float32)
    x, _ = _tiny_data(40, seed=5)
    np.testing.assert_array_equal(lowbit.convert(model).predict(x), model.predict(x))


def test_rsign_model_file_with_wrong_threshold_shape_is_refused(tmp_path):
    model = bnn_mlp(0, hidden=(8,), rsign=True)
    spec = model.spec()
    path = str(tmp_path / "m.npz")
    lowbit.save_model(model, path)
    manifest, arrays = lowbit.io.read_archive(path, "lowbit.model")
    (index,) = [i for i, (_, child) in enumerate(spec["children"]) if child["type"] == "RSign"]
    manifest["model"]["children"][index][1]["config"]["channels"] = 9
    lowbit.io.write_archive(path, "lowbit.model", arrays, manifest)
    with pytest.raises(lowbit.ModelFileError, match="threshold"):
        lowbit.load_model(path)


# -- two-stage training ------------------------------------------------------------------------------
def test_binary_activation_stage_has_real_weights_and_the_same_arrays():
    model = binary_cnn(0, channels=(4, 4, 8, 8), hidden=16)
    stage = binary_activation_stage(model)
    kernels = {path: layer.kernel_quantizer.precision for path, layer in stage.named_layers()
               if hasattr(layer, "kernel_quantizer")}
    assert set(kernels.values()) == {32}
    inputs = [type(layer.input_quantizer).__name__ for _, layer in stage.named_layers() if hasattr(layer, "input_quantizer")]
    assert inputs.count("SteSign") == 5  # the activations stay binary
    for key, value in model_arrays(model).items():
        np.testing.assert_array_equal(value, model_arrays(stage)[key])
    with pytest.raises(ValueError, match="no binary kernel"):
        binary_activation_stage(mlp(0, hidden=(4,)))


def test_fit_stages_starts_stage_two_from_stage_one(tmp_path):
    x, y = _tiny_data(40)
    model = _tiny_binary()
    starts = []

    def make_trainer(net, epochs, out_dir, time_budget):
        starts.append((net, {k: v.copy() for k, v in model_arrays(net).items()}, epochs, out_dir))
        return Trainer(net, "cross_entropy", Adam(1e-2), epochs=epochs, batch_size=20, out_dir=out_dir,
                       progress=False)

    trainer, stage1 = fit_stages(model, make_trainer, 5, (x, y, x[:10], y[:10], None, None), out_dir=str(tmp_path),
                                 stages=(2, 1))
    (first, _, first_epochs, first_dir), (second, start, second_epochs, second_dir) = starts
    assert (first_epochs, second_epochs) == (2, 1) and second is model and first is not model
    assert first_dir == os.path.join(str(tmp_path), "stage1") and second_dir == str(tmp_path)
    for key, value in model_arrays(first).items():  # stage 2 began where stage 1 ended
        np.testing.assert_array_equal(start[key], value)
    assert stage1["epochs"] == 2 and len(stage1["history"]) == 2 and len(trainer.history) == 1
    assert os.path.exists(tmp_path / "stage1" / "model.npz") and os.path.exists(tmp_path / "best.npz")
    # run again: both stages resume from their finished checkpoints, nothing changes
    again = _tiny_binary()
    starts.clear()
    fit_stages(again, make_trainer, 5, (x, y, x[:10], y[:10], None, None), out_dir=str(tmp_path), stages=(2, 1))
    for key, value in model_arrays(model).items():
        np.testing.assert_array_equal(value, model_arrays(again)[key])


@pytest.mark.parametrize("text", ["3", "0,2", "a,b", "1,2,3"])
def test_stages_option_refuses_bad_text(text):
    with pytest.raises(argparse.ArgumentTypeError, match="E1,E2"):
        stages_option(text)


def test_best_test_epoch():
    history = [{"epoch": 1, "test_acc": 0.5}, {"epoch": 2, "test_acc": 0.7}, {"epoch": 3, "test_acc": 0.7}]
    assert best_test_epoch(history) == (2, 0.7)
    assert best_test_epoch([{"epoch": 1}]) == (None, None)


def test_lowbit_train_with_recipe_options(tmp_path):
    from lowbit.cli import main

    teacher = tmp_path / "teacher.npz"
    lowbit.save_model(mlp(3, hidden=(8,)), str(teacher))
    out = tmp_path / "run"
    status = main(["train", "--model", "bnn_mlp", "--model-option", "hidden=[16]", "--stages", "1,1", "--limit", "200",
                   "--teacher", str(teacher), "--temperature", "3", "--distill-weight", "0.8",
                   "--label-smoothing", "0.1", "--optimizer", "bop", "--out", str(out), "--quiet"])
    assert status == 0
    result = json.load(open(out / "result.json"))
    assert result["recipe"]["stages"] == [1, 1] and result["stage1"]["epochs"] == 1
    assert os.path.exists(out / "stage1" / "checkpoint.npz")
    bop_state = lowbit.io.read_archive(str(out / "checkpoint.npz"), "lowbit.checkpoint")[1]
    assert any(key.startswith("optimizer/bop_m/") for key in bop_state)


def test_summary_counts_binary_layers_behind_an_rsign_as_binary():
    plain, learned = lowbit.summarize(binary_cnn(0)), lowbit.summarize(binary_cnn(0, rsign=True))
    assert learned.totals["binary_macs"] == plain.totals["binary_macs"] > 0


def test_teacher_may_be_any_scorer_for_example_an_imported_torch_network():
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))

    class Imported:
        input_shape = (1, 28, 28)

        def predict_scores(self, x, batch_size=100):
            with torch.no_grad():
                return net(torch.from_numpy(x)).numpy()

    x, _ = _tiny_data(8)
    teacher = Teacher(Imported())
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(teacher.scores(x), expected)
    assert teacher.config() == {"kind": "external", "name": "Imported"}
