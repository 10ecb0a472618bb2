"""Throughput of batch detection: today's in-process batch vs Dask with 1 and 2 local workers on the same
scans; peak memory per worker; per-task scheduler overhead; projected throughput on N machines.

    python -m cradl.batch.benchmark --data ../shared/data/ixi/T1 --n 40 --out-dir bench_batch [--model M]

Each mode runs `cradl detect SCANS... --out-dir` as its own process into a fresh folder, so no mode
reuses another's outputs or warm caches; wall time includes starting the cluster and loading the model.
Writes `batch_benchmark.json` and `batch_benchmark.md` in --out-dir.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

MODES = {"in-process batch (today)": [], "Dask, 2 workers": ["--workers", "2"], "Dask, 1 worker": ["--workers", "1"]}
FOLDERS = {"in-process batch (today)": "inprocess", "Dask, 1 worker": "dask1", "Dask, 2 workers": "dask2"}


def _run_mode(scans: list[Path], out: Path, extra: list[str], model: str | None) -> dict:
    from ..outputs import SUFFIXES

    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, "-m", "cradl", "detect", *map(str, scans), "--out-dir", str(out), "--quiet", *extra]
    if model:
        command += ["--model", model]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    wall = time.perf_counter() - started
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    reports = sorted(out.glob("*" + SUFFIXES["report"]))
    scores = {p.name: json.loads(p.read_text())["volume_score"] for p in reports}
    result = {"wall_s": round(wall, 1), "scans": len(scans), "done": len(reports), "exit_status": run.returncode,
              "scans_per_minute": round(60 * len(reports) / wall, 2), "scores": scores}
    summary = out / "summary.json"
    if summary.exists():
        rows = json.loads(summary.read_text())["rows"]
        per_worker: dict[str, float] = {}
        for row in rows:
            if row.get("worker"):
                per_worker[row["worker"]] = max(per_worker.get(row["worker"], 0.0), row["worker_peak_rss_mib"] or 0.0)
        ok = [r for r in rows if r["status"] == "ok"]
        result.update(workers=len(per_worker), peak_rss_mib_per_worker=sorted(per_worker.values()),
                      mean_task_s=round(sum(r["t_total_s"] for r in ok) / max(1, len(ok)), 2))
    else:
        # the in-process batch is one process; it runs first, so the children's maximum so far is its own
        result.update(workers=1, peak_rss_mib_per_worker=[round(child_peak / 1024, 1)] if child_peak > before else [])
    if run.returncode not in (0, 2):
        result["stderr"] = run.stderr[-2000:]
    return result


def resume_check(scans: list[Path], out: Path, model: str | None, workers: int = 2) -> dict:
    """Kill one worker, then the whole run, part-way; rerun; count what was redone and check every output."""
    import signal

    import psutil

    from ..outputs import CLI_KINDS, batch_plan
    from .runner import completion_records, make_tasks, read_valid_record

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    command = [sys.executable, "-m", "cradl", "detect", *map(str, scans), "--out-dir", str(out), "--quiet",
               "--workers", str(workers)] + (["--model", model] if model else [])
    def records():  # a run killed while writing a record leaves its temporary: not a finished scan
        return len(completion_records(out))
    log = out.parent / "resume_check_first_run.log"  # beside, not in, the output folder the rerun checks
    with open(log, "wb") as stderr:
        run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    events = {}
    try:
        while records() < 2 and run.poll() is None:
            time.sleep(0.2)
        # LocalCluster's nannies live in the client process; each worker is a process they spawned
        workers_now = [c for c in psutil.Process(run.pid).children(recursive=True)
                       if "spawn_main" in " ".join(c.cmdline())]
        if workers_now:
            workers_now[0].kill()  # a worker (not its nanny) dies mid-scan
            events["worker_killed_after_records"] = records()
        while records() < len(scans) // 2 and run.poll() is None:
            time.sleep(0.2)
        events["run_killed_after_records"] = records()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)  # the whole run: client, scheduler, nannies, workers
        else:  # it ended by itself: say how, since the run should have outlived the killed worker
            events["first_run_ended_by_itself"] = {"exit_status": run.returncode,
                                                   "stderr_tail": log.read_text(errors="replace")[-2000:]}
        run.wait()
    done_before = {p.name for p in completion_records(out)}
    started = time.perf_counter()
    rerun = subprocess.run(command, capture_output=True, text=True)
    rows = json.loads((out / "summary.json").read_text())["rows"]
    plan = batch_plan(scans, out, CLI_KINDS, [], dicom=True)
    tasks = make_tasks(scans, plan, model, "auto", None, False, None)
    valid = sum(read_valid_record(t) is not None for t in tasks)
    return {**events, "scans": len(scans), "finished_before_rerun": len(done_before),
            "rerun_exit_status": rerun.returncode, "rerun_wall_s": round(time.perf_counter() - started, 1),
            "rerun_reused": sum(bool(r["reused"]) for r in rows),
            "rerun_computed": sum(not r["reused"] and r["status"] == "ok" for r in rows),
            "finished_scans_redone": sum(not r["reused"] and Path(r["report"]).name in done_before for r in rows
                                         if r.get("report")),
            "outputs_valid_after_rerun": valid}


def scheduler_overhead(n_tasks: int = 400) -> float:
    """Seconds of scheduling per task: no-op tasks through a 2-worker local cluster (after warm-up)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster) as client:
        client.gather(client.map(_noop, range(20), pure=False))
        started = time.perf_counter()
        client.gather(client.map(_noop, range(n_tasks), pure=False))
        return (time.perf_counter() - started) / n_tasks


def _noop(x):
    return x


def project(per_machine_per_minute: float, overhead_s: float, machines=(1, 2, 4, 8, 16, 32, 64)) -> list[dict]:
    """N machines like this one, each running the 2-worker rate; the scheduler hands out at most
    1/overhead tasks per second (measured here with no-op tasks; one scheduler process)."""
    ceiling = 60.0 / overhead_s if overhead_s > 0 else float("inf")
    return [{"machines": n, "scans_per_minute": round(min(n * per_machine_per_minute, ceiling), 1),
             "scans_per_day": int(min(n * per_machine_per_minute, ceiling) * 60 * 24)} for n in machines]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cradl.batch.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="folder of scans (the first --n, sorted, are used)")
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--model")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--resume-check", action="store_true",
                        help="instead: kill a worker and then the whole 2-worker run part-way, rerun, count")
    args = parser.parse_args(argv)
    from ..cli import expand_inputs

    scans = expand_inputs([args.data])[: args.n]
    if len(scans) < args.n:
        print(f"cradl: error: {args.data} holds {len(scans)} scans, fewer than --n {args.n}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.resume_check:
        record = resume_check(scans, out / "resume", args.model)
        (out / "resume_check.json").write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps(record, indent=1))
        return 0
    results = {}
    for name in args.modes:
        print(f"{name}: {len(scans)} scans ...", flush=True)
        results[name] = _run_mode(scans, out / FOLDERS[name], MODES[name], args.model)
        print(f"  {results[name]['scans_per_minute']} scans/min, wall {results[name]['wall_s']} s, "
              f"peak RSS per worker {results[name]['peak_rss_mib_per_worker']} MiB", flush=True)
    overhead = scheduler_overhead()
    base = next(iter(results.values()))["scores"]
    for r in results.values():
        common = set(base) & set(r["scores"])
        r["max_score_difference_vs_first_mode"] = max((abs(base[k] - r["scores"][k]) for k in common), default=None)
    two = results.get("Dask, 2 workers")
    projection = project(two["scans_per_minute"], overhead) if two else []
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": {
        "platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "data": str(args.data), "n_scans": len(scans), "model": args.model or "bundled",
        "modes": {k: {kk: vv for kk, vv in v.items() if kk != "scores"} for k, v in results.items()},
        "scheduler_overhead_ms_per_task": round(1000 * overhead, 2), "projection": projection}
    (out / "batch_benchmark.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = ["| mode | wall s | scans/min | peak RSS per worker MiB | mean s per scan in a worker |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['wall_s']} | {r['scans_per_minute']} | "
                     f"{', '.join(f'{v:.0f}' for v in r['peak_rss_mib_per_worker']) or '-'} | "
                     f"{r.get('mean_task_s', '-')} |")
    lines += ["", f"Scheduler overhead: {1000 * overhead:.1f} ms per task (no-op tasks, 2-worker local cluster).", "",
              "| machines | projected scans/min | scans/day |", "|---|---|---|"]
    lines += [f"| {p['machines']} | {p['scans_per_minute']} | {p['scans_per_day']} |" for p in projection]
    (out / "batch_benchmark.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
