#!/bin/sh
# The runs behind experiments/results/mixed_deep_convnet/ and mixed_sfc/ (issue 26), as they were made on
# the 2-core shared machine: the chapter-8 CNN's grid split across processes that skip each other's points
# (points.jsonl), then the reports rebuilt from points.jsonl and sensitivity.json alone.  Run in order;
# the two CNN processes of each step may run side by side.
set -e
cd "$(dirname "$0")/.."
CNN="--arch deep_convnet --images 2000 --hessian-images 256 --keep-act-bits 2 4 8 --quiet"
# 1. sensitivity, Hessian, uniform grid (forward), mixed points (forward), QAT of size0.35 ...
python experiments/mixed_precision.py $CNN &
# ... beside the uniform grid in reverse order (starts computing at once; skips what the other wrote)
python experiments/mixed_precision.py $CNN --part uniform
wait
# 2. (run once sensitivity.json exists) the mixed points in reverse order, and QAT of size0.45
python experiments/mixed_precision.py $CNN --part mixed --finetune-points size0.35 size0.45
python experiments/mixed_precision.py $CNN --part mixed --finetune-points size0.45 --finetune-epochs 3
# 3. the reports from what the processes wrote
python experiments/mixed_precision.py $CNN --part report
# SFC: the float model (10 epochs on the 50,000 training images outside the held-out 10,000) is trained
# by the script when missing; results in experiments/results/sfc_e10/mixed_sfc/
SFC="--arch sfc --sfc-epochs 10 --results experiments/results/sfc_e10 --models experiments/models/sfc_e10 --runs experiments/runs/sfc_e10 --quiet"
OPENBLAS_NUM_THREADS=1 python experiments/mixed_precision.py $SFC
