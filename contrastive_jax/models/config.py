"""Schema of ``config.model``: the towers, heads and the learnable scale/bias.

Merged into the run schema by :func:`contrastive_jax.train.config.default_config` as
``config.model``; this package owns these fields.

Two model kinds are built in (``model.name``); more can be added with
``models.register_model``:

- ``'two_tower'`` (CLIP / SigLIP / LiT): ``model.image`` and ``model.text`` groups below.
- ``'n_tower'``: one encoder per modality, described in the free-form group ``model.towers``;
  ``model.modalities`` gives their order (the order of the model's inputs and of the batch keys
  it consumes; empty: sorted tower names). Each tower entry names its encoder kind (a key of
  ``models.ENCODERS``) and sets that encoder's fields (unknown fields are an error naming
  ``model.towers.<name>.<field>``; omitted ones take the encoder's defaults, see
  ``models.encoder_defaults(kind)``), plus optional ``head`` / ``head_hidden`` /
  ``head_act`` / ``head_bias`` (default: the model-level ones) and ``input_shape`` (the
  per-example input shape, used by ``contrastive-jax inspect`` and for initialization) and
  ``input_dtype``. Example (three modalities, as a Symile config would use)::

      c.model.name = "n_tower"
      c.model.modalities = ("image", "audio", "tabular")
      c.model.towers = dict(
          image=dict(encoder="vit", patch_size=8, width=64, depth=2, num_heads=2, mlp_dim=128,
                     input_shape=(32, 32, 3)),
          audio=dict(encoder="signal", patch_size=16, width=64, depth=2, num_heads=2,
                     mlp_dim=128, input_shape=(256, 1)),
          tabular=dict(encoder="mlp", width=64, depth=2, input_shape=(20,), head="mlp"),
      )
"""
from __future__ import annotations

import math

import ml_collections


def defaults() -> ml_collections.ConfigDict:
    """Every ``config.model`` field with its default."""
    c = ml_collections.ConfigDict()
    c.name = "two_tower"  # 'two_tower' | 'n_tower' | a name given to models.register_model
    c.embed_dim = 128  # shared embedding dimension
    c.scale_init = math.log(1 / 0.07)  # CLIP: log(1/0.07); SigLIP: log(10)
    c.bias_init = 0.0  # SigLIP: -10
    c.max_scale = 100.0  # exp(log_scale) is clamped here, as CLIP clamps at 100
    c.dtype = "float32"  # compute dtype ('float32' | 'bfloat16'); params and outputs stay float32
    # Matryoshka prefixes (Kusupati et al.): nested leading-dim sizes of the embedding that are
    # trained and evaluated as embeddings of their own (each re-normalized). () = none. Read by the
    # loss (config.loss) and by evaluation.
    c.matryoshka_dims = ()
    # Projection heads from each tower's width to embed_dim: 'linear' (CLIP) | 'mlp' (two layers,
    # SimCLR-style); head_hidden: the MLP's hidden width (0 = the tower's width); head_act: its
    # activation; head_bias: whether head layers have biases (CLIP: none).
    c.head = "linear"
    c.head_hidden = 0
    c.head_act = "gelu"
    c.head_bias = False

    c.image = ml_collections.ConfigDict()
    c.image.name = "vit"  # 'vit' | 'resnet' (resnet reads only depth (18/34/50/101/152) and width)
    c.image.patch_size = 8
    c.image.width = 128
    c.image.depth = 4
    c.image.num_heads = 4
    c.image.mlp_dim = 512
    c.image.pool = "gap"  # 'gap' | 'cls' | 'map' (multihead attention pooling)
    c.image.posemb = "learn"  # 'learn' | 'sincos2d' (fixed)
    c.image.stem = "patch"  # 'patch' (linear p x p) | 'conv' (3x3 stride-2 convs)
    c.image.act = "gelu"  # 'gelu' (tanh approx.) | 'gelu_exact' | 'quick_gelu' (OpenAI CLIP) | 'relu'
    c.image.patch_bias = True  # bias in the patch projection (OpenAI CLIP: False)
    c.image.norm_pre = False  # LayerNorm before the encoder (OpenAI CLIP's ln_pre: True)
    c.image.cls_posemb = False  # pool='cls': the class token gets a learned position (OpenAI CLIP)
    c.image.patch_dropout = 0.0  # FLIP: fraction of patch tokens dropped at train time
    c.image.remat = "none"  # 'none' | 'full' | 'dots_saveable': recompute blocks in the backward
    c.image.scan = False  # nn.scan over the encoder blocks (stacked params, one compiled block)
    c.image.norm_eps = 1e-6  # LayerNorm epsilon (big_vision 1e-6; PyTorch / OpenAI CLIP 1e-5)
    c.image.extra = ml_collections.ConfigDict()

    c.text = ml_collections.ConfigDict()
    c.text.name = "transformer"
    c.text.vocab_size = -1  # -1: taken from the tokenizer
    c.text.context_length = 0  # rows of the position embedding; 0: the text length seen at init
    c.text.width = 128
    c.text.depth = 2
    c.text.num_heads = 4
    c.text.mlp_dim = 512
    c.text.causal = True  # CLIP: causal, pooled at EOS; SigLIP: bidirectional, pool 'last'/'map'
    c.text.pool = "eos"  # 'eos' | 'last' | 'map'
    c.text.act = "gelu"
    c.text.remat = "none"
    c.text.scan = False
    c.text.norm_eps = 1e-6
    # -1: pad id 0 marks padding and EOS is the last non-pad token; >= 0: pool at the first token
    # with this id, everything before it is text (OpenAI CLIP: 49407, since its id 0 is '!').
    c.text.eos_id = -1
    c.text.extra = ml_collections.ConfigDict()

    # n_tower only: order of the modalities (empty: sorted names of model.towers) and the
    # free-form tower descriptions (see the module docstring).
    c.modalities = ()
    # distill only: the frozen teacher's model config (free-form; merged onto these defaults).
    c.teacher = ml_collections.ConfigDict()
    c.towers = ml_collections.ConfigDict()
    return c
