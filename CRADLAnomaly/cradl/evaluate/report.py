"""What a results file says besides the metrics, and how it reads as markdown: the run's `meta` block
(when, on what machine, by which command, with which model), the model's quality targets, the tables."""
from __future__ import annotations

import datetime
import math
import os
import platform
import time
from pathlib import Path

from ..atomic import atomic_path
from ..io import plain_json, write_json


# ----------------------------------------------------------------------------- the run and the targets


def machine_description() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    return (f"{platform.system()} {cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), "
            f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")


def results_meta(command, started, detector, data_dir, n_cases) -> dict:
    """The `meta` block of a results file: when, on what machine, by which command, with which model, on what."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_description(), "command": command, "model": detector.info,
            "volume_aggregate": detector.calibration.get("volume_aggregate"),
            "data": str(data_dir), "n_cases": n_cases, "seconds": time.perf_counter() - started}


def targets(results: dict, main: str, baselines: dict[str, str]) -> list[dict]:
    """The issue's quality targets for the model's row, with the measured value and whether each is met."""
    rep = results["methods"][main]
    out = []

    def add(text, value, ok):
        out.append({"target": text, "value": value, "met": bool(ok) if value is not None and
                    math.isfinite(value) else False})

    sub = rep.get("target_subset")
    if sub:
        add("volume AUROC >= 0.95, tumour + resection >= 15 mm", sub["volume"]["auroc"], sub["volume"]["auroc"] >= 0.95)
    add("volume AUROC >= 0.85, all types", rep["overall"]["volume"]["auroc"], rep["overall"]["volume"]["auroc"] >= 0.85)
    tumour = rep["by_type"].get("tumour")
    if tumour and tumour.get("voxel_lesion_only"):
        ap, bd = tumour["voxel_lesion_only"]["ap"], tumour["voxel_lesion_only"]["best_dice"]
        add("voxel AP >= 0.5, tumour-like", ap, ap >= 0.5)
        add("best Dice >= 0.5, tumour-like", bd, bd >= 0.5)
    fp = rep["overall"].get("fp_regions_per_normal_scan")
    if fp is not None:
        add("FP regions per normal scan <= 0.2 at the calibrated threshold", fp, fp <= 0.2)
    vae = baselines.get("vae")
    if vae and vae in results["methods"]:
        ours, theirs = rep["overall"]["volume"]["auroc"], results["methods"][vae]["overall"]["volume"]["auroc"]
        add(f"volume AUROC above the VAE's ({theirs:.3f})", ours, ours > theirs)
        ours, theirs = rep["overall"]["slice"]["auroc"], results["methods"][vae]["overall"]["slice"]["auroc"]
        add(f"slice AUROC above the VAE's ({theirs:.3f})", ours, ours > theirs)
    zs = baselines.get("zscore")
    if zs and zs in results["methods"] and "voxel" in rep["overall"]:
        ours, theirs = rep["overall"]["voxel"]["ap"], results["methods"][zs]["overall"]["voxel"]["ap"]
        add(f"voxel AP above the intensity z-score's ({theirs:.3f})", ours, ours > theirs)
    return out


# ----------------------------------------------------------------------------- tables


def _fmt(value, ci=None, digits=3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    text = f"{value:.{digits}f}"
    if ci and ci[0] is not None and ci[1] is not None:
        text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return text


def _overall_table(methods: dict) -> list[str]:
    lines = ["## All methods (all anomaly types and sizes against the clean scans; 95% bootstrap intervals)", "",
             "| Method | Volume AUROC | Volume AP | Slice AUROC | Slice AP | Voxel AUROC | Voxel AP | Best Dice | "
             "Dice @ threshold | Detection rate | FP regions / normal scan |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rep in methods.items():
        o = rep["overall"]
        ci = o.get("ci95", {})
        v = o.get("voxel", {})
        lines.append("| " + " | ".join([
            name, _fmt(o["volume"]["auroc"], ci.get("volume_auroc")), _fmt(o["volume"]["ap"], ci.get("volume_ap")),
            _fmt(o["slice"]["auroc"], ci.get("slice_auroc")), _fmt(o["slice"]["ap"]),
            _fmt(v.get("auroc")), _fmt(v.get("ap"), ci.get("voxel_ap")),
            _fmt(v.get("best_dice"), ci.get("voxel_best_dice")), _fmt(o.get("dice_at_threshold")),
            _fmt(o.get("detection_rate"), digits=2), _fmt(o.get("fp_regions_per_normal_scan"), digits=2)]) + " |")
    return lines + [""]


def _breakdown_table(methods: dict, group: str, title: str, lesion_metric: str) -> list[str]:
    """Volume AUROC / a voxel metric over the lesion cases alone, one column per group (type or size)."""
    keys = sorted({k for rep in methods.values() for k in rep[group]})
    if not keys:
        return []
    lines = [f"## {title}", "", "| Method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, rep in methods.items():
        cells = [_breakdown_cell(rep[group].get(k), lesion_metric) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _breakdown_cell(group: dict | None, lesion_metric: str) -> str:
    if group is None:
        return ""
    lesion_only = (group.get("voxel_lesion_only") or {}).get(lesion_metric)
    return f"{_fmt(group['volume']['auroc'], digits=2)} / {_fmt(lesion_only, digits=2)}"


def _aggregates_table(results: dict) -> list[str]:
    first = next(iter(results["methods"].values()), {})
    if not first.get("aggregates"):
        return []
    lines = [f"## Volume AUROC of the model's slice scores under each aggregate (current: "
             f"{results.get('meta', {}).get('volume_aggregate', 'see manifest')})", "",
             "| Aggregate | Volume AUROC | Volume AP | AUROC, tumour + resection >= 15 mm |", "|---|---|---|---|"]
    for name, m in first["aggregates"].items():
        lines.append(f"| {name} | {_fmt(m['volume_auroc'])} | {_fmt(m['volume_ap'])} | "
                     f"{_fmt(m['target_subset_auroc'])} |")
    return lines + [""]


def _targets_table(results: dict) -> list[str]:
    if not results.get("targets"):
        return []
    lines = ["## Targets of the model", "", "| Target | Measured | Met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {_fmt(t['value'])} | {'yes' if t['met'] else 'no'} |" for t in results["targets"]]
    return lines + [""]


def _run_line(results: dict) -> str:
    meta = results.get("meta", {})
    return (f"Run {meta.get('date', '')} on {meta.get('machine', '')}; command: `{meta.get('command', '')}`; "
            f"{meta.get('n_cases', '?')} cases; {meta.get('seconds', 0):.0f} s.")


def markdown_tables(results: dict) -> str:
    methods = results["methods"]
    out = _overall_table(methods)
    out += _breakdown_table(methods, "by_type", "Volume AUROC / voxel AP (lesion cases only) by anomaly type", "ap")
    out += _breakdown_table(methods, "by_size", "Volume AUROC / best Dice (lesion cases only) by anomaly size",
                            "best_dice")
    out += _aggregates_table(results)
    out += _targets_table(results)
    out.append(_run_line(results))
    return "\n".join(out) + "\n"


def write_results(results: dict, out_json: Path | None, out_md: Path | None) -> None:
    """The results as JSON (rounded; undefined metrics as null) and as markdown tables, each written atomically."""
    if out_json is not None:
        write_json(plain_json(results, digits=5), out_json)
    if out_md is not None:
        with atomic_path(out_md) as tmp:
            Path(tmp).write_text(markdown_tables(results))
