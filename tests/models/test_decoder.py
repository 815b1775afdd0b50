"""Text decoder (captioning tower): a float64 numpy forward written from the architecture's
description (shifted inputs with a learned BOS, pre-LN blocks of causal self-attention,
cross-attention to projected image tokens and an MLP, final LN, tied/untied output projection,
CapPa mask tokens with bidirectional attention) against the Flax module; scanned equals
unscanned; causality; logical axis names; the logits-free loss on the decoder equals the dense
cross-entropy of its logits."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax.losses.captioning import caption_loss
from contrastive_jax.models.decoder import TextDecoder

V, W, DEPTH, HEADS, MLP, CTX = 13, 16, 2, 2, 24, 8
B, L, T, D_IMG = 3, 6, 5, 10
TOKENS = np.array([[3, 4, 5, 1, 0, 0], [2, 2, 1, 0, 0, 0], [5, 6, 7, 8, 9, 1]], np.int32)


def make(**kw):
    cfg = dict(vocab_size=V, width=W, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP, context_length=CTX,
               attention_impl="einsum")
    cfg.update(kw)
    return TextDecoder(**cfg)


def image_tokens(seed=0):
    return np.random.default_rng(seed).normal(size=(B, T, D_IMG)).astype(np.float32)


def init(model, seed=0):
    variables = model.init(jax.random.key(seed), image_tokens(), TOKENS)
    params = nn.meta.unbox(variables["params"])
    # Random (not zero) biases, LN scales and head bias so the reference checks every term.
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed + 1)
    leaves = [np.asarray(x) + 0.1 * rng.normal(size=x.shape).astype(np.float32) for x in leaves]
    return jax.tree.unflatten(tree, leaves)


# ---------------------------------------------------------------- float64 numpy reference


def np_ln(x, p, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_mha(x, kv, p, mask):
    """x [Lq, W], kv [Lk, W]; mask [Lq, Lk] bool or None."""
    q = np.einsum("lw,whd->lhd", x, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("lw,whd->lhd", kv, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("lw,whd->lhd", kv, p["value"]["kernel"]) + p["value"]["bias"]
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        s = np.where(mask[None], s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("hqk,khd->qhd", a, v)
    return np.einsum("qhd,hdw->qw", o, p["out"]["kernel"]) + p["out"]["bias"]


def np_gelu(x):  # tanh approximation, the models' 'gelu'
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_decoder(params, img, tokens, parallel, tied, bias):
    """Hidden states [B, L, W] and logits [B, L, V] in float64, one example at a time."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    hid, logits = [], []
    for b in range(tokens.shape[0]):
        n = tokens.shape[1]
        if parallel[b]:
            x = np.repeat(p["mask_token"][None], n, axis=0)
            mask = None
        else:
            x = np.concatenate([p["bos"][None], p["token_embedding"][tokens[b, :-1]]], axis=0)
            mask = np.tril(np.ones((n, n), bool))
        x = x + p["pos_embedding"][:n]
        image = img[b].astype(np.float64) @ p["image_proj"]["kernel"] + p["image_proj"]["bias"]
        for i in range(DEPTH):
            blk = p[f"block_{i}"]
            x = x + np_mha(np_ln(x, blk["norm_attn"]), np_ln(x, blk["norm_attn"]), blk["attn"], mask)
            x = x + np_mha(np_ln(x, blk["norm_cross"]), image, blk["cross_attn"], None)
            h = np_ln(x, blk["norm_mlp"])
            mlp = blk["mlp"]
            h = np_gelu(h @ mlp["fc1"]["kernel"] + mlp["fc1"]["bias"]) @ mlp["fc2"]["kernel"] + mlp["fc2"]["bias"]
            x = x + h
        x = np_ln(x, p["norm"])
        w = p["token_embedding"].T if tied else p["head_kernel"]
        hid.append(x)
        logits.append(x @ w + (p["head_bias"] if bias else 0.0))
    return np.stack(hid), np.stack(logits)


def close(a, b, tol=2e-5, name=""):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b)))
    assert err < tol, f"{name}: rel err {err:.2e}"


@pytest.mark.parametrize("tied,bias", [(True, False), (False, True)])
def test_matches_float64_reference_with_parallel_examples(tied, bias):
    model = make(tie_embeddings=tied, output_bias=bias, parallel_fraction=0.5)
    params = init(model)
    img = image_tokens(1)
    parallel = np.array([False, True, False])
    hid = model.apply({"params": params}, img, TOKENS, parallel=parallel)
    logits = model.apply({"params": params}, img, TOKENS, parallel=parallel, method="logits")
    w, b = model.apply({"params": params}, method="output_projection")
    ref_h, ref_logits = np_decoder(params, img, TOKENS, parallel, tied, bias)
    assert hid.shape == (B, L, W) and logits.shape == (B, L, V)
    close(hid, ref_h, name="hidden")
    close(logits, ref_logits, name="logits")
    assert w.shape == (W, V) and (b is None) == (not bias)
    if tied:
        np.testing.assert_array_equal(np.asarray(w), np.asarray(params["token_embedding"]).T)
    # No parallel examples: the plain autoregressive call agrees with the reference too.
    plain = model.apply({"params": params}, img, TOKENS)
    close(plain, np_decoder(params, img, TOKENS, np.zeros(B, bool), tied, bias)[0], name="causal")


def test_causality_and_shift():
    """Position i sees only tokens[:i]: changing token j changes positions > j, never <= j."""
    model = make()
    params = init(model)
    img = image_tokens()
    base = np.asarray(model.apply({"params": params}, img, TOKENS))
    changed = TOKENS.copy()
    changed[:, 3] = 11
    out = np.asarray(model.apply({"params": params}, img, changed))
    np.testing.assert_array_equal(out[:, :4], base[:, :4])
    assert np.all(np.abs(out[:, 4:] - base[:, 4:]).max(axis=(1, 2)) > 1e-4)
    # Shorter inputs use the first rows of the position embedding: a prefix gives the same states.
    close(model.apply({"params": params}, img, TOKENS[:, :4]), base[:, :4], name="prefix")


def test_parallel_draw_at_train_time():
    model = make(parallel_fraction=1.0)
    params = init(model)
    img = image_tokens()
    all_par = model.apply({"params": params}, img, TOKENS, train=True, rngs={"dropout": jax.random.key(0)})
    explicit = model.apply({"params": params}, img, TOKENS, parallel=np.ones(B, bool))
    np.testing.assert_array_equal(np.asarray(all_par), np.asarray(explicit))
    # A parallel example does not depend on its tokens at all.
    other = model.apply({"params": params}, img, TOKENS[::-1].copy(), parallel=np.ones(B, bool))
    np.testing.assert_array_equal(np.asarray(other), np.asarray(explicit))
    # Fraction 0.5: each example is drawn independently, so it is exactly one of the two modes,
    # and over a few draws both modes occur.
    half = make(parallel_fraction=0.5)
    hp = init(half)
    causal = np.asarray(half.apply({"params": hp}, img, TOKENS))
    par = np.asarray(half.apply({"params": hp}, img, TOKENS, parallel=np.ones(B, bool)))
    modes = []
    for seed in range(6):
        drawn = np.asarray(half.apply({"params": hp}, img, TOKENS, train=True, rngs={"dropout": jax.random.key(seed)}))
        for b in range(B):
            is_par, is_causal = np.array_equal(drawn[b], par[b]), np.array_equal(drawn[b], causal[b])
            assert is_par != is_causal
            modes.append(is_par)
    assert 0 < sum(modes) < len(modes)
    with pytest.raises(ValueError, match="parallel_fraction"):
        make().apply({"params": init(make())}, img, TOKENS, parallel=np.ones(B, bool))


def test_scan_equals_unscanned_and_logical_axes():
    flat = make(output_bias=True, tie_embeddings=False)
    scanned = make(output_bias=True, tie_embeddings=False, scan=True, remat="full")
    params = init(flat)
    stacked = {k: v for k, v in params.items() if not k.startswith("block_")}
    stacked["blocks"] = {"block": jax.tree.map(lambda *xs: np.stack(xs), *[params[f"block_{i}"] for i in range(DEPTH)])}
    img = image_tokens()
    a = flat.apply({"params": params}, img, TOKENS)
    b = scanned.apply({"params": stacked}, img, TOKENS)
    close(b, a, tol=1e-6, name="scan")
    specs = nn.get_partition_spec(scanned.init(jax.random.key(0), img, TOKENS))["params"]
    assert tuple(specs["token_embedding"]) == ("vocab", "embed")
    assert tuple(specs["pos_embedding"]) == ("length", "embed")
    assert tuple(specs["head_kernel"]) == ("embed", "vocab")
    assert tuple(specs["head_bias"]) == ("vocab",)
    assert tuple(specs["image_proj"]["kernel"]) == (None, "embed")
    assert tuple(specs["blocks"]["block"]["cross_attn"]["query"]["kernel"]) == ("layers", "embed", "heads", "kv")
    assert tuple(specs["blocks"]["block"]["mlp"]["fc1"]["kernel"]) == ("layers", "embed", "mlp")


def test_fused_loss_on_the_decoder_equals_dense_logits_cross_entropy():
    """Value and parameter gradients of the logits-free loss (tied embeddings: W is the
    embedding's transpose) equal the cross-entropy of :meth:`logits`, masked by tokens != 0."""
    model = make(output_bias=True, depth=1)
    params = init(model)
    img = image_tokens()
    mask = TOKENS != 0

    def fused(p):
        h = model.apply({"params": p}, img, TOKENS)
        w, b = model.apply({"params": p}, method="output_projection")
        return caption_loss(h, w, TOKENS, mask, b, vocab_block=5, token_block=7).loss

    def dense(p):
        logits = model.apply({"params": p}, img, TOKENS, method="logits")
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, TOKENS[..., None], axis=-1)[..., 0]
        return jnp.sum(nll * mask) / jnp.sum(mask)

    lf, gf = jax.jit(jax.value_and_grad(fused))(params)
    ld, gd = jax.jit(jax.value_and_grad(dense))(params)
    close(lf, ld, tol=1e-6, name="loss")
    for path, a in jax.tree_util.tree_leaves_with_path(gf):
        bleaf = gd
        for k in path:
            bleaf = bleaf[k.key]
        close(a, bleaf, tol=1e-5, name=jax.tree_util.keystr(path))
    assert np.abs(np.asarray(gf["token_embedding"])).max() > 0
