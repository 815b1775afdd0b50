"""Schema of ``config.loss``: which objective, which implementation, and each objective's knobs.

Merged into the run schema by :func:`contrastive_jax.train.config.default_config` as
``config.loss``; this package owns these fields. Objective names are the keys of
:data:`contrastive_jax.losses.registry.OBJECTIVES` (README, section "Objectives").
"""
from __future__ import annotations

import ml_collections


def defaults() -> ml_collections.ConfigDict:
    """Every ``config.loss`` field with its default."""
    c = ml_collections.ConfigDict()
    # 'softmax' (CLIP InfoNCE) | 'sigmoid' (SigLIP) | 'dcl' | 'dclw' | 'hard_negative' | 'cwcl' |
    # 'multi_positive' | 'supcon' | 'sigmoid_multi_positive' | 'simclr' | 'slip' | 'matryoshka' |
    # 'symile' | 'distill' | 'filip'
    c.name = "softmax"
    c.impl = "dense"  # 'dense' | 'chunked' | 'ring'
    c.block_size = 1024

    # dclw: width sigma of the von Mises-Fisher weighting of the positive term (Yeh et al.).
    c.dclw_sigma = 0.5

    # hard_negative (Robinson et al.): concentration beta on the negatives, class prior tau_plus
    # of the debiased estimator (0 = off), cosine above which a negative is dropped as a false
    # negative (>= 1 = off).
    c.hard_negative = ml_collections.ConfigDict()
    c.hard_negative.beta = 1.0
    c.hard_negative.tau_plus = 0.0
    c.hard_negative.fn_threshold = 1.0

    # cwcl: target weights f(<t_i, t_j>) from the embeddings of one modality, taken from the
    # model outputs (e.g. 'image', a frozen tower) or, with the prefix 'batch:', from a batch key
    # of precomputed unit vectors ('batch:teacher_image'); target_fn: a name in
    # losses.TARGET_FUNCTIONS ('cwcl': (1 + cos) / 2, 'identity': one-hot).
    c.cwcl = ml_collections.ConfigDict()
    c.cwcl.targets = "image"
    c.cwcl.target_fn = "cwcl"

    # multi_positive / supcon / sigmoid_multi_positive: batch key of the int [B] group (class) ids;
    # pairs with equal ids are positives.
    c.group_key = "group"

    # simclr / slip: model output holding the [B, V, D] unit-vector views, and the fixed NT-Xent
    # temperature (SimCLR: 0.1); slip: weights of the image-text (softmax) and SimCLR terms.
    c.simclr = ml_collections.ConfigDict()
    c.simclr.views_key = "image_views"
    c.simclr.temperature = 0.1
    c.simclr.clip_weight = 1.0
    c.simclr.ssl_weight = 1.0

    # matryoshka: the objective applied at every prefix (any other name here) and the per-prefix
    # weights (() = all 1). The prefixes are config.model.matryoshka_dims (the trainer passes
    # them: make_objective(..., model_config=config.model)); dims here override them if set.
    c.matryoshka = ml_collections.ConfigDict()
    c.matryoshka.base = "softmax"
    c.matryoshka.weights = ()
    c.matryoshka.dims = ()

    # symile: the model outputs contrasted (>= 2; the paper's case is 3+) and the negatives:
    # 'n' (O(N), streams) | 'n_squared' (O(N^2), dense only).
    c.symile = ml_collections.ConfigDict()
    c.symile.modalities = ("image", "text", "attributes")
    c.symile.negatives = "n"

    # distill (TinyCLIP affinity mimicking): teacher embeddings, each looked up first in the model
    # outputs then in the batch; the teacher's scale (1 / temperature); weight of an added plain
    # CLIP loss on the student (0 = distillation only).
    c.distill = ml_collections.ConfigDict()
    c.distill.teacher_image = "teacher_image"
    c.distill.teacher_text = "teacher_text"
    c.distill.teacher_scale = 100.0
    c.distill.clip_weight = 0.0

    # filip (Yao et al. 2022, token-wise late interaction): needs config.model.return_tokens=True
    # (the model then also outputs image_tokens / text_tokens and their masks; a two_tower model
    # with vit / transformer towers). Implementations: config.loss.impl 'dense' | 'chunked' (not
    # 'ring'). block_size: edge of the streamed (block x block) tiles, each holding block^2 * Li *
    # Lt similarities -- separate from loss.block_size, whose [B, D] tiles are far smaller per
    # pair. token_fraction in (0, 1]: each side keeps, per example, ceil(fraction * n) of its n
    # valid tokens, those most similar to the example's pooled embedding, before any similarity is
    # computed (losses.filip.prune_tokens); 1.0 keeps all.
    c.filip = ml_collections.ConfigDict()
    c.filip.block_size = 32
    c.filip.token_fraction = 1.0

    # Alignment / uniformity (Wang & Isola) added to any objective: loss += align_weight *
    # alignment(image, text) + uniform_weight * (uniformity(image) + uniformity(text)) / 2;
    # align_uniform_metrics reports both as metrics even at weight 0 (one extra streamed pass).
    c.align_weight = 0.0
    c.uniform_weight = 0.0
    c.uniform_t = 2.0
    c.align_uniform_metrics = False
    return c
