"""``contrastive-jax convert CHECKPOINT OUTDIR [--vocab FILE] ...`` and
``contrastive-jax convert --export RUN OUTFILE [--layout openai|open_clip]``.

Import: an OpenAI CLIP / open_clip ViT checkpoint (``.pt`` / ``.bin`` need PyTorch,
``.safetensors`` does not) becomes a model directory (``config.json``, ``tokenizer.json``,
``checkpoints/0``) that ``contrastive_jax.load``, ``contrastive-jax eval --checkpoint`` and
``--config.checkpoint.init_from`` read. Export: a run's (or model directory's) params written
back in the PyTorch layout.
"""
from __future__ import annotations

import json
import sys

HELP = "convert an OpenAI CLIP / open_clip checkpoint into a model directory, or export one back"


def add_arguments(parser) -> None:
    parser.add_argument("source", help="checkpoint file to import (or, with --export, a run / model directory)")
    parser.add_argument("output", help="model directory to create (or, with --export, a .safetensors/.pt/.bin file)")
    parser.add_argument("--export", action="store_true", help="export SOURCE's params to the PyTorch layout")
    parser.add_argument("--vocab", default=None, help="CLIP's BPE merges file (bpe_simple_vocab_16e6.txt.gz)")
    parser.add_argument("--layout", default=None, choices=("auto", "openai", "open_clip"),
                        help="key layout (import default: auto; export default: openai)")
    parser.add_argument("--act", default=None, choices=("quick_gelu", "gelu_exact"),
                        help="activation (default: from --open-clip-config, else QuickGELU)")
    parser.add_argument("--image-heads", type=int, default=None, help="image attention heads (default: width/64)")
    parser.add_argument("--text-heads", type=int, default=None, help="text attention heads (default: width/64)")
    parser.add_argument("--open-clip-config", default=None, help="open_clip model config JSON")
    parser.add_argument("--scan", action="store_true", help="stack the layers (model.*.scan=True)")
    parser.add_argument("--step", type=int, default=None, help="--export: checkpoint step (default: latest)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="--export: tensor dtype")


def run(args, overrides) -> int:
    if overrides:
        print(f"contrastive-jax convert: takes no --config overrides (got {overrides})", file=sys.stderr)
        return 2
    from contrastive_jax import interop

    try:
        if args.export:
            import numpy as np

            from contrastive_jax.train.restore import load_run

            config, _, params, _ = load_run(args.source, args.step)
            written = interop.save_clip_checkpoint(args.output, params, config, layout=args.layout or "openai",
                                                   dtype=np.dtype(args.dtype))
            print(json.dumps({"output": args.output, "tensors": len(written), "act": config.model.image.act}))
            return 0
        ckpt = interop.load_clip_checkpoint(
            args.source, vocab=args.vocab, layout=args.layout or "auto", act=args.act, image_heads=args.image_heads,
            text_heads=args.text_heads, open_clip_config=args.open_clip_config, scan=args.scan)
        directory = ckpt.save(args.output)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"contrastive-jax convert: {e}", file=sys.stderr)
        return 2
    m = ckpt.config.model
    print(json.dumps({
        "output": directory, "layout": ckpt.layout, "image": f"ViT width {m.image.width} x {m.image.depth}, patch "
        f"{m.image.patch_size}, {ckpt.config.data.image_size} px", "text": f"width {m.text.width} x {m.text.depth}, "
        f"context {m.text.context_length}, vocab {m.text.vocab_size}", "act": m.image.act,
        "tokenizer": ckpt.tokenizer is not None, "notes": ckpt.notes}))
    return 0
