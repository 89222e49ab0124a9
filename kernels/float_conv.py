"""Float32 convolution on the CPU without im2col: forward, backward-data and backward-weights.

Layout
------
Activations are channels-last: an input is copied once per layer into a zero-padded
``(N, H + 2p, W + 2p, C)`` buffer, and outputs are written as ``(N * OH * OW, O)`` matrices (NHWC).
Weights are packed as ``(KH * KW * C, O)``: row ``(i * KW + j) * C + c`` holds ``W[:, c, i, j]``.
Output channels are padded with zero weights to a multiple of the vector width (16 floats on
AVX-512, 8 on AVX2) and the padding columns are dropped again at the end.

The kernels are implicit GEMMs.  For one output pixel and one kernel row ``i`` the ``KW * C``
input values it multiplies are contiguous in the padded NHWC buffer, so a pixel's patch is ``KH``
runs of ``KW * C`` floats, ``(W + 2p) * C`` apart; no patch matrix is ever materialised.

The inner block (:func:`_fma_tile`) is written in LLVM IR, like the XNOR GEMM's, so that its
``rows x vectors`` accumulators stay in vector registers: per step of the reduction it loads
``vectors`` weight vectors, broadcasts one value of each of ``rows`` patch rows and issues
``rows * vectors`` fused multiply-adds.  Its rows lie at compile-time displacements from one base
address (``row_step``), which keeps the general-purpose registers free; :func:`block_plan` sizes it
per layer.  The three passes are this block with different strides:

* forward: rows are ``rows`` consecutive pixels of one output row, vectors are output channels,
  the reduction runs over ``(i, j, c)``; the threads claim chunks of output rows;
* backward-data, stride 1: the forward of the output gradient (zero-padded by ``KH - 1 - p``) with
  the kernel flipped and its channel axes swapped; a stride ``s > 1`` first spreads the gradient
  ``s`` apart (zeros between), which costs ``s * s`` times the arithmetic of the nonzero terms;
* backward-weights: rows are ``(j, c)`` positions of one kernel row and vectors output channels;
  or (:func:`weight_plan`), with few output channels, rows are output channels and vectors run
  along the kernel row; or, when a kernel row is too short to fill the registers, rows are all the
  window's positions through a table of their addresses; the reduction runs over the output pixels; the images in 8 chunks, each
  summed into a ``dW`` (and a float64 bias gradient) of its own, whichever thread claims it, and
  the 8 added in order: deterministic, on any number of threads.

Arithmetic: float32 fused multiply-adds, the reduction in the order above; results agree with the
im2col reference (``lowbit.functions``) to float32 rounding, not bit for bit.
"""
from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._checks import check_contiguous, check_float32_array, check_int, conv_output_size
from ._intrinsics import HOST_FEATURES, fill_padded_row, next_claim
from .few_channel_conv import few_channel_conv2d, few_channel_conv2d_threshold  # noqa: F401 (few input channels)
from .float_ops import _add_column_sums_wide, run_on_threads

__all__ = [
    "LANES",
    "set_threads",
    "conv2d_forward",
    "conv2d_backward_data",
    "conv2d_backward_weights",
    "pad_nhwc",
    "padded_input",
    "block_plan",
    "weight_plan",
    "tile_shape",
]

LANES = 16 if "avx512f" in HOST_FEATURES else 8

# vector registers a block may fill: rows * vectors accumulators, `vectors` weight vectors and one
# broadcast (one register kept spare for LLVM); and the most rows of a block
_REGISTERS = 31 if LANES == 16 else 15
_MAX_ROWS = 28
# row steps (stride * input channels) that get a block compiled for them: 1 and multiples of LANES
# up to this; others address their rows through a table (a few general-purpose registers spill)
_MAX_ROW_STEP = 1024
# rows of the forward's block by vectors per row when its rows go through an address table (row
# steps without a compiled block of their own)
if LANES == 16:
    _TILES = {4: 6, 2: 12, 1: 14}
else:
    _TILES = {4: 2, 2: 5, 1: 12}

# backward-weights splits the images into this many chunks whatever the thread count
_WEIGHT_CHUNKS = 8

# None: Numba's thread count; an int: at most this many threads for these kernels.
_threads = None


def set_threads(threads=None):
    """Threads for these kernels: ``None`` (default) follows ``numba.set_num_threads``; an int >= 1
    caps them.  Returns the previous setting.  (They are bound by arithmetic, not memory traffic,
    so unlike ``float_ops`` they share their work out to every thread by default.)"""
    global _threads
    if threads is not None:
        threads = check_int("threads", threads, 1)
    previous = _threads
    _threads = threads
    return previous


def _thread_count():
    count = numba.get_num_threads()
    return count if _threads is None else max(1, min(_threads, count))


def _run_threads(kernel, *args):
    """``kernel(*args)`` on :func:`_thread_count` threads."""
    return run_on_threads(_thread_count(), kernel, *args)


def tile_shape(channels):
    """``(rows, vectors)`` of the address-table block for ``channels`` (padded) output channels."""
    padded = -(-channels // LANES) * LANES
    for vectors in (4, 2, 1):
        if padded % (vectors * LANES) == 0:
            return _TILES[vectors], vectors
    raise AssertionError("unreachable: padded is a multiple of LANES")


# -- the register block ----------------------------------------------------------------------------


@intrinsic
def _fma_tile(typingctx, rows_type, vectors_type, row_step_type, a_address, a_step, segments, a_segment, run,
              b_address, b_step, b_segment, out_address, out_stride, bias_address, accumulate):
    """``_fma_tile(rows, vectors, row_step, a, a_step, segments, a_segment, run, b, b_step, b_segment,
    out, out_stride, bias, accumulate)``: one ``rows x (vectors * LANES)`` float32 block

        out[r, :] (+)= sum_{s < segments, k < run} A_r[s * a_segment + k * a_step] * B[s * b_segment + k * b_step, :]

    ``rows``, ``vectors`` and ``row_step`` are compile-time ints (literals: one compiled block per
    triple); the other arguments ``intp``, strides counting float32 elements.  Row ``r`` of A starts
    at ``a + r * row_step * 4`` when ``row_step`` > 0: one base register and constant displacements,
    which leaves the general-purpose registers free; with ``row_step == 0`` ``a`` is the address of
    ``rows`` int64 row addresses instead.  ``b`` and ``out`` are addresses of float32 element 0 of
    the block (``out`` rows ``out_stride`` apart).  The accumulators start from the
    ``vectors * LANES`` floats at ``bias`` when it is not 0, else from ``out`` when ``accumulate``
    is not 0, else from zero.
    """
    literals = (rows_type, vectors_type, row_step_type)
    if not all(isinstance(t, types.IntegerLiteral) for t in literals):
        return None
    rows, vectors, row_step = (t.literal_value for t in literals)
    sig = types.void(*literals, *([types.intp] * 12))

    def codegen(context, builder, signature, args):
        (a_address, a_step, segments, a_segment, run, b_address, b_step, b_segment, out_address,
         out_stride, bias_address, accumulate) = args[3:]
        f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        vec = ir.VectorType(f32, LANES)
        vec_ptr = vec.as_pointer()
        fmuladd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fmuladd.v{LANES}f32")
        undef = ir.Constant(vec, ir.Undefined)
        splat_mask = ir.Constant(ir.VectorType(i32, LANES), [0] * LANES)
        zero64 = ir.Constant(i64, 0)

        def const(value):
            return ir.Constant(i64, value)

        def vector_at(base, offset):
            return builder.bitcast(builder.gep(base, [offset]), vec_ptr)

        if row_step:
            a_base = builder.inttoptr(a_address, f32.as_pointer())
        else:
            table = builder.inttoptr(a_address, i64.as_pointer())
            a_rows = [builder.inttoptr(builder.load(builder.gep(table, [const(r)]), align=8),
                                       f32.as_pointer()) for r in range(rows)]
        b_base = builder.inttoptr(b_address, f32.as_pointer())
        out_base = builder.inttoptr(out_address, f32.as_pointer())
        # allocas in the entry block; mem2reg keeps them in vector registers
        acc = [[cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in range(vectors)]
               for _ in range(rows)]
        with builder.if_else(builder.icmp_unsigned("!=", bias_address, zero64)) as (with_bias, without):
            with with_bias:
                bias = builder.inttoptr(bias_address, f32.as_pointer())
                for v in range(vectors):
                    value = builder.load(vector_at(bias, const(v * LANES)), align=4)
                    for r in range(rows):
                        builder.store(value, acc[r][v])
            with without:
                with builder.if_then(builder.icmp_unsigned("!=", accumulate, zero64)):
                    for r in range(rows):
                        out_row = builder.gep(out_base, [builder.mul(out_stride, const(r))])
                        for v in range(vectors):
                            builder.store(builder.load(vector_at(out_row, const(v * LANES)), align=4),
                                          acc[r][v])
        with cgutils.for_range(builder, segments) as segment_loop:
            segment = segment_loop.index
            a_offset = builder.mul(segment, a_segment)
            segment_b = builder.gep(b_base, [builder.mul(segment, b_segment)])
            if row_step:
                segment_a = builder.gep(a_base, [a_offset])
            else:
                segment_rows = [builder.gep(row, [a_offset]) for row in a_rows]
            with cgutils.for_range(builder, run) as loop:
                k = loop.index
                b_row = builder.gep(segment_b, [builder.mul(k, b_step)])
                b_vectors = [builder.load(vector_at(b_row, const(v * LANES)), align=4) for v in range(vectors)]
                a_offset_k = builder.mul(k, a_step)
                if row_step:
                    a_k = builder.gep(segment_a, [a_offset_k])
                for r in range(rows):
                    if row_step:
                        pointer = builder.gep(a_k, [const(r * row_step)])
                    else:
                        pointer = builder.gep(segment_rows[r], [a_offset_k])
                    scalar = builder.load(pointer, align=4)
                    a_value = builder.shuffle_vector(
                        builder.insert_element(undef, scalar, ir.Constant(i32, 0)), undef, splat_mask)
                    for v in range(vectors):
                        slot = acc[r][v]
                        builder.store(builder.call(fmuladd, [a_value, b_vectors[v], builder.load(slot)]), slot)
        for r in range(rows):
            out_row = builder.gep(out_base, [builder.mul(out_stride, const(r))])
            for v in range(vectors):
                builder.store(builder.load(acc[r][v]), vector_at(out_row, const(v * LANES)), align=4)
        return context.get_dummy_value()

    return sig, codegen


# -- drivers, one per register block ---------------------------------------------------------------


def _make_forward(rows, vectors, row_step):
    """The forward driver for output tiles of ``rows`` pixels of one output row, ``row_step = stride *
    C`` elements apart, or any stride when ``row_step`` is 0 (compile-time, with ``rows`` and
    ``vectors``: Numba caches one compiled driver per triple)."""
    width = vectors * LANES

    @njit(parallel=True, error_model="numpy", cache=True)
    def forward(xp, weights, bias, has_bias, stride, kh, kw, oh, ow, out, claims, threads):
        """out (N * OH * OW, O) = the convolution of padded NHWC ``xp`` (whose buffer has slack
        past its end for the last tile's extra rows) with packed ``weights`` (KH * KW * C, O); the
        output rows in ``claims.size`` chunks (zeroed int64) that ``threads`` threads claim."""
        batch, hp, wp, c = xp.shape
        o_pad = weights.shape[1]
        run = kw * c
        lines = batch * oh
        x_base = xp.ctypes.data
        chunks = claims.size
        for thread in prange(threads):
            scratch = np.empty((rows, width), dtype=np.float32)
            table = np.empty(rows, dtype=np.int64)
            chunk = next_claim(claims, -1, thread, threads)
            while chunk >= 0:
                for line in range(chunk * lines // chunks, (chunk + 1) * lines // chunks):
                    n = line // oh
                    y = line - n * oh
                    for x0 in range(0, ow, rows):
                        a = x_base + (((n * hp + y * stride) * wp + x0 * stride) * c) * 4
                        if row_step == 0:  # rows through a table of addresses
                            for r in range(rows):
                                table[r] = a + r * stride * c * 4
                            a = table.ctypes.data
                        first = line * ow + x0
                        valid = min(rows, ow - x0)
                        for block in range(o_pad // width):
                            column = block * width
                            bias_address = bias.ctypes.data + column * 4 if has_bias else 0
                            # a row's last tile may run past its end: it goes to scratch first
                            target, stride_out = out.ctypes.data + (first * o_pad + column) * 4, o_pad
                            if valid < rows:
                                target, stride_out = scratch.ctypes.data, width
                            _fma_tile(rows, vectors, row_step, a, 1, kh, wp * c, run,
                                      weights.ctypes.data + column * 4, o_pad, run * o_pad, target, stride_out,
                                      bias_address, 0)
                            if valid < rows:
                                for r in range(valid):
                                    for v in range(width):
                                        out[first + r, column + v] = scratch[r, v]
                chunk = next_claim(claims, chunk, thread, threads)

    return forward


# backward-weights' layouts (:func:`weight_plan`)
_POSITIONS, _CHANNELS, _WINDOW = "positions", "channels", "window"


def _make_backward_weights(rows, vectors, layout):
    """The backward-weights driver for tiles of ``rows`` consecutive ``(j, c)`` positions of a kernel
    row by ``vectors`` vectors of output channels (``"positions"``), of ``rows`` output channels by
    ``vectors`` vectors of positions (``"channels"``), or of all ``rows = KH * KW * C`` positions of
    the window, through a table of their addresses, by ``vectors`` vectors of channels
    (``"window"``)."""
    width = vectors * LANES
    by_channel, window = layout == _CHANNELS, layout == _WINDOW

    @njit(parallel=True, error_model="numpy", cache=True)
    def backward_weights(xp, dout, stride, kh, kw, oh, ow, partial, bias_sums, claims, threads):
        """partial[t] = sum, over the images of chunk t (of ``claims.size == partial.shape[0]``,
        zeroed int64, claimed by ``threads`` threads), of the patch values times ``dout``
        (N * OH * OW, O): (KH, run_pad, O) with KW * C rounded up to tiles of ``rows`` rows (the
        window: ``run_pad`` = KW * C), or by channel (KH, O, run_pad) with KW * C rounded up to
        tiles of ``width`` columns.  Each chunk sums its images in order into its own block,
        whichever thread takes it, so the result does not depend on the threads.  Positions past KW * C are scratch (``xp``'s buffer has
        slack past its end).  bias_sums[t] (zeroed float64, O) += the chunk's rows of ``dout``."""
        batch, hp, wp, c = xp.shape
        o_pad = dout.shape[1]
        run = kw * c
        run_pad = partial.shape[3] if by_channel else partial.shape[2]
        x_base = xp.ctypes.data
        chunks = claims.size
        for thread in prange(threads):
            table = np.empty(rows, dtype=np.int64)  # the window's row addresses
            chunk = next_claim(claims, -1, thread, threads)
            while chunk >= 0:
                target = partial.ctypes.data + chunk * kh * run_pad * o_pad * 4
                first_image = chunk * batch // chunks
                last_image = (chunk + 1) * batch // chunks
                _add_column_sums_wide(dout, first_image * oh * ow, last_image * oh * ow, bias_sums[chunk])
                for n in range(first_image, last_image):
                    accumulate = 1 if n > first_image else 0
                    dout_image = dout.ctypes.data + n * oh * ow * o_pad * 4
                    if window:  # rows: every (i, j, c) of the window; vectors: output channels
                        for r in range(rows):
                            table[r] = x_base + ((n * hp + r // run) * wp * c + r % run) * 4
                        for column in range(0, o_pad, width):
                            _fma_tile(rows, vectors, 0, table.ctypes.data, stride * c, oh, stride * wp * c, ow,
                                      dout_image + column * 4, o_pad, ow * o_pad, target + column * 4, o_pad, 0,
                                      accumulate)
                        continue
                    for i in range(kh):
                        row_base = x_base + ((n * hp + i) * wp * c) * 4
                        if by_channel:  # rows: output channels, read from dout; vectors: patch values
                            for channel in range(0, o_pad, rows):
                                for column in range(0, run_pad, width):
                                    _fma_tile(rows, vectors, 1, dout_image + channel * 4, o_pad, oh, ow * o_pad,
                                              ow, row_base + column * 4, stride * c, stride * wp * c,
                                              target + ((i * o_pad + channel) * run_pad + column) * 4, run_pad,
                                              0, accumulate)
                        else:  # rows: patch values; vectors: output channels, read from dout
                            for first in range(0, run, rows):
                                for column in range(0, o_pad, width):
                                    _fma_tile(rows, vectors, 1, row_base + first * 4, stride * c, oh,
                                              stride * wp * c, ow, dout_image + column * 4, o_pad, ow * o_pad,
                                              target + ((i * run_pad + first) * o_pad + column) * 4, o_pad,
                                              0, accumulate)
                chunk = next_claim(claims, chunk, thread, threads)

    return backward_weights


_kernel_cache = {}


def _kernel(kind, *shape):
    key = (kind,) + shape
    if key not in _kernel_cache:
        _kernel_cache[key] = (_make_forward if kind == "forward" else _make_backward_weights)(*shape)
    return _kernel_cache[key]


# -- checks and layout helpers ---------------------------------------------------------------------


def _padded(channels):
    return -(-channels // LANES) * LANES


@njit(parallel=True, error_model="numpy", cache=True)
def _pad_rows(source, target, batch, height, width, channels, padded_h, padded_w, top, left):
    """``target`` (flat, ``batch * padded_h * padded_w * channels`` floats first) = the zero-padded
    NHWC buffer of ``source`` (flat C-contiguous (N, H, W, C)), the image's pixel (y, x) at (top + y,
    left + x): one task per padded row, each float written once (``fill_padded_row``)."""
    row_floats = padded_w * channels
    inside = width * channels
    before = left * channels
    for task in prange(batch * padded_h):
        image = task // padded_h
        y = task - image * padded_h - top
        start = (image * height + y) * inside
        fill_padded_row(target[task * row_floats:(task + 1) * row_floats],
                        source[start:start + inside] if 0 <= y < height else source[:0], before)


def pad_nhwc(x, top, left=None, height=None, width=None, spread=1, slack=0):
    """``x`` (N, C, H, W), any strides, as a C-contiguous zero-padded (N, Hp, Wp, C) float32 buffer
    with value ``(y, x)`` at ``(top + spread * y, left + spread * x)``.  ``left`` defaults to
    ``top``, ``Hp, Wp`` to ``spread * (H - 1) + 1 + 2 * top`` (``left``).  ``slack`` zero floats
    follow the buffer in memory (the kernels' last tiles read into them).  When ``x`` is an NCHW
    view of an NHWC buffer (what the direct convolutions hand on) and ``spread`` is 1, one pass of
    row copies on the kernels' threads (:func:`set_threads`); otherwise numpy's strided copy."""
    n, c, h, w = x.shape
    left = top if left is None else left
    hp = spread * (h - 1) + 1 + 2 * top if height is None else height
    wp = spread * (w - 1) + 1 + 2 * left if width is None else width
    size = n * hp * wp * c
    memory = np.empty(size + slack, dtype=np.float32)
    memory[size:] = 0
    buffer = memory[:size].reshape(n, hp, wp, c)
    nhwc = x.transpose(0, 2, 3, 1)
    if spread == 1 and size and nhwc.flags.c_contiguous:
        _run_threads(_pad_rows, nhwc.reshape(-1), memory, n, h, w, c, hp, wp, top, left)
        return buffer
    bottom, right = top + spread * (h - 1) + 1, left + spread * (w - 1) + 1
    if spread == 1:  # zero only the border, then one copy of the interior
        buffer[:, :top] = 0
        buffer[:, bottom:] = 0
        buffer[:, top:bottom, :left] = 0
        buffer[:, top:bottom, right:] = 0
    else:
        buffer[...] = 0
    buffer[:, top:bottom:spread, left:right:spread] = nhwc
    return buffer


def padded_input(x, padding, stride=1):
    """What :func:`conv2d_backward_weights` reads of an input ``x`` (N, C, H, W): the zero-padded NHWC
    copy that :func:`conv2d_forward` returns, for a convolution whose forward ran elsewhere."""
    return pad_nhwc(x, padding, slack=_slack(x.shape[1], stride))


def _slack(channels, stride):
    """Floats past a padded input that the last tiles may read: up to ``_MAX_ROWS`` pixels of a
    row (forward) or tile rows past the end of a kernel row (backward-weights)."""
    return (_MAX_ROWS + 1) * stride * channels + _MAX_ROWS + LANES


def _pack_weights(weight, o_pad):
    """(O, C, KH, KW) -> (KH * KW * C, O_pad), zero columns past O."""
    o, c, kh, kw = weight.shape
    packed = np.zeros((kh, kw, c, o_pad), dtype=np.float32)
    packed[..., :o] = weight.transpose(2, 3, 1, 0)
    return packed.reshape(kh * kw * c, o_pad)


def _nhwc_matrix(dout, o_pad):
    """``dout`` (N, O, OH, OW), any strides, as a C-contiguous (N * OH * OW, O_pad) matrix."""
    n, o, oh, ow = dout.shape
    nhwc = dout.transpose(0, 2, 3, 1)
    if o == o_pad:
        return np.ascontiguousarray(nhwc).reshape(-1, o)
    matrix = np.zeros((n, oh, ow, o_pad), dtype=np.float32)
    matrix[..., :o] = nhwc
    return matrix.reshape(-1, o_pad)


def _chunks(work, threads):
    """How many pieces the threads claim: several per thread, so that a thread slowed by another
    process leaves its last ones to the others; at most one per unit of work."""
    return max(1, min(work, 8 * threads if threads > 1 else 1))


def block_plan(length, channels):
    """``(rows, vectors)`` of a register block for runs of ``length`` rows (the forward: an output row
    of that many pixels; backward-weights: a kernel row's ``KW * C`` positions) against ``channels``
    output channels (padded to LANES): the fewest computed rows (a run's last block may reach past
    its end), then the fewest loads per multiply-add (``(rows + vectors) / (rows * vectors)``), with
    at least 8 accumulators (the FMA latency) unless one block covers the run."""
    blocks = -(-channels // LANES)
    best = None
    for vectors in (4, 2, 1):
        if blocks % vectors:
            continue
        for rows in range(1, _MAX_ROWS + 1):
            if rows * vectors + vectors + 1 > _REGISTERS or (rows < length and rows * vectors < 8):
                continue
            computed = -(-length // rows) * rows
            score = (computed, (rows + vectors) / (rows * vectors))
            if best is None or score < best[0]:
                best = (score, rows, vectors)
    return best[1], best[2]


def weight_plan(run, channels, kernel_h=1):
    """``(layout, rows, vectors)`` of backward-weights' register block for a ``kernel_h``-row window
    whose rows are ``run = KW * C`` positions, and ``channels`` output channels (padded to LANES).
    Layouts (:func:`_make_backward_weights`):

    * ``"positions"``: rows are positions of one kernel row and vectors output channels
      (:func:`block_plan`);
    * ``"channels"``: rows are output channels, a divisor of ``channels``, and vectors run along the
      kernel row; with one vector of channels the first layout issues a broadcast per multiply-add
      and this one about one per two (deep_convnet's 16-channel conv2 at one thread on an AMD EPYC:
      85 against 65 GFLOP/s, scratch timings);
    * ``"window"``: when a kernel row is too short to give the first layout 8 accumulators (the FMA
      latency; a first layer on gray images: 3 positions), rows are the whole window's ``kernel_h *
      run`` positions, if they fit the registers.

    Between the first two, the one with the fewest computed multiply-adds, then the fewest loads
    per multiply-add, wins; a tie goes to the first."""
    rows, vectors = block_plan(run, channels)
    if rows * vectors < 8 and kernel_h > 1 and kernel_h * run <= _MAX_ROWS \
            and kernel_h * run * vectors + vectors + 1 <= _REGISTERS:
        return _WINDOW, kernel_h * run, vectors
    best = ((-(-run // rows) * rows * channels, (rows + vectors) / (rows * vectors)), _POSITIONS, rows, vectors)
    for vectors in range(1, _REGISTERS // 2):
        for rows in range(1, min(channels, _MAX_ROWS) + 1):
            if channels % rows or rows * vectors + vectors + 1 > _REGISTERS or rows * vectors < 8:
                continue
            computed = -(-run // (vectors * LANES)) * vectors * LANES * channels
            score = (computed, (rows + vectors) / (rows * vectors))
            if score < best[0]:
                best = (score, _CHANNELS, rows, vectors)
    return best[1:]


def _convolve(xp, packed, bias, stride, kh, kw, oh, ow, channels):
    """Run the forward kernel on ``xp`` (from :func:`pad_nhwc` with :func:`_slack`); returns the
    (N, OH, OW, channels) NHWC result."""
    o_pad = packed.shape[1]
    row_step = stride * xp.shape[3]
    if row_step == 1 or (row_step % LANES == 0 and row_step <= _MAX_ROW_STEP):
        rows, vectors = block_plan(ow, o_pad)
    else:  # other steps share one compiled block per tile shape (its rows through an address table)
        (rows, vectors), row_step = tile_shape(o_pad), 0
    forward = _kernel("forward", rows, vectors, row_step)
    pixels = xp.shape[0] * oh * ow
    out = np.empty((pixels, o_pad), dtype=np.float32)
    has_bias = bias is not None
    bias_pad = np.zeros(o_pad, dtype=np.float32)
    if has_bias:
        bias_pad[:bias.shape[0]] = bias
    threads = _thread_count()
    claims = np.zeros(_chunks(xp.shape[0] * oh, threads), dtype=np.int64)
    _run_threads(forward, xp, packed, bias_pad, has_bias, stride, kh, kw, oh, ow, out, claims, threads)
    result = out.reshape(xp.shape[0], oh, ow, o_pad)
    return result if channels == o_pad else np.ascontiguousarray(result[..., :channels])


# -- public functions ------------------------------------------------------------------------------


def conv2d_forward(x, weight, bias, stride, padding):
    """Convolution (cross-correlation) of float32 ``x`` (N, C, H, W) with ``weight`` (O, C, KH, KW).

    Parameters
    ----------
    x : numpy.ndarray, float32, (N, C, H, W)
        Any strides (an NCHW view of an NHWC buffer is read in one pass).
    weight : numpy.ndarray, float32, (O, C, KH, KW)
    bias : numpy.ndarray, float32, (O,), or None
    stride, padding : int
        Zero padding on every side.

    Returns
    -------
    out : numpy.ndarray, float32, (N, O, OH, OW)
        An NCHW view of a C-contiguous NHWC buffer.
    x_padded : numpy.ndarray, float32, (N, H + 2 padding, W + 2 padding, C)
        The zero-padded NHWC input, for :func:`conv2d_backward_weights`.
    """
    check_float32_array("x", x, 4, contiguous=False)
    check_float32_array("weight", weight, 4, contiguous=False)
    stride = check_int("stride", stride, 1)
    padding = check_int("padding", padding, 0)
    o, c, kh, kw = weight.shape
    if x.shape[1] != c:
        raise ValueError(f"x must have {c} channels for weight of shape {weight.shape}, got shape {x.shape}")
    if bias is not None:
        check_float32_array("bias", bias, 1, contiguous=False)
        if bias.shape[0] != o:
            raise ValueError(f"bias must have shape ({o},), got {bias.shape}")
    oh = conv_output_size(x.shape[2], kh, stride, padding, "x height")
    ow = conv_output_size(x.shape[3], kw, stride, padding, "x width")
    xp = padded_input(x, padding, stride)
    if min(xp.shape) == 0 or o == 0:
        out = np.zeros((x.shape[0], oh, ow, o), dtype=np.float32)
        if bias is not None:
            out += bias
        return out.transpose(0, 3, 1, 2), xp
    packed = _pack_weights(weight, _padded(o))
    out = _convolve(xp, packed, bias, stride, kh, kw, oh, ow, o)
    return out.transpose(0, 3, 1, 2), xp


def conv2d_backward_data(dout, weight, x_shape, stride, padding):
    """Gradient of :func:`conv2d_forward` with respect to ``x``: (N, C, H, W) float32, an NCHW view of
    an NHWC buffer.  ``dout`` (N, O, OH, OW) float32, any strides.  Needs ``padding < KH`` and
    ``padding < KW`` (``ValueError`` otherwise)."""
    check_float32_array("dout", dout, 4, contiguous=False)
    check_float32_array("weight", weight, 4, contiguous=False)
    stride = check_int("stride", stride, 1)
    padding = check_int("padding", padding, 0)
    o, c, kh, kw = weight.shape
    n, _, h, w = (int(v) for v in x_shape)
    oh = conv_output_size(h, kh, stride, padding, "x_shape height")
    ow = conv_output_size(w, kw, stride, padding, "x_shape width")
    if dout.shape != (n, o, oh, ow):
        raise ValueError(f"dout must have shape {(n, o, oh, ow)} for x_shape {tuple(x_shape)} and weight "
                         f"{weight.shape}, got {dout.shape}")
    if padding >= kh or padding >= kw:
        raise ValueError(f"padding must be smaller than the kernel {(kh, kw)}, got {padding}")
    if min(n, c, h, w) == 0 or o == 0:
        return np.zeros((n, h, w, c), dtype=np.float32).transpose(0, 3, 1, 2)
    # the stride-1 convolution of the spread, padded gradient with the flipped, transposed kernel
    grad = pad_nhwc(dout, kh - 1 - padding, kw - 1 - padding, h + kh - 1, w + kw - 1, spread=stride,
                    slack=_slack(o, 1))
    flipped = np.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))  # (C, O, KH, KW)
    packed = _pack_weights(flipped, _padded(c))
    dx = _convolve(grad, packed, None, 1, kh, kw, h, w, c)
    return dx.transpose(0, 3, 1, 2)


def conv2d_backward_weights(dout, x_padded, weight_shape, stride):
    """Gradients of :func:`conv2d_forward` with respect to ``weight`` and ``bias``.

    ``dout`` (N, O, OH, OW) float32, any strides; ``x_padded`` the (N, Hp, Wp, C) buffer that
    :func:`conv2d_forward` returned.  Returns ``(dW, db)``: (O, C, KH, KW) and (O,) float32.
    """
    check_float32_array("dout", dout, 4, contiguous=False)
    check_float32_array("x_padded", x_padded, 4, contiguous=False)
    check_contiguous("x_padded", x_padded)
    stride = check_int("stride", stride, 1)
    o, c, kh, kw = (int(v) for v in weight_shape)
    n, hp, wp, xc = x_padded.shape
    if xc != c:
        raise ValueError(f"x_padded must have {c} channels (last axis) for weight_shape {tuple(weight_shape)}, "
                         f"got shape {x_padded.shape}")
    oh = conv_output_size(hp, kh, stride, 0, "x_padded height")
    ow = conv_output_size(wp, kw, stride, 0, "x_padded width")
    if dout.shape != (n, o, oh, ow):
        raise ValueError(f"dout must have shape {(n, o, oh, ow)} for x_padded {x_padded.shape}, got {dout.shape}")
    o_pad = _padded(o)
    matrix = _nhwc_matrix(dout, o_pad)
    if min(n, c, oh, ow) == 0 or o == 0:
        return np.zeros((o, c, kh, kw), dtype=np.float32), matrix[:, :o].sum(axis=0, dtype=np.float32)
    run = kw * c
    layout, rows, vectors = weight_plan(run, o_pad, kh)
    backward_weights = _kernel("backward_weights", rows, vectors, layout)
    by_channel = layout == _CHANNELS
    # a fixed number of image chunks, each summed into its own dW and the dWs added in order: the
    # same result on any number of threads
    chunks = min(n, _WEIGHT_CHUNKS)
    if by_channel:
        run_pad = -(-run // (vectors * LANES)) * vectors * LANES
        partial = np.empty((chunks, kh, o_pad, run_pad), dtype=np.float32)
    else:
        run_pad = run if layout == _WINDOW else -(-run // rows) * rows
        partial = np.empty((chunks, kh, run_pad, o_pad), dtype=np.float32)
    bias_sums = np.zeros((chunks, o_pad), dtype=np.float64)
    claims = np.zeros(chunks, dtype=np.int64)
    _run_threads(backward_weights, x_padded, matrix, stride, kh, kw, oh, ow, partial, bias_sums, claims,
                 _thread_count())
    db = bias_sums.sum(axis=0)[:o].astype(np.float32)
    total = partial[0] if chunks == 1 else partial.sum(axis=0)
    if by_channel:
        dw = total[:, :o, :run].reshape(kh, o, kw, c).transpose(1, 3, 0, 2)
    else:
        dw = total[:, :run, :o].reshape(kh, kw, c, o).transpose(3, 2, 0, 1)
    return np.ascontiguousarray(dw), db
