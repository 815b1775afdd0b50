"""Tokenizers of Hugging Face model folders, with the ids ``transformers`` gives.

* :class:`HfTokenizersTokenizer` -- a ``tokenizer.json`` run by the ``tokenizers`` package (the
  library behind every ``transformers`` "fast" tokenizer): CLIP's byte-level BPE, SigLIP 2's
  Gemma BPE. The same encode call ``transformers`` makes for
  ``tokenizer(texts, padding='max_length', truncation=True, max_length=L)``.
* :class:`SiglipSentencePieceTokenizer` -- SigLIP's ``spiece.model`` with the text handling of
  ``transformers.SiglipTokenizer``: split on the special tokens, lowercase, remove ASCII
  punctuation, collapse whitespace, then SentencePiece; ``</s>`` appended; padded with ``</s>``.

Both keep the folder's own ids (no offset), so they feed a converted checkpoint directly, and
read only local files. :func:`hf_folder_tokenizer` picks the one a folder holds. They are saved
(:meth:`save`) as one JSON file that :func:`contrastive_jax.data.tokenizer.load_tokenizer` reads
back; the original ``tokenizer_config.json`` travels inside it so that an export can write it again.

Text rules: the Hugging Face tokenizers normalize text themselves, so the rules default to none
(``TextRules(lowercase=False, clean='none')``); other rules are applied before theirs.
"""
from __future__ import annotations

import base64
import json
import os
import re
import string
from typing import Any, Sequence

import numpy as np

from contrastive_jax.data.tokenizer import TextRules, Tokenizer

# No cleaning of our own: the Hugging Face pipelines normalize text themselves.
HF_RULES = TextRules(lowercase=False, clean="none", add_eos=True)
# ``padding_side`` of tokenizer classes whose default is not 'right' (transformers 5.x class attributes);
# a tokenizer_config.json that names its padding_side wins.
_LEFT_PADDING_CLASSES = ("GemmaTokenizer", "GemmaTokenizerFast", "Siglip2Tokenizer")
_SPIECE_UNDERLINE = "\u2581"
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _token_text(value: Any) -> str | None:
    """A special token entry of tokenizer_config.json (a string or an AddedToken dict) -> its text."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def read_tokenizer_config(folder: str) -> dict:
    """``tokenizer_config.json`` of ``folder`` merged over ``special_tokens_map.json`` ({} if neither)."""
    out: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                out.update(json.load(fh))
    return out


class _StoredIds:
    """``max_len`` / ``pad_id`` / ``eos_id`` of a tokenizer that keeps them as ``_max_len`` /
    ``_pad`` / ``_eos`` (both Hugging Face tokenizers below)."""

    @property
    def max_len(self) -> int:
        return self._max_len

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def eos_id(self) -> int:
        return self._eos


class HfTokenizersTokenizer(_StoredIds, Tokenizer):
    """A ``tokenizer.json`` (``tokenizers`` package) behind the :class:`Tokenizer` layout.

    ``encode`` gives int32 ``[N, max_len]``: the file's own pipeline (normalizer, pre-tokenizer,
    BPE, post-processor adding BOS/EOS), truncated to ``max_len`` (the post-processor's specials
    kept), padded with ``pad_id`` on ``padding_side``.

    Args:
      tokenizer_json: the file's text.
      pad_id / eos_id / bos_id: special ids (``bos_id`` None when the post-processor adds none).
      padding_side / truncation_side: ``'right'`` | ``'left'``.
      hf_config: the folder's tokenizer_config.json (kept for export).
    """

    def __init__(self, tokenizer_json: str, max_len: int, *, pad_id: int, eos_id: int, bos_id: int | None = None,
                 padding_side: str = "right", truncation_side: str = "right", rules: TextRules = HF_RULES,
                 hf_config: dict | None = None):
        from tokenizers import Tokenizer as RustTokenizer

        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")
        self.rules = rules
        self._json = tokenizer_json
        self._pad, self._eos, self._bos = int(pad_id), int(eos_id), None if bos_id is None else int(bos_id)
        self.padding_side, self.truncation_side = padding_side, truncation_side
        self.hf_config = dict(hf_config or {})
        # CLIP's BPE marks word ends with '</w>', which its decoder leaves in (transformers' CLIPTokenizer
        # replaces it with a space after decoding; so does detokenize).
        self._end_of_word = json.loads(tokenizer_json).get("model", {}).get("end_of_word_suffix") or ""
        self._raw = RustTokenizer.from_str(tokenizer_json)
        self._raw.no_padding()
        self._raw.no_truncation()
        self._max_len = self._check_max_len(max_len)
        self._batch = RustTokenizer.from_str(tokenizer_json)
        # What transformers' fast tokenizers set for padding='max_length', truncation=True.
        self._batch.enable_truncation(self._max_len, stride=0, strategy="longest_first", direction=truncation_side)
        self._batch.enable_padding(direction=padding_side, pad_id=self._pad,
                                   pad_token=self._raw.id_to_token(self._pad) or "", length=self._max_len)

    def __getstate__(self):  # Rust objects are rebuilt from the JSON text (grain worker processes)
        return self._state()

    def __setstate__(self, state):
        self.__init__(**state)

    def _state(self) -> dict:
        return dict(tokenizer_json=self._json, max_len=self._max_len, pad_id=self._pad, eos_id=self._eos,
                    bos_id=self._bos, padding_side=self.padding_side, truncation_side=self.truncation_side,
                    rules=self.rules, hf_config=self.hf_config)

    @property
    def tokenizer_json(self) -> str:
        return self._json

    @property
    def vocab_size(self) -> int:
        return self._raw.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> int32 ``[N, max_len]``, the ids of ``transformers``' ``tokenizer(texts,
        padding='max_length', truncation=True, max_length=max_len)['input_ids']``."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text in a list")
        if not len(texts):
            return np.zeros((0, self._max_len), np.int32)
        encodings = self._batch.encode_batch([self.rules.apply(t) for t in texts], add_special_tokens=True)
        return np.asarray([e.ids for e in encodings], np.int32).reshape(len(texts), self._max_len)

    def tokenize(self, text: str) -> list[int]:
        return list(self._raw.encode(self.rules.apply(text), add_special_tokens=False).ids)

    def detokenize(self, ids: Sequence[int]) -> str:
        text = self._raw.decode([int(i) for i in ids], skip_special_tokens=True)
        return text.replace(self._end_of_word, " ").strip() if self._end_of_word else text

    def replace(self, *, max_len=None, rules=None) -> "HfTokenizersTokenizer":
        state = self._state()
        state.update(max_len=self._max_len if max_len is None else max_len,
                     rules=self.rules if rules is None else rules)
        return HfTokenizersTokenizer(**state)

    def save(self, path: str | os.PathLike) -> None:
        state = self._state()
        del state["max_len"], state["rules"]
        self._write(path, {"type": "hf_tokenizers", **state})

    def __repr__(self) -> str:
        return f"HfTokenizersTokenizer(vocab_size={self.vocab_size}, max_len={self.max_len})"


def _special_tokens_of(config: dict) -> list[dict]:
    """The added/special tokens a ``SiglipTokenizer`` built from this tokenizer_config.json has:
    ``[{content, id?, lstrip, rstrip, single_word}]``. Without ``added_tokens_decoder`` the class's
    own defaults apply (its ``</s>`` / ``<unk>`` strip the spaces around them)."""
    decoder = config.get("added_tokens_decoder")
    if decoder:
        return [dict(content=v["content"], id=int(k), lstrip=bool(v.get("lstrip")), rstrip=bool(v.get("rstrip")),
                     single_word=bool(v.get("single_word"))) for k, v in decoder.items()]
    names = {_token_text(config.get(k, d)) for k, d in (("eos_token", "</s>"), ("unk_token", "<unk>"),
                                                         ("pad_token", "</s>"))}
    return [dict(content=n, lstrip=True, rstrip=True, single_word=False) for n in sorted(names) if n]


class SiglipSentencePieceTokenizer(_StoredIds, Tokenizer):
    """SigLIP's ``spiece.model`` with ``transformers.SiglipTokenizer``'s text handling and ids.

    Per text (what ``SiglipTokenizer`` does): ``'▁' + text`` (any ``'▁'`` in it made a space),
    split on the special tokens (their ``lstrip`` / ``rstrip`` strip the neighbours' spaces),
    every other piece canonicalized (lowercased when ``do_lower_case``, ASCII punctuation removed,
    whitespace collapsed and stripped) and encoded by SentencePiece behind the unknown token's
    text (whose pieces are then dropped); a leading bare ``'▁'`` before a special token dropped;
    truncated to ``max_len - 1`` ids; EOS appended unless last; padded with ``pad_id`` (SigLIP:
    ``</s>`` = EOS) to ``max_len``.

    Args:
      model_proto: the bytes of ``spiece.model``.
      hf_config: the folder's tokenizer_config.json (special tokens, ``do_lower_case``,
        ``padding_side``); kept for export.
    """

    def __init__(self, model_proto: bytes, max_len: int, *, hf_config: dict | None = None,
                 rules: TextRules = HF_RULES):
        from contrastive_jax.data.tokenizer import _sentencepiece

        self.rules = rules
        self._proto = bytes(model_proto)
        self.hf_config = dict(hf_config or {})
        cfg = self.hf_config
        self._sp = _sentencepiece().SentencePieceProcessor(model_proto=self._proto)
        self._lower = bool(cfg.get("do_lower_case", True))
        self._unk = _token_text(cfg.get("unk_token", "<unk>")) or "<unk>"
        self._unk_len = len(self._sp.encode(self._unk, out_type=str))
        self._specials = {t["content"]: t for t in _special_tokens_of(cfg)}
        for tok in self._specials.values():
            tok.setdefault("id", self._sp.piece_to_id(tok["content"]))
        # Longest first: at one position the longest special token matches (as transformers' trie).
        self._split_re = re.compile("(" + "|".join(re.escape(s) for s in sorted(self._specials, key=len, reverse=True))
                                    + ")") if self._specials else None
        self._eos = self._special_id(cfg.get("eos_token", "</s>"))
        self._pad = self._special_id(cfg.get("pad_token", "</s>"))
        self.padding_side = cfg.get("padding_side", "right")
        self._max_len = self._check_max_len(max_len)

    def _special_id(self, token) -> int:
        text = _token_text(token)
        return int(self._specials[text]["id"]) if text in self._specials else int(self._sp.piece_to_id(text))

    def __getstate__(self):  # the C++ processor does not pickle (grain worker processes)
        return {"proto": self._proto, "max_len": self._max_len, "hf_config": self.hf_config, "rules": self.rules}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["max_len"], hf_config=state["hf_config"], rules=state["rules"])

    @property
    def model_proto(self) -> bytes:
        return self._proto

    @property
    def vocab_size(self) -> int:
        return max([self._sp.get_piece_size()] + [int(t["id"]) + 1 for t in self._specials.values()])

    def _canonical(self, text: str) -> str:
        if self._lower:
            text = text.lower()
        return re.sub(r"\s+", " ", text.translate(_PUNCTUATION)).strip()

    def _pieces(self, chunk: str) -> list[str]:
        # SentencePiece adds its dummy '▁' prefix to the unknown token's text, not to the chunk.
        pieces = self._sp.encode(self._unk + self._canonical(chunk), out_type=str)
        return pieces[self._unk_len:] if len(pieces) >= self._unk_len else pieces

    def _split(self, text: str) -> list[str]:
        """Pieces of ``text`` with the special tokens cut out, neighbours stripped as configured."""
        parts = [p for p in self._split_re.split(text) if p] if self._split_re else [text]
        for i, part in enumerate(parts):
            tok = self._specials.get(part)
            if tok is None:
                continue
            left = parts[i - 1] if i > 0 else None
            right = parts[i + 1] if i < len(parts) - 1 else None
            if tok["rstrip"] and right:
                parts[i + 1] = right.lstrip()
            if tok["lstrip"] and left:
                parts[i - 1] = left.rstrip()
            if tok["single_word"]:
                if left and left[-1] != " ":
                    parts[i - 1], parts[i] = left + part, ""
                elif right and right[0] != " ":
                    parts[i + 1], parts[i] = part + right, ""
        return parts

    def tokenize(self, text: str) -> list[int]:
        text = _SPIECE_UNDERLINE + self.rules.apply(text).replace(_SPIECE_UNDERLINE, " ")
        pieces: list[str] = []
        for part in self._split(text):
            if not part:
                continue
            pieces.extend([part] if part in self._specials else self._pieces(part))
        if len(pieces) > 1 and pieces[0] == _SPIECE_UNDERLINE and pieces[1] in self._specials:
            pieces = pieces[1:]
        return [int(self._specials[p]["id"]) if p in self._specials else self._sp.piece_to_id(p) for p in pieces]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> int32 ``[N, max_len]``, the ids of ``transformers``' ``SiglipTokenizer(texts,
        padding='max_length', truncation=True, max_length=max_len)['input_ids']``."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text in a list")
        out = np.full((len(texts), self._max_len), self._pad, np.int32)
        for row, text in enumerate(texts):
            ids = self.tokenize(text)[: self._max_len - 1]
            if not ids or ids[-1] != self._eos:
                ids.append(self._eos)
            if self.padding_side == "left":
                out[row, self._max_len - len(ids):] = ids
            else:
                out[row, : len(ids)] = ids
        return out

    def detokenize(self, ids: Sequence[int]) -> str:
        special = {int(t["id"]) for t in self._specials.values()}
        return self._sp.decode([int(i) for i in ids if int(i) not in special])

    def replace(self, *, max_len=None, rules=None) -> "SiglipSentencePieceTokenizer":
        return SiglipSentencePieceTokenizer(self._proto, self._max_len if max_len is None else max_len,
                                            hf_config=self.hf_config, rules=self.rules if rules is None else rules)

    def save(self, path: str | os.PathLike) -> None:
        self._write(path, {"type": "hf_sentencepiece", "model_proto": base64.b64encode(self._proto).decode("ascii"),
                           "hf_config": self.hf_config})

    def __repr__(self) -> str:
        return f"SiglipSentencePieceTokenizer(vocab_size={self.vocab_size}, max_len={self.max_len})"


def load_saved(payload: dict, max_len: int, rules: TextRules) -> Tokenizer:
    """Rebuilds a tokenizer of this module from the JSON payload :meth:`save` wrote."""
    if payload["type"] == "hf_sentencepiece":
        return SiglipSentencePieceTokenizer(base64.b64decode(payload["model_proto"]), max_len,
                                            hf_config=payload.get("hf_config"), rules=rules)
    fields = ("tokenizer_json", "pad_id", "eos_id", "bos_id", "padding_side", "truncation_side", "hf_config")
    return HfTokenizersTokenizer(max_len=max_len, rules=rules, **{k: payload[k] for k in fields if k in payload})


def _post_processor_specials(tok, config: dict) -> tuple[Any, int | None]:
    """(post-processor to install or None to keep the file's, BOS id it adds or None).

    transformers rebuilds the post-processor from ``add_bos_token`` / ``add_eos_token`` when
    tokenizer_config.json sets either, and from neither when the file has none."""
    from tokenizers import processors

    bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    explicit = "add_bos_token" in config or "add_eos_token" in config
    if explicit or tok.post_processor is None:
        add_bos = bool(config.get("add_bos_token", False)) and bos is not None
        add_eos = bool(config.get("add_eos_token", False)) and eos is not None
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        specials = [(t, tok.token_to_id(t)) for t, add in ((bos, add_bos), (eos, add_eos)) if add]
        return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials), \
            (tok.token_to_id(bos) if add_bos else None)
    # The file's own post-processor: BOS is the id it puts first, if that is the bos_token.
    bos_id = tok.token_to_id(bos) if bos is not None else None
    first = tok.encode("", add_special_tokens=True).ids[:1]
    return None, bos_id if bos_id is not None and first == [bos_id] else None


def tokenizers_from_folder(folder: str, max_len: int) -> HfTokenizersTokenizer:
    """The ``tokenizer.json`` of a ``save_pretrained`` folder as ``transformers`` sets it up."""
    from tokenizers import Tokenizer as RustTokenizer

    config = read_tokenizer_config(folder)
    path = os.path.join(folder, "tokenizer.json")
    tok = RustTokenizer.from_file(path)
    processor, bos_id = _post_processor_specials(tok, config)
    if processor is not None:
        tok.post_processor = processor
    names = {k: _token_text(config.get(k)) for k in ("pad_token", "eos_token")}
    ids = {k: (tok.token_to_id(v) if v is not None else None) for k, v in names.items()}
    if ids["eos_token"] is None:
        raise ValueError(f"{path}: the eos_token {names['eos_token']!r} of tokenizer_config.json is not in its "
                         "vocabulary")
    pad = ids["pad_token"] if ids["pad_token"] is not None else ids["eos_token"]
    side = config.get("padding_side") or ("left" if config.get("tokenizer_class") in _LEFT_PADDING_CLASSES else "right")
    return HfTokenizersTokenizer(tok.to_str(), max_len, pad_id=pad, eos_id=ids["eos_token"], bos_id=bos_id,
                                 padding_side=side, truncation_side=config.get("truncation_side", "right"),
                                 hf_config=config)


def hf_folder_tokenizer(folder: str, max_len: int) -> Tokenizer | None:
    """The tokenizer of a ``transformers`` ``save_pretrained`` folder: ``tokenizer.json`` (via
    ``tokenizers``) or ``spiece.model`` (SigLIP); None when the folder has neither."""
    config = read_tokenizer_config(folder)
    spiece = os.path.join(folder, "spiece.model")
    has_json = os.path.isfile(os.path.join(folder, "tokenizer.json"))
    # SigLIP's folders name SiglipTokenizer (spiece.model); a tokenizer.json beside it would be a
    # conversion, which transformers does not use for that class either.
    if os.path.isfile(spiece) and (config.get("tokenizer_class") == "SiglipTokenizer" or not has_json):
        with open(spiece, "rb") as fh:
            return SiglipSentencePieceTokenizer(fh.read(), max_len, hf_config=config)
    if has_json:
        return tokenizers_from_folder(folder, max_len)
    return None
