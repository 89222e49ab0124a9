"""XNOR-popcount matrix product of packed sign matrices (bit convention: see ``lowbit.kernels``)."""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ._checks import (
    array_kind,
    check_contiguous,
    check_dtype,
    check_int,
    check_ndim,
    check_packed,
    check_padding_bits,
    words_for,
)
from ._intrinsics import TILE_COLS, TILE_ROWS, xnor_microkernel

__all__ = ["xnor_gemm"]

# A row chunk of about this many bytes stays in L2 while every B panel of a column chunk passes
# through L1 against it (a panel is words * TILE_COLS * 8 bytes: 16 KiB at K = 4096).
_ROW_CHUNK_BYTES = 131072


@njit(cache=True)
def _pack_panel(b, panels, p):
    """Interleave B rows p*TILE_COLS ... into panel p (words, TILE_COLS); rows past N read as 0.

    Walks each B row once (contiguous reads, stores TILE_COLS words apart), through flat views
    with unsigned offsets, which spares Numba's negative-index handling.
    """
    n, words = b.shape
    first = p * TILE_COLS
    rows = min(TILE_COLS, n - first)
    source = b.reshape(-1)
    target = panels.reshape(-1)
    base = p * words * TILE_COLS
    for column in range(TILE_COLS):
        column_first = np.uint64(base + column)
        if column < rows:
            row_first = np.uint64((first + column) * words)
            for w in range(words):
                target[column_first + np.uint64(w * TILE_COLS)] = source[row_first + np.uint64(w)]
        else:
            for w in range(words):
                target[column_first + np.uint64(w * TILE_COLS)] = 0


@njit(parallel=True, cache=True)
def _pack_panels(b, panels):
    """Interleave B rows into panels (n_panels, words, TILE_COLS), see ``_pack_panel``."""
    for p in prange(panels.shape[0]):
        _pack_panel(b, panels, p)


@njit(cache=True)
def _blocking(m, words, n_panels, threads):
    """Split the (M rows) x (panels) work into equal blocks for the threads.

    Returns ``(rows_per_block, row_blocks, panels_per_block, panel_blocks)``.  A block is a run of
    A rows (at most about ``_ROW_CHUNK_BYTES``, a multiple of TILE_ROWS) against a run of panels.
    ``prange`` hands each thread an equal count of consecutive blocks, so the blocks are made as
    equal as the tiles allow, at least ``4 * threads`` of them when M and N allow it, and their
    count a multiple of ``threads`` when it can be.
    """
    row_tiles = (m + TILE_ROWS - 1) // TILE_ROWS
    if row_tiles == 0 or n_panels == 0:
        return TILE_ROWS, 0, 1, 0
    max_tiles = max(1, _ROW_CHUNK_BYTES // (max(words, 1) * 8) // TILE_ROWS)
    row_blocks = max(1, (row_tiles + max_tiles - 1) // max_tiles)
    target_blocks = 4 * threads
    panel_blocks = min(n_panels, max(1, (target_blocks + row_blocks - 1) // row_blocks))
    panels_per_block = (n_panels + panel_blocks - 1) // panel_blocks
    panel_blocks = (n_panels + panels_per_block - 1) // panels_per_block
    if row_blocks * panel_blocks < target_blocks:
        row_blocks = min(row_tiles, (target_blocks + panel_blocks - 1) // panel_blocks)
    while (row_blocks * panel_blocks) % threads and row_blocks < row_tiles:
        row_blocks += 1
    tiles_per_block = (row_tiles + row_blocks - 1) // max(row_blocks, 1)
    row_blocks = (row_tiles + tiles_per_block - 1) // max(tiles_per_block, 1)
    return tiles_per_block * TILE_ROWS, row_blocks, panels_per_block, panel_blocks


@njit(cache=True)
def _gemm_block(a, panels, n, k, out, row_start, row_stop, panel_start, panel_stop, tile, padded_rows):
    """out[row_start:row_stop, columns of panels panel_start:panel_stop] of the XNOR GEMM.

    ``tile`` (TILE_ROWS, TILE_COLS) int32 and ``padded_rows`` (TILE_ROWS, >= words) uint64 are
    scratch buffers owned by the calling thread.
    """
    words = a.shape[1]
    for p in range(panel_start, panel_stop):
        column = p * TILE_COLS
        columns = min(TILE_COLS, n - column)
        panel_address = panels.ctypes.data + p * words * TILE_COLS * 8
        for row in range(row_start, row_stop, TILE_ROWS):
            rows = min(TILE_ROWS, row_stop - row)
            if rows == TILE_ROWS and columns == TILE_COLS:
                xnor_microkernel(
                    a.ctypes.data + row * words * 8, words, panel_address, words,
                    out.ctypes.data + (row * n + column) * 4, n, k,
                )
                continue
            if rows == TILE_ROWS:
                a_address = a.ctypes.data + row * words * 8
            else:
                # Tail rows: copy into a zero-padded block so the kernel reads no further.
                padded_rows[:, :] = 0
                padded_rows[:rows, :words] = a[row:row + rows, :]
                a_address = padded_rows.ctypes.data
            xnor_microkernel(a_address, words, panel_address, words, tile.ctypes.data, TILE_COLS, k)
            out[row:row + rows, column:column + columns] = tile[:rows, :columns]


@njit(parallel=True, cache=True)
def _gemm_panels(a, panels, n, k, out, threads):
    """out (M, n) int32 = k - 2 * popcount(a XOR b) with B given as interleaved panels.

    ``threads`` is ``numba.get_num_threads()`` of the caller (passed in: calling it here would
    stop Numba from caching the compiled function).
    """
    m, words = a.shape
    n_panels = panels.shape[0]
    rows_per_block, row_blocks, panels_per_block, panel_blocks = _blocking(m, words, n_panels, threads)
    for block in prange(row_blocks * panel_blocks):
        row_block = block // panel_blocks
        panel_block = block - row_block * panel_blocks
        tile = np.empty((TILE_ROWS, TILE_COLS), dtype=np.int32)
        padded_rows = np.empty((TILE_ROWS, max(words, 1)), dtype=np.uint64)
        row_start = row_block * rows_per_block
        panel_start = panel_block * panels_per_block
        _gemm_block(
            a, panels, n, k, out, row_start, min(m, row_start + rows_per_block),
            panel_start, min(n_panels, panel_start + panels_per_block), tile, padded_rows,
        )


@njit(cache=True)
def _xnor_gemm_cpu(a, b, k, panels, out, threads):
    _pack_panels(b, panels)
    _gemm_panels(a, panels, b.shape[0], k, out, threads)


def panel_buffer(n, words):
    """uint64 (ceil(n / TILE_COLS), words, TILE_COLS) buffer for ``_pack_panels``.

    Not zeroed (``_pack_panel`` writes every word): a fresh zeroed buffer would cost a page fault
    per 4 KiB on every call.
    """
    return np.empty(((n + TILE_COLS - 1) // TILE_COLS, words, TILE_COLS), dtype=np.uint64)


def xnor_gemm(a_packed, b_packed, k, out=None):
    """Binary matrix product ``sign(A) @ sign(B).T`` from packed signs, exactly, in int32.

    Parameters
    ----------
    a_packed : numpy.ndarray or cupy.ndarray, uint64, shape (M, ceil(k / 64))
        Packed rows of A (``pack_signs(A)``), C-contiguous, padding bits 0.
    b_packed : same kind as ``a_packed``, uint64, shape (N, ceil(k / 64))
        Packed rows of B, the same way.
    k : int
        Number of real columns of A and B (the length of the dot products).
    out : same kind, int32, shape (M, N), optional
        C-contiguous array to write the result into (saves the allocation).

    Returns
    -------
    product : same kind as the inputs, int32, shape (M, N)
        ``product[i, j] = sum_c sign(A)[i, c] * sign(B)[j, c] = k - 2 * popcount(a_i XOR b_j)``.
    """
    kind = array_kind(a_packed=a_packed, b_packed=b_packed)
    check_packed("a_packed", a_packed, ndim=2, layout="(M, words)")
    check_packed("b_packed", b_packed, ndim=2, layout="(N, words)")
    k = check_int("k", k, minimum=0)
    if k >= 2**31:
        raise ValueError(f"k must be < 2**31 so that the int32 result cannot overflow, got {k}")
    words = words_for(k)
    for name, arr in (("a_packed", a_packed), ("b_packed", b_packed)):
        if arr.shape[1] != words:
            raise ValueError(
                f"{name} must have ceil(k / 64) = {words} words per row for k={k}, "
                f"got shape {tuple(arr.shape)}"
            )
        check_padding_bits(name, arr, k)
    m, n = a_packed.shape[0], b_packed.shape[0]
    if out is not None:
        array_kind(a_packed=a_packed, out=out)
        check_dtype("out", out, np.int32)
        check_ndim("out", out, 2, "(M, N)")
        if tuple(out.shape) != (m, n):
            raise ValueError(f"out must have shape (M, N) = {(m, n)}, got {tuple(out.shape)}")
        check_contiguous("out", out)
    if kind == "cupy":
        from . import _cuda

        return _cuda.xnor_gemm(a_packed, b_packed, k, out)
    if out is None:
        out = np.empty((m, n), dtype=np.int32)
    if m and n:
        _xnor_gemm_cpu(a_packed, b_packed, k, panel_buffer(n, words), out, numba.get_num_threads())
    return out


def gemm_assembly():
    """Assembly of the parallel GEMM kernel, compiled afresh (cached code cannot be inspected).

    Used by the tests and the benchmark to check that the popcount is ``vpopcntq`` on AVX-512
    VPOPCNTDQ machines.  Takes a few seconds (one Numba compilation).
    """
    fresh = numba.njit(parallel=True, cache=False)(_gemm_panels.py_func)
    a = np.zeros((TILE_ROWS, 1), dtype=np.uint64)
    panels = panel_buffer(1, 1)
    out = np.empty((TILE_ROWS, 1), dtype=np.int32)
    fresh(a, panels, 1, 64, out, 1)
    return fresh.inspect_asm(fresh.signatures[0])
