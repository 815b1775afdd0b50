"""Hugging Face ``transformers`` CLIP / SigLIP / SigLIP 2 folders: loaded, converted and exported,
compared with ``transformers`` itself running here.

Models are ``CLIPModel`` / ``SiglipModel`` built from small configs (random weights, eval, fp32)
and written with ``save_pretrained`` together with tokenizers built from local files: CLIP's
byte-level BPE and SigLIP 2's Gemma BPE trained with ``tokenizers`` (through transformers'
``train_new_from_iterator``), SigLIP's ``spiece.model`` trained with ``sentencepiece`` in the test.
"""
import json
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the transformers comparisons need PyTorch (the [torch] extra)")
transformers = pytest.importorskip("transformers", reason="the transformers comparisons need the [hf] extra")
spm = pytest.importorskip("sentencepiece", reason="SigLIP's tokenizer needs sentencepiece")

import contrastive_jax  # noqa: E402
from contrastive_jax.evaluate.zero_shot import load_templates  # noqa: E402
from contrastive_jax.interop import hf as hf_lib  # noqa: E402

TOL = 1e-5
# CLIP's 80 ImageNet prompt templates (shipped with the package).
TEMPLATES = load_templates("imagenet")
CLASSES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray", "stingray",
           "cock", "hen", "ostrich", "brambling", "goldfinch", "house finch", "junco", "indigo bunting",
           "robin", "bulbul", "jay", "magpie", "chickadee", "water ouzel", "kite", "bald eagle", "vulture",
           "great grey owl", "European fire salamander", "common newt", "eft", "spotted salamander",
           "axolotl", "bullfrog", "tree frog", "tailed frog", "loggerhead", "leatherback turtle", "mud turtle",
           "terrapin", "box turtle", "banded gecko", "common iguana", "American chameleon", "whiptail",
           "agama", "frilled lizard", "alligator lizard", "Gila monster", "green lizard", "African chameleon",
           "Komodo dragon", "African crocodile", "cat", "dog", "teddy bear", "jack-o'-lantern", "T-shirt",
           "café au lait", "crème brûlée", "piñata", "Zürich tram", "São Paulo bus"]
ODD = ["", " ", "   ", "\t\n", "½ cup", "x² + y²", "٠١٢٣٤٥٦٧٨٩ items", "۱۲۳", "3.14159", "1,000,000",
       "No. 42", "猫が好きです", "我爱北京天安门", "한국어 텍스트", "🐶🐱 emoji 🎉", "👩‍👩‍👧 family",
       "Tom &amp; Jerry", "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp; twice", "cafÃ© mojibake", "â€œquotedâ€\x9d",
       "naïve résumé", "Ångström", "ﬁ ligature", "ＦＵＬＬ width", "UPPER CASE", "MiXeD CaSe",
       "don't won't it's", "e-mail: a@b.c", "path/to/file.jpg", "(paren) [brack] {brace}",
       "tabs\tand\nnewlines", "‘curly’ “quotes”", "em—dash – en", "…ellipsis", "___",
       "▁sentencepiece▁marker", "hello</s>world", "<unk> token", "<|endoftext|> inside", "<pad>",
       "zero\u200bwidth"]


def _corpus(n: int = 10_400, seed: int = 0) -> list[str]:
    """CLIP's templates x ImageNet-style class names, case / punctuation / numerals / scripts / emoji /
    HTML entities / mojibake / whitespace variants, very long texts and empty strings."""
    rng = random.Random(seed)
    texts = [t.format(c) for t in TEMPLATES for c in CLASSES] + ODD
    while len(texts) < n:
        base = rng.choice(texts[: len(TEMPLATES) * len(CLASSES)])
        kind = rng.randrange(7)
        if kind == 0:
            base = base.upper() if rng.random() < 0.5 else base.title()
        elif kind == 1:
            base = base + rng.choice(["!", "?!", "...", " :)", " #tag", " (2023)", " ½", " ٣", " 🙂", " &amp; co"])
        elif kind == 2:
            base = " ".join([base] * rng.randrange(5, 40))  # longer than any context: truncated
        elif kind == 3:
            base = rng.choice(ODD) + " " + base
        elif kind == 4:
            base = base.replace(" ", rng.choice(["  ", "\t", " \n "]))
        elif kind == 5:
            base = base.encode("utf-8").decode("latin-1")  # mojibake of non-ASCII names
        texts.append(base)
    return texts


CORPUS = _corpus()


def _train_texts() -> list[str]:
    return CORPUS[::3] + ODD * 5


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """save_pretrained folders of three tokenizers built here: {'clip', 'siglip', 'siglip2'}."""
    root = tmp_path_factory.mktemp("hf_tokenizers")
    clip = transformers.CLIPTokenizer().train_new_from_iterator(_train_texts(), vocab_size=700)
    clip.save_pretrained(root / "clip")
    sp_prefix = str(root / "sp")
    # SigLIP's spiece.model layout: <pad> 0, </s> 1, <unk> 2, no BOS.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_train_texts()), model_prefix=sp_prefix, vocab_size=400,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram",
                                   character_coverage=0.9995, hard_vocab_limit=False, minloglevel=2)
    transformers.SiglipTokenizer(sp_prefix + ".model").save_pretrained(root / "siglip")
    gemma = transformers.GemmaTokenizer().train_new_from_iterator(_train_texts(), vocab_size=600)
    gemma.add_bos_token, gemma.add_eos_token = False, True
    gemma.save_pretrained(root / "siglip2")
    # As google/siglip2-*'s tokenizer_config.json: EOS appended, no BOS (transformers rebuilds the
    # post-processor from these flags; so must we).
    cfg_path = root / "siglip2" / "tokenizer_config.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), add_bos_token=False, add_eos_token=True)))
    return {k: root / k for k in ("clip", "siglip", "siglip2")}


def _hf_ids(folder, texts, length):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    out = tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="np")
    return out["input_ids"].astype(np.int64), out.get("attention_mask")


@pytest.mark.parametrize("name", ["clip", "siglip", "siglip2"])
def test_tokenizer_ids_equal_transformers_on_10k_strings(tokenizer_dirs, name):
    from contrastive_jax.data.hf_tokenizer import hf_folder_tokenizer

    length = 16
    ours = hf_folder_tokenizer(str(tokenizer_dirs[name]), length)
    ref, _ = _hf_ids(tokenizer_dirs[name], CORPUS, length)
    got = ours.encode(CORPUS)
    assert len(CORPUS) >= 10_000 and got.shape == ref.shape == (len(CORPUS), length)
    bad = np.flatnonzero((got != ref).any(axis=1))
    assert bad.size == 0, [(CORPUS[i], got[i].tolist(), ref[i].tolist()) for i in bad[:3]]
    # Truncation keeps EOS: every over-long text still ends (before padding) with EOS.
    long = [i for i, t in enumerate(CORPUS) if len(t) > 200]
    assert long and all(ours.eos_id in got[i] for i in long)
    # Saved and read back as a model directory's tokenizer.json: the same ids.
    path = tokenizer_dirs[name] / "ours.json"
    ours.save(path)
    from contrastive_jax.data.tokenizer import load_tokenizer
    np.testing.assert_array_equal(load_tokenizer(path).encode(CORPUS[:500]), got[:500])


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------

def _tower(width, layers, heads, mlp, **kw):
    return dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp, **kw)


def _clip_folder(root, tok_dir, act):
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    config = transformers.CLIPConfig(
        text_config=_tower(32, 2, 4, 64, vocab_size=len(tok), max_position_embeddings=16, hidden_act=act,
                           eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=_tower(48, 2, 4, 96, image_size=32, patch_size=8, hidden_act=act), projection_dim=24)
    return _save(transformers.CLIPModel(config), tok, root)


def _siglip_folder(root, tok_dir, image_size):
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    config = transformers.SiglipConfig(
        text_config=_tower(48, 2, 4, 64, vocab_size=len(tok), max_position_embeddings=16,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None),
        vision_config=_tower(48, 2, 4, 96, image_size=image_size, patch_size=8))
    return _save(transformers.SiglipModel(config), tok, root)


def _save(model, tok, root):
    torch.manual_seed(0)
    model = model.eval()
    with torch.no_grad():  # the default init leaves LayerNorms at 1/0 and biases at 0: randomize everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return model


def _images(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _features(out):
    return out if torch.is_tensor(out) else out.pooler_output


def _hf_embeddings(model, images, ids, mask, mean, std):
    x = (images.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    with torch.no_grad():
        img = _features(model.get_image_features(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())))
        kw = {} if mask is None else {"attention_mask": torch.from_numpy(np.asarray(mask))}
        txt = _features(model.get_text_features(input_ids=torch.from_numpy(ids), **kw))
    unit = lambda a: (a / a.norm(dim=-1, keepdim=True)).numpy()  # noqa: E731
    return unit(img), unit(txt)


TEXTS = CORPUS[:40:3] + ["", "a photo of a dog", " ".join(["long"] * 50), "猫 🐱 &amp; ½"]


def _check_parity(model, hf_model, folder, mask_text, image_size, mean, std):
    images = _images(5, image_size)
    ids, mask = _hf_ids(folder, TEXTS, model.tokenizer.max_len)
    np.testing.assert_array_equal(model.tokenize(TEXTS), ids)
    ref_img, ref_txt = _hf_embeddings(hf_model, images, ids, mask if mask_text else None, mean, std)
    img, txt = model.encode_images(images), model.encode_texts(TEXTS)
    assert np.abs(img - ref_img).max() <= TOL and np.abs(txt - ref_txt).max() <= TOL, (
        np.abs(img - ref_img).max(), np.abs(txt - ref_txt).max())
    return img, txt


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_folder_loads_with_transformers_embeddings(tmp_path, tokenizer_dirs, act):
    hf_model = _clip_folder(tmp_path / "clip", tokenizer_dirs["clip"], act)
    model = contrastive_jax.load(tmp_path / "clip")
    m = model.config.model
    assert (m.image.act, m.image.pool, m.text.pool, m.text.eos_id, model.activation) == (
        {"quick_gelu": "quick_gelu", "gelu": "gelu_exact"}[act], "cls", "eos", hf_model.config.text_config.eos_token_id,
        "softmax")
    # transformers' own usage: the tokenizer's attention mask passed (causal + padding).
    _check_parity(model, hf_model, tmp_path / "clip", True, 32, hf_lib.CLIP_MEAN, hf_lib.CLIP_STD)


@pytest.mark.parametrize("name,image_size", [("siglip", 32), ("siglip2", 36)])
def test_siglip_folder_loads_with_transformers_embeddings(tmp_path, tokenizer_dirs, name, image_size):
    # siglip2 at 36 px with 8 px patches: the strided patch convolution ignores the last 4 pixels.
    hf_model = _siglip_folder(tmp_path / name, tokenizer_dirs[name], image_size)
    model = contrastive_jax.load(tmp_path / name)
    m = model.config.model
    assert (m.image.pool, m.image_head, m.text.pool, m.text.mask_pad, m.image.act, model.activation) == (
        "map", "none", "last", False, "gelu", "sigmoid")
    assert model.config.data.mean == (0.5, 0.5, 0.5) and model.config.data.image_size == image_size
    img, txt = _check_parity(model, hf_model, tmp_path / name, False, image_size, (0.5,) * 3, (0.5,) * 3)
    # Sigmoid zero-shot probabilities use the learned scale and bias, as SiglipModel's logits do.
    with torch.no_grad():
        scale, bias = hf_model.logit_scale.exp().item(), hf_model.logit_bias.item()
    np.testing.assert_allclose(model.logit_scale * img @ txt.T + model.logit_bias,
                               scale * img @ txt.T + bias, rtol=1e-5, atol=1e-5)


def test_convert_cli_takes_a_folder_with_no_flags_and_exports_back(tmp_path, tokenizer_dirs, capsys):
    from contrastive_jax.cli import main

    hf_model = _siglip_folder(tmp_path / "siglip", tokenizer_dirs["siglip"], 32)
    out = tmp_path / "converted"
    assert main(["convert", str(tmp_path / "siglip"), str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["layout"] == "transformers siglip" and summary["tokenizer"] is True
    _check_parity(contrastive_jax.load(out), hf_model, tmp_path / "siglip", False, 32, (0.5,) * 3, (0.5,) * 3)
    # Training from the directory's config (fine-tuning, LiT) tokenizes captions as the checkpoint does.
    from contrastive_jax.data.tokenizer import build_tokenizer
    from contrastive_jax.train.restore import load_config_json
    ids, _ = _hf_ids(tmp_path / "siglip", TEXTS, 16)
    np.testing.assert_array_equal(build_tokenizer(load_config_json(str(out)).data).encode(TEXTS), ids)
    # And back: the model directory as a transformers folder.
    assert main(["convert", "--export", str(out), str(tmp_path / "hf_out"), "--format", "hf"]) == 0
    back, info = transformers.AutoModel.from_pretrained(tmp_path / "hf_out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref = hf_model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in back.state_dict().items())
    # A file-only option is a one-line user error (exit 2) before anything is read or written.
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "siglip"), str(tmp_path / "x"), "--act", "gelu_exact"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--act do not apply" in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_export_hf_round_trips_into_transformers(tmp_path, tokenizer_dirs, name):
    if name == "clip":
        hf_model = _clip_folder(tmp_path / "src", tokenizer_dirs["clip"], "quick_gelu")
    else:
        hf_model = _siglip_folder(tmp_path / "src", tokenizer_dirs["siglip"], 32)
    model = contrastive_jax.load(tmp_path / "src")
    summary = model.export(str(tmp_path / "out"), format="hf")
    assert summary["architecture"] == type(hf_model).__name__
    back, info = transformers.AutoModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(back) is type(hf_model)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ref = hf_model.state_dict()
    for key, value in back.state_dict().items():
        assert torch.equal(value, ref[key]), key  # float32 both ways: bit for bit
    # The tokenizer files written beside it give transformers the same ids.
    ids, _ = _hf_ids(tmp_path / "out", TEXTS, model.tokenizer.max_len)
    np.testing.assert_array_equal(model.tokenize(TEXTS), ids)
    with pytest.raises(FileExistsError, match="already holds"):  # nothing the user made is overwritten
        model.export(str(tmp_path / "out"), format="hf")


def test_unsupported_folder_is_a_one_line_error(tmp_path, capsys):
    from contrastive_jax.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"config.json: model_type='bert'; contrastive_jax reads clip, siglip"):
        contrastive_jax.load(tmp_path)
    assert main(["convert", str(tmp_path), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model_type='bert'" in err and not (tmp_path / "o").exists()
    # An activation we do not have: named with its file and field, before any weights are read.
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "siglip", "text_config": {}, "vision_config": {"hidden_act": "silu"}}))
    with pytest.raises(ValueError, match=r"config.json: vision_config.hidden_act='silu'; supported: quick_gelu"):
        contrastive_jax.load(tmp_path)


def test_a_hub_snapshot_with_open_clip_and_transformers_files_is_read_by_its_complete_form(tmp_path):
    # Hub snapshots of open_clip models often also hold a transformers config.json; without the
    # transformers weights, the open_clip files are what load/convert read.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"")
    assert hf_lib.is_hf_folder(tmp_path) and not hf_lib.reads_as_hf_folder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert hf_lib.reads_as_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "two_tower"}}))  # one of our run configs
    assert not hf_lib.is_hf_folder(tmp_path)
