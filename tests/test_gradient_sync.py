"""The gradient sync and its state are two interfaces (parallel/gradient_sync.py): the step's
members (SYNC_MEMBERS) live on each mode's sync class, the checkpoint and memory members
(STATE_MEMBERS) on its state class, and neither class carries the other's."""
import numpy as np
import pytest

from minipar.nn.module import Parameter
from minipar.parallel import communication_reduction as reduction
from minipar.parallel.data_parallel import DataParallel, DataParallelState
from minipar.parallel.gradient_sync import STATE_MEMBERS, SYNC_MEMBERS, ReplicaState, SingleReplica
from minipar.parallel.zero import Zero
from minipar.parallel.zero_state import ZeroState

SYNC_CLASSES = [SingleReplica, DataParallel, reduction.CompressedDataParallel, reduction.HierarchicalDataParallel,
                reduction.LocalSGD, Zero]
STATE_CLASSES = [ReplicaState, DataParallelState, reduction.CompressedState, reduction.LocalSGDState, ZeroState]


@pytest.mark.parametrize("sync_class", SYNC_CLASSES, ids=lambda c: c.__name__)
def test_a_sync_class_has_the_step_members_and_no_state_member(sync_class):
    missing = [name for name in SYNC_MEMBERS if not hasattr(sync_class, name)]
    state_members_on_it = [name for name in STATE_MEMBERS if hasattr(sync_class, name)]
    assert (missing, state_members_on_it) == ([], []), \
        f"{sync_class.__name__}: sync members missing {missing}, state members on it {state_members_on_it}"


@pytest.mark.parametrize("state_class", STATE_CLASSES, ids=lambda c: c.__name__)
def test_a_state_class_has_the_state_members_and_no_sync_member(state_class):
    missing = [name for name in STATE_MEMBERS if not hasattr(state_class, name)]
    sync_members_on_it = [name for name in SYNC_MEMBERS if hasattr(state_class, name)]
    assert (missing, sync_members_on_it) == ([], []), \
        f"{state_class.__name__}: state members missing {missing}, sync members on it {sync_members_on_it}"


def test_single_replica_reaches_its_state_through_sync_state():
    weight, bias = Parameter(np.arange(6.0).reshape(2, 3)), Parameter(np.ones(3))
    sync = SingleReplica([weight, bias, weight])  # a tied weight listed twice counts once
    arrays = sync.state.parameter_arrays()
    assert type(sync.state) is ReplicaState
    assert sorted(arrays) == sorted([id(weight), id(bias)]), "one array per distinct parameter"
    np.testing.assert_array_equal(arrays[id(weight)], weight.data)
    arrays[id(weight)][0, 0] = 99.0
    assert weight.data[0, 0] == 0.0, "parameter_arrays returns copies"
