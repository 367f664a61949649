"""What the autograd engine records: switched off by ``no_grad``, watched by ``observe_saved``.

The engine (minipar/tensor.py) reads ``recording`` in every ``Function.apply`` and calls the
``saved_observers`` in every ``save_for_backward``; both are module state, one per process,
as PyTorch's grad mode is one per thread (minipar runs one compute thread per rank).
"""
from contextlib import contextmanager

recording = True  # False inside no_grad: ops run but leave no graph behind
saved_observers = []  # opt-in: see observe_saved


@contextmanager
def no_grad():
    """Run a block without recording a graph (evaluation, optimizer updates)."""
    global recording
    previous, recording = recording, False
    try:
        yield
    finally:
        recording = previous


def is_grad_enabled():
    return recording


@contextmanager
def observe_saved(observer):
    """Call ``observer(arrays)`` at every ``save_for_backward`` in the block (to count activation memory)."""
    saved_observers.append(observer)
    try:
        yield
    finally:
        saved_observers.remove(observer)
