"""The course can fail and can pass: reference, stubs and planted wrong solutions, graded on ranks.

Default run (a few tens of seconds): the marker rules, the generator, and one exercise end to
end (reference passes, stub fails, one planted mistake caught, inside `mpiexec -n 8` too).
`-m slow` adds every exercise's reference and stub, every planted wrong solution with its
message, class grading to CSV, and the student notebooks run headless.
"""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

from minipar.course import markers
from minipar.course.grader import check, grade
from minipar.course.markers import MarkerError
from minipar.course.planted import PLANTED, apply
from minipar.course.registry import EXERCISES
from minipar.course.student import (
    copy_reference_tree,
    reference_root,
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
    copy_reference_tree(reference_root(), tmp_path / "tree")
    return tmp_path / "tree"


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
    assert not (student_tree / "minipar" / "course" / "planted.py").exists()
    assert (student_tree / "tests" / "test_exercises.py").exists()
    for notebook in student_tree.glob("lessons/*.ipynb"):
        assert markers.BEGIN not in notebook.read_text(), notebook.name


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


def planted_params():
    fast = {"received block overwrites instead of adding"}
    return [pytest.param(planted, id=f"{planted.exercise}: {planted.name}",
                         marks=() if planted.name in fast else pytest.mark.slow) for planted in PLANTED]


def test_every_exercise_has_two_planted_mistakes():
    for exercise in EXERCISES:
        assert sum(planted.exercise == exercise.name for planted in PLANTED) >= 2, exercise.name


@pytest.mark.parametrize("planted", planted_params())
def test_planted_wrong_solution_fails_with_a_pointed_message(planted, tmp_path):
    tree = reference_copy(tmp_path)
    apply(planted, tree)
    result = check(planted.exercise, tree, limit=planted.limit, out=quiet)
    report = "\n".join(result.lines)
    assert result.passed < result.total, report
    assert planted.expect in report, report
    assert result.lines[-1] == f"{result.passed}/{result.total} checks passed"


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
    rows = grade([done, student_tree], tmp_path / "grades.csv", limit=30, out=quiet,
                 names=["layer_norm_backward", "process_grid"])
    with open(tmp_path / "grades.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [row["passed"] for row in table] == [str(rows[0]["total"]), "0"]
    assert table[0]["process_grid"] == "7/7" and table[1]["process_grid"] == "0/7"


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
