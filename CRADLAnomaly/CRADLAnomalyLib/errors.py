"""The bridge's own error: a clear, user-facing message about the scene (not about the model)."""


class BridgeError(ValueError):
    """A node cannot be used as asked (no data, sheared or non-linearly transformed geometry...)."""
