"""Cutting a step's batch into micro-batches, and the shapes of the messages between chunks.

``split_microbatches(batch, m)`` gives the list the pipeline executor (and the naive GPipe) take:
rows $[i·b, (i+1)·b)$ as micro-batch $i$, $b = B/m$. With equal micro-batches the whole-batch mean
loss is $L = (1/m) Σ_i L_i$, with $L_i$ micro-batch $i$'s mean loss, which is why the executor scales
each micro-batch's loss by $1/m$ (GPipe, Huang et al. 2019, section 2.2).

``boundary_shapes(activation_shape, total_chunks)``: boundary $c$, between chunk $c$ and chunk
$c + 1$, carries chunk $c$'s output forward and its gradient back (the same shape both ways); one shape for
every boundary (a transformer's (b, T, C)) or one per boundary (an MLP whose widths change).
"""
from minipar.errors import ConfigError, require_positive_int


def split_microbatches(batch, num_microbatches):
    """Rows $[i·b, (i+1)·b)$ of ``batch`` as micro-batch $i$, $b = B/m$: the list ``run`` takes."""
    require_positive_int("the number of micro-batches", num_microbatches)
    rows = batch.shape[0]
    if rows % num_microbatches:
        raise ConfigError(f"a batch of {rows} rows does not split into {num_microbatches} equal micro-batches; "
                          f"choose a number of micro-batches that divides {rows}")
    size = rows // num_microbatches
    return [batch[i * size:(i + 1) * size] for i in range(num_microbatches)]


def boundary_shapes(activation_shape, total_chunks):
    """One shape per boundary between consecutive chunks, checked: a list of total_chunks - 1 tuples."""
    shapes = list(activation_shape)
    if all(isinstance(n, int) and not isinstance(n, bool) for n in shapes):  # one shape for every boundary
        return [tuple(shapes)] * (total_chunks - 1)
    if len(shapes) != total_chunks - 1 or not all(isinstance(shape, (tuple, list)) for shape in shapes):
        raise ConfigError(f"activation_shape must be one shape, e.g. (b, T, C), or a list of {total_chunks - 1} "
                          f"shapes, one per boundary between the {total_chunks} chunks; got {activation_shape!r}")
    return [tuple(shape) for shape in shapes]
