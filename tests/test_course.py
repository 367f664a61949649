"""The course can fail and can pass: reference, stubs, the corpus of wrong solutions and the
correct alternatives, graded on ranks.

Default run: the marker rules, the generator (only tracked files, no solution left), the
overlay of one exercise, the corpus's size, and a few end-to-end cases (reference passes, stub
fails, a deadlocking ring, a built-in and an overwrite caught, a mirrored ring accepted, inside
`mpiexec -n 8` too). `-m slow` adds every exercise's reference and stub, every wrong solution
with its message, every alternative, class grading to CSV (one exercise done gets its marks),
and the student notebooks run headless.
"""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

from minipar.course import markers
from minipar.course.grader import check, grade
from minipar.course.markers import MarkerError
from minipar.course.planted import ALTERNATIVES, PLANTED, apply
from minipar.course.registry import EXERCISES
from minipar.course.student import (
    copy_reference_tree,
    reference_root,
    stub_package_file,
    write_student_version,
)

pytestmark = pytest.mark.course
ROOT = Path(__file__).resolve().parent.parent
FAST = {"layer_norm_backward", "ring_allreduce"}


def quiet(line):
    pass


@pytest.fixture(scope="module")
def student_tree(tmp_path_factory):
    destination = tmp_path_factory.mktemp("course") / "student"
    write_student_version(destination)
    return destination


def reference_copy(tmp_path):
    """A copy of the reference under a folder called ``course`` (reports must still find the student's file)."""
    copy_reference_tree(reference_root(), tmp_path / "course" / "tree")
    return tmp_path / "course" / "tree"


# --- markers: one convention, and no stub that could hang the other ranks -------------------

def test_region_in_a_function_body_becomes_a_stub():
    source = ("def f(comm, x):\n    \"\"\"doc\"\"\"\n    ### BEGIN SOLUTION\n    comm.Send(x, 1)\n"
              "    return x\n    ### END SOLUTION\n")
    text, regions = markers.replace_regions(source, "f.py", lambda r: markers.stub_lines(r.indent, "demo", "write f"))
    assert [region.function for region in regions] == ["f"]
    assert "comm.Send" not in text and "raise NotImplementedError('exercise demo: write f')" in text
    compile(text, "f.py", "exec")


@pytest.mark.parametrize("body, complaint", [
    ("    if comm.rank == 2:\n        ### BEGIN SOLUTION\n        x += 1\n        ### END SOLUTION\n", "not inside if"),
    ("    for step in range(3):\n        ### BEGIN SOLUTION\n        x += 1\n        ### END SOLUTION\n",
     "not inside if"),
    ("    if comm.rank == 0:\n        return x\n    ### BEGIN SOLUTION\n    x += 1\n    ### END SOLUTION\n",
     "may return before"),
    ("    comm.Sendrecv(x, 1, 0, x, 1, 0)\n    ### BEGIN SOLUTION\n    x += 1\n    ### END SOLUTION\n",
     r"calls Sendrecv\(\) before"),
    ("    ### BEGIN SOLUTION\n    x += 1\n", "has no ### END SOLUTION"),
    ("    ### BEGIN SOLUTION\n    ### BEGIN SOLUTION\n    ### END SOLUTION\n", "begins inside another"),
])
def test_unsafe_regions_are_refused(body, complaint):
    with pytest.raises(MarkerError, match=complaint):
        markers.find_regions(f"def f(comm, x):\n{body}    return x\n", "f.py")


def test_notebook_cell_region_under_a_rank_condition_is_refused():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "%%px\n# EXERCISE 9.9\nif rank == 2:\n    ### BEGIN SOLUTION\n    x = 1\n    ### END SOLUTION\n")])
    with pytest.raises(MarkerError, match="lesson.ipynb cell 0:4"):
        markers.stub_notebook(notebook, "lesson.ipynb")


# --- the generator -----------------------------------------------------------------------------

def test_student_version_stubs_every_exercise_and_keeps_no_solution(student_tree):
    for exercise in EXERCISES:
        for path, function in exercise.regions:
            text = (student_tree / path).read_text()
            assert markers.BEGIN not in text
            assert f"exercise {exercise.name}: write {function} in {path}" in text, function
            compile(text, path, "exec")
    assert not (student_tree / "tests" / "test_course.py").exists()
    assert not (student_tree / "minipar" / "course" / "planted").exists()
    assert (student_tree / "tests" / "test_exercises.py").exists()
    for notebook in student_tree.glob("lessons/*.ipynb"):
        assert markers.BEGIN not in notebook.read_text(), notebook.name
    from minipar.course.student import leaked_solutions

    assert leaked_solutions(ROOT, student_tree) == []   # the generator's own check, run again
    assert not (student_tree / "minipar" / "comm" / "compression.py").read_text().count("bounds[(rank - step")


def test_student_version_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = subprocess.run([sys.executable, "-m", "minipar", "course", "student", str(tmp_path)],
                            check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "is not empty" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_course_list_names_every_exercise():
    result = subprocess.run([sys.executable, "-m", "minipar", "course", "list"], check=False,
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    for exercise in EXERCISES:
        assert exercise.name in result.stdout and exercise.path in result.stdout
    assert "(of lessons/06_hybrid.ipynb: sections 1-2 only" in result.stdout   # process_grid comes before lesson 6


# --- grading on ranks --------------------------------------------------------------------------

def exercise_params(fast):
    return [pytest.param(exercise.name, marks=() if exercise.name in fast else pytest.mark.slow)
            for exercise in EXERCISES]


@pytest.mark.parametrize("name", exercise_params(FAST))
def test_reference_passes(name):
    result = check(name, ROOT, out=quiet)
    assert result.passed == result.total, "\n".join(result.lines)


@pytest.mark.parametrize("name", exercise_params({"ring_allreduce"}))
def test_stub_fails_on_every_check_with_the_exercise_named(name, tmp_path):
    """The generated stub of this exercise alone (earlier exercises done): every check fails, naming it."""
    from minipar.course.registry import exercise_named
    from minipar.course.student import stub_package_file

    tree = reference_copy(tmp_path)
    for path in exercise_named(name).paths:
        stubbed, _ = stub_package_file((tree / path).read_text(), path, only={name})
        (tree / path).write_text(stubbed)
    result = check(name, tree, limit=30, out=quiet)
    assert result.passed == 0, "\n".join(result.lines)
    report = "\n".join(result.lines)
    assert f"raised NotImplementedError: exercise {name}" in report
    assert "did not finish" not in report, report   # a stub never leaves ranks waiting


FAST_PLANTED = {"received block overwrites instead of adding", "MPI's built-in with made-up traffic",
                "no W delay: every W straight after its B", "MPI's built-in Alltoallv",
                "no max shift in the log-sum-exp (exp overflows for large logits)"}
FAST_ALTERNATIVES = {"the mirrored ring (to r - 1, from r + 1), Sendrecv", "one loop with counters of F, B and W"}


def planted_params(corpus, fast):
    return [pytest.param(planted, id=f"{planted.exercise}: {planted.name}",
                         marks=() if planted.name in fast else pytest.mark.slow) for planted in corpus]


def test_the_spy_makes_sends_synchronous_and_notes_every_call():
    """The mechanism behind the deadlock and contract checks, without MPI: Send becomes Ssend, Isend
    becomes Issend, a built-in is noted as a collective, each note with peer, size and dtype."""
    import numpy as np

    from minipar.course.spy import Spy

    class Fake:
        def __init__(self):
            self.called = []

        def __getattr__(self, name):
            return lambda *args, **kwargs: self.called.append(name)

    fake = Fake()
    spy = Spy(fake)
    spy.Send(np.zeros(5, np.float32), 1, 3)
    spy.Isend(np.zeros(2), 2, 3)
    spy.Sendrecv(np.zeros(4), 1, 0, np.zeros(4), 3, 0)
    spy.Allreduce(np.zeros(7), np.zeros(7))
    assert fake.called == ["Ssend", "Issend", "Sendrecv", "Allreduce"]
    assert [(call.method, call.peer, call.elements, call.dtype) for call in spy.sends()] == [
        ("Send", 1, 5, "float32"), ("Isend", 2, 2, "float64"), ("Sendrecv", 1, 4, "float64")]
    assert [(call.peer, call.elements) for call in spy.receives()] == [(3, 4)]
    assert [call.method for call in spy.collectives()] == ["Allreduce"]


def test_the_corpus_has_four_mistakes_and_two_alternatives_per_exercise():
    for exercise in EXERCISES:
        assert sum(planted.exercise == exercise.name for planted in PLANTED) >= 4, exercise.name
        assert sum(planted.exercise == exercise.name for planted in ALTERNATIVES) >= 2, exercise.name
    assert len(PLANTED) >= 40
    assert all(planted.expect for planted in PLANTED) and not any(planted.expect for planted in ALTERNATIVES)


@pytest.mark.parametrize("planted", planted_params(PLANTED, FAST_PLANTED))
def test_planted_wrong_solution_fails_with_a_pointed_message(planted, tmp_path):
    tree = reference_copy(tmp_path)
    apply(planted, tree)
    result = check(planted.exercise, tree, limit=planted.limit, out=quiet)
    report = "\n".join(result.lines)
    assert result.passed < result.total, report
    assert planted.expect in report, report
    assert result.lines[-1] == f"{result.passed}/{result.total} checks passed"
    if "deadlock" in planted.expect:   # the student's file and line, though the folder is called course
        assert f"at {planted.path}:" in report and "outside minipar" not in report, report


@pytest.mark.parametrize("alternative", planted_params(ALTERNATIVES, FAST_ALTERNATIVES))
def test_correct_alternative_passes(alternative, tmp_path):
    tree = reference_copy(tmp_path)
    apply(alternative, tree)
    result = check(alternative.exercise, tree, out=quiet)
    assert result.passed == result.total, "\n".join(result.lines)


def test_check_inside_an_mpi_job_prints_one_report():
    from minipar.testing import _child_environment, find_mpiexec

    result = subprocess.run([find_mpiexec(), "-n", "8", sys.executable, "-m", "minipar", "course", "check",
                             "ring_allreduce"], check=False, capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env=_child_environment())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("checks passed") == 1 and result.stdout.strip().endswith("13/13 checks passed")


@pytest.mark.slow
def test_grade_a_class_to_csv(tmp_path, student_tree):
    done = reference_copy(tmp_path)
    grade([done, student_tree], tmp_path / "grades.csv", limit=30, out=quiet,
          names=["layer_norm_backward", "process_grid"])
    with open(tmp_path / "grades.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [row["process_grid"] for row in table] == ["pass", "error"]
    assert [row["process_grid score"] for row in table] == ["1.000", "0.000"]
    assert table[0]["process_grid weight"] == "25" and table[0]["layer_norm_backward weight"] == "20"
    assert [row["score"] for row in table] == ["100.0", "0.0"]
    assert table[0]["date"].endswith("UTC") and Path(table[1]["log"]).exists()
    assert "NotImplementedError: exercise process_grid" in Path(table[1]["log"]).read_text()


@pytest.mark.slow
def test_grading_one_finished_exercise_gives_it_full_marks(tmp_path, student_tree):
    """Only zero_1 done, nothing before it: zero_1 still gets full marks (each exercise over the reference)."""
    from minipar.course.overlay import overlay_file
    from minipar.course.registry import exercise_named

    student = tmp_path / "student"
    copy_reference_tree(student_tree, student)
    exercise = exercise_named("zero_1")
    for path in exercise.paths:
        functions = [function for where, function in exercise.regions if where == path]
        (student / path).write_text(overlay_file((student / path).read_text(), (ROOT / path).read_text(),
                                                 functions, "zero_1", path))
    grade([student], tmp_path / "grades.csv", out=quiet, names=["process_grid", "zero_1"])
    with open(tmp_path / "grades.csv") as handle:
        row = next(csv.DictReader(handle))
    assert (row["zero_1"], row["zero_1 score"]) == ("pass", "1.000"), Path(row["log"]).read_text()
    assert row["process_grid"] != "pass"


# --- one exercise at a time, and nothing of a solution left in the student version -------------

def test_overlay_takes_only_the_exercise_functions_and_the_students_helpers():
    from minipar.course.overlay import overlay_file

    reference = ("import os\n\n\ndef done(x):\n    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION\n\n\n"
                 "def other(x):\n    ### BEGIN SOLUTION\n    return x * 2\n    ### END SOLUTION\n")
    student = ("import os\nimport math\n\n\ndef done(x):\n    return helper(x)\n\n\n"
               "def other(x):\n    raise NotImplementedError\n\n\ndef helper(x):\n    return math.floor(x) + 1\n")
    text = overlay_file(reference, student, ["done"], "demo", "demo.py")
    namespace = {}
    exec(compile(text, "demo.py", "exec"), namespace)  # noqa: S102 - the overlaid module, run to test it
    assert namespace["done"](2.5) == 3 and namespace["other"](4) == 8   # other stays the reference's


def test_student_version_copies_only_tracked_files(tmp_path):
    from minipar.course.student import _tracked_files

    repository = tmp_path / "repository"
    repository.mkdir()
    (repository / "kept.py").write_text("x = 1\n")
    run = lambda *args: subprocess.run(["git", "-C", str(repository), *args], check=True,  # noqa: E731
                                       capture_output=True)
    run("init", "-q")
    run("add", "kept.py")
    (repository / "train.log").write_text("a log")
    (repository / "checkpoint.npz").write_bytes(b"weights")
    assert _tracked_files(repository) == [Path("kept.py")]


def test_generator_refuses_a_solution_copied_elsewhere(tmp_path):
    """Three consecutive lines of the ring's solution pasted into another module: no student version."""
    from minipar.course.student import leaked_solutions

    tree = reference_copy(tmp_path)
    helper = tree / "minipar" / "comm" / "another_ring.py"
    helper.write_text("def ring(flat, bounds, rank, size, mpi_comm, right, left):\n"
                      "    for step in range(size - 1):\n"
                      "        send_start, send_stop = bounds[(rank - step - 1) % size]\n"
                      "        receive_start, receive_stop = bounds[(rank - step - 2) % size]\n"
                      "        outgoing = flat[send_start:send_stop]\n")
    with pytest.raises(MarkerError, match=r"another_ring.py:\d+ repeats the solution at minipar/comm/collectives.py"):
        write_student_version(tmp_path / "student", root=tree)
    helper.unlink()
    assert leaked_solutions(tree, tree) and not leaked_solutions(ROOT, ROOT / "docs")


# --- the notebooks' exercises: a stub fails at its own cell, clearly, and never hangs -----------

def lesson_exercise_params():
    nbformat = pytest.importorskip("nbformat")
    params = []
    for path in sorted((ROOT / "lessons").glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type == "code" and markers.BEGIN in cell.source:
                label = markers.notebook_exercise_label(cell.source, path.name)
                params.append(pytest.param(path.name, index, label, id=f"{path.stem} {label}",
                                           marks=pytest.mark.slow))
    return params


@pytest.mark.parametrize("name, index, label", lesson_exercise_params())
def test_student_notebook_fails_at_the_exercise_cell(name, index, label, tmp_path):
    """Only this exercise's cell stubbed (the package and earlier cells done): the run stops there."""
    nbformat = pytest.importorskip("nbformat")
    from tests.test_lessons import run_notebook

    notebook = nbformat.read(ROOT / "lessons" / name, as_version=4)
    single = nbformat.v4.new_notebook(cells=[notebook.cells[index]], metadata=notebook.metadata)
    markers.stub_notebook(single, name)
    notebook.cells[index] = single.cells[0]
    path = tmp_path / name
    nbformat.write(notebook, path)
    with pytest.raises(pytest.fail.Exception) as failure:
        run_notebook(path, notebook)
    message = str(failure.value)
    assert f"cell {index} failed" in message, message[-3000:]
    assert f"NotImplementedError: exercise {label}" in message, message[-3000:]
    assert "CellTimeoutError" not in message and "timed out" not in message


def test_student_lesson_1_fails_at_exercise_1_1(student_tree, monkeypatch):
    """The generated student version, run headless as a student would: lesson 1 stops at EXERCISE 1.1."""
    nbformat = pytest.importorskip("nbformat")
    from tests.test_lessons import run_notebook

    monkeypatch.setenv("PYTHONPATH", str(student_tree))    # the kernel imports the student's minipar
    path = student_tree / "lessons" / "01_autograd.ipynb"
    notebook = nbformat.read(path, as_version=4)
    exercise = next(index for index, cell in enumerate(notebook.cells) if "EXERCISE 1.1" in cell.source
                    and cell.cell_type == "code")
    with pytest.raises(pytest.fail.Exception) as failure:
        run_notebook(path, notebook)
    assert f"cell {exercise} failed" in str(failure.value) and "exercise 1.1" in str(failure.value)


@pytest.mark.slow
def test_lesson_2_runs_before_its_exercise_is_done(student_tree, monkeypatch):
    """The reference lesson on the student's package (ring and recursive doubling unwritten): every cell runs,
    MPI's built-in stands in, and one line says so."""
    nbformat = pytest.importorskip("nbformat")
    from tests.test_lessons import run_notebook

    monkeypatch.setenv("PYTHONPATH", str(student_tree))    # the engines import the student's minipar
    path = ROOT / "lessons" / "02_collectives.ipynb"
    notebook = nbformat.read(path, as_version=4)
    run_notebook(path, notebook)
    printed = "\n".join(str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
                        for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)
    assert "ring_allreduce is not written yet (exercise ring_allreduce)" in printed, printed[-3000:]
    assert "recursive_doubling is not written yet" in printed, printed[-3000:]


def student_reaching_lesson(destination, number):
    """The reference with every exercise of lesson ``number`` and later stubbed, the earlier ones done: the
    package of a student who reaches that lesson (lesson 1's layer norm backward, say, is written by then)."""
    copy_reference_tree(reference_root(), destination)
    later = {exercise.name for exercise in EXERCISES if int(Path(exercise.lesson).name[:2]) >= number}
    for path in sorted({path for exercise in EXERCISES if exercise.name in later for path in exercise.paths}):
        target = destination / path
        target.write_text(stub_package_file(target.read_text(), path, only=later)[0])
    return destination


@pytest.mark.slow
def test_lesson_5_runs_before_its_exercises_are_done(tmp_path, monkeypatch):
    """The reference lesson on the package of a student reaching it (one_f_one_b, pipeline_messages unwritten): every cell
    runs, 1F1B and the executor are left out, and one line says so for each."""
    nbformat = pytest.importorskip("nbformat")
    from tests.test_lessons import run_notebook

    student = student_reaching_lesson(tmp_path / "student", 5)
    monkeypatch.setenv("PYTHONPATH", str(student))    # the kernel and the engines import the student's minipar
    path = ROOT / "lessons" / "05_pipeline_parallel.ipynb"
    notebook = nbformat.read(path, as_version=4)
    run_notebook(path, notebook)
    printed = "\n".join(str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
                        for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)
    assert "1f1b is not written yet (exercise one_f_one_b): left out until it is" in printed, printed[-3000:]
    assert "gpipe cannot run yet (exercise pipeline_messages is not written)" in printed, printed[-3000:]
    assert "the simulator's peak stash stands in" not in printed, printed[-3000:]   # 1F1B is not simulated either
    assert "checked once exercise one_f_one_b is written" in printed, printed[-3000:]


@pytest.mark.slow
def test_lesson_3_runs_before_its_exercise_is_done(tmp_path, monkeypatch):
    """The reference lesson on the package of a student reaching it (data_parallel unwritten): every cell runs, MPI's built-in
    allreduce per parameter stands in for DataParallel's buckets, the overlap is skipped, one line for each."""
    nbformat = pytest.importorskip("nbformat")
    from tests.test_lessons import run_notebook

    student = student_reaching_lesson(tmp_path / "student", 3)
    monkeypatch.setenv("PYTHONPATH", str(student))    # the kernel and the engines import the student's minipar
    path = ROOT / "lessons" / "03_data_parallel.ipynb"
    notebook = nbformat.read(path, as_version=4)
    run_notebook(path, notebook)
    printed = "\n".join(str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
                        for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)
    assert printed.count("finish_gradient_sync is not written yet (exercise data_parallel)") == 1, printed[-3000:]
    assert "gradient_ready is not written yet (exercise data_parallel): no overlap to show" in printed, printed[-3000:]


@pytest.mark.slow
def test_lesson_7_runs_before_its_exercises_are_done(tmp_path, monkeypatch):
    """The reference lesson on the package of a student reaching it (zero_1 unwritten): every cell runs, stages
    1-3 are left out with one line each, stage 0 and the formulas are still checked."""
    nbformat = pytest.importorskip("nbformat")
    from tests.test_lessons import run_notebook

    student = student_reaching_lesson(tmp_path / "student", 7)
    monkeypatch.setenv("PYTHONPATH", str(student))    # the kernel and the engines import the student's minipar
    path = ROOT / "lessons" / "07_zero.ipynb"
    notebook = nbformat.read(path, as_version=4)
    run_notebook(path, notebook)
    printed = "\n".join(str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
                        for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)
    assert "stage 0 cannot run yet" not in printed, printed[-3000:]
    for stage in (1, 2, 3):
        assert f"stage {stage} cannot run yet (exercise zero_1 is not written)" in printed, printed[-3000:]


@pytest.mark.slow
def test_lesson_6_runs_before_its_exercise_is_done(tmp_path, monkeypatch):
    """The reference lesson on the package of a student reaching it (process_grid unwritten): every cell runs,
    the groups are left out with one line (and the training too, should the Trainer need the grid)."""
    nbformat = pytest.importorskip("nbformat")
    from tests.test_lessons import run_notebook

    student = student_reaching_lesson(tmp_path / "student", 6)
    monkeypatch.setenv("PYTHONPATH", str(student))    # the kernel and the engines import the student's minipar
    path = ROOT / "lessons" / "06_hybrid.ipynb"
    notebook = nbformat.read(path, as_version=4)
    run_notebook(path, notebook)
    printed = "\n".join(str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
                        for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)
    assert "ProcessGrid is not written yet (exercise process_grid): the groups are left out" in printed, printed[-3000:]
    trained = "largest difference" in printed           # the Trainer builds its own mesh, without ProcessGrid
    assert trained or "the Trainer cannot run yet (exercise process_grid is not written)" in printed, printed[-3000:]


@pytest.mark.slow
def test_lesson_4_runs_before_its_exercises_are_done(tmp_path, monkeypatch):
    """The reference lesson on the package of a student reaching it (megatron_f_g, vocab_parallel_loss unwritten):
    every cell runs, exercise 4.1 is graded against the sums over the ranks, the layers are skipped with one line."""
    nbformat = pytest.importorskip("nbformat")
    from tests.test_lessons import run_notebook

    student = student_reaching_lesson(tmp_path / "student", 4)
    monkeypatch.setenv("PYTHONPATH", str(student))    # the kernel and the engines import the student's minipar
    path = ROOT / "lessons" / "04_tensor_parallel.ipynb"
    notebook = nbformat.read(path, as_version=4)
    run_notebook(path, notebook)
    printed = "\n".join(str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
                        for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)
    assert "minipar's f and g are not written yet (exercise megatron_f_g)" in printed, printed[-3000:]
    assert "your f and g agree with the sums over the ranks" in printed, printed[-3000:]


def run_lesson_as_student_reaching_it(tmp_path, monkeypatch, number, stem):
    """The reference lesson on the package of a student reaching it; every cell must run. Returns what it printed."""
    nbformat = pytest.importorskip("nbformat")
    from tests.test_lessons import run_notebook

    student = student_reaching_lesson(tmp_path / "student", number)
    monkeypatch.setenv("PYTHONPATH", str(student))    # the kernel and the engines import the student's minipar
    path = ROOT / "lessons" / f"{stem}.ipynb"
    notebook = nbformat.read(path, as_version=4)
    run_notebook(path, notebook)
    return "\n".join(str(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
                     for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)


@pytest.mark.slow
def test_lesson_10_runs_before_its_exercise_is_done(tmp_path, monkeypatch):
    """zb_h1 unwritten: every cell runs, ZB-H1 is left out with one line, 1F1B, ZB-H2 and ZB-V still shown."""
    printed = run_lesson_as_student_reaching_it(tmp_path, monkeypatch, 10, "10_zero_bubble")
    assert "zb-h1 is not written yet (exercise zb_h1): left out" in printed, printed[-3000:]


@pytest.mark.slow
def test_lesson_11_runs_before_its_exercise_is_done(tmp_path, monkeypatch):
    """ring_attention unwritten: every cell runs, the ring stands aside for the all-gather variant, one line."""
    printed = run_lesson_as_student_reaching_it(tmp_path, monkeypatch, 11, "11_context_parallel")
    assert "merge_partials and ring_step are not written yet (exercise ring_attention)" in printed, printed[-3000:]
    assert "zigzag allgather" in printed and "zigzag ring" not in printed, printed[-3000:]


@pytest.mark.slow
def test_lesson_12_runs_before_its_exercise_is_done(tmp_path, monkeypatch):
    """pairwise_alltoall unwritten: every cell runs, as the experts' all-to-all is MPI's built-in (the pairwise
    exchange is chosen only by algorithm="pairwise"), and the bytes equal the formula."""
    printed = run_lesson_as_student_reaching_it(tmp_path, monkeypatch, 12, "12_experts")
    assert "DIFFERENT" not in printed and printed.count(": equal") >= 4, printed[-3000:]


def test_state_kept_across_steps_is_named():
    """Without MPI: a gradient equal to this step's plus the previous step's is said to hold the previous
    step's, and a failure after a good first step says that state was not reset."""
    import numpy as np

    from minipar.course.checking import CheckFailure, compare
    from minipar.course.checks_data import after_a_step, carried_hint

    previous, expected = np.array([0.5, -0.25]), np.array([0.125, 0.75])
    with pytest.raises(CheckFailure, match="the previous step's gradient is still in it"):
        compare("g", expected + previous, expected, "the average", carried_hint(2, previous))
    with pytest.raises(CheckFailure, match=r"divided by N − 1 instead of N"):
        compare("g", expected * 2, expected, "the average", carried_hint(2, previous))

    def second_step_fails(step):
        if step == 1:
            raise AttributeError("'NoneType' object has no attribute 'wait'")

    after_a_step(0, 3, second_step_fails)
    with pytest.raises(CheckFailure, match="step 1 passed with this code, step 2 did not.*not reset"):
        after_a_step(1, 3, second_step_fails)


def test_a_waiting_rank_reads_only_the_result_files_still_missing(tmp_path):
    """runner.read_entry keeps the outcomes it was given (a result file is written once, whole) and
    reads the others' files; a file that appears later is found on the next poll."""
    from minipar.course.runner import _write, entry_file, read_entry

    _write(entry_file(tmp_path, 0, 0), {"status": "pass"})
    _write(entry_file(tmp_path, 0, 2), {"status": "fail", "message": "x"})
    known = {0: {"status": "pass", "seconds": 1.0}}  # as read before: not read again
    assert read_entry(tmp_path, 0, 3, known) == {0: {"status": "pass", "seconds": 1.0},
                                                 2: {"status": "fail", "message": "x"}}
    _write(entry_file(tmp_path, 0, 1), {"status": "idle"})
    assert read_entry(tmp_path, 0, 3) == {0: {"status": "pass"}, 1: {"status": "idle"},
                                          2: {"status": "fail", "message": "x"}}
