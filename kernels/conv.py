"""Binary 2-D convolution of packed NHWC activations (layout and padding rule: ``lowbit.kernels``)."""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from ._checks import array_kind, check_int, check_packed, check_padding_bits, check_pair, words_for
from ._intrinsics import TILE_COLS, TILE_ROWS, popcount64, xnor_microkernel, xnor_microkernel_segments
from .gemm import _blocking, _gemm_block, _pack_panel, panel_buffer

__all__ = ["binary_conv2d"]

# Output widths from which the convolution reads its GEMM rows straight from the padded input
# (implicit im2col: no patch buffer, but the last OW % TILE_ROWS positions of every output row
# cost a whole micro-kernel tile); below it, an explicit im2col feeds the plain GEMM blocks.
_IMPLICIT_MIN_WIDTH = 5 * TILE_ROWS


@njit(cache=True)
def _im2col_row(x, image, oy, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_w, patches):
    """Patches of one output row: the packed taps of each position, 0 words off the input.

    The ``kernel_w`` taps of one kernel row are adjacent in NHWC memory, so inside the input they
    are one contiguous run of ``kernel_w * words`` words.  Indexing goes through flat views with
    unsigned offsets, which spares Numba's negative-index handling in this copy-bound loop.
    """
    _, height, width, words = x.shape
    out_h = (height + 2 * pad_h - kernel_h) // stride_h + 1
    run = kernel_w * words
    patch_words = kernel_h * run
    source = x.reshape(-1)
    target = patches.reshape(-1)
    for ox in range(out_w):
        position = (image * out_h + oy) * out_w + ox
        ix0 = ox * stride_w - pad_w
        inside_w = ix0 >= 0 and ix0 + kernel_w <= width
        for ky in range(kernel_h):
            iy = oy * stride_h - pad_h + ky
            first = np.uint64(position * patch_words + ky * run)
            if iy < 0 or iy >= height:
                for w in range(run):
                    target[first + np.uint64(w)] = 0
            elif inside_w:
                start = np.uint64(((image * height + iy) * width + ix0) * words)
                for w in range(run):
                    target[first + np.uint64(w)] = source[start + np.uint64(w)]
            else:
                for kx in range(kernel_w):
                    ix = ix0 + kx
                    tap_first = first + np.uint64(kx * words)
                    if 0 <= ix < width:
                        start = np.uint64(((image * height + iy) * width + ix) * words)
                        for w in range(words):
                            target[tap_first + np.uint64(w)] = source[start + np.uint64(w)]
                    else:
                        for w in range(words):
                            target[tap_first + np.uint64(w)] = 0


@njit(cache=True)
def _pad_row(x, image, padded_row, pad_h, pad_w, x_padded):
    """Row ``padded_row`` of image ``image`` of the zero-padded input (zero words: all -1)."""
    _, height, width, words = x.shape
    padded_width = x_padded.shape[2]
    source = x.reshape(-1)
    target = x_padded.reshape(-1)
    first = np.uint64((image * x_padded.shape[1] + padded_row) * padded_width * words)
    iy = padded_row - pad_h
    if iy < 0 or iy >= height:
        for w in range(padded_width * words):
            target[first + np.uint64(w)] = 0
        return
    left = pad_w * words
    inside = width * words
    start = np.uint64((image * height + iy) * width * words)
    for w in range(left):
        target[first + np.uint64(w)] = 0
    for w in range(inside):
        target[first + np.uint64(left + w)] = source[start + np.uint64(w)]
    for w in range(left + inside, padded_width * words):
        target[first + np.uint64(w)] = 0


@njit(cache=True)
def _prepare_weights(weights, channels, padded, job, jobs, panels, tap_sums):
    """Job ``job`` of ``jobs``: every ``jobs``-th weight panel and output channel from ``job``.

    * ``panels``: the weights interleaved for the GEMM micro-kernel (``gemm._pack_panel``), in the
      order (KH, KW, words) of an im2col row.
    * ``tap_sums[ky + 1, kx + 1, o]`` (of a (KH+1, KW+1, O) array): what a zero word adds against
      weight tap (ky, kx) of output channel o, ``channels - 2 * popcount(w)`` (only when there is
      padding; ``_tap_prefix_sums`` then turns these into prefix sums).
    """
    n_out, kernel_h, kernel_w, words = weights.shape
    flat_weights = weights.reshape(n_out, kernel_h * kernel_w * words)
    for p in range(job, panels.shape[0], jobs):
        _pack_panel(flat_weights, panels, p)
    if not padded:
        return
    for o in range(job, n_out, jobs):
        for ky in range(kernel_h):
            for kx in range(kernel_w):
                first = (ky * kernel_w + kx) * words
                count = 0
                for w in range(words):
                    count += popcount64(flat_weights[o, first + w])
                tap_sums[ky + 1, kx + 1, o] = channels - 2 * count


@njit(cache=True)
def _tap_prefix_sums(tap_sums):
    """In place: ``tap_sums[y, x, o]`` becomes the sum of the tap values ``[1:y+1, 1:x+1]`` (the
    taps ``ky < y, kx < x``); row 0 and column 0 become 0.  Vectorised over o."""
    rows, columns, n_out = tap_sums.shape
    for x in range(columns):
        for o in range(n_out):
            tap_sums[0, x, o] = 0
    for y in range(1, rows):
        for o in range(n_out):
            tap_sums[y, 0, o] = 0
        for x in range(1, columns):
            for o in range(n_out):
                tap_sums[y, x, o] += tap_sums[y - 1, x, o] + tap_sums[y, x - 1, o] - tap_sums[y - 1, x - 1, o]


@njit(parallel=True, cache=True)
def _prepare_patches(x, weights, channels, stride_h, stride_w, pad_h, pad_w, patches, panels, tap_sums):
    """Explicit path: ``patches`` (N*OH*OW, KH*KW*words) im2col, a zero word (all -1) off the
    input, and the weight work of ``_prepare_weights``, shared out by output row."""
    batch, height, width, _ = x.shape
    kernel_h, kernel_w = weights.shape[1], weights.shape[2]
    out_h = (height + 2 * pad_h - kernel_h) // stride_h + 1
    out_w = (width + 2 * pad_w - kernel_w) // stride_w + 1
    jobs = max(batch * out_h, 1)
    for job in prange(jobs):
        if job < batch * out_h:
            image = job // out_h
            oy = job - image * out_h
            _im2col_row(x, image, oy, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_w, patches)
        _prepare_weights(weights, channels, pad_h > 0 or pad_w > 0, job, jobs, panels, tap_sums)


@njit(parallel=True, cache=True)
def _prepare_padded(x, weights, channels, pad_h, pad_w, x_padded, panels, tap_sums):
    """Implicit path: ``x_padded`` (N, H + 2 * pad_h, W + 2 * pad_w, words), the input with zero
    words around it, and the weight work of ``_prepare_weights``, shared out by padded row."""
    batch = x.shape[0]
    padded_h = x_padded.shape[1]
    jobs = max(batch * padded_h, 1)
    for job in prange(jobs):
        if job < batch * padded_h:
            image = job // padded_h
            _pad_row(x, image, job - image * padded_h, pad_h, pad_w, x_padded)
        _prepare_weights(weights, channels, pad_h > 0 or pad_w > 0, job, jobs, panels, tap_sums)


@njit(cache=True)
def _remove_padding_taps(height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w,
                         tap_sums, out, row_start, row_stop, column_start, column_stop):
    """Subtract from out[row_start:row_stop, column_start:column_stop] what off-input taps added.

    ``out`` is (N*OH*OW, O); the GEMM counted each off-input tap as a zero word against the
    weights, where zero padding must count 0.  The taps inside the input form a rectangle
    ``[ky_lo, ky_hi) x [kx_lo, kx_hi)``, so what the others added is the sum over all taps minus
    the sum over the rectangle: five reads of the prefix sums ``tap_sums`` per output channel.
    Positions are walked one output row at a time; an interior position costs two comparisons.
    """
    position = row_start
    while position < row_stop:
        first_ox = position % out_w
        row_end = min(row_stop, position - first_ox + out_w)
        iy0 = (position // out_w) % out_h * stride_h - pad_h
        ky_lo = max(0, -iy0)
        ky_hi = max(ky_lo, min(kernel_h, height - iy0))  # empty when the window misses the input
        row_inside = ky_lo == 0 and ky_hi == kernel_h
        for ox in range(first_ox, first_ox + row_end - position):
            ix0 = ox * stride_w - pad_w
            if row_inside and ix0 >= 0 and ix0 + kernel_w <= width:
                continue
            kx_lo = max(0, -ix0)
            kx_hi = max(kx_lo, min(kernel_w, width - ix0))
            target = position + ox - first_ox
            for o in range(column_start, column_stop):
                inside = (tap_sums[ky_hi, kx_hi, o] - tap_sums[ky_lo, kx_hi, o]
                          - tap_sums[ky_hi, kx_lo, o] + tap_sums[ky_lo, kx_lo, o])
                out[target, o] -= tap_sums[kernel_h, kernel_w, o] - inside
        position = row_end


@njit(parallel=True, cache=True)
def _conv_gemm_patches(patches, panels, n_out, k, out, threads, kernel_h, kernel_w, stride_h, stride_w,
                       height, width, pad_h, pad_w, tap_sums):
    """out (N*OH*OW, O): ``gemm._gemm_panels`` on the patches, with the padding correction of
    ``_remove_padding_taps`` fused into each block."""
    m, words = patches.shape
    out_h = (height + 2 * pad_h - kernel_h) // stride_h + 1
    out_w = (width + 2 * pad_w - kernel_w) // stride_w + 1
    n_panels = panels.shape[0]
    padded = pad_h > 0 or pad_w > 0
    rows_per_block, row_blocks, panels_per_block, panel_blocks = _blocking(m, words, n_panels, threads)
    for block in prange(row_blocks * panel_blocks):
        row_block = block // panel_blocks
        panel_block = block - row_block * panel_blocks
        tile = np.empty((TILE_ROWS, TILE_COLS), dtype=np.int32)
        padded_rows = np.zeros((TILE_ROWS, max(words, 1)), dtype=np.uint64)
        row_start = row_block * rows_per_block
        row_stop = min(m, row_start + rows_per_block)
        panel_start = panel_block * panels_per_block
        panel_stop = min(n_panels, panel_start + panels_per_block)
        _gemm_block(
            patches, panels, n_out, k, out, row_start, row_stop, panel_start, panel_stop, tile, padded_rows
        )
        if padded:
            _remove_padding_taps(
                height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w, tap_sums,
                out, row_start, row_stop, panel_start * TILE_COLS, min(n_out, panel_stop * TILE_COLS),
            )


@njit(parallel=True, cache=True)
def _conv_gemm_implicit(x_padded, panels, n_out, k, out, threads, kernel_h, kernel_w, stride_h, stride_w,
               height, width, pad_h, pad_w, tap_sums):
    """out (N*OH*OW, O) = the XNOR GEMM of the implicit im2col of ``x_padded`` with the panels.

    ``TILE_ROWS`` consecutive positions of one output row read their A rows straight from
    ``x_padded`` (``xnor_microkernel_segments``: a segment per kernel row, rows ``stride_w * words``
    apart); the last positions of an output row, fewer than ``TILE_ROWS``, are gathered into a
    zero-padded block.  Blocks are split among the threads as in ``gemm._gemm_panels``, and each
    block removes the contribution of off-input taps from its own outputs.
    """
    batch, padded_h, padded_w, words = x_padded.shape
    out_h = (padded_h - kernel_h) // stride_h + 1
    out_w = (padded_w - kernel_w) // stride_w + 1
    m = batch * out_h * out_w
    run = kernel_w * words
    patch_words = kernel_h * run
    n_panels = panels.shape[0]
    padded = pad_h > 0 or pad_w > 0
    source = x_padded.reshape(-1)
    rows_per_block, row_blocks, panels_per_block, panel_blocks = _blocking(m, patch_words, n_panels, threads)
    for block in prange(row_blocks * panel_blocks):
        row_block = block // panel_blocks
        panel_block = block - row_block * panel_blocks
        tile = np.empty((TILE_ROWS, TILE_COLS), dtype=np.int32)
        gathered = np.zeros((TILE_ROWS, max(patch_words, 1)), dtype=np.uint64)
        gathered_flat = gathered.reshape(-1)
        row_start = row_block * rows_per_block
        row_stop = min(m, row_start + rows_per_block)
        panel_start = panel_block * panels_per_block
        panel_stop = min(n_panels, panel_start + panels_per_block)
        for p in range(panel_start, panel_stop):
            column = p * TILE_COLS
            columns = min(TILE_COLS, n_out - column)
            panel_address = panels.ctypes.data + p * patch_words * TILE_COLS * 8
            position = row_start
            while position < row_stop:
                ox = position % out_w
                image_row = position // out_w
                image = image_row // out_h
                oy = image_row - image * out_h
                rows = min(TILE_ROWS, row_stop - position, out_w - ox)
                first_word = ((image * padded_h + oy * stride_h) * padded_w + ox * stride_w) * words
                if rows == TILE_ROWS:
                    a_address = x_padded.ctypes.data + first_word * 8
                    if columns == TILE_COLS:
                        xnor_microkernel_segments(
                            a_address, stride_w * words, padded_w * words, kernel_h, run, panel_address,
                            out.ctypes.data + (position * n_out + column) * 4, n_out, k,
                        )
                    else:
                        xnor_microkernel_segments(
                            a_address, stride_w * words, padded_w * words, kernel_h, run, panel_address,
                            tile.ctypes.data, TILE_COLS, k,
                        )
                        out[position:position + rows, column:column + columns] = tile[:rows, :columns]
                else:
                    # The tail of an output row: gather its patches (an explicit im2col of a few rows).
                    for r in range(TILE_ROWS):
                        for ky in range(kernel_h):
                            target = np.uint64(r * patch_words + ky * run)
                            if r < rows:
                                start = np.uint64(first_word + r * stride_w * words + ky * padded_w * words)
                                for w in range(run):
                                    gathered_flat[target + np.uint64(w)] = source[start + np.uint64(w)]
                            else:
                                for w in range(run):
                                    gathered_flat[target + np.uint64(w)] = 0
                    xnor_microkernel(gathered.ctypes.data, patch_words, panel_address, patch_words,
                                     tile.ctypes.data, TILE_COLS, k)
                    out[position:position + rows, column:column + columns] = tile[:rows, :columns]
                position += rows
        if padded:
            _remove_padding_taps(
                height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, out_h, out_w, tap_sums,
                out, row_start, row_stop, panel_start * TILE_COLS, min(n_out, panel_stop * TILE_COLS),
            )


@njit(cache=True)
def _binary_conv2d_patches(x, weights, channels, stride_h, stride_w, pad_h, pad_w, patches, panels, out,
                           threads):
    n_out, kernel_h, kernel_w, _ = weights.shape
    height, width = x.shape[1], x.shape[2]
    tap_sums = np.empty((kernel_h + 1, kernel_w + 1, n_out), dtype=np.int32)
    _prepare_patches(x, weights, channels, stride_h, stride_w, pad_h, pad_w, patches, panels, tap_sums)
    if pad_h or pad_w:
        _tap_prefix_sums(tap_sums)
    _conv_gemm_patches(
        patches, panels, n_out, kernel_h * kernel_w * channels, out.reshape(-1, n_out), threads,
        kernel_h, kernel_w, stride_h, stride_w, height, width, pad_h, pad_w, tap_sums,
    )


@njit(cache=True)
def _binary_conv2d_implicit(x, weights, channels, stride_h, stride_w, pad_h, pad_w, x_padded, panels, out,
                            threads):
    n_out, kernel_h, kernel_w, _ = weights.shape
    height, width = x.shape[1], x.shape[2]
    tap_sums = np.empty((kernel_h + 1, kernel_w + 1, n_out), dtype=np.int32)
    _prepare_padded(x, weights, channels, pad_h, pad_w, x_padded, panels, tap_sums)
    if pad_h or pad_w:
        _tap_prefix_sums(tap_sums)
    _conv_gemm_implicit(
        x_padded, panels, n_out, kernel_h * kernel_w * channels, out.reshape(-1, n_out), threads,
        kernel_h, kernel_w, stride_h, stride_w, height, width, pad_h, pad_w, tap_sums,
    )


def binary_conv2d(x_packed, w_packed, channels, stride=1, padding=0):
    """Convolution of packed +-1 activations with packed +-1 weights, exactly, in int32.

    Equal to the float convolution (cross-correlation, as in deep learning frameworks) of the +-1
    tensors with zero padding: off-input taps contribute 0 (see ``lowbit.kernels``).

    Parameters
    ----------
    x_packed : numpy.ndarray or cupy.ndarray, uint64, shape (N, H, W, ceil(channels / 64))
        Activations packed channels-last (NHWC), C-contiguous, padding bits 0.
    w_packed : same kind, uint64, shape (O, KH, KW, ceil(channels / 64))
        Weights packed the same way; from an NCHW weight tensor ``w`` (O, C, KH, KW) use
        ``pack_signs(w.transpose(0, 2, 3, 1))``.
    channels : int
        The real input channel count C.
    stride : int or (int, int), default 1
    padding : int or (int, int), default 0
        Zero padding on each side of H and W.

    Returns
    -------
    out : same kind as the inputs, int32, shape (N, OH, OW, O)
        ``OH = (H + 2 * pad_h - KH) // stride_h + 1``, likewise ``OW``.
    """
    kind = array_kind(x_packed=x_packed, w_packed=w_packed)
    check_packed("x_packed", x_packed, ndim=4, layout="(N, H, W, words)")
    check_packed("w_packed", w_packed, ndim=4, layout="(O, KH, KW, words)")
    channels = check_int("channels", channels, minimum=1)
    stride_h, stride_w = check_pair("stride", stride, 1)
    pad_h, pad_w = check_pair("padding", padding, 0)
    words = words_for(channels)
    for name, arr in (("x_packed", x_packed), ("w_packed", w_packed)):
        if arr.shape[3] != words:
            raise ValueError(
                f"{name} must have ceil(channels / 64) = {words} words on its last axis for "
                f"channels={channels}, got shape {tuple(arr.shape)}"
            )
        check_padding_bits(name, arr, channels)
    batch, height, width, _ = x_packed.shape
    n_out, kernel_h, kernel_w, _ = w_packed.shape
    if kernel_h < 1 or kernel_w < 1:
        raise ValueError(f"w_packed must have KH, KW >= 1, got shape {tuple(w_packed.shape)}")
    if height + 2 * pad_h < kernel_h or width + 2 * pad_w < kernel_w:
        raise ValueError(
            f"the padded input ({height + 2 * pad_h}, {width + 2 * pad_w}) is smaller than the kernel "
            f"({kernel_h}, {kernel_w}); x_packed has shape {tuple(x_packed.shape)}, padding {(pad_h, pad_w)}"
        )
    if kernel_h * kernel_w * channels >= 2**31:
        raise ValueError("KH * KW * channels must be < 2**31 so that the int32 result cannot overflow")
    out_h = (height + 2 * pad_h - kernel_h) // stride_h + 1
    out_w = (width + 2 * pad_w - kernel_w) // stride_w + 1
    if kind == "cupy":
        from . import _cuda

        return _cuda.binary_conv2d(
            x_packed, w_packed, channels, stride_h, stride_w, pad_h, pad_w, out_h, out_w
        )
    out = np.empty((batch, out_h, out_w, n_out), dtype=np.int32)
    if out.size == 0:
        return out
    panels = panel_buffer(n_out, kernel_h * kernel_w * words)
    threads = numba.get_num_threads()
    arguments = (x_packed, w_packed, channels, stride_h, stride_w, pad_h, pad_w)
    if out_w >= _IMPLICIT_MIN_WIDTH:
        x_padded = np.empty((batch, height + 2 * pad_h, width + 2 * pad_w, words), dtype=np.uint64)
        _binary_conv2d_implicit(*arguments, x_padded, panels, out, threads)
    else:
        patches = np.empty((batch * out_h * out_w, kernel_h * kernel_w * words), dtype=np.uint64)
        _binary_conv2d_patches(*arguments, patches, panels, out, threads)
    return out
