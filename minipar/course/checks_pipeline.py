"""Checks for the pipeline: the 1F1B schedule as data (schedules.py), checked by the simulator
before anything runs, then the executor on real ranks against one process's gradients.

The simulator is the oracle for a schedule: every send has its receive, nothing deadlocks,
each stage runs every micro-batch's forward and backward once, and 1F1B's point holds: stage $s$
never stashes more than $min(p − s, m)$ micro-batches, with GPipe's bubble $(p − 1)/(m + p − 1)$.
"""
from fractions import Fraction

import numpy as np

from minipar.course.checking import Check, CheckFailure, agreed, compare, require

LAYOUTS = [(p, m) for p in (1, 2, 3, 4, 6) for m in (1, 2, p, 2 * p + 1)]


def check_schedule_on_paper(comm):
    from minipar.parallel.pipeline.schedules import (
        BACKWARD,
        FORWARD,
        build_all_schedules,
    )
    from minipar.parallel.pipeline.simulator import ScheduleError, simulate

    for p, m in sorted(set(LAYOUTS)):
        schedules = build_all_schedules("1f1b", p, m)
        for stage, actions in enumerate(schedules):
            for kind in (FORWARD, BACKWARD):
                done = sorted(action.microbatch for action in actions if action.kind == kind)
                if done != list(range(m)):
                    raise CheckFailure(f"1f1b, p = {p}, m = {m}: stage {stage} runs {kind.name} on micro-batches "
                                       f"{done}, expected each of 0 … {m - 1} once")
        try:
            result = simulate(schedules, forward_time=Fraction(1), backward_time=Fraction(2), send_time=Fraction(0))
        except ScheduleError as error:
            raise CheckFailure(f"1f1b, p = {p}, m = {m}: the simulator refuses the schedules: {error}") from None
        allowed = [min(p - stage, m) for stage in range(p)]
        for stage in range(p):
            if result.peak_in_flight[stage] > allowed[stage]:
                raise CheckFailure(
                    f"1f1b, p = {p}, m = {m}: stage {stage} stashes {result.peak_in_flight[stage]} micro-batches at "
                    f"once, 1F1B allows min(p − s, m) = {allowed[stage]}: p − s − 1 warm-up forwards, then one "
                    f"backward after each forward")
        expected = Fraction(p - 1, m + p - 1)
        if result.bubble_fraction != expected:
            raise CheckFailure(f"1f1b, p = {p}, m = {m}: bubble {result.bubble_fraction} of the step, expected "
                               f"(p − 1)/(m + p − 1) = {expected}: a backward waits longer than it must")


class SendWatch:
    """A Communicator whose ``isend`` buffers are watched until their request completes.

    MPI leaves a send buffer's contents undefined to the sender until Test or Wait says the send
    is done; small messages usually leave eagerly, so writing into a buffer still in flight tends
    to pass unseen. Here every write is seen: each in-flight buffer is compared with its copy at
    isend time before every later isend, and at completion. And sends are slow: ``test()``
    answers False the first ``SLOW_TESTS`` times (MPI allows any delay), so code that reuses a
    buffer without asking is caught even when the message has long left.
    """

    def __init__(self, communicator):
        self.communicator, self.in_flight, self.misuses = communicator, [], []

    def __getattr__(self, name):
        return getattr(self.communicator, name)

    def look(self, when):
        for buffer, copy, tag in self.in_flight:
            if not np.array_equal(np.asarray(buffer), copy):
                self.misuses.append(f"the send buffer of the message with tag {tag} was written {when}, "
                                    "while its Isend was still in flight")
                copy[...] = np.asarray(buffer)

    def isend(self, array, dest, tag=0):
        self.look(f"before the isend with tag {tag}")
        for buffer, _, other in self.in_flight:
            if np.shares_memory(np.asarray(buffer), np.asarray(array)):
                self.misuses.append(f"the isend with tag {tag} reuses the buffer of tag {other}, still in flight")
        entry = (array, np.asarray(array).copy(), tag)
        self.in_flight.append(entry)
        return _WatchedRequest(self, self.communicator.isend(array, dest, tag), entry)


SLOW_TESTS = 2


class _WatchedRequest:
    def __init__(self, watch, request, entry):
        self.watch, self.request, self.entry, self.tests = watch, request, entry, 0

    def __getattr__(self, name):
        return getattr(self.request, name)

    def _done(self):
        self.watch.look("before the send completed")
        if self.entry in self.watch.in_flight:
            self.watch.in_flight.remove(self.entry)

    def test(self):
        self.tests += 1
        if self.tests <= SLOW_TESTS:
            return False
        done = self.request.test()
        if done:
            self._done()
        return done

    def wait(self):
        result = self.request.wait()
        self._done()
        return result


def _pipeline_gradients(comm, schedule, watch=False, recompute=False, steps=2, dtype_name="float64"):
    """p ranks run ``schedule`` through one executor for ``steps`` steps; after each, every stage's gradients
    equal one process's on that step's batch, in ``dtype_name``. ``recompute``: the forward keeps only its
    input, and backward runs the chunk again from it (so a received activation must still hold its values then)."""
    from minipar.backend import from_host, host_rng, set_default_dtype, to_host, xp
    from minipar.comm import Communicator
    from minipar.nn.gpt import GPT, GPTConfig
    from minipar.parallel.pipeline.executor import PipelineExecutor, split_microbatches
    from minipar.parallel.pipeline.partition import TiedEmbeddingGradientSum, partition, stage_parameters

    dtype = xp.dtype(dtype_name)
    tolerance = {"float64": 1e-12, "float32": 2e-5}[dtype_name]
    set_default_dtype(dtype)
    pp = Communicator(comm)
    m, rows = 2 * pp.size + 1, 1
    config = GPTConfig(vocab_size=8, block_size=4, n_layer=pp.size, n_head=2, n_embd=8)
    chunks = partition(GPT(config).pieces(), pp.size, pp.rank)
    channel = SendWatch(pp) if watch else pp
    executor = PipelineExecutor(chunks, channel, schedule, m, (rows, config.block_size, config.n_embd), dtype,
                                recompute=recompute)
    label = f"{schedule}{', recomputation on' if recompute else ''}{', float32' if dtype_name == 'float32' else ''}"

    def one_step(step):
        rng = host_rng(9 + step)
        inputs = from_host(rng.integers(0, config.vocab_size, (m * rows, config.block_size)))
        targets = from_host(rng.integers(0, config.vocab_size, (m * rows, config.block_size)))
        reference = GPT(config)
        reference(inputs, targets)[1].backward()
        expected = {name: to_host(q.grad) for name, q in reference.named_parameters()}
        for _, parameter in stage_parameters(chunks):
            parameter.grad = None
        executor.run(split_microbatches(inputs, m), split_microbatches(targets, m))
        where = f"stage {pp.rank}, {label}, step {step + 1}"
        def no_misuse():
            if watch and channel.misuses:
                raise CheckFailure(f"{where}: {channel.misuses[0]} ({len(channel.misuses)} such misuses): take a "
                                   "free buffer for every send and reuse it only after Test or Wait says its send "
                                   "completed")

        agreed(comm, no_misuse)   # every stage stops here together, before the next messages
        TiedEmbeddingGradientSum(stage_parameters(chunks), pp).finish_gradient_sync()
        for name, parameter in stage_parameters(chunks):
            got = None if parameter.grad is None else np.asarray(to_host(parameter.grad))
            if (got is None or not got.any()) and expected[name].any():
                raise CheckFailure(f"{where}: dL/d{name} is zero, one process's is not: no gradient reached this "
                                   "stage (the received activation must be a leaf with requires_grad, and its .grad "
                                   "is what goes back)")
            require(got.dtype == dtype, f"{where}: dL/d{name} is {got.dtype} in a {dtype_name} run: keep the "
                                        "dtype of the messages (a received activation or gradient is the buffer's "
                                        "dtype, the executor's)")
        for name, parameter in stage_parameters(chunks):
            compare(f"{where}: dL/d{name}, element", np.asarray(to_host(parameter.grad)), expected[name],
                    "one process's gradient on the whole batch (each micro-batch's loss scaled by 1/m)"
                    + ("; with recomputation the backward reruns the chunk on the received activation, so that "
                       "activation must be a copy MPI no longer writes into" if recompute else ""),
                    rtol=tolerance, atol=tolerance)

    for step in range(steps):
        agreed(comm, one_step, step)


def check_schedule_on_ranks(comm):
    """The executor on the student's 1F1B, once the simulator accepts it (a schedule it refuses would only
    leave the ranks waiting for a message no stage sends)."""
    from minipar.parallel.pipeline.schedules import build_all_schedules
    from minipar.parallel.pipeline.simulator import ScheduleError, simulate

    p, m = comm.Get_size(), 2 * comm.Get_size() + 1
    try:
        simulate(build_all_schedules("1f1b", p, m), forward_time=Fraction(1), backward_time=Fraction(2),
                 send_time=Fraction(0))
    except ScheduleError as error:
        raise CheckFailure(f"1f1b, p = {p}, m = {m}: not run on ranks, the simulator refuses the schedules "
                           f"(they would deadlock): {error}") from None
    _pipeline_gradients(comm, "1f1b")


def check_messages(schedule, recompute=False, dtype_name="float64", steps=2):
    def check(comm):
        _pipeline_gradients(comm, schedule, watch=True, recompute=recompute, steps=steps, dtype_name=dtype_name)

    return check


MESSAGES = [
    Check("gpipe through the executor, send buffers watched, 2 steps", (2, 3, 4), check_messages("gpipe"), limit=12),
    Check("1f1b through the executor, send buffers watched, 2 steps", (2, 4), check_messages("1f1b"), limit=12),
    Check("1f1b with recomputation, send buffers watched, 2 steps", (3, 4), check_messages("1f1b", True), limit=12),
    Check("1f1b, float32 kept, send buffers watched, 2 steps", (3,), check_messages("1f1b", False, "float32"),
          limit=12),
]
ONE_F_ONE_B = [
    Check("1f1b schedules on paper (simulator), p ≤ 6", (1,), check_schedule_on_paper),
    Check("1f1b through the executor vs one process, 2 steps", (2, 4), check_schedule_on_ranks, limit=12),
]
