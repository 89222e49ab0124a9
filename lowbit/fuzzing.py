"""Mutations of lowbit files, for the loaders' robustness tests and ``experiments/fuzz_loaders.py``.

:func:`mutate_file` takes the bytes of a valid ``.npz`` file (a model, packed model, checkpoint or
MNIST cache) and returns one mutation of it: truncated, bits flipped, the manifest JSON edited, an
array's dtype or shape changed, a ``.npy`` header edited, or a member added.  Each mutation says
whether it is a *corruption* (the file no longer matches its own checksums: a loader must load
the identical model or refuse it) or *crafted* (the checksums were recomputed, as a deliberate
editor would: a loader must refuse it with its own error class or load what it now describes --
never fail with another exception or allocate what the file does not hold).

Choices come from ``choose(n) -> int in [0, n)``: :func:`rng_chooser` (numpy) or
:func:`hypothesis_chooser` (hypothesis' ``st.data()``, so failures shrink).
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import zipfile
from typing import NamedTuple

import numpy as np

__all__ = ["Mutation", "mutate_file", "rng_chooser", "hypothesis_chooser", "KINDS"]

KINDS = ("truncate", "flip_bits", "edit_manifest", "change_array", "edit_npy_header", "add_member")
_MANIFEST = "__manifest__"
# Values a manifest edit puts in place of another: wrong types, edge numbers, huge sizes.
_VALUES = (None, True, -1, 0, 1, 3, 7, 10 ** 7, 4 * 10 ** 12, 2 ** 63, 1.5, -0.0, "x", "", "float16",
           "Affine", "Conv2D", "Residual", "packed", [], [1], [10 ** 7, 10 ** 7], {}, {"type": "ReLU"})
_DEEP = "__lowbit_fuzz_deep__"


class Mutation(NamedTuple):
    kind: str
    crafted: bool
    description: str
    data: bytes


def rng_chooser(rng):
    """``choose(n)`` from a numpy Generator."""
    return lambda n: int(rng.integers(0, max(1, int(n))))


def hypothesis_chooser(data):
    """``choose(n)`` drawing from hypothesis' ``st.data()`` object."""
    from hypothesis import strategies as st

    return lambda n: data.draw(st.integers(0, max(1, int(n)) - 1))


# -- archive helpers ---------------------------------------------------------------------------------
def _members(raw):
    """``[(ZipInfo, bytes)]`` of a zip archive, or None when it cannot be read."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            return [(info, zf.read(info)) for info in zf.infolist()]
    except Exception:  # noqa: BLE001 - any unreadable archive just limits the mutations
        return None


def _archive(members):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for info, data in members:
            zf.writestr(info.filename, data, compress_type=info.compress_type)
    return out.getvalue()


def _npy(arr):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()


def _load_npy(data):
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def _manifest_of(members):
    for index, (info, data) in enumerate(members):
        if info.filename == _MANIFEST + ".npy":
            try:
                return index, json.loads(_load_npy(data).tobytes().decode("utf-8"))
            except Exception:  # noqa: BLE001
                return None
    return None


def _write_manifest(members, index, doc, recompute):
    from .io import MANIFEST_DIGEST_KEY, manifest_digest

    if recompute and isinstance(doc, dict):
        doc = dict(doc)
        doc[MANIFEST_DIGEST_KEY] = manifest_digest(doc)
    text = json.dumps(doc, sort_keys=True)
    text = text.replace(json.dumps(_DEEP), "[" * 9000 + "]" * 9000)
    blob = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    members = list(members)
    members[index] = (members[index][0], _npy(blob))
    return _archive(members)


def _nodes(doc):
    """``[(container, key)]`` of every value inside ``doc`` (depth first, without recursion)."""
    out, stack = [], [doc]
    while stack:
        node = stack.pop()
        keys = list(node) if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else []
        for key in keys:
            out.append((node, key))
            stack.append(node[key])
    return out


def _describe_array(doc, name, arr):
    """Update the manifest's entry of array ``name`` to ``arr`` (shape, dtype, digest)."""
    from .io import array_digest

    arrays = doc.get("arrays") if isinstance(doc, dict) else None
    if isinstance(arrays, dict):
        arrays[name] = {"shape": list(arr.shape), "dtype": arr.dtype.str, "sha256": array_digest(arr)}


# -- the mutations -----------------------------------------------------------------------------------
def _truncate(raw, choose, members):
    keep = choose(len(raw))
    return Mutation("truncate", False, f"kept {keep} of {len(raw)} bytes", raw[:keep])


def _flip_bits(raw, choose, members):
    data = bytearray(raw)
    count = 1 + choose(8)
    where = []
    for _ in range(count):
        position = choose(len(data))
        data[position] ^= 1 << choose(8)
        where.append(position)
    return Mutation("flip_bits", False, f"flipped bits at bytes {where}", bytes(data))


def _edit_manifest(raw, choose, members):
    found = _manifest_of(members)
    if found is None:
        return None
    index, doc = found
    doc = copy.deepcopy(doc)
    nodes = _nodes(doc)
    if not nodes:
        return None
    container, key = nodes[choose(len(nodes))]
    operation = choose(4)
    old = container[key]
    if operation == 0 and isinstance(container, dict):
        del container[key]
        what = f"deleted {key!r}"
    elif operation == 1 and isinstance(old, (int, float)) and not isinstance(old, bool):
        new = old + (1 if choose(2) else -1) if isinstance(old, int) else old * 2
        container[key] = new
        what = f"{key!r}: {old!r} -> {new!r}"
    elif operation == 2:
        container[key] = _DEEP
        what = f"{key!r}: nested 9000 levels deep"
    else:
        new = copy.deepcopy(_VALUES[choose(len(_VALUES))])
        container[key] = new
        what = f"{key!r}: {_short(old)} -> {new!r}"
    crafted = operation != 2 and bool(choose(2))
    data = _write_manifest(members, index, doc, recompute=crafted)
    return Mutation("edit_manifest", crafted, what + (" (checksum recomputed)" if crafted else ""), data)


def _short(value):
    text = repr(value)
    return text if len(text) < 40 else text[:37] + "..."


def _pick_array(members, choose):
    """``(index, ZipInfo, array)`` of one array member other than the manifest, or None."""
    candidates = [i for i, (info, _) in enumerate(members or []) if info.filename != _MANIFEST + ".npy"]
    if not candidates:
        return None
    index = candidates[choose(len(candidates))]
    info, data = members[index]
    try:
        return index, info, _load_npy(data)
    except Exception:  # noqa: BLE001 - an unreadable member limits the mutations
        return None


def _change_array(raw, choose, members):
    picked = _pick_array(members, choose)
    if picked is None:
        return None
    index, info, arr = picked
    operation = choose(5)
    if operation == 0:
        dtype = (np.float16, np.float32, np.float64, np.int32, np.uint8, np.int64)[choose(6)]
        with np.errstate(all="ignore"):
            new = arr.astype(dtype) if arr.dtype != dtype else arr.astype(np.float64)
        what = f"{arr.dtype} -> {new.dtype}"
    elif operation == 1 and arr.ndim and arr.shape[0] > 1:
        new = arr[:arr.shape[0] // 2]
        what = f"first axis halved {arr.shape} -> {new.shape}"
    elif operation == 2:
        new = arr.reshape(-1)
        what = f"flattened {arr.shape}"
    elif operation == 3:
        new = arr[None]
        what = f"axis added {arr.shape} -> {new.shape}"
    else:
        new = np.concatenate([arr.reshape(-1), arr.reshape(-1)[:1]]) if arr.size else np.zeros(1, arr.dtype)
        what = f"one element appended to {arr.shape}"
    members = list(members)
    members[index] = (info, _npy(new))
    name = info.filename[:-4]
    crafted, data = _with_array(members, name, new, bool(choose(2)))
    return Mutation("change_array", crafted, f"array {name!r}: {what}", data)


def _with_array(members, name, arr, crafted):
    """The archive of ``members``; when ``crafted``, with the manifest describing array ``name`` as
    ``arr`` and its checksum recomputed.  An MNIST cache has no manifest: its archive is consistent
    by itself, so any change to it counts as crafted.  Returns ``(crafted, bytes)``."""
    found = _manifest_of(members)
    if found is None:
        return crafted, _archive(members)
    if not crafted:
        return False, _archive(members)
    manifest_index, doc = found
    _describe_array(doc, name, arr)
    return True, _write_manifest(members, manifest_index, doc, recompute=True)


def _edit_npy_header(raw, choose, members):
    picked = _pick_array(members, choose)
    if picked is None:
        return None
    index, info, arr = picked
    shape = ((4 * 10 ** 12,), (10 ** 7, 10 ** 7), (arr.size + 1,), (0,), tuple(arr.shape) + (2,))[choose(5)]
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False, "shape": shape})
    body = _npy(arr)
    offset = len(body) - arr.nbytes
    members = list(members)
    members[index] = (info, header.getvalue() + body[offset:])
    return Mutation("edit_npy_header", False, f"array {info.filename!r}: header says {shape}", _archive(members))


def _add_member(raw, choose, members):
    if members is None:
        return None
    name = ("extra", "0.W", "stages.99.weights", "model/extra", "x_extra")[choose(5)]
    existing = {info.filename for info, _ in members}
    if name + ".npy" in existing:
        name += "_again"
    arr = np.arange(1 + choose(16), dtype=(np.float32, np.uint8)[choose(2)])
    info = zipfile.ZipInfo(name + ".npy")
    info.compress_type = members[0][0].compress_type if members else zipfile.ZIP_STORED
    members = list(members) + [(info, _npy(arr))]
    crafted, data = _with_array(members, name, arr, bool(choose(2)))
    return Mutation("add_member", crafted, f"added array {name!r}{' (listed)' if crafted else ''}", data)


_MUTATORS = {"truncate": _truncate, "flip_bits": _flip_bits, "edit_manifest": _edit_manifest,
             "change_array": _change_array, "edit_npy_header": _edit_npy_header, "add_member": _add_member}


def mutate_file(raw, choose, kind=None):
    """One :class:`Mutation` of the file bytes ``raw`` (``kind`` one of :data:`KINDS`, or chosen).

    A kind that does not apply (no manifest, unreadable archive) falls back to the next one.
    """
    if kind is not None and kind not in _MUTATORS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    members = _members(raw)
    start = KINDS.index(kind) if kind is not None else choose(len(KINDS))
    for offset in range(len(KINDS)):
        mutation = _MUTATORS[KINDS[(start + offset) % len(KINDS)]](raw, choose, members)
        if mutation is not None:
            return mutation
    raise ValueError("no mutation applies to these bytes")  # truncate always applies


def file_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the loaders under test --------------------------------------------------------------------------
class Loader(NamedTuple):
    """What a fuzz run needs of one loader: ``load(path)``, ``same(loaded, reference)`` and the
    exception classes that count as a clear refusal."""

    name: str
    load: object
    same: object
    refusals: tuple


def _same_arrays(a: dict, b: dict):
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes() for k in a)


def same_model(a, b):
    """Same architecture, arrays (bit for bit), compute dtype and metadata."""
    from .io import model_arrays

    return (a.spec() == b.spec() and _same_arrays(model_arrays(a), model_arrays(b))
            and np.dtype(a.compute_dtype) == np.dtype(b.compute_dtype)
            and getattr(a, "metadata", {}) == getattr(b, "metadata", {}))


def same_packed(a, b):
    """Same stages (configs and arrays), notes and metadata."""
    def arrays(m):
        return {f"{i}.{k}": v for i, s in enumerate(m.stages) for k, v in s.arrays().items()}

    return a.manifest() == b.manifest() and _same_arrays(arrays(a), arrays(b)) and a.metadata == b.metadata


def same_mnist(a, b):
    return all(getattr(a, f).dtype == getattr(b, f).dtype and np.array_equal(getattr(a, f), getattr(b, f))
               for f in a._fields)


def model_loader():
    from .io import ModelFileError, load_model

    return Loader("model", load_model, same_model, (ModelFileError,))


def packed_loader():
    from .io import ModelFileError
    from .packed import load_packed

    return Loader("packed", load_packed, same_packed, (ModelFileError,))


def checkpoint_loader(make_trainer):
    """Loads a checkpoint into a fresh ``make_trainer()``; the result compares the model, the
    optimizer's state arrays and the epoch."""
    from .io import ModelFileError, model_arrays
    from .trainer import ResumeMismatchError

    class Resumed(NamedTuple):
        model: dict
        optimizer: dict
        epoch: int

    def load(path):
        trainer = make_trainer()
        epoch = trainer.load_checkpoint(path)
        return Resumed(model_arrays(trainer.model), trainer.optimizer.state_arrays(), epoch)

    def same(a, b):
        return a.epoch == b.epoch and _same_arrays(a.model, b.model) and _same_arrays(a.optimizer, b.optimizer)

    # a crafted checkpoint of other run settings is refused as a resume mismatch
    return Loader("checkpoint", load, same, (ModelFileError, ResumeMismatchError))


def mnist_loader():
    """The MNIST cache: ``path`` is the cache file; loaded offline (download=False)."""
    import os

    from .data import MNISTUnavailableError, load_mnist

    def load(path):
        return load_mnist(os.path.dirname(os.fspath(path)), download=False, progress=False)

    return Loader("mnist", load, same_mnist, (MNISTUnavailableError,))


def classify(loader, path, reference, mutation):
    """Load ``path`` (holding ``mutation``) and say what happened: ``"identical"``, ``"refused"``,
    ``"loaded_as_described"`` (a crafted file that is valid), or an escape: ``"silent_difference"``
    (a corruption that loads to something else) or ``"escaped: <exception>"``."""
    try:
        loaded = loader.load(path)
    except loader.refusals:
        return "refused"
    except Exception as exc:  # noqa: BLE001 - exactly what the fuzz run counts
        return f"escaped: {type(exc).__name__}: {str(exc)[:200]}"
    if loader.same(loaded, reference):
        return "identical"
    return "loaded_as_described" if mutation.crafted else "silent_difference"


def is_escape(outcome):
    return outcome == "silent_difference" or outcome.startswith("escaped")
