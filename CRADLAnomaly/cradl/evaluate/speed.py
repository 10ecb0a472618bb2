"""`python -m cradl benchmark-speed`: seconds per volume, peak memory, slices per second, the share of
unavoidable network work, and the speed-up over the straightforward implementation, measured in one run.

Each volume size is measured in a fresh process so that peak resident memory belongs to that size alone.
"""
from __future__ import annotations

import json
import multiprocessing
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SIZES = {  # name: (voxels x, y, z; spacing mm)
    "brain-1mm": ((193, 229, 193), (1.0, 1.0, 1.0)),
    "brain-1mm-half-slices": ((193, 229, 97), (1.0, 1.0, 2.0)),
    "brain-1mm-double-slices": ((193, 229, 386), (1.0, 1.0, 0.5)),
    "ct-512x512x400": ((512, 512, 400), (0.45, 0.45, 0.5)),
    "head-1mm": ((240, 240, 180), (1.0, 1.0, 1.0)),  # a real head with skull and neck, where the data exist
}


def make_volume(name: str, seed: int = 0) -> sitk.Image:
    """A normal brain resampled onto the grid of the named size, centred on it: for `head-1mm` a held-out
    real IXI head with skull (when the shared data are here), else a synthetic normal brain."""
    from .. import realdata
    from ..synthetic.scans import make_normal_scan

    size, spacing = SIZES[name]
    if name.startswith("head") and realdata.available():
        image = sitk.ReadImage(str(realdata.subjects_in("test")[seed].t1), sitk.sitkFloat32)
    else:
        image, _ = make_normal_scan(np.random.default_rng(seed), contrast="t1")
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(np.array(image.GetSize()) / 2))
    grid.SetOrigin(centre - np.array(size) * np.array(spacing) / 2)
    return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def _timed(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return times, out


def measure(path: str, model: str | None, repeats: int, naive: bool) -> dict:
    """All timings for one volume file, in this process."""
    import resource  # Unix only, as is this benchmark's peak-memory figure; `cradl --help` must not need it

    import torch

    from ..detector import AnomalyDetector
    from ..io import read_image, write_image, write_json
    from ..localize import score_and_saliency
    from .reference_impl import loop_score_and_saliency

    torch.manual_seed(0)
    detector = AnomalyDetector.load(model, device="cpu")
    out_dir = Path(tempfile.mkdtemp())

    def full():
        result = detector.detect(read_image(path))
        write_image(result.heatmap, out_dir / "h.nii.gz")
        write_json(result.to_report(), out_dir / "r.json")
        return result

    def scores_only():
        result = detector.detect(read_image(path), heatmap=False)
        write_json(result.to_report(), out_dir / "r.json")
        return result

    full_times, result = _timed(full, repeats)
    score_times, _ = _timed(scores_only, repeats)
    prepared = detector.prepare(read_image(path))
    idx = prepared.slice_indices
    slices = prepared.volume[idx]
    network_times, (nll, saliency) = _timed(
        lambda: score_and_saliency(slices, idx, detector.encoder, detector.gmm, detector.localization,
                                   detector.device, detector.batch_size), repeats)
    stages = {k: round(v, 3) for k, v in result.timings.items()}
    row = {"voxels": list(read_image(path).GetSize()), "slices_scored": int(len(idx)),
           "total_s": _summary(full_times), "scores_only_s": _summary(score_times),
           "network_s": _summary(network_times),
           "slices_per_s": round(len(idx) / statistics.median(network_times), 1),
           "ratio_to_network": round(statistics.median(full_times) / statistics.median(network_times), 2),
           "stages_last_run_s": stages}
    one_pass = AnomalyDetector(detector.bundle, device="cpu", batch_size=len(idx))
    chunked = AnomalyDetector(detector.bundle, device="cpu", batch_size=4)
    image = read_image(path)
    a, b = one_pass.detect(image), chunked.detect(image)
    row["chunked_vs_unchunked_max_abs_diff"] = float(np.abs(sitk.GetArrayViewFromImage(a.heatmap)
                                                            - sitk.GetArrayViewFromImage(b.heatmap)).max())
    if naive:
        started = time.perf_counter()
        naive_nll, naive_saliency = loop_score_and_saliency(slices, idx, detector.encoder, detector.gmm,
                                                            detector.localization, detector.device)
        naive_network = time.perf_counter() - started
        naive_total = statistics.median(full_times) - statistics.median(network_times) + naive_network
        row.update({"naive_network_s": round(naive_network, 2), "naive_total_s": round(naive_total, 2),
                    "speedup_vs_naive": round(naive_total / statistics.median(full_times), 2),
                    "naive_max_rel_diff": float(np.abs(naive_saliency - saliency).max() / np.abs(saliency).max()),
                    "naive_score_max_abs_diff": float(np.abs(naive_nll - nll).max())})
    row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def _summary(times: list[float]) -> dict:
    return {"min": round(min(times), 3), "median": round(statistics.median(times), 3), "max": round(max(times), 3)}


def _child(queue, *args):
    try:
        queue.put(measure(*args))
    except BaseException as exc:  # report, never hang the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def cli_startup_seconds(repeats: int = 5) -> dict:
    """Wall time of `python -m cradl --help` in a fresh interpreter: what every command pays before it starts
    (the parser is built without torch, so this stays small)."""
    import subprocess
    import sys

    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cradl", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return _summary(times)


def run(model: str | None, sizes: list[str], repeats: int, naive_sizes: list[str]) -> dict:
    import torch

    context = multiprocessing.get_context("spawn")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in sizes:
            path = str(Path(folder) / f"{name}.nii.gz")
            sitk.WriteImage(make_volume(name), path)
            queue = context.Queue()
            process = context.Process(target=_child, args=(queue, path, model, repeats, name in naive_sizes))
            process.start()
            results[name] = queue.get()
            process.join()
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    return {"machine": f"{platform.machine()} {platform.processor()}, {torch.get_num_threads()} torch threads, "
                       f"{multiprocessing.cpu_count()} cores", "torch": torch.__version__, "repeats": repeats,
            "date": time.strftime("%Y-%m-%d"), "cli_help_s": cli_startup_seconds(), "sizes": results}


def markdown_table(report: dict) -> str:
    lines = ["| volume | voxels | total s (min/med/max) | scores only s | network s | slices/s | total / network "
             "| naive total s | speed-up | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["sizes"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |")
            continue
        t, s, n = r["total_s"], r["scores_only_s"], r["network_s"]
        lines.append(f"| {name} | {'x'.join(map(str, r['voxels']))} | {t['min']:.2f}/{t['median']:.2f}/{t['max']:.2f} "
                     f"| {s['median']:.2f} | {n['median']:.2f} | {r['slices_per_s']} | {r['ratio_to_network']} "
                     f"| {r.get('naive_total_s', '-')} | {r.get('speedup_vs_naive', '-')} | {r['peak_rss_mib']} |")
    if "cli_help_s" in report:
        t = report["cli_help_s"]
        lines += ["", f"`python -m cradl --help` (a fresh interpreter, min/med/max): {t['min']:.2f}/{t['median']:.2f}/"
                      f"{t['max']:.2f} s"]
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("benchmark-speed", help="time detection per volume, peak memory and speed-ups",
                       description="Measures end-to-end detect (read, align, score, localize, map back, write), "
                       "scores-only, network-only work and the straightforward implementation on synthetic volumes "
                       "of the sizes named, each in a fresh process.")
    p.add_argument("--model", help="model bundle; default: the bundled model")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--naive-on", nargs="*", default=["brain-1mm"], choices=list(SIZES),
                   help="sizes on which to also time the straightforward implementation")
    p.add_argument("--out", help="write the JSON results here")
    p.set_defaults(run=_run_command)


def _run_command(args) -> int:
    from ..io import write_json

    report = run(args.model, args.sizes, args.repeats, args.naive_on)
    print(markdown_table(report))
    if args.out:
        write_json(report, args.out)
    return 0
