"""The course: exercises cut out of minipar itself, a student version, and a grader.

The reference implementation is the product. Inside it, each exercise is a region of a
function body marked the way nbgrader marks solutions::

    def ring_reduce_scatter(mpi_comm, buffer, op="sum"):
        ...docstring...
        ### BEGIN SOLUTION
        ...the reference code...
        ### END SOLUTION

``python -m minipar course student DIR`` writes a copy in which every region is replaced by
a stub that raises ``NotImplementedError`` at the top of the function body, on every rank
alike (``markers.py`` refuses a region inside rank-conditional code). ``python -m minipar
course check NAME`` runs the exercise's checks on real MPI ranks against single-process
oracles (``runner.py``, ``grader.py``). Modules:

- ``registry.py``: the exercises, in course order, with files, functions, minutes, rank counts;
- ``markers.py``: finding, validating and stubbing solution regions (.py files and notebooks);
- ``student.py``: the generator of the student version;
- ``checks_*.py``: each exercise's checks (a rank body that raises ``CheckFailure`` on a wrong value);
- ``runner.py``: what every rank runs; ``grader.py``: what the command line runs;
- ``planted/``: realistic wrong solutions the tests plant to prove that each check can fail, and
  correct alternatives each must pass, one module per exercise (left out of the student version).
"""
