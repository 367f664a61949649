"""Ranks that outnumber cores get MPICH's sleeping wait; ranks with a core each keep busy-polling.

minipar/_threads.py decides in start_process (the CLI's first statement), before mpi4py initialises
MPI, from the launcher's count of ranks on this node.
Each case calls start_process in a fresh interpreter with a launcher's variables.
"""
import json
import os
import subprocess
import sys

from minipar._threads import OVERSUBSCRIBED_MPICH
from minipar.testing import PACKAGE_PARENT

PROBE = ("import json, os, minipar._threads; minipar._threads.start_process(); "
         "print(json.dumps({name: os.environ.get(name) for name in minipar._threads.OVERSUBSCRIBED_MPICH}))")


def settings_seen_by_a_rank(**launcher_variables):
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("MPIR_CVAR_", "PMI_", "MPI_LOCAL", "OMPI_", "PMIX_"))}
    environment.update(launcher_variables, PYTHONPATH=str(PACKAGE_PARENT))
    result = subprocess.run([sys.executable, "-c", PROBE], env=environment, capture_output=True, text=True,
                            timeout=120, check=True)
    return json.loads(result.stdout)


def test_more_ranks_than_cores_turns_on_the_sleeping_wait():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert settings_seen_by_a_rank(PMI_SIZE=str(cores + 1), MPI_LOCALNRANKS=str(cores + 1)) == OVERSUBSCRIBED_MPICH


def test_one_rank_per_core_keeps_mpich_defaults():
    assert settings_seen_by_a_rank(PMI_SIZE="64", MPI_LOCALNRANKS="1") == dict.fromkeys(OVERSUBSCRIBED_MPICH)


def test_a_users_own_setting_wins():
    chosen = settings_seen_by_a_rank(PMI_SIZE="1000", MPI_LOCALNRANKS="1000", MPIR_CVAR_CH4_PROGRESS_THROTTLE="0")
    assert chosen["MPIR_CVAR_CH4_PROGRESS_THROTTLE"] == "0"
    assert chosen["MPIR_CVAR_ENABLE_HEAVY_YIELD"] == "1"


def test_the_test_harness_passes_the_setting_to_its_ranks():
    from minipar.testing import _child_environment

    environment = _child_environment()
    for name, value in OVERSUBSCRIBED_MPICH.items():
        assert environment[name] == os.environ.get(name, value)
