"""Model files: one ``.npz`` holding the arrays plus a JSON manifest, read with ``allow_pickle=False``.

Layout of a lowbit ``.npz`` file
--------------------------------
``__manifest__``
    uint8 array holding UTF-8 JSON: ``{"format": <kind>, "version": 1, "model": <layer spec>,
    "arrays": {key: {"shape": [...], "dtype": "float32", "sha256": "..."}}, "metadata": {...},
    "manifest_sha256": "..."}`` (the last: SHA-256 of the rest, as JSON with sorted keys; files
    written before it was recorded lack it and still load).
    ``format`` is ``"lowbit.model"`` for trained models, ``"lowbit.checkpoint"`` for training
    checkpoints and ``"lowbit.packed"`` for packed inference models.
every other key
    One array each, named by its path in the model (``"3.W"``, ``"5.body.0.running_mean"``).

Every array's SHA-256 is recorded in the manifest and checked on load, so a truncated, foreign or
tampered file gives a :class:`ModelFileError` that says what is wrong instead of a numpy traceback.
Files are written atomically: to a temporary file in the same folder, then renamed.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import tempfile
import zipfile
import zlib

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
    "check_declared_shapes",
    "check_output_path",
    "declared_shapes",
    "atomic_write",
    "write_bytes_atomic",
    "write_json_atomic",
    "array_digest",
    "manifest_digest",
]

FORMAT_VERSION = 1
MANIFEST_KEY = "__manifest__"
MANIFEST_DIGEST_KEY = "manifest_sha256"


class ModelFileError(ValueError):
    """A model, checkpoint or packed-model file is missing pieces, corrupted or of the wrong kind."""


def array_digest(arr: np.ndarray) -> str:
    """SHA-256 of an array's bytes (C order), as the manifest records it."""
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def manifest_digest(doc: dict) -> str:
    """SHA-256 of the manifest's canonical JSON without its own digest: an edited architecture, name
    or note is refused like an edited array (files written before it was recorded have none)."""
    rest = {k: v for k, v in doc.items() if k != MANIFEST_DIGEST_KEY}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode("utf-8")).hexdigest()


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
        described[key] = {"shape": list(arr.shape), "dtype": arr.dtype.str, "sha256": array_digest(arr)}
    doc = dict(manifest or {})
    doc.pop(MANIFEST_DIGEST_KEY, None)
    doc.update({"format": kind, "version": FORMAT_VERSION, "arrays": described})
    doc[MANIFEST_DIGEST_KEY] = manifest_digest(doc)
    blob = np.frombuffer(json.dumps(doc, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **{MANIFEST_KEY: blob}, **host)
    return write_bytes_atomic(path, buffer.getvalue())


#: Deepest nesting of lists and dicts a manifest may have (lowbit's deepest models use about 20).
MAX_MANIFEST_DEPTH = 64
#: Largest manifest member, in bytes.
MAX_MANIFEST_BYTES = 64 << 20
# Deflate cannot expand data more than about 1032 times: a member that declares more is a lie.
_DEFLATE_RATIO = 1100


def _json_depth(value) -> int:
    """Nesting depth of a JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _member_sizes(zf, path):
    """``{array name: ZipInfo}`` of the archive's ``.npy`` members, after checking that each declared
    size is possible (nothing is decompressed here)."""
    members = {}
    for info in zf.infolist():
        if not info.filename.endswith(".npy"):
            raise ModelFileError(f"{path}: member {info.filename!r} is not an array (.npy)")
        key = info.filename[:-4]
        if key in members:
            raise ModelFileError(f"{path}: array {key!r} is stored twice")
        if info.compress_type == zipfile.ZIP_STORED:
            possible = info.compress_size
        elif info.compress_type == zipfile.ZIP_DEFLATED:
            possible = _DEFLATE_RATIO * info.compress_size + 1024
        else:
            raise ModelFileError(f"{path}: member {info.filename!r} uses compression method "
                                 f"{info.compress_type}, which lowbit files never use")
        if info.file_size > possible:
            raise ModelFileError(f"{path}: member {info.filename!r} declares {info.file_size} bytes from "
                                 f"{info.compress_size} stored bytes (corrupted or crafted file)")
        members[key] = info
    return members


def _read_member(zf, info, path, shape=None, dtype=None):
    """Read one ``.npy`` member; with ``shape``/``dtype`` the header must declare them (checked
    before any array is allocated), and the header's size must match the member's."""
    with zf.open(info) as fh:
        try:  # numpy parses the header with tokenize and literal_eval: any of their errors means damage
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                header_shape, fortran, header_dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                header_shape, fortran, header_dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unknown .npy version {version}")
        except (zipfile.BadZipFile, zlib.error, OSError):
            raise
        except Exception as exc:  # noqa: BLE001 - see above
            raise ModelFileError(f"{path}: array {info.filename!r} has a damaged .npy header "
                                 f"({type(exc).__name__}: {exc})") from None
        key = info.filename[:-4]
        if header_dtype.hasobject:
            raise ModelFileError(f"{path}: array {key!r} has dtype object, which lowbit files never store")
        if shape is not None and (list(header_shape) != shape or header_dtype.str != dtype):
            raise ModelFileError(f"{path}: array {key!r} is {header_dtype.str}{list(header_shape)}, the "
                                 f"manifest says {dtype}{shape}")
        count = int(np.prod(header_shape, dtype=object))
        if fh.tell() + count * header_dtype.itemsize != info.file_size:
            raise ModelFileError(f"{path}: array {key!r} declares {list(header_shape)} {header_dtype.str}, "
                                 f"which does not fit its {info.file_size}-byte member (truncated or "
                                 "crafted file)")
        data = bytearray(count * header_dtype.itemsize)  # writable, read in place: one copy only
        got = fh.readinto(data)
        if got != len(data):
            raise ModelFileError(f"{path}: array {key!r} is truncated ({got} of {len(data)} bytes)")
    arr = np.frombuffer(data, dtype=header_dtype)
    arr = arr.reshape(header_shape, order="F" if fortran else "C")
    return np.ascontiguousarray(arr) if not fortran else np.array(arr, order="C")


def read_archive(path, kind: str | tuple):
    """Read a file written by :func:`write_archive`; check its kind, version and every array's hash.

    Sizes are checked before anything is allocated: every zip member's declared size must be
    possible for its stored bytes, the manifest's nesting depth is bounded
    (:data:`MAX_MANIFEST_DEPTH`), and every array's ``.npy`` header must declare the shape and dtype
    the manifest lists and fit its member.

    Returns ``(manifest, arrays)``.  Raises :class:`FileNotFoundError` or :class:`ModelFileError`.
    """
    path = os.fspath(path)
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such model file: {path}")
    if os.path.isdir(path):
        raise ModelFileError(f"{path} is a folder, not a lowbit file")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path} is not a lowbit file (not an .npz archive)")
    try:
        with zipfile.ZipFile(path) as zf:
            members = _member_sizes(zf, path)
            manifest = _read_manifest(zf, members, path)
            described = _check_manifest(manifest, members, path, kinds)
            arrays = {}
            for key, info in described.items():
                arr = _read_member(zf, members[key], path, info["shape"], info["dtype"])
                if array_digest(arr) != info["sha256"]:
                    raise ModelFileError(f"{path}: array {key!r} does not match its checksum (tampered "
                                         "or corrupted file)")
                arrays[key] = arr
    except ModelFileError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, ValueError, EOFError, KeyError,
            struct.error, NotImplementedError, RuntimeError, SyntaxError, TypeError, MemoryError,
            OverflowError) as exc:
        raise ModelFileError(f"{path} could not be read as a lowbit file: {type(exc).__name__}: {exc}") from None
    return manifest, arrays


def _read_manifest(zf, members, path):
    """The archive's manifest, parsed: size, dtype, JSON, nesting depth and checksum checked."""
    if MANIFEST_KEY not in members:
        raise ModelFileError(f"{path} is an .npz archive but not a lowbit file (no manifest)")
    if members[MANIFEST_KEY].file_size > MAX_MANIFEST_BYTES:
        raise ModelFileError(f"{path}: the manifest declares {members[MANIFEST_KEY].file_size} bytes, "
                             f"more than the {MAX_MANIFEST_BYTES} a lowbit manifest may have")
    blob = _read_member(zf, members[MANIFEST_KEY], path)
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise ModelFileError(f"{path}: the manifest must be a 1-D uint8 array, got "
                             f"{blob.dtype}{list(blob.shape)}")
    try:
        manifest = json.loads(blob.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise ModelFileError(f"{path}: the manifest is not valid JSON ({reason})") from None
    if _json_depth(manifest) > MAX_MANIFEST_DEPTH:
        raise ModelFileError(f"{path}: the manifest nests deeper than {MAX_MANIFEST_DEPTH} levels")
    if isinstance(manifest, dict) and MANIFEST_DIGEST_KEY in manifest \
            and manifest[MANIFEST_DIGEST_KEY] != manifest_digest(manifest):
        raise ModelFileError(f"{path}: the manifest does not match its checksum (tampered or "
                             "corrupted file)")
    return manifest


def _check_manifest(manifest, members, path, kinds):
    """The manifest's ``arrays`` entry, once its kind, version and array list match the archive."""
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
    stored = set(members) - {MANIFEST_KEY}
    missing = sorted(set(described) - stored)
    extra = sorted(stored - set(described))
    if missing:
        raise ModelFileError(f"{path} is missing arrays {missing[:5]} (truncated or edited file)")
    if extra:
        raise ModelFileError(f"{path} has arrays the manifest does not list: {extra[:5]}")
    for key, info in described.items():
        if not isinstance(info, dict) or not _is_shape(info.get("shape")) \
                or not isinstance(info.get("dtype"), str) or not isinstance(info.get("sha256"), str):
            raise ModelFileError(f"{path}: the manifest's entry for array {key!r} needs a shape "
                                 "(list of ints >= 0), a dtype and a sha256")
    return described


def _is_shape(value):
    return isinstance(value, list) and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)


def check_output_path(path, argument, folder=False):
    """Refuse (ValueError naming ``argument``) an output that cannot be written, before any work.

    ``path`` is a file to write (``folder=False``: an existing folder there is refused) or a folder
    to write into (created later if missing).  The nearest existing folder on the way must be a
    folder in which a file can be created: this is tried (a temporary file, removed at once), so
    read-only file systems count too.  Returns ``path``.
    """
    target = os.path.abspath(os.fspath(path))
    if folder:
        if os.path.exists(target) and not os.path.isdir(target):
            raise ValueError(f"{argument}: {path} is a file, expected a folder to write into")
        probe = target
    else:
        if os.path.isdir(target):
            raise ValueError(f"{argument}: {path} is a folder, expected a file name")
        probe = os.path.dirname(target)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ValueError(f"{argument}: cannot write {path}: {probe} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".lowbit-write-check-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ValueError(f"{argument}: cannot write {path}: folder {probe} is not writable "
                         f"({exc.strerror or exc})") from None
    return path


def model_arrays(model) -> dict:
    """``{path: array}`` of every parameter and buffer of ``model`` (host copies)."""
    return {key: to_numpy(getattr(layer, attr)) for key, layer, attr in model.named_arrays()}


def assign_model_arrays(model, arrays: dict, source="file"):
    """Put ``arrays`` into ``model``, checking that keys, shapes and dtypes match exactly (an array
    that the architecture does not use is refused too)."""
    expected = {key: (layer, attr) for key, layer, attr in model.named_arrays()}
    missing = sorted(set(expected) - set(arrays))
    if missing:
        raise ModelFileError(f"{source} lacks arrays {missing[:5]} that the architecture needs")
    unused = sorted(set(arrays) - set(expected))
    if unused:
        raise ModelFileError(f"{source} has arrays {unused[:5]} that the architecture does not use "
                             "(edited file, or a model of another architecture)")
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
    """Save ``model`` (architecture + parameters + buffers) to one ``.npz`` file.  Returns the path.

    A half-precision model (``model.astype(np.float16)``) is saved as such: the manifest says
    ``"compute_dtype": "float16"`` and :func:`load_model` casts the rebuilt model before filling it.
    """
    doc = {"model": model.spec(), "metadata": metadata or {}}
    dtype = np.dtype(getattr(model, "compute_dtype", np.float32))
    if dtype != np.float32:
        doc["compute_dtype"] = dtype.name
    return write_archive(path, "lowbit.model", model_arrays(model), doc)


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


def _positive(config, name, where, default=None):
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelFileError(f"{where}: {name} must be a positive int, got {value!r}")
    return value


def declared_shapes(spec, source="file"):
    """``{array path: shape}`` that the layer ``spec`` declares for its Affine, Conv2D (and their
    quantized twins) and BatchNorm layers, worked out from the configs without building anything,
    so that a file is checked against its stored arrays before any weight is allocated."""
    from .layers import LAYERS, Affine, BatchNorm, Conv2D

    shapes = {}
    stack = [("", spec)]
    while stack:
        prefix, node = stack.pop()
        where = f"{source}: layer {prefix or '(root)'}"
        if not isinstance(node, dict):
            raise ModelFileError(f"{where}: a layer spec must be a dict, got {type(node).__name__}")
        config = node.get("config", {})
        children = node.get("children", [])
        if not isinstance(config, dict) or not isinstance(children, list):
            raise ModelFileError(f"{where}: 'config' must be a dict and 'children' a list")
        cls = LAYERS.get(node.get("type")) if isinstance(node.get("type"), str) else None
        at = f"{prefix}." if prefix else ""
        bias = config.get("bias", True)
        if cls is not None and issubclass(cls, Affine):
            n_in, n_out = _positive(config, "in_features", where), _positive(config, "out_features", where)
            shapes[f"{at}W"] = [n_in, n_out]
            if bias:
                shapes[f"{at}b"] = [n_out]
        elif cls is not None and issubclass(cls, Conv2D):
            c_in, c_out = _positive(config, "in_channels", where), _positive(config, "out_channels", where)
            k = _positive(config, "kernel_size", where, 3)
            shapes[f"{at}W"] = [c_out, c_in, k, k]
            if bias:
                shapes[f"{at}b"] = [c_out]
        elif cls is not None and issubclass(cls, BatchNorm):
            n = _positive(config, "num_features", where)
            for attr in ("gamma", "beta", "running_mean", "running_var"):
                shapes[f"{at}{attr}"] = [n]
        elif cls is not None and getattr(cls, "per_channel_arrays", False):  # lowbit.reactnet's layers
            n = _positive(config, "channels", where)
            for attr in cls.param_names:
                shapes[f"{at}{attr}"] = [n]
        for child in children:
            if not (isinstance(child, list) and len(child) == 2 and isinstance(child[0], str)):
                raise ModelFileError(f"{where}: children must be [name, spec] pairs")
            stack.append((f"{at}{child[0]}", child[1]))
    return shapes


def check_declared_shapes(spec, arrays, source="file"):
    """Refuse (ModelFileError) a spec whose layers declare arrays the file does not hold, or of
    other shapes, before the model is built (see :func:`declared_shapes`)."""
    for key, shape in declared_shapes(spec, source).items():
        if key not in arrays:
            raise ModelFileError(f"{source} lacks array {key!r} ({shape}) that the architecture needs")
        if list(arrays[key].shape) != shape:
            raise ModelFileError(f"{source}: array {key!r} has shape {list(arrays[key].shape)}, the "
                                 f"architecture needs {shape}")


def model_from_manifest(manifest: dict, arrays: dict, path):
    """Build the model a ``lowbit.model`` manifest describes and fill in its arrays.

    The declared shapes are checked against the arrays first (:func:`check_declared_shapes`), so a
    manifest that declares huge layers is refused before anything is allocated.
    """
    from .layers import layer_from_config

    source = os.fspath(path)
    spec = manifest.get("model")
    check_declared_shapes(spec, arrays, source)
    dtype = manifest.get("compute_dtype", "float32")
    if dtype not in ("float32", "float16"):
        raise ModelFileError(f"{source}: compute_dtype must be 'float32' or 'float16', got {dtype!r}")
    try:
        model = layer_from_config(spec)
        if dtype != "float32":
            model.astype(np.dtype(dtype))
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError, MemoryError,
            OverflowError) as exc:
        raise ModelFileError(f"{source}: the architecture in the manifest is invalid "
                             f"({type(exc).__name__}: {exc})") from None
    assign_model_arrays(model, arrays, source=source)
    metadata = manifest.get("metadata", {})
    model.metadata = metadata if isinstance(metadata, dict) else {}
    return model


@contextlib.contextmanager
def atomic_write(path, mode=None, prefix=".tmp-", suffix=""):
    """Open a temporary file beside ``path`` for writing bytes, and put it in place atomically.

    When the ``with`` block ends without an exception the file is flushed, fsynced, given ``mode``
    (default: what the umask gives a new file, 0644 under the usual umask; mkstemp's own is 0600)
    and renamed to ``path``.  On any exception (``KeyboardInterrupt`` too) it is removed and ``path``
    is left as it was, so a check that raises inside the block (a download's checksum) keeps an
    unverified file from ever appearing under its name.  ``prefix``/``suffix`` name the temporary
    file (``"<name>."`` and ``".part"`` for downloads).  The one atomic writer of lowbit:
    :func:`write_bytes_atomic` and every file lowbit writes go through it.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    try:
        os.chmod(tmp, (0o666 & ~_umask()) if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes_atomic(path, data: bytes, mode=None):
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`: a temporary file in the same folder,
    fsynced, then renamed), with the usual permissions (or ``mode``).  Returns the path."""
    with atomic_write(path, mode=mode) as fh:
        fh.write(data)
    return os.fspath(path)


def write_json_atomic(path, obj):
    """Write ``obj`` as indented JSON to ``path`` atomically (:func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))
