"""Bit-width sweeps on Dask distributed: one task per point, results written by the client.

``run_sweep(..., workers=N)`` (``lowbit sweep --workers N``) starts an embedded
:class:`distributed.LocalCluster` of N single-threaded worker processes (one per core by default);
``run_sweep(..., scheduler="tcp://host:8786")`` (``--scheduler``) sends the points to an existing
Dask cluster, however it was started (``dask scheduler`` and ``dask worker`` by hand, dask-jobqueue
on SLURM/PBS, Kubernetes).  Every worker needs lowbit installed; none needs the client's files.

How a point runs
----------------
Each task is one point of the grid: on its worker it calls :func:`lowbit.sweep.run_sweep` for that
single point in a temporary folder, with the client's settings (so the same settings key), and
returns the point's record and the bytes of the files the sequential sweep would have left in
``out_dir``: the packed model (``points/``) and the training run's ``result.json`` and ``best.npz``
(``runs/``).  The client writes these files and then appends the record to ``points.jsonl``, so the
folder is the one a sequential sweep writes, and the reports are written from it at the end.

The points that start from a seed's float model (PTQ, the 32/32 baseline, ``qat_init="ptq"``)
depend on one *leader* task per seed that trains it; the others receive its ``runs/float_seed<s>``
files as an argument, so the float model is trained once.  A float model already in ``out_dir``
(from an earlier, interrupted call) is sent instead.

Faults
------
A worker that dies mid-point (killed, out of memory, its machine lost): the scheduler gives the
point to another worker, which trains it from the start; the client records each point once, the
first time a result arrives.  The client interrupted (Ctrl-C, its machine lost): the points already
in ``points.jsonl`` are never retrained when the same command is run again.  GPU workers: with
``device="gpu"`` every task asks for the Dask resource ``GPU=1`` (start workers with
``dask worker tcp://host:8786 --nthreads 1 --resources GPU=1``; the embedded cluster declares one
per worker).
"""
from __future__ import annotations

import os
import tempfile

__all__ = ["run_points", "point_task", "local_cluster", "kill_a_busy_worker"]

#: The record fields that depend on when and how long a point ran, not on what it computed.
TIMING_FIELDS = ("wall_seconds", "train_seconds", "finished_at")


def _dask():
    try:
        import distributed
    except ImportError as exc:
        raise ImportError("sweeps on Dask need dask[distributed]: pip install -e \".[dist]\"") from exc
    return distributed


def local_cluster(workers, threads=1, device="cpu"):
    """An embedded :class:`distributed.LocalCluster`: ``workers`` processes of ``threads`` threads,
    each with its numeric libraries (BLAS, Numba) limited to ``threads`` threads."""
    distributed = _dask()
    limits = {name: str(threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                               "NUMBA_NUM_THREADS")}
    return distributed.LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                                    dashboard_address=":0", env=limits,
                                    resources={"GPU": 1} if device == "gpu" else None)


def _read_tree(root, folder, skip=()):
    """``{relative path: bytes}`` of the files under ``root/folder`` (none when it is absent)."""
    files = {}
    top = os.path.join(root, folder)
    for base, _, names in os.walk(top):
        for name in names:
            path = os.path.join(base, name)
            relative = os.path.relpath(path, root)
            if relative not in skip and not name.startswith(".tmp-"):
                with open(path, "rb") as fh:
                    files[relative] = fh.read()
    return files


def point_task(arch, point, call, data, given, pretrained, threads):
    """Run one point of a sweep on a worker; returns ``{"record", "files"}``.

    ``given`` holds files (relative path: bytes) to place in the temporary sweep folder first (a
    float model trained by the seed's leader); ``pretrained`` is ``(file name, bytes)`` or None;
    ``threads`` limits BLAS and Numba (None: leave the worker's settings).
    """
    from contextlib import nullcontext

    from .sweep import run_sweep

    if isinstance(given, dict) and "files" in given:  # the leader's result
        given = {path: payload for path, payload in given["files"].items() if path.startswith("runs" + os.sep)}
    method, weight_bits, activation_bits, seed = point
    limit = nullcontext()
    if threads:
        import numba
        from threadpoolctl import threadpool_limits

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        limit = threadpool_limits(threads)
    with tempfile.TemporaryDirectory(prefix="lowbit-point-") as scratch, limit:
        out_dir = os.path.join(scratch, "sweep")
        for relative, payload in (given or {}).items():
            os.makedirs(os.path.dirname(os.path.join(out_dir, relative)), exist_ok=True)
            with open(os.path.join(out_dir, relative), "wb") as fh:
                fh.write(payload)
        options = dict(call)
        if pretrained is not None:
            name, payload = pretrained
            options["pretrained"] = os.path.join(scratch, "pretrained", name)
            os.makedirs(os.path.dirname(options["pretrained"]))
            with open(options["pretrained"], "wb") as fh:
                fh.write(payload)
        result = run_sweep(arch, weight_bits=(weight_bits,), activation_bits=(activation_bits,), seeds=(seed,),
                           out_dir=out_dir, data=data, progress=False, reports=False,
                           only_points=[tuple(point)], **options)
        (record,) = result.records
        files = _read_tree(out_dir, "points")
        if pretrained is None or not record["run_dir"].startswith(".."):
            files.update(_read_tree(out_dir, record["run_dir"], skip=set(given or ())))
        return {"record": record, "files": files}


def _float_run(out_dir, seed, settings, float_epochs):
    """The files of ``out_dir/runs/float_seed<seed>`` when they hold that float model, finished."""
    import json

    folder = os.path.join("runs", f"float_seed{seed}")
    done = os.path.join(out_dir, folder, "result.json")
    if not (os.path.exists(done) and os.path.exists(os.path.join(out_dir, folder, "best.npz"))):
        return None
    with open(done) as fh:
        info = json.load(fh)
    if info.get("epochs") != float_epochs or info.get("settings_key") != settings["key"]:
        return None
    files = {}
    for name in ("result.json", "best.npz"):
        with open(os.path.join(out_dir, folder, name), "rb") as fh:
            files[os.path.join(folder, name)] = fh.read()
    return files


def _submit_points(submit, todo, settings, out_dir, pretrained, uses_float, float_epochs):
    """Submit every point of ``todo`` (``submit(point, given)``); a seed's points that start from its
    float model wait for the one that trains it (its *leader*), or receive a finished float run
    found in ``out_dir``.  Returns the futures."""
    leaders = {}
    futures = []
    for point in sorted(todo, key=lambda p: (not (p[0] == "ptq" and p[1] == p[2] == 32), p)):
        seed = point[3]
        if pretrained is None and uses_float(point):
            if seed not in leaders:
                local = _float_run(out_dir, seed, settings, float_epochs)
                if local is not None:
                    leaders[seed] = local
                else:  # this point trains the float model; the seed's others wait for it
                    leaders[seed] = submit(point, None)
                    futures.append(leaders[seed])
                    continue
            futures.append(submit(point, leaders[seed]))
        else:
            futures.append(submit(point, None))
    return futures


def _record_result(result, settings, out_dir, pretrained, recorded):
    """Write a finished task's files and append its record, unless the point is in ``recorded`` (a
    retried task delivers it twice); returns the record, or None when it was already there."""
    from .io import write_bytes_atomic
    from .sweep import append_point, point_key

    record = result["record"]
    if record.get("settings_key") != settings["key"]:
        raise RuntimeError(f"a worker computed settings key {record.get('settings_key')!r}, the "
                           f"client {settings['key']!r}: the workers run another lowbit version")
    key = point_key(record)
    if key in recorded:
        return None
    if pretrained is not None and record["run_dir"].startswith(".."):
        record["run_dir"] = os.path.relpath(os.path.dirname(os.path.abspath(pretrained)), out_dir)
    for relative, payload in sorted(result["files"].items()):
        write_bytes_atomic(os.path.join(out_dir, relative), payload)
    append_point(os.path.join(out_dir, "points.jsonl"), record)
    recorded.add(key)
    return record


def run_points(arch, todo, call, settings, out_dir, data, pretrained, uses_float, workers=None,
               scheduler=None, progress=True):
    """Compute the points ``todo`` on Dask and record each in ``out_dir`` once; returns how many.

    ``call`` are :func:`lowbit.sweep.run_sweep`'s keyword arguments that make ``settings``
    (:meth:`lowbit.sweep.SweepSettings.point_options`); ``uses_float(point)`` says whether a point
    starts from its seed's trained float model.
    """
    from .progress import tqdm
    from .sweep import load_points, point_key

    distributed = _dask()
    if scheduler is not None:
        client, cluster, threads = distributed.Client(scheduler), None, None
    else:
        cluster = local_cluster(workers, 1, call.get("device", "cpu"))
        client, threads = distributed.Client(cluster), 1
    pretrained_file = None
    if pretrained is not None:
        with open(pretrained, "rb") as fh:
            pretrained_file = (os.path.basename(pretrained), fh.read())
    resources = {"GPU": 1} if call.get("device") == "gpu" else None
    bar = tqdm(total=len(todo), desc=f"sweep {arch} on dask", unit="point", disable=not progress)
    try:
        data_future = client.scatter(data, broadcast=True)

        def submit(point, given):
            key = f"lowbit-point-{settings['key']}-{point[0]}-w{point[1]}a{point[2]}-s{point[3]}"
            return client.submit(point_task, arch, point, call, data_future, given, pretrained_file, threads,
                                 key=key, resources=resources, pure=False)

        futures = _submit_points(submit, todo, settings, out_dir, pretrained, uses_float,
                                 call["float_epochs"])
        recorded = {point_key(r) for r in load_points(os.path.join(out_dir, "points.jsonl"), settings["key"])}
        new = 0
        for future in distributed.as_completed(futures):
            # a task's exception is raised by result(), with its traceback
            record = _record_result(future.result(), settings, out_dir, pretrained, recorded)
            if record is None:
                continue
            new += 1
            bar.update(1)
            if progress:
                tqdm.write(f"{record['method']}_w{record['weight_bits']}a{record['act_bits']}_seed"
                           f"{record['seed']}: test accuracy {record['accuracy']:.2%}")
        return new
    finally:
        bar.close()
        client.close()
        if cluster is not None:
            cluster.close()


def kill_a_busy_worker(scheduler, after=2.0, timeout=600.0):
    """A fault drill: once a worker of ``scheduler`` is running a point, wait ``after`` seconds and
    SIGKILL its process (a nanny restarts it).  The worker must run on this machine.  Returns
    ``{"worker", "pid", "points_running", "seconds_after_start"}``, or None when no worker got busy
    within ``timeout`` seconds."""
    import signal
    import time

    distributed = _dask()
    with distributed.Client(scheduler) as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = {worker: tasks for worker, tasks in client.processing().items() if tasks}
            if busy:
                worker = sorted(busy)[0]
                time.sleep(after)
                running = sorted(client.processing().get(worker, ()))
                pid = client.run(os.getpid, workers=[worker])[worker]
                os.kill(pid, signal.SIGKILL)
                return {"worker": worker, "pid": pid, "points_running": running, "seconds_after_start": after}
            time.sleep(0.05)
    return None
