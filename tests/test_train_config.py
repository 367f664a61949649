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
