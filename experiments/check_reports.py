"""Do the committed sweep reports round-trip?  ``report_sweep`` (``lowbit sweep-report``) on a copy of
every committed sweep folder, each file it writes compared byte for byte with the committed one.

A sweep folder's reports (``results.csv``, ``results.json``, ``table.md``, the plots, ``histories/``)
are rebuilt from its ``sweep.json`` and ``points.jsonl`` alone, so a change to the code that writes
them shows here as a difference.  The copy leaves out ``runs/`` and ``points/`` (not committed: with a
local ``runs/`` the histories would be rewritten from it), so the check sees what a fresh clone sees.

It prints one row per folder: files the same, files different (named), and files written that the
folder does not commit (the Pareto plots that ``lowbit mixed --sweep-dir`` added to the reports are
not committed for older sweeps).  Exit status 1 when any file differs (with ``--strict``, also when one
is written that is not committed), 0 otherwise.  Nothing under ``experiments/results`` is modified.

Three ``results.json`` files written before the reports sorted each point's keys (sweep_sfc_e100,
sweep_tfc_e100, sweep_tfc_e300) differed in key order only until they were rewritten with
``lowbit sweep-report``; see docs/sweep.md.

Usage::

    python experiments/check_reports.py                      # every folder under experiments/results
    python experiments/check_reports.py experiments/results/sweep_tfc --strict
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
#: Not committed (``.gitignore``): the training runs and the per-point packed models.
UNCOMMITTED = ("runs", "points")
#: What the reports are made from: read, never written.
INPUTS = ("sweep.json", "points.jsonl", "mixed_points.jsonl")


def sweep_folders(root):
    """The folders under ``root`` (one level) that hold a sweep (a ``sweep.json``), sorted."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"results must be a folder, got {root!r} (no such folder)")
    return sorted(os.path.join(root, name) for name in os.listdir(root)
                  if os.path.isfile(os.path.join(root, name, "sweep.json")))


def _files(root):
    """Relative paths of the files under ``root``."""
    found = set()
    for base, folders, names in os.walk(root):
        folders[:] = [f for f in folders if os.path.relpath(os.path.join(base, f), root) not in UNCOMMITTED]
        found.update(os.path.relpath(os.path.join(base, name), root) for name in names)
    return found


def _same(path_a, path_b):
    with open(path_a, "rb") as fa, open(path_b, "rb") as fb:
        return fa.read() == fb.read()


def check_folder(folder, scratch):
    """Rewrite a copy of ``folder``'s reports in ``scratch``; returns ``{"same", "different",
    "not_committed"}`` (sorted relative paths)."""
    from lowbit.sweep import report_sweep

    copy = os.path.join(scratch, os.path.basename(os.path.normpath(folder)))
    shutil.copytree(folder, copy, ignore=lambda base, names: [
        n for n in names if os.path.relpath(os.path.join(base, n), folder) in UNCOMMITTED])
    committed = _files(folder)
    report_sweep(copy)
    written = _files(copy)
    outcome = {"same": [], "different": [], "not_committed": []}
    for relative in sorted(written - set(INPUTS)):
        if relative not in committed:
            outcome["not_committed"].append(relative)
        elif _same(os.path.join(folder, relative), os.path.join(copy, relative)):
            outcome["same"].append(relative)
        else:
            outcome["different"].append(relative)
    return outcome


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="*",
                        help="sweep folders to check (default: every one under --results)")
    parser.add_argument("--results", default=os.path.join(HERE, "results"),
                        help="where the committed sweep folders are (default experiments/results)")
    parser.add_argument("--strict", action="store_true",
                        help="also fail when a report is written that the folder does not commit")
    args = parser.parse_args(argv)
    folders = args.folders or sweep_folders(args.results)
    for folder in folders:
        if not os.path.isfile(os.path.join(folder, "sweep.json")):
            parser.error(f"folders must each hold a sweep (a sweep.json); {folder} does not")
    failed = []
    print(f"{'folder':<36} {'same':>5} {'differ':>6}  different / written but not committed")
    with tempfile.TemporaryDirectory(prefix="lowbit-check-reports-") as scratch:
        for folder in folders:
            outcome = check_folder(folder, scratch)
            notes = ", ".join(outcome["different"])
            if outcome["not_committed"]:
                notes += (" / " if notes else "/ ") + ", ".join(outcome["not_committed"])
            print(f"{os.path.basename(os.path.normpath(folder)):<36} {len(outcome['same']):>5} "
                  f"{len(outcome['different']):>6}  {notes}")
            if outcome["different"] or (args.strict and outcome["not_committed"]):
                failed.append(folder)
    print(f"{len(folders) - len(failed)} of {len(folders)} folders round-trip"
          + (f"; differing: {', '.join(os.path.basename(os.path.normpath(f)) for f in failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
