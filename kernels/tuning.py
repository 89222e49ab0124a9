"""Cache blocking of the CPU GEMM chosen per CPU: a short tuning at first use, cached on disk.

The micro-kernel's register tile (``TILE_ROWS x TILE_COLS``) is fixed by the instruction set (see
``_intrinsics``); what differs between CPUs of one instruction set is how the work is cut around
it: how many bytes of A rows a block keeps in L2 (``row_chunk_bytes``) and how many blocks each
thread gets (``blocks_per_thread``, balance against scheduling overhead).  ``gemm_blocking()``
returns the pair this process uses.  The result of ``xnor_gemm`` is the same bit for bit whatever
the pair (every block computes whole dot products; the tests run several).

At the first call of a process it looks in the tuning cache, a JSON file
``$XDG_CACHE_HOME/lowbit/kernel_tuning.json`` (``~/.cache/lowbit/kernel_tuning.json``), for an
entry keyed by the CPU model, the lowbit version, the instruction set's tile and the Numba thread
count.  Without one it times ``CANDIDATES`` on two small problems shaped like the packed models'
layers, each against the default in the same round (medians of the ratios over 5 rounds; about
0.3 s after the kernel is compiled), keeps the default unless another pair is at least 3% faster,
and writes the entry (atomic replace).  On a machine that other processes load, the choice can be
off; delete the file (or the entry) to tune again.  A cache file that cannot be read or holds something else is ignored and rewritten.

``LOWBIT_TUNING=0`` (or ``off``) turns tuning and the cache off: the defaults are used, as the test
suite does for determinism.  ``LOWBIT_TUNING_FILE`` names another cache file.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

from ._intrinsics import TILE_COLS, TILE_ROWS, popcount64

__all__ = ["DEFAULT_BLOCKING", "CANDIDATES", "gemm_blocking", "tune_gemm", "tuning_file", "cpu_model",
           "tuning_enabled", "popcount_peak"]

# (row_chunk_bytes, blocks_per_thread): about 128 KiB of A rows per block (half a 256 KiB-1 MiB
# L2) and at least four blocks per thread.
DEFAULT_BLOCKING = (131072, 4)
CANDIDATES = tuple((chunk, blocks) for chunk in (32768, 65536, 131072, 262144, 524288) for blocks in (1, 2, 4, 8))
# A candidate must beat the default by this fraction to replace it (timings on a shared machine
# move by a few percent; the default should not lose to noise).
_MIN_GAIN = 0.03
_ROUNDS = 5
_SCHEMA = 1

_chosen: dict = {}


def tuning_enabled():
    """False when ``$LOWBIT_TUNING`` is ``0``, ``off``, ``false`` or ``no``."""
    return os.environ.get("LOWBIT_TUNING", "1").strip().lower() not in ("0", "off", "false", "no")


def tuning_file():
    """``$LOWBIT_TUNING_FILE``, else ``$XDG_CACHE_HOME/lowbit/kernel_tuning.json``, else
    ``~/.cache/lowbit/kernel_tuning.json``."""
    if os.environ.get("LOWBIT_TUNING_FILE"):
        return Path(os.environ["LOWBIT_TUNING_FILE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lowbit" / "kernel_tuning.json"


def cpu_model():
    """The CPU's model name (``/proc/cpuinfo``'s ``model name``, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _key(threads):
    from lowbit import __version__

    return f"{cpu_model()} | lowbit {__version__} | tile {TILE_ROWS}x{TILE_COLS} | threads {threads}"


def _valid(value):
    return (isinstance(value, list) and len(value) == 2 and all(type(v) is int and v > 0 for v in value))


def _read_cache(path):
    """The cache's entries (dict), or {} when the file is missing, unreadable or malformed."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(doc, dict) or doc.get("schema") != _SCHEMA or not isinstance(doc.get("entries"), dict):
        return {}
    return {key: entry for key, entry in doc["entries"].items()
            if isinstance(entry, dict) and _valid(entry.get("gemm_blocking"))}


def _write_cache(path, entries):
    from lowbit.io import write_bytes_atomic

    doc = {"schema": _SCHEMA, "about": "lowbit kernel tuning (kernels/tuning.py); delete to retune",
           "entries": entries}
    try:
        write_bytes_atomic(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    except OSError:
        pass  # a read-only home: tune again next time


def _problems(rng):
    """Two representative products: a batch of 96 against a 4096-wide layer, and a conv-like
    1152 x 256 x 576 (im2col of a 3x3x64 layer)."""
    from .gemm import prepare_gemm_weights

    problems = []
    for m, n, k in ((96, 2048, 4096), (1152, 256, 576)):
        words = (k + 63) // 64
        a = rng.integers(0, 2**63, size=(m, words), dtype=np.uint64, endpoint=True)
        b = rng.integers(0, 2**63, size=(n, words), dtype=np.uint64, endpoint=True)
        out = np.empty((m, n), dtype=np.int32)
        problems.append((a, prepare_gemm_weights(b, k), k, out))
    return problems


def tune_gemm(candidates=CANDIDATES, rounds=_ROUNDS, seed=0):
    """Time ``candidates`` (``(row_chunk_bytes, blocks_per_thread)`` pairs) on the representative
    problems at the current Numba thread count; returns ``(best, {candidate: relative time})``.

    Each round times the default and then every candidate; a candidate's relative time is the
    median over the rounds of its time over the default's in the same round (so that another
    process's load, which moves from round to round, hits both sides of each ratio alike).
    ``best`` is the default unless a candidate's relative time is below ``1 - _MIN_GAIN``.
    """
    from .gemm import _gemm_panels

    threads = numba.get_num_threads()
    problems = _problems(np.random.default_rng(seed))
    candidates = [c for c in dict.fromkeys(candidates) if c != DEFAULT_BLOCKING]

    def seconds(candidate):
        start = time.perf_counter()
        for a, prepared, k, out in problems:
            _gemm_panels(a.reshape(1, *a.shape), prepared._panels, out.shape[1], k, out, threads, *candidate)
        return time.perf_counter() - start

    seconds(DEFAULT_BLOCKING)  # compiles (or loads) the kernel
    ratios = {candidate: [] for candidate in candidates}
    for _ in range(rounds):
        for candidate in candidates:
            default_s = seconds(DEFAULT_BLOCKING)
            ratios[candidate].append(seconds(candidate) / default_s)
    relative = {DEFAULT_BLOCKING: 1.0, **{c: float(np.median(r)) for c, r in ratios.items()}}
    best = min(relative, key=relative.get)
    if relative[best] > 1 - _MIN_GAIN:
        best = DEFAULT_BLOCKING
    return best, relative


def gemm_blocking(threads=None):
    """``(row_chunk_bytes, blocks_per_thread)`` for the CPU GEMM of this process and ``threads``
    (default: Numba's thread count, which the kernels' wrappers pass in: reading it costs a
    microsecond, which batch-1 calls feel).

    From memory, else from the tuning cache, else tuned now and cached (see the module docstring);
    ``DEFAULT_BLOCKING`` when ``$LOWBIT_TUNING`` turns tuning off.
    """
    if threads is None:
        threads = numba.get_num_threads()
    if threads in _chosen:
        return _chosen[threads]
    if not tuning_enabled():
        return DEFAULT_BLOCKING
    path = tuning_file()
    key = _key(threads)
    entries = _read_cache(path)
    if key in entries:
        blocking = tuple(entries[key]["gemm_blocking"])
    else:
        _chosen[threads] = DEFAULT_BLOCKING  # a nested call during tuning uses the default
        blocking, relative = tune_gemm()
        entries[key] = {"gemm_blocking": list(blocking), "gain_over_default": 1 / relative[blocking] - 1,
                        "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _write_cache(path, entries)
    _chosen[threads] = blocking
    return blocking


# ---------------------------------------------------------------------------------------------
# The CPU's own limit: xor + popcount + add over L1-resident words
# ---------------------------------------------------------------------------------------------


@njit(cache=True)
def _xor_popcount_add(words, keys, repeats):
    """``repeats`` passes of ``total += popcount(word XOR key)`` over ``words`` for 8 ``keys``.

    Eight independent sums per loaded word: LLVM vectorises the loop (``vpopcntq`` on AVX-512
    VPOPCNTDQ) and the loads stay far below the arithmetic, so the loop runs at the rate of the
    xor, popcount and add units, the most an XNOR-popcount kernel can reach.
    """
    k0, k1, k2, k3, k4, k5, k6, k7 = keys[0], keys[1], keys[2], keys[3], keys[4], keys[5], keys[6], keys[7]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0
    for _ in range(repeats):
        for i in range(words.shape[0]):
            w = words[i]
            s0 += popcount64(w ^ k0)
            s1 += popcount64(w ^ k1)
            s2 += popcount64(w ^ k2)
            s3 += popcount64(w ^ k3)
            s4 += popcount64(w ^ k4)
            s5 += popcount64(w ^ k5)
            s6 += popcount64(w ^ k6)
            s7 += popcount64(w ^ k7)
    return s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7


@njit(parallel=True, cache=True)
def _xor_popcount_add_threads(words, keys, repeats):
    """``_xor_popcount_add`` on each thread's own row of ``words`` (threads, n)."""
    totals = np.zeros(words.shape[0], dtype=np.int64)
    for t in prange(words.shape[0]):
        totals[t] = _xor_popcount_add(words[t], keys, repeats)
    return totals.sum()


def popcount_peak(threads=1, words=1024, repeats=20000, rounds=5, seed=0):
    """The CPU's binary MAC/s limit: 64 * (xor + popcount + add of 64-bit words per second).

    Each of ``threads`` threads (Numba's ``prange``; 1 runs without a parallel region) makes
    ``repeats`` passes over its own ``words`` words (8 KiB: L1-resident) against 8 keys held in
    registers (about 10 ms a round: long against a scheduler tick, so that a thread another
    process delays shows as a slower round, not as a 5x slower one).  Returns ``(median MAC/s, list
    of MAC/s per round)`` over ``rounds`` rounds.
    """
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 2**63, size=(threads, words), dtype=np.uint64, endpoint=True)
    keys = rng.integers(0, 2**63, size=8, dtype=np.uint64, endpoint=True)
    saved = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        def run():
            if threads == 1:
                return _xor_popcount_add(data[0], keys, repeats)
            return _xor_popcount_add_threads(data, keys, repeats)

        run()  # compiles or loads
        rates = []
        for _ in range(rounds):
            start = time.perf_counter()
            run()
            rates.append(64 * 8 * threads * words * repeats / (time.perf_counter() - start))
    finally:
        numba.set_num_threads(saved)
    return float(np.median(rates)), rates
