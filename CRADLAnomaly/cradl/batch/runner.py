"""Batch detection over a Dask cluster (dask.distributed): a local one (`--workers N`) or an existing one
(`--scheduler ADDRESS`).

- Each worker process loads the model once (per model file and device) and keeps it for every scan it is given.
- A scan's outputs are written to temporary names and renamed into place (cradl.io); when they are all
  in place, a completion record (`.cradl-done/<report name>`) is written last, holding the input's
  signature, the model's digest, the options and every output's size and SHA-256 (of a folder output, the
  DICOM overlay series: of its file names and contents).
- A rerun skips a scan whose record matches (same input, model and options; every output present and
  unchanged) and redoes any other: never started, killed half-way, an output missing or altered.
- One failing scan (bad input, a bug, a worker that dies on it) never stops the batch: it becomes a
  "failed" row with the error.
- Every scan is computed the same way whatever the number of workers (each task fixes its own torch
  thread count), so results do not depend on how many workers ran.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import socket
import sys
import time
import uuid
from pathlib import Path

from ..errors import CradlError, InputError, one_line, scan_failure, user_message

DONE_FOLDER = ".cradl-done"
RECORD_VERSION = 1
_DETECTORS: dict = {}
_LOADS = {"count": 0}


# ---------------------------------------------------------------------------- signatures and records

def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(path: Path) -> dict:
    """Size and SHA-256 of an output file; of a folder output, its total size and a SHA-256 over its files'
    names and digests, so that a missing, extra or altered file changes it."""
    if not path.is_dir():
        return {"size": path.stat().st_size, "sha256": _sha256(path)}
    listing = [[p.name, p.stat().st_size, _sha256(p) if p.is_file() else "not a file"] for p in sorted(path.iterdir())]
    return {"size": sum(size for _, size, _ in listing),
            "sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}


def input_signature(path: Path) -> str:
    """What identifies an input's content cheaply: size and modification time of the file, or of every
    member of a DICOM folder."""
    path = Path(path)
    if path.is_dir():
        members = sorted(p for p in path.iterdir() if p.is_file())
        parts = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in members]
    else:
        st = path.stat()
        parts = [path.name, st.st_size, st.st_mtime_ns]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def record_path(outputs: dict) -> Path:
    report = Path(outputs["report"])
    return report.parent / DONE_FOLDER / f"{report.name}"


def completion_records(out_dir: Path) -> list[Path]:
    """The completion records in `out_dir`, without the temporary of one whose writing was killed."""
    folder = Path(out_dir) / DONE_FOLDER
    return sorted(p for p in folder.glob("*.json") if not p.name.startswith(".")) if folder.is_dir() else []


def read_valid_record(task: dict) -> dict | None:
    """The completion record of a finished scan, or None when the scan must be (re)done."""
    path = record_path(task["outputs"])
    try:
        record = json.loads(path.read_text())
        if (record.get("version") != RECORD_VERSION or record.get("input") != task["input"]
                or record.get("input_signature") != input_signature(Path(task["input"]))
                or record.get("model_sha256") != task["model_sha256"] or record.get("options") != task["options"]
                or set(record.get("outputs", {})) != set(task["outputs"])):
            return None
        for kind, final in task["outputs"].items():
            stored = record["outputs"][kind]
            final = Path(final)
            if stored is None:  # nothing to write for this kind (a DICOM segmentation with no region)
                if final.exists():
                    return None
                continue
            if not final.exists() or _fingerprint(final) != stored:  # missing, partial or altered
                return None
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------- the worker's task

def _detector(model: str | None, device: str):
    """The worker's detector for this model file and device: loaded on first use, then kept."""
    from ..detector import AnomalyDetector

    key = (model, device)
    if key not in _DETECTORS:
        _DETECTORS[key] = AnomalyDetector.load(model, device=device)
        _LOADS["count"] += 1
    return _DETECTORS[key]


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 1024 if sys.platform != "darwin" else peak / 2 ** 20, 1)


def empty_row(task: dict) -> dict:
    return {"index": task["index"], "input": task["input"], "name": Path(task["input"]).name, "status": "",
            "reused": False}


def detect_scan(task: dict) -> dict:
    """Detect one scan and write its outputs; returns its summary row (never raises for a bad scan)."""
    import torch

    from ..io import read_image
    from ..outputs import DICOM_KINDS, write_outputs

    started = time.perf_counter()
    row = empty_row(task)
    if task.get("threads"):
        torch.set_num_threads(int(task["threads"]))
    try:
        detector = _detector(task["model"], task["device"])
        t = time.perf_counter()
        image = read_image(task["input"])
        mask = read_image(task["mask"], what="brain mask") if task.get("mask") else None
        t_read = time.perf_counter() - t
        result = detector.detect(image, mask=mask, heatmap=not task["options"]["no_heatmap"])
        result.source = task["input"]
        t = time.perf_counter()
        out = task["outputs"]
        dicom = None
        if any(kind in out for kind in DICOM_KINDS):  # built first: a series that does not map writes nothing
            from ..dicom_out import build_dicom_results, save_dicom_results

            dicom = build_dicom_results(Path(task["input"]), result, detector.model_summary(), out.get("seg"),
                                        out.get("pmap"), out.get("overlay"))
        _clear_leftovers([*out.values(), record_path(out)])
        written = write_outputs(result, {kind: path for kind, path in out.items() if kind not in DICOM_KINDS}, image)
        if dicom is not None:
            written.update(save_dicom_results(dicom))
        t_write = time.perf_counter() - t
        timings = result.timings
        row.update(_result_fields(result))
        row.update(status="ok", t_read_s=round(t_read, 3), t_align_s=round(timings.get("align", 0.0), 3),
                   t_network_s=round(timings.get("network", 0.0), 3),
                   t_map_back_s=round(timings.get("map_back", 0.0), 3), t_write_s=round(t_write, 3))
        row.update({kind: str(path) for kind, path in written.items() if path is not None})
        row["t_total_s"] = round(time.perf_counter() - started, 3)
        _finish_row(row)
        _write_record(task, written, row)
    except Exception as exc:  # noqa: BLE001 - a bug on one scan must not cost the others
        row.update(status="failed", error=scan_failure(exc))
    if row["status"] == "failed":
        row["t_total_s"] = round(time.perf_counter() - started, 3)
        _finish_row(row)
    return row


def _finish_row(row: dict) -> None:
    row["worker"] = f"{socket.gethostname()}:{os.getpid()}"
    row["worker_model_loads"] = _LOADS["count"]
    row["worker_peak_rss_mib"] = _peak_rss_mib()


def _result_fields(result) -> dict:
    report = result.to_report()
    top = result.regions[0] if result.regions else None
    return {"volume_score": report["volume_score"], "volume_percentile": report["volume_percentile"],
            "interpretation": report["interpretation"], "out_of_distribution": bool(report["out_of_distribution"]),
            "n_regions": len(result.regions) if result.heatmap is not None else None,
            "top_region_centre_ras": [round(float(v), 1) for v in top.centre_ras] if top else None,
            "top_region_volume_mm3": round(float(top.volume_mm3), 1) if top else None,
            "top_region_peak": round(float(top.peak), 3) if top else None,
            "model": f"{report['model']['name']} {report['model']['version']}"}


def _clear_leftovers(finals) -> None:
    """Temporary files and folders a killed attempt left beside these outputs (cradl.io names them
    '.STEM-XXXXXXXX.SUFFIX'): a half-written overlay folder, or an earlier one renamed aside."""
    import shutil

    from ..atomic import temporary_suffix

    for final in map(Path, finals):
        stem = final.name.split(".")[0][:64]
        for leftover in final.parent.glob(f".{stem}-{'?' * 8}{temporary_suffix(final.name)}"):
            try:
                if leftover.is_dir() and not leftover.is_symlink():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
            except OSError:
                pass


def _write_record(task: dict, written: dict, row: dict) -> None:
    from ..io import write_json

    outputs = {}
    for kind in task["outputs"]:
        path = written.get(kind)
        outputs[kind] = None if path is None else _fingerprint(path)
    record = {"version": RECORD_VERSION, "input": task["input"], "input_signature": task["input_signature"],
              "model_sha256": task["model_sha256"], "options": task["options"], "outputs": outputs, "row": row}
    final = record_path(task["outputs"])
    final.parent.mkdir(exist_ok=True)
    write_json(record, final)


# ---------------------------------------------------------------------------- the client

def make_tasks(paths: list[Path], plan: list[dict], model: str | None, device: str, mask: str | None,
               no_heatmap: bool, threads: int | None) -> list[dict]:
    from ..outputs import model_path

    model_file = model_path(model)
    try:
        model_sha = _sha256(model_file)
    except OSError as exc:
        raise InputError(f"cannot read the model {model_file}: {exc.strerror or exc}") from None
    options = {"no_heatmap": bool(no_heatmap), "mask": input_signature(Path(mask)) if mask else None}
    tasks = []
    for i, (path, outputs) in enumerate(zip(paths, plan)):
        tasks.append({"index": i, "input": str(path), "input_signature": input_signature(Path(path)),
                      "outputs": {k: str(v) for k, v in outputs.items()},
                      "model": str(model_file.resolve()), "model_sha256": model_sha, "device": device,
                      "mask": str(Path(mask).resolve()) if mask else None, "options": options, "threads": threads})
    return tasks


def _connect(scheduler: str | None, workers: int | None):
    """A Dask client: on the cluster at `scheduler`, or on a new local cluster of `workers` processes."""
    from distributed import Client, LocalCluster

    for name in ("distributed", "tornado"):  # the scheduler's and workers' INFO lines are not the user's business
        logging.getLogger(name).setLevel(logging.ERROR)
    if scheduler:
        try:
            return Client(scheduler, timeout="5s"), None
        except (OSError, TimeoutError, ValueError) as exc:
            raise InputError(f"cannot reach the Dask scheduler at {scheduler}: {one_line(exc)}") from None
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           host="127.0.0.1", silence_logs=logging.ERROR)
    return Client(cluster), cluster


def run_dask_batch(paths: list[Path], plan: list[dict], out_dir: Path, *, model: str | None = None,
                   device: str = "auto", mask: str | None = None, no_heatmap: bool = False,
                   scheduler: str | None = None, workers: int | None = None, quiet: bool = False) -> int:
    """Run the batch on Dask; write summary.csv, summary.json and worklist.html in `out_dir`.
    Returns the exit status: 0 when every scan is done, 2 when any failed."""
    from tqdm import tqdm

    from .summary import write_summary
    from .worklist import write_worklist

    if workers is not None and workers < 1:
        raise CradlError("--workers must be at least 1")
    if scheduler and workers:
        raise CradlError("give either --scheduler (an existing Dask cluster) or --workers (a local one), not both")
    if mask:
        from ..io import read_image

        read_image(mask, what="brain mask")  # a bad mask is refused once, here, not on every scan
    from ..bundle import load_bundle

    load_bundle(model)  # likewise a missing, damaged or foreign model
    threads = max(1, (os.cpu_count() or 1) // workers) if workers else None
    tasks = make_tasks(paths, plan, model, device, mask, no_heatmap, threads)
    rows: list[dict | None] = [None] * len(tasks)
    todo = []
    for task in tasks:
        record = read_valid_record(task)
        if record is not None:
            rows[task["index"]] = {**record["row"], "reused": True}
        else:
            todo.append(task)
    started = time.perf_counter()
    if todo:
        client, cluster = _connect(scheduler, workers)
        try:
            run = uuid.uuid4().hex[:8]
            futures = client.map(detect_scan, todo, key=[f"cradl-detect-{run}-{t['index']}" for t in todo],
                                 pure=False)
            index_of = {f.key: t for f, t in zip(futures, todo)}
            from distributed import as_completed

            bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc="scans", unit="scan", disable=quiet)
            failed = 0
            for future in as_completed(futures):
                task = index_of[future.key]
                try:
                    row = future.result()
                except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker: the scan kept killing its worker
                    row = {**empty_row(task), "status": "failed", "error": one_line(user_message(exc))}
                rows[task["index"]] = row
                if row["status"] != "ok":
                    failed += 1
                    bar.write(f"{row['name']}: FAILED: {row.get('error', '')}", file=sys.stderr)
                bar.set_postfix(failed=failed)
                bar.update(1)
                future.release()
            bar.close()
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    wall = time.perf_counter() - started
    write_summary(rows, out_dir, extra={"wall_s": round(wall, 2), "workers": workers, "scheduler": scheduler})
    write_worklist(rows, out_dir)
    n_ok = sum(r["status"] == "ok" for r in rows)
    n_reused = sum(bool(r.get("reused")) for r in rows)
    print(f"{n_ok} of {len(rows)} scans done ({n_reused} from an earlier run) in {wall:.1f} s; "
          f"results in {out_dir} (summary.csv, summary.json, worklist.html)")
    failures = [r for r in rows if r["status"] != "ok"]
    if failures:
        print(f"cradl: error: {len(failures)} scan(s) failed:", file=sys.stderr)
        for row in failures:
            print(f"  {row['input']}: {row.get('error', '')}", file=sys.stderr)
        return 2
    return 0

