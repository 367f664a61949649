"""minipar: learn and check how large language models are trained in parallel."""
from minipar import _threads  # noqa: F401  (must run before NumPy is imported)

__version__ = "0.1.0"
