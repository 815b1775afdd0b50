"""Schema of ``config.model``: the towers, heads and the learnable scale/bias.

Merged into the run schema by :func:`contrastive_jax.train.config.default_config` as
``config.model``; this package owns these fields.
"""
from __future__ import annotations

import math

import ml_collections


def defaults() -> ml_collections.ConfigDict:
    """Every ``config.model`` field with its default."""
    c = ml_collections.ConfigDict()
    c.name = "two_tower"
    c.embed_dim = 128  # shared embedding dimension
    c.scale_init = math.log(1 / 0.07)  # CLIP: log(1/0.07); SigLIP: log(10)
    c.bias_init = 0.0  # SigLIP: -10
    c.max_scale = 100.0  # exp(log_scale) is clamped here, as CLIP clamps at 100
    c.dtype = "float32"  # compute dtype; params stay float32
    # Matryoshka prefixes (Kusupati et al.): nested leading-dim sizes of the embedding that are
    # trained and evaluated as embeddings of their own (each re-normalized). () = none. Read by the
    # loss (config.loss) and by evaluation.
    c.matryoshka_dims = ()
    c.image = ml_collections.ConfigDict()
    c.image.name = "vit"
    c.image.patch_size = 8
    c.image.width = 128
    c.image.depth = 4
    c.image.num_heads = 4
    c.image.mlp_dim = 512
    c.image.pool = "gap"  # 'gap' | 'cls'
    c.image.posemb = "learn"  # 'learn' | 'sincos2d' (fixed)
    c.image.stem = "patch"  # 'patch' (linear p x p) | 'conv' (3x3 stride-2 convs)
    c.image.extra = ml_collections.ConfigDict()
    c.text = ml_collections.ConfigDict()
    c.text.name = "transformer"
    c.text.vocab_size = -1  # -1: taken from the tokenizer
    c.text.width = 128
    c.text.depth = 2
    c.text.num_heads = 4
    c.text.mlp_dim = 512
    c.text.causal = True  # CLIP-style causal, pooled at the EOS token
    c.text.extra = ml_collections.ConfigDict()
    return c
