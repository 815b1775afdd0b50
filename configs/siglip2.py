"""SigLIP 2 (Tschannen et al. 2025): sigmoid image-text loss + captioning decoder from the start,
self-distillation and masked prediction on the image tower for the last 20% of training.

    contrastive-jax inspect --config configs/siglip2.py                  # the ViT-B/16 recipe
    contrastive-jax train --config configs/siglip2.py:shapes --workdir runs/siglip2_shapes

``model.name='coca'`` (:mod:`contrastive_jax.models.coca`): the two towers, a text decoder on the
image tokens (its token cross-entropy computed inside the model), and, with
``model.self_distill.dim = K``, DINO-style heads on the pooled features and on the patch tokens;
``model.multicrop=True`` feeds the data pipeline's local crops (``data.local_views``) to the
student. ``loss.name='multi'`` with three terms: ``sigmoid`` (SigLIP) and ``captioning`` (weight
1 each) from step 0, ``self_distillation`` (:mod:`contrastive_jax.losses.self_distill`: the
EMA teacher's global view vs the student's local crops, and the teacher's patches vs the
student's masked patches) from 80% of training. The teacher is the EMA of all parameters; it
copies the student until the term starts (``loss.self_distill.teacher_start_steps``, kept equal
to the term's start step here), so it starts as the student, as in the paper.

Variants (``arg``):

- ``None`` / ``'b16'``: the published ViT-B/16 shapes: patch 16, width 768, depth 12, 12 heads,
  256 px (256 image tokens), MAP pooling; a B-sized text tower (64 tokens) and decoder over a
  256k vocabulary (the paper's Gemma tokenizer: set ``data.tokenizer`` accordingly); batch 32k,
  40B examples (1,220,703 steps), 20k warmup steps, Adam with lr 1e-3 and decoupled weight
  decay 1e-4 (the paper's settings). Self-distillation as stated in the paper: consistency
  weight 1, masked prediction 0.25, the whole term reweighted by 0.25 at size B; 50% of the
  student's patches masked; 8 local crops. Set ``data.name`` to a real image-text source; the
  built-in ``shapes`` data is only a placeholder here. Our choices where the paper states none:
  ``K = 8192`` head logits (hidden 2048, bottleneck 256), 96 px local crops covering 5-40% of the
  image (SILC), fixed 2-D sin-cos position embeddings instead of learned ones (a learned table
  fits one patch grid; the local crops have a smaller one), teacher momentum 0.996 held fixed
  (SILC), decoder depth 6 at the text tower's width.
- ``'shapes'``: CoCa's shapes model (``configs/coca.py``) with the three terms: K = 256, four
  32 px local crops; a few minutes on a CPU.
- ``'tiny'``: a seconds-long smoke run on 32 px shapes (K = 32, two 16 px local crops), the
  self-distillation term switched on at 10% of its 20 steps (tests set it to 0).
"""
import math
import os

import ml_collections

from contrastive_jax.train.config import config_file

COCA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "coca.py")
VARIANTS = ("b16", "shapes", "tiny")


def _terms(start: float, distill_weight: float):
    return (("sigmoid", 1.0, 0.0), ("captioning", 1.0, 0.0), ("self_distillation", distill_weight, start))


def _b16() -> ml_collections.ConfigDict:
    from contrastive_jax.models.vit import vit_variant

    vit = vit_variant("B/16")
    text = {k: v for k, v in vit.items() if k != "patch_size"}
    vocab, total = 256_000, 40_000_000_000 // 32_768
    start = round(0.8 * total)
    c = ml_collections.ConfigDict()
    c.model = dict(
        name="coca", embed_dim=768, scale_init=math.log(10.0), bias_init=-10.0, max_scale=100.0,
        head="linear", head_bias=True,
        image=dict(name="vit", **vit, pool="map", posemb="sincos2d", act="gelu"),
        text=dict(name="transformer", vocab_size=vocab, context_length=64, causal=False, pool="last", act="gelu",
                  **text),
        decoder=dict(vocab_size=vocab, width=768, depth=6, num_heads=12, mlp_dim=3072),
        caption=dict(label_smoothing=0.0, impl="chunked", vocab_block=8192, token_block=4096),
        multicrop=True,
        self_distill=dict(dim=8192, hidden=2048, bottleneck=256, mask_ratio=0.5),
    )
    # Placeholder name: a TFDS image-text dataset prepared under data.data_dir (`contrastive-jax data
    # convert`), e.g. WebLI-like pairs; the built-in shapes data is too small for this batch.
    c.data = dict(name="webli", image_size=256, max_text_len=64, local_views=8, local_view_size=96,
                  augment=dict(local_crop_scale=(0.05, 0.4)))
    c.loss = dict(name="multi", impl="chunked", multi=dict(terms=_terms(0.8, 0.25)),
                  self_distill=dict(dim=8192, global_weight=1.0, patch_weight=0.25, momentum=0.996,
                                    momentum_schedule="constant", teacher_start_steps=start))
    c.optim = dict(lr=1e-3, weight_decay=1e-4, warmup_steps=20_000)
    c.train = dict(batch_size=32_768, total_steps=total)
    return c


def _small(variant: str) -> ml_collections.ConfigDict:
    tiny = variant == "tiny"
    c = config_file(COCA, "tiny" if tiny else None)
    k = 32 if tiny else 256
    c.model.update(scale_init=math.log(10.0), bias_init=-10.0, multicrop=True,
                   self_distill=dict(dim=k, hidden=2 * k, bottleneck=max(k // 2, 16), mask_ratio=0.5))
    c.data.update(local_views=2 if tiny else 4, local_view_size=c.data.image_size // 2)
    if tiny:
        # A linear patch embedding: the smoke run's step compiles ~30% faster than with the
        # conv stem (three image-tower passes per step), and it needs no learning quality.
        c.model.image.stem = "patch"
    start = 0.1 if tiny else 0.8
    c.loss = dict(name="multi", impl="chunked", block_size=int(c.loss.block_size),
                  multi=dict(terms=_terms(start, 1.0)),
                  self_distill=dict(dim=k, global_weight=1.0, patch_weight=0.25, momentum=0.99,
                                    teacher_start_steps=round(start * c.train.total_steps)))
    return c


def get_config(arg=None):
    variant = arg or "b16"
    if variant not in VARIANTS:
        raise ValueError(f"unknown siglip2 variant {arg!r}; known: {', '.join(VARIANTS)}")
    return _b16() if variant == "b16" else _small(variant)
