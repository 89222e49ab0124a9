"""Model files: one ``.npz`` holding the arrays plus a JSON manifest, read with ``allow_pickle=False``.

Layout of a lowbit ``.npz`` file
--------------------------------
``__manifest__``
    uint8 array holding UTF-8 JSON: ``{"format": <kind>, "version": 1, "model": <layer spec>,
    "arrays": {key: {"shape": [...], "dtype": "float32", "sha256": "..."}}, "metadata": {...}}``.
    ``format`` is ``"lowbit.model"`` for trained models, ``"lowbit.checkpoint"`` for training
    checkpoints and ``"lowbit.packed"`` for packed inference models.
every other key
    One array each, named by its path in the model (``"3.W"``, ``"5.body.0.running_mean"``).

Every array's SHA-256 is recorded in the manifest and checked on load, so a truncated, foreign or
tampered file gives a :class:`ModelFileError` that says what is wrong instead of a numpy traceback.
Files are written atomically: to a temporary file in the same folder, then renamed.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile

import numpy as np

from .backend import to_numpy

__all__ = [
    "ModelFileError",
    "FORMAT_VERSION",
    "write_archive",
    "read_archive",
    "save_model",
    "load_model",
    "model_arrays",
    "model_from_manifest",
    "assign_model_arrays",
]

FORMAT_VERSION = 1
MANIFEST_KEY = "__manifest__"


class ModelFileError(ValueError):
    """A model, checkpoint or packed-model file is missing pieces, corrupted or of the wrong kind."""


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_archive(path, kind: str, arrays: dict, manifest: dict | None = None):
    """Write ``arrays`` and a manifest of ``kind`` to ``path`` atomically.  Returns the path."""
    path = os.fspath(path)
    host = {}
    described = {}
    for key, value in arrays.items():
        if key == MANIFEST_KEY:
            raise ValueError(f"array key {MANIFEST_KEY!r} is reserved")
        arr = np.ascontiguousarray(to_numpy(value))
        if arr.dtype == object:
            raise TypeError(f"array {key!r} has dtype object, which lowbit files never store")
        host[key] = arr
        described[key] = {"shape": list(arr.shape), "dtype": arr.dtype.str, "sha256": _digest(arr)}
    doc = dict(manifest or {})
    doc.update({"format": kind, "version": FORMAT_VERSION, "arrays": described})
    blob = np.frombuffer(json.dumps(doc, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **{MANIFEST_KEY: blob}, **host)
    return write_bytes_atomic(path, buffer.getvalue())


def read_archive(path, kind: str | tuple):
    """Read a file written by :func:`write_archive`; check its kind, version and every array's hash.

    Returns ``(manifest, arrays)``.  Raises :class:`FileNotFoundError` or :class:`ModelFileError`.
    """
    path = os.fspath(path)
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such model file: {path}")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path} is not a lowbit file (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            names = set(data.files)
            if MANIFEST_KEY not in names:
                raise ModelFileError(f"{path} is an .npz archive but not a lowbit file (no manifest)")
            try:
                manifest = json.loads(bytes(data[MANIFEST_KEY]).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ModelFileError(f"{path}: the manifest is not valid JSON ({exc})") from None
            if not isinstance(manifest, dict) or manifest.get("format") not in kinds:
                got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
                raise ModelFileError(f"{path} holds a {got!r} file, expected {' or '.join(kinds)}")
            if manifest.get("version") != FORMAT_VERSION:
                raise ModelFileError(
                    f"{path} has format version {manifest.get('version')!r}; this lowbit reads "
                    f"version {FORMAT_VERSION}"
                )
            described = manifest.get("arrays")
            if not isinstance(described, dict):
                raise ModelFileError(f"{path}: the manifest lists no arrays")
            stored = names - {MANIFEST_KEY}
            missing = sorted(set(described) - stored)
            extra = sorted(stored - set(described))
            if missing:
                raise ModelFileError(f"{path} is missing arrays {missing[:5]} (truncated or edited file)")
            if extra:
                raise ModelFileError(f"{path} has arrays the manifest does not list: {extra[:5]}")
            arrays = {}
            for key, info in described.items():
                arr = data[key]
                if list(arr.shape) != info.get("shape") or arr.dtype.str != info.get("dtype"):
                    raise ModelFileError(
                        f"{path}: array {key!r} is {arr.dtype.str}{list(arr.shape)}, the manifest says "
                        f"{info.get('dtype')}{info.get('shape')}"
                    )
                if _digest(arr) != info.get("sha256"):
                    raise ModelFileError(f"{path}: array {key!r} does not match its checksum (tampered "
                                         "or corrupted file)")
                arrays[key] = arr
    except ModelFileError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        raise ModelFileError(f"{path} could not be read as a lowbit file: {exc}") from None
    return manifest, arrays


def model_arrays(model) -> dict:
    """``{path: array}`` of every parameter and buffer of ``model`` (host copies)."""
    return {key: to_numpy(getattr(layer, attr)) for key, layer, attr in model.named_arrays()}


def assign_model_arrays(model, arrays: dict, source="file"):
    """Put ``arrays`` into ``model``, checking that keys, shapes and dtypes match exactly."""
    expected = {key: (layer, attr) for key, layer, attr in model.named_arrays()}
    missing = sorted(set(expected) - set(arrays))
    if missing:
        raise ModelFileError(f"{source} lacks arrays {missing[:5]} that the architecture needs")
    for key, (layer, attr) in expected.items():
        current = getattr(layer, attr)
        new = arrays[key]
        if tuple(new.shape) != tuple(current.shape) or new.dtype != current.dtype:
            raise ModelFileError(
                f"{source}: array {key!r} is {new.dtype}{tuple(new.shape)}, the architecture needs "
                f"{current.dtype}{tuple(current.shape)}"
            )
        setattr(layer, attr, np.array(new, copy=True))


def save_model(model, path, metadata: dict | None = None):
    """Save ``model`` (architecture + parameters + buffers) to one ``.npz`` file.  Returns the path."""
    return write_archive(path, "lowbit.model", model_arrays(model),
                         {"model": model.spec(), "metadata": metadata or {}})


def load_model(path):
    """Load a model saved by :func:`save_model` onto the CPU (or import an ``.onnx`` file).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ModelFileError
        The file is not a lowbit model, is truncated, or its arrays do not match the manifest.
    """
    from .onnx_io import is_onnx_path

    if is_onnx_path(path):  # an ONNX graph imports as a float Model (lowbit.onnx_io)
        from .onnx_io import load_onnx

        return load_onnx(path)
    manifest, arrays = read_archive(path, "lowbit.model")
    return model_from_manifest(manifest, arrays, path)


def model_from_manifest(manifest: dict, arrays: dict, path):
    """Build the model a ``lowbit.model`` manifest describes and fill in its arrays."""
    from .layers import layer_from_config

    try:
        model = layer_from_config(manifest["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: the architecture in the manifest is invalid ({exc})") from None
    assign_model_arrays(model, arrays, source=os.fspath(path))
    model.metadata = manifest.get("metadata", {})
    return model


def write_bytes_atomic(path, data: bytes):
    """Write ``data`` to ``path`` atomically (a temporary file in the same folder, then renamed), with
    the usual permissions.  Returns the path."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
