"""Tokenizers: text -> fixed-length int32 id sequences ending in EOS.

:class:`Tokenizer` is the interface every text tower and evaluator relies on. Implementations:

* :class:`WordTokenizer` -- closed word vocabulary (the built-in ``shapes`` dataset, and user
  datasets converted by ``contrastive-jax data convert``, which store their caption words);
* :class:`SentencePieceTokenizer` -- a SentencePiece ``.model`` (Kudo & Richardson 2018), trained
  with :func:`train_sentencepiece` / ``contrastive-jax data train-tokenizer`` or loaded from disk;
* :class:`ClipBpeTokenizer` -- CLIP's byte-level BPE (Radford et al. 2021; the byte-level BPE of
  Sennrich et al. 2016 as used by GPT-2), from a local merges file; never downloaded. Its ids are
  open_clip's (tested against open_clip's tokenizer on a corpus of 10,000+ strings) when ``ftfy``
  and ``regex`` are installed; its BPE can also run in the ``tokenizers`` package (same ids).

Sequence layout, for every implementation: ``[BOS?, t_1, ..., t_k, EOS, PAD, ..., PAD]`` of length
``max_len`` (int32). Only :class:`ClipBpeTokenizer` has a BOS (``<|startoftext|>``), as in CLIP.
Texts longer than fit are truncated to their first tokens, keeping room for EOS. Word and
SentencePiece tokenizers use ``PAD = 0``, ``EOS = 1`` and ``2`` for unknown/masked tokens; CLIP BPE
keeps CLIP's own ids (``PAD = 0``, EOS = ``<|endoftext|>``), so its ids match OpenAI checkpoints.
A causal text tower pools at :meth:`Tokenizer.eos_positions`.

Text rules (:class:`TextRules`: lowercasing, cleaning, EOS) are part of each tokenizer and are
saved with it (:meth:`Tokenizer.save`, :func:`load_tokenizer`), so a run's ``tokenizer.json``
reproduces training's tokenization exactly.
"""
from __future__ import annotations

import abc
import base64
import dataclasses
import functools
import gzip
import html
import io
import json
import os
import re
import sys
import unicodedata
import warnings
from typing import Any, Iterable, Sequence

import numpy as np

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"

# A token is a run of letters/digits (apostrophes kept inside words) or one punctuation mark, so
# 'top left: a' -> ['top', 'left', ':', 'a'].
_TOKEN_RE = re.compile(r"[\w']+|[^\w\s]")
_WHITESPACE_RE = re.compile(r"\s+")
CLEAN_MODES = ("none", "whitespace", "basic", "clip")


@functools.lru_cache(maxsize=None)
def _ftfy_fix_text():
    """``ftfy.fix_text``, or None (with one warning) when ftfy is not installed."""
    try:
        import ftfy
    except ImportError:
        warnings.warn("tokenizer.clean='clip' without the 'ftfy' package: text is only NFC-normalized, not "
                      "repaired as open_clip does (mojibake such as 'cafÃ©', curly quotes, full-width forms, "
                      "ligatures, control characters), so ids can differ from open_clip's for such text: "
                      "pip install 'ftfy>=6.1'", stacklevel=3)
        return None
    return ftfy.fix_text


def clip_clean(text: str) -> str:
    """open_clip's text cleaning before lowercasing (``basic_clean`` then ``whitespace_clean``):
    ``ftfy.fix_text`` (mojibake, HTML entities when no markup, curly quotes, full-width forms, NFC),
    HTML entities unescaped twice, whitespace runs -> one space, stripped. Without ftfy the first
    step is only Unicode NFC."""
    fix = _ftfy_fix_text()
    text = fix(text) if fix is not None else unicodedata.normalize("NFC", text)
    return " ".join(html.unescape(html.unescape(text)).split())


def split_words(text: str) -> list[str]:
    """Lowercases ``text`` and splits it into words and single punctuation marks."""
    return _TOKEN_RE.findall(text.lower())


def normalize_text(text: str) -> str:
    """The form :meth:`WordTokenizer.decode` returns for in-vocabulary text: tokens joined by ' '."""
    return " ".join(split_words(text))


@dataclasses.dataclass(frozen=True)
class TextRules:
    """How raw text is prepared before tokenization, and whether EOS is appended.

    Attributes:
      lowercase: lowercase the text first.
      clean: ``'none'``; ``'whitespace'`` (runs of whitespace -> one space, stripped);
        ``'basic'`` (HTML entities unescaped, Unicode NFC, then as ``'whitespace'``);
        ``'clip'`` (open_clip's cleaning, :func:`clip_clean`: ``ftfy`` when installed, HTML
        entities, whitespace -- what CLIP BPE needs for open_clip's exact ids).
      add_eos: append EOS after the tokens (truncation keeps room for it).
    """

    lowercase: bool = True
    clean: str = "whitespace"
    add_eos: bool = True

    def __post_init__(self):
        if self.clean not in CLEAN_MODES:
            raise ValueError(f"tokenizer.clean must be one of {CLEAN_MODES}, got {self.clean!r}")

    def apply(self, text: str) -> str:
        if self.clean == "clip":
            text = clip_clean(text)
            return text.lower() if self.lowercase else text
        if self.clean == "basic":
            # Twice: captions scraped from the web are often double-escaped ('&amp;amp;').
            text = unicodedata.normalize("NFC", html.unescape(html.unescape(text)))
        if self.clean in ("whitespace", "basic"):
            text = _WHITESPACE_RE.sub(" ", text).strip()
        return text.lower() if self.lowercase else text

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "TextRules":
        return cls(**(d or {}))

    @classmethod
    def from_config(cls, tokenizer_config) -> "TextRules":
        """From ``config.data.tokenizer`` (``lowercase``, ``clean``, ``add_eos``)."""
        return cls(lowercase=bool(tokenizer_config.lowercase), clean=str(tokenizer_config.clean),
                   add_eos=bool(tokenizer_config.add_eos))


class Tokenizer(abc.ABC):
    """Interface: ``encode`` texts to int32 ``[N, max_len]``, ``decode`` back, special ids."""

    rules: TextRules = TextRules()

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

    @property
    def bos_id(self) -> int | None:
        """Id put before the tokens, or None."""
        return None

    @property
    def mask_id(self) -> int:
        """Id that token masking (``config.data.text_mask_prob``) substitutes."""
        return self.pad_id

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """One text -> its token ids (rules applied; no BOS/EOS/padding, no truncation)."""

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts -> their token ids (as :meth:`tokenize`; implementations may batch)."""
        return [self.tokenize(t) for t in texts]

    @abc.abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Token ids (no specials) -> text."""

    @abc.abstractmethod
    def save(self, path: str | os.PathLike) -> None:
        """Writes everything needed to rebuild this tokenizer as one JSON file."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> int32 ``[N, max_len]``: BOS?, tokens, EOS?, then ``pad_id`` up to ``max_len``."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text in a list")
        out = np.full((len(texts), self.max_len), self.pad_id, np.int32)
        head = [] if self.bos_id is None else [self.bos_id]
        room = self.max_len - len(head) - (1 if self.rules.add_eos else 0)
        for row, tokens in enumerate(self.tokenize_batch(texts)):
            ids = head + list(tokens[:room])
            if self.rules.add_eos:
                ids.append(self.eos_id)
            out[row, : len(ids)] = ids
        return out

    def decode(self, ids: np.ndarray) -> list[str]:
        """int ``[N, L]`` (or ``[L]``) -> N strings; stops at EOS, drops BOS and padding after it."""
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None]
        texts = []
        for row in ids.tolist():
            if self.bos_id is not None and row and row[0] == self.bos_id:
                row = row[1:]
            if self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            else:  # no EOS: trailing padding is layout, not text
                while row and row[-1] == self.pad_id:
                    row.pop()
            texts.append(self.detokenize(row))
        return texts

    def eos_positions(self, ids: np.ndarray) -> np.ndarray:
        """Index of the first EOS in each row of int ``[N, L]`` -> int32 ``[N]``.

        Rows without EOS (not produced by :meth:`encode`) get the last index, ``L - 1``.
        """
        ids = np.asarray(ids)
        is_eos = ids == self.eos_id
        pos = np.argmax(is_eos, axis=-1)
        return np.where(is_eos.any(axis=-1), pos, ids.shape[-1] - 1).astype(np.int32)

    @abc.abstractmethod
    def replace(self, *, max_len: int | None = None, rules: TextRules | None = None) -> "Tokenizer":
        """The same vocabulary with another ``max_len`` / rules."""

    def _check_max_len(self, max_len: int) -> int:
        need = 1 + (self.bos_id is not None) + (1 if self.rules.add_eos else 0)
        if max_len < need:
            raise ValueError(f"max_len must be >= {need} (one token plus BOS/EOS), got {max_len}")
        return int(max_len)

    def _write(self, path, payload: dict) -> None:
        payload = {**payload, "max_len": self.max_len, "rules": self.rules.to_dict()}
        with open(path, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=0)


# ----------------------------------------------------------------------------------------------
# Word level
# ----------------------------------------------------------------------------------------------


class WordTokenizer(Tokenizer):
    """Word-level tokenizer with a closed vocabulary; unknown words map to ``unk_id``.

    Ids: ``pad = 0``, ``eos = 1``, ``unk = 2``, then the vocabulary words in sorted order, so the
    same word list always gives the same ids. Words are runs of letters/digits/apostrophes or
    single punctuation marks, after :class:`TextRules` (lowercasing by default).
    """

    def __init__(self, words: Iterable[str], max_len: int, rules: TextRules = TextRules()):
        self.rules = rules
        specials = (PAD, EOS, UNK)
        words = sorted(set(words) - set(specials))
        for w in words:
            if self._split(w) != [w]:
                raise ValueError(f"vocabulary entry {w!r} is not a single normalized token")
        self._id_to_word = list(specials) + words
        self._word_to_id = {w: i for i, w in enumerate(self._id_to_word)}
        self._max_len = self._check_max_len(max_len)

    def _split(self, text: str) -> list[str]:
        return _TOKEN_RE.findall(self.rules.apply(text))

    @classmethod
    def from_texts(cls, texts: Iterable[str], max_len: int, rules: TextRules = TextRules()) -> "WordTokenizer":
        """Vocabulary = every token occurring in ``texts`` (after ``rules``)."""
        probe = cls((), max_len, rules)
        return cls({w for t in texts for w in probe._split(t)}, max_len, rules)

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
    def mask_id(self) -> int:
        return self.unk_id

    @property
    def vocabulary(self) -> list[str]:
        """All tokens, indexed by id (specials first)."""
        return list(self._id_to_word)

    def __contains__(self, word: str) -> bool:
        return word in self._word_to_id and word not in (PAD, EOS, UNK)

    def tokenize(self, text: str) -> list[int]:
        return [self._word_to_id.get(w, self.unk_id) for w in self._split(text)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(self._id_to_word[i] for i in ids if i != self.pad_id)

    def replace(self, *, max_len=None, rules=None) -> "WordTokenizer":
        return WordTokenizer(self._id_to_word[3:], self.max_len if max_len is None else max_len,
                             self.rules if rules is None else rules)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the vocabulary, ``max_len`` and rules as JSON."""
        self._write(path, {"type": "word", "vocabulary": self._id_to_word})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WordTokenizer":
        tok = load_tokenizer(path)
        if not isinstance(tok, WordTokenizer):
            raise ValueError(f"{path} is not a WordTokenizer file ({type(tok).__name__})")
        return tok

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size}, max_len={self.max_len})"


# ----------------------------------------------------------------------------------------------
# SentencePiece
# ----------------------------------------------------------------------------------------------

_SP_OFFSET = 3  # our ids 0, 1, 2 are PAD, EOS, UNK/MASK; SentencePiece piece p is id p + 3


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("SentencePiece tokenizers need the 'sentencepiece' package: "
                          "pip install 'sentencepiece>=0.2.0'") from e
    return sentencepiece


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model behind the :class:`Tokenizer` layout.

    Any ``.model`` file works, whatever its own special ids: piece ``p`` becomes id ``p + 3`` and
    ids 0/1/2 are PAD/EOS/MASK, so ``vocab_size = pieces + 3``.

    Args:
      model_proto: the serialized model (the bytes of a ``.model`` file).
    """

    def __init__(self, model_proto: bytes, max_len: int, rules: TextRules = TextRules()):
        self.rules = rules
        self._proto = bytes(model_proto)
        self._sp = _sentencepiece().SentencePieceProcessor(model_proto=self._proto)
        self._max_len = self._check_max_len(max_len)

    @classmethod
    def from_file(cls, path, max_len: int, rules: TextRules = TextRules()) -> "SentencePieceTokenizer":
        with open(path, "rb") as f:
            return cls(f.read(), max_len, rules)

    def __getstate__(self):  # the C++ processor does not pickle (grain worker processes)
        return {"proto": self._proto, "max_len": self._max_len, "rules": self.rules}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["max_len"], state["rules"])

    @property
    def model_proto(self) -> bytes:
        return self._proto

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size() + _SP_OFFSET

    @property
    def max_len(self) -> int:
        return self._max_len

    @property
    def eos_id(self) -> int:
        return 1

    @property
    def mask_id(self) -> int:
        return 2

    def tokenize(self, text: str) -> list[int]:
        return [p + _SP_OFFSET for p in self._sp.encode(self.rules.apply(text))]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([i - _SP_OFFSET for i in ids if i >= _SP_OFFSET])

    def replace(self, *, max_len=None, rules=None) -> "SentencePieceTokenizer":
        return SentencePieceTokenizer(self._proto, self.max_len if max_len is None else max_len,
                                      self.rules if rules is None else rules)

    def save(self, path: str | os.PathLike) -> None:
        self._write(path, {"type": "sentencepiece",
                           "model_proto": base64.b64encode(self._proto).decode("ascii")})

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size}, max_len={self.max_len})"


def train_sentencepiece(
    texts: Iterable[str],
    *,
    vocab_size: int,
    rules: TextRules = TextRules(),
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    seed_sentencepiece_size: int = 1_000_000,
) -> bytes:
    """Trains a SentencePiece model on ``texts`` (after ``rules``); returns the ``.model`` bytes.

    ``vocab_size`` is a target: on a corpus too small to support it, the model is smaller
    (``hard_vocab_limit=False``). Training is single-threaded and deterministic for given texts.
    """
    spm = _sentencepiece()
    prepared = [t for t in (rules.apply(str(t)) for t in texts) if t]
    if not prepared:
        raise ValueError("train_sentencepiece: no non-empty texts to train on")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(prepared),
        model_writer=buf,
        vocab_size=int(vocab_size),
        model_type=model_type,
        character_coverage=float(character_coverage),
        hard_vocab_limit=False,
        # Our own layout supplies PAD/EOS; SentencePiece keeps only <unk>.
        bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0,
        num_threads=1,
        seed_sentencepiece_size=int(seed_sentencepiece_size),
        minloglevel=2,
    )
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# CLIP byte-level BPE
# ----------------------------------------------------------------------------------------------

_SOT, _EOT = "<|startoftext|>", "<|endoftext|>"
# Strings that open_clip's tokenizer recognizes inside a text and maps to the BOS / EOS ids instead
# of spelling them out (its special tokens' names; OpenAI's `clip` package uses the vocabulary's
# '<|startoftext|>' / '<|endoftext|>' instead). Matched first at each position, case-insensitively.
CLIP_TEXT_SPECIALS = ("<start_of_text>", "<end_of_text>")
# Pre-tokenization of CLIP (OpenAI and open_clip): common English clitics, runs of letters, single
# numerals, runs of anything else that is not whitespace. Unicode classes need the `regex` package;
# without it they are spelled out from `unicodedata` (see _unicode_class).
_CLIP_PRETOKENIZE = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
BPE_BACKENDS = ("python", "tokenizers")


@functools.lru_cache(maxsize=None)
def _unicode_class(prefix: str) -> str:
    """The body of an ``re`` character class holding every code point whose Unicode general
    category starts with ``prefix`` (``'L'`` letters, ``'N'`` numbers), as ``unicodedata`` (this
    Python's Unicode version) knows them. Built once, in about a second."""
    ranges: list[list[int]] = []
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp)).startswith(prefix):
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
    return "".join(re.escape(chr(a)) + (f"-{re.escape(chr(b))}" if b > a else "") for a, b in ranges)


@functools.lru_cache(maxsize=None)
def clip_pretokenizer():
    """The compiled pre-tokenization pattern of open_clip's tokenizer (specials first), with the
    ``regex`` package when installed (as open_clip), else an ``re`` pattern with the same classes
    spelled out from ``unicodedata`` (identical up to code points the two Unicode versions classify
    differently)."""
    specials = "|".join(re.escape(s) for s in CLIP_TEXT_SPECIALS)
    try:
        import regex
    except ImportError:
        letters, numbers = _unicode_class("L"), _unicode_class("N")
        body = (_CLIP_PRETOKENIZE.replace(r"[^\s\p{L}\p{N}]", f"[^\\s{letters}{numbers}]")
                .replace(r"[\p{L}]", f"[{letters}]").replace(r"[\p{N}]", f"[{numbers}]"))
        return re.compile(specials + "|" + body, re.IGNORECASE)
    return regex.compile(specials + "|" + _CLIP_PRETOKENIZE, regex.IGNORECASE)


def byte_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character table of byte-level BPE.

    Bytes that are printable Latin-1 characters (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) map to
    themselves; the other 68 bytes map, in increasing order, to ``chr(256)``, ``chr(257)``, ...
    so no byte becomes whitespace or a control character.

    The dict's order is the vocabulary order of CLIP's byte symbols: the 188 printable bytes
    first, then the 68 others (so ``!`` is id 0 and ``a</w>`` is id 256 + 64 = 320).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def _is_header(line: str) -> bool:
    # OpenAI's file begins '"bpe_simple_vocab_16e6.txt#version: 0.2' (a quote and the file name
    # first); GPT-2-style files begin '#version: 0.2'. Neither is a merge.
    return line.startswith("#") or "#version" in line


def read_bpe_merges(path: str | os.PathLike, num_merges: int = -1) -> list[tuple[str, str]]:
    """Reads a merges file (``.txt`` or ``.gz``): an optional header line, then ``a b`` per line.

    The first line is a header, not a merge, when it starts with ``#`` or contains ``#version``
    (CLIP's ``bpe_simple_vocab_16e6.txt.gz``). ``num_merges`` keeps the first N merges: CLIP's
    checkpoints use 48,894 (open_clip reads lines 1..48,894 of that file), so its ids are
    ``[256 bytes, 256 bytes + '</w>', 48,894 merges, BOS, EOS]`` = 49,408.

    Raises:
      FileNotFoundError / ValueError naming the file and the bad line.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config.data.tokenizer.path: BPE merges file not found: {path}")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges: list[tuple[str, str]] = []
    for lineno, line in enumerate(lines, 1):
        if 0 <= num_merges <= len(merges):
            break
        if not line.strip() or (lineno == 1 and _is_header(line)):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected two symbols separated by a space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _tokenizers_bpe(token_to_id: dict[str, int], merges: list[tuple[str, str]]):
    """The same BPE in the ``tokenizers`` package (Rust): CLIP's pre-tokenization regex (Oniguruma,
    case-insensitive), the byte -> symbol table (``ByteLevel`` without its own regex; GPT-2's table
    is CLIP's), then BPE with ``'</w>'`` marking a word's last symbol. Text cleaning stays ours."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers

    tok = RustTokenizer(models.BPE(vocab=dict(token_to_id), merges=list(merges), continuing_subword_prefix="",
                                   end_of_word_suffix="</w>", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("(?i)" + _CLIP_PRETOKENIZE), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return tok


class ClipBpeTokenizer(Tokenizer):
    """CLIP's byte-level BPE with CLIP's vocabulary layout and ids (equal to open_clip's tokenizer).

    Ids: the 256 byte symbols (in :func:`byte_to_unicode`'s order), the same 256 with ``</w>``
    (end of word), one id per merge in file order, then ``<|startoftext|>`` (BOS) and
    ``<|endoftext|>`` (EOS). Padding is id 0, as in CLIP, although id 0 is also the byte ``!``:
    models converted from CLIP pool at the EOS id (``model.text.eos_id``), not at the last
    non-zero token. A word is split into byte symbols (its last one marked ``</w>``) and the
    adjacent pair whose merge comes first in the file is joined, repeatedly, until no listed pair
    remains.

    Text is prepared as open_clip does with the default rules (``clean='clip'``: ``ftfy``, HTML
    entities, whitespace, lowercase; see :class:`TextRules`); open_clip's special-token names
    inside a text (:data:`CLIP_TEXT_SPECIALS`) become the BOS / EOS ids, as there. Exactness with
    open_clip needs the ``ftfy`` and ``regex`` packages (the ``[clip]`` extra); without them,
    cleaning skips ftfy's repairs and the Unicode classes come from this Python's ``unicodedata``.

    Args:
      merges: the merge list, highest priority first (:func:`read_bpe_merges`).
      backend: ``'python'`` (the BPE written here, with a per-word cache) or ``'tokenizers'`` (the
        Rust BPE of the ``tokenizers`` package, built from the same merges). Both give open_clip's
        ids (tested on the same corpus); the Python one is the default because it measured faster
        (``tools/bench_data.py --tokenizers``: text cleaning dominates, a cached word is one dict
        lookup, while each ``tokenizers`` call pays for its regex and Encoding objects). Not saved:
        a choice of this process.
    """

    def __init__(self, merges: Sequence[tuple[str, str]], max_len: int,
                 rules: TextRules = TextRules(clean="clip"), *, backend: str = "python"):
        if backend not in BPE_BACKENDS:
            raise ValueError(f"ClipBpeTokenizer backend={backend!r}; known: {', '.join(BPE_BACKENDS)}")
        self.rules = rules
        self.backend = backend
        self._merges = [tuple(m) for m in merges]
        self._byte_sym = byte_to_unicode()
        self._sym_byte = {s: b for b, s in self._byte_sym.items()}
        syms = list(self._byte_sym.values())  # CLIP's order (see byte_to_unicode)
        vocab = syms + [s + "</w>" for s in syms] + [a + b for a, b in self._merges] + [_SOT, _EOT]
        self._id_to_token = vocab
        # A merge may produce a token listed before; the later id wins, as in CLIP's
        # dict(zip(vocab, ids)) (the first 48,894 merges of CLIP's file produce no such token).
        self._token_to_id = {t: i for i, t in enumerate(vocab)}
        self._rank = {m: i for i, m in enumerate(self._merges)}
        self._special_ids = dict(zip(CLIP_TEXT_SPECIALS, (len(vocab) - 2, len(vocab) - 1)))
        self._cache: dict[str, list[int]] = {}
        self._rust = None  # built on first use
        self._max_len = self._check_max_len(max_len)

    @classmethod
    def from_file(cls, path, max_len: int, rules: TextRules = TextRules(clean="clip"),
                  num_merges: int = -1, *, backend: str = "python") -> "ClipBpeTokenizer":
        return cls(read_bpe_merges(path, num_merges), max_len, rules, backend=backend)

    def __getstate__(self):  # the Rust tokenizer is rebuilt in each process (grain workers)
        return {**self.__dict__, "_rust": None, "_cache": {}}

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    @property
    def max_len(self) -> int:
        return self._max_len

    @property
    def bos_id(self) -> int:
        return len(self._id_to_token) - 2

    @property
    def eos_id(self) -> int:
        return len(self._id_to_token) - 1

    def _rust_tokenizer(self):
        if self.backend == "python":
            return None
        if self._rust is None:
            try:
                self._rust = _tokenizers_bpe(self._token_to_id, self._merges)
            except ImportError:
                raise ImportError("ClipBpeTokenizer(backend='tokenizers') needs the 'tokenizers' package: "
                                  "pip install 'tokenizers>=0.19'") from None
        return self._rust

    def bpe(self, word: str) -> list[str]:
        """One pre-token (already byte-mapped) -> its BPE symbols."""
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            ranked = [(self._rank.get((a, b)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            ranked = [(r, i) for r, i in ranked if r is not None]
            if not ranked:
                break
            best = self._merges[min(ranked)[0]]
            merged, i = [], 0
            while i < len(parts):  # join every occurrence of the best pair, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _tokenize_clean(self, text: str) -> list[int]:
        """Already-cleaned text -> ids, with the BPE written here."""
        ids: list[int] = []
        for word in clip_pretokenizer().findall(text):
            special = self._special_ids.get(word.lower())
            if special is not None:
                ids.append(special)
                continue
            cached = self._cache.get(word)
            if cached is None:
                mapped = "".join(self._byte_sym[b] for b in word.encode("utf-8"))
                cached = [self._token_to_id[s] for s in self.bpe(mapped)]
                if len(self._cache) < 100_000:
                    self._cache[word] = cached
            ids.extend(cached)
        return ids

    def tokenize(self, text: str) -> list[int]:
        return self.tokenize_batch([text])[0]

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Texts -> their token ids (rules applied; no BOS/EOS, no truncation), with the chosen
        backend. Texts naming a special token (:data:`CLIP_TEXT_SPECIALS`) take the Python
        path, which maps them to BOS / EOS as open_clip does."""
        cleaned = [self.rules.apply(t) for t in texts]
        rust = self._rust_tokenizer()
        if rust is None:
            return [self._tokenize_clean(t) for t in cleaned]
        out: list[list[int] | None] = [None] * len(cleaned)
        plain = []
        for i, t in enumerate(cleaned):
            if "<" in t and any(s in t.lower() for s in CLIP_TEXT_SPECIALS):
                out[i] = self._tokenize_clean(t)
            else:
                plain.append(i)
        for i, enc in zip(plain, rust.encode_batch([cleaned[i] for i in plain], add_special_tokens=False)):
            out[i] = enc.ids
        return out  # type: ignore[return-value]

    def detokenize(self, ids: Sequence[int]) -> str:
        text = "".join(self._id_to_token[i] for i in ids if i < self.bos_id)
        data = bytearray()
        for piece in text.split("</w>"):
            data.extend(self._sym_byte[c] for c in piece)
            data.extend(b" ")
        return data.decode("utf-8", errors="replace").strip()

    def replace(self, *, max_len=None, rules=None) -> "ClipBpeTokenizer":
        return ClipBpeTokenizer(self._merges, self.max_len if max_len is None else max_len,
                                self.rules if rules is None else rules, backend=self.backend)

    def save(self, path: str | os.PathLike) -> None:
        self._write(path, {"type": "clip_bpe", "merges": [" ".join(m) for m in self._merges]})

    def __repr__(self) -> str:
        return f"ClipBpeTokenizer(vocab_size={self.vocab_size}, max_len={self.max_len})"


# ----------------------------------------------------------------------------------------------
# Loading and building
# ----------------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Rebuilds any tokenizer written by :meth:`Tokenizer.save` (e.g. ``WORKDIR/tokenizer.json``)."""
    try:
        with open(path, encoding="utf-8") as f:
            payload: dict[str, Any] = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read tokenizer file {path}: {e}") from e
    kind = payload.get("type")
    rules = TextRules.from_dict(payload.get("rules"))
    max_len = payload.get("max_len")
    if kind == "word":
        vocab = payload["vocabulary"]
        tok = WordTokenizer(vocab[3:], max_len, rules)
        if tok._id_to_word != vocab:
            raise ValueError(f"{path}: vocabulary is not in canonical order (specials, sorted)")
        return tok
    if kind == "sentencepiece":
        return SentencePieceTokenizer(base64.b64decode(payload["model_proto"]), max_len, rules)
    if kind == "clip_bpe":
        return ClipBpeTokenizer([tuple(m.split(" ")) for m in payload["merges"]], max_len, rules)
    if kind in ("hf_tokenizers", "hf_sentencepiece"):  # issue 16 (helper B): Hugging Face folders' tokenizers
        from contrastive_jax.data.hf_tokenizer import load_saved

        return load_saved(payload, max_len, rules)
    raise ValueError(f"{path}: unknown tokenizer type {kind!r} (known: word, sentencepiece, clip_bpe, "
                     "hf_tokenizers, hf_sentencepiece)")


TOKENIZER_KINDS = ("auto", "word", "sentencepiece", "clip_bpe")


def build_tokenizer(data_config) -> Tokenizer:
    """The tokenizer for ``config.data``: ``tokenizer.kind/path``, its rules and ``max_text_len``.

    ``kind='auto'`` / ``'word'`` without a path use the dataset's word vocabulary (for ``shapes``
    its fixed word list -- templates, class names -- never sampled examples, so it is identical on
    every host and run). A path to a saved tokenizer ``.json`` keeps its vocabulary; the config's
    ``max_text_len`` and rules apply in every case.
    """
    from contrastive_jax.data import registry  # registry imports this module
    from contrastive_jax.data.config import complete

    data_config = complete(data_config)
    tc = data_config.tokenizer
    kind, path = str(tc.kind), os.path.expanduser(str(tc.path))
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"config.data.tokenizer.kind={kind!r}; known: {', '.join(TOKENIZER_KINDS)}")
    rules = TextRules.from_config(tc)
    max_len = int(data_config.max_text_len)
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config.data.tokenizer.path: no such file: {path}")
        if path.endswith(".json"):
            return load_tokenizer(path).replace(max_len=max_len, rules=rules)
        if kind == "sentencepiece":
            return SentencePieceTokenizer.from_file(path, max_len, rules)
        if kind == "clip_bpe":
            return ClipBpeTokenizer.from_file(path, max_len, rules, num_merges=int(tc.bpe_merges))
        raise ValueError(f"config.data.tokenizer.path={path!r} with kind={kind!r}: a word "
                         "tokenizer path must be a saved tokenizer .json")
    if kind in ("sentencepiece", "clip_bpe"):
        raise ValueError(f"config.data.tokenizer.kind={kind!r} needs config.data.tokenizer.path")
    entry = registry.resolve_dataset(data_config)
    if entry.vocabulary_texts is None:
        raise ValueError(
            f"dataset {data_config.name!r} has no word vocabulary; set config.data.tokenizer.kind="
            "'sentencepiece' (train one with `contrastive-jax data train-tokenizer`) or 'clip_bpe', "
            "and config.data.tokenizer.path")
    return WordTokenizer.from_texts(entry.vocabulary_texts(data_config), max_len=max_len, rules=rules)
