"""Make the header-bomb and bundle-bomb files of issue 11 and time `cradl` on them (peak RSS, wall time).

    python Testing/measure_bombs.py OUTDIR [--size N] [--grid G] [--inflate-mib M]

writes OUTDIR/header_bomb.nii (348-byte header + 4 bytes, claiming N^3 float32),
OUTDIR/grid_bomb.cradl (the bundled model with its manifest's encoder grid set to G) and
OUTDIR/inflate_bomb.cradl (the bundled model with one member replaced by M MiB of zeros, deflated),
then runs each through `python -m cradl` under /usr/bin/time -v and prints exit status, first stderr
line, peak RSS and wall time. Not a test: the tests check the same cases by the allocation that never
happens (Testing/test_limits.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from cradl.bundle import DEFAULT_MODEL as MODEL  # the bundled model the bombs are made from

ROOT = Path(__file__).resolve().parent.parent


def header_bomb(path: Path, n: int) -> Path:
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((n, n, n))
    header.set_zooms((1.0, 1.0, 1.0))
    header.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    path.write_bytes(header.binaryblock + b"\x00" * 4 + b"\x00\x00\x80\x3f" * 16)
    return path


def rewrite_bundle(source: Path, target: Path, edit_manifest=None, big_member: str | None = None,
                   inflate_bytes: int = 0) -> Path:
    with zipfile.ZipFile(source) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    if edit_manifest is not None:
        manifest = json.loads(members["manifest.json"])
        edit_manifest(manifest)
        members["manifest.json"] = json.dumps(manifest).encode()
        if "manifest.sha256" in members:  # format 2: the bomb must pass the checksum to reach the check it tests
            members["manifest.sha256"] = (hashlib.sha256(members["manifest.json"]).hexdigest() + "\n").encode()
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            if name == big_member:
                with archive.open(name, "w", force_zip64=True) as stream:
                    chunk = b"\x00" * (1 << 24)
                    for _ in range(inflate_bytes // len(chunk)):
                        stream.write(chunk)
            else:
                archive.writestr(name, data)
    return target


def measure(label: str, *args: str) -> None:
    run = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "cradl", *args],
                         capture_output=True, text=True, cwd=ROOT / "CRADLAnomaly")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", run.stderr).group(1)
    first = next((line for line in run.stderr.splitlines() if line.strip() and not line.startswith("\t")), "")
    print(f"{label}: exit {run.returncode}, peak RSS {rss / 1024:.0f} MiB, wall {wall}; {first[:160]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--grid", type=int, default=400)
    parser.add_argument("--inflate-mib", type=int, default=5120)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scan = header_bomb(args.out / "header_bomb.nii", args.size)
    grid = rewrite_bundle(MODEL, args.out / "grid_bomb.cradl",
                          edit_manifest=lambda m: m["encoder"].update(grid=args.grid))
    inflate = rewrite_bundle(MODEL, args.out / "inflate_bomb.cradl", big_member="arrays/template.npy",
                             inflate_bytes=args.inflate_mib << 20)
    print(f"files: {scan.stat().st_size} B, {grid.stat().st_size} B, {inflate.stat().st_size} B")
    measure(f"header bomb ({args.size}^3 float32)", "detect", str(scan), "--report", str(args.out / "r.json"))
    measure(f"bundle bomb (encoder grid {args.grid})", "info", "--model", str(grid))
    measure(f"bundle bomb (member inflating to {args.inflate_mib} MiB)", "info", "--model", str(inflate))


if __name__ == "__main__":
    main()
