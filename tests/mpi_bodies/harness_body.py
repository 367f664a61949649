"""Bodies that exercise minipar.testing itself: a good job, a failing rank, a hung rank."""
import json

import numpy as np
from mpi4py import MPI

from minipar.backend import to_host, xp
from minipar.nn.gpt import GPT, GPTConfig


def check_allreduce(comm):
    """Every rank contributes rank + 1; returns what it saw (pytest expects 1 + 2 + ... + N)."""
    values = to_host(xp.full(5, comm.rank + 1.0))
    comm.Allreduce(MPI.IN_PLACE, values)
    print(f"rank {comm.rank} of {comm.size}: allreduce done", flush=True)
    return {"rank": comm.rank, "size": comm.size, "values": values}


def return_unserialisable(comm, failing_rank):
    """One rank returns something JSON cannot carry; the harness must name that rank."""
    return object() if comm.rank == failing_rank else comm.rank


def return_too_much(comm):
    """A result over the harness's limit: bulk arrays must be summarised on the rank."""
    return xp.zeros(300_000)


def fail_on_rank(comm, failing_rank):
    """One rank raises; the others wait in a barrier that it will never reach.

    Without the harness's Abort the surviving ranks would wait forever.
    """
    if comm.rank == failing_rank:
        raise RuntimeError(f"deliberate failure raised by rank {failing_rank}")
    comm.Barrier()


def hang_on_rank(comm, hanging_rank):
    """One rank waits for a message nobody sends; only the parent's timeout can end it."""
    if comm.rank == hanging_rank:
        never_filled = to_host(xp.zeros(1))
        comm.Recv(never_filled, source=(comm.rank + 1) % comm.size, tag=999)


def echo_arguments(comm, **kwargs):
    """Rank 0 prints the keyword arguments it received, as JSON; every rank returns them."""
    if comm.rank == 0:
        print("arguments:", json.dumps(kwargs, sort_keys=True), flush=True)
    return kwargs


def model_forward_is_identical_everywhere(comm):
    """Every rank builds the GPT from the same seed and runs the same batch; returns its loss and
    how many logits differ from rank 0's (broadcast and compared exactly): pytest expects none."""
    config = GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16)
    ids = np.random.default_rng(0).integers(0, 16, (3, 8))
    logits, loss = GPT(config)(ids, ids)
    reference = logits.data.copy()
    comm.Bcast(reference, root=0)
    return {"loss": loss.item(), "logits_differing_from_rank_0": int((reference != logits.data).sum())}
