"""Numba intrinsics that emit LLVM's ``llvm.ctpop`` directly.

``popcount64(x)`` is the scalar popcount of a 64-bit integer.  ``xnor_microkernel`` is the inner
kernel of the CPU GEMM, written in LLVM IR so that its accumulators stay in vector registers: it
computes a ``TILE_ROWS x TILE_COLS`` block of ``k - 2 * popcount(a XOR b)``, broadcasting one word
of each A row against ``TILE_VECTORS`` vectors of ``LANES`` words of a B panel (B rows interleaved
word by word, see ``gemm._pack_panels``), so each loaded word is reused ``TILE_VECTORS`` (A) or
``TILE_ROWS`` (B) times and no horizontal reduction is ever needed.  On AVX-512 VPOPCNTDQ hardware
``llvm.ctpop.v8i64`` is a single ``vpopcntq zmm``; elsewhere LLVM legalises it for the target.
"""
from __future__ import annotations

import llvmlite.binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, config
from numba.extending import intrinsic


def _host_features():
    """CPU features Numba compiles for (honours NUMBA_CPU_FEATURES when set)."""
    if config.CPU_FEATURES:
        return {f[1:] for f in config.CPU_FEATURES.split(",") if f.startswith("+")}
    return {name for name, on in llvm_binding.get_host_cpu_features().items() if on}


HOST_FEATURES = frozenset(_host_features())

if "avx512f" in HOST_FEATURES:
    # 32 zmm registers: 6 x 4 accumulators + 4 B vectors + 1 broadcast A word = 29.
    LANES, TILE_ROWS, TILE_VECTORS = 8, 6, 4
else:
    # 16 ymm registers (AVX2): 4 x 3 accumulators + 3 B vectors + 1 broadcast = 16.
    LANES, TILE_ROWS, TILE_VECTORS = 4, 4, 3
TILE_COLS = LANES * TILE_VECTORS


@intrinsic
def popcount64(typingctx, x):
    """Number of set bits of a 64-bit integer, as int64 (``llvm.ctpop.i64``)."""
    if isinstance(x, types.Integer) and x.bitwidth == 64:
        sig = types.int64(x)

        def codegen(context, builder, signature, args):
            return builder.ctpop(args[0])

        return sig, codegen
    return None


def _emit_microkernel(context, builder, a_address, a_stride, segment_stride, segments, run, panel_address,
                      out_address, out_stride, k, planes=False, row_k=None, threshold=None, as_float=False):
    """LLVM IR of one TILE_ROWS x TILE_COLS block; see ``xnor_microkernel_rows``.

    With ``row_k`` = ``(k_rows, k_base)`` (``k`` unused) each row subtracts from a k row of its own
    (``_emit_row_k_epilogue``); with ``threshold`` = ``(bounds_address, flip, valid)`` besides, the
    block is thresholded instead of stored (``xnor_microkernel_rows_threshold``).

    Row r of A starts at ``a_address + r * a_stride * 8``, or, when ``a_stride`` is None, at the
    r-th int64 address stored at ``a_address``; it is ``segments`` runs of ``run`` words,
    ``segment_stride`` words apart.  With ``planes`` every segment reads the same ``run`` panel
    words (bit planes of one row against one panel) and the accumulators are doubled before each
    segment (Horner's rule), see ``xnor_microkernel_planes``.
    """
    i32 = ir.IntType(32)
    i64 = ir.IntType(64)
    vec = ir.VectorType(i64, LANES)
    vec32 = ir.VectorType(i32, LANES)
    ctpop_type = ir.FunctionType(vec, [vec])
    ctpop = cgutils.get_or_insert_function(builder.module, ctpop_type, f"llvm.ctpop.v{LANES}i64")
    undef = ir.Constant(vec, ir.Undefined)
    splat_mask = ir.Constant(vec32, [0] * LANES)

    def splat(scalar):
        first_lane = builder.insert_element(undef, scalar, ir.Constant(i32, 0))
        return builder.shuffle_vector(first_lane, undef, splat_mask)

    panel = builder.inttoptr(panel_address, vec.as_pointer())
    if a_stride is None:
        # ``a_address`` points at TILE_ROWS int64 addresses, one per A row.
        addresses = builder.inttoptr(a_address, i64.as_pointer())
        a_rows = [
            builder.inttoptr(builder.load(builder.gep(addresses, [ir.Constant(i64, r)]), align=8), i64.as_pointer())
            for r in range(TILE_ROWS)
        ]
    else:
        a_base = builder.inttoptr(a_address, i64.as_pointer())
        a_rows = [builder.gep(a_base, [builder.mul(a_stride, ir.Constant(i64, r))]) for r in range(TILE_ROWS)]
    # Allocas in the entry block; mem2reg turns them into vector registers.
    accumulators = [
        [cgutils.alloca_once_value(builder, ir.Constant(vec, None)) for _ in range(TILE_VECTORS)]
        for _ in range(TILE_ROWS)
    ]
    with cgutils.for_range(builder, segments) as segment_loop:
        segment = segment_loop.index
        a_offset = builder.mul(segment, segment_stride)
        segment_rows = [builder.gep(row, [a_offset]) for row in a_rows]
        if planes:
            segment_panel = panel
            for row_slots in accumulators:
                for slot in row_slots:
                    builder.store(builder.add(builder.load(slot), builder.load(slot)), slot)
        else:
            panel_offset = builder.mul(builder.mul(segment, run), ir.Constant(i64, TILE_VECTORS))
            segment_panel = builder.gep(panel, [panel_offset])
        with cgutils.for_range(builder, run) as loop:
            w = loop.index
            first = builder.mul(w, ir.Constant(i64, TILE_VECTORS))
            b_vectors = [
                builder.load(builder.gep(segment_panel, [builder.add(first, ir.Constant(i64, v))]), align=8)
                for v in range(TILE_VECTORS)
            ]
            for r in range(TILE_ROWS):
                a_word = splat(builder.load(builder.gep(segment_rows[r], [w]), align=8))
                for v in range(TILE_VECTORS):
                    count = builder.call(ctpop, [builder.xor(a_word, b_vectors[v])])
                    slot = accumulators[r][v]
                    builder.store(builder.add(builder.load(slot), count), slot)
    if row_k is not None:
        _emit_row_k_epilogue(builder, accumulators, *row_k, out_address, out_stride, threshold, as_float)
        return context.get_dummy_value()
    out_base = builder.inttoptr(out_address, i32.as_pointer())
    k_vec = splat(k)
    one = ir.Constant(vec, [1] * LANES)
    for r in range(TILE_ROWS):
        out_row = builder.gep(out_base, [builder.mul(out_stride, ir.Constant(i64, r))])
        for v in range(TILE_VECTORS):
            dot = builder.sub(k_vec, builder.shl(builder.load(accumulators[r][v]), one))
            first_column = builder.gep(out_row, [ir.Constant(i64, v * LANES)])
            target = builder.bitcast(first_column, vec32.as_pointer())
            builder.store(builder.trunc(dot, vec32), target, align=4)
    return context.get_dummy_value()


def _emit_row_k_epilogue(builder, accumulators, k_rows, k_base, out_address, out_stride, threshold, as_float=False):
    """Store (or threshold) ``k_r[c] - 2 * count[r, c]``, with a k row of its own for each block row.

    Row ``r``'s ``TILE_COLS`` int32 k values are at ``k_rows[r] + k_base`` (``k_rows``: the address
    of ``TILE_ROWS`` int64 byte offsets): a convolution's border position gets ``K`` minus what its
    off-input taps added to the count, so no correction pass follows.  Counts are at most ``K <
    2**31``, so the low int32 half of each int64 lane holds them: two accumulators' halves are
    gathered into one vector of 2 * LANES int32 (``vpermt2d`` on AVX-512) and the doubling,
    subtraction and store (or compare) run once per pair; an odd last accumulator (AVX2) is
    truncated alone.

    Without ``threshold`` the int32 results go to ``out_address``, rows ``out_stride`` int32 apart
    (with ``as_float``, converted to float32, rounded to nearest as numpy's ``astype`` does).
    With ``threshold`` = ``(bounds_address, flip, valid)`` (``THRESHOLD_EPILOGUE`` only: 32
    columns) bit ``c`` of row ``r``'s uint32 at ``out_address + r * out_stride * 4`` is
    ``(result >= bounds[c]) XOR flip_c``, ANDed with ``valid`` (``bounds``: ``TILE_COLS`` int32;
    ``flip``, ``valid``: this block's 32 bits in the low half of an int64), as ``threshold_word32``
    computes it from stored results.
    """
    i32 = ir.IntType(32)
    i64 = ir.IntType(64)
    vec32 = ir.VectorType(i32, LANES)
    wide = 2 * LANES
    wide32 = ir.VectorType(i32, wide)
    low_halves = ir.Constant(wide32, list(range(0, 2 * wide, 2)))
    offsets = builder.inttoptr(k_rows, i64.as_pointer())
    out_base = builder.inttoptr(out_address, i32.as_pointer())
    if threshold is not None:
        bounds_address, flip, valid = threshold
        bounds = builder.inttoptr(bounds_address, wide32.as_pointer())
        bound_vectors = [builder.load(builder.gep(bounds, [ir.Constant(i64, j)]), align=4)
                         for j in range(TILE_VECTORS // 2)]
        flip32, valid32 = builder.trunc(flip, i32), builder.trunc(valid, i32)
    for r, row in enumerate(accumulators):
        k_row = builder.inttoptr(builder.add(builder.load(builder.gep(offsets, [ir.Constant(i64, r)]), align=8),
                                             k_base), i32.as_pointer())
        out_row = builder.gep(out_base, [builder.mul(out_stride, ir.Constant(i64, r))])
        word = None
        for v in range(0, TILE_VECTORS, 2):
            column = ir.Constant(i64, v * LANES)
            if v + 1 < TILE_VECTORS:
                counts = builder.shuffle_vector(builder.bitcast(builder.load(row[v]), wide32),
                                                builder.bitcast(builder.load(row[v + 1]), wide32), low_halves)
                vector_type = wide32
            else:
                counts = builder.trunc(builder.load(row[v]), vec32)
                vector_type = vec32
            k_vector = builder.load(builder.bitcast(builder.gep(k_row, [column]), vector_type.as_pointer()), align=4)
            result = builder.sub(k_vector, builder.add(counts, counts))
            if threshold is None:
                if as_float:
                    result = builder.sitofp(result, ir.VectorType(ir.FloatType(), vector_type.count))
                builder.store(result, builder.bitcast(builder.gep(out_row, [column]), result.type.as_pointer()),
                              align=4)
                continue
            above = builder.icmp_signed(">=", result, bound_vectors[v // 2])
            bits = builder.zext(builder.bitcast(above, ir.IntType(wide)), i32)
            if v:
                bits = builder.shl(bits, ir.Constant(i32, v * LANES))
            word = bits if word is None else builder.or_(word, bits)
        if threshold is not None:
            builder.store(builder.and_(builder.xor(word, flip32), valid32), out_row, align=4)


def _emit_trap(context, builder):
    """``llvm.trap``: the body of a threshold-epilogue intrinsic where ``THRESHOLD_EPILOGUE`` is off
    (compiled so that callers type on every CPU; they never reach it)."""
    trap = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.trap")
    builder.call(trap, [])
    return context.get_dummy_value()


# The threshold epilogue packs one block's columns into one uint32: TILE_COLS = 32 (AVX-512).
THRESHOLD_EPILOGUE = TILE_COLS == 32 and TILE_VECTORS % 2 == 0


@intrinsic
def xnor_microkernel_rows_threshold(typingctx, row_addresses, segment_stride, segments, run, panel_address, k_rows,
                                    k_base, bounds_address, flip, valid, out_address, out_stride):
    """``xnor_microkernel_rows`` whose block is thresholded in registers into packed bits.

    All arguments are ``intp``.  Instead of storing the int32 results ``k_r[c] - 2 * popcount[r, c]``
    (``k_rows``, ``k_base``: as for ``xnor_microkernel_rows``), writes for each of the ``TILE_ROWS``
    rows the uint32 at ``out_address + r * out_stride * 4`` whose bit ``c`` is ``(result >=
    bounds[c]) XOR (flip >> c & 1)``, ANDed with ``valid`` (``bounds``: ``TILE_COLS`` int32 at
    ``bounds_address``; the low 32 bits of ``flip`` and ``valid``): the bits ``threshold_word32``
    makes of stored results.  Only where ``THRESHOLD_EPILOGUE`` (32 columns per block, so a block
    is half a packed word); elsewhere it compiles to a trap, so that callers type on every CPU and
    branch on ``THRESHOLD_EPILOGUE``.
    """
    sig = types.void(*([types.intp] * 12))

    def codegen(context, builder, signature, args):
        if not THRESHOLD_EPILOGUE:
            return _emit_trap(context, builder)
        (row_addresses, segment_stride, segments, run, panel_address, k_rows, k_base, bounds_address, flip, valid,
         out_address, out_stride) = args
        return _emit_microkernel(
            context, builder, row_addresses, None, segment_stride, segments, run, panel_address, out_address,
            out_stride, None, row_k=(k_rows, k_base), threshold=(bounds_address, flip, valid),
        )

    return sig, codegen


@intrinsic
def xnor_microkernel_planes_threshold(typingctx, a_address, a_stride, plane_stride, planes, words, panel_address,
                                      k_rows, k_base, bounds_address, flip, valid, out_address, out_stride):
    """``xnor_microkernel_planes`` (bit planes summed with weights ``2^b`` in the registers) whose block
    is thresholded as in ``xnor_microkernel_rows_threshold``; ``k_rows``/``k_base`` give each row's
    total ``k`` (``(2^planes - 1) * K``).  All arguments are ``intp``; only where
    ``THRESHOLD_EPILOGUE`` (elsewhere a trap, so that callers type on every CPU)."""
    sig = types.void(*([types.intp] * 13))

    def codegen(context, builder, signature, args):
        if not THRESHOLD_EPILOGUE:
            return _emit_trap(context, builder)
        (a_address, a_stride, plane_stride, planes, words, panel_address, k_rows, k_base, bounds_address, flip,
         valid, out_address, out_stride) = args
        return _emit_microkernel(
            context, builder, a_address, a_stride, plane_stride, planes, words, panel_address, out_address,
            out_stride, None, planes=True, row_k=(k_rows, k_base), threshold=(bounds_address, flip, valid),
        )

    return sig, codegen


@intrinsic
def xnor_microkernel(typingctx, a_address, a_stride, panel_address, words, out_address, out_stride, k):
    """One ``TILE_ROWS x TILE_COLS`` output block of the XNOR GEMM.

    All arguments are ``intp``: ``a_address`` points at word 0 of the first of ``TILE_ROWS`` A rows
    spaced ``a_stride`` words apart; ``panel_address`` at a B panel laid out ``(words, TILE_COLS)``;
    ``out_address`` at the int32 output element of the first row and column, rows spaced
    ``out_stride`` elements apart.  Writes ``k - 2 * popcount`` for every pair; reads ``words``
    words of each row.
    """
    sig = types.void(*([types.intp] * 7))

    def codegen(context, builder, signature, args):
        a_address, a_stride, panel_address, words, out_address, out_stride, k = args
        zero, one = ir.Constant(ir.IntType(64), 0), ir.Constant(ir.IntType(64), 1)
        return _emit_microkernel(
            context, builder, a_address, a_stride, zero, one, words, panel_address, out_address, out_stride, k
        )

    return sig, codegen


def _microkernel_rows_for(as_float):
    """``xnor_microkernel_rows`` (int32 results) or ``xnor_microkernel_rows_f32`` (float32)."""

    def typer(typingctx, row_addresses, segment_stride, segments, run, panel_address, k_rows, k_base, out_address,
              out_stride):
        sig = types.void(*([types.intp] * 9))

        def codegen(context, builder, signature, args):
            row_addresses, segment_stride, segments, run, panel_address, k_rows, k_base, out_address, out_stride = args
            return _emit_microkernel(
                context, builder, row_addresses, None, segment_stride, segments, run, panel_address, out_address,
                out_stride, None, row_k=(k_rows, k_base), as_float=as_float,
            )

        return sig, codegen

    typer.__name__ = "xnor_microkernel_rows_f32" if as_float else "xnor_microkernel_rows"
    return intrinsic(typer)


# ``xnor_microkernel`` whose A rows are gathered from ``segments`` runs at addresses of their own, each
# row subtracting from a k row of its own.  All arguments (row_addresses, segment_stride, segments,
# run, panel_address, k_rows, k_base, out_address, out_stride) are ``intp``.  ``row_addresses``
# points at ``TILE_ROWS`` int64 addresses, one per A row; row ``r`` of A is the concatenation over
# ``s < segments`` of the ``run`` words at ``row_addresses[r] + s * segment_stride * 8``, and the
# panel is ``(segments * run, TILE_COLS)``.  With NHWC activations this is an implicit im2col: one
# segment per kernel row, ``run = KW * words``, and the ``TILE_ROWS`` output positions may lie on
# different output rows or images.  Writes ``k_r[c] - 2 * popcount[r, c]``, rows ``out_stride``
# elements apart, where ``k_r`` is the row of ``TILE_COLS`` int32 at ``k_rows[r] + k_base``
# (``k_rows`` points at ``TILE_ROWS`` int64 byte offsets): ``K`` for a window inside the input, less
# what the off-input taps added for a border one.  ``xnor_microkernel_rows_f32`` writes the same
# values as float32 (what ``astype(np.float32)`` makes of them), with no second pass.
xnor_microkernel_rows = _microkernel_rows_for(False)
xnor_microkernel_rows_f32 = _microkernel_rows_for(True)


@intrinsic
def xnor_microkernel_planes(typingctx, a_address, a_stride, plane_stride, planes, words, panel_address, out_address,
                            out_stride, k):
    """``xnor_microkernel`` on the bit planes of ``TILE_ROWS`` rows, summed with weights ``2^b``.

    All arguments are ``intp``.  Plane ``b`` of row ``r`` is the ``words`` words at
    ``a_address + (r * a_stride + (planes - 1 - b) * plane_stride) * 8``: ``a_address`` points at
    the highest plane and ``plane_stride`` is the (signed) step, in words, from one plane down to
    the next.  Writes ``k - 2 * sum_b 2^b * popcount(plane_b XOR panel)``: with
    ``k = (2^planes - 1) * K`` that is ``sum_b 2^b * (K - 2 * popcount_b)``, what
    ``combine_bitplanes`` makes of the plane products, without writing them.  The accumulators
    are doubled before each plane (Horner's rule), so no per-word shift is needed.
    """
    sig = types.void(*([types.intp] * 9))

    def codegen(context, builder, signature, args):
        a_address, a_stride, plane_stride, planes, words, panel_address, out_address, out_stride, k = args
        return _emit_microkernel(
            context, builder, a_address, a_stride, plane_stride, planes, words, panel_address, out_address,
            out_stride, k, planes=True,
        )

    return sig, codegen


def _word_intrinsic(kind):
    """Intrinsic reading 64 consecutive elements of a C-contiguous array from a flat offset.

    ``kind == "sign"``: the packed sign word (bit j = element j >= 0, so -0.0 gives 1);
    ``kind == "nan"``: a word with bit j set where element j is NaN (always 0 for integers).
    A 64-lane compare whose <64 x i1> result is bitcast to i64: on AVX-512 that is four vcmpps into
    mask registers, on AVX2 vcmpps + vmovmskps.
    """

    def typer(typingctx, values, offset):
        if not (isinstance(values, types.Array) and values.layout == "C"):
            return None
        if not isinstance(offset, types.Integer):
            return None
        element = values.dtype
        if not isinstance(element, (types.Float, types.Integer)):
            return None
        sig = types.uint64(values, offset)

        def codegen(context, builder, signature, args):
            array = context.make_array(signature.args[0])(context, builder, args[0])
            offset_value = context.cast(builder, args[1], signature.args[1], types.intp)
            element_type = context.get_data_type(element)
            vector_type = ir.VectorType(element_type, 64)
            pointer = builder.bitcast(builder.gep(array.data, [offset_value]), vector_type.as_pointer())
            vector = builder.load(pointer, align=element.bitwidth // 8)
            if kind == "nan":
                if not isinstance(element, types.Float):
                    return ir.Constant(ir.IntType(64), 0)
                mask = builder.fcmp_unordered("uno", vector, vector)
            elif isinstance(element, types.Float):
                mask = builder.fcmp_ordered(">=", vector, ir.Constant(vector.type, None))
            elif element.signed:
                mask = builder.icmp_signed(">=", vector, ir.Constant(vector.type, None))
            else:
                mask = ir.Constant(ir.VectorType(ir.IntType(1), 64), [1] * 64)
            return builder.bitcast(mask, ir.IntType(64))

        return sig, codegen

    typer.__name__ = f"{kind}_word"
    return intrinsic(typer)


sign_word = _word_intrinsic("sign")
nan_word = _word_intrinsic("nan")


@intrinsic
def threshold_word(typingctx, acc, acc_offset, threshold, direction, channel_offset):
    """Packed word of 64 thresholded accumulators, as one 64-lane vector compare.

    Bit j is ``acc.flat[acc_offset + j] >= threshold[channel_offset + j]`` where
    ``direction[channel_offset + j] > 0``, else ``<=`` (see ``threshold.threshold_pack``).
    ``acc`` is C-contiguous int32, ``threshold`` int64 and ``direction`` int8, both 1-D.
    """
    arrays_ok = all(isinstance(a, types.Array) and a.layout == "C" for a in (acc, threshold, direction))
    if not arrays_ok:
        return None
    if (acc.dtype, threshold.dtype, direction.dtype) != (types.int32, types.int64, types.int8):
        return None
    sig = types.uint64(acc, types.intp, threshold, direction, types.intp)

    def codegen(context, builder, signature, args):
        acc_array, acc_offset, threshold_array, direction_array, channel_offset = args
        i64x64 = ir.VectorType(ir.IntType(64), 64)

        def load(array_value, array_type, offset, bits):
            array = context.make_array(array_type)(context, builder, array_value)
            vector_type = ir.VectorType(ir.IntType(bits), 64)
            pointer = builder.bitcast(builder.gep(array.data, [offset]), vector_type.as_pointer())
            return builder.load(pointer, align=bits // 8)

        accumulators = builder.sext(load(acc_array, signature.args[0], acc_offset, 32), i64x64)
        thresholds = load(threshold_array, signature.args[2], channel_offset, 64)
        directions = load(direction_array, signature.args[3], channel_offset, 8)
        upward = builder.icmp_signed(">", directions, ir.Constant(directions.type, None))
        above = builder.icmp_signed(">=", accumulators, thresholds)
        below = builder.icmp_signed("<=", accumulators, thresholds)
        return builder.bitcast(builder.select(upward, above, below), ir.IntType(64))

    return sig, codegen


def _threshold_word32_for(lanes):
    """``threshold_word32`` comparing ``lanes`` (64 or 32) accumulators; with 32, the high half of
    the word is 0 (a layer of at most 32 channels: half the loads and compares)."""

    def typer(typingctx, acc, acc_offset, bounds, bounds_offset, flip, valid):
        arrays_ok = all(isinstance(a, types.Array) and a.layout == "C" and a.dtype == types.int32
                        for a in (acc, bounds))
        if not arrays_ok:
            return None
        sig = types.uint64(acc, types.intp, bounds, types.intp, types.uint64, types.uint64)

        def codegen(context, builder, signature, args):
            acc_array, acc_offset, bounds_array, bounds_offset, flip, valid = args
            vector_type = ir.VectorType(ir.IntType(32), lanes)

            def load(array_value, array_type, offset):
                array = context.make_array(array_type)(context, builder, array_value)
                pointer = builder.bitcast(builder.gep(array.data, [offset]), vector_type.as_pointer())
                return builder.load(pointer, align=4)

            above = builder.icmp_signed(">=", load(acc_array, signature.args[0], acc_offset),
                                        load(bounds_array, signature.args[2], bounds_offset))
            word = builder.bitcast(above, ir.IntType(lanes))
            if lanes < 64:
                word = builder.zext(word, ir.IntType(64))
            return builder.and_(builder.xor(word, flip), valid)

        return sig, codegen

    typer.__name__ = f"threshold_word32_{lanes}"
    return intrinsic(typer)


# Packed word of 64 (or 32) thresholded accumulators compared in int32: bit j is
# ``(acc.flat[acc_offset + j] >= bounds[bounds_offset + j]) XOR flip_j``, then ANDed with ``valid``
# (``threshold.int32_bounds`` makes them once per layer).  One 64-lane int32 compare (four on
# AVX-512), a xor and an and, where ``threshold_word`` widens the accumulators to int64 and
# selects between two compares.  ``acc`` and ``bounds`` are C-contiguous int32.
threshold_word32 = _threshold_word32_for(64)
threshold_word32_half = _threshold_word32_for(32)


# ---------------------------------------------------------------------------------------------
# Task claims shared by the threads of one parallel region (see ``conv._wait_for``)
# ---------------------------------------------------------------------------------------------


@intrinsic
def atomic_claim(typingctx, address):
    """Compare-and-swap the int64 at ``address`` from 0 (free) to 1 (taken); True when it was 0."""
    if not isinstance(address, types.Integer):
        return None
    sig = types.boolean(types.intp)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        pointer = builder.inttoptr(args[0], i64.as_pointer())
        result = builder.cmpxchg(pointer, ir.Constant(i64, 0), ir.Constant(i64, 1), "acq_rel", "acquire")
        return builder.extract_value(result, 1)

    return sig, codegen


@intrinsic
def atomic_load(typingctx, address):
    """The int64 at ``address``, loaded with acquire ordering (sees what a release store published)."""
    if not isinstance(address, types.Integer):
        return None
    sig = types.int64(types.intp)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        pointer = builder.inttoptr(args[0], i64.as_pointer())
        return builder.load_atomic(pointer, "acquire", 8)

    return sig, codegen


@intrinsic
def atomic_store(typingctx, address, value):
    """Store the int64 ``value`` at ``address`` with release ordering (publishes earlier writes)."""
    if not (isinstance(address, types.Integer) and isinstance(value, types.Integer)):
        return None
    sig = types.void(types.intp, types.int64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        pointer = builder.inttoptr(args[0], i64.as_pointer())
        value = context.cast(builder, args[1], signature.args[1], types.int64)
        builder.store_atomic(value, pointer, "release", 8)
        return context.get_dummy_value()

    return sig, codegen


@njit(error_model="numpy", cache=True)
def next_claim(claims, previous, thread, threads):
    """The next piece of work this thread claims in ``claims`` (zeroed int64, one per piece; -1: none
    left), after ``previous`` (-1 at first).  Thread ``t`` starts at piece ``t * pieces // threads``
    and walks on, taking what no other thread has taken: an even split of consecutive pieces while
    all threads run, and the work moves to the threads that do when another process holds a core."""
    pieces = claims.size
    start = thread * pieces // threads
    step = 0 if previous < 0 else (previous - start) % pieces + 1
    while step < pieces:
        piece = (start + step) % pieces
        if atomic_claim(claims.ctypes.data + piece * 8):
            return piece
        step += 1
    return -1


@njit(error_model="numpy", cache=True)
def fill_padded_row(row, values, before):
    """``row`` (1-D) = ``before`` zeros, then ``values`` (1-D, or an empty array: a row all in the
    padding), then zeros.  Loops over 1-D slices indexed from 0, which LLVM vectorises (slice
    assignment, or an offset index, ran at half the speed); the zero-padding copies of the binary
    and the float convolutions."""
    if values.size == 0:
        before = row.size
    inner, after = row[before:before + values.size], row[before + values.size:]
    for k in range(before):
        row[k] = 0
    for k in range(values.size):
        inner[k] = values[k]
    for k in range(after.size):
        after[k] = 0
