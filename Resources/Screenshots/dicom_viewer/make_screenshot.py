"""Open CRADL's DICOM results in a real DICOM viewer (dwv) and screenshot it.

    python Resources/Screenshots/dicom_viewer/make_screenshot.py --out Resources/Screenshots/dicom_viewer.png

1. the demo sample (a real held-out IXI T1 head with a painted stroke) is written as a classic MR DICOM
   series (`cradl.dicom_out.write_dicom_series`);
2. `python -m cradl detect SERIES --report --pmap --seg --overlay` runs the bundled model on it: a DICOM
   Segmentation (regions), a DICOM Parametric Map (heatmap) and the heatmap overlay series (the heatmap
   blended over the scan, one Secondary Capture RGB image per slice), all referencing the series;
3. dwv (DICOM Web Viewer, pinned below) is installed from npm into a cache folder under work/
   (gitignored; its files are never committed);
4. index.html (beside this script) loads the series and each object in dwv, served from localhost
   (ES modules and web workers are refused on file:// pages);
5. headless Chromium (Debian's chromium + chromedriver, driven by Selenium as in
   Testing/test_worklist.py) waits for dwv to finish, shows the axial slice through the top-ranked
   region with the SEG over the series and, beside it, the same slice of the overlay series, then the
   slice through the second region with the SEG; screenshots the page and prints what dwv made of
   each object (geometry, value range, errors) and its console warnings. The Parametric Map is
   loaded but not drawn: dwv 0.36 cannot place its frames (see the README); the overlay series is
   the fallback for such viewers.

Needs npm (or a cache already filled), chromium, chromedriver and selenium; not part of the test suite.
Exit status: 0 when the series, the SEG and the overlay series are drawn with no dwv error; 1 otherwise
(the screenshot is still written, with dwv's error shown under the panel).
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DWV_VERSION = "0.36.4"  # pinned: the page uses dwv's 0.36 App API and its ES module layout
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
SAMPLE = ROOT / "CRADLAnomaly/Resources/Samples/ixi033_t1_stroke.nii.gz"
MODEL = ROOT / "CRADLAnomaly/Resources/Models/cradl_default.cradl"


def die(message: str) -> None:
    sys.exit(f"make_screenshot: {message}")


def tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if not path:
        die(f"{name} not found on PATH ({hint})")
    return path


def install_dwv(cache: Path, version: str) -> Path:
    """dwv and its dependencies (konva, jszip, magic-wand-tool) under cache/node_modules."""
    modules = cache / "node_modules"
    installed = modules / "dwv" / "package.json"
    if installed.is_file() and json.loads(installed.read_text())["version"] == version:
        return modules
    npm = tool("npm", "install Node.js and npm, or fill the cache folder with `npm install` elsewhere")
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([npm, "install", "--prefix", str(cache), "--no-audit", "--no-fund", f"dwv@{version}"], check=True)
    if json.loads(installed.read_text())["version"] != version:
        die(f"npm installed another dwv than {version}")
    return modules


def make_results(image: Path, model: Path, work: Path) -> tuple[dict, float]:
    """The image as a DICOM series, then CRADL's report, SEG, Parametric Map and overlay series for it."""
    import SimpleITK as sitk
    from cradl.dicom_out import write_dicom_series

    data = work / "data"
    if data.exists():
        shutil.rmtree(data)
    series = write_dicom_series(sitk.ReadImage(str(image)), data / "series", patient_id="IXI033",
                                patient_name="IXI033^Demo", description=f"{image.name} as DICOM")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cradl", "detect", str(series), "--model", str(model),
                    "--report", str(data / "report.json"), "--pmap", str(data / "heat.dcm"),
                    "--seg", str(data / "regions.dcm"), "--overlay", str(data / "overlay"), "--quiet"], check=True)
    detect_s = time.perf_counter() - start
    report = json.loads((data / "report.json").read_text())
    if not report.get("regions") or not (data / "regions.dcm").is_file():
        die("the detection found no region, so there is no SEG to show")
    return report, detect_s


def write_manifest(work: Path, report: dict) -> dict:
    """What index.html loads into which panel, and where to look."""
    from cradl.space import ras_to_lps

    data = work / "data"
    regions = report["regions"][:2]  # the two top-ranked regions

    def lps(region):  # the report's RAS mm; DICOM and dwv use LPS
        return ras_to_lps(region["centre_ras"]).tolist()

    def where(region):
        x, y, z = region["centre_ras"]
        return (f"RAS ({x:.1f}, {y:.1f}, {z:.1f}) mm, {region['volume_mm3'] / 1000:.1f} ml, "
                f"peak {region['peak']:.2f}")

    def files(folder):
        return sorted(p.relative_to(data).as_posix() for p in (data / folder).iterdir())

    series, overlay = files("series"), files("overlay")
    top = regions[0]
    # panels: region 1 with the SEG, region 1 in the overlay series, then each further region with the SEG
    panels = [{"title": f"axial slice through region {top['rank']}'s centre: MR series + regions.dcm (SEG)",
               "note": where(top), "focus_lps": lps(top)},
              {"title": f"the same slice of the overlay series ({len(overlay)} Secondary Capture RGB images)",
               "note": "heatmap blended over the scan by CRADL, as in its quick-look PNG", "focus_lps": lps(top)}]
    panels += [{"title": f"axial slice through region {r['rank']}'s centre: MR series + regions.dcm (SEG)",
                "note": where(r), "focus_lps": lps(r)} for r in regions[1:]]
    seg_panels = [{"group": i} for i in range(len(panels)) if i != 1]
    manifest = {
        "title": f"IXI033 T1 head with a painted stroke, as an MR series of {len(series)} files + CRADL's DICOM "
                 f"Segmentation and heatmap overlay series ({report['volume_percentile']:.1f}th percentile, "
                 f"{len(report['regions'])} regions); NOT FOR DIAGNOSTIC USE",
        "status": "dwv places the SEG on the series by its frames' positions; one segment per region, in the "
                  "colours the SEG recommends. The overlay series stacks by its images' positions, copied from "
                  "the source slices. Radiological display (patient's right on the left). The Parametric Map "
                  "(heat.dcm) is loaded too but not drawn: dwv 0.36 puts its frames on a 4th axis at the origin, "
                  "not on the series (see the README); the overlay series is the fallback for such viewers.",
        "panels": panels,
        # a SEG needs its referenced series loaded first; heat.dcm goes in no panel (see status)
        "loads": [
            {"name": "series", "files": series, "groups": seg_panels},
            {"name": "regions.dcm", "files": ["regions.dcm"], "groups": seg_panels},
            {"name": "heat.dcm", "files": ["heat.dcm"], "groups": []},
            {"name": "overlay", "files": overlay, "groups": [{"group": 1}]},
        ],
    }
    (data / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def serve(site: Path) -> http.server.ThreadingHTTPServer:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # noqa: D102 - one line per request would bury the summary
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def screenshot(url: str, out: Path, size: tuple[int, int], timeout: float) -> tuple[dict, list]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = tool("chromium", "Debian: apt-get install chromium")
    chromedriver = tool("chromedriver", "Debian: apt-get install chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 f"--window-size={size[0]},{size[1]}", "--hide-scrollbars"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # dwv's warnings and errors
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        # the page exactly this size (a window's size includes the browser's own frame)
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": False})
        driver.set_page_load_timeout(60)
        driver.get(url)
        deadline = time.monotonic() + timeout
        while not driver.execute_script("return window.viewerState && window.viewerState.done"):
            if time.monotonic() > deadline:
                die(f"dwv did not finish loading in {timeout:.0f} s; console: {driver.get_log('browser')}")
            time.sleep(0.25)
        state = driver.execute_script("return window.viewerState")
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
        return state, driver.get_log("browser")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "Resources/Screenshots/dicom_viewer.png")
    parser.add_argument("--image", type=Path, default=SAMPLE, help="a NIfTI head to turn into a DICOM series")
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--work", type=Path, default=ROOT / "work/dicom_viewer",
                        help="series, results and the served folder (default: work/dicom_viewer, gitignored)")
    parser.add_argument("--dwv-cache", type=Path, default=ROOT / "work/dwv_cache",
                        help=f"npm prefix holding dwv {DWV_VERSION} (installed there when missing)")
    parser.add_argument("--size", default="1800x720", help="page size in pixels, WIDTHxHEIGHT")
    parser.add_argument("--reuse-results", action="store_true",
                        help="keep the series and results already in --work (skips the detection)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for dwv")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    try:
        import selenium  # noqa: F401
    except ImportError:
        die("selenium is not installed (pip install selenium)")
    tool("chromium", "Debian: apt-get install chromium")
    tool("chromedriver", "Debian: apt-get install chromium-driver")

    start = time.perf_counter()
    modules = install_dwv(args.dwv_cache.resolve(), DWV_VERSION)
    work = args.work.resolve()
    if args.reuse_results and (work / "data/report.json").is_file() and (work / "data/overlay").is_dir():
        report, detect_s = json.loads((work / "data/report.json").read_text()), 0.0
    else:
        report, detect_s = make_results(args.image.resolve(), args.model.resolve(), work)
    write_manifest(work, report)

    # the served folder: the page from the repository, dwv from the cache, the data from work/
    site = work / "site"
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    for name, target in (("index.html", HERE / "index.html"), ("node_modules", modules), ("data", work / "data")):
        os.symlink(target, site / name)
    server = serve(site)
    try:
        view_start = time.perf_counter()
        url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
        state, console = screenshot(url, args.out.resolve(), (width, height), args.timeout)
        view_s = time.perf_counter() - view_start
    finally:
        server.shutdown()

    print(f"dwv {DWV_VERSION}:")
    for load in state["loads"]:
        line = f"  {load['name']} ({load['files']} file(s)): loaded {load['loaded']}, drawn in panels {load['drawn']}"
        if load.get("size"):  # dwv's geometry and the value range it windows against
            line += (f", size {load['size']}, origin {load['origin']}, spacing {load['spacing']}, "
                     f"value range {load['range']}")
        print(line + (f"; error: {load['error']}" if load["error"] else ""))
    print(f"  index shown per panel: {state.get('index')}")
    for error in state["errors"]:
        print(f"  page error: {error}")
    for warning in state["warnings"]:
        print(f"  dwv load warning: {warning}")
    for entry in console:
        if entry["level"] in ("WARNING", "SEVERE"):
            print(f"  console {entry['level']}: {entry['message']}")
    print(f"detect {detect_s:.1f} s, viewer {view_s:.1f} s, total {time.perf_counter() - start:.1f} s; "
          f"screenshot {args.out}")
    loads = {load["name"]: load for load in state["loads"]}
    shown = all(loads[name]["loaded"] and loads[name]["drawn"] for name in ("series", "regions.dcm", "overlay"))
    ok = shown and not state["errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
