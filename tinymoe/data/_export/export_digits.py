"""One-time export of the UCI optical-recognition 8x8 digits from scikit-learn.

Not part of the package at run time, and nothing imports it. It needs
``scikit-learn`` (``pip install scikit-learn``), which tinymoe does not depend
on. Run from the repository root::

    python tinymoe/data/_export/export_digits.py

scikit-learn ships the test part of the UCI "Optical Recognition of Handwritten
Digits" set (Alpaydin & Kaynak) as ``load_digits()``: 1797 images of 8x8 pixels,
each pixel an integer count 0..16. We write them, unchanged and in the same
order, as ``tinymoe/data/optdigits_8x8.csv.gz``: a header ``label,p0,...,p63``,
then one row per image (its class 0..9, then the 64 pixels row by row). The gzip
header carries no file name and mtime 0, so the same data always gives the same
bytes. Then it prints the sha256 for PROVENANCE.md.
"""
from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path

import numpy as np
import sklearn
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parents[1] / "optdigits_8x8.csv.gz"


def main() -> None:
    digits = load_digits()
    pixels = digits.data  # (1797, 64) float64 holding integers 0..16
    labels = digits.target  # (1797,)
    if pixels.shape != (1797, 64) or not np.array_equal(pixels, np.round(pixels)) \
            or pixels.min() < 0 or pixels.max() > 16:
        raise SystemExit(f"export_digits: unexpected data {pixels.shape}, "
                         f"range {pixels.min()}..{pixels.max()}")
    text = io.StringIO()
    text.write("label," + ",".join(f"p{i}" for i in range(64)) + "\n")
    for y, row in zip(labels, pixels.astype(np.int64)):
        text.write(f"{int(y)}," + ",".join(str(int(v)) for v in row) + "\n")
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
        f.write(text.getvalue().encode("ascii"))
    OUT.write_bytes(raw.getvalue())
    digest = hashlib.sha256(OUT.read_bytes()).hexdigest()
    counts = np.bincount(labels, minlength=10).tolist()
    print(f"wrote {OUT} ({len(labels)} images, per class {counts})")
    print(f"scikit-learn {sklearn.__version__}")
    print(f"sha256 {digest}")


if __name__ == "__main__":
    main()
