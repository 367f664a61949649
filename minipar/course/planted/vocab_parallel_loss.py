"""The corpus of exercise vocab_parallel_loss (Vocabulary-parallel cross-entropy: global max, global sum, the
target's shard): wrong solutions that its checks must fail with the words of ``expect``, and correct
alternatives they must pass.

Teacher-only: left out of the student version.
"""
from minipar.course.planted.base import TP_COMM, Planted, region

_VOCAB_ONE_ALLREDUCE_FOR_TWO = """
rows = logits.reshape(-1, local_vocab)
row_max = rows.max(axis=1)
communicator.allreduce(row_max, op="max")
shifted = rows - row_max[:, None]
exps = xp.exp(shifted)
local = flat_targets - vocab_start
mine = (local >= 0) & (local < local_vocab)
local_targets = xp.where(mine, local, 0)
both = xp.stack([exps.sum(axis=1), shifted[xp.arange(rows.shape[0]), local_targets] * mine])
communicator.allreduce(both)          # Σ exp and the target's logit in one message
sum_exps, target_logits = both[0], both[1]
exps /= sum_exps[:, None]
row_losses = xp.log(sum_exps) - target_logits
"""
_GATHER_THE_LOGITS = """
rows = logits.reshape(-1, local_vocab)
everyone = xp.empty((communicator.size * rows.shape[0], local_vocab), dtype=rows.dtype)
communicator.allgather(xp.ascontiguousarray(rows), everyone)
whole = xp.concatenate(list(everyone.reshape(communicator.size, *rows.shape)), axis=1)   # (n, V)
top = whole.max(axis=1, keepdims=True)
sum_exps = xp.exp(whole - top).sum(axis=1)
exps = xp.exp(rows - top) / sum_exps[:, None]
mine = (flat_targets >= vocab_start) & (flat_targets < vocab_start + local_vocab)
local_targets = xp.where(mine, flat_targets - vocab_start, 0)
row_losses = xp.log(sum_exps) - (whole[xp.arange(whole.shape[0]), flat_targets] - top[:, 0])
"""

WRONG = (
    Planted("vocab_parallel_loss", "each rank shifts by its own row max", TP_COMM,
            '        communicator.allreduce(row_max, op="max")\n', "", "each rank's own row max"),
    Planted("vocab_parallel_loss", "the sum of exponentials not summed over ranks", TP_COMM,
            "        communicator.allreduce(sum_exps)\n", "", "only this rank's Σ exp"),
    Planted("vocab_parallel_loss", "the target's shard misses its first entry", TP_COMM,
            "mine = (flat_targets >= vocab_start) & (flat_targets < vocab_start + local_vocab)",
            "mine = (flat_targets > vocab_start) & (flat_targets < vocab_start + local_vocab)",
            "targets on a shard's first entry found on no rank"),
    Planted("vocab_parallel_loss", "near miss: the loss off by 1e-9 relative", TP_COMM,
            "        row_losses = xp.log(sum_exps) - target_logits  # (B T,) log S_i - zt_i\n",
            "        row_losses = (xp.log(sum_exps) - target_logits) * (1 + 1e-9)\n", "the loss"),
    Planted("vocab_parallel_loss", "no max shift (exp overflows for large logits)", TP_COMM,
            "        shifted = rows - row_max[:, None]\n", "        shifted = rows + 0.0\n", "logits + 1000"),
    region("vocab_parallel_loss", "the logits all-gathered, then the loss of the whole rows", TP_COMM,
           {"VocabParallelCrossEntropy.forward": _GATHER_THE_LOGITS}, "never the logits"),
)

ALTERNATIVES = (
    region("vocab_parallel_loss", "Σ exp and the target logit in one allreduce", TP_COMM,
           {"VocabParallelCrossEntropy.forward": _VOCAB_ONE_ALLREDUCE_FOR_TWO}, ""),
    Planted("vocab_parallel_loss", "the target's shard found from its local index", TP_COMM,
            "        mine = (flat_targets >= vocab_start) & (flat_targets < vocab_start + local_vocab)\n"
            "        local_targets = xp.where(mine, flat_targets - vocab_start, 0)  # 0 is a placeholder where not mine\n",
            "        local = flat_targets - vocab_start\n        mine = (0 <= local) & (local < local_vocab)\n"
            "        local_targets = local * mine\n", ""),
)
