"""Array-module selection: the one place in lowbit that imports CuPy.

Every layer body is written once against ``xp`` (numpy or cupy).  ``get_array_module(*arrays)``
returns :mod:`cupy` when any argument is a CuPy array and :mod:`numpy` otherwise.  CuPy is optional:
when it is not installed (or no CUDA device is usable) ``cupy`` is ``None`` and ``gpu_available()``
is False.
"""
from __future__ import annotations

import numpy as np

try:  # CuPy is an optional extra (``pip install lowbit[gpu]``).
    import cupy as _cupy  # type: ignore

    try:
        _cupy.cuda.runtime.getDeviceCount()
        cupy = _cupy
    except Exception:  # installed but no usable device/driver
        cupy = None
except Exception:  # ImportError, or a broken CUDA install
    cupy = None

__all__ = ["cupy", "gpu_available", "get_array_module", "is_cupy_array", "to_numpy", "to_device"]


def gpu_available() -> bool:
    """True when CuPy imported and at least one CUDA device answered."""
    return cupy is not None


def is_cupy_array(x) -> bool:
    return cupy is not None and isinstance(x, cupy.ndarray)


def get_array_module(*arrays):
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``."""
    for a in arrays:
        if is_cupy_array(a):
            return cupy
    return np


def to_numpy(x):
    """Copy a CuPy array to the host; numpy arrays and scalars pass through."""
    if is_cupy_array(x):
        return cupy.asnumpy(x)
    return x


def to_device(x, device: str):
    """Move ``x`` to ``device`` ('cpu' or 'gpu').  Raises if the GPU is asked for but unavailable."""
    if device == "cpu":
        return to_numpy(x)
    if device == "gpu":
        if cupy is None:
            raise RuntimeError("device='gpu' requested but CuPy with a CUDA device is not available")
        return cupy.asarray(x)
    raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
