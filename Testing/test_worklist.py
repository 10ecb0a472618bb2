"""worklist.html: the static triage page, checked as written and in a real headless Chromium (Debian's
chromium + chromium-driver, driven through Selenium): it loads offline, lists scans most unusual first,
re-sorts when a header is clicked, and every thumbnail and link resolves."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from urllib.parse import unquote

import pytest
import SimpleITK as sitk
from cradl.batch.summary import write_summary
from cradl.batch.worklist import triage_order, write_worklist

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def batch_folder(tmp_path_factory, sample_case):
    """A batch result folder: three scored scans with real quick-look PNGs and reports, and a failed one."""
    from cradl.quicklook import write_quicklook

    out = tmp_path_factory.mktemp("worklist")
    image = sitk.ReadImage(str(sample_case[0]))
    heat = sitk.Cast(image * 0, sitk.sitkFloat32)
    rows = []
    for i, (name, pct, score, n) in enumerate([("low <scan>.nii.gz", 12.0, 0.2, 0), ("high.nii.gz", 99.6, 4.1, 2),
                                               ("mid.nii.gz", 96.0, 2.2, 1), ("bad.nii.gz", None, None, None)]):
        stem = name.split(".")[0]
        row = {"index": i, "input": f"/data/{name}", "name": name, "status": "ok" if pct is not None else "failed",
               "reused": False}
        if pct is not None:
            from cradl.calibration import describe_percentile

            png, report = out / f"{stem}.png", out / f"{stem}_report.json"
            write_quicklook(image, heat, png, None, 1.0, title=f"percentile {pct:.0f}")
            report.write_text("{}")
            row.update(volume_score=score, volume_percentile=pct, interpretation=describe_percentile(pct),
                       n_regions=n, png=str(png), report=str(report),
                       top_region_centre_ras=[1.0, -20.0, 30.0] if n else None,
                       top_region_volume_mm3=5400.0 if n else None, top_region_peak=3.2 if n else None)
        else:
            row["error"] = "cannot read scan /data/bad.nii.gz: not a readable image"
        rows.append(row)
    write_summary(rows, out)
    write_worklist(rows, out)
    return out, rows


def test_order_is_most_unusual_first_and_failures_last(batch_folder):
    _, rows = batch_folder
    assert [r["name"] for r in triage_order(rows)] == ["high.nii.gz", "mid.nii.gz", "low <scan>.nii.gz", "bad.nii.gz"]


def test_scans_the_model_cannot_compare_come_after_every_comparable_one(batch_folder):
    _, rows = batch_folder
    flair = {"index": 9, "input": "/data/flair.nii.gz", "name": "flair.nii.gz", "status": "ok", "reused": False,
             "volume_score": 70.0, "volume_percentile": 100.0, "out_of_distribution": True,
             "interpretation": "not comparable: the scan is unlike every normal scan the model knows"}
    order = [r["name"] for r in triage_order([*rows, flair])]
    assert order == ["high.nii.gz", "mid.nii.gz", "low <scan>.nii.gz", "flair.nii.gz", "bad.nii.gz"]


def test_page_is_self_contained_and_escapes_names(batch_folder):
    out, _ = batch_folder
    text = (out / "worklist.html").read_text()
    assert "low &lt;scan&gt;.nii.gz" in text and "low <scan>" not in text
    assert "http://" not in text and "https://" not in text  # nothing to fetch: it opens offline
    assert "not for diagnostic use" in text.lower()
    for line in (out / "summary.csv").read_text().splitlines()[1:]:
        assert line.count(",") >= 27


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver "
                    "(.ci/run installs them)")
def test_worklist_in_headless_chromium(batch_folder, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    out, _ = batch_folder
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 "--window-size=1400,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get((out / "worklist.html").as_uri())
        def names():
            return [td.text for td in driver.find_elements(By.CSS_SELECTOR, "#worklist tbody td.name")]

        assert names() == ["high.nii.gz", "mid.nii.gz", "low <scan>.nii.gz", "bad.nii.gz"]
        # every thumbnail decoded (a broken link has naturalWidth 0), one per scored scan
        images = driver.find_elements(By.CSS_SELECTOR, "img.thumb")
        assert len(images) == 3
        assert driver.execute_script("return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        # every link points at a file that exists, relative to the page
        for link in driver.find_elements(By.CSS_SELECTOR, "td.links a"):
            href = link.get_attribute("href")
            assert href.startswith("file://") and Path(unquote(href[len("file://"):])).is_file(), href
        header = driver.find_element(By.XPATH, "//th[normalize-space(text())='percentile']")
        header.click()  # percentile was descending: now ascending, unscored last
        assert names() == ["low <scan>.nii.gz", "mid.nii.gz", "high.nii.gz", "bad.nii.gz"]
        header.click()
        assert names()[:3] == ["high.nii.gz", "mid.nii.gz", "low <scan>.nii.gz"]
        driver.find_element(By.XPATH, "//th[normalize-space(text())='scan']").click()
        assert names() == sorted(names(), key=str.lower)
        assert driver.find_element(By.CSS_SELECTOR, "tr.failed td.words").text.startswith("failed: cannot read")
        driver.save_screenshot(str(tmp_path / "worklist.png"))
        assert (tmp_path / "worklist.png").stat().st_size > 1000
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
