"""Checkpoint files <-> a converted model (run config + params + tokenizer).

:func:`load_clip_checkpoint` reads an OpenAI CLIP / open_clip ViT checkpoint file and returns a
:class:`ClipCheckpoint`; its :meth:`ClipCheckpoint.save` writes a model directory that
``contrastive_jax.load``, ``contrastive-jax eval --checkpoint`` and ``checkpoint.init_from``
read. :func:`save_clip_checkpoint` writes our params back in the PyTorch layout.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import ml_collections
import numpy as np

from contrastive_jax.interop import clip as clip_lib
from contrastive_jax.interop.state_dict_io import read_state_dict, write_state_dict

_OPEN_CLIP_CONFIG = "open_clip_config.json"
_VOCAB_NAMES = ("bpe_simple_vocab_16e6.txt.gz", "bpe_simple_vocab_16e6.txt")


@dataclasses.dataclass
class ClipCheckpoint:
    """A converted checkpoint.

    Attributes:
      config: full run config (``default_config()`` with the converted ``model`` and ``data``
        groups: image size, text length, CLIP normalization, tokenizer rules).
      params: nested dict of float32 numpy arrays in our layout.
      tokenizer: the CLIP BPE tokenizer (None when no vocabulary file was given).
      layout: the key layout that was read (``'openai'`` / ``'open_clip'``).
      notes: assumptions the weights could not settle (also issued as warnings).
    """

    config: ml_collections.ConfigDict
    params: dict
    tokenizer: Any
    layout: str
    notes: list[str]

    def save(self, directory: str) -> str:
        """Writes a model directory (see :func:`contrastive_jax.train.restore.write_model_dir`)."""
        from contrastive_jax.train.restore import write_model_dir

        return write_model_dir(directory, self.config, self.params, self.tokenizer)


def _beside(path: str, names) -> str | None:
    for name in names:
        candidate = os.path.join(os.path.dirname(os.path.abspath(path)), name)
        if os.path.isfile(candidate):
            return candidate
    return None


def load_clip_checkpoint(path: str | os.PathLike, *, vocab: str | os.PathLike | None = None, layout: str = "auto",
                         act: str | None = None, image_heads: int | None = None, text_heads: int | None = None,
                         open_clip_config: str | os.PathLike | dict | None = None, scan: bool = False
                         ) -> ClipCheckpoint:
    """Converts an OpenAI CLIP or open_clip ViT checkpoint file.

    Args:
      path: ``.pt`` / ``.pth`` / ``.bin`` (needs PyTorch) or ``.safetensors`` (does not), or an
        open_clip hub folder (``open_clip_config.json`` + ``open_clip_model.safetensors`` or
        ``open_clip_pytorch_model.bin``).
      vocab: CLIP's BPE merges file (``bpe_simple_vocab_16e6.txt.gz``, shipped with OpenAI's
        ``clip`` and with open_clip); default: such a file beside ``path``, else no tokenizer.
      layout: ``'auto'`` | ``'openai'`` | ``'open_clip'``.
      act: ``'quick_gelu'`` | ``'gelu_exact'``; default: inferred (``interop.clip.infer_activation``:
        the open_clip config, a ``quickgelu`` name, OpenAI's TorchScript format, else exact GELU).
      image_heads / text_heads: attention heads, when not width / 64 (see ``interop.clip``).
      open_clip_config: open_clip's model config (dict or JSON path); default:
        ``open_clip_config.json`` beside ``path`` when present.
      scan: stack the layers for ``scan=True`` towers (faster to compile and train).

    Raises:
      ConversionError: listing unmapped / missing / mis-shaped keys.
    """
    path = os.fspath(path)
    path = clip_lib.find_open_clip_weights(path) or path  # issue 16 (helper A): an open_clip hub folder
    notes: list[str] = []
    if open_clip_config is None and (found := _beside(path, (_OPEN_CLIP_CONFIG,))):
        open_clip_config = found
        notes.append(f"read the model config {found}")
    oc = clip_lib.read_open_clip_config(open_clip_config)
    if vocab is None and (found := _beside(path, _VOCAB_NAMES)):
        vocab = found
    state_dict = read_state_dict(path)
    layout = clip_lib.detect_layout(state_dict) if layout == "auto" else layout
    model, params, assumed = clip_lib.convert_state_dict(
        state_dict, layout=layout, act=act, image_heads=image_heads, text_heads=text_heads, open_clip_config=oc,
        source=path)  # issue 16 (helper A): the file's name and format say which GELU
    for note in assumed:
        warnings.warn(f"{path}: {note}", stacklevel=2)
    notes += assumed
    from contrastive_jax.train.config import default_config, merge

    groups = clip_lib.run_config(model, vocab_path=os.fspath(vocab) if vocab else None, open_clip_config=oc)
    if scan:
        groups.model.image.scan = groups.model.text.scan = True
        params = clip_lib.stack_layers(params)
    config = merge(default_config(), groups, source=path)
    tokenizer = None
    if vocab:
        text = config.model.text
        tokenizer = clip_lib.clip_tokenizer(vocab, int(text.vocab_size), int(text.context_length))
    return ClipCheckpoint(config=config, params=params, tokenizer=tokenizer, layout=layout, notes=notes)


def save_clip_checkpoint(path: str | os.PathLike, params: Any, config: Any, *, layout: str = "openai",
                         dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Writes our two-tower CLIP params as a PyTorch state dict file of OpenAI's / open_clip's layout.

    Args:
      path: ``.safetensors`` (no PyTorch needed) or ``.pt`` / ``.bin``.
      params: the model's params; config: its run config (``model`` and ``data.image_size`` used).
      dtype: of the written tensors (float32 is exact).

    The activation is not part of a state dict: a model trained with ``act='quick_gelu'`` is
    OpenAI's architecture; with ``'gelu_exact'`` it is open_clip's non-quickgelu one. Returns the
    written dict.
    """
    state_dict = clip_lib.export_state_dict(params, config.model, int(config.data.image_size), layout=layout,
                                            dtype=dtype)
    write_state_dict(state_dict, path)
    return state_dict
