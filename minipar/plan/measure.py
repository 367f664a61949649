"""What a real step holds and sends, read from a Trainer, to check the planner against.

- ``SavedBytes``: the peak bytes the autograd engine keeps for backward during a step, counted at
  ``Context.save_for_backward`` (``minipar.tensor.observe_saved``): every saved array while a graph
  is being recorded, minus parameters (they are held anyway) and integer index arrays (token ids and
  targets: the batch itself), freed when the array is collected.
- ``measure_step``: one step under that counter, with the dp, tp and pp communicators' traffic
  counters reset just before it; returns {"activations", "bytes": {group: bytes sent}}.
"""
import weakref

from minipar.backend import xp
from minipar.tensor import is_grad_enabled, observe_saved


def owner(array):
    """The array that owns the memory a view looks at."""
    while getattr(array, "base", None) is not None and hasattr(array.base, "nbytes"):
        array = array.base
    return array


class SavedBytes:
    """Call it with saved arrays (an observer for ``observe_saved``); ``peak`` and ``live`` in bytes."""

    def __init__(self, parameters):
        self.parameters = parameters
        self.live = self.peak = 0

    def __call__(self, arrays):
        if not is_grad_enabled():  # a forward under no_grad keeps nothing: its context dies at once
            return
        held = {id(owner(p.data)) for p in self.parameters}  # looked up now: ZeRO-3 swaps p.data
        for array in arrays:
            if not isinstance(array, xp.ndarray) or array.dtype.kind in "iu" or id(owner(array)) in held:
                continue
            self.live += array.nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(array, self._free, array.nbytes)

    def _free(self, nbytes):
        self.live -= nbytes


def measure_step(trainer, inputs, targets):
    """Peak saved bytes and bytes sent per group during one ``trainer.train_step``."""
    groups = {"dp": trainer.grid.dp, "tp": trainer.grid.tp, "pp": trainer.grid.pp}
    ends = trainer.partial_gradients.holder_groups.get("pp")
    if ends:  # the first and last stage's own communicator for the tied embedding's sum
        groups["pp-ends"] = ends[0]
    for communicator in groups.values():
        communicator.reset_counters()
    counter = SavedBytes(trainer.parameters)
    with observe_saved(counter):
        trainer.train_step(inputs, targets)
    sent = {name: sum(record["bytes_sent"] for record in communicator.counters_snapshot().values())
            for name, communicator in groups.items()}
    sent.setdefault("pp-ends", 0)
    return {"activations": counter.peak, "bytes": sent}
