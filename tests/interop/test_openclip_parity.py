"""open_clip models converted with ``contrastive_jax.load`` equal open_clip running in the test.

Each model is built by open_clip's own factory (``open_clip.create_model(name, pretrained=None)``:
random init, eval mode, fp32), saved as open_clip saves for its hub (``open_clip_pytorch_model.bin``
and, written by open_clip's ``save_config_for_hf``, ``open_clip_config.json`` with ``model_cfg``)
and as a bare ``.bin``, and loaded with ``contrastive_jax.load(path, vocab=<open_clip's packaged
bpe_simple_vocab_16e6.txt.gz>)``. Token ids must equal ``open_clip.get_tokenizer(name)``'s; image
and text embeddings (unit vectors) must be within 1e-5 of open_clip's ``encode_image`` /
``encode_text``. ``Model.export`` writes the params back and open_clip loads them with
``strict=True``: every tensor equal, the same embeddings.

Models: ``ViT-B-32`` (exact GELU, OpenAI key layout), ``ViT-B-16-quickgelu`` (QuickGELU, 197
tokens per image) and a small custom model with another context length, widths and head count,
built as open_clip's ``CustomTextCLIP`` (text tower under ``text.``).
"""
import copy
import json
import os
import warnings

import numpy as np
import pytest

open_clip = pytest.importorskip(
    "open_clip", reason="open_clip_torch is not installed: the parity tests run open_clip itself ([test] extra; "
    "CI installs torch==2.14.1 torchvision==0.29.1 from local files so that open_clip imports)")
import torch  # noqa: E402 (open_clip needs it)
from open_clip.push_to_hf_hub import save_config_for_hf  # noqa: E402

import contrastive_jax  # noqa: E402

VOCAB = open_clip.tokenizer.default_bpe()
TOL = 1e-5
TEXTS = ["a photo of a dog.", "A PHOTO of the Café Ångström &amp; Co — 3½ cats!", "",
         "日本語のテキスト 🐶 donâ€™t", "long " * 100 + "end", "it's a <end_of_text> inside"]
# Another context length, widths and heads than the released models (vision 3 heads of 64).
TINY = {"embed_dim": 96, "quick_gelu": False,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 192, "head_width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory):
    path = tmp_path_factory.mktemp("oc_cfg") / "Tiny-ctx32-test.json"
    path.write_text(json.dumps(TINY))
    open_clip.add_model_config(str(path))
    return "Tiny-ctx32-test"


def _build(name: str, custom_text: bool = False):
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None, force_custom_text=custom_text).eval()
    # Random init leaves some tensors at constants (zero biases, unit LayerNorm scales): perturb
    # every one, so a tensor mapped to the wrong place cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _save(model, name: str, directory, custom_text: bool) -> tuple[str, str]:
    """open_clip's hub layout, and a bare .bin of the same weights elsewhere."""
    hub = directory / "hub"
    hub.mkdir()
    torch.save(model.state_dict(), hub / "open_clip_pytorch_model.bin")
    model_config = dict(open_clip.get_model_config(name), **({"custom_text": True} if custom_text else {}))
    save_config_for_hf(model, hub / "open_clip_config.json", model_config=model_config)
    bare = directory / f"{name}.bin"
    os.link(hub / "open_clip_pytorch_model.bin", bare)  # the same bytes, without the folder's config
    return str(hub), str(bare)


def _reference(model, images: np.ndarray, tokens: np.ndarray):
    mean = np.asarray(model.visual.image_mean, np.float32)
    std = np.asarray(model.visual.image_std, np.float32)
    x = torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        return (model.encode_image(x, normalize=True).numpy(),
                model.encode_text(torch.from_numpy(tokens).long(), normalize=True).numpy())


def _images(size: int, n: int = 2) -> np.ndarray:
    return np.random.default_rng(size).uniform(0, 1, (n, size, size, 3)).astype(np.float32)


def _check(name, tmp_path, act, layout, custom_text=False):
    oc_model = _build(name, custom_text)
    hub, bare = _save(oc_model, name, tmp_path, custom_text)
    size = oc_model.visual.image_size[0]
    images = _images(size)
    want_tokens = open_clip.get_tokenizer(name)(TEXTS).numpy()
    want_img, want_txt = _reference(oc_model, images, want_tokens)
    model = contrastive_jax.load(hub, vocab=VOCAB)
    cfg = model.config.model
    assert (cfg.image.act, cfg.text.act) == (act, act)
    assert (model.image_size, cfg.text.context_length) == (size, want_tokens.shape[1])
    np.testing.assert_array_equal(model.tokenize(TEXTS), want_tokens)
    img, txt = model.encode_images(images), model.encode_texts(TEXTS)
    diffs = {"image": float(np.abs(img - want_img).max()), "text": float(np.abs(txt - want_txt).max())}
    print(f"{name}: max |ours - open_clip| on unit embeddings: {diffs}")
    assert max(diffs.values()) <= TOL, diffs
    # The bare .bin (no config beside it) converts to the same model -- the activation from the
    # name ('-quickgelu'), else open_clip's default (exact GELU) with a warning -- and the same
    # params, hence the same embeddings.
    with pytest.warns(UserWarning, match="assumed open_clip's default, exact GELU") if act == "gelu_exact" \
            else warnings.catch_warnings():
        bare_model = contrastive_jax.load(bare, vocab=VOCAB)
    assert bare_model.config.model.to_dict() == model.config.model.to_dict()
    np.testing.assert_array_equal(bare_model.tokenize(TEXTS), want_tokens)
    for a, b in zip(*(jax_leaves(m.params) for m in (model, bare_model))):
        np.testing.assert_array_equal(a, b)
    del bare_model
    # Export back: open_clip loads it strictly into a model of that name; every tensor is the
    # original. (A copy of open_clip's model with its tensors zeroed: the same module, no re-init.)
    out = tmp_path / "exported.bin"
    model.export(str(out), layout=layout)
    fresh = copy.deepcopy(oc_model)
    with torch.no_grad():
        for t in fresh.state_dict().values():
            t.zero_()
    fresh.load_state_dict(torch.load(out, weights_only=True), strict=True)
    original = oc_model.state_dict()
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, original[key]), key
    with torch.no_grad():
        again = fresh.encode_text(torch.from_numpy(want_tokens).long(), normalize=True).numpy()
    np.testing.assert_array_equal(again, want_txt)
    return hub, want_tokens, want_txt


def jax_leaves(params):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(params)]


def test_vit_b_32_exact_gelu(tmp_path):
    _check("ViT-B-32", tmp_path, "gelu_exact", "openai")


def test_vit_b_16_quickgelu(tmp_path):
    _check("ViT-B-16-quickgelu", tmp_path, "quick_gelu", "openai")


def test_custom_context_length_and_widths_custom_text(tmp_path, tiny_name, capsys):
    hub, want_tokens, want_txt = _check(tiny_name, tmp_path, "gelu_exact", "open_clip", custom_text=True)
    # The hub folder's safetensors form (what open_clip's save_for_hf writes too; read without PyTorch).
    from safetensors.torch import save_file

    st_hub = tmp_path / "hub_safetensors"
    st_hub.mkdir()
    save_file(torch.load(os.path.join(hub, "open_clip_pytorch_model.bin"), weights_only=True),
              str(st_hub / "open_clip_model.safetensors"))
    os.link(os.path.join(hub, "open_clip_config.json"), st_hub / "open_clip_config.json")
    np.testing.assert_allclose(contrastive_jax.load(st_hub, vocab=VOCAB).encode_texts(TEXTS), want_txt, atol=TOL)
    # `contrastive-jax convert HUB_FOLDER OUT`: the folder's config decides, no flags needed.
    from contrastive_jax.cli import main

    assert main(["convert", hub, str(tmp_path / "converted"), "--vocab", VOCAB]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["act"] == "gelu_exact" and summary["layout"] == "open_clip"
    model = contrastive_jax.load(tmp_path / "converted")
    np.testing.assert_array_equal(model.tokenize(TEXTS), want_tokens)
    np.testing.assert_allclose(model.encode_texts(TEXTS), want_txt, atol=TOL)
