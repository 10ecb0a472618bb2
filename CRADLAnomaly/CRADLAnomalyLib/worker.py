"""Detection in a worker process, so the Slicer panel never waits on the network.

Why a process and not a thread: Slicer's embedded Python (PythonQt without its thread support)
keeps the interpreter lock while the Qt event loop idles, so a Python thread there only advances
while the main thread happens to run Python; a process runs on its own, and cancelling it is
immediate (terminate), which a thread inside the core's registration step is not. PyTorch is
imported only in the worker, never in the application.

The main thread writes the input (and mask) to a private folder, starts the worker with Slicer's
Python (``PythonSlicer``), and polls; the worker writes its progress, then the heatmap and the
report, each atomically, and the main thread reads them back and builds the scene nodes
(``pipeline.applyResult``). Nothing here touches the scene or Qt.

This file is also the worker's entry point, run by path so that importing it does not import the
``CRADLAnomalyLib`` package (which needs Slicer's MRML)::

    python worker.py detect JOBDIR [--model M] [--device auto|cpu|cuda]
    python worker.py info JOBDIR [--model M]
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds cradl/ and CRADLAnomalyLib/

INPUT_FILE = "input.nrrd"
MASK_FILE = "mask.nrrd"
HEATMAP_FILE = "heatmap.nrrd"
RESULT_FILE = "result.json"
INFO_FILE = "info.json"
PROGRESS_FILE = "progress.json"
ERROR_FILE = "error.json"
LOG_FILE = "worker.log"

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"


class WorkerError(Exception):
    """The worker stopped with an error; ``str()`` is the message for the user."""


def _writeJsonAtomic(path: str, data) -> None:
    tmp = path + ".part"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _readJson(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class WorkerResult:
    """A detection result read back from the worker, shaped like the core's ``DetectionResult``
    where ``pipeline.applyResult`` reads it (slice scores and regions as the report's dicts)."""

    def __init__(self, heatmap, report: dict):
        self.heatmap = heatmap
        self.report = report
        self.threshold = float(report["threshold"])
        self.slice_scores = list(report.get("slice_scores") or [])
        self.regions = list(report.get("regions") or [])
        self.region_labels = None

    def to_report(self) -> dict:
        return dict(self.report)


class WorkerJob:
    """One run of the worker process. Poll it from a timer; ``cancel()`` returns at once.

    ``state`` is RUNNING, DONE, FAILED or CANCELLED; ``fraction`` and ``message`` are the latest
    progress; after DONE, ``result()`` reads the output (and removes the job folder)."""

    def __init__(self, command: str, args: list, python: str | None = None, workDir: str | None = None,
                 files: dict | None = None):
        self.dir = tempfile.mkdtemp(prefix="cradl_job_", dir=workDir)
        self.fraction, self.message = 0.0, "Starting"
        self.state = RUNNING
        self.error = None
        self.started = time.monotonic()
        try:
            for name, image in (files or {}).items():
                import SimpleITK as sitk
                sitk.WriteImage(image, os.path.join(self.dir, name), False)
            python = python or sys.executable
            env = dict(os.environ)
            env["PYTHONPATH"] = MODULE_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            env.setdefault("PYTHONUNBUFFERED", "1")
            self._log = open(os.path.join(self.dir, LOG_FILE), "w", encoding="utf-8")
            self.process = subprocess.Popen([python, os.path.abspath(__file__), command, self.dir] + list(args),
                                            cwd=self.dir, env=env, stdin=subprocess.DEVNULL,
                                            stdout=self._log, stderr=subprocess.STDOUT)
        except Exception:
            self._removeDir()
            raise

    # ------------------------------------------------------------------ polling
    def poll(self) -> str:
        """Read the worker's progress and exit status; returns ``state``. Never blocks."""
        if self.state != RUNNING:
            return self.state
        progress = _readJson(os.path.join(self.dir, PROGRESS_FILE))
        if progress:
            self.fraction, self.message = float(progress.get("fraction", 0.0)), str(progress.get("message", ""))
        code = self.process.poll()
        if code is None:
            return self.state
        self._log.close()
        if code == 0:
            self.state, self.fraction, self.message = DONE, 1.0, "Done"
        else:
            self.state = FAILED
            error = _readJson(os.path.join(self.dir, ERROR_FILE)) or {}
            self.error = error.get("message") or self._logTail() or f"the worker stopped (exit status {code})"
            self.details = error.get("traceback") or self._logTail()
            self._removeDir()
        return self.state

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> str:
        """Poll until the job ends (for scripts and tests; the panel polls from a timer)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() == RUNNING:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the worker did not finish within {timeout} s")
            time.sleep(interval)
        return self.state

    def cancel(self) -> None:
        """Stop the worker now (terminate, then kill after half a second) and forget its output."""
        if self.state != RUNNING:
            return
        self.state, self.message = CANCELLED, "Cancelled"
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._log.close()
        self._removeDir()

    @property
    def running(self) -> bool:
        return self.poll() == RUNNING

    def _logTail(self, chars: int = 2000) -> str:
        try:
            with open(os.path.join(self.dir, LOG_FILE), encoding="utf-8", errors="replace") as f:
                return f.read()[-chars:].strip()
        except OSError:
            return ""

    def _removeDir(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def _finish(self):
        if self.poll() == RUNNING:
            raise RuntimeError("the worker is still running")
        if self.state == FAILED:
            raise WorkerError(self.error)
        if self.state == CANCELLED:
            raise WorkerError("Detection was cancelled.")

    def __del__(self):
        try:
            if getattr(self, "process", None) is not None and self.process.poll() is None:
                self.process.kill()
            if os.path.isdir(getattr(self, "dir", "")):
                self._removeDir()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class DetectionJob(WorkerJob):
    """The core's ``detect`` on one image in a worker process."""

    def __init__(self, image, mask=None, modelPath: str | None = None, device: str = "auto",
                 python: str | None = None, workDir: str | None = None):
        files = {INPUT_FILE: image}
        if mask is not None:
            files[MASK_FILE] = mask
        args = ["--device", device] + (["--model", os.path.abspath(modelPath)] if modelPath else [])
        super().__init__("detect", args, python=python, workDir=workDir, files=files)

    def result(self) -> WorkerResult:
        self._finish()
        import SimpleITK as sitk
        try:
            heatmap = sitk.ReadImage(os.path.join(self.dir, HEATMAP_FILE))
            report = _readJson(os.path.join(self.dir, RESULT_FILE))
            if report is None:
                raise WorkerError("The worker finished without a report.")
            return WorkerResult(heatmap, report)
        finally:
            self._removeDir()


class ModelInfoJob(WorkerJob):
    """Name, version and recipe of a model bundle, read by the core in a worker process (the panel
    shows it without importing PyTorch into the application)."""

    def __init__(self, modelPath: str | None = None, python: str | None = None, workDir: str | None = None):
        super().__init__("info", ["--model", os.path.abspath(modelPath)] if modelPath else [],
                         python=python, workDir=workDir)

    def result(self) -> dict:
        self._finish()
        try:
            info = _readJson(os.path.join(self.dir, INFO_FILE))
            if info is None:
                raise WorkerError("The worker finished without the model's details.")
            return info
        finally:
            self._removeDir()


# ---------------------------------------------------------------------- the worker process itself
def _main(argv) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="CRADLAnomalyLib/worker.py")
    parser.add_argument("command", choices=("detect", "info"))
    parser.add_argument("jobdir")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    jobdir = args.jobdir

    def progress(fraction, message=""):
        _writeJsonAtomic(os.path.join(jobdir, PROGRESS_FILE), {"fraction": float(fraction), "message": str(message)})

    if MODULE_DIR not in sys.path:
        sys.path.insert(0, MODULE_DIR)
    from cradl.errors import user_message  # plain Python: says whether an error is the user's to fix, by its type

    try:
        progress(0.0, "Loading the model")
        from cradl import AnomalyDetector

        if args.command == "info":
            detector = AnomalyDetector.load(args.model, device="cpu")
            _writeJsonAtomic(os.path.join(jobdir, INFO_FILE), detector.info)
            return 0

        import SimpleITK as sitk

        detector = AnomalyDetector.load(args.model, device=args.device)
        image = sitk.ReadImage(os.path.join(jobdir, INPUT_FILE))
        maskPath = os.path.join(jobdir, MASK_FILE)
        mask = sitk.ReadImage(maskPath) if os.path.exists(maskPath) else None
        result = detector.detect(image, mask=mask, heatmap=True, progress=progress)
        report = result.to_report()
        report.setdefault("threshold", float(result.threshold))
        tmp = os.path.join(jobdir, "heatmap.part.nrrd")
        sitk.WriteImage(result.heatmap, tmp, False)
        os.replace(tmp, os.path.join(jobdir, HEATMAP_FILE))
        _writeJsonAtomic(os.path.join(jobdir, RESULT_FILE), report)
        return 0
    except Exception as error:  # noqa: BLE001 - reported to the panel, which shows it
        import traceback

        _writeJsonAtomic(os.path.join(jobdir, ERROR_FILE),
                         {"message": user_message(error), "traceback": traceback.format_exc()})
        return 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
