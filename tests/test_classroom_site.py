"""The students' course site (``tinymoe classroom site``): built from the student copy with
Sphinx -W, lessons not executed; no solution line on any page; nothing loaded from outside
the site (MathJax ships in ``_static/``).

The build takes about half a minute (no notebook is executed); the checks of a built site are
first shown to catch what they look for on small hand-made pages.
"""
import importlib.util
from pathlib import Path

import pytest

from tinymoe.classroom import main_classroom, student
from tinymoe.classroom.site import external_loads, site_leaks, solution_lines

REPO = Path(__file__).resolve().parents[1]
NEEDS = ("sphinx", "myst_nb", "sphinx_book_theme", "sphinx-mathjax-offline")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the docs extra is not installed ({', '.join(missing)})")
    tmp = tmp_path_factory.mktemp("site")
    student(tmp / "student", REPO)
    assert main_classroom(["site", str(tmp / "student"), str(tmp / "html")]) == 0
    return tmp / "html"


@pytest.mark.slow
def test_student_site_shows_no_solution_line(built):
    secrets = solution_lines(REPO)
    assert len(secrets) > 50  # the check has something to look for
    assert site_leaks(built, secrets) == []
    lesson = (built / "lessons" / "01_adaptive_mixtures_1991.html").read_text(encoding="utf-8")
    assert "NotImplementedError" in lesson and "YOUR CODE HERE" in lesson


@pytest.mark.slow
def test_student_site_loads_nothing_from_outside(built):
    assert external_loads(built) == []
    mathjax = built / "_static" / "mathjax"
    assert (mathjax / "tex-chtml.js").is_file()
    assert any((mathjax / "output" / "chtml" / "fonts").rglob("*.woff*"))
    page = (built / "lessons" / "01_adaptive_mixtures_1991.html").read_text(encoding="utf-8")
    assert 'src="../_static/mathjax/tex-chtml.js"' in page and "\\(" in page


def test_site_checks_catch_leaks_and_remote_loads(tmp_path):
    line = "Z = np.linalg.solve(M, XtW @ R)  # (d, D)"  # made up: no task's line
    (tmp_path / "_static").mkdir()
    (tmp_path / "page.html").write_text(
        '<html><head><script src="https://cdn.example.org/mathjax.js"></script>'
        '<link rel="stylesheet" href="//fonts.example.org/a.css">'
        '<link rel="canonical" href="https://example.org/page.html">'
        '<script src="_static/local.js"></script></head><body><pre>'
        '<span class="n">Z</span> <span class="o">=</span> np.linalg.solve(M, XtW '
        '<span class="o">@</span> R)  <span class="c1"># (d, D)</span></pre></body></html>')
    (tmp_path / "_static" / "theme.css").write_text(
        "@font-face{src:url('https://fonts.example.org/x.woff2')} .a{background:url(a.png)}")
    assert site_leaks(tmp_path, [line, "never shown anywhere at all"]) == [f"page.html: {line}"]
    assert external_loads(tmp_path) == [
        "page.html: <script> https://cdn.example.org/mathjax.js",
        "page.html: <link> //fonts.example.org/a.css",
        "_static/theme.css: https://fonts.example.org/x.woff2"]


def test_site_refuses_bad_arguments(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine\n")
    cases = {
        (str(tmp_path / "nowhere"), str(tmp_path / "out")): "no such directory",
        (str(tmp_path), str(tmp_path / "out")): "not a tinymoe source tree",
        (str(REPO), str(tmp_path / "full")): "not empty and holds no earlier site",
        (str(REPO), str(REPO / "docs" / "html")): "inside the source tree",
        (str(REPO), str(REPO.parent)): "over the source tree",
    }
    for (src, out), words in cases.items():
        assert main_classroom(["site", src, out]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine\n"
