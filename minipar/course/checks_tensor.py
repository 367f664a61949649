"""Checks for tensor parallelism: Megatron's f and g, the column/row-parallel linear layers
(minipar/parallel/tensor_parallel_comm.py, tensor_parallel.py) and the vocabulary-parallel
cross-entropy.

Oracles: f and g against sums computed on one rank from every rank's (reproducible) data, with
the digits of ``digit_data``; the layers against one unsplit ``Linear``; the loss against the
single-process cross-entropy of the whole logits, forward and backward.
"""
import numpy as np

from minipar.course.checking import (
    Check,
    CheckFailure,
    compare,
    digit_data,
    digit_sum,
    digits_hint,
    require,
)


def _setup(comm):
    from minipar.backend import set_default_dtype, xp
    from minipar.comm import Communicator

    set_default_dtype(xp.float64)
    return Communicator(comm)


def _host(array):
    from minipar.backend import to_host

    return np.asarray(to_host(array))


def check_f_and_g(comm):
    from minipar.backend import from_host
    from minipar.parallel.tensor_parallel_comm import (
        CopyToTensorParallelRegion,
        ReduceFromTensorParallelRegion,
    )
    from minipar.tensor import Tensor

    tp = _setup(comm)
    rank, size, count = tp.rank, tp.size, 6
    x = Tensor(from_host(np.arange(1.0, count + 1)), requires_grad=True)   # the same on every rank
    y = CopyToTensorParallelRegion.apply(x, communicator=tp)
    compare(f"rank {rank}: f forward, y", _host(y.data), np.arange(1.0, count + 1), "f is the identity: y = x")
    y.backward(from_host(digit_data(rank, count)))                          # rank r's branch: dL/dy = digits
    compare(f"rank {rank}: f backward, dL/dx", _host(x.grad), digit_sum(size, count),
            "f's backward sums dL/dy over the tensor-parallel ranks (an allreduce)", digits_hint(size))

    partial = Tensor(from_host(digit_data(rank, count)), requires_grad=True)
    z = ReduceFromTensorParallelRegion.apply(partial, communicator=tp)
    compare(f"rank {rank}: g forward, z", _host(z.data), digit_sum(size, count),
            "g sums the partial results of the ranks (an allreduce)", digits_hint(size))
    upstream = np.linspace(-1.0, 1.0, count)                                # dL/dz, the same on every rank
    z.backward(from_host(upstream))
    compare(f"rank {rank}: g backward, dL/dpartial", _host(partial.grad), upstream,
            "g's backward is the identity: each term of a sum gets the sum's gradient")


def _layers(tp, sequence_parallel):
    """A column-parallel and a row-parallel layer holding their slices of two seeded full Linears."""
    from minipar.backend import from_host, host_rng
    from minipar.parallel.sequence_parallel import SequenceParallelRegion
    from minipar.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from minipar.parallel.tensor_parallel_comm import TensorParallelRegion

    width, hidden = 4, 4 * tp.size
    rng = host_rng(3)
    full = {"A": rng.standard_normal((width, hidden)), "a": rng.standard_normal(hidden),
            "B": rng.standard_normal((hidden, width)), "b": rng.standard_normal(width)}
    region = (SequenceParallelRegion if sequence_parallel else TensorParallelRegion)(tp)
    column = ColumnParallelLinear(width, hidden, region)
    row = RowParallelLinear(hidden, width, region)
    for parameter, name in ((column.weight, "A"), (column.bias, "a"), (row.weight, "B")):
        parameter.data[...] = from_host(parameter.shard.take(full[name]))
    row.bias.data[...] = from_host(full["b"])
    return column, row, full


def _linear_check(sequence_parallel):
    def check(comm):
        from minipar.backend import from_host, host_rng
        from minipar.tensor import Tensor

        tp = _setup(comm)
        rank, size = tp.rank, tp.size
        column, row, full = _layers(tp, sequence_parallel)
        batch, length = 2, 2 * size
        x_full = host_rng(4).standard_normal((batch, length, full["A"].shape[0]))  # the same on every rank
        upstream_full = host_rng(5).standard_normal((batch, length, full["B"].shape[1]))
        mine = slice(rank * length // size, (rank + 1) * length // size) if sequence_parallel else slice(None)
        x = Tensor(from_host(np.ascontiguousarray(x_full[:, mine])), requires_grad=True)
        hidden = column(x)
        y_full_hidden = x_full @ full["A"] + full["a"]
        columns = y_full_hidden.shape[-1] // size
        compare(f"rank {rank}: ColumnParallelLinear output", _host(hidden.data),
                y_full_hidden[..., rank * columns:(rank + 1) * columns],
                "Y_j = X A_j + a_j: this rank's columns of the full layer's output"
                + (", with X all-gathered along the sequence first" if sequence_parallel else ""))
        out = row(hidden)
        out_full = y_full_hidden @ full["B"] + full["b"]
        compare(f"rank {rank}: RowParallelLinear output", _host(out.data), out_full[:, mine],
                "Z = Σ_j Y_j B_j + b, the bias added once after the sum"
                + (" (reduce-scattered: this rank's positions)" if sequence_parallel else ""))
        out.backward(from_host(np.ascontiguousarray(upstream_full[:, mine])))
        grad_hidden = upstream_full @ full["B"].T
        expected_dx = grad_hidden @ full["A"].T
        compare(f"rank {rank}: dL/dx through both layers", _host(x.grad), expected_dx[:, mine],
                "the full layers' input gradient: f (or the all-gather's reduce-scatter) sums the ranks' parts")
        expected_dA = np.einsum("btc,bth->ch", x_full, grad_hidden)
        compare(f"rank {rank}: dL/dA_j", _host(column.weight.grad), column.weight.shard.take(expected_dA),
                "this rank's columns of the full dL/dA")
        compare(f"rank {rank}: dL/da_j (the column-parallel bias)", _host(column.bias.grad),
                column.bias.shard.take(grad_hidden.sum(axis=(0, 1))), "this rank's entries of Σ_bt dL/dY")
        expected_dB = np.einsum("bth,btc->hc", y_full_hidden, upstream_full)
        compare(f"rank {rank}: dL/dB_j", _host(row.weight.grad), row.weight.shard.take(expected_dB),
                "this rank's rows of the full dL/dB")
        if not sequence_parallel:   # there each rank holds its positions' part; the trainer sums them later
            require(row.bias.grad is not None, f"rank {rank}: the row-parallel bias has no gradient on this rank")
            compare(f"rank {rank}: dL/db (the row-parallel bias, replicated: every rank holds all of it)",
                    _host(row.bias.grad), upstream_full.sum(axis=(0, 1)),
                    "Σ_bt dL/dZ on every rank: b is added once, after g, and its gradient is the whole upstream sum")

    return check


def _vocab_check(offset):
    def check(comm):
        from minipar.backend import from_host, host_rng
        from minipar.course.spy import spy_on
        from minipar.ops.fused import CrossEntropy
        from minipar.parallel.tensor_parallel_comm import VocabParallelCrossEntropy
        from minipar.tensor import Tensor

        tp = _setup(comm)
        spy = spy_on(tp)
        rank, size = tp.rank, tp.size
        vocabulary, rows = 4 * size, 2 * size + 2
        rng = host_rng(6)
        logits = rng.standard_normal((2, rows // 2, vocabulary)) * 3 + offset   # large offsets overflow exp
        targets = rng.integers(0, vocabulary, (2, rows // 2))
        targets.reshape(-1)[:size] = [r * (vocabulary // size) + (vocabulary // size - 1) for r in range(size)]
        targets.reshape(-1)[size:2 * size] = [r * (vocabulary // size) for r in range(size)]   # shard edges
        local = vocabulary // size
        start = rank * local
        shard = Tensor(from_host(np.ascontiguousarray(logits[..., start:start + local])), requires_grad=True)
        loss = VocabParallelCrossEntropy.apply(shard, from_host(targets), communicator=tp, vocab_start=start)
        whole = Tensor(from_host(logits), requires_grad=True)
        expected = CrossEntropy.apply(whole, from_host(targets))
        compare(f"rank {rank}: the loss (logits + {offset:g})", _host(loss.data), _host(expected.data),
                "mean_i [log Σ_v exp(z_iv − m_i) − (z_it − m_i)], m_i the global row max, "
                "over the whole vocabulary", _vocab_mistakes(logits, targets, size, rank))
        loss.backward()
        expected.backward()
        compare(f"rank {rank}: dL/dz on this rank's vocabulary slice [{start}, {start + local}), element",
                _host(shard.grad), _host(whole.grad)[..., start:start + local],
                "(softmax − onehot(target)) / n on this slice")
        if not np.isfinite(_host(loss.data)).all():
            raise CheckFailure(f"rank {rank}: the loss is not finite: subtract the global row max before exp")
        _require_few_numbers_per_row(spy, rank, rows, local)

    return check


def _require_few_numbers_per_row(spy, rank, rows, local):
    """The contract: allreduces of a number or two per row (row max, Σ exp, the target's logit), never
    the logits (what gathering them would cost is what vocabulary parallelism saves)."""
    for call in spy.collectives():
        require(call.method in ("Allreduce", "Iallreduce", "allreduce") and call.elements <= 2 * rows,
                f"rank {rank}: the vocabulary-parallel loss called MPI's {call.method} on {call.elements} elements; "
                f"the contract is allreduces of one or two numbers per row (here at most 2 × {rows} rows: the row "
                f"max, Σ exp, the target's logit), never the logits ({rows} × {local} per rank): gathering them is "
                "what the vocabulary-parallel loss avoids")


def _vocab_mistakes(logits, targets, size, rank):
    """A hint naming the loss a student gets when one of the three allreduces is missing."""
    rows, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    local = rows.shape[1] // size
    shards = [rows[:, j * local:(j + 1) * local] for j in range(size)]
    picked = rows[np.arange(rows.shape[0]), flat_targets]
    owner = flat_targets // local
    global_max = rows.max(axis=1)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        shard_max = np.stack([shard.max(axis=1) for shard in shards])           # (N, n)
        candidates = {
            "the loss with each rank's own row max (allreduce the max, op='max')":
                np.log(sum(np.exp(shard - shard_max[j][:, None]).sum(axis=1) for j, shard in enumerate(shards)))
                - (picked - shard_max[owner, np.arange(rows.shape[0])]),
            "the loss with only this rank's Σ exp (allreduce the sum of exponentials)":
                np.log(np.exp(shards[rank] - global_max[:, None]).sum(axis=1)) - (picked - global_max),
        }
        log_sum = np.log(np.exp(rows - global_max[:, None]).sum(axis=1))
        for edge, position in (("first", 0), ("last", local - 1)):
            lost = flat_targets % local == position       # the target logit counted on no rank
            name = (f"the loss with targets on a shard's {edge} entry found on no rank: check the range "
                    "[vocab_start, vocab_start + V/t) of this rank's targets")
            candidates[name] = log_sum - np.where(lost, 0.0, picked - global_max)
    values = {name: float(np.mean(value)) for name, value in candidates.items()}

    def hint(index, got, expected):
        for name, value in values.items():
            if np.isclose(float(got), value, rtol=1e-12, atol=1e-12):
                return f"your loss equals {name}"
        return ""

    return hint


F_AND_G = [
    Check("f and g, forward and backward", (1, 2, 4, 8), check_f_and_g),
    Check("column then row-parallel linear", (1, 2, 4, 8), _linear_check(False)),
    Check("column then row-parallel linear, sequence parallel", (2, 4), _linear_check(True)),
]
VOCAB = [
    Check("vocab-parallel cross-entropy", (1, 2, 4, 8), _vocab_check(0.0)),
    Check("vocab-parallel cross-entropy, logits + 1000", (2, 4), _vocab_check(1000.0)),
]
