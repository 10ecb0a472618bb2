"""Command line: `python -m cradl {detect,train,synth-normals,synth-anomalies,info,demo,...}`.

Every user-fixable problem ends with one line on stderr and exit status 2; nothing is half-written.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import sys
import traceback
from pathlib import Path

from .errors import CradlError, InputError
from .io import IMAGE_SUFFIXES, atomic_files, is_image_path, read_image, write_image, write_json

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2, as argparse does, but naming the command
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if getattr(args, "quiet", False):
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.WARNING)  # the console only: a --log file still gets every epoch
    try:
        return args.run(args) or EXIT_OK
    except CradlError as exc:
        print(f"cradl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cradl: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user error: say so in one line unless debugging
        if os.environ.get("CRADL_DEBUG"):
            traceback.print_exc()
        print(f"cradl: internal error: {type(exc).__name__}: {exc} (set CRADL_DEBUG=1 for details)", file=sys.stderr)
        return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cradl", description="CRADL anomaly detection and localization in brain MRI "
                     "(Lüth et al., arXiv 2301.02126).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_detect(sub)
    _add_train(sub)
    _add_calibrate(sub)
    _add_synth(sub)
    _add_info(sub)
    _add_demo(sub)
    from .evaluate import commands as evaluate_commands, speed
    evaluate_commands.register(sub)
    speed.add_parser(sub)
    return parser


# ---------------------------------------------------------------------------- detect

def _add_detect(sub):
    p = sub.add_parser("detect", help="detect and localize anomalies in one or more scans",
                       description="Score scans against the normal model and write a heatmap on each scan's own "
                       "grid, a JSON report and optionally a three-plane PNG. Several inputs, a folder, or "
                       "--out-dir run batch mode.")
    p.add_argument("inputs", nargs="+", help="NIfTI/NRRD/MHA files, DICOM series folders, or folders of scans")
    p.add_argument("--heatmap", help="heatmap output (.nii.gz, .nrrd, .mha); single input only")
    p.add_argument("--report", help="JSON report output; single input only")
    p.add_argument("--png", help="three-plane quick-look PNG; single input only")
    p.add_argument("--out-dir", help="batch mode: write NAME_heatmap.nii.gz, NAME_report.json, NAME.png here")
    p.add_argument("--model", help="model bundle (.cradl); default: the bundled model")
    p.add_argument("--mask", help="brain mask for the input (instead of the template's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-heatmap", action="store_true", help="scores only (faster): no heatmap, regions or PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only errors")
    p.set_defaults(run=run_detect)


def _expand_inputs(inputs) -> list[Path]:
    paths = []
    for item in map(Path, inputs):
        if item.is_dir() and not _is_dicom_folder(item):
            found = sorted(p for p in item.iterdir() if is_image_path(p))
            found += sorted(p for p in item.iterdir() if p.is_dir() and _is_dicom_folder(p))
            if not found:
                raise InputError(f"folder {item} holds no scans ({', '.join(IMAGE_SUFFIXES)} or DICOM series)")
            paths += found
        else:
            paths.append(item)
    return paths


def _is_dicom_folder(folder: Path) -> bool:
    import SimpleITK as sitk
    return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def scan_stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _check_writable(path: str | None) -> None:
    if path is None:
        return
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise CradlError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CradlError(f"cannot write {path}: folder {parent} is not writable")


def run_detect(args) -> int:
    from .detector import AnomalyDetector

    paths = _expand_inputs(args.inputs)
    first = Path(args.inputs[0])
    batch = args.out_dir is not None or len(paths) > 1 or (first.is_dir() and not _is_dicom_folder(first))
    if batch and (args.heatmap or args.report or args.png):
        raise CradlError("with several inputs use --out-dir instead of --heatmap/--report/--png")
    if not batch and not (args.heatmap or args.report or args.png):
        raise CradlError("say where to write results: --heatmap, --report, --png or --out-dir")
    if args.no_heatmap and (args.heatmap or args.png):
        raise CradlError("--no-heatmap computes scores only; drop --heatmap/--png")
    for out in (args.heatmap, args.report, args.png):
        _check_writable(out)
    if batch:
        out_dir = Path(args.out_dir or ".")
        out_dir.mkdir(parents=True, exist_ok=True)
        _check_writable(str(out_dir / "x"))
    mask = read_image(args.mask, what="brain mask") if args.mask else None
    detector = AnomalyDetector.load(args.model, device=args.device)
    if not batch:
        image = read_image(paths[0])
        result = _detect_one(detector, paths[0], image, mask, args, progress=not args.quiet)
        _write_outputs(result, image, args.heatmap, args.report, args.png)
        _print_summary(paths[0], result)
        return EXIT_OK
    return _run_batch(detector, paths, mask, args, out_dir)


def _detect_one(detector, path, image, mask, args, progress: bool):
    from tqdm import tqdm

    bar = tqdm(total=100, desc=path.name, unit="%", disable=not progress, leave=False,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def report(fraction, message):
        bar.n = int(100 * fraction)
        bar.set_postfix_str(message)

    try:
        result = detector.detect(image, mask=mask, heatmap=not args.no_heatmap, progress=report)
    finally:
        bar.close()
    result.source = str(path)
    return result


def _write_outputs(result, image, heatmap_path, report_path, png_path) -> None:
    """Write what was asked for, all or nothing."""
    from .quicklook import write_quicklook

    with atomic_files() as files:
        if heatmap_path:
            write_image(result.heatmap, files.path(heatmap_path))
        if png_path:
            top = result.regions[0].centre_ras if result.regions else None
            write_quicklook(image, result.heatmap, files.path(png_path), top, result.threshold,
                            title=f"percentile {result.volume_percentile:.0f}")
        if report_path:
            write_json(result.to_report(), files.path(report_path))
        files.commit()


def _print_summary(path: Path, result) -> None:
    print(f"{path.name}: volume score {result.volume_score:.2f}, percentile {result.volume_percentile:.1f} "
          f"against normal scans ({result.to_report()['interpretation']})")
    for region in result.regions[:5]:
        x, y, z = region.centre_ras
        print(f"  region {region.rank}: centre RAS ({x:.1f}, {y:.1f}, {z:.1f}) mm, "
              f"{region.volume_mm3:.0f} mm3, peak {region.peak:.2f}")
    if result.heatmap is not None and not result.regions:
        print("  no region above the calibrated threshold")


def _unique_stems(paths: list[Path]) -> list[str]:
    """Output names per input; scan.nii.gz and scan.nrrd must not overwrite each other's results."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        stem = scan_stem(path)
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def _run_batch(detector, paths, mask, args, out_dir: Path) -> int:
    """One model, many scans; the next scan is read while the current one is processed."""
    from tqdm import tqdm

    failures, stems = [], _unique_stems(paths)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read_image, paths[0])
        for i, path in enumerate(tqdm(paths, desc="scans", unit="scan", disable=args.quiet)):
            try:
                image = pending.result()
            except CradlError as exc:
                image, error = None, exc
            if i + 1 < len(paths):
                pending = reader.submit(read_image, paths[i + 1])
            try:
                if image is None:
                    raise error
                result = _detect_one(detector, path, image, mask, args, progress=False)
                stem = stems[i]
                heatmap = None if args.no_heatmap else out_dir / f"{stem}_heatmap.nii.gz"
                png = None if args.no_heatmap else out_dir / f"{stem}.png"
                _write_outputs(result, image, heatmap, out_dir / f"{stem}_report.json", png)
                if not args.quiet:
                    tqdm.write(f"{path.name}: percentile {result.volume_percentile:.1f}, "
                               f"{len(result.regions)} region(s)")
            except CradlError as exc:
                failures.append((path, str(exc)))
                tqdm.write(f"{path.name}: FAILED: {exc}", file=sys.stderr)
    print(f"{len(paths) - len(failures)} of {len(paths)} scans done; results in {out_dir}")
    if failures:
        print(f"cradl: error: {len(failures)} scan(s) failed:", file=sys.stderr)
        for path, message in failures:
            print(f"  {path}: {message}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


# ---------------------------------------------------------------------------- train

def _add_normals_and_bundle_out(p):
    p.add_argument("--normal", nargs="+", required=True, help="folders of normal scans")
    p.add_argument("--out", required=True, help="model bundle to write (.cradl)")


def _check_bundle_out(path: str) -> None:
    if not path.endswith(".cradl"):
        raise CradlError("--out must end with .cradl")
    _check_writable(path)


def _add_train(sub):
    from .train.trainer import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train a model on folders of normal scans",
                       description="SimCLR on 2D slices of normal scans, a Gaussian mixture on the encoder's "
                       "features, calibration on held-out normal scans; writes one model bundle. Resumes from "
                       "OUT.ckpt and OUT.prep.npz when they exist (delete them to start over).")
    _add_normals_and_bundle_out(p)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--slice-size", type=int, default=d.slice_size)
    p.add_argument("--spacing", type=float, default=d.spacing_mm, help="reference grid spacing in mm")
    p.add_argument("--width", type=int, default=d.width, help="encoder width (channels of the first stage)")
    p.add_argument("--feature-dim", type=int, default=d.feature_dim)
    p.add_argument("--grid", type=int, default=d.grid,
                   help="encoder pooling grid: 1 = global pooling; >1 keeps a coarse spatial layout")
    p.add_argument("--geometry", choices=["strong", "light"], default=d.geometry,
                   help="geometric augmentation: SimCLR's crops and flips, or light jitter for aligned slices")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--components", type=int, nargs="+", default=list(d.gmm_components),
                   help="mixture sizes to try; the best held-out likelihood wins")
    p.add_argument("--name", default=d.name)
    p.add_argument("--version", default=d.version)
    p.add_argument("--description", default="")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--log", help="also append the training log to this file")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars or epoch lines on the console (--log still records every epoch)")
    p.set_defaults(run=run_train)


def run_train(args) -> int:
    from .train.trainer import TrainConfig, train_model

    _check_bundle_out(args.out)
    if args.log:
        handler = logging.FileHandler(args.log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logging.getLogger("cradl").addHandler(handler)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, slice_size=args.slice_size,
                         spacing_mm=args.spacing, width=args.width, feature_dim=args.feature_dim,
                         grid=args.grid, geometry=args.geometry,
                         learning_rate=args.learning_rate, gmm_components=tuple(args.components), name=args.name,
                         version=args.version, description=args.description, seed=args.seed)
    out = train_model(args.normal, args.out, config, device=args.device, resume=not args.no_resume,
                      progress=not args.quiet)
    print(f"wrote {out}")
    return EXIT_OK


def _add_calibrate(sub):
    p = sub.add_parser("calibrate", help="re-derive a model's normal statistics from your own normal scans",
                       description="Keeps the encoder and mixture; recomputes the per-position slice statistics, "
                       "the volume-score percentiles and the heatmap scale and threshold from normal scans the "
                       "model was not trained on (at least 4; e.g. your scanner's), and writes a new bundle.")
    _add_normals_and_bundle_out(p)
    p.add_argument("--model", help="model bundle to start from; default: the bundled model")
    p.add_argument("--smoothing", type=float, nargs=2, metavar=("IN_PLANE_PX", "ACROSS_SLICES_PX"),
                   help="Gaussian sigmas of the heatmap post-processing; default: the model's")
    p.add_argument("--false-alarm-quantile", type=float,
                   help="quantile, over the normal scans, of the heatmap level a region needs to be shown "
                   "(higher: fewer false regions, fewer detections); default: the model's")
    p.add_argument("--version", help="version of the new bundle; default: the model's")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_calibrate)


def run_calibrate(args) -> int:
    from .train.trainer import recalibrate_model

    _check_bundle_out(args.out)
    overrides = None
    if args.smoothing:
        if min(args.smoothing) < 0:
            raise CradlError("--smoothing sigmas must be zero or positive")
        overrides = {"gaussian_sigma_px": args.smoothing[0], "gaussian_sigma_z_px": args.smoothing[1]}
    if args.false_alarm_quantile is not None and not 0 < args.false_alarm_quantile <= 1:
        raise CradlError("--false-alarm-quantile must be in (0, 1]")
    out = recalibrate_model(args.model, args.normal, args.out, overrides, args.false_alarm_quantile, args.version,
                            device=args.device, progress=not args.quiet)
    print(f"wrote {out}")
    return EXIT_OK


# ---------------------------------------------------------------------------- synthetic data

def _add_synth(sub):
    p = sub.add_parser("synth-normals", help="generate a synthetic cohort of normal brains from the MNI template")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_synth_normals)
    p = sub.add_parser("synth-anomalies", help="insert labelled anomalies into held-out synthetic normal scans")
    p.add_argument("--normal", required=True, help="folder written by synth-normals (never the training one)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", type=float, nargs="+", default=[5, 10, 20, 35, 50], help="diameters in mm")
    p.add_argument("--per-combination", type=int, default=1, help="cases per (type, size)")
    p.add_argument("--normals", type=int, default=10, help="unmodified normal scans to include")
    p.set_defaults(run=run_synth_anomalies)


def run_synth_normals(args) -> int:
    from .train.synthetic import generate_normal_cohort

    if args.n < 1:
        raise CradlError("--n must be at least 1")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    paths = generate_normal_cohort(args.out, args.n, args.seed)
    print(f"wrote {len(paths)} normal scans to {args.out}")
    return EXIT_OK


def run_synth_anomalies(args) -> int:
    from .evaluate.anomalies import generate_anomaly_set

    Path(args.out).mkdir(parents=True, exist_ok=True)
    manifest = generate_anomaly_set(args.normal, args.out, args.seed, sizes_mm=tuple(args.sizes),
                                    n_per_combo=args.per_combination, n_normals=args.normals)
    print(f"wrote {manifest}")
    return EXIT_OK


# ---------------------------------------------------------------------------- info, demo

def _add_info(sub):
    p = sub.add_parser("info", help="show a model bundle's manifest summary")
    p.add_argument("--model", help="model bundle; default: the bundled model")
    p.set_defaults(run=run_info)


def run_info(args) -> int:
    import json

    from .bundle import load_bundle

    m = load_bundle(args.model).manifest
    summary = {k: m[k] for k in ("name", "version", "description", "created", "gmm", "reference")}
    summary["training"] = {k: v for k, v in m["training"].items() if k != "loss_per_epoch"}
    summary["localization"] = m["localization"]
    calibration = m["calibration"]
    summary["calibration"] = {"volume_aggregate": calibration.get("volume_aggregate"),
                              "n_scans": calibration.get("n_scans"),
                              "region_threshold": calibration.get("voxel_threshold"),
                              "min_region_mm3": calibration.get("min_region_mm3")}
    if "recalibrations" in m:
        summary["recalibrations"] = m["recalibrations"]
    print(json.dumps(summary, indent=1))
    return EXIT_OK


def _add_demo(sub):
    p = sub.add_parser("demo", help="generate a sample abnormal scan and run detection on it")
    p.add_argument("--out-dir", default="demo_out")
    p.add_argument("--model", help="model bundle; default: the bundled model")
    p.add_argument("--seed", type=int, default=2024, help="seed of the generated scan and lesion")
    p.set_defaults(run=run_demo)


def run_demo(args) -> int:
    import json

    from .evaluate.anomalies import insert_anomaly
    from .train.synthetic import make_normal_scan
    import numpy as np

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    image, labels = make_normal_scan(rng, contrast="t1")
    abnormal, lesion = insert_anomaly(image, labels, "tumour", 30.0, rng, contrast="t1")
    write_image(abnormal, out / "sample_scan.nii.gz")
    write_image(lesion, out / "sample_lesion_mask.nii.gz")
    print(f"sample abnormal scan (tumour-like lesion, 30 mm): {out / 'sample_scan.nii.gz'}")
    argv = ["detect", str(out / "sample_scan.nii.gz"), "--heatmap", str(out / "sample_heatmap.nii.gz"),
            "--report", str(out / "sample_report.json"), "--png", str(out / "sample.png")]
    if args.model:
        argv += ["--model", args.model]
    parsed = build_parser().parse_args(argv)
    status = run_detect(parsed)
    report = json.loads((out / "sample_report.json").read_text())
    if report["regions"]:
        import SimpleITK as sitk
        from .regions import find_regions

        heatmap = sitk.ReadImage(str(out / "sample_heatmap.nii.gz"))
        _, labels = find_regions(heatmap, report["threshold"], report["min_region_mm3"])
        overlap = np.logical_and(sitk.GetArrayViewFromImage(labels) == 1, sitk.GetArrayViewFromImage(lesion) > 0)
        print(f"top region {'overlaps' if overlap.any() else 'misses'} the inserted lesion "
              f"({int(overlap.sum())} voxels in common)")
    print(f"wrote {out}/sample_heatmap.nii.gz, sample_report.json, sample.png")
    return status
