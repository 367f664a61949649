"""Open every page of the built site in headless Chromium and fail on what a reader would see broken.

    mkdocs build --strict && python scripts/check_site.py            # the site in build/site/
    python scripts/check_site.py --allow-unexecuted                    # a build without executed lessons

Serves ``build/site/`` on 127.0.0.1 (a free port, this machine only) and drives Debian's ``chromium`` through
``chromedriver`` with selenium (``apt-get install -y chromium chromium-driver``; nothing is downloaded at
run time). Every page must load with:

* no console error (a failed request, a JavaScript exception, a missing script or stylesheet);
* every image loaded (``naturalWidth > 0``);
* its figures: a lesson page shows at least as many images as its executed outputs hold
  (``build/site/minipar-site.json``, written by the build), and it must have been executed unless
  ``--allow-unexecuted``;
* its formulas typeset: every formula is MathML (``<math>``), none left as raw TeX (and, as a note
  that fails nothing, the spots of prose that look like maths written as plain text: ``Σ``, ``√``,
  ``x²``, ``(N−1)``);
* a lesson's figures shown at 75% of their size or more (smaller, their labels cannot be read);
* no number in a table broken across two lines, and no page wider than the window (a wide table
  scrolls inside its column);
* no list drawn as a paragraph: Markdown reads a list with no blank line before it, or an item's
  second block indented by fewer than 4 spaces, as running text ("... signature. 3. Check: ...");
* an API page with no dunder (``__repr__``, ``__all__``) among its entries;
* a lesson's sidebar entry reading as its label in ``mkdocs.yml``'s nav, not the notebook's title;
* every link inside the site pointing to a page or file that exists, and to an anchor on that page.

Screenshots of the home page and of the pipeline lesson go to ``build/site-check/``. Exit status 0
when every page passes; otherwise each problem is printed, one line each, and the status is 1.
"""
import argparse
import functools
import http.server
import json
import os
import re
import shutil
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = {"home.png": "", "pipeline_lesson.png": "lessons/05_pipeline_parallel/"}
MIN_FIGURE_SCALE = 0.75  # a lesson's figure shown smaller than this has labels too small to read
DUNDER = re.compile(r"__[a-z][a-z0-9_]*__")
RAW_TEX = re.compile(r"\\(frac|sum|partial|cdot|approx|tanh)\b|\$\$")
# Maths written as plain text in prose (not code, not MathML): reported, page by page, so it can be put between
# dollars (docs/site.md, "Formulas"); not a failure, since a Σ in a sentence may be meant as a word.
PLAIN_MATH = re.compile(r"[Σ√∂≈∇]|[A-Za-z)][²³ᵀ]|\([A-Za-z] ?[−-] ?1\)")

PAGE_STATE = """
const images = [...document.images].map(img => ({src: img.currentSrc || img.src, ok: img.complete && img.naturalWidth > 0,
                                                  output: !!img.closest('.jp-OutputArea-output'),
                                                  scale: img.naturalWidth
                                                    ? img.getBoundingClientRect().width / img.naturalWidth : 1}));
const active = document.querySelector('a.md-nav__link--active[href="./"]');  // this page's entry in the sidebar
const headings = [...document.querySelectorAll('article h2, article h3, article h4')].map(h => h.textContent);
const walker = document.createTreeWalker(document.querySelector('article') || document.body, NodeFilter.SHOW_TEXT);
const prose = [];  // the text a reader sees as prose: not code, not already typeset
while (walker.nextNode()) {
  if (!walker.currentNode.parentElement.closest('code, pre, math, script, style, .highlight, .jp-InputArea, .jp-OutputArea')) {
    prose.push(walker.currentNode.textContent);
  }
}
const text = prose.join(' ');
const links = [...document.querySelectorAll('a[href]')].map(a => a.href);
// A number in a table cell drawn on more than one line (it wrapped mid-digit), and the page wider than the window
// (a table or figure that overflows instead of scrolling inside its column).
const wrappedNumbers = [...document.querySelectorAll('article td, article th')].filter(cell => {
  const value = cell.textContent.trim();
  if (!/^[-+−~≈]?[0-9][0-9.,]* *[%×a-zA-Z/]{0,4}$/.test(value)) return false;
  const range = document.createRange();
  range.selectNodeContents(cell);
  const tops = [...range.getClientRects()].map(rect => rect.top);
  return Math.max(...tops) - Math.min(...tops) > 8;  // a second line, not a code span's padding
}).map(cell => cell.textContent.trim());
const overflow = document.documentElement.scrollWidth - document.documentElement.clientWidth;
// A paragraph with a line that starts like a list item ("- ", "3. "): a list Markdown did not see.
const listsAsText = [...document.querySelectorAll('article p')].map(p => p.textContent)
  .map(text => text.match(/\\n\\s*(?:[-*+]|[0-9]{1,2}\\.) \\S.{0,40}/)).filter(Boolean).map(match => match[0].trim());
return {images, links, text, wrappedNumbers, overflow, listsAsText, formulas: document.querySelectorAll('math').length,
        mathErrors: document.querySelectorAll('math merror').length, title: document.title,
        height: document.documentElement.scrollHeight, navLabel: active ? active.textContent.trim() : null,
        headings};
"""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the check prints its own findings
        pass


def serve(site):
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def browser(chromium, chromedriver, width=1280, height=900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(chromedriver), options=options)


def pages_of(site):
    return sorted(path.relative_to(site).as_posix().removesuffix("index.html")
                  for path in site.rglob("index.html"))


ANCHOR = re.compile(r'\b(?:id|name)="([^"]+)"')


@functools.lru_cache(maxsize=None)
def fetch(url):
    """(status, the ids and names its HTML defines) of a URL on the local server."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode("utf-8", "replace")
            return response.status, set(ANCHOR.findall(body)) if "html" in response.headers.get("Content-Type", "") else None
    except urllib.error.HTTPError as error:
        return error.code, None


def check_link(link, base):
    if not link.startswith(base):
        return None
    parts = urllib.parse.urlsplit(link)
    target = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    status, anchors = fetch(target)
    if status != 200:
        return f"links to {link[len(base) - 1:]}, which answers HTTP {status}"
    fragment = urllib.parse.unquote(parts.fragment)
    if fragment and anchors is not None and fragment not in anchors:
        return f"links to {link[len(base) - 1:]}, but that page has no anchor '{fragment}'"
    return None


def nav_labels_of(config_path):
    """{page url: its label in mkdocs.yml's nav} for the lessons (the pages whose own title is long)."""
    labels = {}
    for line in Path(config_path).read_text().splitlines():
        match = re.match(r'\s*- "?([^":]+)"?: (lessons/\S+)\.ipynb', line)
        if match:
            labels[match.group(2) + "/"] = match.group(1)
    return labels


def check_page(driver, base, page, lessons, allow_unexecuted, nav_labels=None):
    nav_labels = nav_labels or {}
    driver.get(base + page)
    state = driver.execute_script(PAGE_STATE)
    problems = []
    for entry in driver.get_log("browser"):
        if entry["level"] == "SEVERE":
            problems.append(f"console error: {entry['message']}")
    problems += [f"image did not load: {image['src']}" for image in state["images"] if not image["ok"]]
    problems += [f"a lesson's figure is shown at {image['scale']:.0%} of its size (text too small to read): "
                 f"{image['src'][-60:]}" for image in state["images"]
                 if image["ok"] and image["output"] and image["scale"] < MIN_FIGURE_SCALE]
    if page.startswith("api/"):
        dunders = sorted({name for heading in state["headings"] for name in DUNDER.findall(heading)})
        if dunders:
            problems.append(f"API page lists dunders: {', '.join(dunders)}")
    if page in nav_labels and state["navLabel"] is not None and state["navLabel"] != nav_labels[page]:
        problems.append(f"the sidebar says {state['navLabel']!r}, the navigation {nav_labels[page]!r}")
    if page in lessons:
        lesson = lessons[page]
        shown = sum(1 for image in state["images"] if image["output"] and image["ok"])
        if not lesson["executed"] and not allow_unexecuted:
            problems.append("lesson shown without outputs: run python scripts/execute_lessons.py, then rebuild")
        elif shown < lesson["figures"]:
            problems.append(f"shows {shown} of the {lesson['figures']} figures its executed notebook holds")
    if state["wrappedNumbers"]:
        problems.append(f"numbers wrapped inside a table cell: {', '.join(state['wrappedNumbers'][:5])}")
    if state["listsAsText"]:
        problems.append(f"a list drawn as a paragraph (a blank line before it, its items' blocks indented 4 spaces): "
                        f"{' | '.join(state['listsAsText'][:3])}")
    if state["overflow"] > 2:
        problems.append(f"the page is {state['overflow']} px wider than the window (a table or figure overflows)")
    if state["mathErrors"]:
        problems.append(f"{state['mathErrors']} formulas did not typeset (MathML merror)")
    raw = RAW_TEX.search(state["text"])
    if raw:
        problems.append(f"raw TeX left in the text: ...{state['text'][max(0, raw.start() - 30):raw.end() + 30]}...")
    for link in sorted(set(state["links"])):
        problem = check_link(link, base)
        if problem:
            problems.append(problem)
    return state, problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--site", default=str(ROOT / "build" / "site"), help="the built site (default: build/site/)")
    parser.add_argument("--out", default=str(ROOT / "build" / "site-check"), help="where screenshots go")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--chromedriver", default=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    parser.add_argument("--allow-unexecuted", action="store_true",
                        help="accept lesson pages built without executing the lessons (the default CI build)")
    parser.add_argument("--verbose", action="store_true", help="one line per page")
    parser.add_argument("--only", nargs="*", default=None, metavar="PATH",
                        help="check only the pages whose path starts so (e.g. lessons/05 site/); default: every page")
    args = parser.parse_args(argv)
    site, out = Path(args.site), Path(args.out)
    manifest_path = site / "minipar-site.json"
    if not manifest_path.exists():
        parser.error(f"{manifest_path} is missing: build the site first (mkdocs build --strict)")
    for tool in (args.chromium, args.chromedriver):
        if not Path(tool).exists():
            parser.error(f"{tool} not found: apt-get install -y chromium chromium-driver")
    lessons = json.loads(manifest_path.read_text())["lessons"]
    nav_labels = nav_labels_of(ROOT / "mkdocs.yml")
    out.mkdir(parents=True, exist_ok=True)
    server, base = serve(site)
    driver = browser(args.chromium, args.chromedriver)
    failures, figures, formulas, plain = 0, 0, 0, {}
    try:
        pages = pages_of(site)
        if args.only is not None:
            pages = [page for page in pages if page.startswith(tuple(args.only))]
        for page in pages:
            started = time.perf_counter()
            state, problems = check_page(driver, base, page, lessons, args.allow_unexecuted, nav_labels)
            figures += sum(1 for image in state["images"] if image["ok"])
            formulas += state["formulas"]
            spots = [state["text"][max(0, m.start() - 25):m.end() + 25].replace("\n", " ")
                     for m in PLAIN_MATH.finditer(state["text"])]
            if spots:
                plain[page] = spots
                print(f"NOTE /{page}: {len(spots)} spots of maths as plain text, e.g. ...{spots[0]}...", flush=True)
            for problem in problems:
                print(f"FAIL /{page}: {problem}", flush=True)
            failures += bool(problems)
            if args.verbose:
                print(f"/{page}: {len(problems)} problems, {time.perf_counter() - started:.1f} s", flush=True)
        for name, page in SCREENSHOTS.items():
            driver.get(base + page)
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(1280, min(height, 12000))
            driver.save_screenshot(str(out / name))
            driver.set_window_size(1280, 900)
    finally:
        driver.quit()
        server.shutdown()
    print(f"{len(pages)} pages, {len(pages) - failures} passed; {figures} images loaded, {formulas} formulas "
          f"typeset; {sum(map(len, plain.values()))} spots of maths as plain text on {len(plain)} pages; "
          f"screenshots: {', '.join(str(out / name) for name in SCREENSHOTS)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
