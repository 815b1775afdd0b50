"""model.name='coca': the captioning decoder's per-example loss computed inside the model, trained
with loss.name='multi' through the loop's builder, decoded by Model.caption and scored by the
'captioning' evaluator."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import contrastive_jax as cj
from contrastive_jax import models
from contrastive_jax.api import Model
from contrastive_jax.parallel import to_host
from contrastive_jax.train import build_model, load_config
from contrastive_jax.train.loop import train

from tests.train.test_train import REPO, _random_batch, build

COCA = os.path.join(REPO, "configs", "coca.py")


class _Vocab:
    vocab_size = 40
    eos_id = 1

    @staticmethod
    def decode(ids):
        return [" ".join(str(int(t)) for t in row[: list(row).index(1)] if t) if 1 in row else
                " ".join(str(int(t)) for t in row if t) for row in np.asarray(ids)]


def _config(*extra):
    return load_config(COCA + ":tiny", ["optim.warmup_steps=1", "data.max_text_len=8", *extra])


def test_caption_outputs_equal_a_float64_cross_entropy_of_the_dense_logits():
    config = _config("model.caption.label_smoothing=0.1", "model.caption.vocab_block=7",
                     "model.caption.token_block=5")
    built = build_model(config, _Vocab)
    batch = _random_batch(6, 32, 8, seed=3)
    params = built.model.init(jax.random.key(0), batch["image"], batch["text"])["params"]
    out = built.model.apply({"params": params}, batch["image"], batch["text"])
    # Reference: the decoder's dense logits on the same image tokens, cross-entropy in float64.
    tokens = built.model.apply({"params": params}, batch["image"], method=lambda m, x: m.image_tokens(x)[1])
    logits = np.asarray(built.model.apply({"params": params}, tokens, batch["text"],
                                          method=lambda m, t, x: m.decoder.logits(t, x)), np.float64)
    t = batch["text"]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    eps, v = 0.1, logits.shape[-1]
    tok = lse - (1 - eps) * np.take_along_axis(logits, t[..., None], -1)[..., 0] - eps / v * logits.sum(-1)
    mask = t != 0
    np.testing.assert_allclose(np.asarray(out["caption_loss"]), (tok * mask).sum(1), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["caption_tokens"]), mask.sum(1))
    np.testing.assert_array_equal(np.asarray(out["caption_correct"]),
                                  ((logits.argmax(-1) == t) & mask).sum(1).astype(np.float32))
    # The image embedding is the two-tower one (one tower pass feeds both heads).
    emb = built.model.apply({"params": params}, batch["image"], method=lambda m, x: m.encode_image(x))
    np.testing.assert_allclose(np.asarray(out["image"]), np.asarray(emb), rtol=1e-5, atol=1e-6)


def test_coca_trains_the_same_on_eight_devices_and_with_microbatches():
    batches = [_random_batch(16, 32, 8, seed=s) for s in range(2)]
    runs, init = [], None
    for n, extra in ((1, ()), (8, ()), (2, ("train.microbatch_size=4",))):
        training = build(_config(*extra), [("data", n)], n)
        state = training.init_state(seed=0)
        init = to_host(state.params) if init is None else init
        ms = []
        for b in batches:
            state, m = training.step(state, training.device_batch(b))
            ms.append(to_host(m))
        runs.append((ms, to_host(state.params)))
    (m1, p1) = runs[0]
    assert m1[0]["loss/captioning"] > 0 and "captioning/token_accuracy" in m1[0]
    for ms, ps in runs[1:]:
        for a, b in zip(m1, ms):
            np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4)
            np.testing.assert_allclose(b["loss/captioning"], a["loss/captioning"], rtol=1e-4)
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(ps)):
            np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-5)
    # The decoder is trained (the multi objective's captioning term reaches it).
    assert not np.allclose(init["decoder"]["bos"], p1["decoder"]["bos"])


def test_model_caption_is_the_greedy_decode_of_the_decoder():
    config = _config()
    built = build_model(config, _Vocab)
    images = np.random.default_rng(5).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    params = built.model.init(jax.random.key(1), jnp.zeros((3, 32, 32, 3)), jnp.ones((3, 8), jnp.int32))["params"]
    model = Model(config, built.model, params, _Vocab)
    got = model.caption(images, max_len=6)
    # Plain Python greedy loop on the dense logits: feed the prefix, take the argmax at the next
    # position, stop at EOS.
    x = jnp.asarray(model.preprocess_images(images))
    tokens = built.model.apply({"params": params}, x, method=lambda m, x: m.image_tokens(x)[1])
    want = []
    for i in range(3):
        seq = np.zeros((1, 6), np.int32)
        for pos in range(6):
            logits = built.model.apply({"params": params}, tokens[i:i + 1], jnp.asarray(seq),
                                       method=lambda m, t, x: m.decoder.logits(t, x))
            seq[0, pos] = int(np.argmax(np.asarray(logits)[0, pos]))
            if seq[0, pos] == 1:
                break
        want.append(_Vocab.decode(seq)[0])
    assert got == want


def test_short_coca_run_evaluates_captions_and_loads_for_captioning(tmp_path):
    workdir = str(tmp_path / "run")
    config = load_config(COCA + ":tiny", ["train.total_steps=4", "eval.every_steps=0", "eval.max_examples=16",
                                          "log.progress=false", f"data.data_dir={tmp_path / 'tfds'}"])
    config.eval.evaluators = ["captioning"]
    train(config, workdir)
    with open(os.path.join(workdir, "summary.json")) as fh:
        final = json.load(fh)["eval"]
    for key in ("caption/bleu4", "caption/cider", "caption/exact_match"):
        assert 0.0 <= final[key] <= (10.0 if key == "caption/cider" else 1.0), (key, final)
    # The notebook API decodes the same captions the evaluator scored.
    model = cj.load(workdir)
    from contrastive_jax import data
    from contrastive_jax.data.transforms import denormalize_images

    arrays = data.load_eval_arrays(model.config.data, "test", tokenizer=model.tokenizer, max_examples=16)
    pixels = denormalize_images(arrays["image"], model.config.data.mean, model.config.data.std)
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        assert any("eval/caption/cider" in json.loads(line) for line in fh)
    captions = model.caption(pixels)
    assert len(captions) == 16 and all(isinstance(c, str) for c in captions)
    assert model.caption(pixels[:3]) == captions[:3]  # batch-independent
