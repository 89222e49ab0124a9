"""Fused and prepared kernel paths of the packed pipeline, each against the unfused kernels and
tests/reference.py, bit for bit; the GEMM's result under every cache blocking; the tuning cache.

The CPU runs everything; with a CUDA device the public functions run there too (``device``).
"""
from __future__ import annotations

import copy
import json

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lowbit.kernels as kernels
from lowbit.kernels import gemm, tuning

import reference
from avx2_build import run_avx2_check
from test_kernels import DEVICES, Device, signs

SEEDS = st.integers(0, 2**32 - 1)


@pytest.fixture(scope="module", params=DEVICES)
def device(request):
    return Device(request.param)


def packed_rows(rng, rows, k, style="gaussian"):
    values = signs(rng, (rows, k), style)
    return values, kernels.pack_signs(values)


# ------------------------------------------------------------------------------------------------
# xnor_gemm: prepared weights, every blocking, bit planes summed in registers
# ------------------------------------------------------------------------------------------------


@given(m=st.integers(1, 40), n=st.integers(1, 80), k=st.integers(1, 300), seed=SEEDS,
       style=st.sampled_from(["gaussian", "zeros", "negative", "positive"]))
def test_prepared_gemm_equals_reference(device, m, n, k, seed, style):
    rng = np.random.default_rng(seed)
    a_values, a_packed = packed_rows(rng, m, k, style)
    b_values, b_packed = packed_rows(rng, n, k)
    prepared = kernels.prepare_gemm_weights(device.put(b_packed), k)
    product = device.get(kernels.xnor_gemm(device.put(a_packed), prepared, k))
    np.testing.assert_array_equal(product, reference.xnor_gemm_matmul(a_values, b_values))


@given(m=st.integers(1, 50), n=st.integers(1, 100), words=st.integers(1, 12), threads=st.integers(1, 8),
       blocking=st.sampled_from(tuning.CANDIDATES + ((64, 1), (8, 3))), seed=SEEDS)
def test_gemm_result_does_not_depend_on_blocking(m, n, words, threads, blocking, seed):
    """Any (row_chunk_bytes, blocks_per_thread) and thread count given to the blocking gives the
    same bits: the tuning may pick any candidate."""
    rng = np.random.default_rng(seed)
    k = 64 * words - int(rng.integers(0, 64))
    a_values, a_packed = packed_rows(rng, m, k)
    b_values, b_packed = packed_rows(rng, n, k)
    panels = gemm.panel_buffer(n, words)
    gemm._pack_panels(b_packed, panels)
    out = np.empty((m, n), dtype=np.int32)
    gemm._gemm_panels(a_packed.reshape(1, m, words), panels, n, k, out, threads, *blocking)
    np.testing.assert_array_equal(out, reference.xnor_gemm_matmul(a_values, b_values))


@given(rows=st.integers(1, 20), k=st.integers(1, 300), n=st.integers(1, 70), bits=st.integers(1, 12),
       prepared=st.booleans(), seed=SEEDS)
def test_bitplane_gemm_fused_equals_combined_planes(device, rows, k, n, bits, prepared, seed):
    rng = np.random.default_rng(seed)
    dtype = np.uint8 if bits <= 8 else np.uint16
    codes = rng.integers(0, 2**bits, size=(rows, k)).astype(dtype)
    codes[0, : min(k, 3)] = 2**bits - 1
    w = rng.choice(np.array([-1, 1]), size=(n, k))
    planes = kernels.pack_bitplanes(device.put(codes), bits)
    w_packed = device.put(kernels.pack_signs(w))
    weights = kernels.prepare_gemm_weights(w_packed, k) if prepared else w_packed
    totals = device.get(kernels.xnor_gemm_bitplanes(planes, weights, k))
    expected = 2 * codes.astype(np.int64) @ w.T - (2**bits - 1) * w.sum(axis=1)[None, :]
    np.testing.assert_array_equal(totals, expected)
    combined = kernels.combine_bitplanes(kernels.xnor_gemm(planes.reshape(bits * rows, -1), w_packed, k)
                                         .reshape(bits, rows, n))
    np.testing.assert_array_equal(totals, device.get(combined))


@pytest.mark.parametrize("bits,k", [(8, 784), (1, 64), (16, 65), (3, 1)])
def test_pack_bitplanes_matches_loops(bits, k):
    rng = np.random.default_rng(bits * 1000 + k)
    codes = rng.integers(0, 2**bits, size=(5, k)).astype(np.uint8 if bits <= 8 else np.uint16)
    planes = kernels.pack_bitplanes(codes, bits)
    for b in range(bits):
        np.testing.assert_array_equal(planes[b], reference.pack_signs_loops(np.where((codes >> b) & 1, 1, -1)))


def test_prepared_gemm_checks():
    rng = np.random.default_rng(0)
    _, b_packed = packed_rows(rng, 5, 100)
    _, a_packed = packed_rows(rng, 3, 100)
    prepared = kernels.prepare_gemm_weights(b_packed, 100)
    assert prepared.shape == (5, 2) and prepared.k == 100
    b_packed[:] = 0  # the prepared copy is not affected
    np.testing.assert_array_equal(kernels.xnor_gemm(a_packed, prepared, 100),
                                  kernels.xnor_gemm(a_packed, prepared.weights, 100))
    with pytest.raises(ValueError, match="k=99 does not match the prepared weights"):
        kernels.xnor_gemm(a_packed[:, :2], prepared, 99)
    with pytest.raises(TypeError, match="prepare_gemm_weights"):
        kernels.gemm.PreparedGemmWeights()
    with pytest.raises(TypeError, match="b_packed must be a numpy or CuPy array or PreparedGemmWeights"):
        kernels.xnor_gemm(a_packed, [[1, 2]], 100)
    bad = b_packed.copy()
    bad[0, 1] = np.uint64(1) << np.uint64(63)
    with pytest.raises(ValueError, match="padding bits"):
        kernels.prepare_gemm_weights(bad, 100)
    with pytest.raises(ValueError, match=r"\(2\*\*bits - 1\) \* k must be < 2\*\*31"):
        kernels.xnor_gemm_bitplanes(np.zeros((16, 1, 2**20 // 64), np.uint64),
                                    np.zeros((1, 2**20 // 64), np.uint64), 2**20)
    with pytest.raises(ValueError, match="planes must be 3-D"):
        kernels.xnor_gemm_bitplanes(a_packed, prepared, 100)


@given(m=st.integers(1, 40), n=st.integers(1, 200), k=st.integers(1, 300), threads=st.integers(1, 2),
       prepared=st.booleans(), seed=SEEDS)
def test_gemm_threshold_equals_threshold_of_gemm(device, m, n, k, threads, prepared, seed):
    """xnor_gemm_threshold (thresholds in the micro-kernel's registers on AVX-512) gives the bits of
    threshold_pack(xnor_gemm): whole and partial tiles, odd panel counts, one and two threads."""
    rng = np.random.default_rng(seed)
    a_values, a_packed = packed_rows(rng, m, k)
    b_values, b_packed = packed_rows(rng, n, k)
    threshold = rng.integers(-k - 1, k + 2, size=n).astype(np.int64)
    direction = rng.choice(np.array([-1, 1], dtype=np.int8), size=n)
    expected = np.where(direction > 0, reference.xnor_gemm_matmul(a_values, b_values) >= threshold,
                        reference.xnor_gemm_matmul(a_values, b_values) <= threshold)
    weights = device.put(b_packed)
    if prepared:
        weights = kernels.prepare_gemm_weights(weights, k)
    saved = numba.get_num_threads()
    numba.set_num_threads(min(threads, saved))
    try:
        bits = kernels.xnor_gemm_threshold(device.put(a_packed), weights, k, device.put(threshold),
                                           device.put(direction))
    finally:
        numba.set_num_threads(saved)
    np.testing.assert_array_equal(device.get(bits), reference.pack_signs_loops(np.where(expected, 1, -1)))


@given(rows=st.integers(1, 30), k=st.integers(1, 150), n=st.integers(1, 100), bits=st.integers(1, 8),
       prepared=st.booleans(), seed=SEEDS)
def test_bitplane_gemm_threshold_equals_threshold_of_combined_planes(device, rows, k, n, bits, prepared, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**bits, size=(rows, k)).astype(np.uint8 if bits <= 8 else np.uint16)
    b_values, b_packed = packed_rows(rng, n, k)
    planes = kernels.pack_bitplanes(codes, bits)
    weights = kernels.prepare_gemm_weights(b_packed, k) if prepared else b_packed
    totals = kernels.xnor_gemm_bitplanes(planes, weights, k)
    bound = (2**bits - 1) * k
    threshold = rng.integers(-bound - 1, bound + 2, size=n).astype(np.int64)
    direction = rng.choice(np.array([-1, 1], dtype=np.int8), size=n)
    expected = kernels.threshold_pack(totals, threshold, direction)
    bits_out = kernels.xnor_gemm_bitplanes_threshold(device.put(planes), weights if device.name == "cpu" else
                                                     device.put(b_packed), k, device.put(threshold),
                                                     device.put(direction))
    np.testing.assert_array_equal(device.get(bits_out), expected)


@pytest.mark.parametrize("m, n, k", [(100, 4096, 4096), (37, 96, 700), (250, 33, 64)])
def test_gemm_threshold_on_many_blocks(m, n, k):
    """Layer-sized products (blocks split by rows and by panels) on two threads, thresholds at the
    int32 edges included."""
    rng = np.random.default_rng(m)
    a = kernels.pack_signs(rng.standard_normal((m, k)).astype(np.float32))
    b = kernels.prepare_gemm_weights(kernels.pack_signs(rng.standard_normal((n, k)).astype(np.float32)), k)
    threshold = rng.integers(-k // 8, k // 8 + 1, size=n).astype(np.int64)
    threshold[::7] = 2**40
    threshold[3::7] = -(2**31) - 1
    direction = rng.choice(np.array([-1, 1], dtype=np.int8), size=n)
    expected = kernels.threshold_pack(kernels.xnor_gemm(a, b, k), threshold, direction)
    np.testing.assert_array_equal(kernels.xnor_gemm_threshold(a, b, k, threshold, direction), expected)


# ------------------------------------------------------------------------------------------------
# binary_conv2d_threshold and maxpool_packed with directions
# ------------------------------------------------------------------------------------------------


@given(batch=st.integers(1, 3), channels=st.sampled_from([1, 5, 32, 64, 70, 130]),
       out_channels=st.sampled_from([1, 7, 32, 33, 64, 100]), height=st.integers(1, 9), width=st.integers(1, 9),
       kernel=st.integers(1, 3), stride=st.integers(1, 2), pad=st.integers(0, 2), prepared=st.booleans(),
       seed=SEEDS)
def test_conv_threshold_equals_threshold_of_conv(device, batch, channels, out_channels, height, width, kernel,
                                                 stride, pad, prepared, seed):
    if height + 2 * pad < kernel or width + 2 * pad < kernel:
        return
    rng = np.random.default_rng(seed)
    x = signs(rng, (batch, channels, height, width), "zeros")
    w = signs(rng, (out_channels, channels, kernel, kernel), "gaussian")
    fan_in = channels * kernel * kernel
    # thresholds around the attainable accumulators (ties included), both directions
    threshold = rng.integers(-fan_in - 1, fan_in + 2, size=out_channels).astype(np.int64)
    direction = rng.choice(np.array([-1, 1], dtype=np.int8), size=out_channels)
    x_packed = device.put(kernels.pack_signs(np.ascontiguousarray(x.transpose(0, 2, 3, 1))))
    w_packed = device.put(kernels.pack_signs(np.ascontiguousarray(w.transpose(0, 2, 3, 1))))
    weights = kernels.prepare_conv_weights(w_packed, channels) if prepared else w_packed
    bits = kernels.binary_conv2d_threshold(x_packed, weights, device.put(threshold), device.put(direction),
                                           channels, stride, pad)
    acc = reference.conv2d_direct(reference.sign_pm1(x), reference.sign_pm1(w), stride, pad).transpose(0, 2, 3, 1)
    expected = np.where(direction > 0, acc >= threshold, acc <= threshold)
    np.testing.assert_array_equal(device.get(bits), reference.pack_signs_loops(np.where(expected, 1, -1)))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("channels, out_channels, size, stride, pad", [
    (64, 96, 17, 1, 1),   # an odd panel count: the last word's high half written 0
    (128, 128, 14, 2, 1),
    (70, 33, 11, 1, 2),   # windows all in padding at the corners
    (32, 64, 23, 1, 0),
])
def test_conv_threshold_in_registers_on_many_blocks(threads, channels, out_channels, size, stride, pad):
    """Larger layers than the property test draws, on one and two threads: many blocks, each with
    whole tiles thresholded in the micro-kernel's registers against corrected bounds and a last
    partial tile through the scratch path; prepared and plain weights alike."""
    rng = np.random.default_rng(size)
    x = kernels.pack_signs(rng.standard_normal((3, size, size, channels)).astype(np.float32))
    w = kernels.pack_signs(rng.standard_normal((out_channels, 3, 3, channels)).astype(np.float32))
    fan_in = 9 * channels
    threshold = rng.integers(-fan_in // 8, fan_in // 8, size=out_channels).astype(np.int64)
    direction = rng.choice(np.array([-1, 1], dtype=np.int8), size=out_channels)
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        expected = kernels.threshold_pack(kernels.binary_conv2d(x, w, channels, stride, pad), threshold, direction)
        for weights in (w, kernels.prepare_conv_weights(w, channels)):
            bits = kernels.binary_conv2d_threshold(x, weights, threshold, direction, channels, stride, pad)
            np.testing.assert_array_equal(bits, expected)
    finally:
        numba.set_num_threads(previous)


_AVX2_CHECK = """
import numpy as np
import lowbit.kernels as K
from lowbit.kernels import _intrinsics
assert (_intrinsics.TILE_ROWS, _intrinsics.TILE_COLS, _intrinsics.THRESHOLD_EPILOGUE) == (4, 12, False)
rng = np.random.default_rng(0)
for c, o, size, stride, pad in [(64, 96, 17, 1, 1), (70, 33, 11, 1, 2), (32, 20, 9, 2, 1)]:
    x = K.pack_signs(rng.standard_normal((2, size, size, c)).astype(np.float32))
    w = K.pack_signs(rng.standard_normal((o, 3, 3, c)).astype(np.float32))
    t = rng.integers(-20, 20, size=o).astype(np.int64)
    d = rng.choice(np.array([-1, 1], np.int8), size=o)
    acc = K.binary_conv2d(x, w, c, stride, pad)
    # the accumulators against the +-1 convolution in numpy (zero padding)
    xv = K.unpack_signs(x.reshape(-1, x.shape[3]), c).reshape(2, size, size, c)
    wv = K.unpack_signs(w.reshape(-1, w.shape[3]), c).reshape(o, 3, 3, c)
    xp = np.pad(xv, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = acc.shape[1]
    expected = sum(np.einsum("nhwc,oc->nhwo", xp[:, i:i + stride * out:stride, j:j + stride * out:stride], wv[:, i, j])
                   for i in range(3) for j in range(3))
    np.testing.assert_array_equal(acc, expected)
    np.testing.assert_array_equal(K.binary_conv2d(x, w, c, stride, pad, dtype=np.float32), expected)
    a2 = x.reshape(-1, x.shape[3])[:37]
    b2 = w.reshape(o, -1)[:, :x.shape[3]].copy()
    np.testing.assert_array_equal(K.xnor_gemm_threshold(a2, b2, c, t, d),
                                  K.threshold_pack(K.xnor_gemm(a2, b2, c), t, d))
    ref = K.threshold_pack(acc, t, d)
    np.testing.assert_array_equal(K.binary_conv2d_threshold(x, w, t, d, c, stride, pad), ref)
    np.testing.assert_array_equal(K.binary_conv2d_threshold(x, K.prepare_conv_weights(w, c), t, d, c, stride, pad), ref)
print("ok")
"""


@pytest.mark.slow
def test_avx2_build_of_the_conv_kernels(tmp_path):
    """The AVX2 build (4 x 12 tile, no threshold epilogue: the fused convolution's scratch path),
    compiled in a subprocess for a Haswell target with its own Numba cache, gives the same bits as
    the unfused kernels.  The machines that run the suite have AVX-512, so without this that path
    would go untested."""
    run_avx2_check(_AVX2_CHECK, tmp_path)


@given(batch=st.integers(1, 2), channels=st.sampled_from([1, 30, 64, 65, 130]), height=st.integers(1, 8),
       width=st.integers(1, 8), kernel=st.integers(1, 3), stride=st.integers(1, 3), pad=st.integers(0, 2),
       seed=SEEDS)
def test_maxpool_with_directions_is_threshold_of_maxpool(device, batch, channels, height, width, kernel, stride,
                                                         pad, seed):
    if pad >= kernel or height + 2 * pad < kernel or width + 2 * pad < kernel:
        return
    rng = np.random.default_rng(seed)
    acc = rng.integers(-4, 5, size=(batch, height, width, channels)).astype(np.int32)
    threshold = rng.integers(-3, 4, size=channels).astype(np.int64)
    direction = rng.choice(np.array([-1, 1], dtype=np.int8), size=channels)
    bits = kernels.threshold_pack(device.put(acc), device.put(threshold), device.put(direction))
    pooled = kernels.maxpool_packed(bits, kernel, stride, pad, direction=device.put(direction))
    expected = kernels.threshold_maxpool_pack(device.put(acc), device.put(threshold), device.put(direction),
                                              kernel, stride, pad)
    np.testing.assert_array_equal(device.get(pooled), device.get(expected))
    if (direction > 0).all():  # all OR: the plain packed max-pool
        np.testing.assert_array_equal(device.get(pooled), device.get(kernels.maxpool_packed(bits, kernel, stride, pad)))


def test_conv_threshold_and_pool_checks():
    x = np.zeros((1, 4, 4, 1), np.uint64)
    w = np.zeros((3, 3, 3, 1), np.uint64)
    with pytest.raises(ValueError, match=r"threshold must have shape \(C,\) = \(3,\)"):
        kernels.binary_conv2d_threshold(x, w, np.zeros(2, np.int64), np.ones(3, np.int8), 10)
    with pytest.raises(TypeError, match="direction must have dtype int8"):
        kernels.binary_conv2d_threshold(x, w, np.zeros(3, np.int64), np.ones(3, np.int32), 10)
    with pytest.raises(ValueError, match="direction must hold only"):
        kernels.maxpool_packed(x, 2, direction=np.zeros(10, np.int8))
    with pytest.raises(ValueError, match=r"ceil\(C / 64\) = 1"):
        kernels.maxpool_packed(x, 2, direction=np.ones(65, np.int8))


# ------------------------------------------------------------------------------------------------
# the tuning cache
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def tuning_cache(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("LOWBIT_TUNING", "1")
    monkeypatch.setenv("LOWBIT_TUNING_FILE", str(path))
    monkeypatch.setattr(tuning, "_chosen", {})
    return path


def test_tuning_off_gives_defaults(monkeypatch):
    monkeypatch.setattr(tuning, "_chosen", {})
    monkeypatch.setenv("LOWBIT_TUNING", "off")
    assert tuning.gemm_blocking() == tuning.DEFAULT_BLOCKING
    assert not tuning.tuning_enabled()


def test_tuning_writes_reads_and_survives_a_corrupt_cache(tuning_cache, monkeypatch):
    calls = []
    monkeypatch.setattr(tuning, "tune_gemm", lambda: calls.append(1) or ((65536, 2), {
        tuning.DEFAULT_BLOCKING: 1.0, (65536, 2): 0.5}))
    assert tuning.gemm_blocking() == (65536, 2)
    doc = json.loads(tuning_cache.read_text())
    (key, entry), = doc["entries"].items()
    assert tuning.cpu_model() in key and f"threads {numba.get_num_threads()}" in key
    assert entry["gemm_blocking"] == [65536, 2] and entry["gain_over_default"] == 1.0
    monkeypatch.setattr(tuning, "_chosen", {})  # a new process: read from the file, no tuning
    assert tuning.gemm_blocking() == (65536, 2) and len(calls) == 1
    for corrupt in ("{not json", json.dumps({"schema": 1, "entries": {key: {"gemm_blocking": [0, "x"]}}}),
                    json.dumps([1, 2]), "\x00\xff"):
        tuning_cache.write_text(corrupt)
        monkeypatch.setattr(tuning, "_chosen", {})
        assert tuning.gemm_blocking() == (65536, 2)
        assert json.loads(tuning_cache.read_text())["entries"][key]["gemm_blocking"] == [65536, 2]
    assert len(calls) == 5


def test_tune_gemm_times_the_candidates():
    best, relative = tuning.tune_gemm(candidates=((65536, 2), (262144, 8)), rounds=1)
    assert set(relative) == {tuning.DEFAULT_BLOCKING, (65536, 2), (262144, 8)}
    assert relative[tuning.DEFAULT_BLOCKING] == 1.0
    assert best in relative and all(t > 0 for t in relative.values())
    if best != tuning.DEFAULT_BLOCKING:
        assert relative[best] < 0.97


# ------------------------------------------------------------------------------------------------
# the packed model runs fused pairs of stages, with the stages' own result
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("network", ["binary_cnn", "bnn_mlp"])
def test_packed_model_fused_plan_equals_stage_by_stage(network):
    import lowbit
    from lowbit import zoo

    model = zoo.binary_cnn(0) if network == "binary_cnn" else zoo.bnn_mlp(0, hidden=(200, 100, 70))
    packed = lowbit.convert(model)
    x = np.random.default_rng(0).uniform(0, 1, (7, 1, 28, 28)).astype(np.float32)
    plan = packed._plan()
    assert len(plan) < len(packed.stages)  # conv / dense + threshold(+pool) pairs run as one step
    kinds = [stage.kind for stage in packed.stages]
    assert ("binary_dense", "threshold") in zip(kinds, kinds[1:])
    expected = x
    for stage in packed.stages:
        expected = stage.run(expected)
    np.testing.assert_array_equal(packed.forward(x), expected)
    packed.stages[3] = copy.copy(packed.stages[3])  # a replaced stage: the plan is made again
    assert packed._plan() is not plan
    np.testing.assert_array_equal(packed.forward(x), expected)


@pytest.mark.parametrize("extreme", [2**40, -(2**40), 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, -(2**31) - 2])
def test_conv_threshold_at_the_int32_edges(extreme):
    """Thresholds outside (or at the edge of) the int32 range give constant bits, as in threshold_pack
    (the fused kernel compares in int32: threshold.int32_bounds)."""
    rng = np.random.default_rng(7)
    x = kernels.pack_signs(rng.standard_normal((2, 5, 5, 70)).astype(np.float32))
    w = kernels.pack_signs(rng.standard_normal((66, 3, 3, 70)).astype(np.float32))
    threshold = np.full(66, extreme, dtype=np.int64)
    threshold[::3] = rng.integers(-20, 20, size=22)
    direction = np.tile(np.array([1, -1], dtype=np.int8), 33)
    expected = kernels.threshold_pack(kernels.binary_conv2d(x, w, 70, 1, 1), threshold, direction)
    np.testing.assert_array_equal(kernels.binary_conv2d_threshold(x, w, threshold, direction, 70, 1, 1), expected)


# ------------------------------------------------------------------------------------------------
# dropout's {0, +-c} inputs: two sign planes that cancel at the zeros
# ------------------------------------------------------------------------------------------------


@given(m=st.integers(1, 20), n=st.integers(1, 40), k=st.integers(1, 200), scale=st.sampled_from([2.0, 1.25, 10.0]),
       keep=st.floats(0.0, 1.0), seed=SEEDS)
def test_masked_gemm_is_exact_on_dropout_outputs(device, m, n, k, scale, keep, seed):
    rng = np.random.default_rng(seed)
    x = (rng.choice(np.array([-1.0, 1.0]), size=(m, k)) * (rng.random((m, k)) < keep) * scale).astype(np.float32)
    x[x == 0] = rng.choice(np.array([0.0, -0.0], dtype=np.float32), size=int((x == 0).sum()))
    w = rng.choice(np.array([-1, 1]), size=(n, k))
    packed = kernels.pack_masked_signs(device.put(x))
    weights = device.put(kernels.pack_signs(np.concatenate([w, w], axis=1)))
    product = device.get(kernels.xnor_gemm(packed, weights, 2 * k))
    kept_signs = np.sign(x).astype(np.int64)  # 0 where dropped
    np.testing.assert_array_equal(product, 2 * kept_signs @ w.T)


def test_pack_masked_signs_checks():
    with pytest.raises(ValueError, match="NaN"):
        kernels.pack_masked_signs(np.array([[0.0, np.nan]], dtype=np.float32))
    with pytest.raises(TypeError, match="real"):
        kernels.pack_masked_signs(np.zeros((2, 3), dtype=bool))
    np.testing.assert_array_equal(kernels.pack_masked_signs(np.array([2.0, 0.0, -2.0])),
                                  kernels.pack_signs(np.array([1, 1, -1, 1, -1, -1])))
