"""Errors that more than one loader module raises.

`CheckpointError` lives here rather than in model/checkpoint.py because model/gguf_weights.py raises
it too and model/checkpoint.py imports model/gguf_weights.py; both import it from here, and
model.checkpoint re-exports it (`from model.checkpoint import CheckpointError` keeps working).
"""


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded; the message names the file or tensor and what is expected."""
