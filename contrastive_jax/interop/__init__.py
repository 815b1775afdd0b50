"""Interoperability with PyTorch CLIP checkpoints (OpenAI CLIP, open_clip).

    from contrastive_jax import interop
    ckpt = interop.load_clip_checkpoint("ViT-B-32.pt", vocab="bpe_simple_vocab_16e6.txt.gz")
    ckpt.save("runs/clip_b32")        # a model directory: contrastive_jax.load, eval, init_from
    interop.save_clip_checkpoint("out.safetensors", params, config)   # and back

See ``docs/interop.md``. ``.safetensors`` files need no PyTorch; ``.pt``/``.bin`` need the
``[torch]`` extra.
"""
from contrastive_jax.interop.clip import (
    CLIP_MEAN,
    CLIP_STD,
    LAYOUTS,
    ConversionError,
    convert_state_dict,
    detect_layout,
    export_state_dict,
    stack_layers,
    unstack_layers,
)
from contrastive_jax.interop.convert import (
    ClipCheckpoint,
    load_clip_checkpoint,
    save_clip_checkpoint,
)
from contrastive_jax.interop.state_dict_io import read_state_dict, unwrap_state_dict, write_state_dict

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "LAYOUTS", "ConversionError", "convert_state_dict", "detect_layout",
    "export_state_dict", "stack_layers", "unstack_layers", "ClipCheckpoint", "load_clip_checkpoint",
    "save_clip_checkpoint", "read_state_dict", "unwrap_state_dict", "write_state_dict",
]
