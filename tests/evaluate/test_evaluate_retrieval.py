"""Retrieval -- the one implementation, sharded and streamed -- against brute-force numpy (full
similarity matrix, full sort)."""
import jax
import numpy as np
import pytest

from contrastive_jax.evaluate import metrics
from contrastive_jax.evaluate import retrieval as R
from contrastive_jax.parallel.mesh import make_mesh


def int_emb(rng, n, d, low=-2, high=3):
    """Small-integer embeddings: dot products are exact, so ties are exact ties."""
    return rng.integers(low, high, size=(n, d)).astype(np.float32)


def brute_ranks(q, g, q_sets, g_sets):
    """rank_i = #{negatives j : s_ij >= max positive s_ij}, from the full float64 matrix."""
    s = q.astype(np.float64) @ g.astype(np.float64).T
    out = []
    for i in range(len(q)):
        pos = np.array([bool(set(q_sets[i]) & set(gs)) for gs in g_sets])
        best = s[i, pos].max()
        out.append(int(np.sum(s[i, ~pos] >= best)) if not np.isnan(best) else len(g))
    return np.array(out)


def brute_topk(q, g, k):
    s = q.astype(np.float64) @ g.astype(np.float64).T
    s = np.where(np.isnan(s), -np.inf, s)
    idx = np.arange(g.shape[0])
    return np.stack([np.lexsort((idx, -row))[:k] for row in s])


def mesh_of(n):
    return None if n == 1 else make_mesh([("data", n)], jax.devices()[:n])


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_ranks_and_topk_match_bruteforce(devices, kind):
    rng = np.random.default_rng(devices)
    nq, ng, d = 37, 61, 4  # ragged everywhere: not multiples of the blocks or the device count
    if kind == "ties":
        q, g = int_emb(rng, nq, d), int_emb(rng, ng, d)
        g[7] = g[3]  # duplicate gallery rows tie exactly
    else:
        q = rng.normal(size=(nq, d)).astype(np.float32)
        g = rng.normal(size=(ng, d)).astype(np.float32)
    # Up to two labels per gallery item and per query; every query has some positive.
    g_sets = [sorted(set(rng.integers(0, 20, size=rng.integers(1, 3)).tolist())) for _ in range(ng)]
    q_sets = [[g_sets[rng.integers(0, ng)][0]] + ([int(rng.integers(0, 20))] if rng.random() < 0.5 else [])
              for _ in range(nq)]
    pad = lambda sets: np.array([s + [-1] * (2 - len(s)) for s in sets])  # noqa: E731
    mesh = mesh_of(devices)
    gal = R.shard_gallery(g, pad(g_sets), mesh=mesh, axes=("data",) if mesh else None, block=8)
    out = R.streaming_retrieval(q, gal, query_labels=pad(q_sets), k=9, query_block=16)
    np.testing.assert_array_equal(out["ranks"], brute_ranks(q, g, q_sets, g_sets))
    np.testing.assert_array_equal(out["topk_indices"], brute_topk(q, g, 9))
    s_ref = np.take_along_axis(q @ g.T, brute_topk(q, g, 9), axis=1)
    np.testing.assert_allclose(out["topk_scores"], s_ref, rtol=1e-5, atol=1e-5)
    if kind == "ties":
        assert np.any(out["ranks"] > 0)


def test_topk_only_and_k_clipped_to_gallery():
    rng = np.random.default_rng(0)
    q, g = int_emb(rng, 5, 3), int_emb(rng, 4, 3)
    out = R.streaming_retrieval(q, R.shard_gallery(g), k=10)
    assert "ranks" not in out and out["topk_indices"].shape == (5, 4)
    np.testing.assert_array_equal(out["topk_indices"], brute_topk(q, g, 4))


def test_nan_positive_is_a_miss_and_missing_positive_is_an_error():
    q = np.array([[np.nan, 0.0], [0.0, 1.0]], np.float32)
    g = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    out = R.streaming_retrieval(q, R.shard_gallery(g, [0, 1]), query_labels=[0, 1], k=1)
    assert out["ranks"].tolist() == [2, 0]
    with pytest.raises(ValueError, match="no positive"):
        R.streaming_retrieval(q, R.shard_gallery(g, [0, 1]), query_labels=[0, 5])
    # The same through retrieval_eval: the NaN image misses, the other one hits.
    assert R.retrieval_eval(q, g, ks=(1,))["image_to_text/R@1"] == 0.5


def test_retrieval_eval_multi_caption_matches_bruteforce():
    """5 captions per image (some identical strings across images), i→t and t→i."""
    rng = np.random.default_rng(5)
    ni, per, d = 23, 5, 6
    image = rng.normal(size=(ni, d)).astype(np.float32)
    text_image = np.repeat(np.arange(ni), per)
    strings = [f"caption {rng.integers(0, 60)}" for _ in text_image]
    uniq = sorted(set(strings))
    # Identical strings have identical embeddings (as a deterministic text encoder gives), near
    # the first image that uses the string so that retrieval is neither trivial nor hopeless.
    owner = {s: text_image[strings.index(s)] for s in uniq}
    text_of = {s: image[owner[s]] + 0.7 * rng.normal(size=d).astype(np.float32) for s in uniq}
    text = np.stack([text_of[s] for s in strings])
    mesh = make_mesh([("data", 4)], jax.devices()[:4])
    got = R.retrieval_eval(image, text, text_image=text_image, text_strings=strings, ks=(1, 5, 10),
                           mesh=mesh, axes=("data",), gallery_block=8, query_block=7)
    # Reference, written independently: image→text over DISTINCT strings.
    s_it = image.astype(np.float64) @ np.stack([text_of[u] for u in uniq]).astype(np.float64).T
    i2t = []
    for i in range(ni):
        mine = {strings[t] for t in np.flatnonzero(text_image == i)}
        pos = np.array([u in mine for u in uniq])
        i2t.append(np.sum(s_it[i, ~pos] >= s_it[i, pos].max()))
    s_ti = text.astype(np.float64) @ image.astype(np.float64).T
    t2i = []
    for t in range(len(strings)):
        pos = np.array([strings[t] in {strings[u] for u in np.flatnonzero(text_image == j)} for j in range(ni)])
        t2i.append(np.sum(s_ti[t, ~pos] >= s_ti[t, pos].max()))
    i2t, t2i = np.array(i2t), np.array(t2i)
    for k in (1, 5, 10):
        assert got[f"image_to_text/R@{k}"] == pytest.approx(np.mean(i2t < k))
        assert got[f"text_to_image/R@{k}"] == pytest.approx(np.mean(t2i < k))
    assert got["image_to_text/median_rank"] == np.median(i2t + 1)
    assert got["text_to_image/median_rank"] == np.median(t2i + 1)
    assert 0 < got["text_to_image/R@5"] < 1


@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_retrieval_eval_one_to_one_matches_bruteforce(kind):
    rng = np.random.default_rng(1)
    n, d = 60, 3
    if kind == "ties":
        image, text = int_emb(rng, n, d), int_emb(rng, n, d)
        text[10] = text[11]  # identical embeddings (distinct captions): exact ties
    else:
        image = rng.normal(size=(n, d)).astype(np.float32)
        text = (image + 0.8 * rng.normal(size=(n, d))).astype(np.float32)
    # Small blocks: several streaming steps per gallery and several query blocks.
    got = R.retrieval_eval(image, text, ks=(1, 5, 100), gallery_block=16, query_block=16)
    ids = [[i] for i in range(n)]
    i2t, t2i = brute_ranks(image, text, ids, ids), brute_ranks(text, image, ids, ids)
    assert set(got) == {f"{side}/{m}" for side in ("image_to_text", "text_to_image")
                        for m in ("R@1", "R@5", "median_rank")}  # 100 > N skipped
    for k in (1, 5):
        assert got[f"image_to_text/R@{k}"] == pytest.approx(np.mean(i2t < k))
        assert got[f"text_to_image/R@{k}"] == pytest.approx(np.mean(t2i < k))
    assert got["image_to_text/median_rank"] == np.median(i2t + 1)
    assert got["text_to_image/median_rank"] == np.median(t2i + 1)
    assert 0 < got["image_to_text/R@5"] < 1  # the data is neither trivial nor hopeless
    if kind == "ties":
        assert np.any(i2t > 0) and np.any(t2i > 0)


def test_identical_captions_count_as_one_text():
    """Brute force: with caption strings, a hit is any same-string candidate within k of the others."""
    rng = np.random.default_rng(3)
    n, d = 40, 8
    groups = rng.integers(0, 12, size=n)
    image = rng.normal(size=(n, d)).astype(np.float32)
    # Items of one group have the same caption, hence identical text embeddings.
    text = rng.normal(size=(12, d)).astype(np.float32)[groups]
    got = R.retrieval_eval(image, text, text_strings=[f"caption {g}" for g in groups], ks=(1, 5))
    for k in (1, 5):
        hits_i2t, hits_t2i = [], []
        for q in range(n):
            s = text @ image[q]  # image q against every text
            order = np.argsort(-s, kind="stable")
            # Distinct texts only (identical rows are one item); hit if the true group is in the top k.
            seen, top = set(), []
            for j in order:
                if groups[j] not in seen:
                    seen.add(groups[j]); top.append(groups[j])
            hits_i2t.append(groups[q] in top[:k])
            s2 = image @ text[q]
            others = s2[groups != groups[q]]
            best = s2[groups == groups[q]].max()
            hits_t2i.append(np.sum(others >= best) < k)
        assert got[f"image_to_text/R@{k}"] == pytest.approx(np.mean(hits_i2t))
        assert got[f"text_to_image/R@{k}"] == pytest.approx(np.mean(hits_t2i))
    # Without the strings, identical captions are ties against the true one: strictly lower recall.
    plain = R.retrieval_eval(image, text, ks=(1,))
    assert plain["image_to_text/R@1"] < got["image_to_text/R@1"]


def test_deprecated_candidate_groups_are_label_set_ranks():
    """``true_item_ranks(candidate_groups=)`` (deprecated) still gives grouped ranks, now from
    streaming_retrieval: #{other-group candidates >= the best same-group one}."""
    rng = np.random.default_rng(7)
    q, c = int_emb(rng, 30, 3), int_emb(rng, 25, 3)
    groups = rng.integers(0, 9, size=25) * 3 - 5  # arbitrary ids, negatives included
    targets = rng.integers(0, 25, size=30)
    with pytest.warns(DeprecationWarning, match="candidate_groups"):
        got = metrics.true_item_ranks(q, c, targets, block_size=7, candidate_groups=groups)
    ref = brute_ranks(q, c, [[groups[t]] for t in targets], [[g] for g in groups])
    np.testing.assert_array_equal(got, ref)
    assert np.any(ref > 0)


def test_hand_case_ties_and_median_rank():
    # Image 0 is equally similar to texts 0 and 1 (identical): a tie, so a miss at R@1, hit at R@2.
    got = R.retrieval_eval(np.array([[1, 0], [0, 1]], np.float32), np.array([[1, 1], [1, 1]], np.float32),
                           ks=(1, 2))
    assert got["image_to_text/R@1"] == 0.0 and got["image_to_text/R@2"] == 1.0
    # Text→image: text i's two images have equal similarity too.
    assert got["text_to_image/R@1"] == 0.0
    # Image 0 ties its caption with another: rank 1 (pessimistic), a miss at R@1, hit at R@2.
    image = np.array([[1, 0], [0, 1], [0, 1]], np.float32)
    text = np.array([[1, 1], [1, 1], [0, 1]], np.float32)
    got = R.retrieval_eval(image, text, ks=(1, 2, 3))
    # i→t ranks: image0 -> text0 s=1 vs text1 s=1 (tie) -> 1; image1 -> text1 s=1 vs text0 s=1,
    # text2 s=1 -> 2; image2 -> text2 s=1 vs text0, text1 s=1 -> 2.
    assert got["image_to_text/R@1"] == 0.0
    assert got["image_to_text/R@2"] == pytest.approx(1 / 3)
    assert got["image_to_text/R@3"] == 1.0
    assert got["image_to_text/median_rank"] == 3.0
