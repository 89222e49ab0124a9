"""Issue 22: every bad file and bad input gets a clear error, nothing is silently wrong.

One test per numbered defect (named after what it protects), and hypothesis fuzz tests of the model,
packed-model and checkpoint loaders (the MNIST cache's are in test_data.py).  The CLI's answers to
the same bad inputs are checked in test_cli_errors.py.
"""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import lowbit
from lowbit import convert, fuzzing, load_model, load_packed, save_model
from lowbit.io import MANIFEST_KEY, ModelFileError, read_archive, write_archive
from lowbit.layers import Affine, BatchNorm, Conv2D, Flatten, MaxPool2D, ReLU
from lowbit.losses import SoftmaxCrossEntropy
from lowbit.model import Model
from lowbit.optimizers import Adam
from lowbit.trainer import Trainer
from lowbit.zoo import bireal_resnet

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def mlp(seed=0):
    return Model([Flatten(), Affine(16, 8, seed=seed), BatchNorm(8), ReLU(), Affine(8, 3, seed=seed + 1)],
                 input_shape=(1, 4, 4), name="mlp")


def tiny_bireal():
    return bireal_resnet(seed=1, widths=(4, 8), blocks_per_stage=1)


def images(n, shape=(1, 28, 28), seed=0):
    return np.random.default_rng(seed).random((n,) + shape, dtype=np.float32)


def rewrite_manifest(path, out, edit):
    """Copy the lowbit file ``path`` to ``out`` with ``edit(manifest)`` applied (arrays unchanged,
    manifest checksum recomputed: what a deliberate editor would do)."""
    manifest, arrays = read_archive(path, ("lowbit.model", "lowbit.packed", "lowbit.checkpoint"))
    kind = manifest.pop("format")
    for key in ("version", "arrays", "manifest_sha256"):
        manifest.pop(key)
    edit(manifest)
    return write_archive(out, kind, arrays, manifest)


# -- 1. the MNIST cache: tests/test_data.py::test_mnist_cache_altered_after_build_is_refused -------

# -- 2. NaN input --------------------------------------------------------------------------------------
def test_nan_images_are_refused_by_model_and_packed_model_alike():
    model = tiny_bireal()
    packed = convert(model)
    x = images(4)
    x[2, 0, 5, 5] = np.nan
    for runner in (model, packed):
        with pytest.raises(ValueError, match="x holds NaN in 1 of 4 images .first: index 2."):
            runner.predict(x)
    all_nan = np.full((1, 1, 28, 28), np.nan, np.float32)
    with pytest.raises(ValueError, match="NaN"):
        convert(lowbit.zoo.build_model("bnn_mlp", hidden=(64, 64))).predict(all_nan)


# -- 3. Residual blocks: tests/test_convert.py::test_bireal_resnet_packs_every_block_and_equals_the_simulation

# -- 4. cross-entropy without a ceiling ----------------------------------------------------------------
def test_cross_entropy_has_no_ceiling_and_matches_logsumexp():
    loss = SoftmaxCrossEntropy()
    assert loss.forward(np.array([[1000, -1000, 0]], np.float32), np.array([1])) == 2000.0
    scores = np.random.default_rng(0).normal(0, 3, (5, 4)).astype(np.float64)
    labels = np.array([0, 1, 2, 3, 0])
    expected = np.mean(np.log(np.exp(scores).sum(axis=1)) - scores[np.arange(5), labels])
    assert loss.forward(scores, labels) == pytest.approx(expected, rel=1e-12)
    grad = loss.backward()
    soft = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    soft[np.arange(5), labels] -= 1
    np.testing.assert_allclose(grad, soft / 5, rtol=1e-12)


# -- 5. max-pool padding -------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel,padding", [(2, 2), (3, 3), (1, 1), (2, 5)])
def test_maxpool_refuses_padding_not_smaller_than_kernel(kernel, padding):
    with pytest.raises(ValueError, match=f"padding must be smaller than kernel_size {kernel}.*got padding {padding}"):
        MaxPool2D(kernel, 1, padding)
    assert MaxPool2D(kernel, 1, kernel - 1).padding == kernel - 1


# -- 6. arrays the architecture does not use -----------------------------------------------------------
def test_model_file_with_an_unused_array_is_refused(tmp_path):
    path = save_model(mlp(), tmp_path / "m.npz")
    manifest, arrays = read_archive(path, "lowbit.model")
    arrays["9.W"] = np.zeros((2, 2), np.float32)
    write_archive(tmp_path / "extra.npz", "lowbit.model", arrays, {"model": manifest["model"]})
    with pytest.raises(ModelFileError, match=r"arrays \['9.W'\] that the architecture does not use"):
        load_model(tmp_path / "extra.npz")


# -- 7. --limit: test_cli_errors.py::test_eval_refuses_a_negative_limit --------------------------------

# -- 8. huge declared sizes, deep nesting --------------------------------------------------------------
@pytest.mark.parametrize("layer", [
    {"type": "Affine", "config": {"in_features": 10 ** 7, "out_features": 10 ** 7}},
    {"type": "Conv2D", "config": {"in_channels": 1, "out_channels": 8, "kernel_size": 1000}},
    {"type": "BatchNorm", "config": {"num_features": 4 * 10 ** 12}},
])
def test_huge_declared_layers_are_refused_before_anything_is_allocated(tmp_path, layer):
    path = save_model(mlp(), tmp_path / "m.npz")

    def edit(manifest):
        manifest["model"]["children"][1][1] = layer

    rewrite_manifest(path, tmp_path / "huge.npz", edit)
    with pytest.raises(ModelFileError, match="architecture needs|lacks array"):
        load_model(tmp_path / "huge.npz")


def _replace_member(path, out, name, data):
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, data if info.filename == name else zin.read(info))
    return out


def test_npy_header_declaring_4e12_elements_is_refused_without_allocating(tmp_path):
    path = save_model(mlp(), tmp_path / "m.npz")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (4 * 10 ** 12,)})
    with zipfile.ZipFile(path) as zf:
        body = zf.read("1.W.npy")
    _replace_member(path, tmp_path / "bad.npz", "1.W.npy", header.getvalue() + body[128:])
    with pytest.raises(ModelFileError, match="manifest says|does not fit"):
        load_model(tmp_path / "bad.npz")


def test_manifest_nested_9000_levels_is_refused(tmp_path):
    path = save_model(mlp(), tmp_path / "m.npz")
    text = '{"format": "lowbit.model", "version": 1, "deep": ' + "[" * 9000 + "]" * 9000 + "}"
    blob = io.BytesIO()
    np.lib.format.write_array(blob, np.frombuffer(text.encode(), np.uint8))
    _replace_member(path, tmp_path / "deep.npz", MANIFEST_KEY + ".npy", blob.getvalue())
    with pytest.raises(ModelFileError, match="nest"):
        load_model(tmp_path / "deep.npz")


def test_zip_member_declaring_more_than_it_stores_is_refused(tmp_path):
    path = save_model(mlp(), tmp_path / "m.npz")
    raw = bytearray((tmp_path / "m.npz").read_bytes())
    name = b"1.W.npy"
    position = 0
    while True:  # the central directory entry of that member: signature, then its name at offset 46
        position = bytes(raw).index(b"PK\x01\x02", position + 1)
        if raw[position + 46:position + 46 + len(name)] == name:
            break
    size = int.from_bytes(raw[position + 24:position + 28], "little")
    raw[position + 24:position + 28] = (size * 1000).to_bytes(4, "little")  # uncompressed size
    (tmp_path / "big.npz").write_bytes(bytes(raw))
    with pytest.raises(ModelFileError):
        load_model(tmp_path / "big.npz")


def test_edited_manifest_is_refused_by_its_checksum(tmp_path):
    path = save_model(mlp(), tmp_path / "m.npz")
    raw = (tmp_path / "m.npz").read_bytes()
    edited = raw.replace(b'"name": "mlp"', b'"name": "mlP"')
    assert edited != raw
    (tmp_path / "e.npz").write_bytes(edited)
    with pytest.raises(ModelFileError):
        load_model(tmp_path / "e.npz")


# -- 9. float16 models ---------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [mlp, tiny_bireal], ids=["mlp", "bireal"])
def test_float16_models_save_load_and_convert(tmp_path, build):
    model = build().astype(np.float16)
    shape = model.input_shape
    x = images(12, shape)
    loaded = load_model(save_model(model, tmp_path / "half.npz"))
    assert loaded.compute_dtype == np.float16 and loaded.spec() == model.spec()
    np.testing.assert_array_equal(loaded.predict_scores(x), model.predict_scores(x))
    packed = load_packed(convert(loaded).save(tmp_path / "packed.npz"))
    np.testing.assert_array_equal(packed.predict_scores(x), model.predict_scores(x))


# -- 10. empty batches ---------------------------------------------------------------------------------
def test_empty_batch_gives_empty_predictions_for_model_and_packed_model():
    model = tiny_bireal()
    empty = np.zeros((0, 1, 28, 28), np.float32)
    for runner in (model, convert(model)):
        assert runner.predict(empty).shape == (0,)
        assert runner.predict_scores(empty).shape == (0, 10)


# -- 11, 12, 16, 17: the CLI, in test_cli_errors.py ----------------------------------------------------

# -- 13. Ctrl-C in the experiment scripts --------------------------------------------------------------
def test_experiment_scripts_end_on_ctrl_c_with_one_line(capsys):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
    try:
        import _common
    finally:
        sys.path.pop(0)

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        _common.run_main(interrupted)
    assert info.value.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run the same command again" in err and "Traceback" not in err


def test_trainer_interrupt_hint_names_the_resume_flag(tmp_path, capsys, monkeypatch):
    x = images(40, (1, 4, 4))
    y = np.arange(40) % 3
    trainer = Trainer(mlp(), optimizer=Adam(0.01), epochs=2, batch_size=20, progress=False, out_dir=tmp_path)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train_epoch", stop)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(x, y)
    err = capsys.readouterr().err
    assert "--resume" in err and "rerun with resume" not in err


# -- 14. resume mismatch: only the differing keys ------------------------------------------------------
def test_resume_mismatch_names_only_the_differing_keys(tmp_path):
    x = images(40, (1, 4, 4))
    y = np.arange(40) % 3
    Trainer(mlp(), optimizer=Adam(0.01), epochs=1, batch_size=20, progress=False, out_dir=tmp_path).fit(x, y)
    other = mlp()
    other.layers[2].eps = 1e-3  # one value deep inside the model config
    trainer = Trainer(other, optimizer=Adam(0.01), epochs=2, batch_size=20, progress=False, out_dir=tmp_path)
    with pytest.raises(ValueError) as info:
        trainer.fit(x, y, resume=True)
    message = str(info.value)
    assert "eps" in message and "1e-05 in the checkpoint, 0.001 now" in message
    assert len(message) < 400 and "in_features" not in message


# -- 15. progress without a terminal -------------------------------------------------------------------
def test_progress_writes_plain_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    from lowbit.progress import tqdm

    monkeypatch.setenv("LOWBIT_PROGRESS_SECONDS", "3600")
    for _ in tqdm(range(500), desc="work"):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("work: 100%")


# -- the loaders, fuzzed -------------------------------------------------------------------------------
def _check(loader, reference, raw, tmp_path, choose):
    mutation = fuzzing.mutate_file(raw, choose)
    path = tmp_path / "mutated.npz"
    path.write_bytes(mutation.data)
    outcome = fuzzing.classify(loader, path, reference, mutation)
    assert not fuzzing.is_escape(outcome), (mutation.kind, mutation.description, outcome)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = save_model(tiny_bireal(), tmp_path_factory.mktemp("model") / "model.npz")
    return load_model(path), open(path, "rb").read()


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory):
    path = convert(tiny_bireal()).save(tmp_path_factory.mktemp("packed") / "packed.npz")
    return load_packed(path), open(path, "rb").read()


def _checkpoint_trainer(out_dir):
    return Trainer(mlp(), optimizer=Adam(0.01), epochs=2, batch_size=20, progress=False, out_dir=out_dir)


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint")
    trainer = _checkpoint_trainer(folder)
    trainer.epochs = 1
    trainer.fit(images(40, (1, 4, 4)), np.arange(40) % 3)
    loader = fuzzing.checkpoint_loader(lambda: _checkpoint_trainer(folder / "unused"))
    path = folder / "checkpoint.npz"
    return loader, loader.load(path), path.read_bytes()


@FUZZ
@given(st.data())
def test_fuzz_model_loader_loads_identically_or_refuses(model_file, tmp_path, data):
    reference, raw = model_file
    _check(fuzzing.model_loader(), reference, raw, tmp_path, fuzzing.hypothesis_chooser(data))


@FUZZ
@given(st.data())
def test_fuzz_packed_loader_loads_identically_or_refuses(packed_file, tmp_path, data):
    reference, raw = packed_file
    _check(fuzzing.packed_loader(), reference, raw, tmp_path, fuzzing.hypothesis_chooser(data))


@FUZZ
@given(st.data())
def test_fuzz_checkpoint_loader_loads_identically_or_refuses(checkpoint_file, tmp_path, data):
    loader, reference, raw = checkpoint_file
    _check(loader, reference, raw, tmp_path, fuzzing.hypothesis_chooser(data))


@pytest.mark.parametrize("kind", fuzzing.KINDS)
def test_every_mutation_kind_applies_to_a_model_file(model_file, tmp_path, kind):
    reference, raw = model_file
    rng = np.random.default_rng(0)
    mutation = fuzzing.mutate_file(raw, fuzzing.rng_chooser(rng), kind)
    assert mutation.kind == kind and mutation.data != raw
    path = tmp_path / "m.npz"
    path.write_bytes(mutation.data)
    assert not fuzzing.is_escape(fuzzing.classify(fuzzing.model_loader(), path, reference, mutation))


def test_manifest_written_sorted_round_trips(tmp_path):
    """The manifest checksum is over sorted-key JSON: a file re-saved loads identically."""
    path = save_model(mlp(), tmp_path / "m.npz")
    manifest, _ = read_archive(path, "lowbit.model")
    assert json.loads(json.dumps(manifest, sort_keys=True)) == manifest
