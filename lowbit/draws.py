"""Where the random numbers of :class:`~lowbit.layers.Dropout` and
:class:`~lowbit.quantizers.StochasticBinary` come from: the ``draws`` setting.

``"generator"`` (the default)
    ``rng.random(shape, dtype=float32)`` from the layer's own ``numpy.random.Generator`` on the host,
    copied to the device when the model runs on CuPy.  Fast on the CPU; on a GPU every draw crosses
    the bus (the stochastic BNN MLP draws 37M values a step).
``"counter"``
    The host generator draws one 64-bit ``key`` per call (``rng.integers(0, 2**64, dtype=uint64)``,
    so checkpoints, which save the generator's state, still resume exactly), and the values are a hash
    of the key and the element's index, computed where the array lives (:func:`counter_uniform`):
    element ``i`` (C order) of the result is ``(splitmix64(key + (i + 1) * 0x9E3779B97F4A7C15) >> 40)
    * 2**-24``, a float32 in ``[0, 1)`` on the grid ``k / 2**24``, with SplitMix64's finaliser (Steele,
    Lea and Flood 2014; the mixing constants of Stafford's "Mix13").  The same key gives the same values
    bit for bit on numpy and CuPy, and on the GPU nothing but the key leaves the host.  On the CPU it is
    several times slower than the generator (64-bit integer arithmetic in numpy), so it is meant for
    GPU training; a run started on one device still resumes on the other.

The two settings draw different values, so a layer's ``draws`` is part of its config (written only
when it is ``"counter"``, so files of the default stay as they were).
"""
from __future__ import annotations

import numpy as np

from .backend import cupy

__all__ = ["DRAWS", "check_draws", "counter_uniform", "uniform"]

DRAWS = ("generator", "counter")

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_CHUNK = 1 << 22  # elements per numpy pass: bounds the uint64 temporaries to 32 MiB each

_kernel = None


def check_draws(draws):
    """``draws`` itself when it is one of :data:`DRAWS`, else a ``ValueError`` that names them."""
    if draws not in DRAWS:
        raise ValueError(f"draws must be one of {DRAWS}, got {draws!r}")
    return draws


def _cupy_kernel():
    global _kernel
    if _kernel is None:
        _kernel = cupy.ElementwiseKernel(
            "uint64 key", "float32 u",
            f"""
            unsigned long long z = key + (unsigned long long)(i + 1) * {_GOLDEN}ULL;
            z = (z ^ (z >> 30)) * {_MIX1}ULL;
            z = (z ^ (z >> 27)) * {_MIX2}ULL;
            z ^= z >> 31;
            u = (float)(z >> 40) * (1.0f / 16777216.0f);
            """,
            "lowbit_counter_uniform")
    return _kernel


def counter_uniform(key, shape, xp=np):
    """float32 values in ``[0, 1)`` of ``shape`` from the 64-bit ``key`` (see the module docstring),
    as a numpy array (``xp=numpy``) or a CuPy array (``xp=cupy``), equal bit for bit."""
    if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or not 0 <= int(key) < 2 ** 64:
        raise ValueError(f"key must be an int in [0, 2**64), got {key!r}")
    shape = tuple(int(n) for n in np.atleast_1d(shape)) if not isinstance(shape, int) else (shape,)
    key = np.uint64(int(key))
    if xp is not np:
        if cupy is None or xp is not cupy:
            raise ValueError(f"xp must be numpy or cupy, got {getattr(xp, '__name__', xp)!r}")
        out = cupy.empty(shape, dtype=np.float32)
        _cupy_kernel()(key, out)
        return out
    n = int(np.prod(shape, dtype=np.int64))
    out = np.empty(n, dtype=np.float32)
    with np.errstate(over="ignore"):  # the arithmetic is modulo 2**64 by design
        for start in range(0, n, _CHUNK):
            z = np.arange(start + 1, min(n, start + _CHUNK) + 1, dtype=np.uint64)
            z *= np.uint64(_GOLDEN)
            z += key
            z ^= z >> np.uint64(30)
            z *= np.uint64(_MIX1)
            z ^= z >> np.uint64(27)
            z *= np.uint64(_MIX2)
            z ^= z >> np.uint64(31)
            z >>= np.uint64(40)
            out[start:start + len(z)] = z.astype(np.float32) * np.float32(2.0 ** -24)
    return out.reshape(shape)


def uniform(rng, draws, shape, xp=np):
    """float32 ``U[0, 1)`` values of ``shape`` for a layer with generator ``rng`` and setting ``draws``,
    on ``xp``'s device."""
    if draws == "counter":
        return counter_uniform(rng.integers(0, 2 ** 64, dtype=np.uint64), shape, xp)
    u = rng.random(shape, dtype=np.float32)
    return u if xp is np else xp.asarray(u)
