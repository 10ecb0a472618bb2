"""Command line: `python -m cradl {detect,train,synth-normals,synth-anomalies,info,demo,...}`.

Every user-fixable problem ends with one line on stderr and exit status 2; nothing is half-written.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from .atomic import check_output_folder, check_output_path, writing
from .errors import CradlError, InputError, OutputError, one_line, scan_failure
from .io import IMAGE_SUFFIXES, find_scans, is_image_path, read_image, stderr_lock
from .manifest import ATTRIBUTIONS
from .outputs import (CLI_KINDS, SCORES_ONLY, SUFFIXES, batch_plan, model_path, output_names, protected_files,
                      refuse_clashes, write_outputs)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_TERMINATED = 128 + signal.SIGTERM


class _Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so every `finally` (temporary files) runs as on Ctrl-C."""


def _on_sigterm(signum, frame):
    raise _Terminated()


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
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return args.run(args) or EXIT_OK
    except CradlError as exc:
        print(f"cradl: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cradl: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    except _Terminated:
        print("cradl: terminated; no partial output was kept", file=sys.stderr)
        return EXIT_TERMINATED
    except BrokenPipeError:  # `cradl info | head`: the reader left; nothing to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as exc:  # a bug, not a user error: say so in one line unless debugging
        if os.environ.get("CRADL_DEBUG"):
            traceback.print_exc()
        print(f"cradl: internal error: {type(exc).__name__}: {one_line(exc)} (set CRADL_DEBUG=1 for details)",
              file=sys.stderr)
        return EXIT_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


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
    evaluate_commands.register_real(sub)
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
    p.add_argument("--seg", help="regions as a DICOM Segmentation (.dcm); a DICOM series input only")
    p.add_argument("--pmap", help="heatmap as a DICOM Parametric Map (.dcm); a DICOM series input only")
    p.add_argument("--overlay", help="folder for the heatmap blended over the scan as a DICOM Secondary Capture "
                   "series (for viewers without Parametric Maps); a DICOM series input only")
    p.add_argument("--out-dir", help="batch mode: write " + ", ".join(output_names("NAME", CLI_KINDS).values())
                   + " here")
    p.add_argument("--model", help="model bundle (.cradl); default: the bundled model")
    p.add_argument("--mask", help="brain mask for the input (instead of the template's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-heatmap", action="store_true", help="scores only (faster): no heatmap, regions or PNG")
    p.add_argument("--workers", type=int, help="batch mode on a local Dask cluster of N worker processes "
                   "(resumable; writes summary.csv, summary.json and worklist.html)")
    p.add_argument("--scheduler", help="batch mode on an existing Dask cluster at this scheduler address "
                   "(e.g. tcp://host:8786; workers must see the inputs, --out-dir and the model)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only errors")
    p.set_defaults(run=run_detect)


def expand_inputs(inputs) -> list[Path]:
    """The scans named on a command line: files and DICOM series folders as they are, the scans directly inside
    any other folder (sorted). Shared by `detect` and the batch benchmark, so both see the same inputs."""
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


def run_detect(args) -> int:
    paths = expand_inputs(args.inputs)
    first = Path(args.inputs[0])
    batch = args.out_dir is not None or len(paths) > 1 or (first.is_dir() and not _is_dicom_folder(first))
    on_dask = args.workers is not None or bool(args.scheduler)
    _check_detect_options(args, batch, on_dask, first)
    protected = protected_files([("input", p) for p in paths] + ([("--mask", Path(args.mask))] if args.mask else [])
                                + [("--model", model_path(args.model))])
    if not batch:
        return _detect_single(args, paths[0], protected)
    out_dir = _batch_folder(args.out_dir)
    plan = batch_plan(paths, out_dir, SCORES_ONLY if args.no_heatmap else CLI_KINDS, protected,
                      dicom=on_dask and not args.no_heatmap)
    if on_dask:
        from .batch import run_dask_batch

        return run_dask_batch(paths, plan, out_dir, model=args.model, device=args.device, mask=args.mask,
                              no_heatmap=args.no_heatmap, scheduler=args.scheduler, workers=args.workers,
                              quiet=args.quiet)
    detector, mask = _detector_and_mask(args)
    return _run_batch(detector, paths, mask, args, out_dir, plan)


def _check_detect_options(args, batch: bool, on_dask: bool, first: Path) -> None:
    """Refuse, before any work, options that do not go together."""
    single_outputs = args.heatmap or args.report or args.png
    if batch and single_outputs:
        raise CradlError("with several inputs use --out-dir instead of --heatmap/--report/--png")
    dicom_outputs = args.seg or args.pmap or args.overlay
    if not batch and not (single_outputs or dicom_outputs):
        raise CradlError("say where to write results: --heatmap, --report, --png or --out-dir")
    if args.no_heatmap and (args.heatmap or args.png):
        raise CradlError("--no-heatmap computes scores only; drop --heatmap/--png")
    if dicom_outputs:
        _check_dicom_options(args, batch, first)
    if on_dask and not batch:
        raise CradlError("--workers and --scheduler run batch mode: use --out-dir instead of "
                         "--heatmap/--report/--png")


def _check_dicom_options(args, batch: bool, first: Path) -> None:
    if batch:
        raise CradlError(f"--seg/--pmap/--overlay are for one input; in batch mode with --workers or --scheduler "
                         f"a DICOM series input gets NAME{SUFFIXES['seg']}, NAME{SUFFIXES['pmap']} and "
                         f"NAME{SUFFIXES['overlay']}/ in --out-dir")
    if not (first.is_dir() and _is_dicom_folder(first)):
        raise CradlError("--seg, --pmap and --overlay need a DICOM series input (a folder holding one series)")
    if args.no_heatmap:
        raise CradlError("--no-heatmap computes scores only; drop --seg/--pmap/--overlay")


def _detector_and_mask(args):
    """The model and the --mask image. Both files are checked before torch is imported (a second or more), so
    a missing, foreign or tampered model or a bad mask is refused at once."""
    from .bundle import read_manifest

    mask = read_image(args.mask, what="brain mask") if args.mask else None
    read_manifest(args.model)
    from .detector import AnomalyDetector

    return AnomalyDetector.load(args.model, device=args.device), mask


def _detect_single(args, path: Path, protected) -> int:
    """One scan to the files named by --heatmap, --report, --png, --seg and --pmap, and the --overlay folder."""
    dicom_outputs = [(flag, Path(value)) for flag, value in
                     (("--seg", args.seg), ("--pmap", args.pmap), ("--overlay", args.overlay)) if value]
    outputs = [(flag, Path(value)) for flag, value in
               (("--heatmap", args.heatmap), ("--report", args.report), ("--png", args.png)) if value]
    outputs += dicom_outputs
    for flag, out in outputs:
        if flag == "--overlay":  # a folder, replaced whole: only an earlier overlay may be there
            from .dicom_out import OVERLAY_FILE

            check_output_folder(out, OVERLAY_FILE.fullmatch)
        else:
            check_output_path(out)
    refuse_clashes(outputs, protected)
    image = read_image(path)  # before the model: a file that cannot be read is refused at once
    detector, mask = _detector_and_mask(args)
    result = _detect_one(detector, path, image, mask, args, progress=not args.quiet)
    if dicom_outputs:  # built before anything is written: a series that does not map refuses early
        from .dicom_out import build_dicom_results, save_dicom_results

        dicom = build_dicom_results(path, result, detector.model_summary(), args.seg, args.pmap, args.overlay)
    write_outputs(result, {"heatmap": args.heatmap, "report": args.report, "png": args.png}, image)
    if dicom_outputs:
        written = save_dicom_results(dicom)
        if args.seg and written["seg"] is None:
            print(f"no region above the threshold: no DICOM Segmentation written to {args.seg}")
    _print_summary(path, result)
    return EXIT_OK


def _batch_folder(out_dir) -> Path:
    """The --out-dir folder, made when missing; refused when it is a file or cannot be written."""
    out_dir = Path(out_dir or ".")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out-dir {out_dir} is a file, not a folder")
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    check_output_path(out_dir / "x")
    return out_dir


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


def _print_summary(path: Path, result) -> None:
    print(f"{path.name}: volume score {result.volume_score:.2f}, percentile {result.volume_percentile:.1f} "
          f"against normal scans ({result.interpretation})")
    for warning in result.warnings:
        print(f"  warning: {warning}")
    for region in result.regions[:5]:
        x, y, z = region.centre_ras
        print(f"  region {region.rank}: centre RAS ({x:.1f}, {y:.1f}, {z:.1f}) mm, "
              f"{region.volume_mm3:.0f} mm3, peak {region.peak:.2f}")
    if result.heatmap is not None and not result.regions:
        print("  no region above the calibrated threshold")


def _say_error(message: str) -> None:
    from tqdm import tqdm

    with stderr_lock():  # a reading thread may be capturing library messages on fd 2
        tqdm.write(message, file=sys.stderr)


def _run_batch(detector, paths, mask, args, out_dir: Path, plan) -> int:
    """One model, many scans; the next scan is read while the current one is processed. A scan that fails
    (bad input, full disk, anything) is reported and the batch goes on."""
    from tqdm import tqdm

    failures = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read_image, paths[0])
        for i, path in enumerate(tqdm(paths, desc="scans", unit="scan", disable=args.quiet)):
            try:
                image, error = pending.result(), None
            except Exception as exc:  # noqa: BLE001 - reported with the scan, below
                image, error = None, exc
            if i + 1 < len(paths):
                pending = reader.submit(read_image, paths[i + 1])
            try:
                if error is not None:
                    raise error
                result = _detect_one(detector, path, image, mask, args, progress=False)
                write_outputs(result, plan[i], image)
                if not args.quiet:
                    tqdm.write(f"{path.name}: percentile {result.volume_percentile:.1f}, "
                               f"{len(result.regions)} region(s) -> {plan[i]['report'].name}")
            except Exception as exc:  # noqa: BLE001 - a bug on one scan must not cost the others
                failures.append((path, scan_failure(exc)))
                _say_error(f"{path.name}: FAILED: {failures[-1][1]}")
    print(f"{len(paths) - len(failures)} of {len(paths)} scans done; results in {out_dir}")
    if failures:
        with stderr_lock():
            print(f"cradl: error: {len(failures)} scan(s) failed:", file=sys.stderr)
            for path, message in failures:
                print(f"  {path}: {message}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


# ---------------------------------------------------------------------------- train

def _add_normals_and_bundle_out(p):
    p.add_argument("--normal", nargs="+", required=True, help="folders of normal scans")
    p.add_argument("--out", required=True, help="model bundle to write (.cradl)")


def check_bundle_out(path: str) -> None:
    """--out of a command that writes a model bundle: a .cradl file that can be written."""
    if not path.endswith(".cradl"):
        raise CradlError("--out must end with .cradl")
    check_output_path(path)


def _check_resume_files(out: Path) -> None:
    """A resume checkpoint or preparation cache that is not ours (a planted pickle, a damaged file) is
    refused with one line; torch.load(weights_only=True) never runs a pickle's payload."""
    import zipfile

    import numpy as np

    checkpoint = out.with_suffix(".ckpt")
    if checkpoint.exists():
        import torch

        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure means the same to the user
            raise InputError(f"cannot resume from {checkpoint}: not a checkpoint written by cradl train "
                             f"({type(exc).__name__}); delete it or pass --no-resume") from None
        needed = {"encoder", "head", "optimiser", "schedule", "history", "epoch", "steps_per_epoch", "epochs"}
        if not isinstance(state, dict) or not needed <= set(state):
            raise InputError(f"cannot resume from {checkpoint}: it lacks the training state; "
                             "delete it or pass --no-resume")
    cache = out.with_suffix(".prep.npz")
    if cache.exists():
        try:
            with zipfile.ZipFile(cache) as archive:
                for info in archive.infolist():
                    with archive.open(info) as member:
                        version = np.lib.format.read_magic(member)
                        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                       else np.lib.format.read_array_header_2_0)
                        _, _, dtype = read_header(member)
                    if dtype.hasobject:
                        raise ValueError("object array")
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"cannot use the preparation cache {cache}: not written by cradl train "
                             f"({type(exc).__name__}); delete it or pass --no-resume") from None


def _add_train(sub):
    # The defaults are TrainConfig's, filled in by run_train: importing the trainer here would import torch
    # for every command, `cradl --help` included.
    p = sub.add_parser("train", help="train a model on folders of normal scans",
                       description="SimCLR on 2D slices of normal scans, a Gaussian mixture on the encoder's "
                       "features, calibration on held-out normal scans; writes one model bundle. Resumes from "
                       "OUT.ckpt and OUT.prep.npz when they exist (delete them to start over).")
    _add_normals_and_bundle_out(p)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--slice-size", type=int)
    p.add_argument("--spacing", type=float, help="reference grid spacing in mm")
    p.add_argument("--width", type=int, help="encoder width (channels of the first stage)")
    p.add_argument("--feature-dim", type=int)
    p.add_argument("--grid", type=int,
                   help="encoder pooling grid: 1 = global pooling; >1 keeps a coarse spatial layout")
    p.add_argument("--geometry", choices=["strong", "light"],
                   help="geometric augmentation: SimCLR's crops and flips, or light jitter for aligned slices")
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--bias-correction", choices=["n4", "none"], default="none",
                   help="N4 bias-field correction of every scan before alignment, in training and in every later "
                   "detection with the model (a second or more per scan; it helped on the IXI heads, see the README)")
    p.add_argument("--components", type=int, nargs="+", help="mixture sizes to try; the best held-out likelihood wins")
    add_attribution_option(p, "gradient_x_deviation")
    p.add_argument("--name")
    p.add_argument("--version")
    p.add_argument("--description")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--nproc", type=int, default=1,
                   help="train the encoder in N processes (PyTorch DistributedDataParallel; gloo on CPU, nccl on "
                   "GPU); under torchrun the processes torchrun started are used")
    p.add_argument("--log", help="also append the training log to this file")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars or epoch lines on the console (--log still records every epoch)")
    p.set_defaults(run=run_train)


def _train_config(args):
    """The options given on the command line over TrainConfig's defaults."""
    from .train.trainer import TrainConfig

    given = {"epochs": args.epochs, "batch_size": args.batch_size, "slice_size": args.slice_size,
             "spacing_mm": args.spacing, "width": args.width, "feature_dim": args.feature_dim, "grid": args.grid,
             "geometry": args.geometry, "learning_rate": args.learning_rate,
             "gmm_components": tuple(args.components) if args.components else None, "name": args.name,
             "version": args.version, "description": args.description, "seed": args.seed,
             "normalisation": bias_corrected(args.bias_correction)}
    config = TrainConfig(**{key: value for key, value in given.items() if value is not None})
    if args.attribution:
        config.localization["attribution"] = args.attribution
    return config


def bias_corrected(choice: str) -> dict:
    """The normalisation settings for `--bias-correction`: the default ones, with N4 for 'n4'."""
    from .preprocess import DEFAULT_NORMALISATION

    return {**DEFAULT_NORMALISATION, **({"bias_correction": "n4"} if choice == "n4" else {})}


def run_train(args) -> int:
    # Every check before the trainer (and torch) is imported: a wrong option is refused at once
    if args.nproc < 1:
        raise CradlError("--nproc must be at least 1")
    check_bundle_out(args.out)
    out = Path(args.out)
    protected = protected_files([("normal scan", p) for p in find_scans(args.normal)])
    outputs = [("--out", out), ("checkpoint", out.with_suffix(".ckpt")), ("cache", out.with_suffix(".prep.npz"))]
    if args.log:
        check_output_path(args.log)
        outputs.append(("--log", Path(args.log)))
    refuse_clashes(outputs, protected)
    if not args.no_resume:
        _check_resume_files(out)
    if args.log:
        with writing(args.log):
            handler = logging.FileHandler(args.log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logging.getLogger("cradl").addHandler(handler)
    config = _train_config(args)
    from .train.distributed import train_distributed, under_torchrun

    if args.nproc > 1 or under_torchrun():
        out = train_distributed(args.normal, args.out, config, nproc=args.nproc, device=args.device,
                                resume=not args.no_resume, progress=not args.quiet)
        if under_torchrun() and os.environ.get("RANK") != "0":
            return EXIT_OK
    else:
        from .train.trainer import train_model

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
    add_heatmap_options(p)
    p.add_argument("--version", help="version of the new bundle; default: the model's")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run_calibrate)


def add_heatmap_options(p) -> None:
    """The heatmap settings a recalibration may change (calibrate, calibrate-real); `heatmap_overrides` reads
    and checks them."""
    p.add_argument("--smoothing", type=float, nargs=2, metavar=("IN_PLANE_PX", "ACROSS_SLICES_PX"),
                   help="Gaussian sigmas of the heatmap post-processing; default: the model's")
    p.add_argument("--slice-weighting", type=float, metavar="Z_SCALE",
                   help="weight each slice's heatmap by exp(z / Z_SCALE) of its score's z-score; 0 turns it off; "
                   "default: the model's")
    p.add_argument("--false-alarm-quantile", type=float,
                   help="quantile, over the normal scans, of the heatmap level a region needs to be shown "
                   "(higher: fewer false regions, fewer detections); default: the model's")
    add_attribution_option(p, "the model's")


def add_attribution_option(p, default: str) -> None:
    p.add_argument("--attribution", choices=ATTRIBUTIONS,
                   help="heatmap: the score's gradient (the CRADL paper), or the gradient times each pixel's "
                   f"difference from the normal scans' mean (needs normal scans of one contrast); default: {default}")


def heatmap_overrides(args) -> dict | None:
    overrides = {}
    if args.smoothing:
        if min(args.smoothing) < 0:
            raise CradlError("--smoothing sigmas must be zero or positive")
        overrides.update(gaussian_sigma_px=args.smoothing[0], gaussian_sigma_z_px=args.smoothing[1])
    if args.slice_weighting is not None:
        if args.slice_weighting < 0:
            raise CradlError("--slice-weighting must be zero or positive")
        overrides["slice_weight_z_scale"] = args.slice_weighting
    if args.attribution:
        overrides["attribution"] = args.attribution
    if args.false_alarm_quantile is not None and not 0 < args.false_alarm_quantile <= 1:
        raise CradlError("--false-alarm-quantile must be in (0, 1]")
    return overrides or None


def run_calibrate(args) -> int:
    check_bundle_out(args.out)
    protected = protected_files([("normal scan", p) for p in find_scans(args.normal)]
                                + [("--model", model_path(args.model))])
    refuse_clashes([("--out", Path(args.out))], protected)
    overrides = heatmap_overrides(args)
    from .train.trainer import recalibrate_model

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
    from .synthetic.sets import generate_normal_cohort

    if args.n < 1:
        raise CradlError("--n must be at least 1")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    paths = generate_normal_cohort(args.out, args.n, args.seed)
    print(f"wrote {len(paths)} normal scans to {args.out}")
    return EXIT_OK


def run_synth_anomalies(args) -> int:
    from .synthetic.sets import generate_anomaly_set

    Path(args.out).mkdir(parents=True, exist_ok=True)
    manifest = generate_anomaly_set(args.normal, args.out, args.seed, sizes_mm=tuple(args.sizes),
                                    n_per_combo=args.per_combination, n_normals=args.normals)
    print(f"wrote {manifest}")
    return EXIT_OK


# ---------------------------------------------------------------------------- info, demo

def _add_info(sub):
    p = sub.add_parser("info", help="show a model bundle's manifest summary and fingerprint",
                       description="The fingerprint (sha256 of the manifest, which lists every array's sha256) "
                       "identifies the bundle's whole content: compare it with one published by a source you trust.")
    p.add_argument("--model", help="model bundle; default: the bundled model")
    p.set_defaults(run=run_info)


def run_info(args) -> int:
    import json

    from .bundle import read_manifest  # not load_bundle: the card needs no network, so no torch

    m, fingerprint = read_manifest(args.model)
    stored = m.stored
    summary = {"fingerprint": fingerprint, "name": m.name, "version": m.version, "description": m.description,
               "created": m.created, "gmm": m.gmm, "reference": stored["reference"], "contrasts": m.contrasts}
    summary["training"] = {k: v for k, v in m.training.items() if k not in ("loss_per_epoch", "data_split")}
    summary["localization"] = m.localization
    calibration = m.calibration
    summary["calibration"] = {"volume_aggregate": calibration.get("volume_aggregate"),
                              "n_scans": calibration.get("n_scans"),
                              "region_threshold": calibration.get("voxel_threshold"),
                              "min_region_mm3": calibration.get("min_region_mm3")}
    if m.recalibrations:
        summary["recalibrations"] = list(m.recalibrations)
    summary["format_version"] = m.format_version
    print(json.dumps(summary, indent=1))
    return EXIT_OK


def _add_demo(sub):
    p = sub.add_parser("demo", help="run detection on the bundled sample scan (a real T1 head with a stroke lesion)")
    p.add_argument("--out-dir", default="demo_out")
    p.add_argument("--model", help="model bundle; default: the bundled model")
    p.set_defaults(run=run_demo)


SAMPLE_DIR = Path(__file__).resolve().parent.parent / "Resources" / "Samples"
SAMPLE_SCAN, SAMPLE_LESION = SAMPLE_DIR / "ixi033_t1_stroke.nii.gz", SAMPLE_DIR / "ixi033_t1_stroke_lesion.nii.gz"


def run_demo(args) -> int:
    """Detection on the bundled real sample: a held-out healthy T1 head with a real stroke shape painted in."""
    import json
    import shutil

    import numpy as np
    import SimpleITK as sitk

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SAMPLE_SCAN, out / "sample_scan.nii.gz")
    shutil.copyfile(SAMPLE_LESION, out / "sample_lesion_mask.nii.gz")
    print(f"sample scan (real T1 head with skull, IXI033, with a real stroke lesion painted in): "
          f"{out / 'sample_scan.nii.gz'}")
    argv = ["detect", str(out / "sample_scan.nii.gz"), "--heatmap", str(out / "sample_heatmap.nii.gz"),
            "--report", str(out / "sample_report.json"), "--png", str(out / "sample.png")]
    if args.model:
        argv += ["--model", args.model]
    status = run_detect(build_parser().parse_args(argv))
    report = json.loads((out / "sample_report.json").read_text())
    if report["regions"]:
        from .regions import find_regions

        heatmap = sitk.ReadImage(str(out / "sample_heatmap.nii.gz"))
        _, labels = find_regions(heatmap, report["threshold"], report["min_region_mm3"])
        lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_LESION))) > 0
        overlap = np.logical_and(sitk.GetArrayViewFromImage(labels) == 1, lesion)
        print(f"top region {'overlaps' if overlap.any() else 'misses'} the painted lesion "
              f"({int(overlap.sum())} voxels in common)")
    print(f"wrote {out}/sample_heatmap.nii.gz, sample_report.json, sample.png")
    return status
