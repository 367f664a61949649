"""TrainConfig refuses bad layouts up front, with the numbers in the message."""
import pytest

from minipar.errors import ConfigError
from minipar.parallel.topology import Layout
from minipar.train import TrainConfig


@pytest.mark.parametrize("options,message", [
    (dict(batch_size=10, dp=4), r"global batch size 10 must be divisible by dp x microbatches = 4 x 1 = 4"),
    (dict(batch_size=16, dp=2, microbatches=3), r"= 2 x 3 = 6"),
    (dict(microbatches=0), r"microbatches must be a positive integer, got 0"),
    (dict(bucket_megabytes=0), r"bucket_megabytes must be > 0.0, got 0"),
    (dict(zero=4), r"zero must be 0, 1, 2 or 3, got 4"),
    (dict(virtual_stages=2, pp=2), r"virtual_stages = 2 needs the interleaved schedule, not '1f1b'"),
    (dict(schedule="interleaved", virtual_stages=2), r"needs at least 2 pipeline stages"),
    (dict(dtype="float16"), r"dtype must be 'float32' or 'float64'"),
])
def test_bad_training_configurations(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options)


def test_layout_must_fill_the_world():
    with pytest.raises(ConfigError, match=r"2 x 2 x 1 = 4 does not equal the number of MPI ranks \(8\)"):
        Layout(2, 2, 1).validate(8)
    Layout(2, 2, 2).validate(8)


@pytest.mark.parametrize("options,message", [
    (dict(batch_size=12, dp=2, ep=4), r"global batch size 12 must be divisible by dp x ep x microbatches = 2 x 4 x 1"),
    (dict(cp=2, cp_layout="striped"), r"--cp-layout must be one of \['contiguous', 'zigzag'\], got 'striped'"),
    (dict(cp=2, cp_attention="ulysses"), r"--cp-attention must be one of \['ring', 'allgather'\], got 'ulysses'"),
])
def test_bad_cp_and_ep_options(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options)


@pytest.mark.parametrize("model,options,message", [
    (dict(block_size=12), dict(cp=4, cp_layout="zigzag"),
     r"^sequence length 12 does not split into the 8 equal chunks that cp 4 with the zigzag layout needs; "
     r"use a multiple of 8$"),
    (dict(block_size=12), dict(cp=2, tp=4, sequence_parallel=True), r"block_size / cp \(6\) must be divisible by tp"),
    (dict(), dict(ep=2), r"--ep 2 shards the experts of a mixture of experts: add --experts E"),
    (dict(n_experts=6), dict(ep=4), r"the number of experts \(6\) must be divisible by ep \(4\)"),
    (dict(n_experts=4), dict(cp=2), r"--experts with --cp > 1 is not supported"),
    (dict(n_experts=4), dict(tp=2, sequence_parallel=True), r"--experts with --sequence-parallel is not supported"),
])
def test_cp_and_ep_refuse_what_the_model_cannot_take(model, options, message):
    from minipar.nn.gpt import GPTConfig

    config = GPTConfig(**{"vocab_size": 16, "block_size": 8, "n_layer": 2, "n_head": 4, "n_embd": 16, **model})
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options).check_model(config)


def test_top_k_must_fit_the_experts():
    from minipar.nn.gpt import GPTConfig

    with pytest.raises(ConfigError, match=r"top_k must be 1 or 2 and at most n_experts \(1\), got 2"):
        GPTConfig(n_experts=1, top_k=2)
