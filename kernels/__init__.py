"""Bit-packed XNOR-popcount kernels for binary inference: packed arrays in, arrays out.

``lowbit.kernels`` knows nothing of layers or gradients.  Each public function validates its
arguments (dtype, ndim, shapes, C-contiguity; a wrong one raises ``TypeError`` or ``ValueError``
naming the argument, what was expected and what came) and then dispatches on the array kind: numpy
arrays go to a private Numba kernel (``@njit(parallel=True, cache=True)``), CuPy arrays to a
private CUDA kernel whose source is in ``kernels/cuda/*.cu``.  The result has the same kind as the
input.

Bit convention (the one place it is written; every kernel and test refers to it)
--------------------------------------------------------------------------------
* A packed array is ``uint64`` and packs the **last axis**: a real array of shape ``(..., K)``
  becomes ``(..., ceil(K / 64))``.
* **Bit = 1 means +1, bit = 0 means -1.**  The sign of a real value ``x`` is +1 when ``x >= 0``,
  so ``sign(0) = sign(-0.0) = +1``.  NaN has no sign: ``pack_signs`` raises ``ValueError``.
* Element ``k`` of the last axis goes to word ``k // 64``, bit ``k % 64``, least significant bit
  first: element 0 is ``word & 1``, element 63 is ``word >> 63``.
* **Padding bits** past ``K`` in the last word **are 0** in every packed array that any function
  here writes, and the public functions that reduce over packed words check that their inputs obey
  this (``ValueError`` otherwise).  Because the padding bits of both operands are equal, XOR never
  counts them, and the dot product of two packed ``K``-vectors is exactly::

      dot(a, b) = K - 2 * popcount(a XOR b)          (no padding correction)

Convolution layout and padding rule
-----------------------------------
* Activations are packed **channels-last** (NHWC): ``(N, H, W, ceil(C / 64))`` uint64.
* Weights are ``(O, KH, KW, ceil(C / 64))`` uint64.  A training-side NCHW weight tensor ``w`` of
  shape ``(O, C, KH, KW)`` is packed by ``pack_signs(w.transpose(0, 2, 3, 1))``, and NCHW
  activations ``x`` by ``pack_signs(x.transpose(0, 2, 3, 1))``.
* The output of ``binary_conv2d`` is ``int32`` ``(N, OH, OW, O)`` with
  ``OH = (H + 2 * pad_h - KH) // stride_h + 1`` (likewise ``OW``).
* **Zero padding**: the training side pads the +-1 activations with zeros, so a padded position
  contributes 0 (it is neither +1 nor -1).  ``binary_conv2d`` therefore counts only the taps that
  fall inside the input: ``out = sum over valid taps of (C - 2 * popcount(x XOR w))``.  This is
  exact, equal to the float convolution of the +-1 tensors with zero padding.
* ``maxpool_packed`` takes the max of +-1 values, which is the bitwise OR of their bits; padded
  positions are ignored (as if they held -inf).

Fused BatchNorm-then-sign
-------------------------
``bn_sign_threshold(gamma, beta, mean, var, eps)`` turns per-channel BatchNorm parameters into an
integer ``threshold`` and a ``direction`` in {+1, -1} per channel, such that
``threshold_pack(acc, threshold, direction)`` writes the bit ``direction * acc >=
direction * threshold``, exactly equal to ``pack_signs`` of
``gamma * (acc - mean) / sqrt(var + eps) + beta`` evaluated in float64.  ``dtype=np.float32,
order="inverse"`` reproduces instead, bit for bit, the float32 evaluation-mode forward of
``lowbit.layers.BatchNorm`` (``gamma * ((acc - mean) * (1 / sqrt(var + eps))) + beta``).

Two fused variants: ``threshold_maxpool_pack(acc, threshold, direction, kernel, stride, padding)``
max-pools the int32 accumulators and thresholds them in one pass (equal to ``threshold_pack`` of
the pooled accumulators), and ``threshold_signs(x, threshold, direction)`` compares float32
channels-first values ``(N, C)`` / ``(N, C, H, W)`` with per-channel float thresholds and packs them
channels-last in one pass (threshold 0, direction +1 is ``pack_signs`` of the NHWC values).

Inputs with zeros (dropout's {0, +-c} output on +-1 values): ``pack_masked_signs(x)`` packs each
row as 2K signs that cancel where ``x`` is 0, so ``xnor_gemm`` against the weights packed twice
(``pack_signs(concatenate([w, w], -1))``, length 2K) gives ``2 * (x / c) . w`` exactly;
``masked_scale(x)`` finds ``c`` (0.0 when ``x`` is not of that form).

k-bit inputs (a binary first layer on 8-bit images): ``pack_bitplanes(codes, bits)`` packs each
bit plane of unsigned codes, ``xnor_gemm`` multiplies the planes, and ``combine_bitplanes`` sums
them weighted by ``2^b`` (see ``kernels/bitplane.py`` for the identity that makes it exact);
``xnor_gemm_bitplanes`` does the last two in one pass, summing the planes in the micro-kernel's
registers.

Products followed by thresholds (a packed layer and the sign after it):
``xnor_gemm_threshold``, ``xnor_gemm_bitplanes_threshold`` and ``binary_conv2d_threshold`` give
exactly the bits of ``threshold_pack`` of the product; on AVX-512 they compare each 6 x 32 block in
the micro-kernel's registers and never write the int32 products.

CPU path
--------
Popcounts go through LLVM's ``llvm.ctpop`` intrinsic (``kernels/_intrinsics.py``): on CPUs with
AVX-512 VPOPCNTDQ it lowers to ``vpopcntq`` on 512-bit registers, elsewhere to ``popcnt`` or to
the best vector sequence LLVM knows for the target.  The GEMM interleaves B into panels of
``TILE_COLS`` rows and runs a register-blocked micro-kernel (``TILE_ROWS x TILE_COLS`` outputs,
6 x 32 on AVX-512: 24 zmm accumulators) over blocks of A rows that stay in L2, blocks shared out
to the cores by ``prange``.  ``binary_conv2d`` feeds the same micro-kernel straight from a
zero-padded copy of the packed input (implicit im2col: each of a tile's rows has its own start
address, so tiles may span output rows and images), in one parallel region whose blocks also
prepare, as claimed tasks, the weight panels, tap sums and padded rows they read; zero words stand
for the padding, and the micro-kernel subtracts each position's counts from K less what its
off-input taps added (one row per window rectangle, from prefix sums over the taps), so the result
is exact with no correction pass.  For inference, ``prepare_gemm_weights(b_packed, k)`` interleaves the
GEMM's right operand into panels once, and ``prepare_conv_weights(w_packed, channels)`` does the
weights' share of that once (checks, panels, tap sums): ``binary_conv2d`` takes the
``PreparedConvWeights`` it returns in place of the packed weights, with the same result.  The
cache blocking around the micro-kernel is chosen per CPU at first use and cached on disk
(``kernels/tuning.py``; ``LOWBIT_TUNING=0`` keeps the defaults); the result does not depend on it.
Thread count: ``numba.set_num_threads``.  Around numpy's BLAS, hold BLAS to one thread (``PackedModel``
does): its idle workers spin on the cores these kernels need.

GPU path
--------
``kernels/cuda/*.cu``, compiled by ``cupy.RawModule`` on first use: a 128 x 128-tile
shared-memory GEMM with ``__popcll``; warp-ballot packing and thresholding; direct convolution and
max-pooling.  A CuPy input gives a CuPy output; the per-call host traffic is the NaN flag of
``pack_signs`` and the padding-bit checks (one small reduction each, which synchronise).
``bn_sign_threshold`` (once per layer, at conversion time) computes on the host.
"""
from ._cache_guard import refresh_cache_stamps as _refresh_cache_stamps

_refresh_cache_stamps()  # before any cached kernel loads: see kernels/_cache_guard.py

from .bf16 import bf16_available, bf16_exact, bf16_gemm
from .bitplane import combine_bitplanes, pack_bitplanes
from .conv import PreparedConvWeights, binary_conv2d, binary_conv2d_threshold, prepare_conv_weights
from .gemm import (
    PreparedGemmWeights,
    prepare_gemm_weights,
    xnor_gemm,
    xnor_gemm_bitplanes,
    xnor_gemm_bitplanes_threshold,
    xnor_gemm_threshold,
)
from .pack import masked_scale, pack_masked_signs, pack_sign_columns, pack_signs, unpack_signs, words_for
from .pool import maxpool_packed
from .threshold import bn_sign_threshold, threshold_maxpool_pack, threshold_pack, threshold_signs

__all__ = [
    "pack_signs",
    "pack_masked_signs",
    "masked_scale",
    "pack_sign_columns",
    "unpack_signs",
    "words_for",
    "xnor_gemm",
    "xnor_gemm_bitplanes",
    "xnor_gemm_threshold",
    "xnor_gemm_bitplanes_threshold",
    "prepare_gemm_weights",
    "PreparedGemmWeights",
    "binary_conv2d",
    "binary_conv2d_threshold",
    "prepare_conv_weights",
    "PreparedConvWeights",
    "bn_sign_threshold",
    "threshold_pack",
    "threshold_maxpool_pack",
    "threshold_signs",
    "maxpool_packed",
    "pack_bitplanes",
    "combine_bitplanes",
    "bf16_available",
    "bf16_gemm",
    "bf16_exact",
]
