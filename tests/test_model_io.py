"""Model files: round trip, and clear errors on missing, truncated, foreign and tampered files."""
import json
import zipfile

import numpy as np
import pytest

import lowbit
from lowbit.io import ModelFileError, read_archive, write_archive
from lowbit.layers import BatchNorm, Concat, Conv2D, ReLU, Residual
from lowbit.model import Model
from lowbit.zoo import deep_convnet, mlp


def images(n, seed=0):
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def nested_model():
    return Model([
        Conv2D(1, 4, 3, padding=1, seed=0), BatchNorm(4), ReLU(),
        Residual([Conv2D(4, 4, 3, padding=1, seed=1), ReLU()]),
        Concat([[Conv2D(4, 2, 1, seed=2)], [Conv2D(4, 3, 3, padding=1, seed=3)]]),
        lowbit.layers.GlobalAvgPool2D(), lowbit.layers.Affine(5, 10, seed=4),
    ])


@pytest.mark.parametrize("build", [deep_convnet, mlp, nested_model])
def test_round_trip_predicts_identically(tmp_path, build):
    model = build()
    x = images(20)
    # give BatchNorm non-trivial running statistics
    model.forward(x, train=True)
    path = lowbit.save_model(model, tmp_path / "m.npz", {"note": "test"})
    loaded = lowbit.load_model(path)
    np.testing.assert_array_equal(loaded.predict_scores(x), model.predict_scores(x))
    assert loaded.spec() == model.spec()
    assert loaded.metadata == {"note": "test"}


def test_predict_contract():
    model = mlp()
    labels = model.predict(images(7))
    assert labels.shape == (7,) and labels.dtype.kind == "i"
    with pytest.raises(ValueError, match=r"x must have shape \(N, 1, 28, 28\), got \(7, 28, 28\)"):
        model.predict(np.zeros((7, 28, 28), np.float32))
    with pytest.raises(TypeError, match="divide uint8 images by 255"):
        model.predict(np.zeros((7, 1, 28, 28), np.uint8))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model file"):
        lowbit.load_model(tmp_path / "nope.npz")


def test_not_an_archive(tmp_path):
    p = tmp_path / "x.npz"
    p.write_bytes(b"hello, not a zip")
    with pytest.raises(ModelFileError, match="not an .npz archive"):
        lowbit.load_model(p)


def test_truncated_file(tmp_path):
    path = lowbit.save_model(mlp(), tmp_path / "m.npz")
    data = open(path, "rb").read()
    for cut in (len(data) // 2, len(data) - 100):
        p = tmp_path / f"cut{cut}.npz"
        p.write_bytes(data[:cut])
        with pytest.raises(ModelFileError):
            lowbit.load_model(p)


def test_foreign_npz(tmp_path):
    p = tmp_path / "foreign.npz"
    np.savez(p, a=np.zeros(3))
    with pytest.raises(ModelFileError, match="no manifest"):
        lowbit.load_model(p)


def test_wrong_kind(tmp_path):
    p = write_archive(tmp_path / "c.npz", "lowbit.checkpoint", {"a": np.zeros(2)})
    with pytest.raises(ModelFileError, match="expected lowbit.model"):
        lowbit.load_model(p)


def _rewrite(src, dst, edit):
    """Copy an npz archive, letting ``edit(name, bytes) -> bytes`` change members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item.filename, edit(item.filename, zin.read(item.filename)))


def test_tampered_weights(tmp_path):
    path = lowbit.save_model(mlp(), tmp_path / "m.npz")

    def flip(name, data):
        if name == "1.W.npy":
            data = bytearray(data)
            data[-1] ^= 0x01
            data = bytes(data)
        return data

    _rewrite(path, tmp_path / "t.npz", flip)
    with pytest.raises(ModelFileError, match="checksum"):
        lowbit.load_model(tmp_path / "t.npz")


def test_tampered_manifest_layer_type(tmp_path):
    path = lowbit.save_model(mlp(), tmp_path / "m.npz")
    manifest, arrays = read_archive(path, "lowbit.model")
    manifest["model"]["children"][0][1]["type"] = "os.system"
    write_archive(tmp_path / "t.npz", "lowbit.model", arrays, {"model": manifest["model"]})
    with pytest.raises(ModelFileError, match="unknown layer type 'os.system'"):
        lowbit.load_model(tmp_path / "t.npz")


def test_manifest_shape_mismatch(tmp_path):
    path = lowbit.save_model(mlp(), tmp_path / "m.npz")
    manifest, arrays = read_archive(path, "lowbit.model")
    arrays["1.W"] = arrays["1.W"][:10]
    write_archive(tmp_path / "t.npz", "lowbit.model", arrays, {"model": manifest["model"]})
    with pytest.raises(ModelFileError, match="architecture needs"):
        lowbit.load_model(tmp_path / "t.npz")


def test_manifest_is_plain_json(tmp_path):
    path = lowbit.save_model(mlp(), tmp_path / "m.npz")
    with np.load(path, allow_pickle=False) as data:
        doc = json.loads(bytes(data["__manifest__"]))
    assert doc["format"] == "lowbit.model" and doc["version"] == 1


def test_atomic_write_leaves_no_temp_on_failure(tmp_path):
    with pytest.raises(TypeError):
        write_archive(tmp_path / "bad.npz", "lowbit.model", {"a": np.array([object()])})
    assert list(tmp_path.iterdir()) == []
