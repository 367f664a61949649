"""The placement of every parameter on every axis, as a table read from a built model.

What ``placement.py`` says in words, shown for a real layout: each rank lists what its optimizer
updates (``placement_rows``: the parameter's single-process name, its whole shape and its placement
on each axis, as the Trainer recorded them), the lists of all ranks are merged into one
(``merge_rows``: every rank that holds a parameter must agree on its placements, and the blocks,
which are placed alike, collapse into one ``blocks.i`` row), and ``markdown_table`` prints it.
``scripts/placement_table.py`` does this for the GPT under any layout, e.g.

    mpiexec -n 8 python scripts/placement_table.py --dp 2 --tp 2 --pp 2 --sequence-parallel

Shapes are written in the model's symbols (C = n_embd, V = vocab_size, T = block_size, and the
multiples 3C, 4C), so the table reads the same for any size of model.
"""
import re

from minipar.parallel.placement import Partial, Replicate, Shard, placement_of


def describe(placement):
    """A placement as it is written in the docs: ``Shard(1, blocks=3)``, ``Partial("sum", holders=(0, 1))``."""
    if isinstance(placement, Shard):
        return f"Shard({placement.dim}" + (f", blocks={placement.blocks})" if placement.blocks > 1 else ")")
    if isinstance(placement, Partial):
        return f'Partial("{placement.op}"' + (f", holders={placement.holders})" if placement.holders else ")")
    if isinstance(placement, Replicate):
        return "Replicate()"
    raise TypeError(f"not a placement: {placement!r}")


def shape_symbols(model_config):
    """{extent: symbol} for the extents a GPT's parameters have; clashing extents keep their number."""
    named = {"C": model_config.n_embd, "3C": 3 * model_config.n_embd, "4C": 4 * model_config.n_embd,
             "V": model_config.vocab_size, "T": model_config.block_size}
    symbols = {}
    for symbol, extent in named.items():
        symbols[extent] = None if extent in symbols else symbol  # two symbols for one number: say the number
    return {extent: symbol for extent, symbol in symbols.items() if symbol is not None}


def whole_shape(parameter):
    """The shape of the single-process tensor that ``parameter`` is a tensor-parallel slice of."""
    shape = list(parameter.shape)
    shard = getattr(parameter, "shard", None)
    if shard is not None and not shard.is_replicated:
        shape[shard.axis] *= shard.count
    return tuple(shape)


def placement_rows(named_parameters, updated_tensor, axes, symbols=None):
    """[(name, whole shape as text, {axis: placement text})] for this rank's parameters.

    ``updated_tensor(p)``: what the optimizer updates for ``p`` (the gradient sync's; under ZeRO a
    part of it, whose dp placement is ``Shard(0)``), whose placements are the ones shown.
    """
    symbols = symbols or {}
    rows = []
    for name, parameter in named_parameters:
        tensor = updated_tensor(parameter)
        extents = [str(symbols.get(n, n)) for n in whole_shape(parameter)]
        shape = "(" + ", ".join(extents) + ("," if len(extents) == 1 else "") + ")"
        rows.append((name, shape, {axis: describe(placement_of(tensor, axis)) for axis in axes}))
    return rows


def merge_rows(rows_per_rank):
    """One row per parameter over all ranks, the blocks collapsed into ``blocks.i``, in first-seen order.

    Raises ValueError when two ranks, or two blocks, place one parameter differently: the table
    would then hide a difference.
    """
    merged = {}
    for rank, rows in enumerate(rows_per_rank):
        for name, shape, placements in rows:
            key = re.sub(r"^blocks\.\d+\.", "blocks.i.", name)
            entry = (shape, placements)
            if key in merged and merged[key][1] != entry:
                raise ValueError(f"{key}: rank {rank} has {entry}, rank {merged[key][0]} has {merged[key][1]}")
            merged.setdefault(key, (rank, entry))
    return [(name, shape, placements) for name, (_, (shape, placements)) in merged.items()]


def markdown_table(rows, axes):
    """The rows as a Markdown table: parameter, whole shape, then one column per axis."""
    lines = ["| parameter | shape (whole) | " + " | ".join(axes) + " |",
             "|---|---|" + "---|" * len(axes)]
    for name, shape, placements in rows:
        lines.append(f"| `{name}` | {shape} | " + " | ".join(f"`{placements[axis]}`" for axis in axes) + " |")
    return "\n".join(lines)
