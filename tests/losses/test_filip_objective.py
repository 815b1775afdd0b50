"""FILIP as a trainable objective (``loss.name='filip'``): the objective equals ``filip_loss`` on the
model's tokens, 8 devices equal 1 (value and gradients), token pruning against an independent
reference, the towers' token outputs, config errors naming the field, and a tiny training run of
``configs/filip.py:tiny`` through the real loop."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from contrastive_jax import losses as L
from tests.losses.test_objectives_registry import cfg as registry_cfg
from contrastive_jax.losses.filip import filip_loss, keep_count, prune_tokens
from contrastive_jax.train import load_config
from test_filip import _reference, _unit

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FILIP_CONFIG = os.path.join(REPO, "configs", "filip.py")
B, LI, LT, D = 16, 6, 5, 8


def cfg(**fields):
    return registry_cfg("filip", **fields)


def model_outputs(seed=0):
    """A dict shaped like ``TwoTower(return_tokens=True)``'s outputs (masks float 1/0)."""
    rng = np.random.default_rng(seed)
    tm = rng.random((B, LT)) > 0.3
    tm[:, 0] = True
    tm[2] = False  # an all-padding caption
    return dict(
        image=jnp.asarray(_unit(rng.normal(size=(B, D))), jnp.float32),
        text=jnp.asarray(_unit(rng.normal(size=(B, D))), jnp.float32),
        image_tokens=jnp.asarray(_unit(rng.normal(size=(B, LI, D))), jnp.float32),
        text_tokens=jnp.asarray(_unit(rng.normal(size=(B, LT, D))), jnp.float32),
        image_token_mask=jnp.ones((B, LI), jnp.float32),
        text_token_mask=jnp.asarray(tm, jnp.float32),
        scale=jnp.float32(4.0), bias=jnp.float32(0.0),
    )


@pytest.mark.parametrize("impl,fraction", [("dense", 1.0), ("chunked", 0.5)])
def test_objective_equals_filip_loss_on_the_models_tokens(impl, fraction):
    out = model_outputs()
    obj = L.make_objective(cfg(impl=impl, **{"filip.block_size": 3, "filip.token_fraction": fraction}),
                           model_config={"return_tokens": True})
    loss, metrics = jax.jit(obj)(out, {})
    want = filip_loss(out["image_tokens"], out["text_tokens"], scale=out["scale"],
                      image_mask=out["image_token_mask"] > 0, text_mask=out["text_token_mask"] > 0,
                      impl="dense", token_fraction=fraction, image_embed=out["image"], text_embed=out["text"])
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    assert loss.dtype == jnp.float32 and metrics == {}


@pytest.mark.parametrize("impl,fraction", [("chunked", 1.0), ("chunked", 0.5), ("dense", 0.5)])
def test_eight_devices_equal_one_in_value_and_gradients(impl, fraction):
    out = model_outputs(1)
    c = cfg(impl=impl, **{"filip.block_size": 3, "filip.token_fraction": fraction})
    diff = ("image", "text", "image_tokens", "text_tokens", "scale")

    def run(mesh):
        obj = L.make_objective(c, mesh, ("data",) if mesh is not None else None)
        f = jax.jit(jax.value_and_grad(lambda o: obj(o, {})[0]))
        arrays = dict(out)
        if mesh is not None:
            sh = NamedSharding(mesh, P("data"))
            arrays = {k: (jax.device_put(v, sh) if v.ndim else v) for k, v in out.items()}
        loss, g = f(arrays)
        return float(loss), {k: np.asarray(g[k]) for k in diff}

    one, g1 = run(None)
    eight, g8 = run(Mesh(np.array(jax.devices()[:8]), ("data",)))
    np.testing.assert_allclose(eight, one, rtol=2e-6)
    for k in diff:
        np.testing.assert_allclose(g8[k], g1[k], atol=1e-6, err_msg=k)
    assert np.abs(g1["text_tokens"]).max() > 0


# ----------------------------------------------------------------------------------------------
# token pruning
# ----------------------------------------------------------------------------------------------


def test_keep_count_is_ceil_of_fraction_times_valid_tokens():
    assert [keep_count(0.5, n) for n in range(6)] == [0, 1, 1, 2, 2, 3]
    assert keep_count(0.3, 10) == 3  # 0.3 * 10 = 3.0000000000000004 in floating point
    assert keep_count(0.01, 7) == 1 and keep_count(1.0, 7) == 7 and keep_count(0.99, 4) == 4


def _np_prune(tok, mask, f, ref):
    """Independent float64 pruning: per example, its valid tokens ranked by <token, ref>
    (stable order for ties), the first ceil(f * n)."""
    out = []
    for t, m, r in zip(tok.astype(np.float64), mask, ref.astype(np.float64)):
        idx = np.flatnonzero(m)
        order = idx[np.argsort(-(t[idx] @ r), kind="stable")]
        n = len(idx)
        k = 0 if n == 0 else max(1, int(np.ceil(f * n - 1e-9)))
        out.append(t[np.sort(order[:k])])
    return out


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.8])
def test_pruned_loss_matches_a_reference_on_the_kept_tokens(fraction):
    rng = np.random.default_rng(3)
    Bq, Li, Lt, Dq = 5, 8, 6, 6
    x = _unit(rng.normal(size=(Bq, Li, Dq)))
    y = _unit(rng.normal(size=(Bq, Lt, Dq)))
    xm = rng.random((Bq, Li)) > 0.2
    xm[:, 0] = True
    ym = np.arange(Lt)[None] < rng.integers(1, Lt + 1, Bq)[:, None]  # trailing padding
    ex, ey = _unit(rng.normal(size=(Bq, Dq))), _unit(rng.normal(size=(Bq, Dq)))
    # Reference: prune in float64, pad the kept tokens to the longest and mask the rest.
    kx, ky = _np_prune(x, xm, fraction, ex), _np_prune(y, ym, fraction, ey)

    def packed(kept, L):
        arr, m = np.zeros((Bq, L, Dq)), np.zeros((Bq, L), bool)
        for i, k in enumerate(kept):
            arr[i, :len(k)], m[i, :len(k)] = k, True
        return arr, m

    (px, pxm), (py, pym) = packed(kx, Li), packed(ky, Lt)
    want = _reference(px, py, 3.0, pxm, pym, np.ones(Bq, bool))
    for impl in ("dense", "chunked"):
        got = filip_loss(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), scale=3.0, image_mask=xm,
                         text_mask=ym, impl=impl, block_size=2, token_fraction=fraction,
                         image_embed=jnp.asarray(ex, jnp.float32), text_embed=jnp.asarray(ey, jnp.float32))
        np.testing.assert_allclose(float(got), want, rtol=2e-6, atol=2e-6, err_msg=impl)
    # The kept tokens: K = ceil(f * L) slots, ceil(f * n_i) valid per example, the right ones.
    kept, kmask = prune_tokens(jnp.asarray(y, jnp.float32), jnp.asarray(ym), fraction, jnp.asarray(ey, jnp.float32))
    assert kept.shape == (Bq, keep_count(fraction, Lt), Dq)
    np.testing.assert_array_equal(np.asarray(kmask).sum(1), [keep_count(fraction, n) for n in ym.sum(1)])
    for i in range(Bq):
        got_rows = np.asarray(kept[i])[np.asarray(kmask[i])]
        np.testing.assert_allclose(sorted(map(tuple, got_rows)), sorted(map(tuple, ky[i])), atol=1e-6)


def test_fraction_one_changes_nothing_and_masked_tokens_are_never_kept():
    out = model_outputs(2)
    x, m = out["text_tokens"], out["text_token_mask"] > 0
    same, same_m = prune_tokens(x, m, 1.0)
    assert same is x and same_m is m
    kw = dict(scale=4.0, text_mask=m, impl="chunked", block_size=4)
    np.testing.assert_allclose(float(filip_loss(out["image_tokens"], x, token_fraction=1.0, **kw)),
                               float(filip_loss(out["image_tokens"], x, **kw)), rtol=0)
    # A padding token aligned exactly with the reference outranks every real token, yet is
    # never kept; an all-padding caption keeps nothing; no reference: the tokens' mean direction.
    ref = out["text"]
    poisoned = jnp.where(m[..., None], x, ref[:, None, :])
    kept, kmask = prune_tokens(poisoned, m, 0.5, ref)
    np.testing.assert_array_equal(np.asarray(kmask).sum(1), [keep_count(0.5, n) for n in np.asarray(m).sum(1)])
    assert not np.asarray(kmask[2]).any()
    for i in range(B):
        real = np.asarray(x[i])[np.asarray(m[i])]
        for row in np.asarray(kept[i])[np.asarray(kmask[i])]:
            assert np.isclose(np.abs(real - row).max(1), 0).any()  # a real token, not the poisoned pad
    kept0, _ = prune_tokens(x, m, 0.5)
    assert kept0.shape == (B, keep_count(0.5, LT), D)


# ----------------------------------------------------------------------------------------------
# the towers' token outputs and the config
# ----------------------------------------------------------------------------------------------


def test_return_tokens_adds_projected_unit_tokens_and_changes_nothing_else():
    from contrastive_jax import models

    c = load_config(FILIP_CONFIG + ":tiny")
    assert c.model.return_tokens and c.loss.name == "filip"
    c.model.text.vocab_size = 40
    with_tokens = models.build(c.model)
    c.model.return_tokens = False
    plain = models.build(c.model)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    texts = jnp.asarray([[5, 6, 7, 1, 0, 0], [9, 1, 0, 0, 0, 0]], jnp.int32)
    variables = plain.init(jax.random.key(0), images, texts)
    assert jax.tree.structure(with_tokens.init(jax.random.key(0), images, texts)) == jax.tree.structure(variables)
    a, b = plain.apply(variables, images, texts), with_tokens.apply(variables, images, texts)
    assert sorted(a) == ["bias", "image", "scale", "text"]
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    assert b["image_tokens"].shape == (2, 16, 32) and b["text_tokens"].shape == (2, 6, 32)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(b["text_tokens"]), axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(b["text_token_mask"]), np.asarray(texts) != 0)
    np.testing.assert_array_equal(np.asarray(b["image_token_mask"]), 1.0)
    # The same head as the pooled embedding: the text pools at EOS, so its EOS token IS the pooled one.
    np.testing.assert_allclose(np.asarray(b["text_tokens"][0, 3]), np.asarray(b["text"][0]), atol=1e-6)


@pytest.mark.parametrize("fields,match", [
    ({"filip.token_fraction": 0.0}, r"config\.loss\.filip\.token_fraction=0\.0 is invalid"),
    ({"filip.token_fraction": 1.5}, r"config\.loss\.filip\.token_fraction=1\.5 is invalid"),
    ({"filip.block_size": 0}, r"config\.loss\.filip\.block_size=0 is invalid"),
    ({"impl": "ring"}, r"config\.loss\.impl='ring' is not supported by config\.loss\.name='filip'"),
])
def test_bad_fields_are_named_in_one_line(fields, match):
    with pytest.raises(ValueError, match=match) as e:
        L.make_objective(cfg(**fields))
    assert "\n" not in str(e.value)


def test_a_model_without_tokens_is_a_config_error_and_bare_outputs_fall_back_to_clip():
    with pytest.raises(ValueError, match=r"config\.model\.return_tokens=True"):
        L.make_objective(cfg(), model_config={"return_tokens": False})
    out = model_outputs()
    pooled = {k: out[k] for k in ("image", "text", "scale", "bias")}
    with pytest.warns(UserWarning, match="return_tokens"):
        loss, _ = L.make_objective(cfg())(pooled, {})
    clip = L.softmax_contrastive_loss(out["image"], out["text"], scale=out["scale"])
    np.testing.assert_allclose(float(loss), float(clip), rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """configs/filip.py:tiny trained 6 steps through the real loop (batch 16 on the 8-device mesh)."""
    from contrastive_jax.train.loop import train

    tmp = tmp_path_factory.mktemp("filip")
    c = load_config(FILIP_CONFIG + ":tiny",
                    ["log.progress=false", "log.tensorboard=false", "train.total_steps=6", "train.log_every_steps=1",
                     "train.batch_size=16", "eval.every_steps=-1", "optim.warmup_steps=1", "data.num_train=96",
                     "data.num_validation=16", "data.num_test=16", "data.max_text_len=8"])
    c.data.data_dir = str(tmp / "tfds")
    summary = train(c, str(tmp / "run"))
    with open(tmp / "run" / "metrics.jsonl") as fh:
        losses = [json.loads(line)["train/loss"] for line in fh if "train/loss" in line]
    return tmp, summary, losses


def test_tiny_config_trains_through_the_loop(tiny_run):
    _, summary, losses = tiny_run
    assert summary["steps"] == 6
    assert len(losses) >= 5 and all(np.isfinite(losses))
    assert np.log(16) - 1.0 < losses[0] < np.log(16) + 2.0  # near chance at the start (scale 1/0.07)
    assert min(losses[-2:]) < losses[0]


def test_cli_train_with_a_bad_filip_field_exits_2_naming_it(tiny_run, capsys):
    from contrastive_jax.cli import main

    tmp, _, _ = tiny_run
    rc = main(["train", "--config", FILIP_CONFIG + ":tiny", "--workdir", str(tmp / "bad"),
               f"--config.data.data_dir={tmp / 'tfds'}", "--config.loss.filip.token_fraction=1.5",
               "--config.train.batch_size=16", "--config.data.num_train=96", "--config.data.num_validation=16",
               "--config.data.num_test=16", "--config.data.max_text_len=8", "--config.log.progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "config.loss.filip.token_fraction=1.5 is invalid" in err[0]
