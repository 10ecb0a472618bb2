"""Errors that carry one clear message for the user; the CLI prints it and exits with status 2."""


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
