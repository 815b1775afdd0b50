"""Host zero-shot metrics, batched encoding, prompt ensembling and zero-shot through
:class:`~contrastive_jax.evaluate.Evaluation`, against brute-force numpy references.

(Retrieval metrics are tested in test_evaluate_retrieval.py, on the one implementation.)"""
import numpy as np
import pytest

from contrastive_jax import evaluate
from contrastive_jax.train import load_config


def reference_ranks(queries, candidates, targets):
    """Argsort-based pessimistic rank: sort by similarity (desc), true item after its ties."""
    sims = queries.astype(np.float64) @ candidates.astype(np.float64).T
    ranks = []
    for i, target in enumerate(targets):
        is_true = np.arange(candidates.shape[0]) == target
        order = np.lexsort((is_true, -sims[i]))  # primary key last: -sim, then True after False
        ranks.append(int(np.flatnonzero(order == target)[0]))
    return np.array(ranks)


def int_embeddings(rng, n, d, low=-2, high=3):
    """Small-integer embeddings: dot products are exact in float32, so ties are exact ties."""
    return rng.integers(low, high, size=(n, d)).astype(np.float32)


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("block_size", [7, 1024])
def test_zero_shot_accuracy_matches_bruteforce(kind, block_size):
    rng = np.random.default_rng(0)
    n, c, d = 97, 8, 3
    if kind == "ties":
        image_emb, class_emb = int_embeddings(rng, n, d), int_embeddings(rng, c, d)
        class_emb[5] = class_emb[2]  # duplicate classes: every image ties them
    else:
        image_emb = rng.normal(size=(n, d)).astype(np.float32)
        class_emb = rng.normal(size=(c, d)).astype(np.float32)
    labels = rng.integers(0, c, size=n)
    out = evaluate.zero_shot_accuracy(image_emb, class_emb, labels, ks=(1, 5, 9), block_size=block_size)
    ranks = reference_ranks(image_emb, class_emb, labels)
    assert set(out) == {"top1", "top5", "per_class_top1", "mean_per_class_top1"}  # 9 > C skipped
    assert out["top1"] == pytest.approx(np.mean(ranks < 1))
    assert out["top5"] == pytest.approx(np.mean(ranks < 5))
    per_class = [np.mean(ranks[labels == k] < 1) if np.any(labels == k) else np.nan for k in range(c)]
    np.testing.assert_allclose(out["per_class_top1"], per_class)
    assert out["mean_per_class_top1"] == pytest.approx(np.nanmean(per_class))
    if kind == "ties":
        # Duplicated classes can never be a top-1 hit under the pessimistic rule.
        assert np.all(out["per_class_top1"][[2, 5]][~np.isnan(out["per_class_top1"][[2, 5]])] == 0)


@pytest.mark.parametrize("n", [10, 3, 8, 0])
def test_encode_in_batches_equals_unbatched(n):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(n, 5, 2)).astype(np.float32)
    w = rng.normal(size=(10, 3)).astype(np.float32)
    seen = []

    def encode(batch):
        seen.append(batch.shape)
        return batch.reshape(len(batch), -1) @ w

    out = evaluate.encode_in_batches(encode, x, batch_size=4)
    assert out.shape == (n, 3)
    np.testing.assert_allclose(out, x.reshape(n, 10) @ w, rtol=1e-6)
    assert all(shape == (4, 5, 2) for shape in seen)  # every call sees one shape


class WordTokenizer:
    """Stand-in tokenizer: one id per word (1-based), then EOS, then pad 0 to a fixed length."""

    def __init__(self, words, length=8):
        self.ids = {w: i + 1 for i, w in enumerate(words)}
        self.eos = len(words) + 1
        self.length = length

    def encode(self, texts):
        out = np.zeros((len(texts), self.length), np.int32)
        for i, text in enumerate(texts):
            ids = [self.ids[w] for w in text.split()] + [self.eos]
            out[i, : len(ids)] = ids
        return out


COLORS = ["red", "green", "blue"]
KINDS = ["circle", "square", "triangle", "star"]
FILLER = ["a", "photo", "of", "shape", "the"]
TEMPLATES = {"color": ["a {} shape", "the {} one"], "kind": ["a photo of a {}", "{}"]}
# Unknown words in templates ("one") get an id too; the tokenizer knows every word used.
TOKENIZER = WordTokenizer(COLORS + KINDS + FILLER + ["one"])


def one_hot_text_encoder(batch_size):
    """Text embedding = one-hot of its color word ⊕ one-hot of its kind word (D = 3 + 4)."""

    def encode(tokens):
        assert tokens.shape[0] == batch_size
        out = np.zeros((len(tokens), len(COLORS) + len(KINDS)), np.float32)
        for j, word in enumerate(COLORS + KINDS):
            out[:, j] = np.any(tokens == TOKENIZER.ids[word], axis=1)
        return out

    return encode


def one_hot_image_encoder(batch_size):
    """Images carry their labels in pixel [0, 0]: channel 0 = color, channel 1 = kind."""

    def encode(images):
        assert images.shape[0] == batch_size
        color = images[:, 0, 0, 0].astype(int)
        kind = images[:, 0, 0, 1].astype(int)
        return np.concatenate([np.eye(len(COLORS))[color], np.eye(len(KINDS))[kind]], axis=1).astype(np.float32)

    return encode


def make_eval_data(rng, n):
    color = rng.integers(0, len(COLORS), size=n)
    kind = rng.integers(0, len(KINDS), size=n)
    images = rng.normal(size=(n, 4, 4, 3)).astype(np.float32)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = color, kind
    return dict(image=images, color=color, kind=kind)


def evaluate_set(encode_image, encode_text, data, *, class_names, templates, batch_size, prompts=None,
                 entries=("zero_shot", "retrieval"), **kwargs):
    """One :class:`Evaluation` call on ``data`` (the run's own eval set) with the given prompts."""
    config = load_config(None)
    config.eval.evaluators = list(entries)
    info = {"class_names": class_names, "templates": templates, "prompts": prompts or {},
            "label_keys": tuple(class_names)}
    return evaluate.Evaluation(
        evaluate.parse_evaluators(config.eval, config.data), encode_image=encode_image, encode_text=encode_text,
        load_arrays=lambda ds, split, n: data, dataset_info=lambda ds: info, tokenizer=TOKENIZER,
        batch_size=batch_size, **kwargs)()


def test_evaluation_random_is_chance():
    rng = np.random.default_rng(4)
    n, d, bs = 3000, 16, 256
    data = make_eval_data(rng, n)
    data["text"] = rng.integers(1, 50, size=(n, 6)).astype(np.int32)
    img_proj = rng.normal(size=(4 * 4 * 3, d)).astype(np.float32)
    tok_proj = rng.normal(size=(60, d)).astype(np.float32)

    def encode_image(images):  # random projection of pixels: unrelated to the labels
        images = images.copy()
        images[:, 0, 0, :2] = 0  # hide the labels
        return images.reshape(len(images), -1) @ img_proj

    def encode_text(tokens):
        return tok_proj[tokens].sum(axis=1)

    out = evaluate_set(encode_image, encode_text, data, class_names={"color": COLORS, "kind": KINDS},
                       templates=TEMPLATES, batch_size=bs)
    # Binomial std at n=3000 is < 0.01; 0.04 is > 4 sigma.
    assert out["zeroshot/color/top1"] == pytest.approx(1 / 3, abs=0.04)
    assert out["zeroshot/kind/top1"] == pytest.approx(1 / 4, abs=0.04)
    assert out["retrieval/image_to_text/R@5"] < 0.01  # chance 5/3000


def test_zero_shot_class_embeddings_matches_manual():
    rng = np.random.default_rng(5)
    proj = rng.normal(size=(20, 6)).astype(np.float32)
    # Unnormalized, norm varying with the text, so averaging before normalizing would differ.
    encode_text = lambda tokens: proj[tokens].sum(axis=1) * (1 + tokens[:, :1])  # noqa: E731
    templates = ["a {} shape", "the {} one", "{}"]
    out = evaluate.zero_shot_class_embeddings(encode_text, TOKENIZER, COLORS, templates, batch_size=4)
    assert out.shape == (3, 6) and out.dtype == np.float32
    for c, name in enumerate(COLORS):
        embs = encode_text(TOKENIZER.encode([t.format(name) for t in templates]))
        embs = embs / np.linalg.norm(embs, axis=1, keepdims=True)
        mean = embs.mean(axis=0)
        np.testing.assert_allclose(out[c], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)


def test_prompt_class_embeddings_ragged_and_prompts_override_templates():
    rng = np.random.default_rng(6)
    proj = rng.normal(size=(20, 6)).astype(np.float32)
    encode_text = lambda tokens: proj[tokens].sum(axis=1)  # noqa: E731
    prompts = [["a red shape"], ["a green shape", "the green one", "green"], ["blue", "the blue one"]]
    out = evaluate.prompt_class_embeddings(encode_text, TOKENIZER, prompts, batch_size=4)
    for c, per_class in enumerate(prompts):
        embs = encode_text(TOKENIZER.encode(per_class))
        mean = (embs / np.linalg.norm(embs, axis=1, keepdims=True)).mean(axis=0)
        np.testing.assert_allclose(out[c], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
    # Zero-shot uses a dataset's ready-made prompts instead of its templates: prompts that name
    # the WRONG colour (rotated by one) turn perfect one-hot accuracy into zero.
    data = make_eval_data(np.random.default_rng(0), 30)
    rotated = {"color": [[f"a {COLORS[(c + 1) % 3]} shape"] for c in range(3)]}
    res = evaluate_set(one_hot_image_encoder(8), one_hot_text_encoder(8), data, class_names={"color": COLORS},
                       templates=TEMPLATES, batch_size=8, prompts=rotated, entries=("zero_shot",))
    assert res["zeroshot/color/top1"] == 0.0
