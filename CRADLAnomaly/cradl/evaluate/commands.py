"""CLI subcommands of the evaluation package, registered by cradl.cli:

    python -m cradl evaluate --model M --data DIR [--out results.json] [--markdown results.md]
    python -m cradl benchmark [--config small|full] --out-dir DIR [--model M] [--normals DIR]
    python -m cradl real-set --out DIR                      the real-data evaluation set
    python -m cradl train-real --out MODEL                  train on the real healthy cohort's split
    python -m cradl benchmark-real --set DIR --out-dir DIR  model and baselines on the real-data set
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import CradlError, InputError


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="score a model on a labelled anomaly set (paper and MOOD metrics)",
                       description="Run the detector on every case of a folder written by synth-anomalies "
                       "(manifest.json + images + masks) and report sample-level (slice, volume) AUROC/AP, "
                       "voxel-level AUROC/AP/best Dice inside the brain, Dice at the calibrated threshold, "
                       "region detection rate and false-positive regions per normal scan, by type and size, "
                       "with bootstrap 95% intervals.")
    p.add_argument("--model", help="model bundle (.cradl); default: the bundled model")
    p.add_argument("--data", required=True, help="labelled set folder (with manifest.json)")
    p.add_argument("--out", help="results JSON (default: print the table only)")
    p.add_argument("--markdown", help="markdown table output")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_evaluate)

    p = sub.add_parser("benchmark", help="end-to-end benchmark: synthetic data, model, baselines, metrics, table",
                       description="From a fixed seed: synthetic normals (training and held-out), labelled "
                       "anomalies in the held-out ones, the model (trained, or reused with --model), the "
                       "baselines (intensity z-score, VAE; CRADL with K=1,2,4,8 and with the projection "
                       "head's output), all scored on the same cases. Writes OUT_DIR/results.json and "
                       "OUT_DIR/results.md; finished steps are reused when rerun.")
    p.add_argument("--config", default="full", choices=["small", "full"],
                   help="small: seconds-to-minutes smoke configuration (the tests); full: the README table")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--model", help="reuse this trained bundle instead of training one")
    p.add_argument("--normals", help="the model's training normals (default: the folders its manifest names)")
    p.add_argument("--seed", type=int, help="override the configuration's seed")
    p.add_argument("--bootstrap", type=int, help="override the number of bootstrap resamples")
    p.add_argument("--no-variant-heatmaps", action="store_true",
                   help="score the CRADL variants at sample level only (saves one SmoothGrad pass per variant)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_benchmark)


def register_real(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", help="the shared real-data folder (default: $CRADL_REAL_DATA or ../shared/data)")
    common.add_argument("--work", default="work/real",
                        help="folder for cached brain masks and prepared scans (default: work/real)")
    common.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("real-set", parents=[common], help="write the real-data evaluation set",
                       description="Held-out IXI test subjects (normal; with a real stroke shape painted in; with "
                       "a synthetic lesion type), and the real BraTS and MS patients with their expert masks, as a "
                       "labelled set folder for `evaluate` and `benchmark-real`.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=("test", "validation"), default="test",
                   help="whose scans: the held-out test subjects (default) or the validation subjects, the set "
                        "to tune settings on")
    p.set_defaults(run=run_real_set)

    p = sub.add_parser("train-real", parents=[common], help="train on the real healthy cohort's recorded split",
                       description="Brain extraction, alignment and SimCLR training on the IXI subjects of the "
                       "recorded split (training; validation for the mixture size and slice statistics; "
                       "calibration); the test subjects are never used. Resumes like `train`.")
    p.add_argument("--out", required=True, help="model bundle to write")
    p.add_argument("--epochs", type=int, default=10,
                   help="SimCLR epochs (about 4.5 min each on 2 CPU cores; the bundled model's encoder: 100, 3.7 min "
                   "on one H200 GPU with --device cuda, see the README)")
    p.add_argument("--bias-correction", choices=["n4", "none"], default="n4",
                   help="N4 bias-field correction of every scan before alignment (default, as in the bundled model)")
    p.add_argument("--name", default="cradl-default")
    p.add_argument("--version", default="2.3.0")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(run=run_train_real)

    from ..cli import add_heatmap_options

    p = sub.add_parser("calibrate-real", parents=[common], help="recalibrate a model on the real split",
                       description="Re-derive a model's normal statistics (after changing its heatmap settings) on "
                       "the IXI validation and calibration subjects of the recorded split, as `train-real` does; "
                       "the weights stay, the test subjects are never used.")
    p.add_argument("--model", help="model bundle (default: the bundled model)")
    p.add_argument("--out", required=True, help="model bundle to write")
    p.add_argument("--leak-free", action="store_true",
                   help="recalibrate on the 22 calibration subjects alone, leaving the validation subjects out of "
                   "every statistic: score `real-set --split validation` cases with this bundle to tune settings")
    add_heatmap_options(p)
    p.add_argument("--version", help="version of the new bundle; default: the model's")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(run=run_calibrate_real)

    p = sub.add_parser("benchmark-real", parents=[common], help="score a model and the baselines on the real-data set",
                       description="Retrains the intensity z-score and VAE baselines on the real training split, "
                       "scores them and the model on the real-data set, and writes OUT_DIR/results.json and "
                       "results.md (per group, with bootstrap 95%% intervals).")
    p.add_argument("--model", help="model bundle (default: the bundled model)")
    p.add_argument("--set", required=True, help="the real-data set folder (from real-set)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--no-baselines", action="store_true", help="score the model only")
    p.add_argument("--vae-epochs", type=int, default=15)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.set_defaults(run=run_benchmark_real)


def _require_real_data(args) -> None:
    from .. import realdata

    if not realdata.available(args.data):
        raise InputError(f"real data not found at {realdata.data_root(args.data)} (give --data or set CRADL_REAL_DATA)")


def run_real_set(args) -> int:
    _require_real_data(args)  # before the imports: a missing data folder is refused at once
    from .realset import write_real_set

    manifest = write_real_set(args.out, args.data, Path(args.work) / "masks", seed=args.seed, progress=not args.quiet,
                              split=args.split)
    print(f"wrote {manifest}")
    return 0


def run_train_real(args) -> int:
    from ..cli import check_bundle_out

    _require_real_data(args)  # before the imports (torch): bad data or options are refused at once
    check_bundle_out(args.out)
    from ..cli import bias_corrected
    from ..train.real import train_on_ixi
    from ..train.trainer import TrainConfig

    config = TrainConfig(epochs=args.epochs, name=args.name, version=args.version,
                         normalisation=bias_corrected(args.bias_correction),
                         description="CRADL trained on real healthy adults' T1 heads (IXI), brain-extracted"
                         + (", N4 bias-field corrected" if args.bias_correction == "n4" else ""))
    print(f"wrote {train_on_ixi(args.out, config, args.work, args.data, args.device, progress=not args.quiet)}")
    return 0


def run_calibrate_real(args) -> int:
    from ..cli import check_bundle_out, heatmap_overrides
    from ..outputs import model_path, protected_files, refuse_clashes

    _require_real_data(args)  # before the imports (torch): bad data or options are refused at once
    check_bundle_out(args.out)
    refuse_clashes([("--out", Path(args.out))], protected_files([("--model", model_path(args.model))]))
    overrides = heatmap_overrides(args)
    from ..train.real import recalibrate_on_ixi

    out = recalibrate_on_ixi(args.model, args.out, overrides, args.version, args.work, args.data, args.device,
                             progress=not args.quiet, leak_free=args.leak_free,
                             false_alarm_quantile=args.false_alarm_quantile)
    print(f"wrote {out}")
    return 0


def run_benchmark_real(args) -> int:
    _require_real_data(args)  # before the imports: a missing data folder is refused at once
    from .real import markdown, run_real_benchmark

    if not (Path(args.set) / "manifest.json").is_file():
        raise InputError(f"{args.set} holds no manifest.json (write it with `python -m cradl real-set`)")
    results = run_real_benchmark(args.model, args.set, args.out_dir, args.work, args.data, device=args.device,
                                 n_boot=args.bootstrap, baselines=not args.no_baselines, vae_epochs=args.vae_epochs,
                                 progress=not args.quiet, command=_command_line(args))
    print(markdown(results))
    return 0


def _command_line(args) -> str:
    """The command as a user would type it (rebuilt from the parsed options, whoever called main)."""
    words = ["python -m cradl", args.command]
    for name, value in sorted(vars(args).items()):
        if name in ("command", "run") or value in (None, False):
            continue
        flag = "--" + name.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return " ".join(words)


def run_evaluate(args) -> int:
    from .benchmark import evaluate
    from .report import markdown_tables

    data = Path(args.data)
    if not (data / "manifest.json").is_file():
        raise InputError(f"{data} holds no manifest.json (write one with `python -m cradl synth-anomalies`)")
    for path in (args.out, args.markdown):
        if path and not Path(path).resolve().parent.is_dir():
            raise CradlError(f"cannot write {path}: its folder does not exist")
    results = evaluate(args.model, data, args.out, args.markdown, n_boot=args.bootstrap, device=args.device,
                       progress=not args.quiet, command=_command_line(args))
    print(markdown_tables(results))
    return 0


def run_benchmark(args) -> int:
    import dataclasses

    from .benchmark import CONFIGS, run_benchmark as run
    from .report import markdown_tables

    config = CONFIGS[args.config]
    overrides = {}
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.bootstrap is not None:
        overrides["n_boot"] = args.bootstrap
    if args.no_variant_heatmaps:
        overrides["variant_heatmaps"] = False
    config = dataclasses.replace(config, **overrides)
    if args.model and not Path(args.model).is_file():
        raise InputError(f"model file not found: {args.model}")
    if args.normals and not Path(args.normals).is_dir():
        raise InputError(f"normal-scan folder not found: {args.normals}")
    results = run(config, args.out_dir, model=args.model, normals=args.normals, device=args.device,
                  progress=not args.quiet, command=_command_line(args))
    print(markdown_tables(results))
    print(f"wrote {Path(args.out_dir) / 'results.json'} and {Path(args.out_dir) / 'results.md'}")
    return 0
