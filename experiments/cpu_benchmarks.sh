#!/usr/bin/env bash
# Every CPU speed benchmark of issue 21 (PyTorch installed: it is the baseline of most), one after another on a quiet machine, each timing its
# baseline in the same run and recording the CPU model, the BLAS kernel and the load.
#
#   bash experiments/cpu_benchmarks.sh            # about 25 minutes on 2 cores
#   bash experiments/cpu_benchmarks.sh FOLDER     # write the JSON files into FOLDER
#
# Without FOLDER the results go where docs/results.md cites them for this CPU family:
# experiments/results/ on the AMD EPYC machines (the committed figures), experiments/results/intel_xeon/
# on an Intel Xeon (the issue asks for both families; run it there when a session gets one).
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)
case "$model" in
  *Intel*) default=experiments/results/intel_xeon ;;
  *) default=experiments/results ;;
esac
out=${1:-$default}
mkdir -p "$out"
echo "CPU: $model -> $out"
run() {
  echo "+ $*"
  "$@"
}
run python3 experiments/bench_popcount.py --results "$out"
run python3 experiments/bench_kernels.py --results "$out"
run python3 experiments/bench_inference.py --repeats 7 --results "$out"
run python3 experiments/bench_float_conv.py --results "$out"
run python3 experiments/bench_training.py --retain-freed-memory --mixed16 --im2col-contender \
  --out "$out/bench_training.json"
run python3 experiments/bench_bf16_backward.py --results "$out"
