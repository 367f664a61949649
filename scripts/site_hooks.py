"""MkDocs hooks for minipar's site (mkdocs.yml: ``hooks: [scripts/site_hooks.py]``).

What they add to a plain mkdocs-material + mkdocs-jupyter + mkdocstrings build:

* **Lessons.** ``lessons/*.ipynb`` live outside ``docs/``; each becomes the page ``lessons/NAME/``.
  The page shows the executed copy ``build/lessons/NAME.ipynb`` (written by
  ``python scripts/execute_lessons.py``, on real MPI ranks) when its recorded digest matches the
  lesson; a stale copy is a warning, so ``mkdocs build --strict`` fails and names the command. With
  no executed copy the page shows the lesson's code without outputs and a note saying so (an info
  message; set ``MINIPAR_SITE_REQUIRE_EXECUTED=1`` to make it a warning, as the full-site job does).
  Each lesson page starts with a note linking the docs pages about its idea, and the links in its
  Markdown cells (``../docs/X.md``, ``../minipar/a/b.py#Name``, ``06_hybrid.ipynb``), which nbconvert
  renders where MkDocs cannot check them, are pointed at this site's pages (the browser check then
  verifies each page and anchor).
* **Links out of docs/**, written so that they also work on GitHub, are checked and rewritten:
  ``../lessons/X.ipynb`` to the lesson's page; ``../minipar/a/b.py`` and ``../minipar/a/b.py#Name.attr``
  to the API reference's entry for ``minipar.a.b`` / ``minipar.a.b.Name.attr`` (an mkdocs-autorefs
  cross-reference, so a symbol that was renamed or removed fails the strict build); any other file
  of the repository (``../tests/x.py``, ``../benchmarks/y.py``) to a generated page that shows the
  file with numbered lines. A link to a file that does not exist, or to a line (``#L40``: lines move,
  symbols do not), is a warning and so fails the strict build.
* **A manifest**, ``build/site/minipar-site.json``: for every lesson page, whether it was executed and how
  many figures its outputs hold. ``scripts/check_site.py`` reads it to require those figures.
"""
import hashlib
import html
import json
import logging
import os
import posixpath
import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.minipar")

ROOT = Path(__file__).resolve().parent.parent
LESSONS = ROOT / "lessons"
EXECUTED = ROOT / "build" / "lessons"
PREPARED = ROOT / "build" / "site-lessons"
EXECUTE_COMMAND = "python scripts/execute_lessons.py"

# Lesson -> the docs pages about its idea (the site's lesson pages link them; docs pages link back).
LESSON_PAGES = {
    "01_autograd": ["design.md"],
    "02_collectives": ["collectives.md"],
    "03_data_parallel": ["data_parallel.md"],
    "04_tensor_parallel": ["tensor_parallel.md"],
    "05_pipeline_parallel": ["pipeline_schedules.md", "pipeline_parallel.md"],
    "06_hybrid": ["hybrid.md"],
    "07_zero": ["zero.md"],
    "08_planning": ["planning.md"],
    "09_cutting_communication": ["communication.md"],
    "10_zero_bubble": ["pipeline_schedules.md"],
}

LINK = re.compile(r"(?<!!)\[(?P<text>(?:[^\[\]]|\[[^\[\]]*\])*)\]\((?P<target>[^()\s]+)\)")
FENCE = re.compile(r"^\s*(```+|~~~+)")
LINE_ANCHOR = re.compile(r"^L\d+(-L?\d+)?$")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

_lessons = {}        # page src_uri -> {"name", "executed", "figures", "executed_at"}
_source_pages = {}   # repository path -> generated page src_uri


def source_digest(notebook):
    """The same digest as scripts/execute_lessons.py: the cells' types and sources."""
    cells = [[cell["cell_type"], "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]]
             for cell in notebook["cells"]]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()


def _figures(notebook):
    return sum(1 for cell in notebook["cells"] if cell["cell_type"] == "code" for output in cell.get("outputs", [])
               if any(kind.startswith("image/") for kind in output.get("data", {})))


def _choose_lesson(path):
    """(notebook to show, executed?, executed_at) for one lesson; logs what the strict build must know."""
    lesson = json.loads(path.read_text(encoding="utf-8"))
    executed_path = EXECUTED / path.name
    if executed_path.exists():
        executed = json.loads(executed_path.read_text(encoding="utf-8"))
        recorded = executed.get("metadata", {}).get("minipar", {})
        if recorded.get("source_digest") == source_digest(lesson):
            return executed, True, recorded.get("executed_at", "")
        log.warning(f"{executed_path.relative_to(ROOT)} is stale: lessons/{path.name} changed after it was "
                    f"executed; rerun `{EXECUTE_COMMAND} {path.stem[:2]}` (or delete it to show the code only)")
        return lesson, False, ""
    report = log.warning if os.environ.get("MINIPAR_SITE_REQUIRE_EXECUTED") == "1" else log.info
    report(f"lessons/{path.name} has no executed copy in build/lessons/: its page shows the code without "
           f"outputs (run `{EXECUTE_COMMAND}` for the figures)")
    return lesson, False, ""


def _markdown_cell(text):
    return {"cell_type": "markdown", "id": "minipar-site-note", "metadata": {}, "source": text}


def _lesson_note(name, executed, executed_at, lesson_uri, files):
    links = []
    for page in LESSON_PAGES.get(name, []):
        target = files.get_file_from_path(page)
        if target is None:
            log.warning(f"site_hooks.LESSON_PAGES names docs/{page} for lesson {name}, but there is no such page")
            continue
        url = posixpath.relpath(target.url or ".", posixpath.dirname(lesson_uri.replace(".ipynb", "/")))
        links.append(f"[{page.removesuffix('.md').replace('_', ' ')}]({url}/)")
    about = f"The idea, with the maths and the papers: {', '.join(links)}. " if links else ""
    where = f"The notebook is `lessons/{name}.ipynb`; open it with `jupyter lab lessons/`."
    if executed:
        run = (f"**Executed on real MPI ranks** by `{EXECUTE_COMMAND}` ({executed_at}); "
               "the outputs and figures below are that run's.")
    else:
        run = (f"**Shown without outputs.** This build did not execute the lessons; the full site runs "
               f"`{EXECUTE_COMMAND}` first, which shows every output and figure.")
    return _markdown_cell(f"> {run} {about}{where}")


def _api_pages(config):
    """{module name: the API page (src_uri) that documents it}, read from the '::: module' lines."""
    pages = {}
    for page in sorted(Path(config["docs_dir"], "api").glob("*.md")):
        for line in page.read_text(encoding="utf-8").splitlines():
            if line.startswith("::: "):
                pages[line[4:].strip()] = f"api/{page.name}"
    return pages


def _with_site_links(cell, lesson_uri, files, config):
    """A lesson's Markdown cell with its links out of lessons/ pointed at this site's pages.

    nbconvert renders a notebook's Markdown, so MkDocs never sees these links: ``../docs/X.md#a`` becomes
    the page X, ``../minipar/a/b.py#Name`` the API reference's entry (the browser check then verifies
    every such page and anchor); a link to a docs page that does not exist is a warning.
    """
    if cell["cell_type"] != "markdown":
        return cell
    source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    lesson_dir = posixpath.dirname(lesson_uri.replace(".ipynb", "/"))
    api_pages = _api_pages(config)

    def url_of(src_uri, fragment):
        target = files.get_file_from_path(src_uri)
        if target is None:
            return None
        return posixpath.relpath(target.url or ".", lesson_dir) + "/" + (f"#{fragment}" if fragment else "")

    def rewrite(match):
        text, target = match.group("text"), match.group("target")
        path_part, _, fragment = target.partition("#")
        if "://" in path_part or not path_part:
            return match.group(0)
        resolved = _resolve(path_part, LESSONS / "x.ipynb", ROOT / "no such folder")
        if resolved is None:
            return match.group(0)
        url = None
        if resolved.startswith("lessons/") and resolved.endswith(".ipynb") and (ROOT / resolved).exists():
            # mkdocs-jupyter gives the page its URL after this hook: lessons/NAME/ (use_directory_urls)
            url = posixpath.relpath(resolved.removesuffix(".ipynb"), lesson_dir) + "/" + (f"#{fragment}" if fragment else "")
        elif resolved.startswith("docs/"):
            url = url_of(resolved[len("docs/"):], fragment)
        elif resolved.startswith("minipar/") and resolved.endswith(".py"):
            module = _module_of(resolved)
            if module in api_pages:
                url = url_of(api_pages[module], module + (f".{fragment}" if fragment else ""))
        elif resolved in _source_pages:
            url = url_of(_source_pages[resolved], fragment)
        if url is None:
            log.warning(f"{lesson_uri} links to '{target}', which has no page on this site")
            return match.group(0)
        return f"[{text}]({url})"

    rewritten = LINK.sub(rewrite, source)
    return cell if rewritten == source else dict(cell, source=rewritten)


# Packages documented by their __init__ alone: their modules are data, not API (the course's wrong
# solutions and correct variants, one module per exercise, teacher-only).
DATA_PACKAGES = ("minipar.course.planted",)


def _check_api_coverage(config):
    """Every public module of minipar has an entry ('::: minipar.x') on an API page; a new one is a warning."""
    documented = set(_api_pages(config))
    for path in sorted((ROOT / "minipar").rglob("*.py")):
        module = _module_of(path.relative_to(ROOT).as_posix())
        if path.name.startswith("_") or module in documented:
            continue  # __init__, __main__ and private modules
        if module.rpartition(".")[0] in DATA_PACKAGES and module.rpartition(".")[0] in documented:
            continue
        group = posixpath.dirname(path.relative_to(ROOT).as_posix())
        log.warning(f"{module} is not in the API reference: add '::: {module}' to the page in docs/api/ "
                    f"that documents {group}/")


@event_priority(100)  # before mkdocs-jupyter's on_files, so the lesson files become notebook pages
def on_files(files, config):
    _lessons.clear()
    _source_pages.clear()
    _check_api_coverage(config)
    docs_dir = Path(config["docs_dir"])
    for page in list(files.documentation_pages()):
        if page.abs_src_path and page.src_uri.endswith(".md"):
            for repository_path in _outside_targets(Path(page.abs_src_path), docs_dir):
                if repository_path not in _source_pages and (ROOT / repository_path).is_file():
                    _source_pages[repository_path] = _add_source_page(repository_path, files, config)
    lessons = sorted(LESSONS.glob("*.ipynb"))
    for path in lessons:  # every lesson page exists before any lesson's links are pointed at them
        files.append(File(f"lessons/{path.name}", str(PREPARED), config["site_dir"], config["use_directory_urls"]))
    for path in lessons:
        notebook, executed, executed_at = _choose_lesson(path)
        uri = f"lessons/{path.name}"
        notebook = dict(notebook, cells=[_with_site_links(cell, uri, files, config) for cell in notebook["cells"]])
        notebook["cells"].insert(1, _lesson_note(path.stem, executed, executed_at, uri, files))
        target = PREPARED / uri
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(notebook, indent=1), encoding="utf-8")
        _lessons[uri] = {"name": path.stem, "executed": executed, "figures": _figures(notebook),
                         "executed_at": executed_at}
    return files


def _outside_targets(page_path, docs_dir):
    """Repository paths (not minipar/, not lessons/) that the page links to outside docs/."""
    for target in (match.group("target") for match in LINK.finditer(page_path.read_text(encoding="utf-8"))):
        resolved = _resolve(target.split("#")[0], page_path, docs_dir)
        if resolved and not resolved.startswith(("minipar/", "lessons/")) and resolved != "minipar":
            yield resolved


def _resolve(path_part, page_path, docs_dir):
    """The repository path a relative link leaves docs/ for, or None when it stays inside (or is a URL)."""
    if not path_part or "://" in path_part or path_part.startswith(("/", "mailto:")):
        return None
    resolved = (page_path.parent / path_part).resolve()
    try:
        resolved.relative_to(docs_dir.resolve())
        return None
    except ValueError:
        pass
    try:
        return resolved.relative_to(ROOT).as_posix()
    except ValueError:
        return None


def _add_source_page(repository_path, files, config):
    text = (ROOT / repository_path).read_text(encoding="utf-8")
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    language = {".py": "python", ".toml": "toml", ".json": "json", ".md": "markdown", ".sh": "bash"}.get(
        Path(repository_path).suffix, "text")
    uri = f"source/{repository_path}.md"
    content = (f"# `{repository_path}`\n\nThe file as it is in the repository that built this site.\n\n"
               f'{fence}{language} linenums="1"\n{text}\n{fence}\n')
    files.append(File.generated(config, uri, content=content))
    return uri


def _module_of(repository_path):
    """'minipar/parallel/zero.py' -> 'minipar.parallel.zero'; a package folder -> the package."""
    path = repository_path.removesuffix("/")
    path = path.removesuffix(".py").removesuffix("/__init__")
    return path.replace("/", ".")


def _rewrite(match, page, docs_dir):
    text, target = match.group("text"), match.group("target")
    path_part, _, fragment = target.partition("#")
    resolved = _resolve(path_part, Path(page.file.abs_src_path), docs_dir)
    if resolved is None:
        return match.group(0)
    where = f"docs/{page.file.src_uri}"
    if not (ROOT / resolved).exists():
        log.warning(f"{where} links to '{target}', but {resolved} does not exist in the repository")
        return match.group(0)
    if fragment and LINE_ANCHOR.match(fragment):
        log.warning(f"{where} links to line '{target}': lines move when code changes; link to the symbol "
                    f"instead, e.g. '{path_part}#ClassName.method'")
        return match.group(0)
    page_dir = posixpath.dirname(page.file.src_uri)
    if resolved.startswith("lessons/"):
        relative = posixpath.relpath(resolved, page_dir or ".")
        return f"[{text}]({relative}{'#' + fragment if fragment else ''})"
    if resolved == "minipar" or resolved.startswith("minipar/"):
        if fragment and not IDENTIFIER.match(fragment):
            log.warning(f"{where} links to '{target}': after '#' give a Python name such as 'Zero.memory_report'")
            return match.group(0)
        identifier = _module_of(resolved) + (f".{fragment}" if fragment else "")
        return f"[{text}][{identifier}]"  # mkdocs-autorefs resolves it, or the strict build fails
    source_uri = _source_pages.get(resolved)
    if source_uri is None:  # a folder, or a file that is not text
        log.warning(f"{where} links to '{target}', which the site cannot show; link to a file or a symbol")
        return match.group(0)
    return f"[{text}]({posixpath.relpath(source_uri, page_dir or '.')})"


def on_page_markdown(markdown, page, config, files):
    if not page.file.abs_src_path or not page.file.src_uri.endswith(".md"):
        return markdown
    docs_dir = Path(config["docs_dir"])
    lines, fenced = [], None
    for line in markdown.split("\n"):
        opening = FENCE.match(line)
        if opening and (fenced is None or opening.group(1)[0] == fenced[0] and len(opening.group(1)) >= len(fenced)):
            fenced = opening.group(1) if fenced is None else None
        elif fenced is None:
            line = LINK.sub(lambda match: _rewrite(match, page, docs_dir), line)
        lines.append(line)
    return "\n".join(lines)


# ---- formulas: LaTeX -> MathML when the site is built (no JavaScript, nothing fetched from a CDN) ----------
MATHJAX_2 = re.compile(r'<script src="https://cdnjs\.cloudflare\.com/ajax/libs/mathjax/[^"]*">\s*</script>')
ARITHMATEX = re.compile(r'<(?P<tag>span|div) class="arithmatex">(?P<tex>.*?)</(?P=tag)>', re.S)
NOTEBOOK_MARKDOWN = re.compile(r'(<div class="jp-RenderedHTMLCommon jp-RenderedMarkdown jp-MarkdownOutput[^>]*>)'
                               r'(.*?)(</div>)', re.S)
CODE = re.compile(r"(<code>.*?</code>|<pre>.*?</pre>)", re.S)
DOLLARS = re.compile(r"\$\$(?P<block>.+?)\$\$|(?<![\\$])\$(?P<inline>[^$\n]+?)\$", re.S)


# Docstrings are read in a terminal too, so their formulas may keep Unicode symbols ($Δθ = (1/N) Σ_i Δθ_i$,
# docs/site.md): each becomes its TeX command, so that it is drawn as an operator, with an operator's spacing.
UNICODE_TEX = {"−": "-", "×": r"\times ", "·": r"\cdot ", "≈": r"\approx ", "≤": r"\le ", "≥": r"\ge ",
               "≠": r"\ne ", "±": r"\pm ", "Σ": r"\sum ", "∏": r"\prod ", "∂": r"\partial ", "∇": r"\nabla ",
               "√": r"\sqrt ", "∞": r"\infty ", "∈": r"\in ", "→": r"\to ", "←": r"\leftarrow ", "…": r"\ldots ",
               "⌈": r"\lceil ", "⌉": r"\rceil ", "⌊": r"\lfloor ", "⌋": r"\rfloor ", "⊙": r"\odot ",
               "‖": r"\| ", "ḡ": r"\bar{g}", "ᵀ": "^T", "ᵗ": "^t", "²": "^2", "³": "^3", "⁻¹": "^{-1}",
               **{chr(0x2080 + digit): f"_{digit}" for digit in range(10)}}
UNICODE_MATH = re.compile("|".join(sorted(map(re.escape, UNICODE_TEX), key=len, reverse=True)))
# ... and, in a formula without a single backslash (a docstring's: no escapes in Python strings), the names of
# functions are upright, as TeX sets them: lg N, log, exp, max, softmax, and the operator mod (c mod p).
TEX_FUNCTIONS = ("lg", "log", "ln", "exp", "max", "min", "sin", "cos", "tanh")
FUNCTION_NAME = re.compile(r"(?<![A-Za-z])(lg|log|ln|exp|max|min|sin|cos|tanh|softmax|logsumexp|onehot|mean|rowsum|"
                           r"gelu|sqrt|mod)(?![A-Za-z])")
HAT = re.compile("([A-Za-zα-ω])\u0302")  # m̂: m and a combining circumflex
ROOT_OF = re.compile(r"√(\([^()]*\)|\\hat\{.\}|[A-Za-zα-ω0-9])")  # √(2L), √v̂, √d: the radicand


def _unicode_to_tex(tex):
    """A formula written with Unicode symbols (docstrings, docs/site.md) as TeX that latex2mathml reads."""
    if "\\" not in tex:
        tex = FUNCTION_NAME.sub(lambda match: "√" if match[1] == "sqrt" else "\\" + match[1] + " "
                                if match[1] in TEX_FUNCTIONS else "\\operatorname{" + match[1] + "}", tex)
    tex = HAT.sub(r"\\hat{\1}", tex)
    tex = ROOT_OF.sub(lambda match: "\\sqrt{" + match.group(1).removeprefix("(").removesuffix(")") + "}", tex)
    tex = re.sub(r" {3,}", r" \\quad ", tex)  # a wide gap between two formulas on one line stays wide
    return UNICODE_MATH.sub(lambda match: UNICODE_TEX[match.group(0)], tex)


def _mathml(tex, display, where):
    from latex2mathml.converter import convert

    tex = _unicode_to_tex(html.unescape(tex))
    # latex2mathml (3.81) has no `aligned`: it would draw each & as a letter on one long line. `align*` is the
    # same rows and columns, as a MathML table.
    tex = tex.replace("\\begin{aligned}", "\\begin{align*}").replace("\\end{aligned}", "\\end{align*}")
    try:
        return convert(tex.strip(), display="block" if display else "inline")
    except Exception as error:  # noqa: BLE001 - any parse error: report the formula, keep its text
        log.warning(f"{where}: cannot typeset the formula {tex!r}: {type(error).__name__} {error}".rstrip())
        return f"<code>{tex}</code>"


def _arithmatex(match, where):
    tex, display = match.group("tex").strip(), match.group("tag") == "div"
    tex = tex[2:-2] if tex[:2] in ("\\(", "\\[") else tex
    return _mathml(tex, display, where)


def _notebook_math(match, where):
    def dollars(text):
        return DOLLARS.sub(lambda m: _mathml(m.group("block") or m.group("inline"), bool(m.group("block")), where),
                           text)
    parts = CODE.split(match.group(2))  # code spans keep their dollars
    body = "".join(part if index % 2 else dollars(part) for index, part in enumerate(parts))
    return match.group(1) + body + match.group(3)


def on_post_page(output, page, config):
    """Every formula becomes MathML, which browsers draw natively; notebook pages lose nbconvert's MathJax tag."""
    where = page.file.src_uri
    output = ARITHMATEX.sub(lambda match: _arithmatex(match, where), output)
    if page.file.src_uri in _lessons:
        output = MATHJAX_2.sub("", output)
        output = NOTEBOOK_MARKDOWN.sub(lambda match: _notebook_math(match, where), output)
    return output


def on_post_build(config):
    manifest = {"lessons": {}, "source_pages": sorted(_source_pages.values())}
    for uri, state in _lessons.items():
        url = uri.removesuffix(".ipynb") + ("/" if config["use_directory_urls"] else ".html")
        manifest["lessons"][url] = state
    Path(config["site_dir"], "minipar-site.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
