"""Tests for contrastive_jax.models: shapes, normalization, scale/bias, pooling, axes, sharding."""
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax import models
from contrastive_jax.train.config import default_config

IMAGE_SIZE = 8
TEXT_LEN = 6
EXTRA_PAD = 3  # models are initialized with TEXT_LEN + EXTRA_PAD so shorter inputs are accepted
VOCAB = 20
BATCH = 8


def tiny_model_config(**overrides):
    """A small but complete config.model (every tower feature on, sizes cut down for CPU)."""
    cfg = default_config().model
    cfg.embed_dim = 16
    cfg.image.patch_size = 4
    cfg.image.width = 32
    cfg.image.depth = 2
    cfg.image.num_heads = 2
    cfg.image.mlp_dim = 64
    cfg.text.vocab_size = VOCAB
    cfg.text.width = 24
    cfg.text.depth = 2
    cfg.text.num_heads = 3
    cfg.text.mlp_dim = 48
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def sample_inputs(seed=0, batch=BATCH, length=TEXT_LEN):
    """images [B, 8, 8, 3] float32; texts [B, L] int32 with 1..L real tokens then pads (0)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    lengths = rng.integers(1, length + 1, size=batch)
    texts = rng.integers(1, VOCAB, size=(batch, length)).astype(np.int32)
    texts[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return images, texts


def pad_texts(texts, extra):
    return np.concatenate([texts, np.zeros((texts.shape[0], extra), np.int32)], axis=1)


def init_variables(model, seed=0):
    """Boxed variables; texts are padded at init so the context length is TEXT_LEN + EXTRA_PAD."""
    images, texts = sample_inputs()
    return jax.jit(model.init)(jax.random.key(seed), images, pad_texts(texts, EXTRA_PAD))


# Compiling a model's init is the slowest step on CPU (seconds), so each distinct param tree is
# initialized once per module (the default model); variants that differ only in computation
# (causal, dtype) reuse its params.
@pytest.fixture(scope="module")
def fp32_variables():
    return init_variables(models.build(tiny_model_config()))


@pytest.fixture(scope="module")
def fp32(fp32_variables):
    return models.build(tiny_model_config()), nn.meta.unbox(fp32_variables["params"])


@pytest.fixture(scope="module")
def apply_fn():
    # One jitted apply shared by all tests; the (hashable) model is static, so each model variant
    # compiles once per input shape.
    return jax.jit(lambda model, params, *args, **kw: model.apply({"params": params}, *args, **kw),
                   static_argnums=0, static_argnames=("method", "capture_intermediates"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_outputs_shapes_dtypes_and_unit_norm(fp32, apply_fn, dtype):
    ref_model, params = fp32
    model = models.build(tiny_model_config(dtype=dtype))
    images, texts = sample_inputs()
    out = apply_fn(model, params, images, texts)
    assert set(out) == {"image", "text", "scale", "bias"}
    for key in ("image", "text"):
        assert out[key].shape == (BATCH, 16) and out[key].dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(np.asarray(out[key]), axis=-1), 1.0, atol=1e-5)
    assert out["scale"].shape == () and out["bias"].shape == ()
    # Params are float32 whatever the compute dtype (same params serve both models here).
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    if dtype == "bfloat16":
        # Same weights, lower precision: must be the same function up to bf16 rounding, and
        # must actually differ (else compute did not happen in bf16).
        ref = apply_fn(ref_model, params, images, texts)
        for key in ("image", "text"):
            diff = np.abs(np.asarray(out[key]) - np.asarray(ref[key])).max()
            assert 0 < diff < 0.05, (key, diff)


def test_encode_methods_match_call(fp32, apply_fn):
    model, params = fp32
    images, texts = sample_inputs(seed=1)
    out = apply_fn(model, params, images, texts)
    img = apply_fn(model, params, images, method=models.TwoTower.encode_image)
    txt = apply_fn(model, params, texts, method="encode_text")
    np.testing.assert_allclose(img, out["image"], atol=1e-6)
    np.testing.assert_allclose(txt, out["text"], atol=1e-6)
    # Different inputs give different embeddings (guards against a constant output).
    assert np.abs(np.asarray(img[0]) - np.asarray(img[1])).max() > 1e-3


def test_siglip_scale_bias_init():
    model = models.build(tiny_model_config(scale_init=math.log(10.0), bias_init=-10.0))
    # Initializing through scale_and_bias creates only the two scalars (cheap to compile).
    variables = model.init(jax.random.key(0), method="scale_and_bias")
    params = nn.meta.unbox(variables["params"])
    assert set(params) == {"log_scale", "bias"}
    assert float(params["log_scale"]) == pytest.approx(math.log(10.0))
    scale, bias = model.apply(variables, method="scale_and_bias")
    assert float(scale) == pytest.approx(10.0, rel=1e-6)
    assert float(bias) == pytest.approx(-10.0)


def test_scale_clamped_at_max_scale(fp32, apply_fn):
    model, params = fp32
    images, texts = sample_inputs()
    below = dict(params, log_scale=jnp.asarray(math.log(50.0), jnp.float32))
    assert float(apply_fn(model, below, images, texts)["scale"]) == pytest.approx(50.0, rel=1e-5)
    above = dict(params, log_scale=jnp.asarray(10.0, jnp.float32))  # exp(10) ~ 22026 > 100
    assert float(apply_fn(model, above, images, texts)["scale"]) == pytest.approx(100.0, rel=1e-5)


def test_default_clip_scale(fp32, apply_fn):
    model, params = fp32
    out = apply_fn(model, params, *sample_inputs())
    assert float(out["scale"]) == pytest.approx(1 / 0.07, rel=1e-5)
    assert float(out["bias"]) == 0.0


def encode_text_with_hidden(apply_fn, model, params, texts):
    """Returns (embeddings [B, D], text encoder output [B, L, W]) from one call."""
    emb, state = apply_fn(model, params, texts, method="encode_text", capture_intermediates=True)
    return np.asarray(emb), np.asarray(state["intermediates"]["text"]["encoder"]["__call__"][0])


@pytest.mark.parametrize("causal", [True, False])
def test_text_pooling_ignores_padding(fp32, apply_fn, causal):
    model = models.build(tiny_model_config(**{"text.causal": causal}))
    params = fp32[1]
    _, texts = sample_inputs(seed=2)
    emb, hidden = encode_text_with_hidden(apply_fn, model, params, texts)
    emb_padded = apply_fn(model, params, pad_texts(texts, EXTRA_PAD), method="encode_text")
    np.testing.assert_allclose(emb, emb_padded, atol=1e-6)
    # Pooling is at the EOS token: recompute the embedding from the encoder output.
    eos = (texts != 0).sum(1) - 1
    proj = hidden[np.arange(len(texts)), eos] @ np.asarray(params["text_proj"]["kernel"])
    ref = proj / np.linalg.norm(proj, axis=-1, keepdims=True)
    np.testing.assert_allclose(emb, ref, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_causal_eos_state_ignores_later_tokens(fp32, apply_fn, causal):
    """EOS hidden state must not depend on tokens after it iff attention is causal."""
    model = models.build(tiny_model_config(**{"text.causal": causal}))
    _, texts = sample_inputs(seed=2)  # same shape as above: reuses the compiled function
    texts[0] = [5, 6, 7, 2, 0, 0]
    texts[1] = [5, 6, 7, 2, 9, 11]  # same prefix, extra (non-pad) tokens after position 3
    _, hidden = encode_text_with_hidden(apply_fn, model, fp32[1], texts)
    diff = np.abs(hidden[0, 3] - hidden[1, 3]).max()
    if causal:
        assert diff < 1e-6
    else:
        assert diff > 1e-4  # bidirectional attention sees the later tokens


@pytest.mark.parametrize("pool", ["gap", "cls"])
def test_image_pooling(fp32, apply_fn, pool):
    model = models.build(tiny_model_config(**{"image.pool": pool}))
    images, _ = sample_inputs(seed=3)
    params = fp32[1]
    if pool == "cls":
        # The 'cls' tree is the default tree plus image/cls [W]; add a random one instead of
        # compiling a second init (slow on CPU), after checking that this is the tree init makes.
        params = dict(params, image=dict(params["image"], cls=jnp.asarray(
            np.random.default_rng(0).normal(size=(32,)), jnp.float32)))
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, method="encode_image"), images)
    assert ("cls" in abstract["params"]["image"]) == (pool == "cls")
    assert jax.tree.structure(nn.meta.unbox(abstract["params"]["image"])) == jax.tree.structure(params["image"])
    emb, state = apply_fn(model, params, images, method="encode_image", capture_intermediates=True)
    hidden = np.asarray(state["intermediates"]["image"]["encoder"]["__call__"][0])  # [B, T, W]
    num_patches = (IMAGE_SIZE // 4) ** 2
    assert hidden.shape[1] == num_patches + (pool == "cls")
    pooled = hidden[:, 0] if pool == "cls" else hidden.mean(axis=1)
    proj = pooled @ np.asarray(params["image_proj"]["kernel"])
    np.testing.assert_allclose(emb, proj / np.linalg.norm(proj, axis=-1, keepdims=True), atol=1e-5)


def test_logical_axes_on_every_param():
    model = models.build(tiny_model_config(**{"image.pool": "cls"}))
    images, texts = sample_inputs()
    boxed = jax.eval_shape(model.init, jax.random.key(0), images, texts)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert len(leaves) > 20
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert len(leaf.names) == leaf.value.ndim and all(isinstance(n, str) for n in leaf.names)
    assert set(boxed) == {"image", "text", "image_proj", "text_proj", "log_scale", "bias"}
    specs = models.logical_param_axes(model, images, texts)
    assert specs["text"]["token_embedding"] == P("vocab", "embed")
    assert specs["image_proj"]["kernel"] == P("embed", "joint")
    assert specs["image"]["encoder"]["block_0"]["attn"]["query"]["kernel"] == P("embed", "heads", "kv")
    assert specs["text"]["encoder"]["block_1"]["mlp"]["fc1"]["kernel"] == P("embed", "mlp")
    assert specs["log_scale"] == P()


def test_boxed_and_unboxed_params_agree(fp32, fp32_variables, apply_fn):
    model, params = fp32
    images, texts = sample_inputs()
    a = jax.jit(model.apply)(fp32_variables, images, texts)  # boxed LogicallyPartitioned leaves
    b = apply_fn(model, params, images, texts)
    np.testing.assert_allclose(a["image"], b["image"], atol=1e-6)
    np.testing.assert_allclose(a["text"], b["text"], atol=1e-6)


# Every build-time config error names the field (its dotted path) and, for names and enumerated
# fields, lists the known values. (Merged with test_model_zoo's former
# test_bad_enumerated_fields_fail_at_build_naming_the_field: its cases are the enumerated ones.)
@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"image.name": "swin"}, r"model.image.name 'swin'.*known: resnet, vit"),
        ({"name": "clip"}, r"model.name 'clip'.*known: coca, distill, multiview, n_tower, slip, two_tower"),
        ({"image.name": "vit_b16"}, r"model.image.name 'vit_b16'"),  # no substring dispatch
        ({"text.name": "gpt"}, r"model.text.name 'gpt'.*known: transformer"),
        ({"dtype": "float16"}, r"model.dtype 'float16'"),
        ({"text.vocab_size": -1}, r"vocab_size"),
        ({"text.vocab_size": -1}, r"^model\.text\.vocab_size is -1; set it"),
        # Enumerated fields fail at build time, before anything compiles.
        ({"image.pool": "bogus"}, r"model\.image\.pool='bogus'; known"),
        ({"text.act": "swish"}, r"model\.text\.act='swish'; known"),
        ({"image.remat": "some"}, r"model\.image\.remat='some'; known"),
        ({"text.pool": "cls"}, r"model\.text\.pool='cls'; known"),
        ({"image.pool": "avg"}, r"model\.image\.pool='avg'; known: gap, cls, map$"),
        ({"image.posemb": "rope"}, r"model\.image\.posemb='rope'; known: learn, sincos2d$"),
        ({"image.stem": "conv7"}, r"model\.image\.stem='conv7'; known: patch, conv$"),
        ({"image.act": "swish"}, r"model\.image\.act='swish'; known: gelu, gelu_exact, quick_gelu, relu$"),
        ({"text.remat": "all"}, r"model\.text\.remat='all'; known: none, full, dots_saveable$"),
        ({"head": "deep"}, r"model\.head='deep'; known: linear, mlp$"),
        ({"image.name": "resnet"}, r"model\.image\.depth=2; known: 18, 34, 50, 101, 152$"),
        # Unknown keys in a group are rejected, naming the key.
        ({"image.pach_size": 4}, r"^model\.image\.pach_size: unknown field of VisionTransformer; known: .*patch_size"),
        ({"text.causual": False}, r"^model\.text\.causual: unknown field of TextTransformer"),
        ({"image.name": "resnet", "image.pach_size": 4}, r"^model\.image\.pach_size: unknown field of ResNet"),
        ({"embed_dims": 8}, r"^model\.embed_dims: unknown field of TwoTower; known: .*embed_dim"),
    ],
)
def test_build_errors_clearly(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        models.build(tiny_model_config(**overrides))


def test_text_longer_than_context_is_rejected(fp32):
    model, params = fp32
    texts = np.ones((2, TEXT_LEN + EXTRA_PAD + 1), np.int32)
    with pytest.raises(ValueError, match="context length"):
        model.apply({"params": params}, texts, method="encode_text")


def test_sincos_posemb_formula_and_no_param():
    from contrastive_jax.models.vit import sincos_2d_posemb

    pe = np.asarray(sincos_2d_posemb(3, 4, 8))
    assert pe.shape == (12, 8)
    # Hand formula: omega = 1 / 10000 ** (k / (D/4 - 1)), k = 0..D/4-1; row-major (y, x) grid.
    omega = 1.0 / 10000.0 ** (np.arange(2) / 1.0)
    for idx, (y, x) in enumerate((y, x) for y in range(3) for x in range(4)):
        want = np.concatenate([np.sin(x * omega), np.cos(x * omega), np.sin(y * omega), np.cos(y * omega)])
        np.testing.assert_allclose(pe[idx], want, atol=1e-6)
    assert len({tuple(np.round(r, 5)) for r in pe}) == 12  # every position distinguishable


@pytest.mark.parametrize("stem, posemb", [("conv", "learn"), ("conv", "sincos2d"), ("patch", "sincos2d")])
def test_vit_stem_and_posemb_options(stem, posemb):
    from contrastive_jax.models.vit import VisionTransformer

    vit = VisionTransformer(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64, stem=stem, posemb=posemb)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = vit.init(jax.random.key(1), images)
    params = variables["params"]
    assert ("pos_embedding" in params) == (posemb == "learn")
    assert any(k.startswith("stem_") for k in params) == (stem == "conv")
    if stem == "conv":
        assert sorted(k for k in params if k.startswith("stem_")) == ["stem_0", "stem_1", "stem_2"]  # log2(8)
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim
    out = vit.apply(variables, images)
    assert out.shape == (2, 32) and np.all(np.isfinite(np.asarray(out)))
    # The position embedding makes the tower position-aware: a shifted image gives other features.
    shifted = jnp.roll(images, 8, axis=2)
    assert not np.allclose(np.asarray(vit.apply(variables, shifted)), np.asarray(out), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Registries and schemas: every built-in kind listed once, defaults in one place, config checks
# ---------------------------------------------------------------------------------------------

BUILTIN_MODELS = ("two_tower", "coca", "n_tower", "distill", "multiview", "slip")
BUILTIN_REGISTRIES = dict(MODELS=sorted(BUILTIN_MODELS), IMAGE_TOWERS=["resnet", "vit"], TEXT_TOWERS=["transformer"],
                          ENCODERS=["mlp", "resnet", "signal", "transformer", "vit"])


def test_registries_are_literals_and_import_registers_nothing():
    import ast
    import pathlib
    import subprocess
    import sys

    pkg = pathlib.Path(models.__file__).parent
    # Every built-in model kind is written out in the one MODELS literal of build.py.
    tree = ast.parse((pkg / "build.py").read_text())
    literals = [n.value for n in tree.body if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "MODELS"]
    assert len(literals) == 1 and isinstance(literals[0], ast.Dict)
    assert [k.value for k in literals[0].keys] == list(BUILTIN_MODELS)
    # No module of the package registers anything, or stores into a registry, at import time.
    for path in pkg.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.Call):
                    called = getattr(sub.func, "id", getattr(sub.func, "attr", ""))
                    assert not called.startswith("register_"), (path.name, ast.unparse(sub))
                targets = sub.targets if isinstance(sub, ast.Assign) else []
                for t in targets:
                    assert not (isinstance(t, ast.Subscript) and getattr(t.value, "id", "") in BUILTIN_REGISTRIES), (
                        path.name, ast.unparse(sub))
    # A fresh interpreter: the registries hold exactly the literals after importing the package
    # and after importing each of its modules, and nothing heavy came in through the package.
    code = (
        "import importlib, pkgutil, sys\n"
        "import contrastive_jax.models as m\n"
        "names = ('MODELS', 'IMAGE_TOWERS', 'TEXT_TOWERS', 'ENCODERS')\n"
        "before = {r: sorted(getattr(m, r)) for r in names}\n"
        "heavy = sorted(k for k in ('grain', 'tensorflow', 'tensorflow_datasets', 'tqdm') if k in sys.modules)\n"
        "for info in pkgutil.iter_modules(m.__path__):\n"
        "    importlib.import_module('contrastive_jax.models.' + info.name)\n"
        "print(repr((before, {r: sorted(getattr(m, r)) for r in names}, heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, after, heavy = ast.literal_eval(out.strip().splitlines()[-1])
    assert before == after == BUILTIN_REGISTRIES
    assert heavy == []


def test_run_schema_defaults_are_the_module_defaults():
    """config.model lists every field of the modules it configures (so unknown keys are caught by
    the run schema), each with the module's own default; only fields a module requires get a
    default of the schema's."""
    from contrastive_jax.models import config as model_config_lib
    from contrastive_jax.models.schema import field_default, module_fields

    run = default_config().model
    # Groups other model kinds read (multiview: prototypes, multicrop; coca: decoder, caption,
    # self_distill, multicrop), checked by their own builders.
    config_only = {"name", "dtype", "matryoshka_dims", "image", "text", "modalities", "teacher", "towers",
                   "prototypes", "multicrop", "decoder", "caption", "self_distill"}
    cases = [(run, model_config_lib.TWO_TOWER, config_only),
             (run.image, model_config_lib.VIT, set(model_config_lib.GROUP_KEYS)),
             (run.text, model_config_lib.TEXT, set(model_config_lib.GROUP_KEYS)),
             (run.decoder, model_config_lib.DECODER, set())]
    for group, schema, extra_keys in cases:
        fields = {k: f for k, f in module_fields(schema.cls).items() if k not in schema.builder_fields}
        assert set(group.keys()) == set(fields) | extra_keys, schema.cls.__name__
        for key, f in fields.items():
            default = field_default(f)
            if default is dataclasses.MISSING:
                want = schema.required[key]
            else:
                want = 0 if default is None else default  # None is 0 in a config
            assert group[key] == want and type(group[key]) is type(want), (schema.cls.__name__, key)
    # N-tower encoders: the same defaults (a 'vit' entry = the model.image group's fields).
    image = {k: v for k, v in run.image.items() if k not in model_config_lib.GROUP_KEYS}
    assert models.encoder_defaults("vit") == image
    assert models.encoder_defaults("transformer") == {k: v for k, v in run.text.items()
                                                      if k not in model_config_lib.GROUP_KEYS}
    for kind, schema in [("resnet", model_config_lib.RESNET), ("signal", model_config_lib.SIGNAL),
                         ("mlp", model_config_lib.MLP)]:
        assert models.encoder_defaults(kind) == schema.defaults()


def test_every_registry_entry_builds_from_defaults():
    """Each built-in kind, tower and encoder builds from the defaults alone (plus the vocabulary
    size, which a run takes from its tokenizer), into the module its class defaults describe."""
    import copy

    import ml_collections

    from contrastive_jax.models import config as model_config_lib

    base = default_config().model
    base.text.vocab_size = VOCAB
    dtype = jnp.float32
    for name in ("two_tower", "multiview", "slip", "distill"):
        cfg = copy.deepcopy(base)
        cfg.name = name
        if name == "distill":
            cfg.teacher = ml_collections.ConfigDict(dict(text=dict(vocab_size=VOCAB)))
        model = models.build(cfg)
        assert tuple(model.modalities) == models.MODELS[name].input_names(cfg)
    # two_tower's fields are TwoTower's defaults and its towers those of ViT / TextTransformer.
    model = models.build(base)
    vit = models.VisionTransformer(**model_config_lib.VIT.required)
    text = models.TextTransformer(**dict(model_config_lib.TEXT.required, vocab_size=VOCAB))
    assert model == models.TwoTower(image=vit, text=text, **model_config_lib.TWO_TOWER.required)
    assert models.IMAGE_TOWERS["vit"](base.image, dtype) == vit
    assert models.TEXT_TOWERS["transformer"](base.text, dtype) == text
    # The default image group is a ViT's; a ResNet reads depth and width from it.
    resnet_group = copy.deepcopy(base.image)
    resnet_group.update(name="resnet", depth=50, width=64)
    assert models.IMAGE_TOWERS["resnet"](resnet_group, dtype) == models.ResNet()
    # n_tower: one tower per encoder kind, each entry naming only its kind.
    cfg = copy.deepcopy(base)
    cfg.name = "n_tower"
    cfg.towers = ml_collections.ConfigDict({k: dict(encoder=k) for k in models.ENCODERS})
    cfg.towers.transformer.vocab_size = VOCAB
    model = models.build(cfg)
    assert model.modalities == tuple(sorted(models.ENCODERS))
    for (name, encoder, _), builder in zip(model.towers, [models.ENCODERS[n][0] for n in model.modalities]):
        fields = dict(models.encoder_defaults(name), **({"vocab_size": VOCAB} if name == "transformer" else {}))
        assert encoder == builder(fields, dtype)
    assert model.towers[model.modalities.index("mlp")][1] == models.MlpEncoder(**model_config_lib.MLP.required)


def test_sample_inputs_cover_every_model_kind():
    """sample_inputs gives every built-in kind its inputs from the config alone (no model, no
    data batch), and those initialize the model."""
    import ml_collections

    data = default_config().data
    data.image_size = IMAGE_SIZE
    data.num_views = 3
    small = dict(width=8, depth=1, num_heads=2, mlp_dim=16)
    want = {"image": ((2, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32),
            "image_views": ((2, 3, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32),
            "text": ((2, int(data.max_text_len)), jnp.int32),
            "audio": ((2, 12, 2), jnp.float32)}
    for name in BUILTIN_MODELS:
        cfg = tiny_model_config(name=name)
        if name == "distill":
            cfg.teacher = ml_collections.ConfigDict(dict(
                embed_dim=8, image=dict(patch_size=4, **small), text=dict(vocab_size=VOCAB, **small)))
        if name == "coca":
            cfg.decoder = ml_collections.ConfigDict(dict(vocab_size=VOCAB, **small))
        if name == "n_tower":
            cfg.modalities = ("text", "image", "audio")
            cfg.towers = ml_collections.ConfigDict(dict(
                image=dict(encoder="vit", patch_size=4, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), **small),
                text=dict(encoder="transformer", vocab_size=VOCAB, input_shape=(int(data.max_text_len),),
                          input_dtype="int32", **small),
                audio=dict(encoder="signal", patch_size=4, input_shape=(12, 2), **small)))
        model = models.build(cfg)
        specs = models.sample_inputs(cfg, data, batch=2)  # the kind's inputs, not told the modalities
        assert specs == models.sample_inputs(cfg, data, batch=2, modalities=tuple(model.modalities)), name
        assert [(s.shape, s.dtype) for s in specs] == [want[m] for m in model.modalities], name
        variables = jax.eval_shape(model.init, jax.random.key(0), *specs)
        out = jax.eval_shape(model.apply, variables, *specs)
        for m in model.modalities:
            assert out[m].shape == ((2, 3, 16) if m == "image_views" else (2, 16)), (name, m)
        assert out["scale"].shape == () and out["bias"].shape == ()
        if name == "distill":
            assert out["teacher_image"].shape == out["teacher_text"].shape == (2, 8)


def test_build_module_converts_types_and_names_bad_values():
    from contrastive_jax.models.text import TextTransformer

    fields = dict(vocab_size=10.0, width=8, depth=1, num_heads=2, mlp_dim=16)
    # JSON / command-line forms: integral floats for ints, 0/1 for bools, ints for floats, lists
    # for tuples; a None default is 0 in a config.
    t = models.build_module(TextTransformer, dict(fields, context_length=0, scan=1, norm_eps=1), group="model.text")
    got = (t.vocab_size, type(t.vocab_size), t.context_length, t.scan, type(t.norm_eps))
    assert got == (10, int, None, True, float)
    assert models.build_module(TextTransformer, dict(fields, context_length=77)).context_length == 77
    for bad, pattern in [(dict(width=8.5), r"^model\.text\.width=8\.5 is not an integer$"),
                         (dict(scan="yes"), r"^model\.text\.scan='yes' is not a bool$"),
                         (dict(pool=3), r"^model\.text\.pool=3 is not a string$"),
                         (dict(norm_eps="1e-5"), r"^model\.text\.norm_eps='1e-5' is not a number$"),
                         (dict(kernel=3, stride=2), r"^model\.text\.kernel, model\.text\.stride: unknown fields")]:
        with pytest.raises(ValueError, match=pattern):
            models.build_module(TextTransformer, dict(fields, **bad), group="model.text")
    with pytest.raises(ValueError, match=r"^model\.text\.width is required"):
        models.build_module(TextTransformer, dict(vocab_size=10, depth=1, num_heads=2, mlp_dim=16), group="model.text")
    # Without a group, messages start with the field, for the caller to put the group's path first.
    with pytest.raises(ValueError, match=r"^kernel: unknown field of TextTransformer; known: .*vocab_size"):
        models.build_module(TextTransformer, dict(fields, kernel=3))
    # A schema may not state a second default for a field the module defaults, nor name a non-field.
    with pytest.raises(TypeError, match="has a default"):
        models.ModuleSchema(TextTransformer, required=dict(pool="eos"))
    with pytest.raises(TypeError, match="no field 'pooling'"):
        models.ModuleSchema(TextTransformer, choices=dict(pooling=("eos",)))


def test_distill_teacher_unknown_key_is_named():
    import ml_collections

    cfg = tiny_model_config(name="distill")
    cfg.teacher = ml_collections.ConfigDict(dict(image=dict(pach_size=4), text=dict(vocab_size=VOCAB)))
    with pytest.raises(ValueError, match=r"^model\.teacher\.image\.pach_size: unknown field; known: .*patch_size"):
        models.build(cfg)
    cfg.teacher = ml_collections.ConfigDict(dict(text=dict(vocab_size=VOCAB), dtype="float16"))
    with pytest.raises(ValueError, match=r"model\.teacher\.dtype 'float16'"):
        models.build(cfg)
