"""Converted PyTorch CLIP checkpoints give the PyTorch model's embeddings; export is exact.

The reference is ``tests/clip_reference.py``: the OpenAI CLIP ViT architecture written in
PyTorch for these tests (random weights, small widths), in OpenAI's and open_clip's key layouts.
"""
import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="PyTorch is not installed: the comparisons with a PyTorch reference CLIP need the [torch] "
    "extra (CI installs torch==2.13.0, CPU build); the safetensors path is tested in test_interop.py")

import clip_reference as ref_lib  # noqa: E402 (needs torch)

import contrastive_jax  # noqa: E402
from contrastive_jax import interop  # noqa: E402

MERGES = ["#version: 0.2", "h i", "t h", "th e</w>", "o g</w>", "d og</w>", "a t</w>", "c at</w>", "r e",
          "re d</w>"]
VOCAB = 514 + len(MERGES) - 1
# '!!' is two byte tokens, the first of which has id 0 -- the padding value -- inside the text.
TEXTS = ["the dog", "hi!! cat", "red red red cat dog the", "a", ""]
TOL = 1e-4


@pytest.fixture(scope="module")
def merges(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "merges.txt"
    path.write_text("\n".join(MERGES) + "\n")
    return str(path)


def _images(n=6, size=32, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3)).astype(np.float32)


def _reference_embeddings(ref, images, tokens, mean=interop.CLIP_MEAN, std=interop.CLIP_STD):
    x = (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    with torch.no_grad():
        img = ref.encode_image(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
        txt = ref.encode_text(torch.from_numpy(tokens).long()).numpy()
    return img, txt


def _numpy_state_dict(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def test_openai_torchscript_checkpoint_matches_pytorch(tmp_path, merges):
    ref = ref_lib.Clip(vocab=VOCAB).eval()
    # OpenAI's released .pt files are TorchScript archives; this one is too.
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.trace_module(ref, {"encode_image": torch.zeros(1, 3, 32, 32)}).save(str(path))
    # The TorchScript format is OpenAI's release format: QuickGELU, nothing assumed (no warning).
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*activation.*")
        model = contrastive_jax.load(path, vocab=merges, text_heads=4)
    text = model.config.model.text
    assert (model.config.model.image.act, text.act, text.eos_id, text.vocab_size) == (
        "quick_gelu", "quick_gelu", VOCAB - 1, VOCAB)
    assert model.config.model.image.num_heads == 2  # width 128 / 64
    tokens = model.tokenize(TEXTS)
    assert (tokens[1, 1:-1] == 0).any(), "a real id 0 inside the text exercises pooling at the EOS id"
    images = _images()
    want_img, want_txt = _reference_embeddings(ref, images, tokens)
    np.testing.assert_allclose(model.encode_images(images), want_img, atol=TOL)
    np.testing.assert_allclose(model.encode_texts(TEXTS), want_txt, atol=TOL)
    # uint8 input is the same image at 1/255 steps.
    u8 = np.round(images * 255).astype(np.uint8)
    want_u8, _ = _reference_embeddings(ref, u8.astype(np.float32) / 255.0, tokens)
    np.testing.assert_allclose(model.encode_images(u8), want_u8, atol=TOL)
    assert model.logit_scale == pytest.approx(float(np.exp(2.5)), rel=1e-6)


def test_open_clip_training_checkpoint_matches_pytorch(tmp_path, merges):
    ref = ref_lib.CustomTextClip(vocab=VOCAB, vision_width=96, vision_heads=3, act=torch.nn.GELU).eval()
    # An open_clip training checkpoint: wrapped, DDP 'module.' prefix, beside its hub-style config.
    sd = {f"module.{k}": v for k, v in ref.state_dict().items()}
    torch.save({"epoch": 3, "name": "tiny", "state_dict": sd}, tmp_path / "epoch_3.pt")
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": 48, "quick_gelu": False, "vision_cfg": {"width": 96, "head_width": 32},
                      "text_cfg": {"width": 64, "heads": 4}},
        "preprocess_cfg": {"mean": mean, "std": std}}))
    model = contrastive_jax.load(tmp_path / "epoch_3.pt", vocab=merges)
    assert model.config.model.image.act == "gelu_exact" and model.config.model.image.num_heads == 3
    assert float(model.params["bias"]) == pytest.approx(-7.5) and model.logit_scale == pytest.approx(np.exp(2.3), rel=1e-6)
    images = _images(seed=1)
    want_img, want_txt = _reference_embeddings(ref, images, model.tokenize(TEXTS), mean, std)
    np.testing.assert_allclose(model.encode_images(images), want_img, atol=TOL)
    np.testing.assert_allclose(model.encode_texts(TEXTS), want_txt, atol=TOL)


@pytest.mark.parametrize("layout", interop.LAYOUTS)
def test_export_round_trip_is_bit_exact_and_loads_into_pytorch(tmp_path, layout):
    cls = ref_lib.Clip if layout == "openai" else ref_lib.CustomTextClip
    ref = cls(vocab=VOCAB).eval()
    original = _numpy_state_dict(ref)
    model, params, _ = interop.convert_state_dict(original, act="quick_gelu", text_heads=4)
    config = interop.clip.run_config(model)
    exported = interop.export_state_dict(params, config.model, config.data.image_size, layout=layout)
    assert sorted(exported) == sorted(original)  # the same keys, no more
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
        assert np.array_equal(exported[key], value), key
    # Through a .pt file into a fresh PyTorch model (strict: every key, no extra).
    interop.write_state_dict(exported, tmp_path / "out.pt")
    fresh = cls(vocab=VOCAB, seed=123).eval()
    fresh.load_state_dict(torch.load(tmp_path / "out.pt", weights_only=True), strict=True)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, ref.state_dict()[key]), key


def test_half_precision_checkpoint_is_converted_exactly(tmp_path, merges):
    ref = ref_lib.Clip(vocab=VOCAB).eval()
    torch.save(ref.half().state_dict(), tmp_path / "half.bin")
    sd16 = interop.read_state_dict(tmp_path / "half.bin")
    assert sd16["visual.proj"].dtype == np.float16
    model, params, _ = interop.convert_state_dict(sd16, act="quick_gelu", text_heads=4)
    np.testing.assert_array_equal(params["image_proj"]["kernel"], sd16["visual.proj"].astype(np.float32))
    np.testing.assert_array_equal(params["text"]["token_embedding"],
                                  sd16["token_embedding.weight"].astype(np.float32))


def test_activation_without_a_config_comes_from_the_name_else_exact_gelu(tmp_path):
    # A plain state dict (torch.save, what open_clip writes) with no open_clip_config.json beside it.
    sd = ref_lib.Clip(vocab=VOCAB).state_dict()
    (tmp_path / "plain").mkdir()
    (tmp_path / "ViT-tiny-quickgelu").mkdir()
    torch.save(sd, tmp_path / "plain" / "weights.bin")
    torch.save(sd, tmp_path / "ViT-tiny-quickgelu" / "weights.bin")
    torch.save(sd, tmp_path / "plain" / "ViT-tiny-quickgelu.bin")
    with pytest.warns(UserWarning, match="assumed open_clip's default, exact GELU"):
        ckpt = interop.load_clip_checkpoint(tmp_path / "plain" / "weights.bin", text_heads=4)
    assert ckpt.config.model.image.act == ckpt.config.model.text.act == "gelu_exact"
    for path in (tmp_path / "ViT-tiny-quickgelu" / "weights.bin", tmp_path / "plain" / "ViT-tiny-quickgelu.bin"):
        ckpt = interop.load_clip_checkpoint(path, text_heads=4)
        assert ckpt.config.model.image.act == "quick_gelu" and ckpt.notes == [], path
    # A hub config without 'quick_gelu' means False in open_clip: exact GELU; act= overrides it.
    (tmp_path / "plain" / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 48}}))
    assert interop.load_clip_checkpoint(tmp_path / "plain" / "ViT-tiny-quickgelu.bin", text_heads=4
                                        ).config.model.image.act == "gelu_exact"
    assert interop.load_clip_checkpoint(tmp_path / "plain" / "weights.bin", text_heads=4, act="quick_gelu"
                                        ).config.model.text.act == "quick_gelu"
    with pytest.raises(ValueError, match="act='gelu'"):
        interop.load_clip_checkpoint(tmp_path / "plain" / "weights.bin", text_heads=4, act="gelu")
