#!/usr/bin/env bash
# The binary_cnn ablation of experiments/ablation.py on one CUDA GPU: its 12 runs (4 variants x 3 seeds)
# train as 12 processes side by side (each run is launch-bound, so they share the GPU well), then one
# more call of the same script reads the finished runs back and writes the table.
#
#   bash experiments/gpu_ablation.sh EPOCHS [OUT_DIR]
#
# Needs CuPy, lowbit installed, and MNIST in its cache ($LOWBIT_DATA on a machine without network).
# Writes OUT_DIR/ablation_binary_cnn.{json,md}, OUT_DIR/models.tar (the packed best model of every run,
# experiments/models/ablation/) and OUT_DIR/histories.tar (every run's history.json); logs in OUT_DIR.
set -uo pipefail
epochs=${1:?usage: gpu_ablation.sh EPOCHS [OUT_DIR]}
out=${2:-${OUT:-gpu_ablation_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1
# CUDA MPS lets the 12 processes' kernels run side by side instead of time-sliced; used when its
# daemon starts and a CuPy call works under it, else the processes share the GPU without it.
if command -v nvidia-cuda-mps-control > /dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps_pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps_log
  mkdir -p /tmp/mps_pipe /tmp/mps_log
  if nvidia-cuda-mps-control -d && timeout 60 python3 -c "import cupy; assert int(cupy.arange(4).sum()) == 6"; then
    echo "CUDA MPS on" | tee "$out/mps.log"
  else
    echo quit | nvidia-cuda-mps-control
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    echo "CUDA MPS did not start; without it" | tee "$out/mps.log"
  fi
fi
common=(--arch binary_cnn --device gpu --epochs "$epochs" --quiet)
for variant in base decay aug aug+decay; do
  for seed in 0 1 2; do
    python3 experiments/ablation.py "${common[@]}" --seeds "$seed" --variants "$variant" \
        --results "/tmp/ablation_results/${variant}_$seed" > "/tmp/ablation_${variant}_$seed.log" 2>&1 &
  done
done
wait
tail -n 2 /tmp/ablation_*.log > "$out/runs.log"
python3 experiments/ablation.py "${common[@]}" --seeds 0 1 2 --results "$out" 2>&1 | tee "$out/combine.log"
tar cf "$out/models.tar" experiments/models/ablation
tar cf "$out/histories.tar" experiments/runs/ablation_binary_cnn_*/history.json
