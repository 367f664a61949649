"""The site's formulas: every one written between dollars, in the docs, the lessons and the docstrings, typesets.

``mkdocs build --strict`` fails on a formula latex2mathml cannot read, but only after minutes of building, and
only for the pages it renders; this reads every formula directly (about a second) with the same code the build
uses (``scripts/site_hooks.py``), and checks the docstring convention of docs/site.md ("Formulas").
"""
import ast
import functools
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("latex2mathml", reason="the docs extra: pip install -e '.[docs]'")
pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")

# The build's own regular expression for $...$ and $$...$$ (it skips code spans the same way below).
FORMULA = re.compile(r"\$\$(?P<block>.+?)\$\$|(?<![\\$])\$(?P<inline>[^$\n]+?)\$", re.S)
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)


@functools.cache  # one import of the hooks (and of MkDocs) for the whole module
def site_hooks():
    spec = importlib.util.spec_from_file_location("site_hooks", ROOT / "scripts" / "site_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def docstrings():
    """(where, text) of every module, class and function docstring in minipar/ that holds a dollar."""
    for path in sorted((ROOT / "minipar").rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        if "$" not in source:
            continue  # no formula here (parsing every file would take most of the test's time)
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node, clean=True)
                if text:
                    yield f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 1)}", text


def pages():
    """(where, text) of the docs pages and the lessons' Markdown cells."""
    for path in sorted((ROOT / "docs").rglob("*.md")):
        yield str(path.relative_to(ROOT)), path.read_text(encoding="utf-8")
    for path in sorted((ROOT / "lessons").glob("*.ipynb")):
        for number, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
            if cell["cell_type"] == "markdown":
                yield f"{path.relative_to(ROOT)} cell {number}", "".join(cell["source"])


def formulas(text):
    for match in FORMULA.finditer(CODE.sub("", text)):
        yield (match.group("block") or match.group("inline")), bool(match.group("block"))


def test_unicode_symbols_in_a_formula_become_tex_commands():
    hooks = site_hooks()
    assert hooks._unicode_to_tex("Δθ = (1/N) Σ_i Δθ_i") == "Δθ = (1/N) \\sum _i Δθ_i"
    assert hooks._unicode_to_tex("2⌈lg N⌉(α + nβ)") == "2\\lceil \\lg  N\\rceil (α + nβ)"
    assert hooks._unicode_to_tex("S = Q Kᵀ / sqrt(d)") == "S = Q K^T / \\sqrt{d}"
    assert hooks._unicode_to_tex("m̂ = m / (1 − β₁ᵗ)") == "\\hat{m} = m / (1 - β_1^t)"
    assert hooks._unicode_to_tex("p = softmax(x)   y = x") == "p = \\operatorname{softmax}(x) \\quad y = x"
    assert hooks._unicode_to_tex("rank c mod p") == "rank c \\operatorname{mod} p"  # the operator, not m·o·d
    # TeX is left as it is: a formula with a backslash is not read for function names
    assert hooks._unicode_to_tex("\\min(p - s, m) + \\text{max}") == "\\min(p - s, m) + \\text{max}"


@pytest.mark.parametrize("source", ["docstrings", "pages"])
def test_every_formula_typesets(source):
    hooks = site_hooks()
    broken, count = [], 0
    for where, text in (docstrings() if source == "docstrings" else pages()):
        for tex, display in formulas(text):
            count += 1
            mathml = hooks._mathml(tex, display, where)
            if not mathml.startswith("<math") or "<merror" in mathml or "<mi>&</mi>" in mathml:  # an & drawn as a letter
                broken.append(f"{where}: {tex!r}")
    assert count > (40 if source == "docstrings" else 300), count  # the formulas are really found
    assert not broken, "formulas that do not typeset:\n" + "\n".join(broken)

