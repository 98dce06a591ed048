"""Write ``devils_dictionary.txt``: the first ~100 KB of the entries of Ambrose Bierce's
*The Devil's Dictionary* (1911, public domain), in Shakespeare's character set.

Source: the Debian package ``dict-devil`` 1.0-13.1 (``apt-get download dict-devil``, then
``dpkg-deb -x dict-devil_*.deb out``); its ``usr/share/dictd/devil.dict.dz`` is the Internet
Wiretap edition (1993) of the text, gzip-compressed. Usage::

    python export_devils_dictionary.py out/usr/share/dictd/devil.dict.dz

Steps: start at the first entry (ABASEMENT), drop the dict format's headers; italics
underscores, brackets and braces go; double quotes become single quotes; other characters
outside the Shakespeare file's (digits, '/', '$', '@', '=') go; right-aligned attributions
keep four spaces of indentation; cut at the first entry that starts after 100,000 characters.
"""
from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
LIMIT = 100_000


def main(src: str) -> None:
    text = gzip.decompress(Path(src).read_bytes()).decode("latin-1")
    text = text[text.index("ABASEMENT, n."):]
    allowed = set((HERE / "shakespeare.txt").read_text(encoding="ascii"))
    text = text.replace('"', "'")
    text = re.sub(r"[_\[\]{}()]", "", text)
    text = "".join(c for c in text if c in allowed)
    text = re.sub(r"(?m)^ {12,}(\S)", r"    \1", text)  # right-aligned attributions
    text = re.sub(r"(?m)[ ]+$", "", text)
    cut = re.compile(r"\n\n(?=[A-Z][A-Z' -]+, )").search(text, LIMIT)
    text = text[: cut.start() if cut else len(text)].strip() + "\n"
    (HERE / "devils_dictionary.txt").write_text(text, encoding="ascii")
    print(f"{len(text):,} characters, {len(set(text))} distinct")


if __name__ == "__main__":
    main(sys.argv[1])
