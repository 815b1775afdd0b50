"""Tokenizers: text -> fixed-length int32 id sequences ending in EOS.

:class:`Tokenizer` is the interface every text tower and evaluator relies on; :class:`WordTokenizer`
is the word-level implementation used by the built-in ``shapes`` dataset (SentencePiece / CLIP BPE
can be added behind the same interface).

Sequence layout, for every implementation: ``[w_1, ..., w_k, EOS, PAD, ..., PAD]`` with
``k <= max_len - 1`` (longer texts are truncated to their first ``max_len - 1`` tokens) and
``PAD = 0``. A causal text tower pools at :meth:`Tokenizer.eos_positions`.
"""
from __future__ import annotations

import abc
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"

# A token is a run of letters/digits (apostrophes kept inside words) or one punctuation mark, so
# 'top left: a' -> ['top', 'left', ':', 'a'].
_TOKEN_RE = re.compile(r"[\w']+|[^\w\s]")


def split_words(text: str) -> list[str]:
    """Lowercases ``text`` and splits it into words and single punctuation marks."""
    return _TOKEN_RE.findall(text.lower())


def normalize_text(text: str) -> str:
    """The form :meth:`WordTokenizer.decode` returns for in-vocabulary text: tokens joined by ' '."""
    return " ".join(split_words(text))


class Tokenizer(abc.ABC):
    """Interface: ``encode`` texts to int32 ``[N, max_len]``, ``decode`` back, special ids."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids (embedding table rows), special tokens included."""

    @property
    @abc.abstractmethod
    def max_len(self) -> int:
        """Sequence length of :meth:`encode`, EOS included."""

    @property
    def pad_id(self) -> int:
        return 0

    @property
    @abc.abstractmethod
    def eos_id(self) -> int:
        ...

    @abc.abstractmethod
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> int32 ``[N, max_len]``: tokens, EOS, then ``pad_id`` up to ``max_len``."""

    @abc.abstractmethod
    def decode(self, ids: np.ndarray) -> list[str]:
        """int ``[N, L]`` (or ``[L]``) -> N strings; stops at EOS, skips padding."""

    def eos_positions(self, ids: np.ndarray) -> np.ndarray:
        """Index of the first EOS in each row of int ``[N, L]`` -> int32 ``[N]``.

        Rows without EOS (not produced by :meth:`encode`) get the last index, ``L - 1``.
        """
        ids = np.asarray(ids)
        is_eos = ids == self.eos_id
        pos = np.argmax(is_eos, axis=-1)
        return np.where(is_eos.any(axis=-1), pos, ids.shape[-1] - 1).astype(np.int32)


class WordTokenizer(Tokenizer):
    """Word-level tokenizer with a closed vocabulary; unknown words map to ``unk_id``.

    Ids: ``pad = 0``, ``eos = 1``, ``unk = 2``, then the vocabulary words in sorted order, so the
    same word list always gives the same ids.
    """

    def __init__(self, words: Iterable[str], max_len: int):
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (one token plus EOS), got {max_len}")
        specials = (PAD, EOS, UNK)
        words = sorted(set(words) - set(specials))
        for w in words:
            if split_words(w) != [w]:
                raise ValueError(f"vocabulary entry {w!r} is not a single normalized token")
        self._id_to_word = list(specials) + words
        self._word_to_id = {w: i for i, w in enumerate(self._id_to_word)}
        self._max_len = int(max_len)

    @classmethod
    def from_texts(cls, texts: Iterable[str], max_len: int) -> "WordTokenizer":
        """Vocabulary = every token occurring in ``texts``."""
        return cls({w for t in texts for w in split_words(t)}, max_len)

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_word)

    @property
    def max_len(self) -> int:
        return self._max_len

    @property
    def eos_id(self) -> int:
        return 1

    @property
    def unk_id(self) -> int:
        return 2

    @property
    def vocabulary(self) -> list[str]:
        """All tokens, indexed by id (specials first)."""
        return list(self._id_to_word)

    def __contains__(self, word: str) -> bool:
        return word in self._word_to_id and word not in (PAD, EOS, UNK)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text in a list")
        out = np.full((len(texts), self._max_len), self.pad_id, np.int32)
        for row, text in enumerate(texts):
            ids = [self._word_to_id.get(w, self.unk_id)
                   for w in split_words(text)[: self._max_len - 1]]
            out[row, : len(ids)] = ids
            out[row, len(ids)] = self.eos_id
        return out

    def decode(self, ids: np.ndarray) -> list[str]:
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None]
        texts = []
        for row in ids:
            words = []
            for i in row.tolist():
                if i == self.eos_id:
                    break
                if i != self.pad_id:
                    words.append(self._id_to_word[i])
            texts.append(" ".join(words))
        return texts

    def save(self, path: str | os.PathLike) -> None:
        """Writes the vocabulary and ``max_len`` as JSON."""
        payload = {"type": "word", "max_len": self._max_len, "vocabulary": self._id_to_word}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=0)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WordTokenizer":
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        if payload.get("type") != "word":
            raise ValueError(f"{path} is not a WordTokenizer file (type={payload.get('type')!r})")
        vocab = payload["vocabulary"]
        tok = cls(vocab[3:], payload["max_len"])
        if tok._id_to_word != vocab:
            raise ValueError(f"{path}: vocabulary is not in canonical order (specials, sorted)")
        return tok

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size}, max_len={self.max_len})"


def build_tokenizer(data_config) -> Tokenizer:
    """The tokenizer for ``config.data`` (dataset ``data_config.name``, ``max_text_len``).

    For word-level datasets the vocabulary comes from the dataset's fixed word list (templates,
    class names), never from sampled examples, so it is identical on every host and run.
    """
    from contrastive_jax.data import registry  # registry imports this module

    entry = registry.get_dataset(data_config.name)
    return WordTokenizer.from_texts(entry.vocabulary_texts(data_config),
                                    max_len=data_config.max_text_len)
