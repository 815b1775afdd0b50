"""Tests of contrastive_jax.data.tokenizer (WordTokenizer and the shapes vocabulary)."""
import json
import re

import numpy as np
import pytest

from contrastive_jax.data import shapes
from contrastive_jax.data.tokenizer import (
    WordTokenizer,
    build_tokenizer,
    normalize_text,
    split_words,
)
from contrastive_jax.train.config import default_config

TEXTS = ["a small red triangle in the top left", "top left: a tiny red triangle",
         "There is a BIG blue circle, at the center."]


def _words(text):
    # Independent of the tokenizer's regex: pad punctuation with spaces, then whitespace-split.
    return re.sub(r"([,.:;!?])", r" \1 ", text.lower()).split()


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


def test_save_load_round_trip(tmp_path):
    tok = WordTokenizer.from_texts(TEXTS, max_len=12)
    path = tmp_path / "tok.json"
    tok.save(path)
    payload = json.loads(path.read_text())
    assert payload["max_len"] == 12 and payload["vocabulary"][:3] == ["<pad>", "<eos>", "<unk>"]
    loaded = WordTokenizer.load(path)
    assert loaded.vocabulary == tok.vocabulary and loaded.max_len == 12
    np.testing.assert_array_equal(loaded.encode(TEXTS), tok.encode(TEXTS))


def _shapes_config(**overrides):
    cfg = default_config().data
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def test_shapes_vocabulary_covers_every_template_and_prompt():
    tok = build_tokenizer(_shapes_config())
    assert tok.max_len == 16
    placeholder = re.compile(r"\{\w*\}")
    texts = [placeholder.sub(" ", t) for t in shapes.CAPTION_TEMPLATES]
    texts += [placeholder.sub(" ", t) for ts in shapes.ZERO_SHOT_TEMPLATES.values() for t in ts]
    texts += [n for names in shapes.ATTRIBUTES.values() for n in names]
    texts += [s for forms in shapes.SYNONYMS.values() for ss in forms.values() for s in ss]
    for text in texts:
        for w in _words(text):
            assert w in tok, f"{w!r} (from {text!r}) is not in the vocabulary"
    for attr in shapes.ATTRIBUTES:
        prompts = [p for per_class in shapes.zero_shot_prompts(attr) for p in per_class]
        assert len(prompts) >= 3 * len(shapes.ATTRIBUTES[attr])
        ids = tok.encode(prompts)
        assert not (ids == tok.unk_id).any()


def test_shapes_captions_encode_without_unk_or_truncation():
    tok = build_tokenizer(_shapes_config())
    rng = np.random.default_rng(0)
    captions = []
    for _ in range(300):
        labels = [int(rng.integers(len(shapes.ATTRIBUTES[a])))
                  for a in ("kind", "color", "size", "position")]
        captions.append(shapes.make_caption(rng, *labels)[0])
    ids = tok.encode(captions)
    assert not (ids == tok.unk_id).any()
    # Room for EOS: no caption is cut.
    np.testing.assert_array_equal(tok.eos_positions(ids), [len(_words(c)) for c in captions])
    assert tok.decode(ids) == [" ".join(_words(c)) for c in captions]


def test_shapes_vocabulary_does_not_depend_on_sampling():
    a = build_tokenizer(_shapes_config(dataset_seed=0, num_train=100))
    b = build_tokenizer(_shapes_config(dataset_seed=7, num_train=5000, max_text_len=16))
    assert a.vocabulary == b.vocabulary
    assert build_tokenizer(_shapes_config(max_text_len=9)).max_len == 9


def test_unknown_dataset_name_is_a_clear_error():
    with pytest.raises(ValueError, match="config.data.name"):
        build_tokenizer(_shapes_config(name="no_such_dataset"))
