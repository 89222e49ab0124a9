"""Check a GPU jobs file on the CPU before a GPU window: run its lines with tiny settings.

Each job line of ``experiments/gpu_jobs/*.jobs`` ("NAME COMMAND ARGS...", see ``gpu_batch.sh``) runs
as it stands, with ``--device cpu`` for ``--device gpu``, ``$RESULTS``/``$MODELS``/``$RUNS`` in a
scratch folder, and the smoke options appended (argparse keeps the last of a repeated option):
``--epochs 1 --limit N --eval-limit N --time-budget 60``, and ``--stages 1,1`` where the line trains in
two stages.  So every argument of the line is parsed and used, on ``N`` training images.  ``--seeds``
picks the job lines by their ``_s<seed>`` suffix (default: all).  Writes one record per line (exit
status, seconds, the last output line) to ``--out`` (JSON).

Usage::

    python experiments/smoke_jobs.py experiments/gpu_jobs/recipes_cnn.jobs --seeds 0 \
        --out experiments/results/smoke_jobs/recipes_cnn.json
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time

from _common import HERE, command_line, environment


def job_lines(path):
    """``[(name, command), ...]`` of a jobs file (blank lines and # comments skipped)."""
    jobs = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, command = line.partition(" ")
            jobs.append((name, command.strip()))
    return jobs


def smoke_command(command, limit):
    """The job's command with the CPU smoke settings appended."""
    words = shlex.split(command, posix=True)
    words = ["cpu" if i > 0 and words[i - 1] == "--device" and w == "gpu" else w for i, w in enumerate(words)]
    words = [sys.executable if w == "python3" else w for w in words]
    extra = ["--epochs", "1", "--limit", str(limit), "--eval-limit", str(limit), "--time-budget", "60"]
    if "--stages" in words:
        extra += ["--stages", "1,1"]
    return words + extra


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("jobs", help="a jobs file of experiments/gpu_jobs/")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="only the lines ending _s<seed>")
    parser.add_argument("--limit", type=int, default=300, help="training, validation and test images (default 300)")
    parser.add_argument("--timeout", type=float, default=170, help="seconds per line before it counts as failed")
    parser.add_argument("--out", required=True, help="the JSON record of the runs")
    args = parser.parse_args(argv)
    from lowbit.trainer import write_json_atomic

    jobs = job_lines(args.jobs)
    if args.seeds is not None:
        jobs = [(n, c) for n, c in jobs if any(n.endswith(f"_s{s}") for s in args.seeds)]
    if not jobs:
        parser.error(f"no job lines in {args.jobs} for --seeds {args.seeds}")
    scratch = tempfile.mkdtemp(prefix="smoke_jobs_")
    env = dict(os.environ, RESULTS=os.path.join(scratch, "results"), MODELS=os.path.join(scratch, "models"),
               RUNS=os.path.join(scratch, "runs"))
    records = []
    for name, command in jobs:
        expanded = os.path.expandvars(command.replace("$RESULTS", env["RESULTS"]).replace(
            "$MODELS", env["MODELS"]).replace("$RUNS", env["RUNS"]))
        words = smoke_command(expanded, args.limit)
        start = time.perf_counter()
        try:
            done = subprocess.run(words, cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True,
                                  timeout=args.timeout)
            status, output = done.returncode, (done.stdout + done.stderr).strip().splitlines()
        except subprocess.TimeoutExpired:
            status, output = "timeout", []
        seconds = time.perf_counter() - start
        last = output[-1] if output else ""
        print(f"{name}: exit {status} in {seconds:.0f} s: {last[:160]}", flush=True)
        records.append({"name": name, "exit_status": status, "seconds": round(seconds, 1), "last_line": last,
                        "job": command})
    result = {"jobs_file": os.path.relpath(os.path.abspath(args.jobs), os.path.dirname(HERE)),
              "smoke_options": " ".join(smoke_command("x", args.limit)[1:]) + " (--stages 1,1 where staged)",
              "lines": records, "failed": [r["name"] for r in records if r["exit_status"] != 0],
              "command": command_line(__file__, argv), "environment": environment()}
    write_json_atomic(args.out, result)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    from _common import run_main

    run_main(main)
