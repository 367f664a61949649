"""Bodies that exercise minipar.testing itself: a good job, a failing rank, a hung rank."""
import json

from mpi4py import MPI

from minipar.backend import to_host, xp


def check_allreduce(comm):
    """Every rank contributes rank + 1; every rank must see 1 + 2 + ... + N."""
    values = to_host(xp.full(5, comm.rank + 1.0))
    comm.Allreduce(MPI.IN_PLACE, values)
    expected = comm.size * (comm.size + 1) / 2
    assert (values == expected).all(), f"rank {comm.rank}: allreduce gave {values}, expected {expected}"
    print(f"rank {comm.rank} of {comm.size}: allreduce ok", flush=True)


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
    """Rank 0 prints the keyword arguments it received, as JSON."""
    if comm.rank == 0:
        print("arguments:", json.dumps(kwargs, sort_keys=True), flush=True)


def model_forward_is_identical_everywhere(comm):
    """Every rank builds the GPT from the same seed and runs the same batch: the logits must
    agree bit for bit (rank 0's are broadcast and compared exactly)."""
    import numpy as np

    from minipar.nn.gpt import GPT, GPTConfig

    config = GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16)
    ids = np.random.default_rng(0).integers(0, 16, (3, 8))
    logits, loss = GPT(config)(ids, ids)
    reference = logits.data.copy()
    comm.Bcast(reference, root=0)
    assert np.array_equal(reference, logits.data), f"rank {comm.rank}: logits differ from rank 0's"
    print(f"rank {comm.rank}: forward identical, loss {loss.item():.6f}", flush=True)
