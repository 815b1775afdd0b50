"""Symile (Saporta et al. 2024) over three modalities of the built-in shapes dataset: the image,
its caption and the ``attributes`` vector (a noisy one-hot code of the scene, float32 [18]).

    contrastive-jax train --config configs/symile.py --workdir runs/symile

An N-tower model (``model.name="n_tower"``): the quickstart ViT and text transformer plus an MLP
tower for the attribute vector; the loss contrasts the multilinear inner product of the three
embeddings, every modality in turn as the anchor, with O(N) negatives (streamed). Set
``loss.symile.negatives="n_squared"`` (and ``loss.impl="dense"``) for the O(N^2) variant.
Evaluation (zero-shot, retrieval) uses the image and text towers.
"""
import os

from contrastive_jax.train.config import config_file

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
    c = config_file(QUICKSTART, arg or "classic")  # the 64 px AdamW quickstart its results were measured on
    qs = c.model
    size, length = c.data.image_size, 16  # config.data.max_text_len's default
    image = dict(encoder="vit", input_shape=(size, size, 3), input_dtype="uint8",
                 **{k: qs.image[k] for k in ("patch_size", "width", "depth", "num_heads", "mlp_dim")},
                 **{k: qs.image[k] for k in ("pool", "stem", "posemb") if k in qs.image})
    text = dict(encoder="transformer", input_shape=(length,), input_dtype="int32",
                vocab_size=-1,  # from the tokenizer
                **{k: qs.text[k] for k in ("width", "depth", "num_heads", "mlp_dim", "causal") if k in qs.text})
    attributes = dict(encoder="mlp", width=qs.text.width, depth=2, input_shape=(18,), input_dtype="float32")
    c.model = dict(name="n_tower", embed_dim=qs.embed_dim, modalities=("image", "text", "attributes"),
                   towers=dict(image=image, text=text, attributes=attributes))
    c.loss = dict(name="symile", impl="chunked", block_size=128,
                  symile=dict(modalities=("image", "text", "attributes"), negatives="n"))
    return c
