"""Published CLIP / SigLIP architectures by name, trained with their published loss.

    contrastive-jax inspect --config configs/clip.py:vit_b16        # params per tower, FLOPs
    contrastive-jax train --config configs/clip.py:vit_b32 --workdir runs/b32 --config.data.name=...

Variants (``arg``):

- ``vit_b32``, ``vit_b16``, ``vit_l14``: OpenAI CLIP (Radford et al. 2021) — 224 px, class-token
  pooling with a position for the class token, LayerNorm before the encoder, bias-free patch
  projection and heads, QuickGELU, a 12-layer causal text tower (77 tokens, 49,408 BPE vocab)
  pooled at EOS, softmax loss, LayerNorm epsilon 1e-5. Parameter counts equal the released
  models: 151,277,313 / 149,620,737 / 427,616,513 (checked by ``tests/models/test_model_zoo.py``).
  A converted OpenAI checkpoint (``contrastive-jax convert``, docs/interop.md) has exactly this
  config, so ``--config.checkpoint.init_from=<converted dir>`` fine-tunes it.
- ``siglip_b16``, ``siglip_so400m14``: SigLIP (Zhai et al. 2023) — MAP-pooled ViT without a class
  token, bidirectional text tower (64 tokens, 32k vocab) pooled at the last token, sigmoid loss
  with scale init 10 and bias init -10. (Head/bias details of the released checkpoints differ
  slightly; these give the published widths and depths.)
- ``vit_s16_96``: the small CLIP of the train-step benchmark (``tools/bench_train.py``): ViT-S/16
  at 96 px, a 6-layer text tower.

The tokenizer must produce ids below ``model.text.vocab_size`` (e.g. ``data.tokenizer`` of kind
'clip_bpe' with OpenAI's merges file); the data fields here only set sizes.
"""
import math

import ml_collections

# name -> (image: ViT size, patch, image_size), (text: width, depth, heads), embed_dim
_OPENAI = {
    "vit_b32": (("B", 32, 224), (512, 12, 8), 512),
    "vit_b16": (("B", 16, 224), (512, 12, 8), 512),
    "vit_l14": (("L", 14, 224), (768, 12, 12), 768),
}
_SIGLIP = {
    "siglip_b16": (("B", 16, 224), "B", 768),
    "siglip_so400m14": (("So400m", 14, 224), "So400m", 1152),
}
VARIANTS = tuple(_OPENAI) + tuple(_SIGLIP) + ("vit_s16_96",)


def _vit(size, patch):
    from contrastive_jax.models.vit import vit_variant

    return vit_variant(f"{size}/{patch}")


def get_config(arg="vit_b16"):
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    if arg in _OPENAI:
        (size, patch, image_size), (t_width, t_depth, t_heads), embed = _OPENAI[arg]
        c.model = dict(
            embed_dim=embed, scale_init=math.log(1 / 0.07), bias_init=0.0, max_scale=100.0,
            head="linear", head_bias=False,
            image=dict(name="vit", **_vit(size, patch), pool="cls", cls_posemb=True, norm_pre=True,
                       patch_bias=False, posemb="learn", stem="patch", act="quick_gelu", norm_eps=1e-5),
            # Pooled at <|endoftext|> (id 49407): CLIP's id 0 is '!' as well as the padding.
            text=dict(name="transformer", vocab_size=49408, context_length=77, width=t_width,
                      depth=t_depth, num_heads=t_heads, mlp_dim=4 * t_width, causal=True, pool="eos",
                      act="quick_gelu", norm_eps=1e-5, eos_id=49407),
        )
        # OpenAI's normalization and tokenizer rules; set data.tokenizer.path to CLIP's merges
        # file (bpe_simple_vocab_16e6.txt.gz; its first 48,894 merges give the 49,408 ids).
        c.data = dict(image_size=image_size, max_text_len=77, mean=(0.48145466, 0.4578275, 0.40821073),
                      std=(0.26862954, 0.26130258, 0.27577711),
                      tokenizer=dict(kind="clip_bpe", clean="basic", lowercase=True, bpe_merges=48894))
        c.loss = dict(name="softmax", impl="chunked")
    elif arg in _SIGLIP:
        (size, patch, image_size), t_size, embed = _SIGLIP[arg]
        text = _vit(t_size, 16)
        text.pop("patch_size")
        c.model = dict(
            embed_dim=embed, scale_init=math.log(10.0), bias_init=-10.0, max_scale=100.0,
            head="linear", head_bias=True,
            image=dict(name="vit", **_vit(size, patch), pool="map", posemb="learn", act="gelu"),
            text=dict(name="transformer", vocab_size=32000, context_length=64, causal=False, pool="last",
                      act="gelu", **text),
        )
        c.data = dict(image_size=image_size, max_text_len=64)
        c.loss = dict(name="sigmoid", impl="chunked")
    elif arg == "vit_s16_96":
        # Scanned layers + dots_saveable remat: on CPU the unrolled 12-layer backward ran at about
        # half the MFU of the scanned one (its many live activation buffers are memory-bound);
        # recomputing the elementwise work instead of storing it gained a little more
        # (docs/benchmarks.md, "Train step").
        fast = dict(scan=True, remat="dots_saveable")
        c.model = dict(
            embed_dim=384, head="linear",
            image=dict(name="vit", **_vit("S", 16), pool="gap", posemb="learn", **fast),
            text=dict(name="transformer", vocab_size=32000, context_length=32, width=384, depth=6,
                      num_heads=6, mlp_dim=1536, causal=True, pool="eos", **fast),
        )
        c.data = dict(image_size=96, max_text_len=32)
        c.loss = dict(name="softmax", impl="dense")
    else:
        raise ValueError(f"unknown configs/clip.py variant {arg!r}; known: {', '.join(VARIANTS)}")
    return c
