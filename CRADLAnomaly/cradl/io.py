"""Reading and validating scans, and writing files atomically.

Every check that turns a bad file into one clear message lives here, so the CLI, the Python API and
the Slicer bridge refuse the same inputs with the same words.

Reading: the header is read first and its voxel count checked against a limit and against the bytes
the file actually holds, before any voxel is allocated; uncompressed data must be as long as the header
says (ITK zero-fills a short file), compressed data is decompressed once to the end; DICOM series are
checked for unreadable members, missing slices and uneven spacing; geometry must be a rotation with
positive finite spacing, large enough to hold a brain. Writing: a temporary file beside the final name,
verified (write status, header re-read, data length, the gzip stream decompressed to its end) before it
is renamed into place. Library (ITK, GDCM, niftilib) messages are captured, never printed.
"""
from __future__ import annotations

import contextlib
import errno
import gzip
import json
import logging
import os
import stat
import tempfile
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_path, output_error, writing
from .errors import InputError, OutputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

# Limits of what a brain scan can be. The voxel limit bounds memory (2^28 voxels = 1 GiB as float32,
# 2.5 times a 512 x 512 x 400 CT-sized volume); the brain limits refuse what cannot hold a brain
# (an adult brain is about 140 x 170 x 120 mm; thick-slice scans have 20-30 slices).
MAX_VOXELS = 1 << 28
MIN_VOXELS_PER_AXIS = 16
MIN_EXTENT_MM = 60.0
ORTHONORMAL_TOLERANCE = 1e-3  # |D^T D - I| entries; a sheared matrix cannot be written back exactly
MAX_DEFLATE_RATIO = 1100  # deflate cannot expand data more than 1032 times
DICOM_SPACING_TOLERANCE = 0.05  # relative deviation of one slice gap from the median gap


def is_image_path(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(IMAGE_SUFFIXES)


def find_scans(folders) -> list[Path]:
    """Image files (and DICOM series folders) directly inside the given folders, sorted."""
    scans = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise InputError(f"normal-scan folder not found: {folder}")
        found = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
        found += sorted(p for p in folder.iterdir() if p.is_dir() and any(p.glob("*.dcm")))
        scans += found
    return scans


def scan_stem(path: str | os.PathLike) -> str:
    """A scan's name without its image suffix ('sub-01_T1w.nii.gz' -> 'sub-01_T1w'); a DICOM series folder keeps
    its name. The one stem of a scan for every output name (CLI batch and the Slicer module)."""
    name = Path(path).name
    for suffix in sorted(IMAGE_SUFFIXES + (".dcm",), key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def plain_json(value, digits: int | None = None):
    """`value` in plain JSON types: numpy scalars and arrays become Python numbers and lists, tuples lists, keys
    strings. With `digits`, floats are rounded and NaN or infinite ones become None (evaluation tables)."""
    if isinstance(value, dict):
        return {str(k): plain_json(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v, digits) for v in value]
    if isinstance(value, np.ndarray):
        return plain_json(value.tolist(), digits)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if digits is None:
            return v
        return round(v, digits) if np.isfinite(v) else None
    return value


# ---------------------------------------------------------------- library messages

_STDERR_LOCK = threading.RLock()


@contextlib.contextmanager
def captured_library_output() -> Iterator[list[str]]:
    """Redirect file descriptor 2 while ITK, GDCM or niftilib run: their warnings (printed straight from
    C/C++, beyond Python's reach) are logged at debug level instead of spilling onto the user's terminal.
    Yields a list that holds the captured lines once the block ends. Other threads that print to stderr
    take `stderr_lock()` first so nothing of theirs is swallowed."""
    lines: list[str] = []
    with _STDERR_LOCK:
        try:
            import sys
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - a closed or replaced stderr must not break reading
            pass
        try:
            saved = os.dup(2)
        except OSError:  # no fd 2 (embedded interpreters): nothing to capture
            yield lines
            return
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield lines
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                text = sink.read(1 << 16).decode("utf-8", "replace")
                lines.extend(line for line in text.splitlines() if line.strip())
                for line in lines:
                    log.debug("library: %s", line)


def stderr_lock():
    """Hold this while printing to stderr from a thread other than the one reading or writing images."""
    return _STDERR_LOCK


sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK warnings: captured above anyway, and never printed


# ---------------------------------------------------------------- reading

def read_image(path: str | os.PathLike, what: str = "scan") -> sitk.Image:
    """Read a 3D scalar scan (NIfTI, NRRD, MHA/MHD or a DICOM series folder) and validate it."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"{what} must be a file path or a SimpleITK image, not {type(path).__name__}")
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        kind = "a broken link" if path.is_symlink() else "not found"
        raise InputError(f"{what} not found: {path}" + (f" ({kind})" if kind != "not found" else "")) from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        image = _read_dicom_series(path, what)
    elif not stat.S_ISREG(mode):
        raise InputError(f"{what} {path} is not a regular file (a pipe, socket or device cannot be read as a scan)")
    else:
        layout = inspect_image_file(path, what)
        # The completeness check reads the file a second time; zlib and ITK both release the GIL, so it
        # runs beside the read, which hides most of its time. Its verdict comes first.
        with ThreadPoolExecutor(max_workers=1) as pool:
            complete = pool.submit(layout.check_data, what)
            try:
                with captured_library_output():
                    image, read_error = sitk.ReadImage(str(path)), None
            except RuntimeError as exc:
                image, read_error = None, exc
            complete.result()
        if read_error is not None:
            first = str(read_error).strip().splitlines()[-1] if str(read_error).strip() else ""
            raise InputError(f"cannot read {what} {path}: not a readable image ({first[:120]})") from None
        _check_same_grid(image, layout, f"{what} {path}")
    return validate_image(image, f"{what} {path}")


@dataclass
class ImageLayout:
    """What a scan's header declares and where its voxel data lie: enough to check the file before reading."""

    path: Path
    size: tuple[int, ...]
    components: int
    pixel_id: int
    bytes_per_voxel: int
    data_file: Path | None = None  # None: layout unknown (e.g. a multi-file MetaImage); only the limits apply
    offset: int = 0
    encoding: str = "raw"  # raw, gzip (gzip or zlib stream), other (ascii, bzip2...: not checked)
    inner_offset: int = 0  # bytes before the voxels inside the decompressed stream (a .nii.gz header)

    @property
    def voxels(self) -> int:
        return int(np.prod(self.size, dtype=np.float64))

    @property
    def data_bytes(self) -> int:
        return self.voxels * self.bytes_per_voxel

    def check_data(self, what: str = "scan") -> None:
        """Raise InputError unless the file holds every byte its header promises."""
        if self.data_file is None or self.encoding == "other":
            return
        name = f"{what} {self.path}"
        try:
            available = self.data_file.stat().st_size - self.offset
        except OSError:
            raise InputError(f"{name}: its data file {self.data_file} is missing") from None
        if self.encoding == "raw":
            if available < self.data_bytes:
                raise InputError(f"{name} is truncated: its header declares {self.data_bytes} bytes of voxel data, "
                                 f"the file holds {max(available, 0)}")
            return
        needed = self.inner_offset + self.data_bytes
        got = _decompressed_length(self.data_file, self.offset, needed, name)
        if got < needed:
            raise InputError(f"{name} is truncated or corrupt (incomplete compressed data: "
                             f"{got} of {needed} bytes)")


def inspect_image_file(path: Path, what: str = "scan") -> ImageLayout:
    """Read only the header; refuse declared sizes that no file of this size can hold or that exceed MAX_VOXELS."""
    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    _check_gzip_magic(path, what)
    try:
        with captured_library_output():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise InputError(f"cannot read {what} {path}: not a readable image ({first[:120]})") from None
    pixel_id = reader.GetPixelIDValue()
    pixel_name = sitk.GetPixelIDValueAsString(pixel_id)
    if "complex" in pixel_name:
        raise InputError(f"{what} {path} holds complex-valued voxels; a real-valued (magnitude) image is needed")
    components = max(1, reader.GetNumberOfComponents())
    layout = ImageLayout(path, tuple(int(s) for s in reader.GetSize()), components, pixel_id,
                         _bytes_per_voxel(pixel_id, components))
    if layout.voxels > MAX_VOXELS:
        raise InputError(f"{what} {path} declares {' x '.join(map(str, layout.size))} voxels, more than this "
                         f"tool reads ({MAX_VOXELS:,}); is the header damaged?")
    _locate_data(layout, what)
    if layout.data_file is not None and layout.data_file.is_file():
        stored = max(0, layout.data_file.stat().st_size - layout.offset)
        if layout.encoding == "gzip" and layout.data_bytes > MAX_DEFLATE_RATIO * stored + (1 << 16):
            raise InputError(f"{what} {path} declares {layout.data_bytes:,} bytes of voxel data, more than "
                             f"{stored:,} compressed bytes can hold; the header is damaged")
        if layout.encoding == "raw" and layout.data_bytes > stored:
            raise InputError(f"{what} {path} is truncated: its header declares {layout.data_bytes:,} bytes of voxel "
                             f"data, the file holds {stored:,}")
    return layout


_ITEMSIZE: dict[int, int] = {}


def _bytes_per_voxel(pixel_id: int, components: int) -> int:
    if pixel_id not in _ITEMSIZE:
        vector = "vector" in sitk.GetPixelIDValueAsString(pixel_id)
        probe = sitk.Image([1, 1], pixel_id, 2) if vector else sitk.Image([1, 1], pixel_id)
        _ITEMSIZE[pixel_id] = sitk.GetArrayViewFromImage(probe).dtype.itemsize
    vector = "vector" in sitk.GetPixelIDValueAsString(pixel_id)
    return _ITEMSIZE[pixel_id] * (components if vector else 1)


def _check_gzip_magic(path: Path, what: str) -> None:
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as stream:
            if stream.read(2) != b"\x1f\x8b":
                raise InputError(f"cannot read {what} {path}: not a readable image (not gzip-compressed data)")


def _locate_data(layout: ImageLayout, what: str) -> None:
    """Fill in where the voxel data lie, per format; check header fields ITK would silently repair."""
    name = layout.path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _locate_nifti(layout, what)
    elif name.endswith((".mha", ".mhd")):
        _locate_metaimage(layout)
    elif name.endswith((".nrrd", ".nhdr")):
        _locate_nrrd(layout)


def _locate_nifti(layout: ImageLayout, what: str) -> None:
    import io as _io

    import nibabel as nib

    opener = gzip.open if layout.path.name.lower().endswith(".gz") else open
    try:
        with opener(layout.path, "rb") as stream:
            block = stream.read(540)
        # the raw header, unrepaired (nibabel's checks would turn pixdim 0 into 1, as ITK does)
        sizeof = int(np.frombuffer(block[:4], "<i4")[0])
        kind, length = (nib.Nifti2Header, 540) if sizeof in (540, 0x1C020000) else (nib.Nifti1Header, 348)
        header = kind.from_fileobj(_io.BytesIO(block[:length]), check=False)
        ndim = int(header["dim"][0])
        pixdim = np.asarray(header["pixdim"][1:1 + min(max(ndim, 1), 3)], dtype=np.float64)
        offset = int(header.get_data_offset())
    except Exception:  # noqa: BLE001 - nibabel refuses what ITK read; then only ITK's view applies
        return
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise InputError(f"{what} {layout.path} has an invalid voxel spacing in its header "
                         f"(pixdim {', '.join(f'{v:g}' for v in pixdim)}); it would be read as 1 mm")
    layout.data_file = layout.path
    layout.offset = offset
    # the stored type, not ITK's: ITK reads uint8 with a zero scl_slope as float32 (IXI files do)
    layout.bytes_per_voxel = int(header["bitpix"]) // 8 or layout.bytes_per_voxel
    layout.encoding = "gzip" if layout.path.name.lower().endswith(".gz") else "raw"
    if layout.encoding == "gzip":  # the offset counts in the decompressed stream
        layout.offset, layout.inner_offset = 0, offset


def _header_lines(path: Path, stop) -> tuple[list[str], int]:
    """Text header lines up to (and including) the line `stop` accepts; and the header's length in bytes."""
    with open(path, "rb") as stream:
        head = stream.read(1 << 16)
    lines, position = [], 0
    while position < len(head):
        end = head.find(b"\n", position)
        if end < 0:
            break
        line = head[position:end].decode("latin-1").rstrip("\r")
        position = end + 1
        lines.append(line)
        if stop(line):
            return lines, position
    return lines, -1


def _locate_metaimage(layout: ImageLayout) -> None:
    lines, length = _header_lines(layout.path, lambda line: line.split("=")[0].strip() == "ElementDataFile")
    if length < 0:
        return
    fields = {line.split("=", 1)[0].strip(): line.split("=", 1)[1].strip() for line in lines if "=" in line}
    target = fields.get("ElementDataFile", "")
    compressed = fields.get("CompressedData", "False").lower() == "true"
    if target == "LOCAL":
        layout.data_file, layout.offset = layout.path, length
    elif target and target.split()[0] not in ("LIST",) and "%" not in target and len(target.split()) == 1:
        layout.data_file = layout.path.parent / target
        header_size = int(fields.get("HeaderSize", "0") or 0)
        layout.offset = header_size if header_size > 0 else 0
        if header_size < 0 and not compressed and layout.data_file.is_file():  # -1: data at the end of the file
            layout.offset = max(0, layout.data_file.stat().st_size - layout.data_bytes)
    else:
        return
    layout.encoding = "gzip" if compressed else "raw"


def _locate_nrrd(layout: ImageLayout) -> None:
    lines, length = _header_lines(layout.path, lambda line: line == "")
    fields = {}
    for line in lines:
        if ":" in line and not line.startswith("#"):
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.lstrip("=").strip()
    encoding = fields.get("encoding", "raw").lower()
    layout.encoding = {"raw": "raw", "gzip": "gzip", "gz": "gzip"}.get(encoding, "other")
    detached = fields.get("data file") or fields.get("datafile")
    if detached:
        if detached.split()[0] == "LIST" or "%" in detached or len(detached.split()) != 1:
            return
        layout.data_file, layout.offset = layout.path.parent / detached, 0
    elif length >= 0:
        layout.data_file, layout.offset = layout.path, length
    else:
        return
    skip = fields.get("byte skip", "0")
    if layout.encoding == "raw" and skip.lstrip("-").isdigit():
        if int(skip) > 0:
            layout.offset += int(skip)
        elif int(skip) == -1 and layout.data_file.is_file():  # data at the end of the file
            layout.offset = max(0, layout.data_file.stat().st_size - layout.data_bytes)
    if fields.get("line skip", "0") not in ("0", ""):
        layout.encoding = "other"  # rare; the voxel limit still applies


def _decompressed_length(path: Path, offset: int, needed: int, name: str) -> int:
    """Decompress a gzip or zlib stream from `offset` (at most `needed` + 1 MiB of output, in chunks);
    return how many bytes it yields. A damaged stream is an InputError."""
    decoder = zlib.decompressobj(47)  # gzip or zlib header, detected
    total, limit = 0, needed + (1 << 20)
    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            while total < limit:
                chunk = stream.read(1 << 20)
                if not chunk:
                    break
                data = decoder.decompress(chunk, limit - total)
                total += len(data)
                while decoder.unconsumed_tail and total < limit:
                    data = decoder.decompress(decoder.unconsumed_tail, limit - total)
                    total += len(data)
                if decoder.eof:
                    rest = decoder.unused_data + stream.read()
                    if rest.startswith(b"\x1f\x8b"):  # a multi-member gzip file: go on with the next member
                        decoder = zlib.decompressobj(47)
                        data = decoder.decompress(rest, limit - total)
                        total += len(data)
                        if not decoder.eof and total < limit:
                            raise InputError(f"{name} is truncated or corrupt (incomplete gzip data)")
                    break
    except zlib.error:
        raise InputError(f"{name} is truncated or corrupt (damaged compressed data)") from None
    return total


def _check_same_grid(image: sitk.Image, layout: ImageLayout, what: str) -> None:
    if tuple(image.GetSize()) != layout.size[: image.GetDimension()] and image.GetDimension() == len(layout.size):
        raise InputError(f"{what}: its header and its data disagree on the image size")


def _read_dicom_series(folder: Path, what: str) -> sitk.Image:
    _check_dicom_members(folder, what)
    reader = sitk.ImageSeriesReader()
    with captured_library_output():
        series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{what} folder {folder} holds no DICOM series")
    if len(series) > 1:
        raise InputError(f"{what} folder {folder} holds {len(series)} DICOM series; give a folder with one")
    with captured_library_output():
        files = list(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    spacing = _check_dicom_slices(files, folder, what)
    reader.SetFileNames(files)
    try:
        with captured_library_output():
            image = reader.Execute()
    except RuntimeError:
        raise InputError(f"cannot read the DICOM series in {folder}") from None
    if image.GetDimension() != 3 or image.GetSize()[2] != len(files):
        raise InputError(f"{what} folder {folder}: {len(files)} slice files gave a volume of size {image.GetSize()}")
    if spacing is not None and abs(image.GetSpacing()[2] - spacing) > DICOM_SPACING_TOLERANCE * spacing:
        image.SetSpacing(image.GetSpacing()[:2] + (spacing,))  # the measured gap between slice positions
    return image


def _check_dicom_members(folder: Path, what: str) -> None:
    """Every entry of the folder must be readable: a dangling link or a link loop would make GDCM stop
    listing the folder part-way, and the series would be read from the slices it happened to see."""
    bad = []
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise InputError(f"cannot list {what} folder {folder}: {exc.strerror}") from None
    for entry in entries:
        try:
            info = os.stat(entry.path)  # follows links: a dangling link or a loop raises
        except OSError as exc:
            why = "link loop" if exc.errno == errno.ELOOP else "broken link" if entry.is_symlink() else exc.strerror
            bad.append(f"{entry.name} ({why})")
            continue
        if stat.S_ISDIR(info.st_mode):
            continue
        if not stat.S_ISREG(info.st_mode):
            bad.append(f"{entry.name} (not a regular file)")
        elif not os.access(entry.path, os.R_OK):
            bad.append(f"{entry.name} (not readable)")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise InputError(f"{what} folder {folder} has unreadable members: {', '.join(bad[:3])}{more}")


def _check_dicom_slices(files: list[str], folder: Path, what: str) -> float | None:
    """Refuse a series with missing, duplicate or unevenly spaced slices; return the slice gap (mm)."""
    positions, instances, declared = [], [], []
    orientation = None
    reader = sitk.ImageFileReader()
    for name in files:
        reader.SetFileName(name)
        try:
            with captured_library_output():
                reader.ReadImageInformation()
        except RuntimeError:
            raise InputError(f"{what} folder {folder}: slice {Path(name).name} is unreadable") from None
        keys = set(reader.GetMetaDataKeys())
        try:
            if "0020|0032" in keys:
                positions.append([float(v) for v in reader.GetMetaData("0020|0032").split("\\")[:3]])
            if orientation is None and "0020|0037" in keys:
                orientation = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")[:6]]
            if "0020|0013" in keys and reader.GetMetaData("0020|0013").strip():
                instances.append(int(float(reader.GetMetaData("0020|0013"))))
            if "0020|1002" in keys and reader.GetMetaData("0020|1002").strip():
                declared.append(int(float(reader.GetMetaData("0020|1002"))))
        except ValueError:
            raise InputError(f"{what} folder {folder}: slice {Path(name).name} has an unreadable position") from None
    n = len(files)
    if n < 2:
        return None
    if declared and max(declared) > n:
        raise InputError(f"{what} folder {folder} is incomplete: the series declares {max(declared)} slices, "
                         f"{n} are present")
    if len(instances) == n and len(set(instances)) == n and max(instances) - min(instances) + 1 > n:
        raise InputError(f"{what} folder {folder} is incomplete: instance numbers {min(instances)}-{max(instances)} "
                         f"but only {n} slices are present")
    if len(positions) != n or orientation is None or len(orientation) != 6:
        return None
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    depth = np.sort(np.asarray(positions) @ normal)
    gaps = np.diff(depth)
    median = float(np.median(gaps))
    if not np.isfinite(median) or median <= 1e-6:
        raise InputError(f"{what} folder {folder}: slices share one position (duplicated slices)")
    deviation = np.abs(gaps - median)
    if np.any(deviation > DICOM_SPACING_TOLERANCE * median):
        worst = int(np.argmax(deviation))
        missing = int(round(gaps[worst] / median)) - 1
        detail = (f"about {missing} slice(s) missing after position {depth[worst]:.1f} mm"
                  if missing >= 1 else f"slice gaps range from {gaps.min():.2f} to {gaps.max():.2f} mm")
        raise InputError(f"{what} folder {folder} has unevenly spaced slices ({detail}); it cannot be read "
                         "as one regular volume")
    return median


def validate_image(image: sitk.Image, what: str = "scan") -> sitk.Image:
    """Refuse what the model cannot use; return the image as a 3D float32 scalar image."""
    _check_voxel_kind(image, what)
    image = _as_volume(image, what)
    _check_size(image, what)
    _check_orientation(image, what)
    return _as_grey_levels(image, what)


def _check_voxel_kind(image, what: str) -> None:
    """A SimpleITK image of real-valued scalar voxels."""
    if not isinstance(image, sitk.Image):
        hint = " (numpy arrays: sitk.GetImageFromArray, with spacing, origin and direction set)" \
            if isinstance(image, np.ndarray) else ""
        raise InputError(f"{what} must be a SimpleITK image or a file path, not {type(image).__name__}{hint}")
    if "complex" in image.GetPixelIDTypeAsString():
        raise InputError(f"{what} holds complex-valued voxels; a real-valued (magnitude) image is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                         "a scalar (grey-level) 3D image is needed")


def _as_volume(image: sitk.Image, what: str) -> sitk.Image:
    """The image as a 3D volume (a 4D one with a single time point loses that axis)."""
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 4 and size[3] == 1:
        return image[:, :, :, 0]
    if dim != 3:
        raise InputError(f"{what} is {dim}D {size}; a 3D volume is needed")
    if min(size) < 2:
        raise InputError(f"{what} is a single 2D slice {size}; a 3D volume is needed")
    return image


def _check_size(image: sitk.Image, what: str) -> None:
    """Not more voxels than memory allows, valid spacing, and large enough to hold a brain."""
    size = image.GetSize()
    if int(np.prod(size, dtype=np.float64)) > MAX_VOXELS:
        raise InputError(f"{what} has {' x '.join(map(str, size))} voxels, more than this tool reads ({MAX_VOXELS:,})")
    spacing = image.GetSpacing()
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise InputError(f"{what} has an invalid voxel spacing {spacing}")
    if min(size) < MIN_VOXELS_PER_AXIS:
        raise InputError(f"{what} is too small ({' x '.join(map(str, size))} voxels) to hold a brain; "
                         f"at least {MIN_VOXELS_PER_AXIS} voxels along each axis are needed")
    extent = [n * s for n, s in zip(size, spacing)]
    if min(extent) < MIN_EXTENT_MM:
        raise InputError(f"{what} covers only {' x '.join(f'{e:.0f}' for e in extent)} mm; a brain needs at least "
                         f"{MIN_EXTENT_MM:.0f} mm along each axis")


def _check_orientation(image: sitk.Image, what: str) -> None:
    """A finite origin and a direction matrix that is a rotation (possibly with flips), not sheared."""
    if not np.all(np.isfinite(image.GetOrigin())):
        raise InputError(f"{what} has a non-finite origin {image.GetOrigin()}")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or abs(abs(np.linalg.det(direction)) - 1) > 1e-3:
        raise InputError(f"{what} has a degenerate orientation (direction matrix is not a rotation)")
    skew = float(np.max(np.abs(direction.T @ direction - np.eye(3))))
    if skew > ORTHONORMAL_TOLERANCE:
        raise InputError(f"{what} has non-orthogonal direction cosines (deviation {skew:.3g}, tolerance "
                         f"{ORTHONORMAL_TOLERANCE:g}): a sheared grid cannot be scored or written back exactly")


def _as_grey_levels(image: sitk.Image, what: str) -> sitk.Image:
    """The voxels as float32, every one finite, not all the same."""
    try:
        image = sitk.Cast(image, sitk.sitkFloat32)
    except RuntimeError:
        raise InputError(f"{what} has a voxel type ({image.GetPixelIDTypeAsString()}) that cannot be read as "
                         "grey levels") from None
    values = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(values)
    if not finite.all():
        raise InputError(f"{what} contains {int((~finite).sum())} NaN or infinite voxels")
    low, high = float(values.min()), float(values.max())
    if high - low <= 1e-6 * max(1.0, abs(high)):
        raise InputError(f"{what} is empty or constant (all voxels {low:g})")
    return image


def same_geometry(a: sitk.Image, b: sitk.Image, tolerance_mm: float = 1e-3) -> bool:
    """Equal size, spacing, origin and direction (to float32 precision of file formats)."""
    if a.GetSize() != b.GetSize():
        return False
    return (np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-5, atol=1e-6)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=1e-6, atol=tolerance_mm)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4))


# ---------------------------------------------------------------- writing images and JSON (through .atomic)

def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> None:
    """Write atomically; the file is re-read (header, geometry, every data byte) before it is renamed into place."""
    with atomic_path(path) as tmp:
        write_image_to(image, tmp, path, compress)


def write_image_to(image: sitk.Image, tmp: Path, final: str | os.PathLike, compress: bool = True) -> None:
    """Write `image` to the temporary path `tmp` (from AtomicFiles) and verify it; errors name `final`."""
    with writing(final), captured_library_output() as messages:
        try:
            sitk.WriteImage(image, str(tmp), compress)
        except RuntimeError as exc:
            raise OutputError(f"cannot write {final}: {str(exc).strip().splitlines()[-1][:120]}") from None
    verify_image_file(tmp, image, final, messages)


def verify_image_file(written: Path, image: sitk.Image, final: str | os.PathLike, messages=()) -> None:
    """Refuse a written image file that is incomplete or whose geometry differs from `image`'s."""
    hint = f" ({messages[0].strip()[:100]})" if messages else ""
    try:
        layout = inspect_image_file(Path(written), "output")
        layout.check_data("output")
    except InputError:
        raise OutputError(f"writing {final} failed: the file on disk is incomplete (disk full or over the file "
                          f"size limit?){hint}") from None
    except OSError as exc:
        raise output_error(exc, final) from None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(written))
    with captured_library_output():
        reader.ReadImageInformation()
    stored = sitk.Image([1] * image.GetDimension(), sitk.sitkUInt8)
    stored.SetSpacing(reader.GetSpacing())
    stored.SetOrigin(reader.GetOrigin())
    stored.SetDirection(reader.GetDirection())
    probe = sitk.Image([1] * image.GetDimension(), sitk.sitkUInt8)
    probe.CopyInformation(image[tuple(slice(0, 1) for _ in range(image.GetDimension()))])
    if tuple(reader.GetSize()) != tuple(image.GetSize()) or not same_geometry(stored, probe):
        raise OutputError(f"cannot write {final} with the image's exact geometry (size, spacing, origin or "
                          "direction changed on writing); choose another format (.nrrd, .mha)")


def write_json(data: dict, path: str | os.PathLike, strict: bool = False) -> None:
    with atomic_path(path) as tmp:
        write_json_to(data, tmp, path, strict)


def write_json_to(data: dict, tmp: Path, path: str | os.PathLike, strict: bool = True) -> None:
    """Write JSON to the temporary path `tmp` and verify its length; errors name `path`. `strict`: valid JSON
    only (NaN or Infinity refused), as reports must be; evaluation tables may hold NaN for undefined metrics."""
    try:
        text = json.dumps(data, indent=2, allow_nan=not strict) + "\n"
    except ValueError:
        raise OutputError(f"cannot write {path}: the data hold NaN or infinite numbers "
                          "(is the model damaged?)") from None
    payload = text.encode("utf-8")
    with writing(path):
        with open(tmp, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        if tmp.stat().st_size != len(payload):
            raise OutputError(f"writing {path} failed: only {tmp.stat().st_size} of {len(payload)} bytes reached "
                              "the disk")
