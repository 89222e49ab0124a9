"""Bit-width sweeps on Dask (lowbit.dask_sweep): the same records and files as a sequential sweep,
resumption, and a worker killed mid-point.  Skipped where dask[distributed] is missing."""
import json
import os
import threading

import pytest

from lowbit import sweep
from lowbit.cli import main as cli_main

distributed = pytest.importorskip("distributed", reason="needs dask[distributed]: pip install -e \".[dist]\"")

from lowbit.dask_sweep import TIMING_FIELDS, kill_a_busy_worker, local_cluster  # noqa: E402
from test_sweep import DATA, GRID_POINTS, read_lines  # noqa: E402


def computed(records):
    """The records without the fields that say when and how long a point ran."""
    return sorted(({k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records),
                  key=lambda r: (r["method"], r["weight_bits"], r["act_bits"], r["seed"]))


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(base, name), folder)
                  for base, _, names in os.walk(folder) for name in names)


@pytest.mark.slow
def test_two_workers_write_what_one_process_writes_and_resume(tmp_path):
    import numba
    from threadpoolctl import threadpool_limits

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with threadpool_limits(1):  # the numeric configuration of the workers: one thread each
            serial = sweep.run_sweep("tfc", out_dir=str(tmp_path / "serial"), quick=True, data=DATA,
                                     progress=False)
    finally:
        numba.set_num_threads(threads)
    parallel = sweep.run_sweep("tfc", out_dir=str(tmp_path / "dask"), quick=True, data=DATA, progress=False,
                               workers=2)
    assert parallel.new_points == GRID_POINTS
    assert computed(parallel.records) == computed(serial.records)
    assert files_under(tmp_path / "dask") == files_under(tmp_path / "serial")
    again = sweep.run_sweep("tfc", out_dir=str(tmp_path / "dask"), quick=True, data=DATA, progress=False,
                            workers=2)
    assert (again.new_points, again.skipped_points) == (0, GRID_POINTS)
    assert len(read_lines(tmp_path / "dask" / "points.jsonl")) == GRID_POINTS


@pytest.mark.slow
def test_a_worker_killed_mid_point_is_retried_and_recorded_once(tmp_path):
    with local_cluster(2) as cluster:
        killed = []
        killer = threading.Thread(target=lambda: killed.append(kill_a_busy_worker(cluster.scheduler_address, 0.5)))
        killer.start()
        result = sweep.run_sweep("tfc", out_dir=str(tmp_path), quick=True, data=DATA, progress=False,
                                 scheduler=cluster.scheduler_address)
        killer.join()
    assert killed[0] is not None, "no worker was killed"
    lines = read_lines(tmp_path / "points.jsonl")
    keys = [(r["method"], r["weight_bits"], r["act_bits"], r["seed"]) for r in lines]
    assert len(keys) == len(set(keys)) == GRID_POINTS == result.new_points


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        sweep.run_sweep("tfc", out_dir=str(tmp_path), quick=True, data=DATA, workers=2, scheduler="tcp://x:1")
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        sweep.run_sweep("tfc", out_dir=str(tmp_path), quick=True, data=DATA, workers=0)
    with pytest.raises(ValueError, match="scheduler must be a Dask scheduler address"):
        sweep.run_sweep("tfc", out_dir=str(tmp_path), quick=True, data=DATA, scheduler="localhost")
    with pytest.raises(SystemExit):  # one or the other on the command line too
        cli_main(["sweep", "--arch", "tfc", "--workers", "2", "--scheduler", "tcp://x:1"])


def test_cli_passes_workers(monkeypatch, tmp_path):
    seen = {}

    def fake_run_sweep(arch, **options):
        seen.update(options)
        return sweep.SweepResult([], 0, 0, {})

    monkeypatch.setattr(sweep, "run_sweep", fake_run_sweep)
    assert cli_main(["sweep", "--arch", "tfc", "--quick", "--workers", "--out", str(tmp_path)]) == 0
    assert seen["workers"] == (os.cpu_count() or 1) and seen["scheduler"] is None
    assert cli_main(["sweep", "--arch", "tfc", "--quick", "--scheduler", "tcp://h:8786", "--out", str(tmp_path)]) == 0
    assert seen["workers"] is None and seen["scheduler"] == "tcp://h:8786"
    assert json.dumps(seen["methods"])
