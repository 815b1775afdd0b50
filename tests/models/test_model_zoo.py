"""Model zoo: published parameter counts, sharding modes, remat/scan, N towers, new layers."""
import copy
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from contrastive_jax import models, parallel
from contrastive_jax.train.config import default_config, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_params(cfg, data):
    model = models.build(cfg)
    return jax.eval_shape(model.init, jax.random.key(0), *models.sample_inputs(cfg, data))["params"]


def openai_clip_count(image_width, layers, patch, heads_unused, text_width, embed, image_size=224,
                      vocab=49408, ctx=77, text_layers=12):
    """OpenAI CLIP parameter count from its module list (Radford et al. 2021, model.py)."""
    def block(w):  # in_proj (3 w^2 + 3w), out_proj, ln_1, c_fc, c_proj, ln_2
        return 3 * w * w + 3 * w + w * w + w + 2 * w + w * 4 * w + 4 * w + 4 * w * w + w + 2 * w
    grid = (image_size // patch) ** 2
    visual = (3 * patch * patch * image_width + image_width + (grid + 1) * image_width + 2 * image_width
              + layers * block(image_width) + 2 * image_width + image_width * embed)
    text = vocab * text_width + ctx * text_width + text_layers * block(text_width) + 2 * text_width + text_width * embed
    return visual + text + 1  # + logit_scale


@pytest.mark.parametrize(
    "variant, published_m, hand",
    [
        ("vit_b32", 151.28, (768, 12, 32, 12, 512, 512)),
        ("vit_b16", 149.62, (768, 12, 16, 12, 512, 512)),
        ("vit_l14", 427.62, (1024, 24, 14, 16, 768, 768)),
    ],
)
def test_openai_clip_parameter_counts(variant, published_m, hand):
    cfg = load_config(os.path.join(ROOT, "configs", "clip.py") + f":{variant}")
    params = abstract_params(cfg.model, cfg.data)  # eval_shape: nothing is allocated
    # Ours has one extra scalar, the SigLIP bias (unused by the softmax loss).
    n = count(params) - 1
    assert round(n / 1e6, 2) == published_m
    assert n == openai_clip_count(*hand)
    assert params["image"]["pos_embedding"].value.shape[0] == (224 // hand[2]) ** 2 + 1


@pytest.mark.parametrize("depth, published", [(18, 11_689_512), (50, 25_557_032)])
def test_resnet_trunk_parameter_counts(depth, published):
    """torchvision's ResNet-18/50 totals minus their 1000-class classifier (2048·1000 + 1000 for
    ResNet-50, 512·1000 + 1000 for ResNet-18); GroupNorm has BatchNorm's scale+bias params."""
    net = models.ResNet(depth=depth)
    params = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    feat = 2048 if depth == 50 else 512
    assert count(params) == published - (feat * 1000 + 1000)
    out = jax.eval_shape(net.apply, {"params": params}, jnp.zeros((2, 64, 64, 3)))
    assert out.shape == (2, feat)


def test_resnet_blocks_start_as_identity():
    """The last norm of each residual branch starts at zero scale (Goyal et al. 2017), so a block
    without a projection shortcut computes relu(x) at init; a strided block does not."""
    from contrastive_jax.models.resnet import _Block

    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    block = _Block("bottleneck", 4, 1, jnp.float32)
    out, _ = jax.jit(block.init_with_output)(jax.random.key(1), x)
    np.testing.assert_allclose(out, jax.nn.relu(x), atol=1e-6)
    down = _Block("basic", 16, 2, jnp.float32)
    assert jax.eval_shape(down.init_with_output, jax.random.key(1), x)[0].shape == (2, 4, 4, 16)


# ---------------------------------------------------------------------------------------------
# Sharding modes, remat and scan: the same function on every mesh / option.
# ---------------------------------------------------------------------------------------------

def tiny_cfg(**image_text):
    cfg = default_config().model
    cfg.embed_dim = 16
    cfg.image.update(patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64, pool="map")
    cfg.text.update(vocab_size=24, width=32, depth=2, num_heads=4, mlp_dim=64)
    for k, v in image_text.items():
        cfg.image[k] = v
        cfg.text[k] = v
    return cfg


def tiny_inputs(batch=8):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch, 8, 8, 3)).astype(np.float32)
    texts = rng.integers(1, 24, size=(batch, 6)).astype(np.int32)
    texts[::2, 4:] = 0
    return images, texts


@pytest.fixture(scope="module")
def reference():
    cfg = tiny_cfg()
    model = models.build(cfg)
    images, texts = tiny_inputs()
    boxed = jax.jit(model.init)(jax.random.key(0), images, texts)["params"]
    params = nn.meta.unbox(boxed)
    out = jax.jit(model.apply)({"params": params}, images, texts)
    return cfg, boxed, params, out


MESHES = {
    "data": ([("data", 8)], "data"),
    "fsdp": ([("data", 2), ("fsdp", 4)], "fsdp"),
    "tensor": ([("data", 2), ("model", 4)], "tensor"),
    "fsdp_tensor": ([("fsdp", 2), ("model", 4)], "fsdp_tensor"),
    "regex_fsdp": ([("data", 2), ("fsdp", 4)], ""),
}


# Also holds what test_models.py's former data-parallel test_sharded_forward_matches_single_device
# checked (inputs really split over 8 devices, outputs batch-sharded, scale/bias replicated, and
# its tighter tolerance for the pure data-parallel case).
@pytest.mark.parametrize("mode", list(MESHES))
def test_sharded_forward_matches_single_device(reference, mode):
    cfg, boxed, params, want = reference
    spec, logical = MESHES[mode]
    mesh = parallel.make_mesh(spec)
    sharding_cfg = default_config().sharding
    sharding_cfg.logical_rules = logical
    shardings = parallel.param_shardings(boxed, sharding_cfg, mesh)
    specs = [s.spec for s in jax.tree.leaves(shardings)]
    wanted_axis = {"data": None, "fsdp": "fsdp", "tensor": "model", "fsdp_tensor": "model", "regex_fsdp": "fsdp"}[mode]
    if wanted_axis is None:
        assert all(a is None for s in specs for a in s)
    else:  # the mode really splits parameters
        assert any(wanted_axis in tuple(s) for s in specs)
    if mode == "tensor":
        q = shardings["image"]["encoder"]["block_0"]["attn"]["query"]["kernel"].spec
        fc1 = shardings["text"]["encoder"]["block_1"]["mlp"]["fc1"]["kernel"].spec
        assert q == P(None, "model", None) and fc1 == P(None, "model")
    model = models.build(cfg)
    batch_sh = parallel.batch_sharding(mesh, sharding_cfg.batch_axes)
    replicated = NamedSharding(mesh, P())
    images, texts = (jax.device_put(x, batch_sh) for x in tiny_inputs())
    assert len(images.sharding.device_set) == 8 and len(texts.sharding.device_set) == 8
    fn = jax.jit(parallel.with_activation_rules(lambda p, i, t: model.apply({"params": p}, i, t), sharding_cfg, mesh),
                 in_shardings=(shardings, batch_sh, batch_sh),
                 out_shardings=dict(image=batch_sh, text=batch_sh, scale=replicated, bias=replicated))
    got = fn(jax.device_put(params, shardings), images, texts)
    assert got["image"].sharding.mesh.size == 8 or len(got["image"].sharding.device_set) == 8
    atol = 1e-5 if mode == "data" else 2e-5
    for k in ("image", "text", "scale", "bias"):
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=atol, rtol=0)


def test_activation_constraints_are_applied():
    """Under the tensor preset the MLP hidden activations are split over 'model' in the HLO."""
    mesh = parallel.make_mesh([("data", 2), ("model", 4)])
    sharding_cfg = default_config().sharding
    sharding_cfg.logical_rules = "tensor"
    block = models.MlpBlock(64)
    x = jnp.ones((4, 6, 32))
    v = block.init(jax.random.key(0), x)
    fn = jax.jit(parallel.with_activation_rules(block.apply, sharding_cfg, mesh))
    hlo = fn.lower(v, x).as_text()
    assert "sharding_constraint" in hlo and '[{"data"}, {}, {"model"}]' in hlo
    rules = dict(parallel.logical_rules(sharding_cfg, mesh))
    assert rules["act_mlp"] == "model" and rules["batch"] == "data" and rules.get("embed") is None


def stack_blocks(tower_params, depth):
    """Unscanned encoder params (block_i) -> scanned layout (blocks/block with a [depth] axis)."""
    enc = dict(tower_params["encoder"])
    blocks = [enc.pop(f"block_{i}") for i in range(depth)]
    enc["blocks"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    return dict(tower_params, encoder=enc)


def _loss(model, params, images, texts):
    out = model.apply({"params": params}, images, texts)
    return jnp.sum(out["image"] @ out["text"].T * jnp.arange(8.0)[:, None])


@pytest.fixture(scope="module")
def reference_grads(reference):
    cfg, _, params, _ = reference
    model = models.build(cfg)
    return jax.jit(jax.grad(lambda p, i, t: _loss(model, p, i, t)))(params, *tiny_inputs())


# Two cases cover all three options (each case compiles a forward and a backward).
@pytest.mark.parametrize("remat, scan", [("dots_saveable", False), ("full", True)])
def test_remat_and_scan_give_the_same_forward_and_gradients(reference, reference_grads, remat, scan):
    cfg, _, params, want = reference
    model = models.build(tiny_cfg(remat=remat, scan=scan))
    g_ref = reference_grads
    if scan:
        params = dict(params, image=stack_blocks(params["image"], 2), text=stack_blocks(params["text"], 2))
        g_ref = dict(g_ref, image=stack_blocks(g_ref["image"], 2), text=stack_blocks(g_ref["text"], 2))
        abstract = jax.eval_shape(model.init, jax.random.key(0), *tiny_inputs())["params"]
        assert jax.tree.structure(nn.meta.unbox(abstract)) == jax.tree.structure(params)
        names = abstract["image"]["encoder"]["blocks"]["block"]["mlp"]["fc1"]["kernel"].names
        assert names == ("layers", "embed", "mlp")
    images, texts = tiny_inputs()
    got = jax.jit(model.apply)({"params": params}, images, texts)
    for k in ("image", "text"):
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=2e-5)
    g = jax.jit(jax.grad(lambda p: _loss(model, p, images, texts)))(params)
    assert jax.tree.structure(g) == jax.tree.structure(g_ref)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
    # remat really recomputes: the backward HLO contains the checkpoint's recomputation.
    if remat != "none":
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: _loss(model, p, images, texts)))(params))
        assert "remat" in jaxpr or "checkpoint" in jaxpr


# ---------------------------------------------------------------------------------------------
# N towers and generic encoders
# ---------------------------------------------------------------------------------------------

def three_tower_config():
    """The documented example shape of a 3-modality (e.g. Symile) model config."""
    cfg = default_config().model
    cfg.name = "n_tower"
    cfg.embed_dim = 16
    cfg.modalities = ("image", "audio", "tabular")
    cfg.towers = ml_collections.ConfigDict(dict(
        image=dict(encoder="vit", patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, input_shape=(8, 8, 3)),
        audio=dict(encoder="signal", patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, pool="cls",
                   input_shape=(32, 2)),
        tabular=dict(encoder="mlp", width=16, depth=1, input_shape=(5,), head="mlp", head_hidden=8),
    ))
    return cfg


def test_three_tower_model():
    cfg = three_tower_config()
    model = models.build(cfg)
    assert model.modalities == ("image", "audio", "tabular")
    specs = models.sample_inputs(cfg, batch=4)
    assert [s.shape for s in specs] == [(4, 8, 8, 3), (4, 32, 2), (4, 5)]
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=s.shape).astype(np.float32) for s in specs]
    variables = jax.jit(model.init)(jax.random.key(0), *inputs)
    params = variables["params"]
    assert set(params) == {"image", "audio", "tabular", "image_proj", "audio_proj", "tabular_proj", "log_scale", "bias"}
    assert set(params["tabular_proj"]) == {"fc1", "fc2"} and params["tabular_proj"]["fc1"]["kernel"].value.shape == (16, 8)
    out = jax.jit(model.apply)(variables, *inputs)
    assert set(out) == {"image", "audio", "tabular", "scale", "bias"}
    encode = jax.jit(lambda v, x, name: model.apply(v, name, x, method="encode"), static_argnums=2)
    for name, x in zip(model.modalities, inputs):
        assert out[name].shape == (4, 16) and out[name].dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(np.asarray(out[name]), axis=-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(encode(variables, x, name), out[name], atol=1e-6)
    assert float(out["scale"]) == pytest.approx(1 / 0.07, rel=1e-5)
    # Default order = sorted names.
    cfg2 = copy.deepcopy(cfg)
    cfg2.modalities = ()
    assert models.build(cfg2).modalities == ("audio", "image", "tabular")


def test_n_tower_config_errors():
    cfg = three_tower_config()
    cfg.towers.audio.kernel = 3
    with pytest.raises(ValueError, match=r"model.towers.audio.kernel"):
        models.build(cfg)
    cfg = three_tower_config()
    cfg.towers.audio.encoder = "wav2vec"
    with pytest.raises(ValueError, match=r"model.towers.audio.encoder 'wav2vec'.*known: mlp, resnet, signal"):
        models.build(cfg)
    cfg = three_tower_config()
    cfg.modalities = ("image", "audio")
    with pytest.raises(ValueError, match="must list exactly the towers"):
        models.build(cfg)


def test_register_model_and_encoder():
    class Constant(nn.Module):
        width: int

        @nn.compact
        def __call__(self, x, *, train=False):
            return jnp.broadcast_to(self.param("v", nn.initializers.ones, (self.width,)), (x.shape[0], self.width))

    models.register_encoder("constant_test", lambda cfg, dtype: Constant(cfg.width), dict(width=4))
    try:
        cfg = default_config().model
        cfg.name = "n_tower"
        cfg.embed_dim = 4
        cfg.towers = ml_collections.ConfigDict(dict(a=dict(encoder="constant_test", width=3, input_shape=(2,))))
        m = models.build(cfg)
        out = m.init_with_output(jax.random.key(0), jnp.zeros((2, 2)))[0]
        assert out["a"].shape == (2, 4)
        models.register_model("alias_test", lambda c, dtype: models.build(cfg))
        cfg2 = copy.deepcopy(cfg)
        cfg2.name = "alias_test"
        assert models.build(cfg2).modalities == ("a",)
        # A kind registered without its inputs is taken to be image-text; with them, sample_inputs
        # gives their shapes (here a tower's input_shape) without being told the modalities.
        assert models.MODELS["alias_test"].input_names(cfg2) == ("image", "text")
        models.register_model("alias_test", lambda c, dtype: models.build(cfg), modalities=("a",))
        assert models.MODELS["alias_test"](cfg2, jnp.float32).modalities == ("a",)
        assert models.sample_inputs(cfg2, batch=3) == (jax.ShapeDtypeStruct((3, 2), jnp.float32),)
        # A bare builder stored into MODELS directly still builds, and is taken to be image-text.
        models.MODELS["alias_test"] = lambda c, dtype: models.build(cfg)
        assert models.build(cfg2).modalities == ("a",)
        data = default_config().data
        want = [(1, data.image_size, data.image_size, 3), (1, data.max_text_len)]
        assert [s.shape for s in models.sample_inputs(cfg2, data)] == want
    finally:  # leave the registries as the other tests expect them, whatever happened above
        models.ENCODERS.pop("constant_test")
        models.MODELS.pop("alias_test", None)


def test_register_encoder_from_module_schema():
    """The documented way to add an encoder: a ModuleSchema of the module class gives both the
    builder and the defaults, so entries are checked against the class's fields."""
    class Scaled(nn.Module):
        width: int
        scale: float = 2.0

        @nn.compact
        def __call__(self, x, *, train=False):
            return self.scale * nn.Dense(self.width, use_bias=False)(x)

    schema = models.ModuleSchema(Scaled, required=dict(width=4))
    assert schema.defaults() == dict(width=4, scale=2.0)
    models.register_encoder("scaled_test", schema.build, schema.defaults())
    try:
        cfg = default_config().model
        cfg.name = "n_tower"
        cfg.towers = ml_collections.ConfigDict(dict(a=dict(encoder="scaled_test", scale=3, input_shape=(2,))))
        model = models.build(cfg)
        assert model.towers[0][1] == Scaled(width=4, scale=3.0)
        cfg.towers = ml_collections.ConfigDict(dict(a=dict(encoder="scaled_test", scale="big", input_shape=(2,))))
        with pytest.raises(ValueError, match=r"^model\.towers\.a\.scale='big' is not a number$"):
            models.build(cfg)
    finally:
        models.ENCODERS.pop("scaled_test")


# ---------------------------------------------------------------------------------------------
# Layers: activations, patch dropout, MAP pooling, text pooling
# ---------------------------------------------------------------------------------------------

def test_activation_formulas():
    x = np.linspace(-4, 4, 41)
    from math import erf
    np.testing.assert_allclose(models.ACTIVATIONS["quick_gelu"](jnp.asarray(x)), x / (1 + np.exp(-1.702 * x)), atol=1e-6)
    exact = np.array([0.5 * v * (1 + erf(v / math.sqrt(2))) for v in x])
    np.testing.assert_allclose(models.ACTIVATIONS["gelu_exact"](jnp.asarray(x)), exact, atol=1e-6)
    np.testing.assert_allclose(models.ACTIVATIONS["gelu"](jnp.asarray(x)), exact, atol=2e-3)  # tanh approx.


def test_patch_dropout_keeps_an_ordered_random_subset():
    from contrastive_jax.models.vit import patch_dropout

    b, n, w = 4, 16, 3
    x = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[None, :, None], (b, n, w))
    y = np.asarray(patch_dropout(x, 0.75, jax.random.key(0)))
    assert y.shape == (b, 4, w)  # round(16 * 0.25)
    idx = y[:, :, 0]
    assert np.all(np.diff(idx, axis=1) > 0)  # distinct, original order
    assert len({tuple(r) for r in idx}) > 1  # independent per example
    assert patch_dropout(x, 0.0, jax.random.key(0)).shape == (b, n, w)


def test_vit_patch_dropout_only_at_train_time():
    vit = models.VisionTransformer(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, patch_dropout=0.5)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    v = jax.jit(vit.init)(jax.random.key(1), x)
    full = models.VisionTransformer(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32)
    ref = jax.jit(full.apply)(v, x)
    np.testing.assert_allclose(jax.jit(vit.apply)(v, x), ref, atol=1e-6)  # eval: every patch
    train = jax.jit(lambda v, x, key: vit.apply(v, x, train=True, rngs={"dropout": key}))
    a = train(v, x, jax.random.key(2))
    b = train(v, x, jax.random.key(3))
    assert not np.allclose(np.asarray(a), np.asarray(ref), atol=1e-4)
    assert not np.allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_map_pooling_is_permutation_invariant_and_respects_mask():
    head = models.MAPHead(num_heads=2, mlp_dim=16)
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    v = jax.jit(head.init)(jax.random.key(1), x)
    apply = jax.jit(head.apply)
    y = apply(v, x)
    assert y.shape == (2, 8)
    perm = np.array([3, 0, 4, 1, 2])
    np.testing.assert_allclose(apply(v, x[:, perm]), y, atol=1e-5)
    mask = jnp.asarray([True, True, True, False, False])[None, None, None, :]
    junk = x.at[:, 3:].set(100.0)
    np.testing.assert_allclose(apply(v, junk, mask), apply(v, x[:, :3]), atol=1e-5)


def test_text_last_pooling_reads_last_position():
    t = models.TextTransformer(vocab_size=10, width=8, depth=1, num_heads=2, mlp_dim=16, causal=False, pool="last")
    tokens = jnp.asarray([[3, 4, 5, 0, 0], [1, 2, 3, 4, 5]])
    v = jax.jit(t.init)(jax.random.key(0), tokens)
    out, state = jax.jit(lambda v, x: t.apply(v, x, capture_intermediates=True))(v, tokens)
    hidden = state["intermediates"]["encoder"]["__call__"][0]
    np.testing.assert_allclose(out, hidden[:, -1], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Counting: FLOPs and the inspect command
# ---------------------------------------------------------------------------------------------

def transformer_forward_flops(tokens, width, depth, mlp):
    """Hand count of a pre-norm encoder's matmul FLOPs for one sequence."""
    qkv_out = 4 * 2 * tokens * width * width
    attention = 2 * (2 * tokens * tokens * width)
    mlp_flops = 2 * 2 * tokens * width * mlp
    return depth * (qkv_out + attention + mlp_flops)


def test_training_flops_match_hand_count():
    from contrastive_jax.models.inspect import model_summary

    cfg = tiny_cfg(pool="gap")
    cfg.text.pool = "eos"
    model = models.build(cfg)
    inputs = (jax.ShapeDtypeStruct((3, 8, 8, 3), jnp.float32), jax.ShapeDtypeStruct((3, 6), jnp.int32))
    s = model_summary(model, inputs, batch_size=64)
    tokens = (8 // 4) ** 2
    image = tokens * 2 * (4 * 4 * 3) * 32 + transformer_forward_flops(tokens, 32, 2, 64) + 2 * 32 * 16
    text = transformer_forward_flops(6, 32, 2, 64) + 2 * 32 * 16  # embedding lookup: no FLOPs
    assert s["towers"]["image"]["train_flops_per_example"] == 3 * image
    assert s["towers"]["text"]["train_flops_per_example"] == 3 * text
    assert s["loss_train_flops_per_example"] == 6 * 64 * 16
    assert s["train_flops_per_example"] == 3 * (image + text) + 6 * 64 * 16
    params = jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"]
    assert s["towers"]["image"]["params"] == count(params["image"]) + count(params["image_proj"])
    assert s["total_params"] == count(params)


def test_scan_and_remat_do_not_change_counted_flops():
    from contrastive_jax.models.inspect import model_summary

    inputs = (jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32), jax.ShapeDtypeStruct((2, 6), jnp.int32))
    plain = model_summary(models.build(tiny_cfg()), inputs)
    scanned = model_summary(models.build(tiny_cfg(scan=True, remat="full")), inputs)
    assert plain["train_flops_per_example"] == scanned["train_flops_per_example"] > 0


def test_inspect_command_prints_published_counts(capsys):
    from contrastive_jax import cli

    assert cli.main(["inspect", "--config", os.path.join(ROOT, "configs", "clip.py") + ":vit_b32", "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["total_params"] == 151_277_313 + 1
    assert set(out["towers"]) == {"image", "text"} and out["inputs"]["image"] == [224, 224, 3]
    # ViT-B/32 at 224 px: 4.4 GMACs forward (as timm lists it) = 8.8 GFLOPs; training 3x that.
    assert 26.0e9 < out["towers"]["image"]["train_flops_per_example"] < 27.0e9
    assert cli.main(["inspect", "--config", os.path.join(ROOT, "configs", "clip.py") + ":vit_b32",
                     "--config.model.nope=1"]) == 2
