"""XNOR-popcount matrix product of packed sign matrices (bit convention: see ``lowbit.kernels``)."""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from lowbit.backend import is_cupy_array

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
from ._intrinsics import (
    THRESHOLD_EPILOGUE,
    TILE_COLS,
    TILE_ROWS,
    threshold_word32,
    threshold_word32_half,
    xnor_microkernel,
    xnor_microkernel_planes,
    xnor_microkernel_planes_threshold,
    xnor_microkernel_rows_threshold,
)

__all__ = ["xnor_gemm", "xnor_gemm_bitplanes", "xnor_gemm_threshold", "xnor_gemm_bitplanes_threshold",
           "prepare_gemm_weights", "PreparedGemmWeights"]


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
def _blocking(m, words, n_panels, threads, row_chunk_bytes, blocks_per_thread):
    """Split the (M rows) x (panels) work into equal blocks for the threads.

    Returns ``(rows_per_block, row_blocks, panels_per_block, panel_blocks)``.  A block is a run of
    A rows (at most about ``row_chunk_bytes``, a multiple of TILE_ROWS) against a run of panels.
    ``prange`` hands each thread an equal count of consecutive blocks, so the blocks are made as
    equal as the tiles allow, at least ``blocks_per_thread * threads`` of them when M and N allow
    it, and their count a multiple of ``threads`` when it can be.  The two sizes are chosen per CPU
    by ``tuning.gemm_blocking``; any values give the same result.

    More blocks come from the larger dimension: from the rows when ``M >= N`` (each thread then
    reads all of the smaller B, and no two threads write parts of one output row), else from the
    panels (each thread reads a share of B; a small-batch dense layer).  Splitting a short output
    row between threads made them write the same cache lines: a 64-channel convolution (rows of
    256 bytes, not 64-byte aligned) ran at a sixth of its one-thread rate on two threads.
    """
    row_tiles = (m + TILE_ROWS - 1) // TILE_ROWS
    if row_tiles == 0 or n_panels == 0:
        return TILE_ROWS, 0, 1, 0
    max_tiles = max(1, row_chunk_bytes // (max(words, 1) * 8) // TILE_ROWS)
    row_blocks = max(1, (row_tiles + max_tiles - 1) // max_tiles)
    target_blocks = max(1, blocks_per_thread * threads)
    if m >= n_panels * TILE_COLS:
        row_blocks = max(row_blocks, min(row_tiles, target_blocks))
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
def _block_range(block, panel_blocks, rows_per_block, m, panels_per_block, n_panels):
    """``(row_start, row_stop, panel_start, panel_stop)`` of block ``block`` of ``_blocking``'s split
    (row blocks major, then panel blocks)."""
    row_block = block // panel_blocks
    panel_block = block - row_block * panel_blocks
    row_start = row_block * rows_per_block
    panel_start = panel_block * panels_per_block
    return row_start, min(m, row_start + rows_per_block), panel_start, min(n_panels, panel_start + panels_per_block)


@njit(cache=True)
def _panel_half(flips, valids, p, n_panels):
    """For panel ``p`` (32 columns, half of packed word ``p // 2``): its 32 bits of ``flips`` and
    ``valids`` (``threshold.int32_bounds``) in the low half of an int64, and whether it is the last
    panel and the low half of its word (the high half, with no columns, is then written 0)."""
    shift = (p % 2) * 32
    return (np.int64((flips[p // 2] >> shift) & 0xFFFFFFFF), np.int64((valids[p // 2] >> shift) & 0xFFFFFFFF),
            p == n_panels - 1 and p % 2 == 0)


@njit(cache=True)
def _threshold_rows(scratch, rows, packed_out, first_row, n, word_start, word_stop, bounds, flips, valids):
    """Packed words ``word_start ... word_stop - 1`` of output rows ``first_row ... first_row + rows -
    1`` from the int32 results in ``scratch`` (row ``i`` of it is output row ``first_row + i``; rows
    ``64 * words`` wide, or 32 for at most 32 columns): ``threshold_word32`` (``_half`` when ``n <=
    32``) with ``threshold.int32_bounds``' ``bounds``, ``flips`` and ``valids``."""
    for i in range(rows):
        if n <= 32:
            packed_out[first_row + i, 0] = threshold_word32_half(scratch, i * scratch.shape[1], bounds, 0, flips[0],
                                                                 valids[0])
        else:
            for w in range(word_start, word_stop):
                packed_out[first_row + i, w] = threshold_word32(scratch, i * scratch.shape[1] + w * 64, bounds,
                                                                w * 64, flips[w], valids[w])


@njit(cache=True)
def _gemm_block(a, panels, n, k, out, row_start, row_stop, panel_start, panel_stop, tile, padded_rows):
    """out[row_start:row_stop, columns of panels panel_start:panel_stop] of the XNOR GEMM.

    ``a`` is (planes, M, words): one plane is the plain GEMM; several are bit planes (plane ``b``
    weighs ``2^b``) whose weighted sum the plane micro-kernel forms in its registers, and ``k``
    is then ``(2^planes - 1) * K``.  ``tile`` (TILE_ROWS, TILE_COLS) int32 and ``padded_rows``
    (planes, TILE_ROWS, >= words) uint64 are scratch buffers owned by the calling thread.
    """
    planes, m, words = a.shape
    plane_step = -m * words  # from one plane down to the next, in words
    tail = (row_stop - row_start) % TILE_ROWS
    if tail:
        # The block's last rows, copied once into a zero-padded block so the kernel reads no further.
        padded_rows[:, :, :] = 0
        padded_rows[:, :tail, :words] = a[:, row_stop - tail:row_stop, :]
    for p in range(panel_start, panel_stop):
        column = p * TILE_COLS
        columns = min(TILE_COLS, n - column)
        panel_address = panels.ctypes.data + p * words * TILE_COLS * 8
        for row in range(row_start, row_stop, TILE_ROWS):
            rows = min(TILE_ROWS, row_stop - row)
            full = rows == TILE_ROWS and columns == TILE_COLS
            if rows == TILE_ROWS:
                a_address = a.ctypes.data + ((planes - 1) * m + row) * words * 8
                a_stride, step = words, plane_step
            else:  # the tail rows, from padded_rows
                a_stride = padded_rows.shape[2]
                step = -TILE_ROWS * a_stride
                a_address = padded_rows.ctypes.data + (planes - 1) * TILE_ROWS * a_stride * 8
            if full:
                out_address, out_stride = out.ctypes.data + (row * n + column) * 4, n
            else:
                out_address, out_stride = tile.ctypes.data, TILE_COLS
            if planes == 1:
                xnor_microkernel(a_address, a_stride, panel_address, words, out_address, out_stride, k)
            else:
                xnor_microkernel_planes(a_address, a_stride, step, planes, words, panel_address, out_address,
                                        out_stride, k)
            if not full:
                out[row:row + rows, column:column + columns] = tile[:rows, :columns]


@njit(parallel=True, cache=True)
def _gemm_panels(a, panels, n, k, out, threads, row_chunk_bytes, blocks_per_thread):
    """out (M, n) int32 = k - 2 * popcount(a XOR b) with B given as interleaved panels.

    ``a`` is (planes, M, words), see ``_gemm_block``.  ``threads`` is ``numba.get_num_threads()``
    of the caller (passed in: calling it here would stop Numba from caching the compiled function).
    """
    planes, m, words = a.shape
    n_panels = panels.shape[0]
    rows_per_block, row_blocks, panels_per_block, panel_blocks = _blocking(
        m, words, n_panels, threads, row_chunk_bytes, blocks_per_thread)
    for block in prange(row_blocks * panel_blocks):
        tile = np.empty((TILE_ROWS, TILE_COLS), dtype=np.int32)
        padded_rows = np.empty((planes, TILE_ROWS, max(words, 1)), dtype=np.uint64)
        row_start, row_stop, panel_start, panel_stop = _block_range(block, panel_blocks, rows_per_block, m,
                                                                    panels_per_block, n_panels)
        _gemm_block(a, panels, n, k, out, row_start, row_stop, panel_start, panel_stop, tile, padded_rows)


@njit(parallel=True, cache=True)
def _gemm_threshold_panels(a, panels, n, k, packed_out, threads, row_chunk_bytes, blocks_per_thread, bounds, flips,
                           valids):
    """packed_out (M, ceil(n / 64)) = the thresholded bits of the XNOR GEMM of ``a`` (planes, M, words;
    several planes summed with weights ``2^b`` as in ``_gemm_block``, ``k`` then their total) with
    the panels, thresholded in the micro-kernel's registers (``xnor_microkernel_rows_threshold`` /
    ``xnor_microkernel_planes_threshold``; only where ``THRESHOLD_EPILOGUE``): each panel writes its
    uint32 half of the packed words and no int32 product reaches memory.  A block's last, partial
    tile goes through a scratch tile and ``threshold_word32``.  Blocks hold whole packed words (an
    even count of panels), so no two threads write halves of one word.  ``bounds``, ``flips``,
    ``valids``: ``threshold.int32_bounds``.
    """
    planes, m, words = a.shape
    plane_step = -m * words  # from one plane down to the next, in words
    n_panels = panels.shape[0]
    out_words = packed_out.shape[1]
    rows_per_block, row_blocks, panels_per_block, panel_blocks = _blocking(
        m, words, n_panels, threads, row_chunk_bytes, blocks_per_thread)
    if panel_blocks > 1 and panels_per_block % 2:
        panels_per_block += 1
        panel_blocks = (n_panels + panels_per_block - 1) // panels_per_block
    k_row = np.full(TILE_COLS, k, dtype=np.int32)  # one k row for every position (no padding here)
    k_rows = np.zeros(TILE_ROWS, dtype=np.int64)
    halves = packed_out.reshape(-1).view(np.uint32)  # panel p of a row writes its uint32 p
    half_stride = out_words * 2
    for block in prange(row_blocks * panel_blocks):
        row_start, row_stop, panel_start, panel_stop = _block_range(block, panel_blocks, rows_per_block, m,
                                                                    panels_per_block, n_panels)
        whole_tiles = (row_stop - row_start) // TILE_ROWS
        tail = row_start + whole_tiles * TILE_ROWS  # the partial tile's first row
        addresses = np.empty(whole_tiles * TILE_ROWS, dtype=np.int64)  # the one-plane kernel's row addresses
        for i in range(whole_tiles * TILE_ROWS):
            addresses[i] = a.ctypes.data + ((planes - 1) * m + row_start + i) * words * 8
        padded_rows = np.zeros((planes, TILE_ROWS, max(words, 1)), dtype=np.uint64)
        padded_rows[:, :row_stop - tail, :words] = a[:, tail:row_stop, :]
        tile = np.empty((TILE_ROWS, TILE_COLS), dtype=np.int32)
        scratch = np.empty((TILE_ROWS, out_words * 64), dtype=np.int32)
        for p in range(panel_start, panel_stop):
            column = p * TILE_COLS
            panel_address = panels.ctypes.data + p * words * TILE_COLS * 8
            flip, valid, no_other_half = _panel_half(flips, valids, p, n_panels)
            for t in range(whole_tiles):
                row = row_start + t * TILE_ROWS
                out_address = halves.ctypes.data + (row * half_stride + p) * 4
                if planes == 1:
                    xnor_microkernel_rows_threshold(
                        addresses.ctypes.data + t * TILE_ROWS * 8, 0, 1, words, panel_address, k_rows.ctypes.data,
                        k_row.ctypes.data, bounds.ctypes.data + column * 4, flip, valid, out_address, half_stride,
                    )
                else:
                    xnor_microkernel_planes_threshold(
                        a.ctypes.data + ((planes - 1) * m + row) * words * 8, words, plane_step, planes, words,
                        panel_address, k_rows.ctypes.data, k_row.ctypes.data, bounds.ctypes.data + column * 4, flip,
                        valid, out_address, half_stride,
                    )
                if no_other_half:
                    for i in range(TILE_ROWS):
                        halves[(row + i) * half_stride + p + 1] = 0
            if tail < row_stop:
                a_stride = padded_rows.shape[2]
                tail_address = padded_rows.ctypes.data + (planes - 1) * TILE_ROWS * a_stride * 8
                if planes == 1:
                    xnor_microkernel(tail_address, a_stride, panel_address, words, tile.ctypes.data, TILE_COLS, k)
                else:
                    xnor_microkernel_planes(tail_address, a_stride, -TILE_ROWS * a_stride, planes, words,
                                            panel_address, tile.ctypes.data, TILE_COLS, k)
                columns = min(TILE_COLS, n - column)
                scratch[:row_stop - tail, column:column + columns] = tile[:row_stop - tail, :columns]
        _threshold_rows(scratch, row_stop - tail, packed_out, tail, n, panel_start // 2, (panel_stop + 1) // 2,
                        bounds, flips, valids)


@njit(cache=True)
def _xnor_gemm_cpu(a, b, k, panels, out, threads, row_chunk_bytes, blocks_per_thread):
    _pack_panels(b, panels)
    _gemm_panels(a, panels, b.shape[0], k, out, threads, row_chunk_bytes, blocks_per_thread)


def panel_buffer(n, words):
    """uint64 (ceil(n / TILE_COLS), words, TILE_COLS) buffer for ``_pack_panels``.

    Not zeroed (``_pack_panel`` writes every word): a fresh zeroed buffer would cost a page fault
    per 4 KiB on every call.
    """
    return np.empty(((n + TILE_COLS - 1) // TILE_COLS, words, TILE_COLS), dtype=np.uint64)


class PreparedGemmWeights:
    """Packed right-hand operand of ``xnor_gemm`` made ready once for many calls (inference).

    Made by :func:`prepare_gemm_weights`, not by hand.  Holds a private copy of the packed rows
    (``weights``, (N, ceil(k / 64)) uint64), their length ``k`` and, for numpy weights, the panels
    the CPU kernel would otherwise interleave on every call (``_pack_panels``: a pass over all of
    B, about 0.1 ms for 4096 x 4096 bits).  For CuPy weights only the validated copy is held.
    """

    __slots__ = ("_weights", "_k", "_panels")

    def __init__(self, *args, **kwargs):
        raise TypeError("PreparedGemmWeights is made by prepare_gemm_weights(b_packed, k)")

    @property
    def weights(self):
        """The packed rows (N, ceil(k / 64)) uint64, numpy or CuPy."""
        return self._weights

    @property
    def k(self):
        """The length of the rows in bits."""
        return self._k

    @property
    def shape(self):
        return tuple(self._weights.shape)

    def __repr__(self):
        kind = "cupy" if is_cupy_array(self._weights) else "numpy"
        return f"PreparedGemmWeights(shape={self.shape}, k={self._k}, {kind})"


def _check_k(k):
    k = check_int("k", k, minimum=0)
    if k >= 2**31:
        raise ValueError(f"k must be < 2**31 so that the int32 result cannot overflow, got {k}")
    return k


def _check_operand(name, arr, k):
    words = words_for(k)
    if arr.shape[-1] != words:
        raise ValueError(
            f"{name} must have ceil(k / 64) = {words} words per row for k={k}, got shape {tuple(arr.shape)}"
        )
    check_padding_bits(name, arr, k)


def prepare_gemm_weights(b_packed, k):
    """``b_packed`` made ready once for many ``xnor_gemm`` calls, as inference engines hold weights.

    ``xnor_gemm(a, prepare_gemm_weights(b, k), k)`` equals ``xnor_gemm(a, b, k)`` bit for bit and
    skips per call the checks of ``b`` and, on the CPU, interleaving it into the micro-kernel's
    panels.  ``b_packed`` is copied: changing it afterwards does not change the prepared object.

    Parameters
    ----------
    b_packed : numpy.ndarray or cupy.ndarray, uint64, shape (N, ceil(k / 64))
        As for ``xnor_gemm``: C-contiguous, padding bits 0.
    k : int

    Returns
    -------
    PreparedGemmWeights
    """
    kind = array_kind(b_packed=b_packed)
    check_packed("b_packed", b_packed, ndim=2, layout="(N, words)")
    k = _check_k(k)
    _check_operand("b_packed", b_packed, k)
    prepared = object.__new__(PreparedGemmWeights)
    prepared._weights = b_packed.copy()
    prepared._k = k
    prepared._panels = None
    if kind == "numpy":
        prepared._panels = panel_buffer(b_packed.shape[0], b_packed.shape[1])
        if b_packed.shape[0]:
            _pack_panels(prepared._weights, prepared._panels)
    return prepared


def _right_operand(b_packed, k):
    """``(b_packed array, PreparedGemmWeights or None)`` after the checks of ``b_packed``."""
    if isinstance(b_packed, PreparedGemmWeights):
        if b_packed._k != k:
            raise ValueError(f"k={k} does not match the prepared weights (k={b_packed._k})")
        return b_packed._weights, b_packed
    if not (isinstance(b_packed, np.ndarray) or is_cupy_array(b_packed)):
        raise TypeError(
            "b_packed must be a numpy or CuPy array or PreparedGemmWeights (prepare_gemm_weights), got "
            f"{type(b_packed).__module__}.{type(b_packed).__name__}"
        )
    check_packed("b_packed", b_packed, ndim=2, layout="(N, words)")
    _check_operand("b_packed", b_packed, k)
    return b_packed, None


def _check_out(out, like, shape):
    array_kind(a_packed=like, out=out)
    check_dtype("out", out, np.int32)
    check_ndim("out", out, 2, "(M, N)")
    if tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    check_contiguous("out", out)


def _run_cpu(a3, b, prepared, k_total, out):
    """The CPU product of (planes, M, words) ``a3`` with ``b`` (or its prepared panels) into ``out``."""
    from .tuning import gemm_blocking

    threads = numba.get_num_threads()
    row_chunk_bytes, blocks_per_thread = gemm_blocking(threads)
    if prepared is None:
        _xnor_gemm_cpu(a3, b, k_total, panel_buffer(b.shape[0], b.shape[1]), out, threads, row_chunk_bytes,
                       blocks_per_thread)
    else:
        _gemm_panels(a3, prepared._panels, b.shape[0], k_total, out, threads, row_chunk_bytes, blocks_per_thread)


def xnor_gemm(a_packed, b_packed, k, out=None):
    """Binary matrix product ``sign(A) @ sign(B).T`` from packed signs, exactly, in int32.

    Parameters
    ----------
    a_packed : numpy.ndarray or cupy.ndarray, uint64, shape (M, ceil(k / 64))
        Packed rows of A (``pack_signs(A)``), C-contiguous, padding bits 0.
    b_packed : same kind as ``a_packed``, uint64, shape (N, ceil(k / 64)), or PreparedGemmWeights
        Packed rows of B, the same way, or such rows made ready once by ``prepare_gemm_weights``
        (the same result, less work per call).
    k : int
        Number of real columns of A and B (the length of the dot products).
    out : same kind, int32, shape (M, N), optional
        C-contiguous array to write the result into (saves the allocation).

    Returns
    -------
    product : same kind as the inputs, int32, shape (M, N)
        ``product[i, j] = sum_c sign(A)[i, c] * sign(B)[j, c] = k - 2 * popcount(a_i XOR b_j)``.
    """
    k = _check_k(k)
    b_packed, prepared = _right_operand(b_packed, k)
    kind = array_kind(a_packed=a_packed, b_packed=b_packed)
    check_packed("a_packed", a_packed, ndim=2, layout="(M, words)")
    _check_operand("a_packed", a_packed, k)
    m, n = a_packed.shape[0], b_packed.shape[0]
    if out is not None:
        _check_out(out, a_packed, (m, n))
    if kind == "cupy":
        from . import _cuda

        return _cuda.xnor_gemm(a_packed, b_packed, k, out)
    if out is None:
        out = np.empty((m, n), dtype=np.int32)
    if m and n:
        _run_cpu(a_packed.reshape(1, m, a_packed.shape[1]), b_packed, prepared, k, out)
    return out


def _run_threshold_cpu(a3, b_packed, prepared, k_total, threshold, direction):
    """The CPU's thresholded product of (planes, M, words) ``a3`` with ``b_packed`` (or its prepared
    panels): packed bits (M, ceil(N / 64)), through ``_gemm_threshold_panels``."""
    from .threshold import int32_bounds
    from .tuning import gemm_blocking

    m, n = a3.shape[1], b_packed.shape[0]
    packed = np.empty((m, words_for(n)), dtype=np.uint64)
    if m and n:
        if prepared is None:
            panels = panel_buffer(n, b_packed.shape[1])
            _pack_panels(b_packed, panels)
        else:
            panels = prepared._panels
        threads = numba.get_num_threads()
        _gemm_threshold_panels(a3, panels, n, k_total, packed, threads, *gemm_blocking(threads),
                               *int32_bounds(threshold, direction))
    return packed


def xnor_gemm_threshold(a_packed, b_packed, k, threshold, direction):
    """``threshold_pack(xnor_gemm(a_packed, b_packed, k), threshold, direction)`` in one pass: exactly
    the same bits, without writing the int32 products to memory.

    On AVX-512 CPUs each 6 x 32 block of products is thresholded in the micro-kernel's registers
    (``_gemm_threshold_panels``, as ``binary_conv2d_threshold`` does); elsewhere, and on the GPU, it
    is the two calls.  A packed model's binary dense layer followed by its thresholds runs this.

    Parameters
    ----------
    a_packed, b_packed, k
        As for :func:`xnor_gemm` (``b_packed`` may be ``PreparedGemmWeights``).
    threshold : same kind, int64, shape (N,)
    direction : same kind, int8, shape (N,), values +1 or -1
        As for :func:`~lowbit.kernels.threshold_pack`, one per row of B (output column).

    Returns
    -------
    packed : same kind, uint64, shape (M, ceil(N / 64))
        Bit ``j`` of row ``i`` is ``direction[j] * product[i, j] >= direction[j] * threshold[j]``;
        padding bits 0.
    """
    from .threshold import _check_thresholds, threshold_pack

    k = _check_k(k)
    b_packed, prepared = _right_operand(b_packed, k)
    kind = array_kind(a_packed=a_packed, b_packed=b_packed, threshold=threshold, direction=direction)
    check_packed("a_packed", a_packed, ndim=2, layout="(M, words)")
    _check_operand("a_packed", a_packed, k)
    m, n = a_packed.shape[0], b_packed.shape[0]
    _check_thresholds(f"b_packed with {n} rows", threshold, direction, n, np.int64)
    if kind == "cupy" or not THRESHOLD_EPILOGUE:
        return threshold_pack(xnor_gemm(a_packed, prepared if prepared is not None else b_packed, k), threshold,
                              direction)
    return _run_threshold_cpu(a_packed.reshape(1, m, a_packed.shape[1]), b_packed, prepared, k, threshold,
                              direction)


def xnor_gemm_bitplanes(planes, b_packed, k, out=None):
    """``combine_bitplanes`` of the plane products of ``xnor_gemm``, in one pass, exactly.

    Equal to ``combine_bitplanes(xnor_gemm(planes.reshape(bits * M, -1), b_packed, k).reshape(bits, M, N))``
    but the CPU kernel sums the planes in its registers (``xnor_microkernel_planes``) instead of
    writing ``bits`` int32 products of (M, N) and reading them back.

    Parameters
    ----------
    planes : numpy.ndarray or cupy.ndarray, uint64, shape (bits, M, ceil(k / 64))
        ``pack_bitplanes`` of (M, k) codes: C-contiguous, padding bits 0.
    b_packed : same kind, uint64, shape (N, ceil(k / 64)), or PreparedGemmWeights
    k : int
        The length of the rows; ``(2^bits - 1) * k`` must be < 2**31.
    out : same kind, int32, shape (M, N), optional

    Returns
    -------
    totals : same kind, int32, shape (M, N)
        ``sum_b 2^b * (k - 2 * popcount(planes[b, i] XOR b_j))``.
    """
    k = _check_k(k)
    b_packed, prepared = _right_operand(b_packed, k)
    kind = array_kind(planes=planes, b_packed=b_packed)
    check_packed("planes", planes, ndim=3, layout="(bits, M, words)")
    bits, m = planes.shape[0], planes.shape[1]
    if bits < 1:
        raise ValueError("planes must hold at least one plane, got shape (0, ...)")
    if (2**bits - 1) * k >= 2**31:
        raise ValueError(f"(2**bits - 1) * k must be < 2**31 so that the int32 sum cannot overflow, got "
                         f"bits={bits}, k={k}")
    _check_operand("planes", planes, k)
    n = b_packed.shape[0]
    if out is not None:
        _check_out(out, planes, (m, n))
    if kind == "cupy":
        from .bitplane import combine_bitplanes

        products = xnor_gemm(planes.reshape(bits * m, -1), b_packed, k)
        totals = combine_bitplanes(products.reshape(bits, m, n))
        if out is None:
            return totals
        out[...] = totals
        return out
    if out is None:
        out = np.empty((m, n), dtype=np.int32)
    if m and n:
        _run_cpu(planes, b_packed, prepared, (2**bits - 1) * k, out)
    return out


def xnor_gemm_bitplanes_threshold(planes, b_packed, k, threshold, direction):
    """``threshold_pack(xnor_gemm_bitplanes(planes, b_packed, k), threshold, direction)`` in one pass:
    the same bits, the plane sums thresholded in the micro-kernel's registers on AVX-512 (the two
    calls elsewhere and on the GPU).  A packed model's bit-plane first layer runs this.

    Parameters
    ----------
    planes, b_packed, k
        As for :func:`xnor_gemm_bitplanes`.
    threshold : same kind, int64, shape (N,)
    direction : same kind, int8, shape (N,), values +1 or -1

    Returns
    -------
    packed : same kind, uint64, shape (M, ceil(N / 64))
    """
    from .threshold import _check_thresholds, threshold_pack

    k = _check_k(k)
    b_packed, prepared = _right_operand(b_packed, k)
    kind = array_kind(planes=planes, b_packed=b_packed, threshold=threshold, direction=direction)
    check_packed("planes", planes, ndim=3, layout="(bits, M, words)")
    bits, m = planes.shape[0], planes.shape[1]
    n = b_packed.shape[0]
    _check_thresholds(f"b_packed with {n} rows", threshold, direction, n, np.int64)
    if kind == "cupy" or not THRESHOLD_EPILOGUE or bits < 1 or (2**bits - 1) * k >= 2**31:
        totals = xnor_gemm_bitplanes(planes, prepared if prepared is not None else b_packed, k)  # checks
        return threshold_pack(totals, threshold, direction)
    _check_operand("planes", planes, k)
    return _run_threshold_cpu(planes, b_packed, prepared, (2**bits - 1) * k, threshold, direction)


def gemm_assembly():
    """Assembly of the parallel GEMM kernel, compiled afresh (cached code cannot be inspected).

    Used by the tests and the benchmark to check that the popcount is ``vpopcntq`` on AVX-512
    VPOPCNTDQ machines.  Takes a few seconds (one Numba compilation).
    """
    fresh = numba.njit(parallel=True, cache=False)(_gemm_panels.py_func)
    a = np.zeros((TILE_ROWS, 1), dtype=np.uint64)
    panels = panel_buffer(1, 1)
    out = np.empty((TILE_ROWS, 1), dtype=np.int32)
    fresh(a.reshape(1, TILE_ROWS, 1), panels, 1, 64, out, 1, 131072, 4)
    return fresh.inspect_asm(fresh.signatures[0])
