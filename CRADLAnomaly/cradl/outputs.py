"""Where detection results go and how they are written, for every way of running detection.

- One naming scheme: a scan's outputs are its stem (`io.scan_stem`) and a suffix per kind (`SUFFIXES`), in the
  CLI's batch (threaded or on Dask) and the Slicer module's batch and scene saves alike.
- One batch plan: output names that collide neither with each other nor with any input, mask or model.
- One writer (`write_outputs`): heatmap, region label map, quick-look PNG and JSON report of one scan, all or
  nothing (temporary names, renamed into place only when every file is complete).

No torch, no Slicer: the Slicer module imports this in the application.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .atomic import atomic_files, name_max, writing
from .errors import CradlError, OutputError
from .io import same_geometry, scan_stem, write_image_to, write_json_to

# Output kind -> file-name suffix after the scan's stem.
SUFFIXES = {
    "heatmap": "_anomaly_heatmap.nii.gz",  # on the scan's own grid
    "regions": "_anomaly_regions.nii.gz",  # label map: 0 = none, k = region of rank k
    "segmentation": "_anomaly_regions.seg.nrrd",  # the regions as a Slicer segmentation (scene saves)
    "png": "_anomaly_quicklook.png",  # three-plane quick look
    "report": "_anomaly_report.json",
    "seg": "_anomaly_seg.dcm",  # the regions as a DICOM Segmentation (DICOM series inputs)
    "pmap": "_anomaly_pmap.dcm",  # the heatmap as a DICOM Parametric Map (DICOM series inputs)
    # a folder: the heatmap blended over the scan as a DICOM Secondary Capture series, one RGB file per source
    # slice, for viewers and PACS that cannot show a Parametric Map (DICOM series inputs)
    "overlay": "_anomaly_overlay",
}
CLI_KINDS = ("heatmap", "report", "png")  # what `cradl detect --out-dir` writes per scan
SCORES_ONLY = ("report",)  # with --no-heatmap
DICOM_KINDS = ("seg", "pmap", "overlay")  # added for a DICOM series input where asked for


def output_names(stem: str, kinds) -> dict[str, str]:
    """File names of a scan's outputs: {kind: stem + suffix}."""
    return {kind: stem + SUFFIXES[kind] for kind in kinds}


# ---------------------------------------------------------------------------- files no output may replace

def model_path(model) -> Path:
    """The model file `--model` names, else the bundled default (to protect it from being overwritten)."""
    from .bundle import DEFAULT_MODEL

    return Path(model) if model else DEFAULT_MODEL


def protected_files(named: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """Files no output may replace: inputs (with the members of DICOM folders and detached data files), mask, model."""
    files = []
    for label, path in named:
        files.append((label, path))
        if path.is_dir():
            try:
                files += [(label, member) for member in path.iterdir()]
            except OSError:
                pass
        elif path.name.lower().endswith((".mhd", ".nhdr")):
            try:
                from .io import inspect_image_file

                data = inspect_image_file(path).data_file
                if data is not None:
                    files.append((label, data))
            except CradlError:
                pass
    return files


def same_file(a: Path, b: Path) -> bool:
    """The same file however spelled: one real path (links, '..', '.'), or one inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_clashes(outputs: list[tuple[str, Path]], protected: list[tuple[str, Path]]) -> None:
    """An output may neither replace a protected file (an input, the mask, the model) nor another output."""
    for i, (label, out) in enumerate(outputs):
        for what, path in protected:
            if same_file(out, path):
                raise OutputError(f"{label} {out} is the {what} {path}; it would be overwritten: choose another name")
        for other, earlier in outputs[:i]:
            if same_file(out, earlier):
                raise OutputError(f"{other} and {label} name the same file {out}; give each output its own name")


# ---------------------------------------------------------------------------- the batch plan

def unique_stems(paths: list[Path]) -> list[str]:
    """Output names per input that cannot collide: a repeated name takes its format (scan.nrrd -> scan_nrrd),
    then its folder (site2/scan.mha -> site2_scan), then a number; a name taken this way is never another
    input's own name (scan_2.nii.gz keeps "scan_2")."""
    own = {scan_stem(p).lower() for p in paths}
    used: set[str] = set()
    stems = []
    for path in paths:
        stem = scan_stem(path)
        fmt = path.name[len(stem):].lstrip(".").replace(".", "_") or "dir"
        candidates = [stem, f"{stem}_{fmt}", f"{path.parent.name}_{stem}" if path.parent.name else stem]
        choice = next((c for i, c in enumerate(candidates) if c.lower() not in used
                       and (i == 0 or c.lower() not in own)), None)
        k = 2
        while choice is None:
            c = f"{stem}_{k}"
            if c.lower() not in used and c.lower() not in own:
                choice = c
            k += 1
        used.add(choice.lower())
        stems.append(choice)
    return stems


def batch_plan(paths: list[Path], out_dir: Path, kinds, protected, dicom: bool = False) -> list[dict[str, Path]]:
    """Every scan's output paths ({kind: path} per scan, `kinds` of SUFFIXES; with `dicom`, a DICOM series
    input also gets DICOM_KINDS): distinct from each other and from every protected file (inputs, mask,
    model), and short enough for the file system."""
    kinds = tuple(kinds)
    limit = name_max(out_dir) - max(len(SUFFIXES[kind].encode()) for kind in kinds + DICOM_KINDS)
    used: set[str] = set()
    plan = []
    for path, stem in zip(paths, unique_stems(paths)):
        scan_kinds = kinds + DICOM_KINDS if dicom and Path(path).is_dir() else kinds
        stem = stem.encode()[:limit].decode("utf-8", "ignore")
        candidate, k = stem, 1
        while True:
            outputs = {kind: out_dir / name for kind, name in output_names(candidate, scan_kinds).items()}
            if not any(o.name.lower() in used for o in outputs.values()) and not any(
                    same_file(o, p) for o in outputs.values() for _, p in protected):
                break
            k += 1
            candidate = f"{stem.encode()[:limit - 8].decode('utf-8', 'ignore')}_out{k}"
        used.update(o.name.lower() for o in outputs.values())
        plan.append(outputs)
    return plan


# ---------------------------------------------------------------------------- the writer

def _write_heatmap(result, image, report, tmp: Path, final: Path) -> None:
    write_image_to(result.heatmap, tmp, final)


def _write_regions(result, image, report, tmp: Path, final: Path) -> None:
    write_image_to(result.region_labels, tmp, final)


def _write_png(result, image, report, tmp: Path, final: Path) -> None:
    from .quicklook import write_quicklook

    top = result.regions[0].centre_ras if result.regions else None
    with writing(final):
        write_quicklook(image, result.heatmap, tmp, top, result.threshold,
                        title=f"percentile {result.volume_percentile:.0f}")
    _verify_png(tmp, final)


def _write_report(result, image, report, tmp: Path, final: Path) -> None:
    write_json_to(result.to_report() if report is None else report, tmp, final)


_WRITERS = {"heatmap": _write_heatmap, "regions": _write_regions, "png": _write_png, "report": _write_report}


def _verify_png(written: Path, final) -> None:
    from PIL import Image

    try:
        with Image.open(written) as picture:
            picture.load()
    except (OSError, SyntaxError, ValueError):
        raise OutputError(f"writing {final} failed: the file on disk is incomplete (disk full or over the file "
                          "size limit?)") from None


def write_outputs(result, outputs: Mapping[str, str | os.PathLike | None], image=None,
                  report: dict | None = None) -> dict[str, Path]:
    """Write a detection result's outputs, all or nothing: the one writer of detection outputs (the single-scan
    CLI, its threaded and Dask batches, the Slicer module's batch).

    `outputs`: {kind: final path} for the kinds heatmap, regions, png and report (a kind whose path is None is
    not written). `image`, the scan, is needed for the PNG; when given, the heatmap must lie on its grid.
    `report` replaces the result's own report. Returns {kind: final path} of what was written."""
    wanted = {kind: Path(path) for kind, path in outputs.items() if path}
    unknown = set(wanted) - set(_WRITERS)
    if unknown:
        raise ValueError(f"write_outputs writes {', '.join(_WRITERS)}, not {', '.join(sorted(unknown))}")
    if "png" in wanted and image is None:
        raise ValueError("the quick-look PNG needs the scan")
    if image is not None and ("heatmap" in wanted or "png" in wanted) and not same_geometry(result.heatmap, image):
        raise RuntimeError("the heatmap's grid differs from the scan's; nothing was written")
    with atomic_files() as files:
        for kind, write in _WRITERS.items():
            if kind in wanted:
                write(result, image, report, files.path(wanted[kind]), wanted[kind])
        files.commit()
    return wanted
