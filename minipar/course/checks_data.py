"""Checks for data parallelism (minipar/parallel/data_parallel.py) and ZeRO-1 (minipar/parallel/zero.py).

The oracle is one process: the same GPT (same seed, float64) on the whole global batch, one
backward, and for ZeRO the same clipping and AdamW step. Data-parallel rank $d$ takes rows
$[d B/N, (d+1) B/N)$ in $m$ micro-batches; after the gradient sync its gradients must be the
single-process gradient, $Δθ = (1/N) Σ_i Δθ_i$, to about 1e-12.
"""
import numpy as np

from minipar.course.checking import Check, CheckFailure, agreed, compare, require

MODEL = {"vocab_size": 8, "block_size": 4, "n_layer": 2, "n_head": 2, "n_embd": 8}


def _batch(rows, seed=12):
    from minipar.backend import from_host, host_rng

    tokens = host_rng(seed).integers(0, MODEL["vocab_size"], (rows, MODEL["block_size"] + 1))
    return from_host(np.ascontiguousarray(tokens[:, :-1])), from_host(np.ascontiguousarray(tokens[:, 1:]))


def _single_process_gradients(inputs, targets, dtype_name="float64"):
    from minipar.backend import to_host
    from minipar.nn.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(**MODEL), dtype=dtype_name)
    model(inputs, targets)[1].backward()
    return {name: np.asarray(to_host(p.grad)) for name, p in model.named_parameters()}


def ratio_hint(size):
    """A ``compare`` hint naming the usual scale mistakes of an average over ``size`` ranks."""
    known = [(size / (size - 1) if size > 1 else None, "divided by N − 1 instead of N"),
             (float(size), "summed but not divided by N"), (1.0 / size, "divided by N twice")]

    def hint(index, got, expected):
        if expected == 0 or got == 0 or not np.isfinite(got):
            return "a division by N − 1 = 0?" if size == 1 and not np.isfinite(got) else ""
        ratio = float(got) / float(expected)
        meanings = [meaning for value, meaning in known
                    if value is not None and value != 1 and abs(ratio - value) < 1e-9 * max(1.0, value)]
        return f"got / expected = {ratio:.6g}: {', or '.join(meanings)}?" if meanings else ""

    return hint


CARRIED = ("step 1 passed with this code, step {step} did not: look for state kept from the previous step and not "
           "reset (a count of grad-ready hooks, a flag or a set of what was already sent, a scratch buffer made "
           "once and added into): every step must start from what start_step() leaves")


def after_a_step(step, rank, run):
    """``run(step)``; a failure after a good first step names the likely cause: state kept across steps."""
    try:
        run(step)
    except CheckFailure as failure:
        if step == 0:
            raise
        raise CheckFailure(f"{failure}\n{CARRIED.format(step=step + 1)}") from failure
    except Exception as error:
        if step == 0:
            raise
        last = (str(error).strip().splitlines() or [""])[-1]
        raise CheckFailure(f"rank {rank}, step {step + 1} raised {type(error).__name__}: {last}\n"
                           f"{CARRIED.format(step=step + 1)}") from error


def carried_hint(size, previous):
    """``ratio_hint``, and a wrong value that is this step's expected one plus the previous step's (a
    buffer kept across steps and added into) said as such."""
    ratio = ratio_hint(size)

    def hint(index, got, expected):
        if previous is not None:
            before = float(previous[index])
            if before != 0 and abs(float(got) - (float(expected) + before)) <= 1e-9 * (abs(float(got)) + 1e-300):
                return (f"got = this step's expected value + the previous step's ({before:.10g}): the previous "
                        "step's gradient is still in it, so a buffer kept across steps was added into and never "
                        "reset")
        return ratio(index, got, expected)

    return hint


def _require_buckets_sent_whole(spy, buckets, rank, step):
    """The contract: one allreduce per bucket per step, each of the whole bucket."""
    sizes = sorted(bucket.flat.size for bucket in buckets)
    sent = sorted(call.elements for call in spy.collectives() if call.method in ("Allreduce", "Iallreduce"))
    require(sent == sizes, f"rank {rank}, step {step + 1}: {len(sent)} allreduce(s) of {sent} elements; the contract "
                           f"is one allreduce per bucket, of the whole bucket ({len(sizes)} of {sizes} elements): "
                           "the gradients are packed into the buckets (they are views of them) so that each bucket "
                           "pays the latency α once, not each parameter")


def _backward_as_the_contract_says(model, microbatches, spy, rank, size, step, overlap):
    """Backward on each micro-batch (loss / m): no collective before the last one; with overlap, the
    buckets' allreduces start (non-blocking) during the last backward."""
    m = len(microbatches)
    for index, (x, y) in enumerate(microbatches):
        before = len(spy.collectives())
        (model(x, y)[1] * (1.0 / m)).backward()
        backward_ended = len(spy.collectives())
        if index < m - 1 and backward_ended > before:
            raise CheckFailure(
                f"rank {rank}, step {step + 1}: {backward_ended - before} collective(s) started during "
                f"micro-batch {index + 1} of {m}; gradients are final only after the last one: communicate "
                "on the last micro-batch only (a parameter is ready at its m-th grad-ready hook)")
    if overlap and size > 1:
        require(backward_ended > 0,
                f"rank {rank}, step {step + 1}: no allreduce started before the last backward ended; with "
                "overlap=True a bucket's allreduce starts (iallreduce) as soon as its gradients are final, "
                "while backward computes the rest: that overlap is the exercise")
        blocking = sorted({call.method for call in spy.collectives()[:backward_ended]} - {"Iallreduce"})
        require(not blocking,
                f"rank {rank}, step {step + 1}: backward called MPI's {', '.join(blocking)} (blocking) from "
                "the grad-ready hook: backward then stops until every rank gets there, so nothing overlaps; "
                "start the bucket's allreduce with iallreduce and wait for it in finish_gradient_sync")


def _data_parallel_check(overlap, microbatches, bucket_bytes, dtype_name="float64", steps=3):
    """``steps`` steps of DataParallel on a GPT; every rank's gradients (biases too) after each step equal one
    process's; with overlap, the first bucket's allreduce starts before the last backward ends."""

    def check(comm):
        from minipar.backend import to_host
        from minipar.comm import Communicator
        from minipar.course.spy import spy_on
        from minipar.nn.gpt import GPT, GPTConfig
        from minipar.parallel.data_parallel import DataParallel, local_slice
        from minipar.parallel.pipeline.executor import split_microbatches

        dp_comm = Communicator(comm)
        spy = spy_on(dp_comm)
        rank, size, m = dp_comm.rank, dp_comm.size, microbatches
        tolerance = {"float64": 1e-12, "float32": 2e-5}[dtype_name]
        model = GPT(GPTConfig(**MODEL), dtype=dtype_name)
        dp = DataParallel(model.parameters(), dp_comm, bucket_bytes=bucket_bytes, overlap=overlap,
                          accumulation_steps=m)
        previous = {}

        def one_step(step):
            inputs, targets = _batch(size * m * 2, seed=12 + step)
            expected = _single_process_gradients(inputs, targets, dtype_name)
            dp.start_step()
            spy.clear()
            mine = local_slice((inputs, targets), rank, size)
            micro = list(zip(split_microbatches(mine[0], m), split_microbatches(mine[1], m), strict=True))
            _backward_as_the_contract_says(model, micro, spy, rank, size, step, overlap)
            dp.finish_gradient_sync()
            _require_buckets_sent_whole(spy, dp.buckets, rank, step)
            for name, p in model.named_parameters():
                require(p.grad is not None, f"rank {rank}, step {step + 1}: {name}.grad is None after "
                                            "finish_gradient_sync")
                got = np.asarray(to_host(p.grad))
                require(got.dtype == np.dtype(dtype_name), f"rank {rank}, step {step + 1}: {name}.grad is "
                                                           f"{got.dtype} in a {dtype_name} run: keep the dtype")
                compare(f"rank {rank}, step {step + 1}: {name}.grad after finish_gradient_sync, element", got,
                        expected[name], "Δθ = (1/N) Σ_i Δθ_i, the single-process gradient of the whole batch",
                        carried_hint(size, previous.get(name)), rtol=tolerance, atol=tolerance)
            previous.update(expected)

        for step in range(steps):
            agreed(comm, after_a_step, step, rank, one_step)

    return check


def _zero_contract(spy, rank, step, elements):
    """ZeRO-1's messages in one step: reduce-scatters and all-gathers of the model, no allreduce of it."""
    calls = spy.collectives()
    reduced = [call for call in calls if call.method in ("Allreduce", "Iallreduce") and call.elements > 16]
    require(not reduced, f"rank {rank}, step {step + 1}: ZeRO-1 called MPI's {reduced[0].method if reduced else ''} "
                         f"on {reduced[0].elements if reduced else 0} elements: the contract is one reduce-scatter "
                         "of the gradients and one all-gather of the updated parameters per step, never an "
                         "allreduce (an allreduce moves the same bytes but every rank then holds every gradient, "
                         "which is what ZeRO saves)")
    scattered = sum(call.elements for call in calls if call.method in ("Reduce_scatter_block", "Reduce_scatter",
                                                                      "Ireduce_scatter_block"))
    gathered = sum(call.elements for call in calls if call.method in ("Allgather", "Iallgather"))
    require(scattered >= elements, f"rank {rank}, step {step + 1}: ZeRO-1 reduce-scattered {scattered} elements, "
                                   f"the model has {elements}: every gradient goes through one reduce-scatter")
    require(gathered > 0, f"rank {rank}, step {step + 1}: ZeRO-1 never all-gathered the updated parts: "
                          "all-gather the updated parts after the optimizer step")


def _zero_reference_step(reference, optimizer, config, inputs, targets, step):
    """One process's step; returns its parameters before the step and its full gradients (host copies)."""
    from minipar.backend import to_host
    from minipar.optim import clip_grad_norm
    from minipar.train import learning_rate_at

    for p in reference.parameters():
        p.grad = None
    reference(inputs, targets)[1].backward()
    before = {name: np.asarray(to_host(p.data)).copy() for name, p in reference.named_parameters()}
    full_grads = {name: np.asarray(to_host(p.grad)).copy() for name, p in reference.named_parameters()}
    clip_grad_norm(reference.parameters(), config.grad_clip)
    optimizer.set_lr(learning_rate_at(config, step))
    optimizer.step()
    return before, full_grads


def _part_of(full_gradient, rank, size):
    """Rank ``rank``'s part of a flat gradient zero-padded to N × s, s = ceil(n / N)."""
    length = -(-full_gradient.size // size)
    padded = np.zeros(size * length)
    padded[:full_gradient.size] = full_gradient.reshape(-1)
    return padded[rank * length:(rank + 1) * length]


def _require_zero_parts(trainer, full_grads, rank, size, step, dtype_name, tolerance, previous=None):
    """After the sync: this rank's part of every gradient is rows [rank s, (rank + 1) s) of the padded average;
    ``previous`` (the last step's full gradients) names a part that still holds the last step's."""
    from minipar.backend import to_host

    for name, p in trainer.named_parameters:
        part = trainer.sync.updated_tensor(p)
        length = -(-p.size // size)                                        # s = ceil(n / N)
        require(part.grad is not None, f"rank {rank}, step {step + 1}: the part of {name} has no gradient "
                                       "after the sync")
        got = np.asarray(to_host(part.grad))
        require(got.dtype == np.dtype(dtype_name),
                f"rank {rank}, step {step + 1}: the part of dL/d{name} is {got.dtype} in a {dtype_name} run: "
                "keep the gradient's dtype (zeros(..., dtype=array.dtype) for the padding)")
        compare(f"rank {rank}, step {step + 1}: its part of dL/d{name} (flat elements [{rank * length}, "
                f"{(rank + 1) * length}) of {p.size}, zero-padded to {size} × {length}), element",
                got.reshape(-1), _part_of(full_grads[name], rank, size), "ḡ_d = (1/N) Σ_i g_i on the part rank d owns",
                carried_hint(size, None if previous is None else _part_of(previous[name], rank, size)),
                rtol=tolerance, atol=tolerance)


def _require_zero_parameters(trainer, reference, before, rank, size, step, dtype_name, tolerance):
    """After the step: every full parameter equals one process's, and an element still holding its old
    value names the all-gather that never came."""
    from minipar.backend import to_host

    for name, p in trainer.named_parameters:
        got = np.asarray(to_host(p.data)).reshape(-1)
        require(got.dtype == np.dtype(dtype_name), f"rank {rank}, step {step + 1}: {name} is {got.dtype} "
                                                   f"after the step of a {dtype_name} run: keep the dtype")
        expected = np.asarray(to_host(dict(reference.named_parameters())[name].data)).reshape(-1)
        length = -(-p.size // size)

        def stale(index, got_value, expected_value, name=name, length=length):
            if got_value == before[name].reshape(-1)[index[0]]:
                return (f"this element still holds its value from before the step: the updated part of "
                        f"rank {index[0] // length} never arrived (all-gather the updated parts)")
            return ""

        compare(f"rank {rank}, step {step + 1}: {name} after the AdamW step, flat element", got, expected,
                "one process's clipped AdamW step", stale, rtol=tolerance, atol=tolerance)


def _require_rows(size, dtype_name):
    """``Zero._rows`` on arrays of n = 1, N + 1, 2N − 1 and 3N numbers (N divides only the last): (N, s) rows,
    s = ceil(n / N), the numbers in order, zeros after them, the dtype kept."""
    import types

    from minipar.backend import from_host, to_host
    from minipar.parallel.zero import Zero

    stand_in = types.SimpleNamespace(count=size, rank=0)
    for n in sorted({1, size + 1, 2 * size - 1, 3 * size}):
        array = from_host(np.arange(1, n + 1, dtype=dtype_name))
        try:
            rows = Zero._rows(stand_in, types.SimpleNamespace(size=n, shape=(n,), dtype=array.dtype), array)
        except AttributeError:
            return                     # it needs more of the Zero object than count: graded through the Trainer
        got, length = np.asarray(to_host(rows)), -(-n // size)
        require(got.shape == (size, length),
                f"Zero._rows of n = {n} numbers on N = {size} ranks: expected shape ({size}, {length}) (s = ceil(n/N) "
                f"= {length}, zero-padded to N·s = {size * length}), got {got.shape}: when N does not divide n the "
                "last part is padded with zeros, no number is dropped")
        require(got.dtype == np.dtype(dtype_name), f"Zero._rows of a {dtype_name} array is {got.dtype} in a "
                                                   f"{dtype_name} run: keep the array's dtype "
                                                   "(zeros(..., dtype=array.dtype))")
        expected = np.zeros(size * length)
        expected[:n] = np.arange(1, n + 1)
        flat = got.reshape(-1)
        in_front = n < flat.size and np.array_equal(flat[flat.size - n:], expected[:n])
        compare(f"Zero._rows of n = {n} numbers on N = {size} ranks, flat element", flat, expected,
                "element i < n is number i, then zeros", lambda *_, in_front=in_front: (
                    "the numbers sit at the end: the padding goes after them, so that rank d's part is numbers "
                    "[d s, (d + 1) s)" if in_front else ""))


def _zero_check(dtype_name, steps):
    """ZeRO-1 through the Trainer for ``steps`` steps: each rank's gradient part, then the parameters after
    AdamW, against one process; the dtype kept; the messages of the contract."""

    def check(comm):
        from minipar.comm import Communicator
        from minipar.course.spy import spy_on
        from minipar.nn.gpt import GPT, GPTConfig
        from minipar.optim import AdamW, decay_groups
        from minipar.train import TrainConfig, Trainer

        world = Communicator(comm)
        rank, size = world.rank, world.size
        agreed(comm, _require_rows, size, dtype_name)
        tolerance = {"float64": 1e-12, "float32": 2e-5}[dtype_name]
        config = TrainConfig(steps=steps, batch_size=4 * size, dtype=dtype_name, learning_rate=1e-2,
                             warmup_steps=1, dp=size, zero=1, microbatches=2)
        trainer = Trainer(GPTConfig(**MODEL), config, world)
        spy = spy_on(trainer.sync.comm)
        reference = GPT(GPTConfig(**MODEL), dtype=dtype_name)
        optimizer = AdamW(decay_groups(reference.named_parameters(), config.weight_decay), lr=config.learning_rate,
                          betas=config.betas, weight_decay=config.weight_decay)
        elements = sum(p.size for _, p in trainer.named_parameters)
        previous = None
        for step in range(steps):
            inputs, targets = _batch(4 * size, seed=12 + step)
            before, full_grads = _zero_reference_step(reference, optimizer, config, inputs, targets, step)
            spy.clear()
            trainer.compute_gradients(inputs, targets)
            # all ranks stop together before the all-gather of the step
            agreed(comm, after_a_step, step, rank, lambda step, full_grads=full_grads, previous=previous:
                   _require_zero_parts(trainer, full_grads, rank, size, step, dtype_name, tolerance, previous))
            trainer.update()

            def after_the_step(step, before=before):
                _zero_contract(spy, rank, step, elements)
                _require_zero_parameters(trainer, reference, before, rank, size, step, dtype_name, tolerance)

            agreed(comm, after_a_step, step, rank, after_the_step)
            previous = full_grads

    return check


DATA_PARALLEL = [
    Check("gradient average, buckets, 2 micro-batches, 3 steps", (1, 2, 3, 4, 8), _data_parallel_check(False, 2, 512)),
    Check("gradient average, overlapped, 3 micro-batches, 3 steps", (2, 3, 8), _data_parallel_check(True, 3, 512)),
    Check("gradient average, overlapped, float32 kept, 2 steps", (3,), _data_parallel_check(True, 2, 512, "float32", 2)),
]
ZERO_1 = [  # dp 1: ZeRO is off
    Check("ZeRO-1 parts and 3 steps vs one process, float64", (2, 3, 4, 8), _zero_check("float64", 3)),
    Check("ZeRO-1 parts and 2 steps vs one process, float32 kept", (3, 4), _zero_check("float32", 2)),
]
