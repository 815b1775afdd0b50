"""contrastive_jax.data.tokenizer: the word, SentencePiece and CLIP byte-level BPE tokenizers, text
rules, save/load round trips and building a tokenizer from config.data.

(The shapes dataset's word vocabulary is tested with the dataset, in tests/data/test_shapes.py.)"""
import json
import pickle
import re

import numpy as np
import pytest

from contrastive_jax.data.tokenizer import (
    ClipBpeTokenizer,
    SentencePieceTokenizer,
    TextRules,
    WordTokenizer,
    build_tokenizer,
    byte_to_unicode,
    load_tokenizer,
    normalize_text,
    split_words,
    train_sentencepiece,
)
from contrastive_jax.train.config import default_config

TEXTS = ["a small red triangle in the top left", "top left: a tiny red triangle",
         "There is a BIG blue circle, at the center."]

CORPUS = [f"a {c} {k} on the {p} side" for c in ("red", "green", "blue", "yellow")
          for k in ("circle", "square", "triangle", "star") for p in ("left", "right", "top")]

# Outside ASCII: byte-level BPE must round-trip it.
UNICODE_TEXT = "héllo wörld 日本"

# A tiny merges file written by hand. Words are byte symbols, the last marked '</w>'; merges apply
# in file order of priority.
MERGES = ["#version: 0.2", "l o", "lo w</w>", "e r</w>", "n e", "ne w", "lo w", "low er</w>"]


def _words(text):
    # Independent of the tokenizer's regex: pad punctuation with spaces, then whitespace-split.
    return re.sub(r"([,.:;!?])", r" \1 ", text.lower()).split()


@pytest.fixture(scope="module")
def sp_proto():
    return train_sentencepiece(CORPUS, vocab_size=40, rules=TextRules())


# ---------------------------------------------------------------------------------------------
# Word tokenizer
# ---------------------------------------------------------------------------------------------


def test_split_words_lowercases_and_splits_punctuation():
    assert split_words("Top Left: a red, BIG star.") == [
        "top", "left", ":", "a", "red", ",", "big", "star", "."]
    for t in TEXTS:
        assert split_words(t) == _words(t)


def test_special_ids_and_sorted_vocabulary():
    tok = WordTokenizer.from_texts(TEXTS, max_len=8)
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    words = sorted({w for t in TEXTS for w in _words(t)})
    assert tok.vocabulary == ["<pad>", "<eos>", "<unk>"] + words
    assert tok.vocab_size == 3 + len(words)
    # Order of the input texts must not matter.
    assert WordTokenizer.from_texts(TEXTS[::-1], max_len=8).vocabulary == tok.vocabulary


def test_round_trip_in_vocabulary():
    tok = WordTokenizer.from_texts(TEXTS, max_len=16)
    ids = tok.encode(TEXTS)
    assert ids.dtype == np.int32 and ids.shape == (len(TEXTS), 16)
    assert tok.decode(ids) == [" ".join(_words(t)) for t in TEXTS]
    assert tok.decode(ids) == [normalize_text(t) for t in TEXTS]
    assert tok.decode(ids[0]) == [normalize_text(TEXTS[0])]  # 1-D input


def test_eos_then_padding_layout():
    tok = WordTokenizer.from_texts(TEXTS, max_len=16)
    ids = tok.encode(TEXTS + [""])
    for row, text in zip(ids, TEXTS + [""]):
        n = len(_words(text))
        assert (row[:n] > 2).all()  # real words, no specials
        assert row[n] == tok.eos_id
        assert (row[n + 1:] == tok.pad_id).all()
        assert (row == tok.eos_id).sum() == 1
    np.testing.assert_array_equal(tok.eos_positions(ids), [len(_words(t)) for t in TEXTS] + [0])
    assert tok.eos_positions(ids).dtype == np.int32


def test_truncation_keeps_eos():
    tok = WordTokenizer.from_texts(TEXTS, max_len=5)
    long_text = "there is a big blue circle at the center"
    ids = tok.encode([long_text])[0]
    assert ids.shape == (5,)
    assert tok.decode(ids[None]) == [" ".join(long_text.split()[:4])]
    assert ids[4] == tok.eos_id
    assert tok.eos_positions(ids[None])[0] == 4


def test_unknown_words_map_to_unk():
    tok = WordTokenizer.from_texts(TEXTS, max_len=8)
    ids = tok.encode(["a purple giraffe ; red"])[0]
    assert list(ids[:5]) == [tok.vocabulary.index("a"), tok.unk_id, tok.unk_id, tok.unk_id,
                             tok.vocabulary.index("red")]
    assert ids[5] == tok.eos_id
    assert tok.decode(ids[None]) == ["a <unk> <unk> <unk> red"]


def test_encode_rejects_a_bare_string():
    tok = WordTokenizer.from_texts(TEXTS, max_len=8)
    with pytest.raises(TypeError):
        tok.encode("a red star")


# ---------------------------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------------------------


def test_sentencepiece_round_trip_layout_and_truncation(sp_proto):
    tok = SentencePieceTokenizer(sp_proto, max_len=24)
    assert (tok.pad_id, tok.eos_id, tok.mask_id) == (0, 1, 2)
    texts = ["A  Red Star on the LEFT side", "a blue circle"]
    ids = tok.encode(texts)
    assert ids.shape == (2, 24) and ids.dtype == np.int32
    # Lower-cased and whitespace-cleaned text comes back.
    assert tok.decode(ids) == ["a red star on the left side", "a blue circle"]
    for row in ids:
        e = int(tok.eos_positions(row[None])[0])
        assert (row[:e] >= 3).all() and (row[e + 1:] == 0).all() and row[e] == 1
    short = SentencePieceTokenizer(sp_proto, max_len=4).encode(texts)
    np.testing.assert_array_equal(short[:, :3], ids[:, :3])  # the first tokens, then EOS
    assert (short[:, 3] == 1).all()
    assert tok.vocab_size == tok._sp.get_piece_size() + 3 <= 43


def test_sentencepiece_model_file_from_config(sp_proto, tmp_path):
    tok = SentencePieceTokenizer(sp_proto, max_len=12, rules=TextRules(clean="basic"))
    (tmp_path / "m.model").write_bytes(sp_proto)
    cfg = default_config().data
    cfg.tokenizer.update(kind="sentencepiece", path=str(tmp_path / "m.model"))
    cfg.max_text_len = 12
    built = build_tokenizer(cfg)
    np.testing.assert_array_equal(built.encode(CORPUS[:5]), tok.encode(CORPUS[:5]))


# ---------------------------------------------------------------------------------------------
# CLIP byte-level BPE
# ---------------------------------------------------------------------------------------------


def test_bpe_merges_by_hand(tmp_path):
    path = tmp_path / "merges.txt"
    path.write_text("\n".join(MERGES) + "\n")
    tok = ClipBpeTokenizer.from_file(path, max_len=10)
    # By hand, always joining the present pair listed first:
    # 'lower': l o w e r</w> -> lo w e r</w> -> lo w er</w> -> low er</w> -> lower</w>
    # 'low':   l o w</w> -> lo w</w> -> low</w>
    # 'newer': n e w e r</w> -> n e w er</w> -> ne w er</w> -> new er</w> (no 'new er</w>' merge)
    assert tok.bpe("lower") == ["lower</w>"]
    assert tok.bpe("low") == ["low</w>"]
    assert tok.bpe("newer") == ["new", "er</w>"]
    assert tok.bpe("x") == ["x</w>"]
    assert tok.vocab_size == 512 + 7 + 2
    merged_id = {m.replace(" ", ""): 512 + i for i, m in enumerate(MERGES[1:])}
    ids = tok.encode(["Lower low newer"])[0]
    assert ids[0] == tok.bos_id == 519 and tok.eos_id == 520
    assert list(ids[1:6]) == [merged_id["lower</w>"], merged_id["low</w>"], merged_id["new"],
                              merged_id["er</w>"], 520]
    assert (ids[6:] == 0).all()
    assert tok.decode(ids[None]) == ["lower low newer"]


def test_bpe_bytes_cover_any_text():
    table = byte_to_unicode()
    assert len(set(table.values())) == 256 and all(not c.isspace() for c in table.values())
    tok = ClipBpeTokenizer([("h", "é")], max_len=32)
    ids = tok.encode([UNICODE_TEXT])
    assert tok.decode(ids) == [UNICODE_TEXT]  # bytes never fall out of the vocabulary
    # Truncation keeps BOS and EOS.
    tiny = ClipBpeTokenizer([], max_len=4).encode(["abcdef"])[0]
    assert tiny[0] == 512 and tiny[3] == 513 and len(tiny) == 4


def test_bpe_byte_ids_follow_clip_vocabulary_order():
    # CLIP's vocabulary lists the 188 printable bytes first ('!' = 33 is id 0), then the other 68;
    # then the same 256 with '</w>'. So a lone 'a' (byte 97, printable index 97 - 33 = 64) is
    # 'a</w>' = 256 + 64 = 320, the id OpenAI's tokenizer gives the word "a"; '!' inside a word
    # is id 0 -- the same value as padding.
    # clean='none' (issue 16, helper A): the default 'clip' cleaning (ftfy, as open_clip) drops DEL.
    tok = ClipBpeTokenizer([], max_len=8, rules=TextRules(clean="none"))
    assert tok.tokenize("a") == [320]
    assert tok.tokenize("!?") == [0, 256 + ord("?") - 33]
    # DEL (byte 127) is the 34th non-printable byte (after 0..32): 256 + 188 + 33.
    assert tok.tokenize("\x7f") == [256 + 188 + 33]
    assert list(byte_to_unicode())[:3] == [33, 34, 35]


# ---------------------------------------------------------------------------------------------
# All kinds: text rules, the run's tokenizer file, config errors
# ---------------------------------------------------------------------------------------------


def test_rules_lowercase_clean_and_eos():
    assert TextRules(clean="basic").apply("  Tom &amp;amp; Jerry\t\n") == "tom & jerry"
    assert TextRules(lowercase=False, clean="none").apply(" A  b") == " A  b"
    cased = WordTokenizer(["Red", "red"], max_len=4, rules=TextRules(lowercase=False))
    assert cased.decode(cased.encode(["Red red"])) == ["Red red"]
    no_eos = WordTokenizer(["a", "b"], max_len=3, rules=TextRules(add_eos=False))
    np.testing.assert_array_equal(no_eos.encode(["a b a b"]), [[3, 4, 3]])
    with pytest.raises(ValueError, match="tokenizer.clean"):
        TextRules(clean="ftfy")


def test_every_kind_round_trips_through_the_run_file(tmp_path, sp_proto):
    word = WordTokenizer.from_texts(TEXTS, max_len=12)
    sp = SentencePieceTokenizer(sp_proto, max_len=12, rules=TextRules(clean="basic"))
    toks = [word, WordTokenizer.from_texts(CORPUS, 9, TextRules(lowercase=False)),
            sp, SentencePieceTokenizer(sp_proto, 9),
            ClipBpeTokenizer([("h", "é")], max_len=32), ClipBpeTokenizer([("r", "e")], 9)]
    for tok in toks:
        tok.save(tmp_path / "tokenizer.json")
        loaded = load_tokenizer(tmp_path / "tokenizer.json")
        assert type(loaded) is type(tok) and loaded.rules == tok.rules
        assert loaded.max_len == tok.max_len
        for texts in (CORPUS, TEXTS, [UNICODE_TEXT, "x y"]):
            np.testing.assert_array_equal(loaded.encode(texts), tok.encode(texts))
    # The word tokenizer's file format, and its own loader.
    word.save(tmp_path / "tok.json")
    payload = json.loads((tmp_path / "tok.json").read_text())
    assert payload["max_len"] == 12 and payload["vocabulary"][:3] == ["<pad>", "<eos>", "<unk>"]
    loaded = WordTokenizer.load(tmp_path / "tok.json")
    assert loaded.vocabulary == word.vocabulary and loaded.max_len == 12
    np.testing.assert_array_equal(loaded.encode(TEXTS), word.encode(TEXTS))
    # SentencePiece pickles (grain worker processes) with its rules, although its processor does not.
    other = pickle.loads(pickle.dumps(sp))
    assert other.rules == sp.rules and other.max_len == 12
    np.testing.assert_array_equal(other.encode(CORPUS[:5]), sp.encode(CORPUS[:5]))


def test_config_errors_name_the_field(tmp_path):
    cfg = default_config().data
    cfg.tokenizer.kind = "clip_bpe"
    with pytest.raises(ValueError, match="tokenizer.path"):
        build_tokenizer(cfg)
    cfg.tokenizer.path = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="tokenizer.path"):
        build_tokenizer(cfg)
    (tmp_path / "bad.txt").write_text("#version: 0.2\na b c\n")
    cfg.tokenizer.path = str(tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="bad.txt:2"):
        build_tokenizer(cfg)
