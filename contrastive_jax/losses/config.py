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
    # 'symile' | 'distill' | 'filip' | 'captioning' | stateful: 'isogclr' | 'moco' | 'swav' |
    # 'self_distillation' | 'multi'
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
    c.hard_negative.constant_weights = False  # True: weights exp(beta l) constant in backward (see the loss)

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

    c.distill = distill_defaults()

    c.filip = filip_defaults()

    # isogclr (Qiu et al. 2023): per-example temperatures and moving averages; see losses/isogclr.py.
    # Defaults: the paper's bimodal (CC3M) settings. num_examples: length of the per-example state
    # (>= the training split's size: every batch['example_id'] must be < it); 0 = unset (an error).
    c.isogclr = ml_collections.ConfigDict()
    c.isogclr.num_examples = 0
    c.isogclr.gamma = 0.8  # weight of the new batch estimate in the moving average u <- (1-g) u + g g_B
    c.isogclr.rho = 8.0  # DRO KL radius: larger lowers the taus; above log(B - 1) all fall to tau_min
    c.isogclr.tau_init = 0.01  # every example's starting temperature
    c.isogclr.tau_min = 0.005  # temperatures are projected onto [tau_min, tau_max] after each update
    c.isogclr.tau_max = 1.0
    c.isogclr.tau_lr = 0.03  # step size of the temperature update (constant, as in the paper's runs)
    c.isogclr.tau_beta = 0.9  # momentum of the temperature gradient: m <- (1-b) m + b grad
    c.isogclr.tau_grad_clip = 5.0  # the temperature gradient is clipped to +-this before the momentum

    # moco (He et al. 2020; Chen et al. 2021; BriVL's cross-modal queues): momentum encoder (the
    # EMA teacher) and FIFO queues of its past keys; see losses/moco.py and moco_defaults below.
    c.moco = moco_defaults()

    # swav (Caron et al. 2020): prototypes, Sinkhorn-Knopp, swapped prediction; see losses/swav.py
    # and swav_defaults below.
    c.swav = swav_defaults()
    # self_distillation (SigLIP 2 / SILC / TIPS; DINO + iBOT losses): see self_distill_defaults.
    c.self_distill = self_distill_defaults()

    # multi: several objectives in one step (CoCa, SigLIP 2): (name, weight, start[, end]) per term,
    # start / end the fractions of training between which the term counts (end defaults to 1; see
    # losses/multi.py); every term reads its own options from this config.loss. 'captioning' is
    # the decoder's token cross-entropy.
    c.multi = ml_collections.ConfigDict()
    c.multi.terms = (("sigmoid", 1.0, 0.0), ("captioning", 1.0, 0.0))

    # Alignment / uniformity (Wang & Isola) added to any objective: loss += align_weight *
    # alignment(image, text) + uniform_weight * (uniformity(image) + uniformity(text)) / 2;
    # align_uniform_metrics reports both as metrics even at weight 0 (one extra streamed pass).
    c.align_weight = 0.0
    c.uniform_weight = 0.0
    c.uniform_t = 2.0
    c.align_uniform_metrics = False
    return c


def swav_defaults() -> ml_collections.ConfigDict:
    """``config.loss.swav``: SwAV's fields (:mod:`contrastive_jax.losses.swav`)."""
    s = ml_collections.ConfigDict()
    # Needs model.name='multiview' with model.prototypes = K > 0 (and, for multi-crop,
    # model.multicrop=True with data.local_views >= 1); the prototypes are frozen for the first
    # steps by config.optim.freeze_until (configs/swav.py).
    s.temperature = 0.1  # softmax temperature of the predictions p = softmax(scores / t)
    s.epsilon = 0.05  # Sinkhorn-Knopp entropic regularization: codes ~ exp(scores / epsilon)
    s.sinkhorn_iterations = 3  # column + row normalization rounds
    # Model outputs: global views' prototype scores [B, V, K] (their codes are the targets) and
    # the local crops' [B, N, K] (predictions only; ignored when the model does not output it).
    s.scores_key = "image_views_scores"
    s.local_scores_key = "image_local_views_scores"
    # Queue of past global-view scores joining the Sinkhorn input (0 = off; rows, a multiple of
    # the data-parallel size, >= the global batch). Filled from update queue_start_steps on (the
    # paper: epoch 15 of a small-batch run), used once full. queue_views / prototypes: its shape
    # [V, rows, K] (= data.num_views, model.prototypes), needed only with a queue.
    s.queue_length = 0
    s.queue_start_steps = 0
    s.queue_views = 2
    s.prototypes = 0
    return s


def self_distill_defaults() -> ml_collections.ConfigDict:
    """``config.loss.self_distill``: the self-distillation + masked-prediction objective's fields
    (:mod:`contrastive_jax.losses.self_distill`; needs model.name='coca' with model.self_distill)."""
    g = ml_collections.ConfigDict()
    # K of the heads' logits: config.model.self_distill.dim (0: the trainer fills that in; must match).
    g.dim = 0
    # DINO's temperatures: the student's softmax, the teacher's sharpened softmax for the global
    # (local-global) part and for the patch (masked prediction) part (DINO / iBOT: 0.1, 0.04).
    g.student_temperature = 0.1
    g.teacher_temperature = 0.04
    g.patch_teacher_temperature = 0.04
    # Momentum of the two centres (EMA of the teacher's mean logits): c <- m c + (1 - m) mean.
    g.center_momentum = 0.9
    # Weights of the two parts inside this term (SigLIP 2: consistency 1, masked prediction 0.25).
    g.global_weight = 1.0
    g.patch_weight = 0.25
    # Teacher EMA decay: 0 before teacher_start_steps (teacher = student until the term starts;
    # set it to the multi term's start step), then 'constant' momentum (SILC keeps it fixed) or
    # 'cosine' from momentum to 1 at momentum_steps (DINO).
    g.momentum = 0.996
    g.momentum_schedule = "constant"
    g.momentum_steps = 0
    g.teacher_start_steps = 0
    return g


def moco_defaults() -> ml_collections.ConfigDict:
    """``config.loss.moco``: MoCo's fields (:mod:`contrastive_jax.losses.moco`); impl: 'dense' |
    'chunked'."""
    m = ml_collections.ConfigDict()
    # 'image': two views of model 'multiview' (config.data.num_views >= 2), view a vs view b,
    # symmetrized; 'image_text': image queries vs text keys + text queue and the reverse.
    m.mode = "image"
    # K keys kept per queue (0: no queue, MoCo v3 in-batch negatives). On a mesh K must be a
    # multiple of the devices the batch is split over (the queue is sharded along K). Any K >= 0
    # works with any batch: writes wrap around the ring buffer.
    m.queue_size = 0
    # D of the queued keys: must equal config.model.embed_dim when queue_size > 0 (0: the trainer
    # fills in config.model.embed_dim).
    m.embed_dim = 0
    # Fixed InfoNCE temperature (v1: 0.07, v2: 0.2, v3: 0.2); learned_scale=True uses the model's
    # learned outputs['scale'] instead (CLIP-style; needed for the K=0 image_text == CLIP identity).
    m.temperature = 0.2
    m.learned_scale = False
    # Teacher EMA decay m: 'constant' (v1/v2: 0.999) or 'cosine' (v3: m at step 0 rising to 1 at
    # momentum_steps; 0: the trainer fills in the run's total steps).
    m.momentum = 0.99
    m.momentum_schedule = "constant"
    m.momentum_steps = 0
    # True: the batch's other keys are negatives too (v3); False: positive + queue only (v1/v2;
    # needs queue_size > 0).
    m.in_batch_negatives = True
    # Model outputs read: the [B, V, D] views (mode 'image'); the [B, D] embeddings (image_text).
    m.views_key = "image_views"
    m.image_key = "image"
    m.text_key = "text"
    return m


def distill_defaults() -> ml_collections.ConfigDict:
    """``config.loss.distill``: TinyCLIP-style affinity distillation (:func:`contrastive_jax.losses.similarity_distillation_loss`)."""
    g = ml_collections.ConfigDict()
    # distill (TinyCLIP affinity mimicking): teacher embeddings, each looked up first in the model
    # outputs then in the batch; the teacher's scale (1 / temperature); weight of an added plain
    # CLIP loss on the student (0 = distillation only).
    g.teacher_image = "teacher_image"
    g.teacher_text = "teacher_text"
    g.teacher_scale = 100.0
    g.clip_weight = 0.0
    return g


def filip_defaults() -> ml_collections.ConfigDict:
    """``config.loss.filip``: FILIP's fields (:mod:`contrastive_jax.losses.filip`)."""
    g = ml_collections.ConfigDict()
    # filip (Yao et al. 2022, token-wise late interaction): needs config.model.return_tokens=True
    # (the model then also outputs image_tokens / text_tokens and their masks; a two_tower model
    # with vit / transformer towers). Implementations: config.loss.impl 'dense' | 'chunked' (not
    # 'ring'). block_size: edge of the streamed (block x block) tiles, each holding block^2 * Li *
    # Lt similarities -- separate from loss.block_size, whose [B, D] tiles are far smaller per
    # pair. token_fraction in (0, 1]: each side keeps, per example, ceil(fraction * n) of its n
    # valid tokens, those most similar to the example's pooled embedding, before any similarity is
    # computed (losses.filip.prune_tokens); 1.0 keeps all.
    g.block_size = 32
    g.token_fraction = 1.0
    return g
