"""Time the README's main job and command-line tour: every example command, run in order, wall-clock
seconds each.

The README quotes these times (the main job's, and the *Command-line tour*'s "how long it takes
here"); this script is where they come from.  Every command writes under ``--work`` (default ``runs/cli_tour``, git-ignored),
never into the committed results.  The examples run one after another because some use the files of
earlier ones (``convert`` packs the model ``train`` wrote).

Usage::

    python3 experiments/time_cli_tour.py            # about 4 minutes; writes runs/results/cli_tour.json

Writes the command lines, their exit codes and seconds, the CPU model and the load average before
and after.  A command that fails is recorded with its exit code and the last lines of its stderr,
and the script exits non-zero.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import time

import _common

from lowbit.trainer import write_json_atomic

MODELS = os.path.join(_common.HERE, "models")


def tour(work):
    """The README's examples, as argument lists (``lowbit`` is the installed console script)."""
    main_model = os.path.join(MODELS, "deep_convnet_mnist.npz")
    sfc = os.path.join(MODELS, "sfc_e10", "sfc_float.npz")
    return [
        # the README's main job (its third command), into the work folder
        ["lowbit", "sweep", "--arch", "deep_convnet", "--methods", "ptq", "--pretrained", main_model,
         "--weight-bits", "1", "2", "4", "8", "32", "--activation-bits", "2", "4", "8", "32",
         "--out", f"{work}/sweep_deep_convnet", "--quiet"],
        ["lowbit", "--version"],
        ["lowbit", "train", "--model", "tfc", "--epochs", "5", "--out", f"{work}/tfc", "--quiet"],
        ["lowbit", "eval", main_model, "--quiet"],
        ["lowbit", "quantize", main_model, "--weight-bits", "4", "--activation-bits", "4", "-o", f"{work}/w4a4.npz",
         "--quiet"],
        ["lowbit", "convert", f"{work}/tfc/model.npz", "-o", f"{work}/tfc_packed.npz", "--quiet"],
        ["lowbit", "summary", os.path.join(MODELS, "bnn_cnn.npz")],
        ["lowbit", "export", main_model, "-o", f"{work}/deep_convnet.onnx"],
        ["lowbit", "import", f"{work}/deep_convnet.onnx", "-o", f"{work}/deep_convnet_imported.npz"],
        ["lowbit", "sweep", "--arch", "tfc", "--quick", "--out", f"{work}/sweep_tfc_quick", "--quiet"],
        ["lowbit", "sweep-report", f"{work}/sweep_tfc_quick"],
        ["lowbit", "sensitivity", sfc, "--out", f"{work}/sfc_sensitivity", "--images", "2000", "--quiet"],
        ["lowbit", "mixed", sfc, "--average-bits", "4", "--sensitivity", f"{work}/sfc_sensitivity/sensitivity.csv",
         "-o", f"{work}/sfc_mixed.npz", "--quiet"],
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=os.path.join("runs", "cli_tour"),
                        help="folder the commands write into, emptied first so that no command resumes "
                             "an earlier run's work (default runs/cli_tour)")
    parser.add_argument("--results", default=_common.default_output("results"),
                        help=_common.output_help("results", "folder of cli_tour.json"))
    args = parser.parse_args(argv)
    if shutil.which("lowbit") is None:
        parser.error("the lowbit command is not on PATH: install the project (pip install -e .) or "
                     "activate its environment")
    # A sweep resumes its folder: timing it again over finished points would measure nothing.
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    rows, failed = [], False
    load_before = os.getloadavg()
    for command in tour(args.work):
        t0 = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - t0
        row = {"command": " ".join(shlex.quote(c) for c in command), "exit_code": proc.returncode,
               "seconds": round(seconds, 2)}
        if proc.returncode != 0:
            failed = True
            row["stderr_tail"] = proc.stderr.strip().splitlines()[-5:]
        rows.append(row)
        print(f"{seconds:8.1f} s  rc={proc.returncode}  {row['command']}", flush=True)
    result = {"command": _common.command_line(__file__, argv), "cpu": _common.cpu_model(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "environment": _common.environment(), "commands": rows}
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, "cli_tour.json")
    write_json_atomic(path, result)
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    _common.run_main(main)
