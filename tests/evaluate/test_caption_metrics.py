"""Caption metrics: hand-computed BLEU-4 and CIDEr-D examples from the papers' formulas, and
parity with pycocoevalcap's Bleu and Cider scorers (the COCO caption evaluation, run inside the
test on pre-tokenized text so its Java tokenizer is not needed)."""
import math

import numpy as np
import pytest

from contrastive_jax.evaluate.captions import bleu, caption_metrics, cider_d, exact_match, tokenize


def test_tokenizer():
    assert tokenize("A Dog, running!  On the GRASS.") == ["a", "dog", "running", "on", "the", "grass"]
    assert tokenize("  ") == []


def test_bleu_hand_computed():
    assert bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(1.0)
    # c = 5, r = 6; p1..p4 = 4/5, 3/4, 2/3, 1/2; BP = exp(1 - 6/5).
    expect = math.exp(1 - 6 / 5) * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert bleu(["a b c d e"], [["a b c d f g"]]) == pytest.approx(expect, rel=1e-12)
    # Closest reference length (7 of 4 and 7 for a candidate of 6: 7, |6-7| < |6-4|): BP =
    # exp(1 - 7/6); matches against the union of references, clipped by the max count per ref.
    expect = math.exp(1 - 7 / 6) * (6 / 6 * 4 / 5 * 2 / 4 * 1 / 3) ** 0.25
    got = bleu(["x y z w v u"], [["x y z w", "q v u x y z r"]])
    # 1-grams: all 6 in some ref; 2-grams: xy yz zw (ref 1) vu (ref 2): 4/5; 3-grams: xyz yzw: 2/4;
    # 4-grams: xyzw: 1/3.
    assert got == pytest.approx(expect, rel=1e-12)
    # Clipping: "the" counted at most as often as in one reference (c = 5 > r = 2: no penalty).
    assert bleu(["the the the the the"], [["the cat"]], max_n=1) == pytest.approx(1 / 5)
    # Short candidate: c = 1 < r = 2, BP = exp(1 - 2).
    assert bleu(["cat"], [["the cat"]], max_n=1) == pytest.approx(math.exp(-1.0))
    assert bleu(["a b"], [["c d"]]) == 0.0


def test_cider_hand_computed():
    # One image: every IDF is log(1) - log(1) = 0, so CIDEr is 0 by construction.
    assert cider_d(["a b"], [["a b"]])[0] == 0.0
    # Two images; every n-gram has df <= 1, so IDF = log 2 for all (a cancelling common factor).
    # Image 1: candidate == reference: cosine 1 for n = 1, 2 and 0 for n = 3, 4 -> 10 * 2/4 = 5.
    # Image 2: "c d d" vs "c d": n=1 vectors (1, 2) vs (1, 1), clipped numerator 1 + 1 = 2 over
    # sqrt(5) sqrt(2); n=2 {cd, dd} vs {cd}: 1 / sqrt(2); length penalty exp(-1 / 72).
    score, per_image = cider_d(["a b", "c d d"], [["a b"], ["c d"]])
    second = 10 * (2 / math.sqrt(10) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    np.testing.assert_allclose(per_image, [5.0, second], rtol=1e-12)
    assert score == pytest.approx((5.0 + second) / 2, rel=1e-12)
    # An unseen word gets df = max(1, 0) = 1: "c e" vs "c d" -> n=1 cosine 1/2, n=2 0.
    np.testing.assert_allclose(cider_d(["a b", "c e"], [["a b"], ["c d"]])[1], [5.0, 10 * 0.5 / 4], rtol=1e-12)


def test_exact_match_and_bundle():
    cands = ["A red circle.", "a blue square", "green"]
    refs = [["a red circle", "red circle"], ["a blue triangle"], "Green!"]
    assert exact_match(cands, refs) == pytest.approx(2 / 3)
    out = caption_metrics(cands, refs)
    assert set(out) == {"bleu4", "cider", "exact_match"} and out["exact_match"] == pytest.approx(2 / 3)


def _corpus(seed, n_images=40):
    """Captions from a small grammar so that references share 3- and 4-grams with candidates."""
    rng = np.random.default_rng(seed)
    colors, shapes, places = ["red", "blue", "green", "yellow"], ["circle", "square", "triangle"], [
        "on the left", "on the right", "in the middle", "at the top"]
    sizes = ["a small", "a large", "a", "one big"]

    def caption():
        words = f"{rng.choice(sizes)} {rng.choice(colors)} {rng.choice(shapes)} {rng.choice(places)}"
        if rng.random() < 0.3:
            words += f" next to a {rng.choice(colors)} {rng.choice(shapes)}"
        return words

    cands, refs = [], []
    for _ in range(n_images):
        r = [caption() for _ in range(int(rng.integers(1, 5)))]
        refs.append(r)
        cands.append(r[0] if rng.random() < 0.2 else caption())
    return cands, refs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parity_with_pycocoevalcap(seed):
    bleu_mod = pytest.importorskip("pycocoevalcap.bleu.bleu", reason="pycocoevalcap is the peer library (pip install pycocoevalcap)")
    cider_mod = pytest.importorskip("pycocoevalcap.cider.cider")
    cands, refs = _corpus(seed)
    # Capitals and punctuation: our tokenizer strips them; pycocoevalcap is fed the same tokens.
    cands = [c.capitalize() + "." for c in cands]
    gts = {i: [" ".join(tokenize(r)) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(tokenize(c))] for i, c in enumerate(cands)}
    coco_bleu, _ = bleu_mod.Bleu(4).compute_score(gts, res, verbose=0)
    coco_cider, coco_per_image = cider_mod.Cider().compute_score(gts, res)
    # pycocoevalcap's 1e-9 / 1e-15 guards against division by zero shift the last digits only.
    assert bleu(cands, refs) == pytest.approx(coco_bleu[3], rel=1e-7)
    assert bleu(cands, refs, max_n=2) == pytest.approx(coco_bleu[1], rel=1e-7)
    score, per_image = cider_d(cands, refs)
    assert score == pytest.approx(coco_cider, rel=1e-10)
    np.testing.assert_allclose(per_image, coco_per_image, rtol=1e-10, atol=1e-12)
    assert 0.05 < coco_bleu[3] < 0.95 and coco_cider > 0.1  # a non-degenerate comparison
