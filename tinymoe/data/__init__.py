"""Small real data sets shipped inside tinymoe; nothing downloads at run time.

- ``vowels`` / ``load_peterson_barney``: Peterson & Barney (1952) vowel
  formants, the data of Jacobs et al. (1991).
- ``digits`` / ``jittered_digits``: the UCI optical-recognition 8x8 handwritten
  digits (Alpaydin & Kaynak), plain or placed at random offsets in a larger canvas.
- ``shakespeare`` / ``CharTokenizer`` / ``train_val_split`` / ``get_batch``:
  about 1 MB of Shakespeare for character-level language models;
  ``devils_dictionary``: 100 KB of Bierce (1911) to fine-tune them on.

Where each file came from: ``PROVENANCE.md`` in this folder.
"""
from .digits import Digits, digits, jittered_digits, load_optdigits
from .synthetic import two_moons
from .text import CharTokenizer, devils_dictionary, get_batch, shakespeare, train_val_split
from .vowels import (
    PAPER_VOWELS,
    TEST_SPEAKERS,
    TRAIN_SPEAKERS,
    VowelData,
    load_peterson_barney,
    vowel_label,
    vowels,
)

__all__ = [
    "two_moons",
    "Digits",
    "digits",
    "jittered_digits",
    "load_optdigits",
    "PAPER_VOWELS",
    "TEST_SPEAKERS",
    "TRAIN_SPEAKERS",
    "CharTokenizer",
    "devils_dictionary",
    "VowelData",
    "get_batch",
    "load_peterson_barney",
    "shakespeare",
    "train_val_split",
    "vowel_label",
    "vowels",
]
