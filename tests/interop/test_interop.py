"""Interop without PyTorch (safetensors), model directories and the notebook API.

The comparisons with a PyTorch reference model are in ``test_interop_torch.py``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import contrastive_jax
from contrastive_jax import interop, models
from contrastive_jax.data.transforms import resize_center_crop
from contrastive_jax.interop.clip import run_config
from contrastive_jax.models.text import TextTransformer
from contrastive_jax.train.config import default_config, merge

MERGES = ["#version: 0.2", "t h", "th e</w>", "o g</w>", "d og</w>", "c a", "ca t</w>"]
VOCAB = 514 + len(MERGES) - 1


@pytest.fixture(scope="module")
def merges(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "merges.txt"
    path.write_text("\n".join(MERGES) + "\n")
    return str(path)


def _arch(**image):
    common = dict(act="quick_gelu", norm_eps=1e-5)
    return dict(
        embed_dim=32, image_size=32, logit_bias=False,
        image=dict(dict(name="vit", patch_size=8, width=64, depth=2, num_heads=2, mlp_dim=128, pool="cls",
                        cls_posemb=True, norm_pre=True, patch_bias=False, posemb="learn", stem="patch", **common),
                   **image),
        text=dict(name="transformer", vocab_size=VOCAB, context_length=12, width=64, depth=1, num_heads=2,
                  mlp_dim=128, causal=True, pool="eos", eos_id=VOCAB - 1, **common))


@pytest.fixture(scope="module")
def clip_model():
    """(config, module, params): a small OpenAI-architecture CLIP with every parameter random."""
    config = merge(default_config(), run_config(_arch()), source="test")
    module = models.build(config.model)
    params = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.ones((1, 12), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: np.asarray(a + rng.normal(0, 0.05, a.shape), np.float32), nn_unbox(params))
    params["bias"] = np.zeros((), np.float32)  # a softmax-loss CLIP has no logit bias
    return config, module, params


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].shape == fb[k].shape and np.array_equal(fa[k], fb[k]), k


def test_safetensors_export_import_round_trip_without_torch(tmp_path, clip_model, merges):
    config, module, params = clip_model
    for layout in interop.LAYOUTS:
        path = tmp_path / f"{layout}.safetensors"
        interop.save_clip_checkpoint(path, params, config, layout=layout)
        from safetensors.numpy import load_file  # an independent reader of the written file

        raw = load_file(str(path))
        assert interop.detect_layout(raw) == layout
        assert ("text.token_embedding.weight" in raw) == (layout == "open_clip")
        assert raw["visual.conv1.weight"].shape == (64, 3, 8, 8) and raw["logit_scale"].shape == ()
        ckpt = interop.load_clip_checkpoint(path, vocab=merges, act="quick_gelu", text_heads=2, image_heads=2)
        assert ckpt.layout == layout and ckpt.notes == []
        _assert_same_params(ckpt.params, params)
        assert ckpt.config.model.to_dict() == config.model.to_dict()
        assert ckpt.config.data.image_size == 32 and ckpt.config.data.max_text_len == 12
        # And back again: the file's tensors, bit for bit.
        again = interop.export_state_dict(ckpt.params, ckpt.config.model, 32, layout=layout)
        assert sorted(again) == sorted(raw) and all(np.array_equal(again[k], raw[k]) for k in raw)


def test_loaded_model_encodes_like_the_module(tmp_path, clip_model, merges):
    config, module, params = clip_model
    path = tmp_path / "clip.safetensors"
    interop.save_clip_checkpoint(path, params, config)
    model = contrastive_jax.load(path, vocab=merges, act="quick_gelu", text_heads=2, image_heads=2)
    images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    x = (images / 255.0 - np.asarray(interop.CLIP_MEAN)) / np.asarray(interop.CLIP_STD)
    want = module.apply({"params": params}, jnp.asarray(x, jnp.float32), method="encode_image")
    np.testing.assert_allclose(model.encode_images(images), want, atol=1e-5)
    texts = ["the dog", "a cat!", "dog dog the cat"]
    tokens = model.tokenize(texts)
    assert tokens[0, 0] == VOCAB - 2 and (tokens == VOCAB - 1).sum() == 3  # BOS ... EOS
    want = module.apply({"params": params}, jnp.asarray(tokens), method="encode_text")
    np.testing.assert_allclose(model.encode_texts(texts), want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(model.encode_texts(texts), axis=1), 1.0, atol=1e-5)

    # Scanned layers: the same function with stacked parameters.
    scanned = contrastive_jax.load(path, vocab=merges, act="quick_gelu", text_heads=2, image_heads=2, scan=True)
    assert scanned.params["image"]["encoder"]["blocks"]["block"]["mlp"]["fc1"]["kernel"].shape == (2, 64, 128)
    np.testing.assert_allclose(scanned.encode_images(images), model.encode_images(images), atol=1e-5)
    _assert_same_params(interop.unstack_layers(interop.clip.jax_to_numpy(scanned.params)), params)

    # Images of another size, as PIL images or arrays: resized and centre-cropped like evaluation.
    big = np.random.default_rng(2).integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)
    fitted = np.stack([np.asarray(resize_center_crop(Image.fromarray(b), 32)) for b in big])
    np.testing.assert_allclose(model.encode_images([Image.fromarray(b) for b in big]), model.encode_images(fitted),
                               atol=1e-6)
    np.testing.assert_allclose(model.encode_images(big), model.encode_images(fitted), atol=1e-6)
    np.testing.assert_allclose(model.encode_images(images.astype(np.float32) / 255.0), model.encode_images(images),
                               atol=1e-5)


def test_zero_shot_classifier_is_prompt_ensembling(tmp_path, clip_model, merges):
    config, _, params = clip_model
    path = tmp_path / "clip.safetensors"
    interop.save_clip_checkpoint(path, params, config)
    model = contrastive_jax.load(path, vocab=merges, act="quick_gelu", text_heads=2, image_heads=2)
    names, templates = ["dog", "cat", "the"], ["a {}", "the {} !"]
    clf = model.zero_shot_classifier(names, templates)
    # By hand: per class, the normalized mean of the normalized prompt embeddings.
    prompts = model.encode_texts([t.format(n) for n in names for t in templates]).reshape(3, 2, -1)
    mean = prompts.mean(axis=1)
    np.testing.assert_allclose(clf.class_embeddings, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-5)
    images = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    logits = model.logit_scale * model.encode_images(images) @ clf.class_embeddings.T
    probs = clf(images)
    want = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs, want / want.sum(1, keepdims=True), atol=1e-5)
    np.testing.assert_array_equal(clf.predict(images), logits.argmax(1))
    assert clf.predict_names(images) == [names[i] for i in logits.argmax(1)]
    assert model.zero_shot_classifier(names).templates == ["a photo of a {}."]
    # Embeddings encoded once serve every method; ready-made prompts per class; one template string.
    emb = model.encode_images(images)
    np.testing.assert_allclose(clf(embeddings=emb), probs, atol=1e-6)
    np.testing.assert_array_equal(clf.predict(embeddings=emb), logits.argmax(1))
    by_prompts = model.zero_shot_classifier(names, prompts=[[t.format(n) for t in templates] for n in names])
    np.testing.assert_allclose(by_prompts.class_embeddings, clf.class_embeddings, atol=1e-6)
    single = model.zero_shot_classifier(names, "the {} !")
    np.testing.assert_allclose(single.class_embeddings, model.encode_texts([f"the {n} !" for n in names]), atol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        model.zero_shot_classifier(names, ["no placeholder"])
    no_tok = contrastive_jax.load(path, act="quick_gelu", text_heads=2, image_heads=2)
    with pytest.raises(ValueError, match="vocab="):
        no_tok.encode_texts(["dog"])


def test_conversion_error_lists_every_problem(clip_model):
    config, _, params = clip_model
    sd = interop.export_state_dict(params, config.model, 32)
    sd["visual.extra_head.weight"] = np.zeros((3, 3), np.float32)
    del sd["ln_final.bias"]
    sd["visual.transformer.resblocks.1.mlp.c_fc.bias"] = np.zeros((7,), np.float32)
    with pytest.raises(interop.ConversionError) as err:
        interop.convert_state_dict(sd, act="quick_gelu")
    msg = str(err.value)
    assert "3 problem(s)" in msg
    assert "unmapped key 'visual.extra_head.weight' (3, 3)" in msg
    assert "missing key 'ln_final.bias'" in msg
    assert "'visual.transformer.resblocks.1.mlp.c_fc.bias' has shape (7,), expected (128,)" in msg
    with pytest.raises(interop.ConversionError, match="not a CLIP ViT state dict"):
        interop.convert_state_dict({"fc.weight": np.zeros((2, 2))})
    # A model the CLIP layout cannot express is refused by name.
    other = merge(default_config(), run_config(_arch(pool="gap")), source="test")
    with pytest.raises(interop.ConversionError, match="model.image.pool='gap'"):
        interop.export_state_dict(params, other.model, 32)


def test_model_directory_loads_everywhere(tmp_path, clip_model, merges):
    from contrastive_jax.parallel.mesh import make_mesh
    from contrastive_jax.train.checkpoint import load_params_from

    config, module, params = clip_model
    path = tmp_path / "clip.safetensors"
    interop.save_clip_checkpoint(path, params, config)
    ckpt = interop.load_clip_checkpoint(path, vocab=merges, act="quick_gelu", text_heads=2, image_heads=2)
    directory = ckpt.save(str(tmp_path / "model"))
    model = contrastive_jax.load(directory)
    _assert_same_params(jax.tree.map(np.asarray, model.params), params)
    assert model.tokenize(["the dog"]).tolist() == ckpt.tokenizer.encode(["the dog"]).tolist()
    # checkpoint.init_from reads it as it reads a training run.
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                                  jnp.ones((1, 12), jnp.int32)))["params"]
    abstract = nn_unbox(abstract)
    mesh = make_mesh([("data", 1)], jax.devices()[:1])
    shardings = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), abstract)
    loaded, taken = load_params_from(directory + ":image,image_proj", abstract, shardings)
    assert taken and all(t.startswith("image") for t in taken)
    np.testing.assert_array_equal(loaded["image_proj"]["kernel"], params["image_proj"]["kernel"])
    with pytest.raises(FileExistsError):
        ckpt.save(directory)
    # Its config.json is a config file for training from it.
    from contrastive_jax.train.config import load_config

    reused = load_config(directory + "/config.json", [f"checkpoint.init_from={directory}"])
    assert reused.model.to_dict() == ckpt.config.model.to_dict() and reused.data.mean == interop.CLIP_MEAN


def nn_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def test_text_tower_eos_id_pools_at_the_eos_token_whatever_the_other_ids():
    # CLIP's id 0 is a real token and also the padding: with eos_id set, the EOS output of a
    # causal tower depends only on the tokens up to EOS (by causality), so [BOS, 5, 0, 7, EOS]
    # padded with zeros equals the unpadded sequence, and a leading real 0 is attended to.
    kw = dict(vocab_size=20, width=16, depth=2, num_heads=2, mlp_dim=32, context_length=8)
    tower = TextTransformer(eos_id=19, **kw)
    padded = jnp.array([[18, 5, 0, 7, 19, 0, 0, 0]])
    params = tower.init(jax.random.key(0), padded)
    short = tower.apply(params, padded[:, :5])
    np.testing.assert_allclose(tower.apply(params, padded), short, atol=1e-6)
    # The pad-id convention (eos_id=-1) would mask the inner 0 and pool elsewhere: a different output.
    legacy = TextTransformer(**kw).apply(params, padded)
    assert np.abs(np.asarray(legacy) - np.asarray(short)).max() > 1e-3
    # Changing the inner 0 changes the output (it is text, not padding).
    changed = tower.apply(params, padded.at[0, 2].set(3))
    assert np.abs(np.asarray(changed) - np.asarray(short)).max() > 1e-3


def test_convert_command_imports_and_exports(tmp_path, clip_model, merges, capsys):
    from safetensors.numpy import load_file

    from contrastive_jax.cli import main

    config, _, params = clip_model
    src = tmp_path / "clip.safetensors"
    interop.save_clip_checkpoint(src, params, config)
    out = tmp_path / "converted"
    args = ["convert", str(src), str(out), "--vocab", merges, "--image-heads", "2", "--text-heads", "2"]
    assert main(args) == 0
    assert "QuickGELU" in capsys.readouterr().out  # the assumption is reported, not hidden
    assert main(args) == 2 and "exists" in capsys.readouterr().err  # never overwrites
    back = tmp_path / "back.safetensors"
    assert main(["convert", "--export", str(out), str(back), "--layout", "open_clip"]) == 0
    a, b = load_file(str(src)), load_file(str(back))
    assert sorted(b) == sorted(k if k.startswith(("visual.", "logit_")) else "text." + k for k in a)
    assert all(np.array_equal(a[k], b[k if k.startswith(("visual.", "logit_")) else "text." + k]) for k in a)
    assert main(["convert", str(tmp_path / "missing.pt"), str(tmp_path / "x")]) == 2
    # The converted directory evaluates like a run (its CLIP BPE tokenizer on the built-in data).
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), f"--config.data.data_dir={tmp_path / 'tfds'}",
                 "--config.data.num_train=32", "--config.data.num_validation=8", "--config.data.num_test=48",
                 "--config.eval.evaluators=['zero_shot','retrieval']"]) == 0
    import json

    printed = capsys.readouterr().out  # dataset generation prints before the JSON
    result = json.loads(printed[printed.index("{\n  \"eval\""):])
    assert result["eval"]["num_examples"] == 48 and 0.0 <= result["eval"]["zeroshot/color/top1"] <= 1.0
    assert "retrieval/image_to_text/R@1" in result["eval"]


@pytest.mark.parametrize("variant, width, layers, patch, t_width, embed, published", [
    ("vit_b32", 768, 12, 32, 512, 512, 151_277_313),
    ("vit_b16", 768, 12, 16, 512, 512, 149_620_737),
    ("vit_l14", 1024, 24, 14, 768, 768, 427_616_513),
])
def test_released_openai_shapes_convert_to_the_zoo_configs(variant, width, layers, patch, t_width, embed, published):
    """OpenAI's key list, written out here from the released architecture (its tensor sizes sum to
    the published parameter count), is exactly what the converter maps, and reads back as the
    model zoo's config -- checked on shapes alone (no 600 MB of weights)."""
    import os

    from contrastive_jax.train.config import load_config

    def block(prefix, w):
        return {f"{prefix}.ln_1.weight": (w,), f"{prefix}.ln_1.bias": (w,), f"{prefix}.attn.in_proj_weight": (3 * w, w),
                f"{prefix}.attn.in_proj_bias": (3 * w,), f"{prefix}.attn.out_proj.weight": (w, w),
                f"{prefix}.attn.out_proj.bias": (w,), f"{prefix}.ln_2.weight": (w,), f"{prefix}.ln_2.bias": (w,),
                f"{prefix}.mlp.c_fc.weight": (4 * w, w), f"{prefix}.mlp.c_fc.bias": (4 * w,),
                f"{prefix}.mlp.c_proj.weight": (w, 4 * w), f"{prefix}.mlp.c_proj.bias": (w,)}

    grid = 224 // patch
    shapes = {"visual.class_embedding": (width,), "visual.positional_embedding": (grid * grid + 1, width),
              "visual.proj": (width, embed), "visual.conv1.weight": (width, 3, patch, patch),
              "visual.ln_pre.weight": (width,), "visual.ln_pre.bias": (width,), "visual.ln_post.weight": (width,),
              "visual.ln_post.bias": (width,), "positional_embedding": (77, t_width),
              "text_projection": (t_width, embed), "logit_scale": (), "token_embedding.weight": (49408, t_width),
              "ln_final.weight": (t_width,), "ln_final.bias": (t_width,)}
    for i in range(layers):
        shapes.update(block(f"visual.transformer.resblocks.{i}", width))
    for i in range(12):
        shapes.update(block(f"transformer.resblocks.{i}", t_width))
    assert sum(int(np.prod(s)) for s in shapes.values()) == published
    views = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}  # no memory
    model, notes = interop.clip.infer_model_config(views, "openai", act="quick_gelu")
    rules = interop.clip._rules(model, "openai", logit_bias=False)
    assert {r.key: r.shape for r in rules} == shapes
    zoo = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "clip.py") + f":{variant}")
    config = merge(default_config(), run_config(model), source="test")
    for group in ("image", "text"):
        ours, theirs = config.model[group].to_dict(), zoo.model[group].to_dict()
        assert {k: v for k, v in ours.items() if k in theirs} == {k: theirs[k] for k in ours if k in theirs}, group
    assert (config.model.embed_dim, config.data.image_size, tuple(config.data.mean)) == (
        zoo.model.embed_dim, zoo.data.image_size, tuple(zoo.data.mean))
    assert config.data.tokenizer.bpe_merges == zoo.data.tokenizer.bpe_merges == 48894
