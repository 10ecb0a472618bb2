"""Hospital-scale batch detection: scans spread over a Dask cluster (local or existing), resumable,
with a per-scan summary (CSV, JSON) and a static triage worklist (worklist.html).

`run_dask_batch` is what `cradl detect INPUTS... --out-dir D --workers N | --scheduler ADDRESS` calls;
`detect_scan` is the task a worker runs for one scan.
"""
from .runner import detect_scan, run_dask_batch
from .summary import SUMMARY_COLUMNS, write_summary
from .worklist import write_worklist

__all__ = ["SUMMARY_COLUMNS", "detect_scan", "run_dask_batch", "write_summary", "write_worklist"]
