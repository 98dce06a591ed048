"""The UCI optical-recognition handwritten digits (8x8), and a jittered version.

The table ships as ``optdigits_8x8.csv.gz`` (exported once from scikit-learn, see
PROVENANCE.md): 1797 images of 8x8 pixels, each pixel a count 0..16 of "on" pixels in a
4x4 block of the original 32x32 bitmap (Alpaydin & Kaynak), with its class 0..9.

Eigen, Ranzato & Sutskever (2013, §4.1) train a deep mixture of experts on *jittered*
MNIST: each digit is placed at a random position in a larger canvas, so that the data
varies in **where** the digit is as well as **what** it is. We do the same with these
digits, a small real stand-in for MNIST: :func:`jittered_digits` puts each 8x8 image at a
random offset ``(row, col)`` in a ``canvas x canvas`` image (14 x 14 by default, so each
offset is one of 0..6), seeded, and records the offset.

``split``: a fixed, seeded shuffle of the 1797 images; "train" is the first 1347 and
"test" the last 450 (25 %), "all" every image in file order.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from importlib import resources

import numpy as np

FILE_NAME = "optdigits_8x8.csv.gz"
N_IMAGES = 1797
SIDE = 8  # the images are 8 x 8
MAX_PIXEL = 16  # each pixel counts the on-pixels of a 4 x 4 block: 0..16
N_TEST = 450
SPLIT_SEED = 0  # the fixed shuffle behind "train" / "test"
SPLITS = ("train", "test", "all")


@dataclass(frozen=True)
class Digits:
    """Images and classes.

    images: (n, side, side) float64 in [0, 1] (pixel counts divided by 16).
    y: (n,) int64 class 0..9.
    offset: (n, 2) int64 (row, col) of the digit's top-left pixel in the canvas
        (all zeros for the plain 8 x 8 images).
    """

    images: np.ndarray
    y: np.ndarray
    offset: np.ndarray

    @property
    def X(self) -> np.ndarray:
        """The images flattened row by row: (n, side * side)."""
        n = self.images.shape[0]
        return self.images.reshape(n, -1)

    def __len__(self) -> int:
        return len(self.y)


def load_optdigits() -> tuple[np.ndarray, np.ndarray]:
    """The whole file: pixels (1797, 8, 8) uint8 with values 0..16, labels (1797,) int64.

    In the file's order (scikit-learn's ``load_digits`` order). A fresh copy each call.
    """
    raw = resources.files(__package__).joinpath(FILE_NAME).read_bytes()
    lines = gzip.decompress(raw).decode("ascii").splitlines()
    table = np.array([[int(v) for v in line.split(",")] for line in lines[1:]],
                     dtype=np.int64)  # (1797, 65): label, then 64 pixels
    labels = table[:, 0]
    pixels = table[:, 1:].reshape(-1, SIDE, SIDE).astype(np.uint8)  # (1797, 8, 8)
    return pixels, labels


def _split_rows(split: str) -> np.ndarray:
    if split not in SPLITS:
        raise ValueError(f"digits: unknown split {split!r}; choose one of {SPLITS}")
    if split == "all":
        return np.arange(N_IMAGES)
    order = np.random.default_rng(SPLIT_SEED).permutation(N_IMAGES)
    return np.sort(order[:-N_TEST] if split == "train" else order[-N_TEST:])


def digits(split: str = "train") -> Digits:
    """The plain 8 x 8 digits of one split, pixels scaled to [0, 1]."""
    rows = _split_rows(split)
    pixels, labels = load_optdigits()
    images = pixels[rows].astype(np.float64) / MAX_PIXEL  # (n, 8, 8)
    return Digits(images=images, y=labels[rows],
                  offset=np.zeros((len(rows), 2), dtype=np.int64))


def jittered_digits(split: str = "train", canvas: int = 14, copies: int = 1,
                    seed: int = 0) -> Digits:
    """Each digit of ``split`` placed at a random offset in a ``canvas x canvas`` image.

    canvas: side of the larger image, at least 8; offsets are uniform on
        ``0..canvas-8`` in each direction (the paper's "jittered" digits, §4.1).
    copies: how many jittered copies of each digit (each at its own offset).
    seed: the offsets come from ``np.random.default_rng(seed)``; the same seed gives the
        same data.
    """
    canvas, copies = int(canvas), int(copies)
    if canvas < SIDE:
        raise ValueError(f"jittered_digits: canvas={canvas} is smaller than the {SIDE} x "
                         f"{SIDE} digits; use canvas >= {SIDE} (e.g. 14)")
    if copies < 1:
        raise ValueError(f"jittered_digits: copies={copies}; use at least 1")
    plain = digits(split)
    rng = np.random.default_rng(seed)
    n = len(plain) * copies
    base = np.tile(plain.images, (copies, 1, 1))  # (n, 8, 8)
    offset = rng.integers(0, canvas - SIDE + 1, size=(n, 2))  # (n, 2) row, col
    images = np.zeros((n, canvas, canvas))  # (n, canvas, canvas)
    for i, (r, c) in enumerate(offset):
        images[i, r:r + SIDE, c:c + SIDE] = base[i]
    return Digits(images=images, y=np.tile(plain.y, copies), offset=offset)
