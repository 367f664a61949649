"""What the autograd engine records: switched off by ``no_grad``, watched by ``observe_saved``;
and, under ``rounding_to``, the 16-bit format its ops round to (minipar/mixed_precision.py).

The engine (minipar/tensor.py) reads ``recording`` in every ``Function.apply`` and calls the
``saved_observers`` in every ``save_for_backward``; both are module state, one per process,
as PyTorch's grad mode is one per thread (minipar runs one compute thread per rank).
"""
from contextlib import contextmanager

recording = True  # False inside no_grad: ops run but leave no graph behind
saved_observers = []  # opt-in: see observe_saved
round_to_format = None  # 16-bit compute: rounds op outputs and gradients to the format (see rounding_to)


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


@contextmanager
def rounding_to(round_array):
    """Emulate 16-bit compute in the block: every op's output, every gradient an op passes back and
    every sum of gradients is ``round_array(array)`` (minipar/mixed_precision.py). An op computes
    in fp32 from 16-bit inputs and rounds once, as a GPU kernel does; ops with ``rounds_output = False``
    (the loss: an fp32 island; ops that only move numbers) keep their result as it is."""
    global round_to_format
    previous, round_to_format = round_to_format, round_array
    try:
        yield
    finally:
        round_to_format = previous


def rounded(array):
    """``array`` in the 16-bit format of ``rounding_to`` (floating arrays only), or as it is."""
    if round_to_format is None or array is None or getattr(array, "dtype", None) is None or array.dtype.kind != "f":
        return array
    return round_to_format(array)
