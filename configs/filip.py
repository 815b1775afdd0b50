"""FILIP token-wise late interaction (Yao et al. 2022, "FILIP: Fine-grained Interactive
Language-Image Pre-Training") on the built-in shapes dataset.

    contrastive-jax train --config configs/filip.py --workdir runs/filip

The quickstart model with ``model.return_tokens=True``: the towers also return their patch and
text tokens, projected by the same heads and L2-normalized, and the loss scores an image-text
pair by the mean over tokens of the best-matching token on the other side. Streamed
(``impl="chunked"``, tiles of ``loss.filip.block_size`` images x texts); each side keeps half of
its tokens (``loss.filip.token_fraction=0.5``: the 64 patches -> 32), those most similar to the
example's pooled embedding. ``configs/filip.py:tiny``: a seconds-long smoke run.
"""
import os

from contrastive_jax.train.config import config_file

QUICKSTART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(arg=None):
    c = config_file(QUICKSTART, arg or "classic")  # the 64 px AdamW quickstart its results were measured on
    c.model.return_tokens = True
    c.loss = dict(name="filip", impl="chunked", filip=dict(block_size=32, token_fraction=0.5))
    return c
