"""Schema of ``config.model``: the model kind, the towers, the heads and the learnable scale/bias.

Merged into the run schema by :func:`contrastive_jax.train.config.default_config` as
``config.model``; this package owns these fields.

Where the defaults live: a config group holds the fields of the module class that consumes it,
and its defaults are that class's dataclass defaults (read through
:class:`~contrastive_jax.models.schema.ModuleSchema`; each field is documented in its class):

- the model-level ``embed_dim``, ``scale_init``, ``bias_init``, ``max_scale``, ``head``,
  ``head_hidden``, ``head_act``, ``head_bias``: :class:`~contrastive_jax.models.towers.TwoTower`
  (:data:`TWO_TOWER`);
- ``model.image``: :class:`~contrastive_jax.models.vit.VisionTransformer` (:data:`VIT`); with
  ``model.image.name = 'resnet'`` only ``depth`` (18/34/50/101/152) and ``width`` are read
  (:class:`~contrastive_jax.models.resnet.ResNet`);
- ``model.text``: :class:`~contrastive_jax.models.text.TextTransformer` (:data:`TEXT`).

The schemas below state run defaults only for the fields their module requires (a ViT's width,
a text tower's vocabulary size); :func:`defaults` states only the fields no module has. A key
that is none of these is an error at build time naming it (``model.image.<key>``).

Model kinds (``model.name``, the keys of ``models.MODELS``; more with ``models.register_model``):

- ``'two_tower'`` (CLIP / SigLIP / LiT): ``model.image`` and ``model.text``.
- ``'coca'`` (CoCa / CapPa / SigLIP 2): the two towers plus the captioning decoder ``model.decoder``
  (:data:`DECODER`) and its loss options ``model.caption`` (:mod:`contrastive_jax.models.coca`).
- ``'multiview'`` (SimCLR): ``model.image`` and an MLP head on every view (SwAV: plus
  ``model.prototypes`` and ``model.multicrop``); ``'slip'`` (SLIP): both towers plus that view
  head (:mod:`contrastive_jax.models.multiview`).
- ``'distill'``: this config is the two-tower student, ``model.teacher`` the teacher
  (:mod:`contrastive_jax.models.distill`).
- ``'n_tower'``: one encoder per modality, described in the free-form group ``model.towers``;
  ``model.modalities`` gives their order (the order of the model's inputs and of the batch keys
  it consumes; empty: sorted tower names). Each tower entry names its encoder kind (a key of
  ``models.ENCODERS``: ``vit`` :data:`VIT`, ``resnet`` :data:`RESNET`, ``transformer``
  :data:`TEXT`, ``signal`` :data:`SIGNAL`, ``mlp`` :data:`MLP`) and sets that encoder's fields
  (unknown fields are an error naming ``model.towers.<name>.<field>``; omitted ones take the
  encoder's defaults, see ``models.encoder_defaults(kind)``), plus optional ``head`` /
  ``head_hidden`` / ``head_act`` / ``head_bias`` (default: the model-level ones) and
  ``input_shape`` (the per-example input shape, used by ``contrastive-jax inspect`` and for
  initialization) and ``input_dtype``. Example (three modalities, as a Symile config would use)::

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

import ml_collections

from contrastive_jax.models import generic
from contrastive_jax.models import text as text_lib
from contrastive_jax.models import vit as vit_lib
from contrastive_jax.models.coca import CoCa
from contrastive_jax.models.decoder import TextDecoder
from contrastive_jax.models.generic import MlpEncoder, SignalTransformer
from contrastive_jax.models.layers import ACTIVATIONS, ATTENTION_IMPLS, REMAT_POLICIES
from contrastive_jax.models.resnet import RESNET_DEPTHS, ResNet
from contrastive_jax.models.schema import ModuleSchema
from contrastive_jax.models.text import TextTransformer
from contrastive_jax.models.towers import HEAD_TYPES, TOWER_HEAD_TYPES, TwoTower
from contrastive_jax.models.vit import VisionTransformer

# Enumerated fields shared by the transformer towers.
_BLOCK_CHOICES = dict(act=tuple(ACTIVATIONS), remat=REMAT_POLICIES)
# The image and text towers also choose their attention implementation (models/layers.py).
_TOWER_CHOICES = dict(_BLOCK_CHOICES, attention_impl=ATTENTION_IMPLS)
# The model-level head fields, read by every built-in model kind.
HEAD_CHOICES = dict(head=HEAD_TYPES, head_act=tuple(ACTIVATIONS))

TWO_TOWER = ModuleSchema(TwoTower, required=dict(embed_dim=128),
                         choices=dict(HEAD_CHOICES, image_head=("",) + TOWER_HEAD_TYPES,
                                      text_head=("",) + TOWER_HEAD_TYPES),
                         builder_fields=("image", "text", "dtype"))
VIT = ModuleSchema(
    VisionTransformer,
    required=dict(patch_size=8, width=128, depth=4, num_heads=4, mlp_dim=512),
    choices=dict(pool=vit_lib.POOL_TYPES, posemb=vit_lib.POSEMB_TYPES, stem=vit_lib.STEM_TYPES, **_TOWER_CHOICES),
)
TEXT = ModuleSchema(
    TextTransformer,
    # vocab_size -1: resolved from the tokenizer by the trainer before the model is built.
    required=dict(vocab_size=-1, width=128, depth=2, num_heads=4, mlp_dim=512),
    choices=dict(pool=text_lib.POOL_TYPES, **_TOWER_CHOICES),
    checks=dict(vocab_size=(lambda v: v > 0, "set it (or resolve -1 from the tokenizer's vocabulary size) "
                                             "before building the model")),
)
RESNET = ModuleSchema(ResNet, choices=dict(depth=tuple(RESNET_DEPTHS)))
SIGNAL = ModuleSchema(
    SignalTransformer,
    required=dict(patch_size=16, width=128, depth=2, num_heads=4, mlp_dim=512),
    choices=dict(pool=generic.POOL_TYPES, **_BLOCK_CHOICES),
)
MLP = ModuleSchema(MlpEncoder, required=dict(width=128), choices=dict(act=tuple(ACTIVATIONS)))
# coca: the two-tower fields plus a captioning decoder (model.decoder) and its loss (model.caption).
COCA = ModuleSchema(CoCa, required=dict(embed_dim=128), choices=TWO_TOWER.choices,
                    builder_fields=("image", "text", "dtype", "decoder", "caption_label_smoothing", "caption_impl",
                                    "caption_vocab_block", "caption_token_block", "distill_dim", "distill_hidden",
                                    "distill_bottleneck", "distill_mask_ratio"))
DECODER = ModuleSchema(
    TextDecoder,
    # vocab_size -1: the tokenizer's, like model.text.
    required=dict(vocab_size=-1, width=128, depth=2, num_heads=4, mlp_dim=512),
    choices=_TOWER_CHOICES,
    checks=dict(vocab_size=(lambda v: v > 0, "set it (or resolve -1 from the tokenizer's vocabulary size) "
                                             "before building the model")),
)

# Keys of model.image / model.text that are not module fields: the registry name of the tower
# and a free-form group for registered towers' own settings.
GROUP_KEYS = ("name", "extra")


def _tower_group(name: str, schema: ModuleSchema) -> ml_collections.ConfigDict:
    group = ml_collections.ConfigDict()
    group.name = name  # a key of models.IMAGE_TOWERS / models.TEXT_TOWERS
    for key, value in schema.defaults().items():
        group[key] = value
    group.extra = ml_collections.ConfigDict()
    return group


def defaults() -> ml_collections.ConfigDict:
    """Every ``config.model`` field with its default (a fresh ConfigDict on every call)."""
    c = ml_collections.ConfigDict()
    c.name = "two_tower"  # a key of models.MODELS: two_tower | n_tower | distill | multiview | slip
    for key, value in TWO_TOWER.defaults().items():
        c[key] = value
    # The mixed-precision policy, in one place: the compute dtype of every tower and head
    # ('auto' | 'float32' | 'bfloat16'). 'auto' is bfloat16 on GPU/TPU and float32 on CPU
    # (models.build.resolve_dtype). Params, optimizer state, embeddings, logits of the loss,
    # LayerNorm statistics and attention softmax stay float32 whatever it is.
    c.dtype = "auto"
    # Matryoshka prefixes (Kusupati et al.): nested leading-dim sizes of the embedding that are
    # trained and evaluated as embeddings of their own (each re-normalized). () = none. Read by the
    # loss (config.loss) and by evaluation.
    c.matryoshka_dims = ()
    # multiview only (SwAV, Caron et al. 2020): K learnable prototypes (0 = none; the model then
    # also outputs image_views_scores [B, V, K]) and multi-crop (multiview and coca): the model
    # also takes the batch's image_local_views (data.local_views >= 1; a ViT needs
    # image.posemb='sincos2d').
    c.prototypes = 0
    c.multicrop = False
    # coca only (CoCa / CapPa / SigLIP 2): the captioning decoder (models/decoder.py) on the image
    # tower's tokens, and how its token cross-entropy is computed inside the model: label
    # smoothing, 'chunked' (fused, never forms the [B, L, V] logits) | 'dense', tile sizes.
    c.decoder = ml_collections.ConfigDict(DECODER.defaults())
    c.caption = ml_collections.ConfigDict(dict(label_smoothing=0.0, impl="chunked", vocab_block=4096,
                                               token_block=4096))
    # coca only (SigLIP 2's self-distillation / masked prediction, models/coca.py): dim = K logits
    # of the DINO-style heads (0 = off), their MLP widths, the fraction of patches masked in the
    # student's pass; with model.multicrop=True the local crops feed the consistency term.
    c.self_distill = ml_collections.ConfigDict(dict(dim=0, hidden=2048, bottleneck=256, mask_ratio=0.5))
    c.image = _tower_group("vit", VIT)
    c.text = _tower_group("transformer", TEXT)
    # n_tower only: order of the modalities (empty: sorted names of model.towers) and the
    # free-form tower descriptions (see the module docstring).
    c.modalities = ()
    # distill only: the frozen teacher's model config (free-form; merged onto these defaults).
    c.teacher = ml_collections.ConfigDict()
    c.towers = ml_collections.ConfigDict()
    return c
