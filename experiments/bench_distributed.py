"""Distributed lowbit: a bit-width sweep on Dask, data-parallel training on MPI, a fault run, and the
scaling model of docs/distributed.md (issue 24).

Sections (``--only`` runs some of them; each replaces its part of the JSON):

``sweep``
    A sweep of 8 short QAT points (``--sweep-arch``, default SFC; W {1, 2} x A {1, 2} x seeds {0, 1},
    ``--sweep-epochs`` epochs on ``--sweep-limit`` training images, about 10 s each on one core) on an embedded Dask cluster of 1 and of 2 single-threaded
    workers, alternated ``--sweep-repeats`` times, each in a fresh folder.  Figures: wall-clock seconds
    of each (cluster start included, and the points alone), the speed-up (goal >= 1.8 on 2 cores), and
    whether the two runs wrote identical records (every field but the timings).
``train``
    Data-parallel training with ``mpiexec -n 1`` and ``-n 2`` (one thread per rank) of deep_convnet and
    bnn_mlp 3x1024, global batch ``--batch``, ``--steps`` timed steps after 2 warm-up steps, alternated
    ``--train-repeats`` times: images per second, the scaling efficiency (speed-up / ranks), and the
    allreduce's seconds and bytes per step (the seconds include waiting for the slower rank).  Then an
    allreduce alone between 2 ranks over buffer sizes from 4 KiB to 64 MiB (latency and bandwidth).
``fault``
    The ``sweep`` grid on 2 workers, one of which is killed (SIGKILL) while it runs a point: every
    point must be recorded once, with the records of the undisturbed run.

``--report`` reads the JSON and writes the scaling model for 8 and 64 machines (ring allreduce:
``2 (N - 1) / N`` of the gradient bytes per rank, ``2 (N - 1)`` latencies) into
``bench_distributed_model.md`` beside it and, when ``--results`` is ``experiments/results``, into
docs/distributed.md between its ``scaling-model`` markers; it runs after the sections, or alone (``--report`` with ``--only`` none).

Writes ``runs/results/bench_distributed.json`` (``bench_distributed_small.json`` with ``--small``,
which leaves the docs alone).  The machine's CPU model, load average, BLAS
kernel and the variables unset for the workers are recorded; figures from a loaded machine say so
there (``loadavg``).

Usage::

    python experiments/bench_distributed.py --report             # everything, about 6 minutes on 2 quiet cores
    python experiments/bench_distributed.py --small              # a check of the script (about 2 minutes)
    python experiments/bench_distributed.py --only none --report # the scaling model from the JSON
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from _common import COMMITTED, blas_info, command_line, cpu_model, default_output, environment, output_help

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SECTIONS = ("sweep", "train", "fault")
NETWORKS = ("deep_convnet", "bnn_mlp_3x1024")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
MARK_START = "<!-- scaling-model:start (written by experiments/bench_distributed.py --report) -->"
MARK_END = "<!-- scaling-model:end -->"


# -- provenance ------------------------------------------------------------------------------------


def child_environment(threads):
    """The environment of the workers and ranks: ``threads`` threads each, OpenBLAS tuning unset."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env.update({name: str(threads) for name in THREAD_VARIABLES})
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


# -- the sweep sections ----------------------------------------------------------------------------
def sweep_config(args):
    return dict(arch=args.sweep_arch, weight_bits=(1, 2), activation_bits=(1, 2), methods=("qat",), seeds=(0, 1),
                epochs=args.sweep_epochs,
                train_limit=args.sweep_limit, val_size=1000, test_limit=args.sweep_test_limit)


def run_sweep_timed(data, args, out_dir, **where):
    """One sweep; returns (seconds, records)."""
    from lowbit.sweep import run_sweep

    start = time.perf_counter()
    result = run_sweep(out_dir=out_dir, data=data, progress=False, reports=False, **sweep_config(args),
                       **where)
    return time.perf_counter() - start, result.records


def computed(records):
    from lowbit.dask_sweep import TIMING_FIELDS

    return sorted(({k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records),
                  key=lambda r: (r["method"], r["weight_bits"], r["act_bits"], r["seed"]))


def points_seconds(records):
    """From the first point's start to the last point's end, by the records' clocks (the cluster's
    start and the scatter of the data left out)."""
    from datetime import datetime

    ends = [datetime.fromisoformat(r["finished_at"]).timestamp() for r in records]
    starts = [end - r["wall_seconds"] for end, r in zip(ends, records)]
    return max(ends) - min(starts)


def section_sweep(data, args, scratch):
    runs = {1: [], 2: []}
    records = {}
    for repeat in range(args.sweep_repeats):
        for workers in (1, 2):
            out = os.path.join(scratch, f"sweep_w{workers}_r{repeat}")
            loadavg = os.getloadavg()
            seconds, recs = run_sweep_timed(data, args, out, workers=workers)
            runs[workers].append({"seconds": seconds, "points_seconds": points_seconds(recs),
                                  "loadavg_before": loadavg})
            records.setdefault(workers, computed(recs))
            print(f"sweep, {workers} worker(s), repeat {repeat + 1}: {seconds:.1f} s", flush=True)
    median = {w: statistics.median(r["seconds"] for r in runs[w]) for w in runs}
    identical = records[1] == records[2]
    return {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in sweep_config(args).items()},
            "points": len(records[1]), "runs": {str(w): runs[w] for w in runs},
            "median_seconds": {str(w): median[w] for w in median},
            "speedup": median[1] / median[2],
            "speedup_points_only": statistics.median(r["points_seconds"] for r in runs[1])
            / statistics.median(r["points_seconds"] for r in runs[2]),
            "identical_records": identical, "reference_records": records[2]}


def section_fault(data, args, scratch, reference):
    from lowbit.dask_sweep import kill_a_busy_worker, local_cluster

    out = os.path.join(scratch, "fault")
    with local_cluster(2) as cluster:
        killed = []
        killer = threading.Thread(target=lambda: killed.append(kill_a_busy_worker(cluster.scheduler_address,
                                                                                   args.kill_after)))
        killer.start()
        seconds, records = run_sweep_timed(data, args, out, scheduler=cluster.scheduler_address)
        killer.join()
    with open(os.path.join(out, "points.jsonl")) as fh:
        lines = [json.loads(line) for line in fh if line.strip()]
    keys = [(r["method"], r["weight_bits"], r["act_bits"], r["seed"]) for r in lines]
    killed = [k for k in killed if k]
    result = {"seconds": seconds, "killed": killed, "lines_in_points_jsonl": len(lines),
              "distinct_points": len(set(keys)), "every_point_once": len(keys) == len(set(keys)) == len(records)}
    if reference is not None:
        result["records_equal_the_undisturbed_run"] = computed(records) == reference
    print(f"fault run: killed {killed}, {len(lines)} lines, {len(set(keys))} points", flush=True)
    return result


# -- the MPI sections (this script under mpiexec) --------------------------------------------------
def build_network(name):
    from lowbit import zoo

    if name == "deep_convnet":
        return zoo.deep_convnet(seed=0), "cross_entropy"
    if name == "bnn_mlp_3x1024":
        return zoo.bnn_mlp(seed=0, hidden=(1024, 1024, 1024)), "squared_hinge"
    raise ValueError(f"network must be one of {NETWORKS}, got {name!r}")


def rank_train(args):
    """Under mpiexec: time ``args.steps`` data-parallel steps of ``args.rank_train``; rank 0 prints JSON."""
    from lowbit.data import float_images, load_mnist
    from lowbit.distributed import get_comm
    from lowbit.optimizers import Adam
    from lowbit.trainer import Trainer

    comm = get_comm("auto", timeout=300)
    model, loss = build_network(args.rank_train)
    mnist = load_mnist(progress=False)
    n = args.batch * args.steps
    x, y = float_images(mnist.x_train[:n]), np.asarray(mnist.y_train[:n])
    trainer = Trainer(model, loss, Adam(0.001), epochs=1, batch_size=args.batch, seed=0, progress=False,
                      comm=comm)
    trainer.train_epoch(x[:2 * args.batch], y[:2 * args.batch], 0.001)  # warm-up: compiles, allocates
    comm.barrier()
    comm.reset_stats()
    start = time.perf_counter()
    trainer.train_epoch(x, y, 0.001)
    seconds = time.perf_counter() - start
    stats = comm.stats()
    seconds = comm.allreduce_values([seconds])[0] / comm.size  # the ranks' mean
    if comm.is_root:
        steps = args.steps
        gradient_bytes = int(sum(getattr(layer, attr).size for _, layer, attr in model.named_arrays(buffers=False))) * 4
        print("RESULT " + json.dumps({
            "network": args.rank_train, "ranks": comm.size, "global_batch": args.batch, "steps": steps,
            "seconds": seconds, "images_per_second": steps * args.batch / seconds,
            "seconds_per_step": seconds / steps,
            # the gradient allreduces of the timed steps (the epoch's one small loss/accuracy sum aside)
            "allreduce_seconds_per_step": stats["allreduce_seconds"] / steps if comm.size > 1 else 0.0,
            "allreduce_bytes_per_step": stats["allreduce_bytes"] / steps if comm.size > 1 else 0,
            "gradient_bytes": gradient_bytes, "parameters": gradient_bytes // 4, "blas": blas_info(),
        }), flush=True)


def rank_allreduce(args):
    """Under mpiexec: median seconds of an allreduce of each buffer size; rank 0 prints JSON."""
    from lowbit.distributed import MPIComm

    comm = MPIComm(timeout=120)
    rows = []
    for size in (1 << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22, 1 << 24):  # float32 elements: 4 KiB .. 64 MiB
        buffer = np.ones(size, dtype=np.float32)
        times = []
        for _ in range(args.allreduce_repeats):
            comm.barrier()
            start = time.perf_counter()
            comm.allreduce_sum(buffer)
            times.append(time.perf_counter() - start)
        rows.append({"bytes": size * 4, "seconds": statistics.median(times)})
    if comm.is_root:
        print("RESULT " + json.dumps({"ranks": comm.size, "sizes": rows}), flush=True)


def mpi_run(ranks, arguments, args, timeout=600):
    from lowbit.distributed import find_mpiexec

    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise RuntimeError("no mpiexec: pip install -e \".[dist]\" (the mpich wheel puts it in the venv's bin)")
    command = [mpiexec, "-n", str(ranks), sys.executable, os.path.abspath(__file__)] + arguments
    done = subprocess.run(command, capture_output=True, text=True, env=child_environment(args.threads),
                          timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def section_train(args):
    networks = {}
    for network in NETWORKS:
        runs = {1: [], 2: []}
        for repeat in range(args.train_repeats):
            for ranks in (1, 2):
                result = mpi_run(ranks, ["--rank-train", network, "--steps", str(args.steps),
                                         "--batch", str(args.batch)], args)
                result["loadavg_after"] = os.getloadavg()
                runs[ranks].append(result)
                print(f"{network}, {ranks} rank(s): {result['images_per_second']:.0f} images/s", flush=True)
        ips = {r: statistics.median(x["images_per_second"] for x in runs[r]) for r in runs}
        two = runs[2]
        networks[network] = {
            "parameters": two[0]["parameters"], "gradient_bytes": two[0]["gradient_bytes"],
            "images_per_second": {str(r): ips[r] for r in ips},
            "seconds_per_step": {str(r): statistics.median(x["seconds_per_step"] for x in runs[r]) for r in runs},
            "speedup": ips[2] / ips[1], "efficiency": ips[2] / ips[1] / 2,
            "allreduce_seconds_per_step": statistics.median(x["allreduce_seconds_per_step"] for x in two),
            "allreduce_bytes_per_step": two[0]["allreduce_bytes_per_step"],
            "runs": {str(r): runs[r] for r in runs}, "blas": two[0]["blas"]}
    allreduce = mpi_run(2, ["--rank-allreduce", "--allreduce-repeats", str(args.allreduce_repeats)], args)
    sizes = allreduce["sizes"]
    large = [s for s in sizes if s["bytes"] >= 1 << 20]
    slope = float(np.polyfit([s["bytes"] for s in large], [s["seconds"] for s in large], 1)[0])
    allreduce["fit"] = {"latency_seconds": sizes[0]["seconds"], "seconds_per_byte": slope,
                        "bandwidth_bytes_per_second": 1.0 / slope if slope > 0 else None,
                        "note": "latency: the 4 KiB allreduce; seconds per byte: least squares over the sizes "
                                "from 1 MiB; 2 ranks on one machine (shared memory)"}
    return {"threads_per_rank": args.threads, "batch": args.batch, "steps": args.steps,
            "networks": networks, "allreduce_2_ranks": allreduce}


# -- the scaling model -----------------------------------------------------------------------------
def ring_seconds(ranks, nbytes, latency, bandwidth):
    """A ring allreduce of ``nbytes`` over ``ranks``: 2 (N - 1) messages, 2 (N - 1) / N of the bytes sent per rank."""
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) * latency + 2 * (ranks - 1) / ranks * nbytes / bandwidth


def scaling_model(document, machines=(1, 2, 8, 64), networks_gbps=(10.0, 100.0), latency=50e-6):
    """Per network, per link speed: the step time, speed-up and efficiency on ``machines`` machines,
    with the global batch fixed (strong scaling) and with each machine's batch fixed (weak scaling)."""
    train = document["train"]
    batch = train["batch"]
    measured = train["allreduce_2_ranks"]["fit"]
    links = [{"name": f"{gbps:g} Gbit/s Ethernet", "bandwidth": gbps * 1e9 / 8, "latency": latency}
             for gbps in networks_gbps]
    links.append({"name": "this machine's shared memory (measured, 2 ranks)",
                  "bandwidth": measured["bandwidth_bytes_per_second"], "latency": measured["latency_seconds"]})
    model = {}
    for name, net in train["networks"].items():
        per_image = net["seconds_per_step"]["1"] / batch  # one thread per machine, as measured
        nbytes = net["gradient_bytes"]
        rows = []
        for link in links:
            for n in machines:
                allreduce = ring_seconds(n, nbytes, link["latency"], link["bandwidth"])
                strong = per_image * batch / n + allreduce
                weak = per_image * batch + allreduce
                rows.append({"link": link["name"], "machines": n, "allreduce_seconds": allreduce,
                             "strong_step_seconds": strong,
                             "strong_speedup": per_image * batch / strong,
                             "strong_efficiency": per_image * batch / strong / n,
                             "weak_efficiency": per_image * batch / weak,
                             "weak_images_per_second": n * batch / weak})
        limits = {}
        for link in links:
            # strong scaling: the step time b * t / N + 2 (N - 1) / N * bytes / bw + 2 (N - 1) * latency
            # stops falling where adding a machine costs more latency than it saves compute
            best = min(range(1, batch + 1), key=lambda n: per_image * batch / n
                       + ring_seconds(n, nbytes, link["latency"], link["bandwidth"]))
            half = next((n for n in range(2, batch + 1) if per_image * batch / n / (
                per_image * batch / n + ring_seconds(n, nbytes, link["latency"], link["bandwidth"])) < 0.5), None)
            limits[link["name"]] = {"fastest_machines_strong": best, "efficiency_below_half_from": half}
        model[name] = {"seconds_per_image_one_thread": per_image, "gradient_bytes": nbytes, "rows": rows,
                       "limits": limits}
    return {"batch": batch, "links": links, "networks": model,
            "assumptions": f"compute time per image from the 1-rank run (one thread), independent of the shard "
                           f"size; ring allreduce with {latency * 1e6:g} us per message on Ethernet; "
                           "no overlap of communication with the backward pass"}


def measured_markdown(document):
    """The measured figures (sweep, training, fault run) as Markdown."""
    lines = ["#### Measured", ""]
    sweep = document.get("sweep")
    if sweep:
        seconds = sweep["median_seconds"]
        lines.append(f"- Sweep of {sweep['points']} {sweep['config'].get('arch', 'tfc').upper()} QAT points "
                     f"({sweep['config']['epochs']} epoch(s) on "
                     f"{sweep['config']['train_limit']} images each): {seconds['1']:.1f} s on 1 worker, "
                     f"{seconds['2']:.1f} s on 2; speed-up {sweep['speedup']:.2f}x (points alone, the cluster's "
                     f"start left out: {sweep['speedup_points_only']:.2f}x); identical records: "
                     f"{'yes' if sweep['identical_records'] else 'NO'}.")
    fault = document.get("fault")
    if fault:
        killed = fault["killed"][0] if fault["killed"] else None
        lines.append(f"- Fault run: {'a worker killed (SIGKILL) ' + format(killed['seconds_after_start'], 'g') + ' s into a point' if killed else 'no worker was killed'}; "
                     f"{fault['lines_in_points_jsonl']} lines in points.jsonl for {fault['distinct_points']} points "
                     f"(every point once: {'yes' if fault['every_point_once'] else 'NO'})"
                     + (f"; records equal to the undisturbed run's: "
                        f"{'yes' if fault['records_equal_the_undisturbed_run'] else 'NO'}"
                        if "records_equal_the_undisturbed_run" in fault else "") + ".")
    train = document.get("train")
    if train:
        lines += ["", f"Data-parallel training, global batch {train['batch']}, {train['threads_per_rank']} thread(s) "
                  "per rank, median of the repeats:", "",
                  "| network | parameters | images/s, 1 rank | images/s, 2 ranks | speed-up | efficiency "
                  "| allreduce per step (ms) | allreduce bytes per step |", "|---|---|---|---|---|---|---|---|"]
        for name, net in train["networks"].items():
            ips = net["images_per_second"]
            lines.append(f"| {name} | {net['parameters']:,} | {ips['1']:.0f} | {ips['2']:.0f} | {net['speedup']:.2f} "
                         f"| {net['efficiency']:.0%} | {net['allreduce_seconds_per_step'] * 1e3:.1f} "
                         f"| {net['allreduce_bytes_per_step']:,.0f} |")
        fit = train["allreduce_2_ranks"]["fit"]
        lines += ["", f"Allreduce alone, 2 ranks on this machine: {fit['latency_seconds'] * 1e6:.0f} us for 4 KiB, "
                  f"{fit['bandwidth_bytes_per_second'] / 1e9:.2f} GB/s for large buffers."]
    return "\n".join(lines) + "\n"


def model_markdown(model, document):
    lines = []
    loads = document.get("machine", {})
    lines.append(f"Measured on {loads.get('cpu_model')} ({loads.get('cpus')} cores), load average "
                 f"{', '.join(f'{x:.1f}' for x in loads.get('loadavg_start', []))} at the start "
                 f"(`{document.get('command', '')}`"
                 + ("; a check of the script, not a measurement" if document.get("small") else "")
                 + f"); global batch {model['batch']}.")
    # Only the load before the run tells whether others shared the machine: at the end, the 1-minute
    # average counts the benchmark's own ranks and workers (2 on 2 cores when it ran alone).
    busy = (loads.get("loadavg_start") or [0])[0]
    if loads.get("cpus") and busy > 0.5 * loads["cpus"]:
        lines.append(f"**The machine was shared (load average up to {busy:.1f} on {loads['cpus']} cores): "
                     "the timings, speed-ups and efficiencies below are not representative; rerun on a quiet "
                     "machine.**")
    lines += ["", measured_markdown(document), "#### The model for 8 and 64 machines", ""]
    for name, net in model["networks"].items():
        lines.append(f"**{name}**: {net['gradient_bytes'] / 2**20:.2f} MiB of float32 gradients per step, "
                     f"{net['seconds_per_image_one_thread'] * 1e3:.2f} ms of compute per image on one thread.")
        lines.append("")
        lines.append("| link | machines | allreduce (ms) | global batch fixed: step (ms) | speed-up | efficiency "
                     "| batch per machine fixed: efficiency | images/s |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for row in net["rows"]:
            lines.append(f"| {row['link']} | {row['machines']} | {row['allreduce_seconds'] * 1e3:.2f} | "
                         f"{row['strong_step_seconds'] * 1e3:.1f} | {row['strong_speedup']:.2f} | "
                         f"{row['strong_efficiency']:.0%} | {row['weak_efficiency']:.0%} | "
                         f"{row['weak_images_per_second']:.0f} |")
        lines.append("")
        for link, limit in net["limits"].items():
            half = limit["efficiency_below_half_from"] or f"none up to {model['batch']}"
            lines.append(f"- {link}: with the global batch fixed at {model['batch']} (at most {model['batch']} "
                         f"machines, one image each), the step is fastest on {limit['fastest_machines_strong']} "
                         f"machines; efficiency falls below 50% from {half} machines.")
        lines.append("")
    lines.append(f"Assumptions: {model['assumptions']}.")
    return "\n".join(lines) + "\n"


def write_report(document, results, docs=None, name="bench_distributed"):
    from lowbit.trainer import write_json_atomic

    model = scaling_model(document)
    document["scaling_model"] = model
    write_json_atomic(os.path.join(results, f"{name}.json"), document)
    text = model_markdown(model, document)
    with open(os.path.join(results, f"{name}_model.md"), "w") as fh:
        fh.write(text)
    if docs is not None and os.path.exists(docs):
        with open(docs) as fh:
            page = fh.read()
        if MARK_START in page and MARK_END in page:
            head, rest = page.split(MARK_START, 1)
            _, tail = rest.split(MARK_END, 1)
            with open(docs, "w") as fh:
                fh.write(head + MARK_START + "\n" + text + MARK_END + tail)
    print(text)


# -- main ------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS + ("none",), default=list(SECTIONS))
    parser.add_argument("--report", action="store_true", help="write the scaling model from the JSON")
    parser.add_argument("--small", action="store_true",
                        help="a quick check of the script: 1 epoch on 1000 images per point, 4 timed steps")
    parser.add_argument("--sweep-arch", default="sfc", choices=["tfc", "sfc", "lfc"])
    parser.add_argument("--sweep-epochs", type=int, default=2)
    parser.add_argument("--sweep-limit", type=int, default=50000, help="training images per point")
    parser.add_argument("--sweep-test-limit", type=int, default=10000)
    parser.add_argument("--sweep-repeats", type=int, default=1)
    parser.add_argument("--kill-after", type=float, default=2.0,
                        help="seconds into a worker's point at which the fault run kills it")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per run")
    parser.add_argument("--batch", type=int, default=100, help="global batch")
    parser.add_argument("--train-repeats", type=int, default=3)
    parser.add_argument("--allreduce-repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="threads per rank and per worker")
    parser.add_argument("--results", default=default_output("results"),
                        help=output_help("results", "folder of the results JSON"))
    parser.add_argument("--docs", help="the page whose scaling-model block --report rewrites (default "
                                       "docs/distributed.md when --results is the default folder)")
    parser.add_argument("--rank-train", choices=NETWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--rank-allreduce", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_train:
        return rank_train(args)
    if args.rank_allreduce:
        return rank_allreduce(args)
    if args.small:
        args.sweep_arch, args.sweep_epochs, args.sweep_limit, args.sweep_test_limit = "tfc", 1, 1000, 500
        args.steps, args.train_repeats, args.allreduce_repeats, args.kill_after = 4, 1, 3, 0.5

    stem = "bench_distributed_small" if args.small else "bench_distributed"  # a check never replaces a measurement
    path = os.path.join(args.results, f"{stem}.json")
    document = {}
    if os.path.exists(path):
        with open(path) as fh:
            document = json.load(fh)
    sections = [s for s in args.only if s != "none"]
    if sections:
        for name in THREAD_VARIABLES:  # the Dask workers inherit these: one thread each
            os.environ[name] = str(args.threads)
        for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
            os.environ.pop(name, None)
        document.update(command=command_line(__file__, argv), environment=environment(),
                        machine={"cpu_model": cpu_model(), "cpus": os.cpu_count(),
                                 "loadavg_start": list(os.getloadavg()),
                                 "unset_for_workers": ["OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"],
                                 "threads_per_worker": args.threads},
                        small=args.small)
        from lowbit.data import load_mnist

        data = load_mnist(progress=False)
        with tempfile.TemporaryDirectory(prefix="bench-distributed-") as scratch:
            if "sweep" in sections:
                document["sweep"] = section_sweep(data, args, scratch)
            if "train" in sections:
                document["train"] = section_train(args)
            if "fault" in sections:
                reference = document.get("sweep", {}).get("reference_records")
                same = document.get("sweep", {}).get("config") == json.loads(json.dumps(sweep_config(args)))
                document["fault"] = section_fault(data, args, scratch, reference if same else None)
        document["machine"]["loadavg_end"] = list(os.getloadavg())
        from lowbit.trainer import write_json_atomic

        write_json_atomic(path, document)
        print(f"wrote {path}")
    if args.report:
        if "train" not in document:
            parser.error(f"--report needs the train section in {path}; run it first")
        default = os.path.abspath(args.results) == os.path.abspath(COMMITTED["results"])
        write_report(document, args.results,
                     args.docs or (os.path.join(ROOT, "docs", "distributed.md") if default and not args.small else None),
                     stem)
    return document


if __name__ == "__main__":
    main()
