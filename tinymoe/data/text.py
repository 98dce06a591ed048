"""Shakespeare as characters: the shipped text, a char tokenizer, batches.

``shakespeare.txt`` (about 0.99 MB, ASCII, 63 distinct characters) holds the
speeches of eight public-domain plays in ``NAME:`` / lines / blank-line
blocks; PROVENANCE.md says where it came from and what was stripped.
"""
from __future__ import annotations

from collections.abc import Iterable
from importlib import resources

import numpy as np

TEXT_NAME = "shakespeare.txt"


def devils_dictionary() -> str:
    """The first ~100 KB of Bierce's *The Devil's Dictionary* (1911, public domain), in
    Shakespeare's characters: a small, different text for fine-tuning (PROVENANCE.md)."""
    return resources.files(__package__).joinpath("devils_dictionary.txt").read_text(
        encoding="ascii")


def shakespeare() -> str:
    """The shipped Shakespeare text (about 1 MB) as one string."""
    return resources.files(__package__).joinpath(TEXT_NAME).read_text(encoding="ascii")


class CharTokenizer:
    """Characters <-> integer ids; the vocabulary is the sorted set of characters.

    ``CharTokenizer(text)`` (or ``CharTokenizer.fit(text)``) takes every distinct
    character of ``text``; id ``i`` is the i-th character in code-point order.
    """

    def __init__(self, text: Iterable[str]) -> None:
        self.chars = "".join(sorted(set(text)))
        if not self.chars:
            raise ValueError("CharTokenizer: the text is empty; fit on a text with "
                             "at least one character")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        codes = np.frombuffer(self.chars.encode("utf-32-le"), dtype=np.uint32)
        self._lookup = np.full(int(codes.max()) + 1, -1, dtype=np.int64)
        self._lookup[codes] = np.arange(len(codes))  # code point -> id, or -1

    @classmethod
    def fit(cls, text: str) -> CharTokenizer:
        """Same as ``CharTokenizer(text)``."""
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """(len(text),) int64 ids. A character not in the vocabulary is a ValueError."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # (n,)
        known = codes < len(self._lookup)
        ids = np.full(len(codes), -1, dtype=np.int64)
        ids[known] = self._lookup[codes[known]]
        if (ids < 0).any():
            pos = int(np.argmax(ids < 0))
            raise ValueError(f"CharTokenizer.encode: character {text[pos]!r} at index "
                             f"{pos} is not in the vocabulary of {self.vocab_size}; "
                             "fit the tokenizer on a text that contains it")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The string for a 1-D sequence of ids in ``[0, vocab_size)``."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"CharTokenizer.decode: ids must be a 1-D integer sequence, "
                             f"got shape {ids.shape} dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise ValueError(f"CharTokenizer.decode: id {int(ids[bad][0])} is outside "
                             f"[0, {self.vocab_size}) for this vocabulary")
        return "".join(self.chars[i] for i in ids.tolist())

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def train_val_split(ids: np.ndarray, val_fraction: float = 0.1
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous split: the first ``1 - val_fraction`` for training, the rest for
    validation (no shuffling, so no text leaks across the boundary except at it).

    ``n_train = int(len(ids) * (1 - val_fraction))``. Returns views of ``ids``.
    """
    ids = np.asarray(ids)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"train_val_split: val_fraction={val_fraction!r} must be "
                         "strictly between 0 and 1, e.g. 0.1")
    n_train = int(len(ids) * (1.0 - val_fraction))
    return ids[:n_train], ids[n_train:]


def get_batch(ids: np.ndarray, batch_size: int, block_size: int,
              rng: np.random.Generator | int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Random windows for next-character prediction.

    Picks ``batch_size`` start positions ``s`` uniformly in
    ``[0, len(ids) - block_size)`` with ``rng`` (a Generator, or a seed);
    ``x[b] = ids[s : s + block_size]`` and ``y[b] = ids[s + 1 : s + block_size + 1]``,
    so ``y`` is ``x`` shifted left by one. Both are (batch_size, block_size) int64.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"get_batch: ids must be 1-D, got shape {ids.shape}")
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"get_batch: batch_size={batch_size} and block_size="
                         f"{block_size} must both be >= 1")
    if len(ids) < block_size + 1:
        raise ValueError(f"get_batch: {len(ids)} ids are too few for block_size="
                         f"{block_size}; need at least block_size + 1 = "
                         f"{block_size + 1} (use a shorter block or more text)")
    rng = np.random.default_rng(rng)
    starts = rng.integers(0, len(ids) - block_size, size=batch_size)  # (B,)
    index = starts[:, None] + np.arange(block_size)  # (B, block)
    return ids[index].astype(np.int64), ids[index + 1].astype(np.int64)
