"""One-time export of the Peterson & Barney (1952) vowel table from Praat.

Not part of the package at run time, and nothing imports it. It needs
``praat-parselmouth`` (``pip install praat-parselmouth``), which tinymoe does
not depend on. Run from the repository root::

    python tinymoe/data/_export/export_vowels.py

It asks Praat (through parselmouth) for its built-in table
``Create formant table (Peterson & Barney 1952)`` and writes
``tinymoe/data/peterson_barney_1952.csv`` with lowercase column names, one row
per recorded vowel (1520 rows), in Praat's row order. The only derived column
is ``repetition`` (1 or 2): each speaker said each vowel twice, and Praat lists
the two takes one after the other. Then it prints the sha256 for PROVENANCE.md.
"""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import parselmouth
from parselmouth.praat import call

OUT = Path(__file__).resolve().parents[1] / "peterson_barney_1952.csv"

# Praat column -> our column. Frequencies are in Hz, as in Praat.
COLUMNS = {
    "Type": "speaker_type",  # m (man), w (woman), c (child)
    "Sex": "sex",  # m, f
    "Speaker": "speaker",  # 1..76
    "Vowel": "vowel",  # ARPAbet-like: iy ih eh ae ah aa ao uh uw er
    "IPA": "ipa_praat",  # Praat's backslash codes, e.g. \ic for the vowel of "hid"
    "F0": "f0",
    "F1": "f1",
    "F2": "f2",
    "F3": "f3",
}
OUT_COLUMNS = ["speaker_type", "sex", "speaker", "vowel", "ipa_praat", "repetition",
               "f0", "f1", "f2", "f3"]


def main() -> None:
    table = call("Create formant table (Peterson & Barney 1952)")
    n_rows = call(table, "Get number of rows")
    labels = [call(table, "Get column label", j)
              for j in range(1, call(table, "Get number of columns") + 1)]
    if labels != list(COLUMNS):
        raise SystemExit(f"export_vowels: Praat columns changed: {labels}")

    rows, seen = [], {}
    for i in range(1, n_rows + 1):
        row = {COLUMNS[c]: call(table, "Get value", i, c) for c in labels}
        key = (row["speaker"], row["vowel"])
        seen[key] = seen.get(key, 0) + 1
        row["repetition"] = str(seen[key])
        rows.append(row)

    with OUT.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=OUT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)

    digest = hashlib.sha256(OUT.read_bytes()).hexdigest()
    print(f"wrote {OUT} ({len(rows)} rows)")
    print(f"parselmouth {parselmouth.VERSION}, Praat {parselmouth.PRAAT_VERSION} "
          f"({parselmouth.PRAAT_VERSION_DATE})")
    print(f"sha256 {digest}")


if __name__ == "__main__":
    main()
