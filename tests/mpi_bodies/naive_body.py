"""Checks for the naive data parallelism and the blocking GPipe step, run on every rank by
tests/test_naive.py: each trains like one process on the whole batch (float64, tight tolerance)."""
from minipar.backend import from_host, host_rng, set_default_dtype, xp
from minipar.comm import Communicator
from minipar.nn.gpt import GPT, GPTConfig
from minipar.optim import AdamW, decay_groups
from minipar.parallel.data_parallel import local_slice
from minipar.parallel.naive_data_parallel import NaiveDataParallel
from minipar.parallel.pipeline.executor import split_microbatches
from minipar.parallel.pipeline.naive_gpipe import run_gpipe
from minipar.parallel.pipeline.partition import TiedEmbeddingGradientSum, partition, stage_parameters
from minipar.parallel.sharding import label_replicated
from tests.mpi_bodies.data_parallel_body import (
    CONFIG,
    STEPS,
    global_batch,
    single_process_run,
    tolerance_ratio,
)
from tests.mpi_bodies.reporting import report


def naive_data_parallel_matches_one_process(comm):
    """Losses, the averaged gradients of every step and the final parameters, against one process."""
    communicator = Communicator(comm)
    reference_losses, reference_grads, reference_state = single_process_run()
    set_default_dtype(xp.float64)
    model = GPT(GPTConfig(**CONFIG))
    optimizer = AdamW(decay_groups(model.named_parameters(), 0.1), lr=1e-2)
    sync = NaiveDataParallel(model.parameters(), communicator)
    checks = []
    for step in range(STEPS):
        inputs, targets = local_slice(global_batch(step), communicator.rank, communicator.size)
        optimizer.zero_grad()
        _, loss = model(inputs, targets)
        loss.backward()
        communicator.reset_counters()
        sync.finish_gradient_sync()
        calls = communicator.counters.get("allreduce")
        checks.append((f"step {step}: one allreduce per parameter", calls.calls if calls else 0, "==",
                       len(model.parameters())))
        global_loss = communicator.allreduce(xp.array([loss.item()])).item() / communicator.size
        checks.append((f"step {step}: loss, tolerance ratio", tolerance_ratio([global_loss], [reference_losses[step]]),
                       "<=", 1.0))
        checks.append((f"step {step}: gradients after the sync, tolerance ratio per parameter",
                       {name: tolerance_ratio(p.grad, reference_grads[step][name])
                        for name, p in model.named_parameters()}, "all <=", 1.0))
        optimizer.step()
    checks.append(("parameters after the steps, tolerance ratio per parameter",
                   {name: tolerance_ratio(value, reference_state[name]) for name, value in model.state_dict().items()},
                   "all <=", 1.0))
    return report(["naive data parallel"], checks)


PIPELINE = dict(vocab_size=16, block_size=8, n_layer=8, n_head=2, n_embd=16)  # 8 layers: up to 8 stages
MICROBATCHES, BATCH = 4, 8


def naive_gpipe_matches_one_process(comm):
    """Every stage's gradients (the tied embedding's summed between the ends) and the loss of two
    AdamW steps, and the parameters after them, against one process on the whole batch."""
    pp_comm = Communicator(comm)
    set_default_dtype(xp.float64)
    config = GPTConfig(**PIPELINE)
    reference = GPT(config)
    reference_optimizer = AdamW(reference.parameters(), lr=1e-2)
    chunk, = partition(label_replicated(GPT(config)).pieces(), pp_comm.size, pp_comm.rank)
    named = stage_parameters([chunk])
    optimizer = AdamW([p for _, p in named], lr=1e-2)
    tied = TiedEmbeddingGradientSum(named, pp_comm)
    shape = (BATCH // MICROBATCHES, config.block_size, config.n_embd)
    checks = []
    for step in range(2):
        ids = from_host(host_rng([7, step]).integers(0, config.vocab_size, (BATCH, config.block_size + 1)))
        inputs, targets = ids[:, :-1], ids[:, 1:]
        reference_optimizer.zero_grad()
        _, reference_loss = reference(inputs, targets)
        reference_loss.backward()
        expected = {name: p.grad for name, p in reference.named_parameters()}
        for _, p in named:
            p.grad = None
        loss = run_gpipe(chunk, pp_comm, split_microbatches(inputs, MICROBATCHES),
                         split_microbatches(targets, MICROBATCHES), shape, xp.float64)
        tied.finish_gradient_sync()
        if pp_comm.rank == pp_comm.size - 1:
            checks.append((f"step {step}: loss, tolerance ratio",
                           tolerance_ratio([loss], [reference_loss.item()]), "<=", 1.0))
        checks.append((f"step {step}, stage {pp_comm.rank}: gradients, tolerance ratio per parameter",
                       {name: tolerance_ratio(p.grad, expected[name]) for name, p in named}, "all <=", 1.0))
        reference_optimizer.step()
        optimizer.step()
    state = reference.state_dict()
    checks.append((f"stage {pp_comm.rank}: parameters after the steps, tolerance ratio per parameter",
                   {name: tolerance_ratio(p.data, state[name]) for name, p in named}, "all <=", 1.0))
    return report(["naive gpipe"], checks)
