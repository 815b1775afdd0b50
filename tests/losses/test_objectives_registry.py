"""config.loss -> objective: every registered name builds and runs on model-like outputs, bad
fields are rejected with the field named, the streamed objectives hold no [B, B] array, and
the example configs load and build."""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from contrastive_jax import losses as L
from contrastive_jax.losses import config as loss_config
from contrastive_jax.losses import objectives as O
from contrastive_jax.train import load_config
from test_losses import close
from test_losses_streaming import _big_2d_arrays

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
B, D = 8, 4


def unit(a):
    return a / jnp.linalg.norm(a, axis=-1, keepdims=True)


def outputs(seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    out = {n: unit(jax.random.normal(k[i], (B, D))) for i, n in enumerate(("image", "text", "attributes"))}
    out["image_views"] = unit(jax.random.normal(k[3], (B, 2, D)))
    out["scale"], out["bias"] = jnp.float32(5.0), jnp.float32(-2.0)
    batch = {"group": jnp.arange(B) // 2, "teacher_image": out["image"], "teacher_text": unit(out["text"] + 0.1)}
    return out, batch


def cfg(name, **fields):
    c = loss_config.defaults()
    c.name = name
    for k, v in fields.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


# Objectives that need more than pooled embeddings and a batch of labels: state across steps and
# their own model outputs (tests/losses/test_{isogclr,moco,swav,self_distill}.py) or a captioning
# model's outputs (tests/losses/test_multi_objective.py).
_OWN_TESTS = {"isogclr", "moco", "swav", "captioning", "self_distillation"}


@pytest.mark.parametrize("name", sorted(set(L.OBJECTIVES) - _OWN_TESTS))
def test_every_objective_builds_and_runs(name):
    # dense vs chunked values are compared in test_objectives.py; here: wiring, on chunked.
    impl = "chunked"
    if name == "matryoshka":
        c = cfg(name, impl=impl, block_size=3)
        obj = L.make_objective(c, model_config={"matryoshka_dims": (2, 4)})
    else:
        obj = L.make_objective(cfg(name, impl=impl, block_size=3))
    out, batch = outputs()
    loss, metrics = jax.jit(obj)(out, batch)
    assert loss.shape == () and loss.dtype == jnp.float32 and np.isfinite(float(loss))
    assert all(v.shape == () for v in metrics.values())


def test_matryoshka_with_one_full_prefix_equals_the_base():
    out, batch = outputs(1)
    base = L.make_objective(cfg("dcl"))(out, batch)[0]
    m = L.make_objective(cfg("matryoshka", **{"matryoshka.base": "dcl", "matryoshka.dims": (D,)}))(out, batch)[0]
    close(m, base, 1e-6)
    # Two prefixes with weights: the weighted sum of the base at each re-normalized prefix.
    m2 = L.make_objective(cfg("matryoshka", **{"matryoshka.base": "dcl", "matryoshka.dims": (2, D),
                                               "matryoshka.weights": (0.5, 2.0)}))(out, batch)[0]
    cut = {k: (unit(v[..., :2]) if getattr(v, "ndim", 0) >= 2 else v) for k, v in out.items()}
    close(m2, 0.5 * L.make_objective(cfg("dcl"))(cut, batch)[0] + 2.0 * base, 1e-6)


def test_slip_is_the_weighted_sum_and_regularizers_add():
    out, batch = outputs(2)
    s = L.make_objective(cfg("slip", **{"simclr.clip_weight": 0.5, "simclr.ssl_weight": 2.0}))(out, batch)[0]
    clip = L.softmax_contrastive_loss(out["image"], out["text"], scale=out["scale"])
    ssl = O.nt_xent_loss(out["image_views"], scale=10.0)[0]
    close(s, 0.5 * clip + 2.0 * ssl, 1e-6)
    r, met = L.make_objective(cfg("softmax", align_weight=0.3, uniform_weight=0.2))(out, batch)
    al = O.alignment(out["image"], out["text"])
    un = 0.5 * (O.uniformity(out["image"]) + O.uniformity(out["text"]))
    close(r, clip + 0.3 * al + 0.2 * un, 1e-6)
    close(met["alignment"], al, 1e-6)


@pytest.mark.parametrize("name,fields,match", [
    ("symile", {"impl": "chunked", "symile.negatives": "n_squared"}, "impl='chunked' is not supported by symile"),
    ("symile", {"symile.negatives": "all"}, "config.loss.symile.negatives"),
    ("cwcl", {"cwcl.target_fn": "cosine"}, "config.loss.cwcl.target_fn"),
    ("dclw", {"dclw_sigma": 0.0}, "config.loss.dclw_sigma"),
    ("hard_negative", {"hard_negative.tau_plus": 1.0}, "config.loss.hard_negative.tau_plus"),
    ("matryoshka", {}, "matryoshka_dims"),
    ("matryoshka", {"matryoshka.dims": (2,), "matryoshka.base": "nope"}, "config.loss.matryoshka.base"),
    ("nope", {}, "unknown config.loss.name"),
])
def test_bad_fields_are_named(name, fields, match):
    with pytest.raises(ValueError, match=match):
        L.make_objective(cfg(name, **fields))


def test_missing_batch_key_is_named():
    out, batch = outputs()
    del batch["group"]
    with pytest.raises(KeyError, match="group"):
        L.make_objective(cfg("multi_positive"))(out, batch)


@pytest.mark.parametrize("name,impl", [("hard_negative", "dense"),  # control: the check sees one
                                       ("hard_negative", "chunked"), ("distill", "chunked"),
                                       ("multi_positive", "chunked"), ("dcl", "ring")])
def test_streamed_objective_holds_no_b_by_b_array(name, impl):
    Bq, Dq, block = 2048, 16, 128
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    sh = NamedSharding(mesh, P("data"))
    obj = L.make_objective(cfg(name, impl=impl, block_size=block), mesh, ("data",))

    def f(x, y):
        out = {"image": x, "text": y, "scale": jnp.float32(5.0), "bias": jnp.float32(0.0)}
        return obj(out, {"group": jnp.arange(Bq) // 4, "teacher_image": y, "teacher_text": x})[0]

    spec = jax.ShapeDtypeStruct((Bq, Dq), jnp.float32, sharding=sh)
    text = jax.jit(jax.grad(f, argnums=(0, 1))).lower(spec, spec).compile().as_text()
    big = _big_2d_arrays(text, block * 2)
    assert bool(big) == (impl == "dense"), f"{name}/{impl}: [B, B]-sized arrays in the HLO: {big}"


CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.py")) if not p.endswith("quickstart.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_example_configs_load_and_build_their_objective(path):
    c = load_config(path)
    L.make_objective(c.loss, model_config=c.model, train_steps=int(c.train.total_steps))


@pytest.mark.parametrize("name", ["simclr"])
def test_example_config_trains_two_steps(tmp_path, name):
    # SimCLR exercises the most new pieces at once: the image-only multiview model, the data's
    # image_views and the NT-Xent objective streamed over the 8-device mesh.
    from contrastive_jax.train.loop import train

    c = load_config(os.path.join(REPO, "configs", f"{name}.py") + ":tiny",
                    ["log.progress=false", "log.tensorboard=false", "train.total_steps=2", "train.batch_size=16", "eval.every_steps=-1",
                     "data.num_train=64", "data.num_validation=16", "data.num_test=16"])
    c.data.data_dir = str(tmp_path / "tfds")
    summary = train(c, str(tmp_path / "run"))
    assert summary["steps"] == 2
    with open(tmp_path / "run" / "metrics.jsonl") as fh:
        losses = [json.loads(line)["train/loss"] for line in fh if "train/loss" in line]
    assert losses and all(np.isfinite(losses))
    # Image-only model: the text-based evaluators are skipped, the image ones run.
    assert "knn/color/top1" in summary["eval"] and "diag/image/rankme" in summary["eval"]
    assert not any(k.startswith(("zeroshot/", "retrieval/")) for k in summary["eval"])
