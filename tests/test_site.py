"""`python -m minigpt site`: every chapter and the README become linked, self-contained HTML
pages."""

import re
import subprocess
import sys

import pytest
from bs4 import BeautifulSoup
from site_build import built_site

from minigpt.course.chapters import chapter_paths
from minigpt.course.colab import colab_url
from minigpt.course.site import build_site, prepare_notebook

pytestmark = pytest.mark.slow  # a site build (about 20 s)

CHAPTERS = chapter_paths()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return built_site(tmp_path_factory)


def page(site, name):
    return BeautifulSoup((site / name).read_text(encoding="utf-8"), "html.parser")


def test_landing_page_is_the_readme_and_lists_every_chapter(site):
    index = page(site, "index.html")
    assert index.find("h1").get_text(strip=True).startswith("minigpt-lora")
    links = {a["href"] for a in index.find_all("a", href=True)}
    for path in CHAPTERS:
        assert f"chapters/{path.stem}.html" in links, f"landing page does not link {path.stem}"


def test_chapters_are_chained_by_previous_and_next_links(site):
    pages = ["index"] + [f"chapters/{p.stem}" for p in CHAPTERS]
    for before, current, after in zip([None] + pages, pages, pages[1:] + [None], strict=False):
        html = page(site, f"{current}.html")
        nxt, prev = html.find("a", class_="next-page"), html.find("a", class_="prev-page")
        if after:
            assert nxt is not None and nxt["href"].endswith(f"{after.split('/')[-1]}.html"), current
        if before:
            assert prev is not None and prev["href"].endswith(f"{before.split('/')[-1]}.html"), (
                current
            )


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_page_has_code_outputs_figures_and_math(site, path):
    html = page(site, f"chapters/{path.stem}.html")
    article = html.find("article")
    assert article.select(".cell_input"), "no code cells"
    assert article.select(".cell_output"), "no outputs"
    assert article.find("img") is not None, "no figure"
    for img in article.find_all("img"):
        assert (site / "chapters" / img["src"]).is_file(), img["src"]
    assert article.select(".math"), "no equations"
    links = [a["href"] for a in article.find_all("a", href=True)]
    assert colab_url(path.name) in links
    assert "google.colab" not in article.get_text(), (
        "the Colab setup cell belongs to the notebook only"
    )


def test_chapter_pages_have_copy_buttons_and_a_download_link(site):
    assert (site / "_static" / "copybutton.js").is_file()
    for path in CHAPTERS:
        html = page(site, f"chapters/{path.stem}.html")
        scripts = [s.get("src", "") for s in html.find_all("script")]
        assert any("copybutton" in src for src in scripts), f"{path.stem}: no copy buttons"
        downloads = [a for a in html.find_all("a", href=True) if "Download" in a.get_text()]
        assert downloads and downloads[0]["href"].endswith(path.name), f"{path.stem}: no download"
        target = (site / "chapters" / downloads[0]["href"]).resolve()
        assert target.read_bytes() == path.read_bytes(), "the download is not the chapter"


def test_pages_load_nothing_from_the_internet_and_bundle_mathjax(site):
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file()
    for html_file in site.rglob("*.html"):
        html = BeautifulSoup(html_file.read_text(encoding="utf-8"), "html.parser")
        for tag, attr in (("script", "src"), ("img", "src"), ("link", "href"), ("iframe", "src")):
            for element in html.find_all(tag):
                url = element.get(attr, "")
                if (
                    tag == "link"
                    and "stylesheet" not in element.get("rel", [])
                    and "preload" not in element.get("rel", [])
                ):
                    continue
                assert not re.match(r"(https?:)?//", url), (
                    f"{html_file.name} loads {url} from the network"
                )


def test_site_leaves_the_notebooks_unchanged(tmp_path):
    path = CHAPTERS[0]
    before = path.read_bytes()
    nb = prepare_notebook(path)
    assert nb.cells[0].source.startswith("[Open this chapter in Colab](")
    assert path.read_bytes() == before


def test_cli_builds_and_reports_errors(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "minigpt", "site", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "OUT" in result.stdout
    with pytest.raises(FileNotFoundError, match="no chapter notebooks"):
        build_site(tmp_path / "out", chapters_dir=tmp_path)
