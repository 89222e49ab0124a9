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
source experiments/gpu_mps.sh "$out/mps.log"
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
