#!/usr/bin/env bash
# One-shot GPU check, for a machine with an NVIDIA GPU, CuPy (cupy-cuda12x or cupy-cuda13x), numba,
# pytest and hypothesis already installed and no network (the lent H100/H200 machines).
#
#   bash experiments/gpu_check.sh [OUT_DIR]
#
# 1. installs lowbit without touching dependencies (no network needed);
# 2. runs every test that exercises CuPy: the kernels' GPU properties (CPU and GPU paths equal bit for
#    bit), the quantized layers, packed models and the numpy/CuPy backend;
# 3. runs the kernel benchmark, whose GPU part times the 8192^3 XNOR GEMM against cuBLAS float32 and
#    float16 (cupy.matmul) and writes experiments/results/bench_kernels_gpu.json.
# Everything it prints also goes to OUT_DIR/gpu_check.log (default: $OUT or ./gpu_check_out).
set -uo pipefail
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
log="$out/gpu_check.log"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
  python3 -c "import cupy, lowbit.backend as b; print('cupy', cupy.__version__, 'gpu_available', b.gpu_available())"
  export LOWBIT_HYPOTHESIS_PROFILE=ci
  python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels_cuda.py tests/test_kernels_cuda_compile.py \
      tests/test_backend_gpu.py tests/test_quant_layers.py tests/test_quantizers.py tests/test_convert.py
  tests_rc=$?
  python3 experiments/bench_kernels.py --max-load 100 --output experiments/results/bench_kernels_gpu.json
  bench_rc=$?
  cp experiments/results/bench_kernels_gpu.json "$out/" 2>/dev/null || true
  echo "tests rc=$tests_rc bench rc=$bench_rc"
} 2>&1 | tee "$log"
