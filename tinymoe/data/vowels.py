"""Peterson & Barney (1952) vowel formants, as used by Jacobs et al. (1991).

The table ships as ``peterson_barney_1952.csv`` (exported once from Praat, see
PROVENANCE.md): 76 speakers (33 men = ids 1-33, 28 women = 34-61, 15 children
= 62-76) each said 10 vowels in an h_d word twice, so 1520 rows with F0 and
the first three formants F1, F2, F3 in Hz.

Jacobs, Jordan, Nowlan & Hinton (1991, §3) classify the four vowels of
*heed*, *hid*, *hod*, *hud* from (F1, F2) divided by 1000, training on "the
first 50 speakers" and testing on "the remaining 25". Their copy had 75
speakers; this one has 76. We keep their rule in table order and give the
extra speaker to the test set:

- ``train``: speakers 1-50 (all 33 men and the first 17 women),
- ``test``: speakers 51-76 (the other 11 women and all 15 children).

So for the default four vowels, train has 50 x 4 x 2 = 400 rows and test
26 x 4 x 2 = 208. The two sets differ in speaker type, as the paper's did.
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

import numpy as np

CSV_NAME = "peterson_barney_1952.csv"
N_ROWS = 1520
TRAIN_SPEAKERS = tuple(range(1, 51))  # the first 50 speakers
TEST_SPEAKERS = tuple(range(51, 77))  # the remaining 26
SPLITS = ("train", "test", "all")

# Praat's vowel labels, in table order, with the h_d word each comes from.
WORDS = {"iy": "heed", "ih": "hid", "eh": "head", "ae": "had", "ah": "hud",
         "aa": "hod", "ao": "hawed", "uh": "hood", "uw": "who'd", "er": "heard"}
PAPER_VOWELS = ("iy", "ih", "aa", "ah")  # Jacobs et al.: [i], [I], [a], [Λ]

# Other spellings people use for the same vowels -> Praat label.
ALIASES = {word: label for label, word in WORDS.items()}
ALIASES.update({"whod": "uw",
                # IPA (Unicode)
                "i": "iy", "ɪ": "ih", "ɛ": "eh", "æ": "ae", "ʌ": "ah",
                "ɑ": "aa", "ɔ": "ao", "ʊ": "uh", "u": "uw", "ɝ": "er",
                # the paper's spellings ([I], [a], [Λ]) and X-SAMPA V for ʌ
                "I": "ih", "a": "aa", "Λ": "ah", "V": "ah",
                # Praat's IPA codes, as in the table's ipa_praat column
                "\\ic": "ih", "\\ef": "eh", "\\ae": "ae", "\\vt": "ah", "\\as": "aa",
                "\\ct": "ao", "\\hs": "uh", "\\er\\hr": "er"})

_INT_COLUMNS = ("speaker", "repetition", "f0", "f1", "f2", "f3")


@dataclass(frozen=True)
class VowelData:
    """Inputs and classes for the vowel experiment.

    X: (n, 2) float64, columns F1 and F2 in Hz divided by ``scale``.
    y: (n,) int64 class index; ``labels[y]`` is the Praat vowel label.
    labels: the Praat label of each class, in class order.
    speaker: (n,) int64 speaker id (1-76) of each row.
    """

    X: np.ndarray
    y: np.ndarray
    labels: tuple[str, ...]
    speaker: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def load_peterson_barney() -> dict[str, np.ndarray]:
    """The whole table (1520 rows) as a dict of column name -> 1-D array.

    Columns: ``speaker_type`` (m/w/c), ``sex`` (m/f), ``vowel`` (Praat label),
    ``ipa_praat`` (Praat's IPA code) as str arrays; ``speaker`` (1-76),
    ``repetition`` (1 or 2), ``f0``, ``f1``, ``f2``, ``f3`` (Hz) as int64.
    Rows are in Praat's order: by speaker, then vowel, then repetition.
    A fresh copy each call, so changing it is safe.
    """
    text = resources.files(__package__).joinpath(CSV_NAME).read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    table = {}
    for name in rows[0]:
        values = [r[name] for r in rows]
        table[name] = np.array(values, dtype=np.int64 if name in _INT_COLUMNS else str)
    return table


def vowel_label(name: str) -> str:
    """The Praat label ("iy", "ih", ...) for a Praat label, word, IPA or alias.

    Case matters for one-letter phonetic symbols ("i" is heed, "I" is hid);
    Praat labels and words match in any case ("Heed", "IY").
    """
    if name in WORDS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    low = name.lower() if isinstance(name, str) else name
    if low in WORDS:
        return low
    if low in ALIASES and len(low) > 1:
        return ALIASES[low]
    raise ValueError(
        f"vowels: unknown vowel {name!r}; use a Praat label {tuple(WORDS)}, "
        f"an h_d word {tuple(WORDS.values())}, or an IPA symbol such as 'ɪ'")


def vowels(split: str = "train", vowels: Sequence[str] = PAPER_VOWELS,
           scale: float = 1000.0) -> VowelData:
    """The Jacobs et al. (1991) vowel task: (F1, F2) / scale -> vowel class.

    split: "train" (speakers 1-50), "test" (speakers 51-76) or "all".
    vowels: the classes, in order; class ``j`` is ``vowels[j]``. Default: the
        paper's heed, hid, hod, hud = Praat "iy", "ih", "aa", "ah". Any
        spelling ``vowel_label`` knows is accepted.
    scale: divide the formants (Hz) by this; the paper uses 1000.
    Rows keep the table's order (by speaker, vowel, repetition).
    """
    if split not in SPLITS:
        raise ValueError(f"vowels: unknown split {split!r}; choose one of {SPLITS}")
    if isinstance(vowels, str):
        raise TypeError(f"vowels: vowels={vowels!r} is one string; pass a sequence "
                        f"of labels, e.g. ({vowels!r},)")
    labels = tuple(vowel_label(v) for v in vowels)
    if not labels:
        raise ValueError("vowels: vowels=() is empty; pass at least one vowel label")
    if len(set(labels)) != len(labels):
        raise ValueError(f"vowels: vowels={tuple(vowels)!r} names the same vowel "
                         f"twice (as {labels}); give each vowel once")
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"vowels: scale={scale!r} must be a positive number, "
                         "e.g. 1000.0")

    table = load_peterson_barney()
    keep = np.isin(table["vowel"], labels)  # (1520,)
    if split != "all":
        speakers = TRAIN_SPEAKERS if split == "train" else TEST_SPEAKERS
        keep &= np.isin(table["speaker"], speakers)
    X = np.stack([table["f1"][keep], table["f2"][keep]], axis=1) / float(scale)  # (n, 2)
    index = {label: j for j, label in enumerate(labels)}
    y = np.array([index[v] for v in table["vowel"][keep]], dtype=np.int64)  # (n,)
    return VowelData(X=X.astype(np.float64), y=y, labels=labels,
                     speaker=table["speaker"][keep])
