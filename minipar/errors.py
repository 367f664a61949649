"""The errors minipar raises for bad input, so a user sees one clear sentence."""


class ConfigError(ValueError):
    """An invalid configuration or layout; raised on every rank before any work starts."""


class ShapeError(ValueError):
    """Operands whose shapes do not fit the op; the message names the op and both shapes."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt, or from another model shape."""


class DataError(RuntimeError):
    """A data file that is missing, unreadable or too small for the requested block size."""


class JobError(RuntimeError):
    """A failure found while running the job (a check that failed on some ranks, a NaN loss);
    ``minipar.job`` says it once and ends every rank."""


class UsageError(ConfigError):
    """A command line that argparse cannot parse; the message is argparse's own."""


def require_finite(name, value, minimum=None, strictly=False):
    """``value`` as a float if it is a finite number (and >= or > ``minimum``), else a ConfigError naming ``name``."""
    import math

    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (number <= minimum if strictly else number < minimum):
        raise ConfigError(f"{name} must be {'>' if strictly else '>='} {minimum}, got {value!r}")
    return number


def require_positive_int(name, value, minimum=1):
    """``value`` if it is an int >= ``minimum`` (bools refused), else a ConfigError naming ``name``.

    The one check behind every "must be a positive integer" in minipar, so every message reads alike.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name} must be {what}, got {value!r}")
    return value
