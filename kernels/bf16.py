"""bfloat16 matrix product with float32 accumulation on AVX-512 BF16 (``vdpbf16ps``).

``bf16_gemm(a, b)`` rounds both float32 operands to bfloat16 (round to nearest, ties to even, as
:func:`lowbit.bf16.round_bfloat16`; NaN stays NaN) and multiplies them with float32 accumulation.
It exists for the backward of binary layers (:mod:`lowbit.bf16`), where one operand of each product
is +-1 (exact in bfloat16) and only the output gradient is rounded.

The instruction
---------------
``vdpbf16ps acc, a, b`` (Intel SDM, "VDPBF16PS"): for each of the 16 float32 lanes ``i`` of a zmm
register, with ``a`` and ``b`` holding 32 bfloat16 values each (pair ``i`` in the ``i``-th 32-bit
word, element ``2i`` in its low half)::

    acc[i] += a[2i+1] * b[2i+1]        # product exact in float32, the sum rounded to nearest even
    acc[i] += a[2i]   * b[2i]          # likewise

Denormal bfloat16 inputs count as zero (DAZ) and a denormal result is flushed to zero (FTZ),
whatever MXCSR says; no exception is raised.  Each step is thus a fused multiply-add whose product
is exact, so the result of a whole dot product depends only on the order of its pairs, which is
fixed here: pair 0 (elements 0 and 1 of K) first, then pair 1, and so on, each lane of each output
starting from +0.0.  ``tests/test_bf16_gemm.py`` replays exactly that in numpy and compares bit for
bit.  The order differs from numpy's float32 GEMM (blocked, FMA-chained differently), so the result
is not bit-equal to ``round(a) @ round(b)`` in float32, only close to it.

Layout
------
``pack_bf16_rows(a)`` writes A (M, K) as uint32 (M padded to a multiple of ``TILE_ROWS``, ceil(K / 2)):
word ``p`` of row ``i`` holds ``bf16(a[i, 2p])`` in its low and ``bf16(a[i, 2p+1])`` in its high
half; an odd K is padded with a bfloat16 zero, padding rows are zero.  ``pack_bf16_panels(b)`` writes
B (K, N) as flat uint32 panels of ``TILE_COLS`` columns, each (ceil(K / 2), width): word ``(p, j)`` of
panel ``q`` holds the pair ``b[2p, q * TILE_COLS + j]``, ``b[2p + 1, ...]`` the same way; the last
panel is only as wide as its ``LANES``-column vectors, its columns past N zero.  The micro-kernel
(``_microkernel(vectors)``, LLVM IR through ``numba.extending.intrinsic``) computes a
``TILE_ROWS x (LANES * vectors)`` block, 6 x 64 for a full panel: per pair it loads ``vectors``
panel vectors, broadcasts one A word per row and issues ``6 * vectors`` ``vdpbf16ps`` into as many
zmm accumulators, which stay in registers over the whole K (no K blocking: a panel is ``K * 128``
bytes, which stays in L2 for K up to several thousand, the sizes of a binary network's layers).

``bf16_gemm`` walks the larger packed operand once, in the outer loop, and shares its blocks out to
the threads with ``prange`` (Numba's thread count applies); edge tiles go through a scratch tile.
Packing an operand across its memory order is a scalar transpose, so the product is computed as
``(b.T @ a.T).T`` when that packs less (``dy @ W.T``: W by its rows, the same bits, since the two
products of a pair commute exactly); and A's rows, when contiguous and walked in the outer loop, are
packed tile by tile inside it instead of in a pass of their own.

Only where the CPU has ``avx512_bf16`` and ``avx512f`` (``bf16_available()``; honours
``NUMBA_CPU_FEATURES``): elsewhere ``bf16_gemm`` raises ``RuntimeError`` before compiling anything
(LLVM would abort the process on an instruction the target lacks).
"""
from __future__ import annotations

import llvmlite.binding as llvm_binding
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._checks import check_float32_array
from ._intrinsics import HOST_FEATURES

__all__ = ["bf16_available", "bf16_gemm", "bf16_exact", "pack_bf16_rows", "pack_bf16_panels"]

LANES = 16  # float32 lanes of a zmm register
TILE_ROWS, TILE_VECTORS = 6, 4  # 24 accumulators + 4 panel vectors + 1 broadcast of 32 zmm registers
TILE_COLS = LANES * TILE_VECTORS


def bf16_available() -> bool:
    """True when the CPU Numba compiles for has AVX-512 BF16 (``vdpbf16ps``) and AVX-512F."""
    return {"avx512f", "avx512bf16"} <= HOST_FEATURES


def _check_available():
    if not bf16_available():
        raise RuntimeError(
            "bf16_gemm needs a CPU with AVX-512 BF16 (vdpbf16ps) and AVX-512F, and Numba compiling for it; "
            f"this one ({llvm_binding.get_host_cpu_name()}) lacks it or NUMBA_CPU_FEATURES leaves it out "
            "(lowbit.kernels.bf16_available() is False)"
        )


# ---------------------------------------------------------------------------------------------
# The micro-kernel
# ---------------------------------------------------------------------------------------------


class _BFloat16Type(ir.types.Type):
    """LLVM's ``bfloat`` scalar type, which llvmlite.ir does not define."""

    null = "0.0"
    intrinsic_name = "bf16"

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat16Type)

    def __hash__(self):
        return hash("bfloat")


def _operand_type():
    """The type LLVM's ``llvm.x86.avx512bf16.dpbf16ps.512`` takes its bfloat16 operands in: 32 x bfloat
    since LLVM 17, 16 x i32 (pairs as words) before."""
    if llvm_binding.llvm_version_info[0] >= 17:
        return ir.VectorType(_BFloat16Type(), 2 * LANES)
    return ir.VectorType(ir.IntType(32), LANES)


def _emit_microkernel(context, builder, vectors, a_address, a_stride, panel_address, pairs, out_address, out_stride):
    """LLVM IR of one ``TILE_ROWS x (LANES * vectors)`` block, see ``_microkernel``."""
    i32, i64, f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
    words = ir.VectorType(i32, LANES)
    floats = ir.VectorType(f32, LANES)
    operand = _operand_type()
    dot = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(floats, [floats, operand, operand]), "llvm.x86.avx512bf16.dpbf16ps.512")
    undef = ir.Constant(words, ir.Undefined)
    splat_mask = ir.Constant(words, [0] * LANES)
    panel = builder.inttoptr(panel_address, words.as_pointer())
    a_base = builder.inttoptr(a_address, i32.as_pointer())
    a_rows = [builder.gep(a_base, [builder.mul(a_stride, ir.Constant(i64, r))]) for r in range(TILE_ROWS)]
    # Allocas in the entry block; mem2reg turns them into zmm registers.
    accumulators = [[cgutils.alloca_once_value(builder, ir.Constant(floats, None)) for _ in range(vectors)]
                    for _ in range(TILE_ROWS)]
    with cgutils.for_range(builder, pairs) as loop:
        p = loop.index
        first = builder.mul(p, ir.Constant(i64, vectors))
        b_vectors = [
            builder.bitcast(builder.load(builder.gep(panel, [builder.add(first, ir.Constant(i64, v))]), align=4),
                            operand)
            for v in range(vectors)
        ]
        for r in range(TILE_ROWS):
            word = builder.load(builder.gep(a_rows[r], [p]), align=4)
            first_lane = builder.insert_element(undef, word, ir.Constant(i32, 0))
            a_pair = builder.bitcast(builder.shuffle_vector(first_lane, undef, splat_mask), operand)
            for v in range(vectors):
                slot = accumulators[r][v]
                builder.store(builder.call(dot, [builder.load(slot), a_pair, b_vectors[v]]), slot)
    out_base = builder.inttoptr(out_address, f32.as_pointer())
    for r in range(TILE_ROWS):
        out_row = builder.gep(out_base, [builder.mul(out_stride, ir.Constant(i64, r))])
        for v in range(vectors):
            target = builder.bitcast(builder.gep(out_row, [ir.Constant(i64, v * LANES)]), floats.as_pointer())
            builder.store(builder.load(accumulators[r][v]), target, align=4)
    return context.get_dummy_value()


def _microkernel(vectors):
    """Intrinsic computing one ``TILE_ROWS x (LANES * vectors)`` float32 block of the product.

    All its arguments are ``intp``: ``a_address`` points at word 0 of the first of ``TILE_ROWS``
    packed A rows spaced ``a_stride`` uint32 words apart; ``panel_address`` at a panel laid out
    ``(pairs, LANES * vectors)`` uint32; ``out_address`` at the float32 element of the first row and
    column, rows spaced ``out_stride`` elements apart.  Overwrites the block; the accumulators start
    at +0.0 and take the pairs in order, in registers.
    """

    def typer(typingctx, a_address, a_stride, panel_address, pairs, out_address, out_stride):
        sig = types.void(*([types.intp] * 6))

        def codegen(context, builder, signature, args):
            return _emit_microkernel(context, builder, vectors, *args)

        return sig, codegen

    typer.__name__ = f"bf16_microkernel_{vectors}"
    return intrinsic(typer)


# A full panel (TILE_VECTORS vectors), and the narrower last panel of an N that is not a multiple of
# TILE_COLS (batch 100 as the N of ``dx.T``: 64 + 48 columns computed instead of 2 x 64).
_microkernel_4 = _microkernel(4)
_microkernel_3 = _microkernel(3)
_microkernel_2 = _microkernel(2)
_microkernel_1 = _microkernel(1)


@njit(inline="always")
def _run_microkernel(vectors, a_address, a_stride, panel_address, pairs, out_address, out_stride):
    if vectors == 4:
        _microkernel_4(a_address, a_stride, panel_address, pairs, out_address, out_stride)
    elif vectors == 3:
        _microkernel_3(a_address, a_stride, panel_address, pairs, out_address, out_stride)
    elif vectors == 2:
        _microkernel_2(a_address, a_stride, panel_address, pairs, out_address, out_stride)
    else:
        _microkernel_1(a_address, a_stride, panel_address, pairs, out_address, out_stride)


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


@njit(inline="always")
def _bf16_bits(bits):
    """bfloat16 bits (uint32, high half zero) of the float32 with bits ``bits``: round to nearest even;
    a NaN stays a (quiet) NaN instead of rounding into inf.  Branch-free, so that loops vectorise."""
    bits = np.uint32(bits)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet = (bits | np.uint32(0x00400000)) >> np.uint32(16)
    return np.uint32(quiet if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else rounded)


@njit(inline="always")
def _pair_word(bits, first_row, second_row, first_column, second_column, second):
    """A packed pair: the bf16 of ``bits[first_row, first_column]`` low, of
    ``bits[second_row, second_column]`` high (zero unless ``second``)."""
    high = np.uint32(0)
    if second:
        high = _bf16_bits(bits[second_row, second_column]) << np.uint32(16)
    return _bf16_bits(bits[first_row, first_column]) | high


@njit(inline="always")
def _pack_tile(bits, row, buffer):
    """Rows ``row ... row + TILE_ROWS - 1`` of the (M, K) uint32 view ``bits`` packed into ``buffer``
    (TILE_ROWS, ceil(K / 2)); rows past M are zero.  Reads along the rows."""
    m, k = bits.shape
    pairs = buffer.shape[1]
    full = k // 2
    for r in range(TILE_ROWS):
        i = row + r
        if i < m:
            for p in range(full):
                buffer[r, p] = _bf16_bits(bits[i, 2 * p]) | (_bf16_bits(bits[i, 2 * p + 1]) << np.uint32(16))
            if full < pairs:
                buffer[r, full] = _bf16_bits(bits[i, k - 1])
        else:
            buffer[r, :] = 0


@njit(parallel=True, cache=True)
def _pack_rows(bits, packed):
    """``packed`` (M_padded, ceil(K / 2)) uint32 from the (M, K) uint32 view ``bits`` (any strides)."""
    m, k = bits.shape
    pairs = packed.shape[1]
    if bits.strides[0] < bits.strides[1]:
        # A transposed view (x.T of a C-contiguous x): the inner loop walks x's contiguous rows.
        full = k // 2
        for p in prange(pairs):
            for i in range(m):
                packed[i, p] = _pair_word(bits, i, i, 2 * p, 2 * p + 1, p < full)
        for i in range(m, packed.shape[0]):
            packed[i, :] = 0
    else:
        for t in prange(packed.shape[0] // TILE_ROWS):
            _pack_tile(bits, t * TILE_ROWS, packed[t * TILE_ROWS:(t + 1) * TILE_ROWS])


@njit(parallel=True, cache=True)
def _pack_panels(bits, panels, n_panels, pairs):
    """Panels of the (K, N) uint32 view ``bits`` of B (any strides) into the flat uint32 ``panels``:
    panel ``q`` is ``(pairs, width_q)`` at word ``q * pairs * TILE_COLS``, ``width_q = TILE_COLS``
    except for the last, ``LANES * ceil((N - q * TILE_COLS) / LANES)``."""
    k, n = bits.shape
    full = k // 2
    for q in prange(n_panels):
        first_column = q * TILE_COLS
        width = min(TILE_COLS, -(-(n - first_column) // LANES) * LANES)
        base = q * pairs * TILE_COLS
        if bits.strides[0] < bits.strides[1]:
            # B = W.T of a C-contiguous W: walk W's rows (B's columns) in the inner loop.
            for j in range(width):
                column = first_column + j
                if column < n:
                    for p in range(pairs):
                        panels[base + p * width + j] = _pair_word(bits, 2 * p, 2 * p + 1, column, column, p < full)
                else:
                    for p in range(pairs):
                        panels[base + p * width + j] = 0
        else:
            columns = min(width, n - first_column)
            for p in range(pairs):
                row = base + p * width
                if p < full:
                    for j in range(columns):
                        panels[row + j] = (_bf16_bits(bits[2 * p, first_column + j])
                                           | (_bf16_bits(bits[2 * p + 1, first_column + j]) << np.uint32(16)))
                else:
                    for j in range(columns):
                        panels[row + j] = _bf16_bits(bits[2 * p, first_column + j])
                for j in range(columns, width):
                    panels[row + j] = 0


@njit(cache=True)
def _low_halves_zero(bits):
    for value in bits:
        if value & np.uint32(0xFFFF):
            return False
    return True


def bf16_exact(x):
    """True when every value of float32 ``x`` is a bfloat16 value (the low 16 bits of each are zero),
    so that ``bf16_gemm`` takes it as it is; stops at the first that is not."""
    check_float32_array("x", x, contiguous=False)
    return bool(_low_halves_zero(np.ascontiguousarray(x).view(np.uint32).reshape(-1)))


def pack_bf16_rows(a):
    """Left operand of the micro-kernel: float32 (M, K), any strides -> uint32 (M padded to a multiple
    of ``TILE_ROWS``, ceil(K / 2)) of bfloat16 pairs (see the module docstring)."""
    check_float32_array("a", a, ndim=2, contiguous=False)
    m, k = a.shape
    packed = np.empty((-(-m // TILE_ROWS) * TILE_ROWS, (k + 1) // 2), dtype=np.uint32)
    if packed.size:
        _pack_rows(a.view(np.uint32), packed)
    return packed


def pack_bf16_panels(b):
    """Right operand of the micro-kernel: float32 (K, N), any strides -> flat uint32 panels of
    bfloat16 pairs, ``ceil(N / TILE_COLS)`` of ``(ceil(K / 2), TILE_COLS)`` words, the last one as
    narrow as its columns allow in steps of ``LANES`` (see the module docstring)."""
    check_float32_array("b", b, ndim=2, contiguous=False)
    k, n = b.shape
    pairs, n_panels = (k + 1) // 2, -(-n // TILE_COLS)
    last_width = -(-(n - (n_panels - 1) * TILE_COLS) // LANES) * LANES if n else 0
    panels = np.empty(max(n_panels - 1, 0) * pairs * TILE_COLS + pairs * last_width, dtype=np.uint32)
    if panels.size:
        _pack_panels(b.view(np.uint32), panels, n_panels, pairs)
    return panels


# ---------------------------------------------------------------------------------------------
# The product
# ---------------------------------------------------------------------------------------------


@njit(inline="always")
def _tile(a_address, pairs, panels, m, n, out, transposed, t, q, tile):
    """Row tile ``t`` (its packed rows at ``a_address``) against panel ``q``: the block of ``out``
    (or of its transpose) they make."""
    column = q * TILE_COLS
    columns = min(TILE_COLS, n - column)
    vectors = -(-columns // LANES)
    panel_address = panels.ctypes.data + q * pairs * TILE_COLS * 4
    row = t * TILE_ROWS
    rows = min(TILE_ROWS, m - row)
    if not transposed and rows == TILE_ROWS and columns == vectors * LANES:
        out_stride = out.shape[1]
        _run_microkernel(vectors, a_address, pairs, panel_address, pairs,
                         out.ctypes.data + (row * out_stride + column) * 4, out_stride)
        return
    _run_microkernel(vectors, a_address, pairs, panel_address, pairs, tile.ctypes.data, TILE_COLS)
    if transposed:
        for j in range(columns):
            for r in range(rows):
                out[column + j, row + r] = tile[r, j]
    else:
        out[row:row + rows, column:column + columns] = tile[:rows, :columns]


@njit(parallel=True, cache=True)
def _gemm_packed(packed_a, a_bits, panels, m, n, out, transposed, threads):
    """The bf16 product of packed rows (``m`` real rows) and panels (``n`` columns) into float32
    ``out``: (m, n), or its transpose (n, m) when ``transposed``.  With an empty ``packed_a``
    (0, pairs) the rows are packed here, tile by tile, from the uint32 view ``a_bits`` (M, K) of A,
    whose rows must be contiguous, instead of in a pass of their own.  ``threads`` is the caller's
    ``numba.get_num_threads()`` (calling it here would stop Numba caching the function).

    The larger operand is walked once, in the outer loop, while the smaller one is read again from
    the caches for each of its row tiles (or panels); the threads share out the outer loop (and
    the inner one when the outer has fewer blocks than threads).  Packing in the loop is for the
    first case (the caller's choice).
    """
    pairs = packed_a.shape[1]
    fused = packed_a.shape[0] == 0
    n_panels = -(-n // TILE_COLS)
    row_tiles = -(-m // TILE_ROWS)
    rows_outer = fused or row_tiles * TILE_ROWS > n_panels * TILE_COLS
    if rows_outer:
        row_blocks = min(row_tiles, threads)
        panel_blocks = min(n_panels, max(1, threads // row_blocks))
    else:
        panel_blocks = min(n_panels, threads)
        row_blocks = min(row_tiles, max(1, threads // panel_blocks))
    panels_per_block = -(-n_panels // panel_blocks)
    tiles_per_block = -(-row_tiles // row_blocks)
    for block in prange(panel_blocks * row_blocks):
        tile = np.empty((TILE_ROWS, TILE_COLS), dtype=np.float32)
        rows = np.empty((TILE_ROWS if fused else 0, pairs), dtype=np.uint32)
        panel_start = (block // row_blocks) * panels_per_block
        panel_stop = min(n_panels, panel_start + panels_per_block)
        tile_start = (block % row_blocks) * tiles_per_block
        tile_stop = min(row_tiles, tile_start + tiles_per_block)
        if rows_outer:
            for t in range(tile_start, tile_stop):
                if fused:
                    _pack_tile(a_bits, t * TILE_ROWS, rows)
                    a_address = rows.ctypes.data
                else:
                    a_address = packed_a.ctypes.data + t * TILE_ROWS * pairs * 4
                for q in range(panel_start, panel_stop):
                    _tile(a_address, pairs, panels, m, n, out, transposed, t, q, tile)
        else:
            for q in range(panel_start, panel_stop):
                for t in range(tile_start, tile_stop):
                    _tile(packed_a.ctypes.data + t * TILE_ROWS * pairs * 4, pairs, panels, m, n, out, transposed, t,
                          q, tile)


def _run(a, b, m, n, out, transposed):
    """``_gemm_packed`` of ``a`` (m, K) and ``b`` (K, n), any strides: A's rows are packed in the
    product's loop when they are contiguous and many (the outer loop then walks them once), else in a
    pass of their own."""
    panels = pack_bf16_panels(b)
    pairs = (a.shape[1] + 1) // 2
    if a.strides[1] == 4 and -(-m // TILE_ROWS) * TILE_ROWS > -(-n // TILE_COLS) * TILE_COLS:
        packed = np.empty((0, pairs), dtype=np.uint32)
        _gemm_packed(packed, a.view(np.uint32), panels, m, n, out, transposed, numba.get_num_threads())
    else:
        _gemm_packed(pack_bf16_rows(a), np.empty((0, 0), dtype=np.uint32), panels, m, n, out, transposed,
                     numba.get_num_threads())


def _across(arr):
    """Words that packing ``arr`` (as rows or as panels) writes across its memory order: all of them
    when ``arr`` is column-major (a transposed view), else none."""
    return arr.size if arr.strides[0] < arr.strides[1] else 0


def bf16_gemm(a, b, out=None):
    """``a @ b`` with both operands rounded to bfloat16 and float32 accumulation (``vdpbf16ps``).

    Parameters
    ----------
    a : numpy.ndarray, float32, shape (M, K)
        Any strides (a transposed view is packed as it lies).
    b : numpy.ndarray, float32, shape (K, N)
        Any strides.  When ``b`` is a transposed view (``W.T``) and ``a`` is not, the kernel computes
        ``(b.T @ a.T).T`` instead, so that the large operand is packed along its rows: the same bits
        (the products of each pair commute exactly, the pairs are summed in the same order).
    out : numpy.ndarray, float32, shape (M, N), optional
        C-contiguous array to write the result into.

    Returns
    -------
    product : numpy.ndarray, float32, shape (M, N)
        ``product[i, j]``: the pairs ``(a[i, 2p], a[i, 2p+1]) . (b[2p, j], b[2p+1, j])`` of the rounded
        operands summed in the order ``p = 0, 1, ...`` in which ``vdpbf16ps`` sums them (module
        docstring): each product exact, each addition rounded to nearest even, denormals flushed to zero.

    Raises
    ------
    RuntimeError
        Where the CPU lacks AVX-512 BF16 (``bf16_available()`` is False).
    """
    check_float32_array("a", a, ndim=2, contiguous=False)
    check_float32_array("b", b, ndim=2, contiguous=False)
    (m, k), n = a.shape, b.shape[1]
    if b.shape[0] != k:
        raise ValueError(f"a (M, K) and b (K, N) must agree on K, got a {tuple(a.shape)} and b {tuple(b.shape)}")
    if out is None:
        out = np.empty((m, n), dtype=np.float32)
    else:
        check_float32_array("out", out, ndim=2)
        if tuple(out.shape) != (m, n):
            raise ValueError(f"out must have shape {(m, n)}, got {tuple(out.shape)}")
    _check_available()
    if m == 0 or n == 0:
        return out
    if k == 0:
        out[...] = 0.0
        return out
    # Packing across an operand's memory order is a scalar transpose (about 1 ns a word, as long as
    # the product of a 1024 x 1024 W.T with batch 100): swap the operands when that packs less.
    if _across(b.T) + _across(a.T) + m * n < _across(a) + _across(b):
        _run(b.T, a.T, n, m, out, True)
    else:
        _run(a, b, m, n, out, False)
    return out


def bf16_gemm_assembly():
    """x86 assembly of the product kernel, compiled afresh (cached code cannot be inspected): the
    tests check it for ``vdpbf16ps``.  Takes a few seconds (one Numba compilation)."""
    _check_available()
    fresh = numba.njit(parallel=True, cache=False)(_gemm_packed.py_func)
    fresh(pack_bf16_rows(np.ones((1, 2), np.float32)), np.empty((0, 0), np.uint32),
          pack_bf16_panels(np.ones((2, 1), np.float32)), 1, 1, np.empty((1, 1), np.float32), False, 1)
    return fresh.inspect_asm(fresh.signatures[0])
