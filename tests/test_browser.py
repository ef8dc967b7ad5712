"""The course in a real browser: every page of the built site in headless Chromium, and chapter 01
run in JupyterLab. Needs Debian's ``chromium`` (``apt-get install chromium``) and the ``playwright``
package (its own browser download is not used); skipped with the reason when either is missing.

On failure a screenshot of the page is saved in ``runs/screenshots/`` (or ``$MINIGPT_SCREENSHOTS``).
"""

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from site_build import built_site

from minigpt.course.chapters import CHAPTERS_DIR

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(os.environ.get("MINIGPT_SCREENSHOTS", "runs/screenshots"))


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = chromium_path()
    if executable is None:
        pytest.skip(
            "Chromium is not installed (Debian: apt-get install chromium); browser tests need it"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -r requirements.txt)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        # A persistent context gives Chromium a fresh --user-data-dir of our own.
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=executable,
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport={"width": 1280, "height": 900},
        )
        yield context
        context.close()


class PageProblems:
    """Console errors, uncaught exceptions and failed requests of one page."""

    def __init__(self, page):
        self.items: list[str] = []
        page.on(
            "console",
            lambda msg: (
                self.items.append(f"console {msg.type}: {msg.text}")
                if msg.type == "error"
                else None
            ),
        )
        page.on("pageerror", lambda err: self.items.append(f"uncaught: {err}"))
        page.on(
            "requestfailed",
            lambda req: self.items.append(f"request failed: {req.url} ({req.failure})"),
        )


def screenshot_on_failure(page, name: str):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    target = SCREENSHOTS / (re.sub(r"[^\w.-]", "_", name) + ".png")
    page.screenshot(path=str(target), full_page=False)
    return target


# Runs in the page: waits for MathJax, then reports images, equations and any $...$ left in the
# prose.
INSPECT = """async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const images = [...document.images].map(img => ({src: img.getAttribute('src'), complete: img.complete,
                                                   width: img.naturalWidth}));
  const math = document.querySelectorAll('.math').length;
  const rendered = document.querySelectorAll('.math mjx-container').length;
  const mathErrors = document.querySelectorAll('mjx-merror').length;
  const article = document.querySelector('article');
  let prose = '';
  if (article) {
    const copy = article.cloneNode(true);
    copy.querySelectorAll('pre, code, .math, .highlight, .cell_output, script, style').forEach(e => e.remove());
    prose = copy.textContent;
  }
  return {images, math, rendered, mathErrors, prose};
}"""


def site_pages(tmp_path_factory):
    site = built_site(tmp_path_factory)
    return site, sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html"))


def test_every_site_page_renders_in_chromium(browser, tmp_path_factory):
    site, pages = site_pages(tmp_path_factory)
    assert "index.html" in pages and sum(p.startswith("chapters/") for p in pages) >= 10
    failures = []
    for name in pages:
        page = browser.new_page()
        problems = PageProblems(page)
        page.goto((site / name).as_uri(), wait_until="load")
        report = page.evaluate(INSPECT)
        errors = list(problems.items)
        for image in report["images"]:
            if not image["complete"] or image["width"] == 0:
                errors.append(f"figure did not load: {image['src']}")
        if report["rendered"] != report["math"]:
            errors.append(
                f"{report['math'] - report['rendered']} of {report['math']} equations not rendered"
            )
        if report["mathErrors"]:
            errors.append(f"{report['mathErrors']} equations with TeX errors")
        raw = re.findall(r"\$[^$\n]{1,60}\$", report["prose"])
        if raw:
            errors.append(f"raw TeX left in the text: {raw[:3]}")
        if name.startswith("chapters/") and not report["images"]:
            errors.append("chapter page without figures")
        if errors:
            failures.append(f"{name}: {errors} (screenshot {screenshot_on_failure(page, name)})")
        page.close()
    assert not failures, "\n".join(failures)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab on 127.0.0.1 with a token, serving a copy of chapter 01; kernels run in smoke
    mode."""
    chapter = sorted(CHAPTERS_DIR.glob("01_*.ipynb"))[0]
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(chapter, root / chapter.name)
    port, token = free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "MINIGPT_SMOKE": "1",
        "MINIGPT_CACHE": str(tmp_path / "cache"),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    # CI runs as root
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True",
        "--ServerApp.port_retries=0",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
        "--allow-root",
    ]
    log = open(tmp_path / "jupyterlab.log", "wb")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(
                    f"{base}/api/status?token={token}", timeout=2
                ) as response:
                    json.load(response)
                break
            except OSError as err:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "JupyterLab did not start: "
                        + (tmp_path / "jupyterlab.log").read_text(errors="replace")[-2000:]
                    ) from err
                time.sleep(0.5)
        yield base, token, chapter.name
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


# Runs in JupyterLab: what the open notebook's cells hold (JupyterLab's own model, as the user sees
# it).
CELL_STATE = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.content || !panel.context || !panel.context.isReady) { return null; }
  const cells = [];
  for (const cell of panel.content.model.cells) {
    const json = cell.toJSON();
    if (json.cell_type !== 'code' || !String(json.source).trim()) { continue; }
    cells.push({count: json.execution_count, errors: (json.outputs || []).filter(o => o.output_type === 'error')
                .map(o => o.ename + ': ' + o.evalue)});
  }
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  return {cells, status: kernel ? kernel.status : 'none'};
}"""


def test_chapter_01_runs_in_jupyterlab_without_errors(browser, jupyterlab):
    base, token, name = jupyterlab
    page = browser.new_page()
    try:
        page.goto(f"{base}/lab/tree/{name}?token={token}", wait_until="domcontentloaded")
        page.wait_for_function("() => window.jupyterapp !== undefined", timeout=60_000)
        page.wait_for_function(
            f"({CELL_STATE})() && ({CELL_STATE})().status === 'idle'", timeout=60_000
        )
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        page.wait_for_function(
            f"""() => {{ const s = ({CELL_STATE})();
            return s && s.status === 'idle' && (s.cells.every(c => c.count !== null)
                                                   || s.cells.some(c => c.errors.length)); }}""",
            timeout=120_000,
            polling=500,
        )
        state = page.evaluate(CELL_STATE)
        errors = [
            f"code cell {i + 1}: {e}"
            for i, cell in enumerate(state["cells"])
            for e in cell["errors"]
        ]
        shown = page.locator(
            ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
            ":has-text('Traceback')"
        ).count()
        assert not errors and shown == 0, errors
        assert len(state["cells"]) > 10
    except Exception:
        print(f"screenshot: {screenshot_on_failure(page, 'jupyterlab-' + name)}")
        raise
    finally:
        page.close()
