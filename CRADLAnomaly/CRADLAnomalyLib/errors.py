"""The bridge's own error (a clear, user-facing message about the scene, not about the model) and the one
mapping from any error to the words the panel shows."""
from __future__ import annotations

from cradl.errors import CradlError, user_message  # torch-free: the panel opens before PyTorch is installed


class BridgeError(ValueError):
    """A node cannot be used as asked (no data, sheared or non-linearly transformed geometry...)."""


def userMessage(error: BaseException) -> str:
    """The core's and the bridge's errors carry a message for the user; others get their type too (the core's
    mapping, by exception type, with the bridge's own user errors added)."""
    from .dependencies import InstallInProgress
    from .worker import WorkerError

    return user_message(error, (CradlError, BridgeError, WorkerError, InstallInProgress))
