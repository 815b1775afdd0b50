"""Caption metrics: corpus BLEU-4, CIDEr-D and exact match, computed the way the COCO caption
evaluation (pycocoevalcap) computes them, on plain Python strings.

Tokenizer (:func:`tokenize`): lowercase, every character that is not a letter, a digit or
whitespace becomes a space, split on whitespace (``"A dog, running!"`` -> ``['a', 'dog',
'running']``). The COCO evaluation uses the Stanford PTB tokenizer (Java) and then drops
punctuation tokens; on plain captions the two agree except for contractions and hyphenated
words, which this tokenizer splits.

BLEU (Papineni et al. 2002, "BLEU: a Method for Automatic Evaluation of Machine Translation"):
corpus level, i.e. the clipped n-gram matches and the candidate n-gram counts are summed over
the whole corpus before taking the precisions ``p_n``; ``BLEU-N = BP * exp(mean_n log p_n)``;
the brevity penalty ``BP = exp(1 - r / c)`` when ``c < r`` (``c``: total candidate length,
``r``: sum over images of the reference length closest to the candidate's, the shorter on a tie,
as the COCO evaluation's ``'closest'`` option). No smoothing: a corpus without a single matching
4-gram scores 0 (pycocoevalcap's 1e-15 guard reports a small positive number there).

CIDEr-D (Vedantam et al. 2015, "CIDEr: Consensus-based Image Description Evaluation", with the
"-D" changes of the COCO evaluation): n = 1..4 grams weighted by TF-IDF, where the raw count in
the sentence is the TF and ``IDF(g) = log(|I|) - log(max(1, df(g)))``, ``df(g)`` the number of
images of the *evaluated set* whose references contain ``g`` (so a one-image set scores 0). For a
candidate ``c`` and each reference ``s``: per ``n``, ``sum_g min(v_c(g), v_s(g)) v_s(g) /
(|v_c| |v_s|)`` (clipping the candidate's weights by the reference's, so repeating a word does
not pay), times the Gaussian length penalty ``exp(-(l_c - l_s)^2 / (2 sigma^2))`` with
``sigma = 6``; averaged over ``n`` and over the references, times 10. The corpus score is the
mean over images.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import numpy as np

_NON_WORD = re.compile(r"[^0-9a-z\s]")


def tokenize(text: str) -> list[str]:
    """Lowercase, punctuation to spaces, split (see the module docstring)."""
    return _NON_WORD.sub(" ", text.lower()).split()


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _normalize_refs(candidates: Sequence[str], references) -> list[list[list[str]]]:
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    out = []
    for refs in references:
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError("every candidate needs at least one reference")
        out.append([tokenize(r) for r in refs])
    return out


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str] | str], max_n: int = 4) -> float:
    """Corpus BLEU-``max_n`` in [0, 1] (Papineni et al. 2002; see the module docstring).

    Args:
      candidates: one generated caption per image.
      references: per image, a list of reference captions (or one string).
    """
    refs_tok = _normalize_refs(candidates, references)
    matches, totals = np.zeros(max_n), np.zeros(max_n)
    cand_len = ref_len = 0
    for cand, refs in zip(candidates, refs_tok):
        c = tokenize(cand)
        cand_len += len(c)
        ref_len += min((abs(len(r) - len(c)), len(r)) for r in refs)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(c, n)
            max_ref = Counter()
            for r in refs:
                max_ref |= _ngrams(r, n)  # elementwise max over the references
            matches[n - 1] += sum(min(k, max_ref[g]) for g, k in counts.items())
            totals[n - 1] += max(len(c) - n + 1, 0)
    if np.any(matches == 0):
        return 0.0
    log_p = np.mean(np.log(matches / totals))
    bp = 1.0 if cand_len >= ref_len else math.exp(1.0 - ref_len / max(cand_len, 1))
    return float(bp * math.exp(log_p))


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str] | str], max_n: int = 4,
            sigma: float = 6.0) -> tuple[float, np.ndarray]:
    """CIDEr-D (Vedantam et al. 2015, as in the COCO evaluation; see the module docstring).

    Returns ``(corpus score, per-image scores [len(candidates)] float64)``, both on the x10 scale
    of the COCO evaluation.
    """
    refs_tok = _normalize_refs(candidates, references)
    df: Counter = Counter()
    for refs in refs_tok:
        df.update({g for r in refs for n in range(1, max_n + 1) for g in _ngrams(r, n)})
    log_images = math.log(len(candidates))

    def tfidf(tokens):
        vecs = []
        for n in range(1, max_n + 1):
            vecs.append({g: k * (log_images - math.log(max(1.0, df[g]))) for g, k in _ngrams(tokens, n).items()})
        return vecs

    scores = np.zeros(len(candidates))
    for i, (cand, refs) in enumerate(zip(candidates, refs_tok)):
        c = tokenize(cand)
        vc = tfidf(c)
        total = 0.0
        for r in refs:
            vr = tfidf(r)
            penalty = math.exp(-((len(c) - len(r)) ** 2) / (2.0 * sigma**2))
            for n in range(max_n):
                num = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vc[n].items())
                norm = math.sqrt(sum(w * w for w in vc[n].values())) * math.sqrt(sum(w * w for w in vr[n].values()))
                if norm > 0:
                    total += num / norm * penalty
        scores[i] = 10.0 * total / (max_n * len(refs))
    return float(scores.mean()), scores


def exact_match(candidates: Sequence[str], references: Sequence[Sequence[str] | str]) -> float:
    """Fraction of candidates whose tokens equal those of one of their references, in [0, 1]."""
    refs_tok = _normalize_refs(candidates, references)
    hits = [tokenize(c) in refs for c, refs in zip(candidates, refs_tok)]
    return float(np.mean(hits)) if hits else 0.0


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str] | str]) -> dict[str, float]:
    """``{'bleu4', 'cider', 'exact_match'}`` of one evaluated set (see the functions above)."""
    return {"bleu4": bleu(candidates, references), "cider": cider_d(candidates, references)[0],
            "exact_match": exact_match(candidates, references)}
