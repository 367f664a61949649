"""The corpus of exercise ring_attention (Ring attention: the log-sum-exp merge of partial results and one step
of the K/V ring): wrong solutions that its checks must fail with the words of ``expect``, and correct
alternatives they must pass.

Teacher-only: left out of the student version.
"""
from minipar.course.planted.base import CONTEXT, Planted, region

_RING_STEP_NONBLOCKING = """
rank, size = communicator.rank, communicator.size
requests = []
if step < size - 1 and overlap:
    requests = [communicator.isend(in_hand, (rank + 1) % size, KV_TAG),
                communicator.irecv(arriving, (rank - 1) % size, KV_TAG)]
attend((rank - step) % size)
if step < size - 1 and not overlap:
    requests = [communicator.irecv(arriving, (rank - 1) % size, KV_TAG),
                communicator.isend(in_hand, (rank + 1) % size, KV_TAG)]
for request in reversed(requests):
    request.wait()
"""

WRONG = (
    Planted("ring_attention", "the running output rescaled by exp(l1 − m), not exp(l1 − l)", CONTEXT,
            "    out *= xp.exp(log_sum_exp - merged)[..., None]\n", "    out *= xp.exp(log_sum_exp - m)[..., None]\n",
            "out, element"),
    Planted("ring_attention", "no max shift in the log-sum-exp (exp overflows for large logits)", CONTEXT,
            "    merged = m + xp.log(xp.exp(log_sum_exp - m) + xp.exp(partial_log_sum_exp - m))\n",
            "    merged = xp.log(xp.exp(log_sum_exp) + xp.exp(partial_log_sum_exp))\n", "logits near +1000"),
    Planted("ring_attention", "near miss: the log-sum-exp off by 1e-9 relative", CONTEXT,
            "    log_sum_exp[...] = merged\n", "    log_sum_exp[...] = merged * (1 + 1e-9)\n",
            "log_sum_exp, element"),
    Planted("ring_attention", "out rebound to a new array instead of updated in place", CONTEXT,
            "    out *= xp.exp(log_sum_exp - merged)[..., None]\n    out += xp.exp",
            "    out = out * xp.exp(log_sum_exp - merged)[..., None]\n    out = out + xp.exp", "out, element"),
    Planted("ring_attention", "blocking send then receive at each step (deadlocks past the eager limit)", CONTEXT,
            "        communicator.sendrecv(in_hand, to_next, arriving, from_previous, KV_TAG)\n",
            "        communicator.isend(in_hand, to_next, KV_TAG).wait()\n"
            "        communicator.irecv(arriving, from_previous, KV_TAG).wait()\n", "deadlock: ranks", limit=15),
    Planted("ring_attention", "the block in hand taken for rank r − s − 1's (causal blocks off by one)", CONTEXT,
            "    attend((rank - step) % size)\n", "    attend((rank - step - 1) % size)\n", "output, element"),
    Planted("ring_attention", "the block passed on the last step too (N messages)", CONTEXT,
            "    last = step == size - 1\n    requests = []\n", "    last = False\n    requests = []\n",
            "the ring passes the K/V block on N − 1"),
    Planted("ring_attention", "the ring turned the other way for K/V only", CONTEXT,
            "    to_next, from_previous = (rank + 1) % size, (rank - 1) % size\n",
            "    to_next, from_previous = (rank - 1) % size, (rank + 1) % size\n", "the block goes to rank r + 1",
            more=(("    attend((rank - step) % size)\n", "    attend((rank + step) % size)\n"),)),
)

ALTERNATIVES = (
    region("ring_attention", "the merge with logaddexp, the output rebuilt in place", CONTEXT, {"merge_partials": """
merged = xp.logaddexp(log_sum_exp, partial_log_sum_exp)
out[...] = xp.exp(log_sum_exp - merged)[..., None] * out + xp.exp(partial_log_sum_exp - merged)[..., None] * partial
log_sum_exp[...] = merged
"""}, ""),
    region("ring_attention", "Isend/Irecv on every step, posted after attending when there is no overlap", CONTEXT,
           {"ring_step": _RING_STEP_NONBLOCKING}, ""),
)
