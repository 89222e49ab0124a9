"""Binary 2-D convolution of packed NHWC activations (layout and padding rule: ``lowbit.kernels``)."""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from lowbit.backend import is_cupy_array

from ._checks import array_kind, check_int, check_packed, check_padding_bits, check_pair, padding_mask, words_for
from ._intrinsics import (
    THRESHOLD_EPILOGUE,
    TILE_COLS,
    TILE_ROWS,
    atomic_claim,
    atomic_load,
    atomic_store,
    fill_padded_row,
    next_claim,
    popcount64,
    xnor_microkernel_rows,
    xnor_microkernel_rows_f32,
    xnor_microkernel_rows_threshold,
)
from .gemm import _block_range, _blocking, _pack_panel, _panel_half, _threshold_rows
from .threshold import _check_thresholds, int32_bounds, threshold_pack

__all__ = ["binary_conv2d", "binary_conv2d_threshold", "prepare_conv_weights", "PreparedConvWeights"]


@njit(cache=True)
def _pad_row(source, target, image, padded_row, height, width, pad_h, pad_w, words):
    """Row ``padded_row`` of image ``image`` of the zero-padded input (zero words: all -1).

    ``source`` and ``target`` are flat views of x (N, H, W, words) and of the padded input
    (N, H + 2 * pad_h, W + 2 * pad_w, words).
    """
    row_words = (width + 2 * pad_w) * words
    first = (image * (height + 2 * pad_h) + padded_row) * row_words
    row = target[first:first + row_words]
    iy = padded_row - pad_h
    inside = width * words
    start = (image * height + iy) * inside
    fill_padded_row(row, source[start:start + inside] if 0 <= iy < height else source[:0], pad_w * words)


@njit(cache=True)
def _prepare_panel(source, n_out, kernel_h, kernel_w, words, channels, padded, p, panels, tap_sums):
    """Weight task ``p``: panel ``p`` and the tap sums of its output channels.

    ``source`` is the flat view of the weights (O, KH, KW, words).

    * ``panels[p]``: output channels ``p * TILE_COLS ...`` interleaved for the GEMM micro-kernel
      (``gemm._pack_panel``), in the order (KH, KW, words) of an im2col row.
    * Only with padding, for each output channel o of the panel, ``tap_sums[:, :, o]`` of a
      (KH+1, KW+1, O) array: the prefix sums ``tap_sums[y, x, o]`` over the taps ``ky < y, kx < x``
      of what a zero word adds against weight tap (ky, kx), ``channels - 2 * popcount(w)``; row 0
      and column 0 are 0.
    """
    _pack_panel(source.reshape(n_out, -1), panels, p)
    if not padded:
        return
    patch_words = kernel_h * kernel_w * words
    for o in range(p * TILE_COLS, min(n_out, (p + 1) * TILE_COLS)):
        for x in range(kernel_w + 1):
            tap_sums[0, x, o] = 0
        for ky in range(kernel_h):
            tap_sums[ky + 1, 0, o] = 0
            row_sum = 0
            for kx in range(kernel_w):
                first = np.uint64(o * patch_words + (ky * kernel_w + kx) * words)
                count = 0
                for w in range(words):
                    count += popcount64(source[first + np.uint64(w)])
                row_sum += channels - 2 * count
                tap_sums[ky + 1, kx + 1, o] = tap_sums[ky, kx + 1, o] + row_sum


# Scratch accumulators per block of the fused convolution + threshold (half a 32-48 KiB L1).
_FUSED_SCRATCH_BYTES = 16384

# Task states in the claim array of one call: free, being run by one thread, done.
_TASK_FREE, _TASK_TAKEN, _TASK_DONE = 0, 1, 2


@njit(cache=True)
def _wait_for(state, first, stop):
    """Spin until tasks ``first ... stop - 1`` are done.

    Never waits on a free task (the caller claimed and ran those): a taken task is being run by a
    thread that waits on nothing, so this cannot deadlock, whatever the threads or their order.
    """
    for task in range(first, stop):
        address = state.ctypes.data + task * 8
        while atomic_load(address) != _TASK_DONE:
            pass


# padded input rows per padding task: few enough that the threads share an image's rows, enough that
# the claims cost little against the copies (a task a row, claimed once per output row reading it,
# took 23 us of a 0.88 ms 8x56x56x64 convolution)
_PAD_TASK_ROWS = 8


@njit(cache=True)
def _pad_tasks(padded_h):
    """Padding tasks per image: runs of ``_PAD_TASK_ROWS`` padded rows."""
    return (padded_h + _PAD_TASK_ROWS - 1) // _PAD_TASK_ROWS


@njit(cache=True)
def _pad_task_range(image, first_row, stop_row, out_h, stride_h, kernel_h, n_panels, tasks_per_image):
    """The padding tasks ``[first, stop)`` holding the padded rows of ``image`` that output rows
    ``first_row ... stop_row - 1`` (counted over all images) read."""
    oy_first = max(first_row - image * out_h, 0)
    oy_stop = min(stop_row - image * out_h, out_h)
    base = n_panels + image * tasks_per_image
    return (base + oy_first * stride_h // _PAD_TASK_ROWS,
            base + ((oy_stop - 1) * stride_h + kernel_h - 1) // _PAD_TASK_ROWS + 1)


@njit(cache=True)
def _run_padding_tasks(x, weights, channels, stride_h, pad_h, pad_w, out_h, out_w, row_start, row_stop, x_padded,
                       panels, tap_sums, ready, state, panel_start, panel_stop):
    """The tasks one block of ``_conv_implicit`` needs done before its GEMM, run or waited for.

    Task p < n_panels is weight panel p with its tap sums (``_prepare_panel``; none when ``ready``:
    prepared weights); task ``n_panels + image * _pad_tasks(H + 2 * pad_h) + t`` is padded rows
    ``t * _PAD_TASK_ROWS ...`` of that image (``_pad_row``); an output row reads KH padded rows."""
    height, width = x.shape[1], x.shape[2]
    n_out, kernel_h, kernel_w, words = weights.shape
    padded_h = x_padded.shape[1]
    tasks_per_image = _pad_tasks(padded_h)
    n_panels = panels.shape[0]
    padded = pad_h > 0 or pad_w > 0
    source, target, flat_weights = x.reshape(-1), x_padded.reshape(-1), weights.reshape(-1)
    first_row, stop_row = row_start // out_w, (row_stop - 1) // out_w + 1
    states = state.ctypes.data
    first_image, stop_image = first_row // out_h, (stop_row - 1) // out_h + 1
    for image in range(first_image, stop_image):
        task_first, task_stop = _pad_task_range(image, first_row, stop_row, out_h, stride_h, kernel_h, n_panels,
                                                tasks_per_image)
        for task in range(task_first, task_stop):
            if atomic_claim(states + task * 8):
                first = (task - n_panels - image * tasks_per_image) * _PAD_TASK_ROWS
                for padded_row in range(first, min(first + _PAD_TASK_ROWS, padded_h)):
                    _pad_row(source, target, image, padded_row, height, width, pad_h, pad_w, words)
                atomic_store(states + task * 8, _TASK_DONE)
    if not ready:
        for p in range(panel_start, panel_stop):
            if atomic_claim(states + p * 8):
                _prepare_panel(flat_weights, n_out, kernel_h, kernel_w, words, channels, padded, p, panels, tap_sums)
                atomic_store(states + p * 8, _TASK_DONE)
    for image in range(first_image, stop_image):
        task_first, task_stop = _pad_task_range(image, first_row, stop_row, out_h, stride_h, kernel_h, n_panels,
                                                tasks_per_image)
        _wait_for(state, task_first, task_stop)
    if not ready:
        _wait_for(state, panel_start, panel_stop)


@njit(cache=True)
def _row_addresses(x_padded, stride_h, stride_w, out_h, out_w, row_start, row_stop, row_keys, column_keys,
                   n_column_spans, row_bytes, addresses, k_rows):
    """For output position ``row_start + i``: ``addresses[i]``, the address of the first word it reads
    (its window's top-left word in ``x_padded``), and ``k_rows[i]``, the byte offset of its row in
    the table of ``_k_table`` (``row_bytes`` a row; rows ordered row span major, then column span,
    the spans' indices ``row_keys[oy]`` and ``column_keys[ox]``); past ``row_stop`` (to fill the
    last tile) the last position's again.  Offsets, not addresses: the caller adds
    ``table.ctypes.data`` where it calls the micro-kernel, which keeps ``table`` alive until then
    (Numba frees an array after its last use)."""
    _, padded_h, padded_w, words = x_padded.shape
    base = x_padded.ctypes.data
    step = stride_w * words * 8
    i = 0
    # one output row at a time: a run of addresses ``step`` apart and the k rows of its columns'
    # spans (filled a position at a time, with carries across rows and images, this took 5% of a
    # 64-channel convolution's time)
    for image_row in range(row_start // out_w, (row_stop - 1) // out_w + 1):
        image = image_row // out_h
        oy = image_row - image * out_h
        first = max(row_start - image_row * out_w, 0)
        stop = min(row_stop - image_row * out_w, out_w)
        row_address = base + ((image * padded_h + oy * stride_h) * padded_w * words) * 8
        row_offset = row_keys[oy] * n_column_spans * row_bytes
        count = stop - first
        # slices and a loop per array: LLVM vectorises these (not one loop storing to both)
        row_addresses, row_k_rows, keys = addresses[i:i + count], k_rows[i:i + count], column_keys[first:stop]
        for j in range(count):
            row_addresses[j] = row_address + (first + j) * step
        for j in range(count):
            row_k_rows[j] = row_offset + keys[j] * row_bytes
        i += count
    for j in range(i, addresses.shape[0] if i else 0):
        addresses[j] = addresses[i - 1]
        k_rows[j] = k_rows[i - 1]


@njit(cache=True)
def _window_keys(size, kernel, stride, pad, out_size):
    """Along one axis: ``keys[o]``, the index of output o's in-input tap range ``[lo, hi)`` among the
    distinct ranges, and ``spans`` (count, 2) those ranges (the interior's is ``(0, kernel)``; a
    window all in padding has an empty one)."""
    index_of = np.full((kernel + 1) ** 2, -1, dtype=np.int64)
    keys = np.empty(out_size, dtype=np.int64)
    spans = np.empty((min(out_size, (kernel + 1) ** 2), 2), dtype=np.int64)
    count = 0
    for o in range(out_size):
        i0 = o * stride - pad
        lo = min(kernel, max(0, -i0))
        hi = max(lo, min(kernel, size - i0))
        key = lo * (kernel + 1) + hi
        if index_of[key] < 0:
            index_of[key] = count
            spans[count, 0] = lo
            spans[count, 1] = hi
            count += 1
        keys[o] = index_of[key]
    return keys, spans[:count]


@njit(cache=True)
def _k_table(k, tap_sums, n_out, column_start, columns, kernel_h, kernel_w, row_spans, column_spans, padded):
    """The k rows of the micro-kernels (``xnor_microkernel_rows``): one per window rectangle (row span
    x column span, row span major), ``columns`` int32 for output channels ``column_start ...``.

    The GEMM counts an off-input tap as a zero word (all -1) against the weights, where zero
    padding must count 0; what the taps outside the rectangle ``[ky_lo, ky_hi) x [kx_lo, kx_hi)``
    added is the sum over all taps minus the sum over the rectangle (prefix sums ``tap_sums``,
    ``_prepare_panel``).  A row holds ``k`` less that, so ``row - 2 * count`` is the zero-padded
    result; a window inside the input gets ``k`` (as does every column past ``n_out``).  Few
    rectangles occur (9 for a 3x3 kernel with padding 1)."""
    table = np.empty((row_spans.shape[0] * column_spans.shape[0], columns), dtype=np.int32)
    real = min(columns, n_out - column_start)  # columns past n_out keep k
    for i in range(row_spans.shape[0]):
        ky_lo, ky_hi = row_spans[i, 0], row_spans[i, 1]
        for j in range(column_spans.shape[0]):
            kx_lo, kx_hi = column_spans[j, 0], column_spans[j, 1]
            row = table[i * column_spans.shape[0] + j]
            row[:] = k
            if not padded:
                continue
            # 1-D views over the columns, indexed from 0 (no temporaries)
            stop = column_start + real
            total = tap_sums[kernel_h, kernel_w, column_start:stop]
            high_high, low_high = tap_sums[ky_hi, kx_hi, column_start:stop], tap_sums[ky_lo, kx_hi, column_start:stop]
            high_low, low_low = tap_sums[ky_hi, kx_lo, column_start:stop], tap_sums[ky_lo, kx_lo, column_start:stop]
            for c in range(real):
                row[c] = k - total[c] + (high_high[c] - low_high[c] - high_low[c] + low_low[c])
    return table


@njit(cache=True)
def _threshold_block(n_out, segment_stride, kernel_h, run, panels, row_start, row_stop, addresses, k_rows, table,
                     bounds, flips, valids, packed_out):
    """One block of the fused convolution + threshold, thresholded in the micro-kernel's registers
    (``THRESHOLD_EPILOGUE``: AVX-512's 32-column tile is half a packed word).

    Every whole tile runs ``xnor_microkernel_rows_threshold``, each panel writing its uint32 half of
    the packed words; no result reaches memory.  The block's last, partial tile goes through a
    scratch tile and ``threshold_word32``.  ``addresses``, ``k_rows`` and ``table`` as made by
    ``_conv_implicit`` (``table`` for all columns).
    """
    n_panels = panels.shape[0]
    patch_words = panels.shape[1]
    out_words = packed_out.shape[1]
    whole_tiles = (row_stop - row_start) // TILE_ROWS
    tail = row_start + whole_tiles * TILE_ROWS  # the partial tile's first position
    scratch = np.empty((TILE_ROWS, 32 if n_out <= 32 else out_words * 64), dtype=np.int32)
    tile = np.empty((TILE_ROWS, TILE_COLS), dtype=np.int32)
    halves = packed_out.reshape(-1).view(np.uint32)  # panel p of a row writes its uint32 p
    half_stride = out_words * 2
    for p in range(n_panels):
        column = p * TILE_COLS
        panel_address = panels.ctypes.data + p * patch_words * TILE_COLS * 8
        k_base = table.ctypes.data + column * 4
        flip, valid, no_other_half = _panel_half(flips, valids, p, n_panels)
        for t in range(whole_tiles):
            position = row_start + t * TILE_ROWS
            xnor_microkernel_rows_threshold(
                addresses.ctypes.data + t * TILE_ROWS * 8, segment_stride, kernel_h, run, panel_address,
                k_rows.ctypes.data + t * TILE_ROWS * 8, k_base, bounds.ctypes.data + column * 4, flip, valid,
                halves.ctypes.data + (position * half_stride + p) * 4, half_stride,
            )
            if no_other_half:
                for i in range(TILE_ROWS):
                    halves[(position + i) * half_stride + p + 1] = 0
        if tail < row_stop:
            xnor_microkernel_rows(
                addresses.ctypes.data + whole_tiles * TILE_ROWS * 8, segment_stride, kernel_h, run, panel_address,
                k_rows.ctypes.data + whole_tiles * TILE_ROWS * 8, k_base, tile.ctypes.data, TILE_COLS,
            )
            columns = min(TILE_COLS, n_out - column)
            scratch[:row_stop - tail, column:column + columns] = tile[:row_stop - tail, :columns]
    _threshold_rows(scratch, row_stop - tail, packed_out, tail, n_out, 0, out_words, bounds, flips, valids)


@njit(parallel=True, cache=True)
def _conv_implicit(x, weights, channels, stride_h, stride_w, pad_h, pad_w, x_padded, panels, tap_sums, ready, state,
                   out, threads, row_chunk_bytes, blocks_per_thread, fused, bounds, flips, valids, packed_out,
                   as_float):
    """out (N*OH*OW, O) = the XNOR GEMM of the implicit im2col of ``x_padded`` with the panels
    (int32, or float32 with ``as_float``: the micro-kernel converts as it stores).

    No patch matrix: each ``TILE_ROWS`` consecutive output positions (across output rows and
    images alike) read their A rows straight from ``x_padded`` (``xnor_microkernel_rows``: a
    segment of ``KW * words`` words per kernel row, segments a padded row apart), from the window
    addresses of ``_row_addresses``.  The blocks of ``gemm._blocking``'s split are claimed by the
    threads (``next_claim``: each starts on its own share and then takes what the others have not,
    so a thread slowed by another process leaves its last blocks to the others); each block
    (``_conv_block``) first makes the padded input rows and weight panels it reads
    (``_run_padding_tasks``).  Zero padding costs no pass of its own: each position's results are
    subtracted from a k row of its window rectangle (``_k_table``: K less what the off-input taps
    added), in the micro-kernel's epilogue.

    With ``fused``, ``out`` is unused and each block holds all output channels of its positions
    (``bounds``, ``flips`` and ``valids`` from ``threshold.int32_bounds``; ``packed_out`` (N*OH*OW,
    words)).  On AVX-512 (``THRESHOLD_EPILOGUE``) the block is thresholded in the micro-kernel's
    registers (``_threshold_block``).  Otherwise it writes its results, piece by piece, into an
    L1-sized scratch buffer of its own (rows ``64 * words`` wide, so that the 64-lane compares of
    ``threshold_word32`` stay inside it; 32 wide and 32-lane compares for at most 32 channels) and
    thresholds them while they are in cache.  Either way the int32 results never reach memory.
    """
    height, width = x.shape[1], x.shape[2]
    n_out, kernel_h, kernel_w, _ = weights.shape
    batch, padded_h, padded_w, words = x_padded.shape
    out_h = (padded_h - kernel_h) // stride_h + 1
    out_w = (padded_w - kernel_w) // stride_w + 1
    m = batch * out_h * out_w
    k = kernel_h * kernel_w * channels
    run = kernel_w * words
    patch_words = kernel_h * run
    n_panels = panels.shape[0]
    if fused:  # one panel block: a block thresholds whole rows of output channels
        rows_per_block, row_blocks, _, _ = _blocking(m, patch_words, 1, threads, row_chunk_bytes, blocks_per_thread)
        panels_per_block, panel_blocks = n_panels, 1
    else:
        rows_per_block, row_blocks, panels_per_block, panel_blocks = _blocking(
            m, patch_words, n_panels, threads, row_chunk_bytes, blocks_per_thread)
    out_words = packed_out.shape[1]
    # the fused scratch path (no THRESHOLD_EPILOGUE) works in pieces whose results stay in L1
    piece_rows = max(1, _FUSED_SCRATCH_BYTES // (out_words * 256 * TILE_ROWS)) * TILE_ROWS
    row_keys, row_spans = _window_keys(height, kernel_h, stride_h, pad_h, out_h)
    column_keys, column_spans = _window_keys(width, kernel_w, stride_w, pad_w, out_w)
    claims = np.zeros(row_blocks * panel_blocks, dtype=np.int64)
    for thread in prange(threads):
        block = next_claim(claims, -1, thread, threads)
        while block >= 0:
            _conv_block(block, x, weights, channels, stride_h, stride_w, pad_h, pad_w, x_padded, panels, tap_sums,
                        ready, state, out, fused, bounds, flips, valids, packed_out, as_float, out_h, out_w, k, run,
                        rows_per_block, m, panel_blocks, panels_per_block, piece_rows, row_keys, row_spans,
                        column_keys, column_spans)
            block = next_claim(claims, block, thread, threads)


@njit(cache=True)
def _conv_block(block, x, weights, channels, stride_h, stride_w, pad_h, pad_w, x_padded, panels, tap_sums, ready,
                state, out, fused, bounds, flips, valids, packed_out, as_float, out_h, out_w, k, run, rows_per_block,
                m, panel_blocks, panels_per_block, piece_rows, row_keys, row_spans, column_keys, column_spans):
    """Block ``block`` of ``_conv_implicit``'s split: its padding tasks, k rows, window addresses and
    tiles."""
    n_out, kernel_h, kernel_w, _ = weights.shape
    padded_w, words = x_padded.shape[2], x_padded.shape[3]
    n_panels = panels.shape[0]
    padded = pad_h > 0 or pad_w > 0
    out_words = packed_out.shape[1]
    row_start, row_stop, panel_start, panel_stop = _block_range(block, panel_blocks, rows_per_block, m,
                                                                panels_per_block, n_panels)
    _run_padding_tasks(x, weights, channels, stride_h, pad_h, pad_w, out_h, out_w, row_start, row_stop,
                       x_padded, panels, tap_sums, ready, state, panel_start, panel_stop)
    # the block's k rows (its panels' tap sums are ready now) and its windows' addresses and k rows
    column_start = panel_start * TILE_COLS
    table = _k_table(k, tap_sums, n_out, column_start, (panel_stop - panel_start) * TILE_COLS, kernel_h,
                     kernel_w, row_spans, column_spans, padded)
    tiles = (row_stop - row_start + TILE_ROWS - 1) // TILE_ROWS
    addresses = np.empty(tiles * TILE_ROWS, dtype=np.int64)
    k_rows = np.empty(tiles * TILE_ROWS, dtype=np.int64)
    _row_addresses(x_padded, stride_h, stride_w, out_h, out_w, row_start, row_stop, row_keys, column_keys,
                   column_spans.shape[0], table.shape[1] * 4, addresses, k_rows)
    if fused and THRESHOLD_EPILOGUE:
        _threshold_block(n_out, padded_w * words, kernel_h, run, panels, row_start, row_stop, addresses,
                         k_rows, table, bounds, flips, valids, packed_out)
    elif fused:
        # ... in pieces whose scratch results stay in L1, thresholded while there
        scratch = np.empty((min(piece_rows, row_stop - row_start), 32 if n_out <= 32 else out_words * 64),
                           dtype=np.int32)
        for piece_start in range(row_start, row_stop, piece_rows):
            piece_stop = min(row_stop, piece_start + piece_rows)
            _tiles_to(scratch, piece_start, row_start, piece_start, piece_stop, panel_start, panel_stop, n_out,
                      padded_w * words, kernel_h, run, panels, addresses, k_rows, table, column_start, False)
            _threshold_rows(scratch, piece_stop - piece_start, packed_out, piece_start, n_out, 0, out_words,
                            bounds, flips, valids)
    else:
        _tiles_to(out, 0, row_start, row_start, row_stop, panel_start, panel_stop, n_out, padded_w * words,
                  kernel_h, run, panels, addresses, k_rows, table, column_start, as_float)


@njit(cache=True)
def _tiles_to(target, first_row, row_start, piece_start, piece_stop, panel_start, panel_stop, n_out, segment_stride,
              kernel_h, run, panels, addresses, k_rows, table, column_start, as_float):
    """Results of positions ``piece_start ... piece_stop - 1`` (of the block starting at
    ``row_start``, whose ``addresses`` and ``k_rows`` these are) against panels ``panel_start ...``
    into ``target`` (int32, or float32 with ``as_float``), whose row 0 is output position
    ``first_row``: whole tiles straight from the micro-kernel, the others through a scratch tile."""
    patch_words = panels.shape[1]
    stride = target.shape[1]
    tile = np.empty((TILE_ROWS, TILE_COLS), dtype=np.int32)
    first_tile = (piece_start - row_start) // TILE_ROWS
    piece_tiles = (piece_stop - piece_start + TILE_ROWS - 1) // TILE_ROWS
    for p in range(panel_start, panel_stop):
        column = p * TILE_COLS
        columns = min(TILE_COLS, n_out - column)
        panel_address = panels.ctypes.data + p * patch_words * TILE_COLS * 8
        k_base = table.ctypes.data + (column - column_start) * 4
        for t in range(first_tile, first_tile + piece_tiles):
            position = row_start + t * TILE_ROWS
            rows = min(TILE_ROWS, piece_stop - position)
            row_addresses = addresses.ctypes.data + t * TILE_ROWS * 8
            tile_k_rows = k_rows.ctypes.data + t * TILE_ROWS * 8
            if rows == TILE_ROWS and columns == TILE_COLS:
                target_address = target.ctypes.data + ((position - first_row) * stride + column) * 4
                if as_float:
                    xnor_microkernel_rows_f32(row_addresses, segment_stride, kernel_h, run, panel_address,
                                              tile_k_rows, k_base, target_address, stride)
                else:
                    xnor_microkernel_rows(row_addresses, segment_stride, kernel_h, run, panel_address, tile_k_rows,
                                          k_base, target_address, stride)
            else:
                xnor_microkernel_rows(row_addresses, segment_stride, kernel_h, run, panel_address, tile_k_rows,
                                      k_base, tile.ctypes.data, TILE_COLS)
                local = position - first_row
                target[local:local + rows, column:column + columns] = tile[:rows, :columns]


@njit(cache=True)
def _last_word_bits(packed, mask):
    """True when ``packed[..., -1] & mask`` is nonzero somewhere (``packed``: C-contiguous, 4-D)."""
    flat = packed.reshape(-1)
    words = packed.shape[3]
    for i in range(words - 1, flat.shape[0], words):
        if flat[i] & mask:
            return True
    return False


@njit(cache=True)
def _panels_shape(n_out, kernel_h, kernel_w, words):
    """Shape of the panels of (O, KH, KW, words) weights: one per TILE_COLS output channels."""
    return ((n_out + TILE_COLS - 1) // TILE_COLS, kernel_h * kernel_w * words, TILE_COLS)


@njit(cache=True)
def _prepare_weights_cpu(weights, channels, panels, tap_sums):
    """Every weight panel and the tap sums (with padding's: ``_prepare_panel``), for prepared weights."""
    n_out, kernel_h, kernel_w, words = weights.shape
    flat_weights = weights.reshape(-1)
    for p in range(panels.shape[0]):
        _prepare_panel(flat_weights, n_out, kernel_h, kernel_w, words, channels, True, p, panels, tap_sums)


@njit(cache=True)
def _binary_conv2d_cpu(x, weights, channels, stride_h, stride_w, pad_h, pad_w, mask, threads, panels, tap_sums,
                       ready, row_chunk_bytes, blocks_per_thread, out, fused, bounds, flips, valids, packed,
                       as_float=False):
    """The CPU convolution: scratch buffers, then one parallel region (``_conv_implicit``).

    With ``ready`` (prepared weights), ``panels`` and ``tap_sums`` are those of
    ``_prepare_weights_cpu`` and the weights' padding bits were checked then; otherwise both are
    placeholders and the region makes them.  Writes ``out`` (N, OH, OW, O) int32, or with
    ``fused`` the thresholded bits ``packed`` (N, OH, OW, ceil(O / 64)) uint64 (``bounds``,
    ``flips``, ``valids`` from ``threshold.int32_bounds``; the other output is a placeholder).  Returns
    ``bad``: 1 or 2 (nothing written) when x or the weights have bits of ``mask`` set in their
    last word (padding bits past ``channels``), else 0.
    """
    batch, height, width, words = x.shape
    n_out, kernel_h, kernel_w, _ = weights.shape
    out_h = (height + 2 * pad_h - kernel_h) // stride_h + 1
    out_w = (width + 2 * pad_w - kernel_w) // stride_w + 1
    if mask:
        if _last_word_bits(x, mask):
            return 1
        if not ready and _last_word_bits(weights, mask):
            return 2
    m = batch * out_h * out_w
    if m == 0 or n_out == 0:
        return 0
    if not ready:
        # Not zeroed: a task writes every word before any block reads it.
        panels = np.empty(_panels_shape(n_out, kernel_h, kernel_w, words), dtype=np.uint64)
        tap_sums = np.empty((kernel_h + 1, kernel_w + 1, n_out), dtype=np.int32)
    padded_h = height + 2 * pad_h
    x_padded = np.empty((batch, padded_h, width + 2 * pad_w, words), dtype=np.uint64)
    state = np.zeros(panels.shape[0] + batch * _pad_tasks(padded_h), dtype=np.int64)
    _conv_implicit(x, weights, channels, stride_h, stride_w, pad_h, pad_w, x_padded, panels, tap_sums, ready, state,
                   out.reshape(-1, out.shape[3]), threads, row_chunk_bytes, blocks_per_thread, fused, bounds, flips,
                   valids, packed.reshape(-1, packed.shape[3]), as_float)
    return 0


# Placeholders for ``panels`` and ``tap_sums`` of ``_binary_conv2d_cpu`` without prepared weights.
_NO_PANELS = np.empty((0, 0, 0), dtype=np.uint64)
_NO_TAP_SUMS = np.empty((0, 0, 0), dtype=np.int32)


class PreparedConvWeights:
    """Packed convolution weights made ready once for many ``binary_conv2d`` calls (inference).

    Made by :func:`prepare_conv_weights`, not by hand.  Holds a private copy of the packed weights
    (``weights``, (O, KH, KW, ceil(C / 64)) uint64, the array the object was made from), the real
    input channel count ``channels``, and, for numpy weights, what the CPU kernel would otherwise
    rebuild on every call: the weights interleaved into the micro-kernel's panels
    (``gemm._pack_panel``) and the prefix sums over the taps of ``channels - 2 * popcount(w)`` that
    the zero-padding correction subtracts.  For CuPy weights only the validated copy is held (the
    CUDA kernel reads the packed weights as they are).
    """

    __slots__ = ("_weights", "_channels", "_panels", "_tap_sums")

    def __init__(self, *args, **kwargs):
        raise TypeError("PreparedConvWeights is made by prepare_conv_weights(w_packed, channels)")

    @property
    def weights(self):
        """The packed weights (O, KH, KW, ceil(channels / 64)) uint64, numpy or CuPy."""
        return self._weights

    @property
    def channels(self):
        """The real input channel count C."""
        return self._channels

    @property
    def shape(self):
        """``weights.shape``: (O, KH, KW, ceil(channels / 64))."""
        return tuple(self._weights.shape)

    def __repr__(self):
        kind = "cupy" if is_cupy_array(self._weights) else "numpy"
        return f"PreparedConvWeights(shape={self.shape}, channels={self._channels}, {kind})"


def _check_weights(w_packed, channels):
    """Validate ``w_packed`` (any kind) against ``channels``; returns ``(kind, channels)``."""
    kind = array_kind(w_packed=w_packed)
    check_packed("w_packed", w_packed, ndim=4, layout="(O, KH, KW, words)")
    channels = check_int("channels", channels, minimum=1)
    _check_words("w_packed", w_packed, channels)
    _, kernel_h, kernel_w, _ = w_packed.shape
    if kernel_h < 1 or kernel_w < 1:
        raise ValueError(f"w_packed must have KH, KW >= 1, got shape {tuple(w_packed.shape)}")
    if kernel_h * kernel_w * channels >= 2**31:
        raise ValueError("KH * KW * channels must be < 2**31 so that the int32 result cannot overflow")
    return kind, channels


def _check_words(name, arr, channels):
    words = words_for(channels)
    if arr.shape[3] != words:
        raise ValueError(
            f"{name} must have ceil(channels / 64) = {words} words on its last axis for "
            f"channels={channels}, got shape {tuple(arr.shape)}"
        )


def prepare_conv_weights(w_packed, channels):
    """Packed weights made ready once for many ``binary_conv2d`` calls, as inference engines do.

    ``binary_conv2d(x, prepare_conv_weights(w, C), C, ...)`` equals ``binary_conv2d(x, w, C, ...)``
    bit for bit, for every input, stride and padding, and skips per call what depends only on the
    weights: their checks (padding bits included) and, on the CPU, interleaving them into the
    micro-kernel's panels and summing their taps for the zero-padding correction (about 30 us of
    one thread at 3x3x512x512).  The weights are copied: changing ``w_packed`` afterwards does not
    change the prepared object.

    Parameters
    ----------
    w_packed : numpy.ndarray or cupy.ndarray, uint64, shape (O, KH, KW, ceil(channels / 64))
        As for ``binary_conv2d``: C-contiguous, padding bits 0.
    channels : int
        The real input channel count C.

    Returns
    -------
    PreparedConvWeights
        Pass it to ``binary_conv2d`` in place of ``w_packed``, with the same kind of activations.
    """
    kind, channels = _check_weights(w_packed, channels)
    check_padding_bits("w_packed", w_packed, channels)
    prepared = object.__new__(PreparedConvWeights)
    prepared._weights = w_packed.copy()
    prepared._channels = channels
    prepared._panels = prepared._tap_sums = None
    if kind == "numpy":
        n_out, kernel_h, kernel_w, words = w_packed.shape
        prepared._panels = np.empty(_panels_shape(n_out, kernel_h, kernel_w, words), dtype=np.uint64)
        prepared._tap_sums = np.empty((kernel_h + 1, kernel_w + 1, n_out), dtype=np.int32)
        _prepare_weights_cpu(prepared._weights, channels, prepared._panels, prepared._tap_sums)
    return prepared


def _checked_conv(x_packed, w_packed, channels, stride, padding):
    """The checks shared by ``binary_conv2d`` and ``binary_conv2d_threshold``: returns ``(kind,
    prepared or None, packed weights, channels, (stride_h, stride_w), (pad_h, pad_w), (out_h, out_w))``."""
    if isinstance(w_packed, PreparedConvWeights):
        prepared, w_packed = w_packed, w_packed._weights
        if channels is None:
            channels = prepared._channels
        elif check_int("channels", channels, minimum=1) != prepared._channels:
            raise ValueError(
                f"channels={channels} does not match the prepared weights (channels={prepared._channels}); "
                "pass None or their count"
            )
        kind = array_kind(x_packed=x_packed, w_packed=w_packed)
    else:
        prepared = None
        if not (isinstance(w_packed, np.ndarray) or is_cupy_array(w_packed)):
            raise TypeError(
                "w_packed must be a numpy or CuPy array or PreparedConvWeights (prepare_conv_weights), got "
                f"{type(w_packed).__module__}.{type(w_packed).__name__}"
            )
        if channels is None:
            raise TypeError("channels (the real input channel count) is required with packed weights")
        kind = array_kind(x_packed=x_packed, w_packed=w_packed)
        _, channels = _check_weights(w_packed, channels)
    check_packed("x_packed", x_packed, ndim=4, layout="(N, H, W, words)")
    _check_words("x_packed", x_packed, channels)
    stride_h, stride_w = check_pair("stride", stride, 1)
    pad_h, pad_w = check_pair("padding", padding, 0)
    _, height, width, _ = x_packed.shape
    _, kernel_h, kernel_w, _ = w_packed.shape
    if height + 2 * pad_h < kernel_h or width + 2 * pad_w < kernel_w:
        raise ValueError(
            f"the padded input ({height + 2 * pad_h}, {width + 2 * pad_w}) is smaller than the kernel "
            f"({kernel_h}, {kernel_w}); x_packed has shape {tuple(x_packed.shape)}, padding {(pad_h, pad_w)}"
        )
    out_h = (height + 2 * pad_h - kernel_h) // stride_h + 1
    out_w = (width + 2 * pad_w - kernel_w) // stride_w + 1
    return kind, prepared, w_packed, channels, (stride_h, stride_w), (pad_h, pad_w), (out_h, out_w)


# Placeholders for the output ``_binary_conv2d_cpu`` does not write.
_NO_ACC = np.empty((0, 0, 0, 1), dtype=np.int32)
_NO_BITS = np.empty((0, 0, 0, 1), dtype=np.uint64)
_NO_BOUNDS = np.empty(0, dtype=np.int32)
_NO_WORDS = np.empty(0, dtype=np.uint64)


def _run_cpu(x_packed, prepared, w_packed, channels, strides, pads, out, threshold, direction, packed):
    """The CPU call: ``out`` int32 (or float32) results, or (``threshold`` given) ``packed`` bits."""
    from .tuning import gemm_blocking

    # The padding-bit check (check_padding_bits) runs inside the compiled call: one dispatch less.
    if prepared is None:
        panels, tap_sums = _NO_PANELS, _NO_TAP_SUMS
    else:
        panels, tap_sums = prepared._panels, prepared._tap_sums
    fused = threshold is not None
    bounds = int32_bounds(threshold, direction) if fused else (_NO_BOUNDS, _NO_WORDS, _NO_WORDS)
    threads = numba.get_num_threads()
    bad = _binary_conv2d_cpu(
        x_packed, w_packed, channels, *strides, *pads, padding_mask(channels), threads, panels, tap_sums,
        prepared is not None, *gemm_blocking(threads), out, fused, *bounds, packed, out.dtype == np.float32,
    )
    if bad:
        check_padding_bits(("x_packed", "w_packed")[bad - 1], (x_packed, w_packed)[bad - 1], channels)  # raises


def binary_conv2d(x_packed, w_packed, channels=None, stride=1, padding=0, dtype=np.int32):
    """Convolution of packed +-1 activations with packed +-1 weights, exactly, in int32.

    Equal to the float convolution (cross-correlation, as in deep learning frameworks) of the +-1
    tensors with zero padding: off-input taps contribute 0 (see ``lowbit.kernels``).

    Parameters
    ----------
    x_packed : numpy.ndarray or cupy.ndarray, uint64, shape (N, H, W, ceil(channels / 64))
        Activations packed channels-last (NHWC), C-contiguous, padding bits 0.
    w_packed : same kind, uint64, shape (O, KH, KW, ceil(channels / 64)), or PreparedConvWeights
        Weights packed the same way; from an NCHW weight tensor ``w`` (O, C, KH, KW) use
        ``pack_signs(w.transpose(0, 2, 3, 1))``.  Or such weights made ready once by
        ``prepare_conv_weights`` (of the same kind as ``x_packed``): the same result, less work per
        call.
    channels : int, or None with prepared weights
        The real input channel count C.  Required with packed weights; with prepared weights None
        means theirs, and an int must equal theirs.
    stride : int or (int, int), default 1
    padding : int or (int, int), default 0
        Zero padding on each side of H and W.
    dtype : numpy.int32 (default) or numpy.float32
        float32: the same values as ``astype(np.float32)`` of the int32 result (exact while
        ``KH * KW * C < 2**24``), written by the kernel itself on the CPU, with no second pass
        (what the float simulation's training forward needs).

    Returns
    -------
    out : same kind as the inputs, ``dtype``, shape (N, OH, OW, O)
        ``OH = (H + 2 * pad_h - KH) // stride_h + 1``, likewise ``OW``.
    """
    kind, prepared, w_packed, channels, strides, pads, (out_h, out_w) = _checked_conv(
        x_packed, w_packed, channels, stride, padding)
    try:
        out_dtype = np.dtype(dtype)
    except TypeError:
        out_dtype = None
    if out_dtype not in (np.dtype(np.int32), np.dtype(np.float32)):
        raise ValueError(f"dtype must be numpy.int32 or numpy.float32, got {dtype!r}")
    dtype = out_dtype
    if kind == "cupy":
        from . import _cuda

        check_padding_bits("x_packed", x_packed, channels)
        if prepared is None:
            check_padding_bits("w_packed", w_packed, channels)
        acc = _cuda.binary_conv2d(x_packed, w_packed, channels, *strides, *pads, out_h, out_w)
        return acc if dtype == np.int32 else acc.astype(np.float32)
    out = np.empty((x_packed.shape[0], out_h, out_w, w_packed.shape[0]), dtype=dtype)
    _run_cpu(x_packed, prepared, w_packed, channels, strides, pads, out, None, None, _NO_BITS)
    return out


def binary_conv2d_threshold(x_packed, w_packed, threshold, direction, channels=None, stride=1, padding=0):
    """``threshold_pack(binary_conv2d(x_packed, w_packed, channels, stride, padding), threshold, direction)``
    in one pass: exactly the same bits, without writing the int32 accumulators to memory.

    On the CPU each block of output positions is thresholded while its accumulators are in cache
    (``_conv_implicit`` with ``fused``); on the GPU it is the two calls.

    Parameters
    ----------
    x_packed, w_packed, channels, stride, padding
        As for :func:`binary_conv2d`.
    threshold : same kind, int64, shape (O,)
    direction : same kind, int8, shape (O,), values +1 or -1
        As for :func:`~lowbit.kernels.threshold_pack`, one per output channel.

    Returns
    -------
    packed : same kind, uint64, shape (N, OH, OW, ceil(O / 64))
        Bit ``o`` is ``direction[o] * acc[..., o] >= direction[o] * threshold[o]``; padding bits 0.
    """
    kind, prepared, w_packed, channels, strides, pads, (out_h, out_w) = _checked_conv(
        x_packed, w_packed, channels, stride, padding)
    n_out = w_packed.shape[0]
    array_kind(x_packed=x_packed, threshold=threshold, direction=direction)
    _check_thresholds(f"w_packed with {n_out} output channels", threshold, direction, n_out, np.int64)
    if kind == "cupy":
        acc = binary_conv2d(x_packed, prepared if prepared is not None else w_packed, channels, stride, padding)
        return threshold_pack(acc, threshold, direction)
    packed = np.empty((x_packed.shape[0], out_h, out_w, words_for(n_out)), dtype=np.uint64)
    _run_cpu(x_packed, prepared, w_packed, channels, strides, pads, _NO_ACC, threshold, direction, packed)
    return packed
