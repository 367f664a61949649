"""Recomputation: run a module's forward a second time with the same random draws.

Activation recomputation (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"; used
by GPipe) keeps only a piece's input between its forward and its backward, and runs the forward
again right before the backward, this time recording the graph. Dropout must then draw the same
masks both times: ``random_states(module)`` saves the state of every generator of the module's
Dropout layers at the first forward, and ``replaying(module, states)`` restores it for the second
and puts the generators back where they were afterwards. The pipeline executor (``--recompute``)
and ZeRO-3 (which gathers a piece's parameters again for its backward) both rely on it.
"""
from contextlib import contextmanager


def random_states(module):
    """The states of ``module``'s random generators (its Dropout layers'), to replay its draws later."""
    return [generator.bit_generator.state for generator in module.random_generators()]


@contextmanager
def replaying(module, states):
    """Inside the block ``module`` draws what it drew from ``states`` (``random_states``); after it,
    its generators carry on as if the block had not run. Recomputation relies on it (and ZeRO-3)."""
    generators = module.random_generators()
    current = [generator.bit_generator.state for generator in generators]
    for generator, state in zip(generators, states, strict=True):
        generator.bit_generator.state = state
    try:
        yield
    finally:
        for generator, state in zip(generators, current, strict=True):
            generator.bit_generator.state = state
