"""One exercise of a student laid over the reference: the rest of the tree stays the teacher's.

``course grade`` (and ``course check --dir`` run from the teacher's checkout) grade each
exercise in a tree where only that exercise's functions come from the student: an unstarted
process grid never zeroes a finished ZeRO-1, and a broken helper in one exercise never
reaches another. The unit is the function holding the region (``registry.Exercise.regions``):
the student's whole ``def`` replaces the reference's. Functions and classes the student added
at the top level of the file (helpers), and imports the reference lacks, come along, appended
at the end of the file (they are looked up when the functions run, after the module loaded).

A student file that does not parse is copied whole, so the check reports the SyntaxError.
A function the student's file lacks gets the stub: that exercise is not done.
"""
import ast
from pathlib import Path

from minipar.course.student import stub_package_file


def _functions(tree):
    """{qualified name: node} of every function, methods as ``Class.method``, nested ones left out."""
    found = {}

    def visit(nodes, prefix):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found[prefix + node.name] = node
            elif isinstance(node, ast.ClassDef):
                visit(node.body, prefix + node.name + ".")

    visit(tree.body, "")
    return found


def _span(node):
    """(first, last) 1-based lines of a definition, decorators included."""
    first = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
    return first, node.end_lineno


def _top_level_names(tree):
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names


def overlay_file(reference_text, student_text, functions, exercise, path):
    """The reference file with ``functions`` (qualified names) taken from the student's file."""
    try:
        student_tree = ast.parse(student_text)
    except SyntaxError:
        return student_text
    reference_tree = ast.parse(reference_text)
    reference_functions, student_functions = _functions(reference_tree), _functions(student_tree)
    missing = [name for name in functions if name not in student_functions]
    if missing:   # not written (or renamed): those regions are stubs
        reference_text, _ = stub_package_file(reference_text, path, only={exercise})
        reference_tree = ast.parse(reference_text)
        reference_functions = _functions(reference_tree)
        functions = [name for name in functions if name not in missing]
    lines, student_lines = reference_text.splitlines(), student_text.splitlines()
    replacements = []
    for name in functions:
        first, last = _span(reference_functions[name])
        student_first, student_last = _span(student_functions[name])
        replacements.append((first, last, student_lines[student_first - 1:student_last]))
    for first, last, new in sorted(replacements, reverse=True):
        lines[first - 1:last] = new
    known, imports = _top_level_names(reference_tree), {ast.dump(node) for node in reference_tree.body
                                                        if isinstance(node, (ast.Import, ast.ImportFrom))}
    extra = []
    for node in student_tree.body:
        is_new_import = isinstance(node, (ast.Import, ast.ImportFrom)) and ast.dump(node) not in imports
        is_new_definition = (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                             and node.name not in known)
        if is_new_import or is_new_definition:
            first, last = _span(node) if not is_new_import else (node.lineno, node.end_lineno)
            extra += ["", "", *student_lines[first - 1:last]]
    if extra:
        lines += ["", "# ---- added by the student (kept by the grader's overlay) ----", *extra]
    return "\n".join(lines) + "\n"


def overlay_exercise(exercise, student_dir, tree):
    """Lay ``exercise``'s functions from ``student_dir`` over the reference copy at ``tree``, in place."""
    for path in exercise.paths:
        functions = [function for where, function in exercise.regions if where == path]
        target, source = Path(tree) / path, Path(student_dir) / path
        reference_text = target.read_text()
        if source.exists():
            target.write_text(overlay_file(reference_text, source.read_text(), functions, exercise.name, path))
        else:
            target.write_text(stub_package_file(reference_text, path, only={exercise.name})[0])
    return tree
