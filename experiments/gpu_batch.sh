#!/usr/bin/env bash
# Many training runs side by side on one CUDA GPU under one deadline: each line of a jobs file is one
# process (small networks are launch-bound, so they share a GPU well under CUDA MPS).
#
#   bash experiments/gpu_batch.sh JOBS_FILE DEADLINE_SECONDS [OUT_DIR]
#
# JOBS_FILE holds one job per line, "NAME COMMAND ARGS..." (blank lines and # comments skipped); each
# command runs with bash from the repository root, where $RESULTS, $MODELS and $RUNS name folders under
# /tmp/gpu_batch, and its output goes to NAME.log.  A job still running DEADLINE_SECONDS after the start
# gets SIGINT (the Trainer stops with its last checkpoint and history written), then SIGKILL 15 s later;
# so give long trainings --time-budget well inside the deadline (setup, evaluation and packing come on
# top of it).  Then the script packs what came out into OUT_DIR (default $OUT or ./gpu_batch_out), at
# most 8 files, none over 15 MiB:
#   results.tar     $RESULTS (results JSON, sweep folders without their runs' model files)
#   models.tar.*    $MODELS, split into 15 MiB parts (cat them back into one tar)
#   histories.tar   every run's history.json (what an interrupted run got to)
#   logs.tar        the jobs' logs, nvidia-smi, the CUDA MPS line and the exit status of every job
# Needs CuPy, lowbit installed (the script installs the checkout with --no-deps) and MNIST in its cache
# ($LOWBIT_DATA on a machine without network).
set -uo pipefail
jobs_file=${1:?usage: gpu_batch.sh JOBS_FILE DEADLINE_SECONDS [OUT_DIR]}
deadline=${2:?usage: gpu_batch.sh JOBS_FILE DEADLINE_SECONDS [OUT_DIR]}
out=${3:-${OUT:-gpu_batch_out}}
work=/tmp/gpu_batch
mkdir -p "$out" "$work/logs"
export RESULTS=$work/results MODELS=$work/models RUNS=$work/runs
export PYTHONUNBUFFERED=1 OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1
# no network on the lent machines: build without isolation there; where that lacks wheel, isolated
{ python3 -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || python3 -m pip install -q --no-deps -e . ; } || exit 1
nvidia-smi > "$work/logs/nvidia-smi.txt" 2>&1 || true
source experiments/gpu_mps.sh "$work/logs/mps.log"
start=$(date +%s)
names=()
while read -r name command; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  names+=("$name")
  (timeout -k 15 -s INT "$deadline" bash -c "$command" > "$work/logs/$name.log" 2>&1
   echo "$name rc=$? after $(( $(date +%s) - start )) s" >> "$work/logs/status.txt") &
done < "$jobs_file"
echo "${#names[@]} jobs started: ${names[*]}"
wait
cat "$work/logs/status.txt"
cd "$work" || exit 1
tar cf "$out/results.tar" --exclude='runs/*/*.npz' results 2>/dev/null
[ -d models ] && tar cf - models | split -b 15m - "$out/models.tar."
find runs -name history.json -print0 2>/dev/null | tar cf "$out/histories.tar" --null -T -
tar cf "$out/logs.tar" logs
ls -l "$out"
