"""Saving a scene's results atomically: every file is first written under a temporary name in the target
folder, and only when all of them are complete are they renamed into place. A failure leaves no
partial file and no temporary behind; files of an earlier save stay as they were. File names follow the
core's one naming scheme (``cradl.outputs``), as the batch's do."""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager


from cradl.atomic import AtomicFiles, atomic_files
from cradl.errors import CradlError
from cradl.io import plain_json, scan_stem
from cradl.outputs import output_names

from .errors import BridgeError


def safeBaseName(name: str) -> str:
    """A file-name stem from a node name or input path ('T1 brain.nii.gz' -> 'T1_brain')."""
    base = scan_stem(os.path.normpath(str(name)))
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._")
    return base or "scan"


def outputFolder(directory: str) -> str:
    """The output folder the user chose (absolute), made when missing."""
    if not directory:
        raise BridgeError("No output folder given.")
    os.makedirs(directory, exist_ok=True)
    if not os.access(directory, os.W_OK):
        raise BridgeError(f"The output folder {directory} is not writable.")
    return os.path.abspath(directory)


@contextmanager
def atomicFiles(directory: str):
    """The core's all-or-nothing file set (cradl.io.AtomicFiles), for an output folder the user chose."""
    directory = outputFolder(directory)
    with atomic_files() as files:
        yield _FolderFiles(directory, files)


class _FolderFiles:
    """Names files by their final name inside one folder."""

    def __init__(self, directory: str, files: AtomicFiles):
        self.directory, self._files = directory, files

    def path(self, finalName: str) -> str:
        return str(self._files.path(os.path.join(self.directory, finalName)))

    def commit(self) -> list[str]:
        try:
            return [str(p) for p in self._files.commit()]
        except CradlError as exc:
            raise BridgeError(f"Saving failed: {exc}.") from None


def writeJson(path: str, data: dict):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(plain_json(data), f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def writeImage(path: str, image, compress: bool = True):
    import SimpleITK as sitk

    sitk.WriteImage(image, path, compress)


def writeSegmentation(path: str, segmentationNode):
    """Write a segmentation node to .seg.nrrd through its storage node class (no scene change)."""
    import slicer

    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(path)
    if not storage.WriteData(segmentationNode):
        raise BridgeError(f"Could not write the segmentation to {os.path.basename(path)}.")


def saveFileResults(outputDir: str, baseName: str, heatmapImage, report: dict,
                    labelImage=None, segmentationNode=None) -> dict:
    """Heatmap (NIfTI), regions (label map NIfTI and/or segmentation .seg.nrrd) and JSON report,
    all or nothing. Returns {kind: final path}."""
    kinds = ["heatmap", "report"] + (["regions"] if labelImage is not None else []) \
        + (["segmentation"] if segmentationNode is not None else [])
    names = output_names(safeBaseName(baseName), kinds)
    with atomicFiles(outputDir) as files:
        temps = {kind: files.path(name) for kind, name in names.items()}
        writeImage(temps["heatmap"], heatmapImage)
        if labelImage is not None:
            writeImage(temps["regions"], labelImage)
        if segmentationNode is not None:
            writeSegmentation(temps["segmentation"], segmentationNode)
        report = dict(report)
        report.setdefault("files", {})
        report["files"] = {**report["files"], **{k: v for k, v in names.items() if k != "report"}}
        writeJson(temps["report"], report)
        files.commit()
    return {kind: os.path.join(os.path.abspath(outputDir), name) for kind, name in names.items()}
