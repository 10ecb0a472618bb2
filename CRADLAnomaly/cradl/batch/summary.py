"""The batch summary: one row per input, in input order, as CSV (spreadsheets) and JSON (programs)."""
from __future__ import annotations

import csv
import datetime
import io as _io
from pathlib import Path

from .. import __version__

SUMMARY_COLUMNS = [
    "index", "input", "name", "status", "reused", "volume_score", "volume_percentile", "interpretation",
    "out_of_distribution",
    "n_regions", "top_region_centre_ras", "top_region_volume_mm3", "top_region_peak",
    "t_read_s", "t_align_s", "t_network_s", "t_map_back_s", "t_write_s", "t_total_s",
    "worker", "worker_model_loads", "worker_peak_rss_mib", "model",
    "report", "heatmap", "png", "seg", "pmap", "overlay", "error",
]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def summary_rows(rows: list[dict]) -> list[dict]:
    """Every row with every column (missing ones empty), in input order."""
    return [{column: row.get(column) for column in SUMMARY_COLUMNS} for row in sorted(rows, key=lambda r: r["index"])]


def write_summary(rows: list[dict], out_dir: Path, extra: dict | None = None) -> tuple[Path, Path]:
    """Write `summary.csv` and `summary.json` in `out_dir` (each atomically); returns their paths."""
    from ..atomic import atomic_path, writing
    from ..io import write_json

    table = summary_rows(rows)
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    csv_path, json_path = Path(out_dir) / "summary.csv", Path(out_dir) / "summary.json"
    with atomic_path(csv_path) as tmp, writing(csv_path):
        tmp.write_text(buffer.getvalue(), encoding="utf-8")
    counts = {status: sum(r["status"] == status for r in table) for status in ("ok", "failed")}
    counts["reused"] = sum(bool(r["reused"]) for r in table)
    write_json({"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "cradl_version": __version__, "n_inputs": len(table), "counts": counts, **(extra or {}),
                "columns": SUMMARY_COLUMNS, "rows": table}, json_path)
    return csv_path, json_path
