"""The errors minipar raises for bad input, so a user sees one clear sentence."""


class ConfigError(ValueError):
    """An invalid configuration or layout; raised on every rank before any work starts."""


class ShapeError(ValueError):
    """Operands whose shapes do not fit the op; the message names the op and both shapes."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt, or from another model shape."""


class DataError(RuntimeError):
    """A data file that is missing, unreadable or too small for the requested block size."""
