"""Writing files atomically: a temporary beside the final name, renamed into place only when complete.

Nothing a user sees is ever half-written: a failed or killed write leaves the earlier file (or none),
and operating-system errors become one clear OutputError. Needs only the standard library, so every
writer (also the torch-only training steps) shares it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputError

_NAME_MAX = 255
_REASONS = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file too large (over the file size limit)",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EROFS: "read-only file system",
            errno.EDQUOT: "disk quota exceeded", errno.ENAMETOOLONG: "file name too long",
            errno.EISDIR: "it is a folder", errno.ENOENT: "its folder does not exist"}


def output_error(exc: OSError, path: str | os.PathLike) -> OutputError:
    """One line for an operating-system error while writing `path`."""
    return OutputError(f"cannot write {path}: {_REASONS.get(exc.errno, exc.strerror or str(exc))}")


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError raised while writing `path` (full disk, file size limit, permissions) into an OutputError."""
    try:
        yield
    except OSError as exc:
        raise output_error(exc, path) from None


def name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system of `folder` accepts; output names are cut to fit it."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return _NAME_MAX


def temporary_suffix(name: str) -> str:
    """The suffix writers choose formats by (.nii.gz whole, else the last one), kept short."""
    if name.lower().endswith(".nii.gz"):
        return name[-7:]
    suffix = Path(name).suffix
    return suffix if 0 < len(suffix.encode()) <= 16 else ".tmp"


def check_output_path(final: str | os.PathLike) -> Path:
    """Refuse, before any work, an output that cannot be written: missing or read-only folder, an existing
    folder of that name, a name too long for the file system."""
    final = Path(final)
    with writing(final):
        _check_parent(final)
        if final.is_dir():
            raise OutputError(f"cannot write {final}: it is a folder")
        if final.exists() and not final.is_file():
            raise OutputError(f"cannot write {final}: it exists and is not a regular file")
    return final


def check_output_folder(final: str | os.PathLike, replaceable) -> Path:
    """Refuse, before any work, a folder output (many files) that cannot be written: what `check_output_path`
    refuses, a file of that name, or an existing folder holding anything but files whose names
    `replaceable(name)` accepts (an earlier run's): the folder is replaced whole, so nothing else may be in it."""
    final = Path(final)
    with writing(final):
        _check_parent(final)
        if final.exists() and not final.is_dir():
            raise OutputError(f"cannot write {final}: it exists and is not a folder")
        if final.is_dir():
            foreign = sorted(p.name for p in final.iterdir() if not (p.is_file() and replaceable(p.name)))
            if foreign:
                raise OutputError(f"cannot write {final}: the folder holds {foreign[0]}, which is not an earlier "
                                  "result of this kind and would be deleted; choose another name")
    return final


def _check_parent(final: Path) -> None:
    parent = final.parent if str(final.parent) else Path(".")
    if len(final.name.encode()) > name_max(parent):
        raise OutputError(f"cannot write {final}: file name too long ({len(final.name.encode())} bytes, "
                          f"at most {name_max(parent)})")
    if not parent.is_dir():
        raise OutputError(f"cannot write {final}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {final}: folder {parent} is not writable")


def temporary_beside(final: Path, folder: bool = False) -> Path:
    """A new temporary file (or folder) in the folder of `final`, hidden, named '.STEM-XXXXXXXX.SUFFIX' after
    it (writers choose formats by the suffix; a killed run's leftovers are found by that pattern)."""
    parent = final.parent if str(final.parent) else Path(".")
    suffix = temporary_suffix(final.name)
    budget = name_max(parent) - len(suffix.encode()) - 10  # ".", "-" and mkstemp's 8 random characters
    stem = final.name.split(".")[0].encode()[:max(0, min(budget, 64))].decode("utf-8", "ignore")
    with writing(final):
        if folder:
            return Path(tempfile.mkdtemp(prefix=f".{stem}-", suffix=suffix, dir=parent))
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}-", suffix=suffix, dir=parent)
    os.close(fd)
    return Path(tmp)


class AtomicFiles:
    """Temporary files (and folders) beside their final names; `commit` renames them all into place.

    Until then nothing the user sees has changed: a failure part-way through a set of outputs
    leaves neither a partial file nor a temporary behind, and files of an earlier run stay as they were.
    """

    def __init__(self):
        self._pending: list[tuple[Path, Path]] = []

    def path(self, final: str | os.PathLike) -> Path:
        """A temporary path for `final`, in its folder, ending in its suffixes (writers choose formats by them)."""
        final = check_output_path(final)
        tmp = temporary_beside(final)
        self._pending.append((tmp, final))
        return tmp

    def folder(self, final: str | os.PathLike, replaceable) -> Path:
        """An empty temporary folder for the folder output `final` (see `check_output_folder`); `commit` puts
        it in place whole, replacing an earlier run's folder."""
        final = check_output_folder(final, replaceable)
        tmp = temporary_beside(final, folder=True)
        self._pending.append((tmp, final))
        return tmp

    def commit(self) -> list[Path]:
        for tmp, final in self._pending:
            if tmp.is_dir():
                if not any(tmp.iterdir()):
                    raise OutputError(f"writing {final} failed (no file was written)")
                if final.exists() and not final.is_dir():
                    raise OutputError(f"cannot write {final}: it exists and is not a folder")
                continue
            if not tmp.is_file() or tmp.stat().st_size == 0:
                raise OutputError(f"writing {final} failed (no data was written)")
            if final.is_dir():
                raise OutputError(f"cannot write {final}: it is a folder")
        mode = 0o666 & ~_umask()  # mkstemp makes 0600; results get the permissions of a normal file
        for tmp, final in self._pending:
            with writing(final):
                if tmp.is_dir():
                    _replace_folder(tmp, final, 0o777 & ~_umask())
                else:
                    os.chmod(tmp, mode)
                    os.replace(tmp, final)
        done, self._pending = [final for _, final in self._pending], []
        return done

    def discard(self) -> None:
        for tmp, _ in self._pending:
            with contextlib.suppress(OSError):
                if tmp.is_dir():
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink(missing_ok=True)
        self._pending = []


def _replace_folder(tmp: Path, final: Path, mode: int) -> None:
    """Put the complete folder `tmp` at `final`. A folder cannot be renamed over a non-empty one, so an earlier
    one is first renamed aside (a temporary name, removed after): `final` is always either the earlier folder
    or the new one, never a mixture (at worst, for an instant, absent)."""
    os.chmod(tmp, mode)  # mkdtemp makes 0700
    aside = temporary_beside(final, folder=True) if final.is_dir() else None
    if aside is not None:
        os.replace(final, aside)  # onto the empty folder just made
    try:
        os.replace(tmp, final)
    except OSError:
        if aside is not None:
            os.replace(aside, final)  # put the earlier folder back
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_files() -> Iterator[AtomicFiles]:
    """All-or-nothing writing of several files: commit inside the block, or nothing is kept."""
    files = AtomicFiles()
    try:
        yield files
    finally:
        files.discard()  # whatever was not committed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    with atomic_files() as files:
        yield files.path(path)
        files.commit()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
