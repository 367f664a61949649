"""Bodies of tests/test_devicesim_mpi.py: the Communicator on backend arrays, under any backend.

``communicator_report`` runs every Communicator call (MPI's built-ins and the hand-built ring,
tree and recursive doubling) on backend arrays made from known host data, and returns, per
rank, a digest of every result, the traffic counters, and the host<->device copies each call
made. The test runs it under NumPy and under devicesim and
compares: same results, same counters, and under devicesim exactly the staged copies that
docs/gpu.md documents.
"""
import gc
import hashlib

import numpy

from minipar import backend
from minipar.backend import from_host, to_host, xp
from minipar.comm import Communicator

COUNT = 1003  # not divisible by 2 or 4: blocks of unequal length


def _data(rank, salt, count=COUNT):
    return numpy.arange(count, dtype=numpy.float64) * (rank + 1) + salt  # exact in float64


def _digest(array):
    return hashlib.sha256(numpy.ascontiguousarray(to_host(array)).tobytes()).hexdigest()[:16]


def _calls(world):
    """(name, counter names, prepare, run): ``prepare()`` makes the backend arrays (copies we do not
    count), ``run(*arrays)`` makes the call and returns the array holding its result."""
    rank, size = world.rank, world.size
    right, left = (rank + 1) % size, (rank - 1) % size

    def data(salt, count=COUNT):
        return lambda: [from_host(_data(rank, salt, count))]

    def with_out(salt, count, out_count):
        return lambda: [from_host(_data(rank, salt, count)), xp.zeros(out_count)]

    calls = []
    for algorithm in ("mpi", "ring", "recursive_doubling", "tree"):
        calls.append((f"allreduce {algorithm}", "allreduce", data(1),
                      lambda array, a=algorithm: world.allreduce(array, algorithm=a)))
    calls.append(("allreduce out=", "allreduce", with_out(2, COUNT, COUNT),
                  lambda array, out: world.allreduce(array, out=out)))
    for algorithm in ("mpi", "ring"):
        calls.append((f"allgather {algorithm}", "allgather", with_out(3, 7, 7 * size),
                      lambda send, out, a=algorithm: world.allgather(send, out, algorithm=a)))
        calls.append((f"reduce_scatter {algorithm}", "reduce_scatter", with_out(4, 5 * size, 5),
                      lambda send, out, a=algorithm: world.reduce_scatter(send, out, algorithm=a)))
    for algorithm in ("mpi", "tree"):
        calls.append((f"broadcast {algorithm}", "broadcast", data(5),
                      lambda array, a=algorithm: world.broadcast(array, root=size - 1, algorithm=a)))
        calls.append((f"reduce {algorithm}", "reduce", with_out(6, COUNT, COUNT),
                      lambda send, out, a=algorithm: _reduce_to_rank_0(world, send, out, a)))
    calls.append(("scatter", "scatter", with_out(7, 3 * size, 3),
                  lambda send, out: world.scatter(send if rank == 0 else None, out, root=0)))
    if size > 1:
        calls.append(("send/recv", "send recv", with_out(8, 11, 11),
                      lambda send, out: _ring_of_sends(world, send, out)))
        calls.append(("sendrecv", "sendrecv", with_out(9, 13, 13),
                      lambda send, out: world.sendrecv(send, right, out, left)))
        calls.append(("isend/irecv", "isend irecv", with_out(10, 17, 17),
                      lambda send, out: _isend_irecv(world, send, out)))
    calls.append(("iallreduce", "iallreduce", data(11), lambda array: world.iallreduce(array).wait()))
    return calls


def _isend_irecv(world, send, out):
    right, left = (world.rank + 1) % world.size, (world.rank - 1) % world.size
    requests = [world.irecv(out, left), world.isend(send, right)]
    for request in requests:
        request.wait()
    return out


def _reduce_to_rank_0(world, send, out, algorithm):
    world.reduce(send, out if world.rank == 0 else None, root=0, algorithm=algorithm)
    return out  # zeros off the root


def _ring_of_sends(world, send, out):
    """Even ranks send first and odd ranks receive first, so blocking calls cannot deadlock."""
    right, left = (world.rank + 1) % world.size, (world.rank - 1) % world.size
    if world.rank % 2 == 0:
        world.send(send, right)
        world.recv(out, left)
    else:
        world.recv(out, left)
        world.send(send, right)
    return out


def communicator_report(comm, transport=None):
    world = Communicator(comm, transport)
    report = {"rank": world.rank, "backend": backend.BACKEND_NAME, "transport": world.transport, "calls": {}}
    for name, counter_names, prepare, run in _calls(world):
        arrays = prepare()
        comm.Barrier()
        world.reset_counters()
        backend.reset_copy_counts()
        result = run(*arrays)
        copies = dict(backend.copy_counts)
        counters = {key: {field: value for field, value in record.items() if field != "seconds"}
                    for key, record in world.counters_snapshot().items() if key in counter_names.split()}
        report["calls"][name] = {"digest": _digest(result), "counters": counters, "copies": copies}
    if backend.BACKEND_NAME == "devicesim":
        report["implicit"] = {key: value for key, value in xp.transfers.items() if key.startswith("implicit")}
    return report


def step_copies_report(comm, layout):
    """One float64 training step of ``layout`` after a warm-up step. Returns, per rank, the named
    copies (backend.copy_counts), every crossing devicesim saw (implicit ones apart), and the
    calls each of the rank's Communicators made, from which the staged copies follow."""
    from minipar.nn.gpt import GPTConfig
    from minipar.train import TrainConfig, Trainer

    world = Communicator(comm)
    model_config = GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=4, n_embd=32)
    trainer = Trainer(model_config, TrainConfig(steps=2, batch_size=8, dtype="float64", **layout), world)
    ids = numpy.random.default_rng(0).integers(0, 16, (2, 8, 9))
    batches = [(from_host(step[:, :-1]), from_host(step[:, 1:])) for step in ids]
    trainer.train_step(*batches[0])  # warm-up: buffers and pools fill
    # Every Communicator of this rank, including groups the parallel modules split for themselves.
    groups = {id(found): found for found in gc.get_objects() if isinstance(found, Communicator)}
    for group in groups.values():
        group.reset_counters()
    backend.reset_copy_counts()
    xp.reset_transfers()
    loss = trainer.train_step(*batches[1])
    report = {"rank": world.rank, "loss": loss, "named": dict(backend.copy_counts), "seen": dict(xp.transfers),
              "last_stage": trainer.grid.is_last_stage,  # the root of the loss broadcast over the pp group
              "calls": [{call: record["calls"] for call, record in group.counters_snapshot().items()}
                        for group in groups.values() if group.size > 1]}
    return report
