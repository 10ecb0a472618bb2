"""Errors that carry one clear message for the user; the CLI prints it and exits with status 2."""
from __future__ import annotations


class CradlError(Exception):
    """Base class: anything the user can fix (bad input, bad model, unwritable output)."""


class InputError(CradlError):
    """The scan or mask cannot be used: missing, unreadable, wrong dimension, empty, non-finite..."""


class ModelError(CradlError):
    """The model bundle is missing, truncated, tampered with, foreign or of an unknown format."""


class OutputError(CradlError):
    """An output cannot be written: it would replace an input, the disk is full, permission denied..."""


class DetectionCancelled(CradlError):
    """The caller's cancel() returned True; nothing was written."""


def one_line(exc: BaseException | str, limit: int = 600) -> str:
    """A message on one line; a long one is cut in the middle, so the reason after a long path survives."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit // 2] + "..." + text[-(limit - limit // 2 - 3):]


def user_message(exc: BaseException, user_errors: tuple[type[BaseException], ...] = (CradlError,)) -> str:
    """The words for the user, by the error's type: an error the user can act on (`user_errors`) says it all
    in its message; anything else is a bug, so its type goes with it."""
    return str(exc) if isinstance(exc, user_errors) else f"{type(exc).__name__}: {exc}"


def scan_failure(exc: BaseException) -> str:
    """One line for a scan that failed in a batch (the CLI's, Dask's, the Slicer module's): the message of a
    user error, else the bug's type and message marked as internal."""
    text = one_line(user_message(exc))
    return text if isinstance(exc, CradlError) else f"internal error: {text}"
