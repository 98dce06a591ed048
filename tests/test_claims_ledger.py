"""The claims ledger: every figure the lessons and guide pages quote says where it comes from.

A *figure* is a number a reader could quote: a decimal (0.08, 46.7), a number of four or more
digits that is not a year (1124, 5,500), a percentage (36 %), a ratio (2x, 7×) or a size
(46.7B, 16 GB). The text scanned is the prose of every lesson's markdown cells and of every
guide page (``docs/guide/*.md``), split into paragraphs (blocks separated by a blank line; a
list or a table is one block). Not scanned: code (fenced blocks, inline code), math
(``$...$``, ``$$...$$``: formulas, settings written as equations such as ``$\\gamma = 0.01$``
and derived constants belong there; a bare number in math, ``$1124$``, is still a figure),
links, issue and PR numbers, and equation/section/table locators themselves. Headings may
name a paper without a locator, and so may the first markdown cell of a lesson and the
title and reference line of a guide page, where the page names its papers.

A paragraph that quotes a figure must have one of these sources:

1. **a paper citation** in the same paragraph, author and year followed by a locator:
   ``(Fedus et al. 2021, §2.2)``, ``Jordan & Jacobs 1994, Table 1``,
   ``(Shazeer et al. 2017, Appendix C.1)``, ``(Zhou et al. 2022, abstract)``. A table may take
   its citation from the paragraph just before it (the sentence that introduces it);
2. **a recorded run**, rendered rather than typed: a paragraph carrying one of the
   ``RENDERED`` markers (the records of ``tinymoe repro NAME --record``; extend the list when
   the rendering syntax is settled);
3. **the code beside it**: the figure is a numeric literal in a code cell next to the
   paragraph (within ``NEIGHBOURS`` cells) or in a code block of the same guide page, i.e. a
   setting the reader can see being used (``γ = 0.01``, ``capacity factor 1.25``).

Numbers from our own runs therefore never appear typed in prose: a cell prints them, or a
page renders them from a record. ``EXEMPT`` lists the (file, figure) pairs that are none of
these, each with its reason; keep it short.

``docs/reproductions.md`` is not scanned here: its figures are to be rendered from the
recorded runs (``tinymoe/app/records.py``) and checked against them by that page's own test.

Attributions are held to the same rule in one form that is easy to misuse: a bare
parenthetical citation without a locator, ``(Jiang et al. 2024)``, is allowed only in a
page's opening (see above); elsewhere it must say where in the paper.
"""
from __future__ import annotations

import io
import json
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted((ROOT / "lessons").glob("*.ipynb"))
GUIDE = sorted((ROOT / "docs" / "guide").glob("*.md"))

NEIGHBOURS = 2          # code cells this far before or after a markdown cell count as "beside"

# sources of kind 2: a figure rendered from tinymoe/data/records/*.json, not typed
RENDERED = [re.compile(r"\{record\}`"),           # a MyST role {record}`name:key`
            re.compile(r"<!--\s*record:"),         # a marker comment <!-- record: name -->
            re.compile(r"\{\{\s*record")]          # a MyST substitution {{ record... }}

# (file name, figure) -> why it needs no source
EXEMPT: dict[tuple[str, str], str] = {
    ("docs/guide/02_hierarchical_mixtures_1994.md", "1440"): "a report number (MIT AI Memo "
    "1440) in the page's reference line",
}

LOCATOR = (r"(?:§|eqs?\.|Eqs?\.|equations?|Tables?|Tab\.|Figs?\.|Figures?|Appendix|App\.|"
           r"Algorithm|abstract|footnote|[Ss]ections?|p\.)")
AUTHOR = (r"(?:[A-Z][A-Za-z\-]+(?:\s+et\s+al\.|\s+(?:&|and)\s+[A-Z][A-Za-z\-]+)?|DeepSeek-AI)")
YEAR = r"(?:19|20)\d\d[a-z]?"
CITATION = re.compile(AUTHOR + r"\s*\(?\s*" + YEAR + r"\)?\s*,?\s*\(?\s*" + LOCATOR)
BARE_CITATION = re.compile(r"\(" + AUTHOR + r",?\s+" + YEAR + r"\)")

FIGURE = re.compile(r"""(?<![\w.\-/#])(?:
      \d+(?:\.\d+)?\s?(?:%|\\%|(?:×|x)(?!\w|\s?\d))  # 36 %, 2x, 7× (not the "2 × 2" of a shape)
    | \d+(?:\.\d+)?\s?(?:k|B|T|M|GB|TB|MB)(?![\w])  # 60k, 46.7B, 14.3T, 16 GB
    | \d{1,3}(?:,\d{3})+                          # 5,500
    | \d+\.\d+                                    # 0.08
    | \d{4,}                                      # 1124 (years are removed first)
)(?![\w\-])""", re.X)

STRIP = [re.compile(p, re.S) for p in (
    r"```.*?```",                                  # fenced code
    r"\$\$.*?\$\$",                                # display math
    r"(?<!\\)\$(?![\d.,\s]+\\?%?\$)[^$\n]+?(?<!\\)\$",  # inline math (a bare "$0.5$" stays)
    r"`[^`\n]*`",                                  # inline code (and the body of MyST roles)
    r"<!--.*?-->",                                 # comments
    r"\]\([^)]*\)",                                # link targets
    r"https?://\S+", r"arXiv:?\s?\d{4}\.\d{4,5}(?:v\d+)?", r"#\d+",        # addresses, arXiv ids, issue/PR numbers
    LOCATOR + r"\s*[A-Z]?[\d.]+(?:\s*[–\-]\s*[\d.]+)?",   # "§2.2", "eqs. 2.14–2.16", "Table 6"
    r"\((?:\d+\.)+\d+\)",                          # an equation number "(2.8)"
    r"\b(?:19[5-9]\d|20[0-2]\d)[a-z]?\b",           # years
)]


def _prose(text: str) -> str:
    for pattern in STRIP:
        text = pattern.sub(" ", text)
    return text


def _blocks(text: str) -> list[str]:
    """Paragraphs: runs of lines separated by blank lines, fenced code kept whole."""
    blocks, current, fenced = [], [], False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
        if not line.strip() and not fenced:
            if current:
                blocks.append("\n".join(current))
            current = []
        else:
            current.append(line)
    if current:
        blocks.append("\n".join(current))
    return blocks


def _numbers_in_code(code: str) -> set[float]:
    """The numeric literals of a piece of Python (settings the reader sees being used)."""
    out: set[float] = set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type == tokenize.NUMBER:
                try:
                    out.add(float(tok.string.replace("_", "")))
                except ValueError:
                    pass
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return out


def _value(figure: str) -> float | None:
    m = re.match(r"[\d,]+(?:\.\d+)?", figure)
    try:
        return float(m.group(0).replace(",", "")) if m else None
    except ValueError:
        return None


def unsourced(blocks: list[str], code_numbers: set[float], name: str,
              opening: int = 0) -> list[str]:
    """The problems of one cell or page: ``blocks`` its paragraphs, ``code_numbers`` the
    numeric literals beside them, ``opening`` how many leading blocks open the page (and may
    name its papers without a locator)."""
    problems = []
    for b, block in enumerate(blocks):
        cited = bool(CITATION.search(block))
        if not cited and block.lstrip().startswith("|") and b > 0:
            cited = bool(CITATION.search(blocks[b - 1]))           # a table's introduction
        rendered = any(p.search(block) for p in RENDERED)
        if b >= opening:
            for m in BARE_CITATION.finditer("\n".join(
                    ln for ln in block.splitlines() if not ln.lstrip().startswith("#"))):
                problems.append(f"{name}: bare attribution {m.group(0)!r} (add a section, "
                                f"table or equation: '(Author YEAR, §x)')")
        if cited or rendered:
            continue
        for m in FIGURE.finditer(_prose(block)):
            fig = m.group(0).strip()
            value = _value(fig)
            if (name.split(":")[0], fig) in EXEMPT:
                continue
            if value is not None and not re.search(r"[%×xBTMG]", fig) \
                    and value in code_numbers:
                continue
            line = next((ln.strip() for ln in block.splitlines() if fig in ln), "")
            problems.append(f"{name}: unsourced figure {fig!r} in: {line[:110]}")
    return problems


def notebook_problems(path: Path) -> list[str]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    problems = []
    first_md = next((i for i, c in enumerate(cells) if c["cell_type"] == "markdown"), -1)
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "markdown":
            continue
        near: set[float] = set()
        for j in range(max(0, i - NEIGHBOURS), min(len(cells), i + NEIGHBOURS + 1)):
            if cells[j]["cell_type"] == "code":
                near |= _numbers_in_code("".join(cells[j]["source"]))
        blocks = _blocks("".join(cell["source"]))
        problems += unsourced(blocks, near, f"{path.name}: cell {i}",
                              opening=len(blocks) if i == first_md else 0)
    return problems


def page_problems(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    code = "\n".join(re.findall(r"```[^\n]*\n(.*?)```", text, re.S))
    numbers = set()
    for snippet in code.split("\n\n"):
        numbers |= _numbers_in_code(snippet)
    blocks = _blocks(text)
    # the page's title and its line of references form its opening
    opening = 2 if blocks and blocks[0].startswith("#") else 1
    return unsourced(blocks, numbers, path.relative_to(ROOT).as_posix(), opening=opening)


@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_lesson_figures_are_sourced(path):
    problems = notebook_problems(path)
    assert not problems, ("quoted figures without a source (cite the paper with a locator, "
                          "print it from a cell, or render it from a record):\n"
                          + "\n".join(problems))


@pytest.mark.parametrize("path", GUIDE, ids=[p.stem for p in GUIDE])
def test_guide_figures_are_sourced(path):
    problems = page_problems(path)
    assert not problems, ("quoted figures without a source (cite the paper with a locator, "
                          "or render it from a record):\n" + "\n".join(problems))


# ---- the rule has teeth --------------------------------------------------------------

def _check(text: str, code: str = "") -> list[str]:
    return unsourced(_blocks(text), _numbers_in_code(code), "example")


def test_an_unsourced_paper_figure_is_caught():
    assert _check("Switch reaches the same quality 7.5x sooner than T5-Base.")
    assert _check("The mixtures needed 1124 epochs, backprop 2209.")
    assert _check("Mixtral has 46.7B parameters.")
    assert _check("About 36% of the probability moves.")


def test_a_typed_number_from_our_own_run_is_caught():
    assert _check("In our run Switch ends 0.028 nats ahead of dense.")
    # ... the same number set in the cell beside it is a setting, not a result
    assert not _check("We train with a capacity factor of 1.25.", code="cf = 1.25")
    assert _check("Switch drops 1.25 of ... .", code="cf = 2.0")


def test_a_citation_with_a_locator_sources_the_paragraph():
    assert not _check("Switch reaches the same quality 7.5x sooner (Fedus et al. 2021, §3.1).")
    assert not _check("EM took 35 epochs and backprop 5,500 (Jordan & Jacobs 1994, Table 1).")
    assert not _check("Noise scale 0.5 (Shazeer et al.\n2017, Appendix A).")
    # the citation must sit in the same paragraph
    assert _check("Switch is 7.5x faster.\n\nFedus et al. 2021, §3.1 says so.")
    # a year alone is not a locator
    assert _check("Switch is 7.5x faster (Fedus et al. 2021).")


def test_a_table_takes_its_source_from_its_introduction():
    table = "| a | b |\n|---|---|\n| 39.8 | 3.04 |"
    assert not _check("The paper's rows (Shazeer et al. 2017, Table 6):\n\n" + table)
    assert _check("The paper's rows:\n\n" + table)


def test_a_bare_number_in_math_is_still_a_figure():
    assert _check("The mixtures need $1124$ epochs.")
    assert not _check("A $2 \\times 2$ tree with $k = 2$ and a 2 × 2 grid.")


def test_math_code_links_and_locators_are_not_figures():
    assert not _check("The bound is $\\sqrt{255} \\approx 16.0$ and `lr=0.001`.")
    assert not _check("See eqs. 2.14–2.16, §2.1.2, Table 11 and (2.8); issue #1234.")
    assert not _check("Read [the paper](https://arxiv.org/abs/2101.03961), arXiv:2401.04088.")
    assert not _check("Jacobs et al. (1991) and the 2017 layer; Mixtral 8x7B; MoE-256.")


def test_a_rendered_record_is_a_source():
    assert not _check("Switch ends {record}`switch:val_gap` nats ahead, 0.028 in the last run.")


def test_bare_attributions_need_a_locator():
    assert _check("Top-k routing needs a balancing loss (Jiang et al. 2024).")
    assert not _check("Top-k routing is dropless (Jiang et al. 2024, §2.1).")
