#!/usr/bin/env bash
# One-shot GPU check, for a machine with an NVIDIA GPU, CuPy (cupy-cuda12x or cupy-cuda13x), numba,
# pytest and hypothesis already installed and no network (the lent H100/H200 machines).
#
#   bash experiments/gpu_check.sh [OUT_DIR] [--probe]
#
# 1. installs lowbit without touching dependencies (no network needed);
# 2. runs the kernel benchmark's GPU part first, on an idle GPU (bench_kernels.py --gpu-only: the
#    XNOR GEMM at 1024/4096/8192 against cuBLAS float32 and float16, the shared-memory stage depth,
#    pack_signs GB/s), writing OUT_DIR/bench_kernels_gpu.json;
# 3. runs every test that exercises CuPy: the kernels' GPU properties (CPU and GPU paths equal bit for
#    bit), the quantized layers, packed models and the numpy/CuPy backend;
# 4. with --probe, and MNIST in $LOWBIT_DATA (no network there: carry mnist.npz), times one epoch of
#    training on the GPU on 10,000 images (Bi-Real ResNet 32-64-128 and the chapter-8 CNN), beside
#    the tests, so the sizes of longer GPU trainings can be planned from it.
# Everything it prints also goes to OUT_DIR/gpu_check.log (default: $OUT or ./gpu_check_out).
set -uo pipefail
out=${1:-${OUT:-gpu_check_out}}
probe=${2:-}
mkdir -p "$out"
log="$out/gpu_check.log"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
  python3 -c "import cupy, numpy, lowbit.backend as b; print('python', __import__('sys').version.split()[0], 'numpy', numpy.__version__, 'cupy', cupy.__version__, 'gpu_available', b.gpu_available())"
  python3 experiments/bench_kernels.py --gpu-only --output "$out/bench_kernels_gpu.json"
  bench_rc=$?
  if [ "$probe" = "--probe" ]; then
    (python3 experiments/bireal_mnist.py --device gpu --epochs 1 --limit 10000 --widths 32 64 128 \
        --variants shortcut --quiet --runs /tmp/probe_runs --results "$out/probe" --models /tmp/probe_models \
        > "$out/probe_bireal.log" 2>&1; echo "bireal probe rc=$?" >> "$out/probe_bireal.log") &
    (python3 experiments/ablation.py --arch deep_convnet --device gpu --epochs 1 --limit 10000 --seeds 0 \
        --variants base --quiet --runs /tmp/probe_runs --results "$out/probe" --models /tmp/probe_models \
        > "$out/probe_convnet.log" 2>&1; echo "convnet probe rc=$?" >> "$out/probe_convnet.log") &
  fi
  export LOWBIT_HYPOTHESIS_PROFILE=ci
  python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels_cuda.py tests/test_kernels_cuda_compile.py \
      tests/test_backend_gpu.py tests/test_quant_layers.py tests/test_quantizers.py tests/test_convert.py
  tests_rc=$?
  wait
  echo "tests rc=$tests_rc bench rc=$bench_rc"
} 2>&1 | tee "$log"
