"""``contrastive-jax convert CHECKPOINT OUTDIR [--vocab FILE] ...`` and
``contrastive-jax convert --export RUN OUTPUT [--format state_dict|hf] [--layout openai|open_clip]``.

Import: an OpenAI CLIP / open_clip ViT checkpoint (``.pt`` / ``.bin`` need PyTorch,
``.safetensors`` does not), or a Hugging Face ``transformers`` CLIPModel / SiglipModel
``save_pretrained`` folder (no flags needed: it says its architecture and holds its tokenizer),
becomes a model directory (``config.json``, ``tokenizer.json``, ``checkpoints/0``) that
``contrastive_jax.load``, ``contrastive-jax eval --checkpoint`` and
``--config.checkpoint.init_from`` read. Export: a run's (or model directory's) params written
back in the PyTorch layout (``--format state_dict``, a file) or as a ``transformers`` folder
(``--format hf``).
"""
from __future__ import annotations

import json
import sys

HELP = ("convert an OpenAI CLIP / open_clip checkpoint or a transformers CLIP/SigLIP folder into a model "
        "directory, or export one back")
# Options that only apply to PyTorch CLIP checkpoint files (a transformers folder states all of these).
_FILE_OPTIONS = ("vocab", "layout", "act", "image_heads", "text_heads", "open_clip_config")


def add_arguments(parser) -> None:
    parser.add_argument("source", help="checkpoint file or transformers folder to import (or, with --export, a run / "
                        "model directory)")
    parser.add_argument("output", help="model directory to create (or, with --export, a .safetensors/.pt/.bin file, "
                        "or a new folder with --format hf)")
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
    parser.add_argument("--format", default="state_dict", choices=("state_dict", "hf"),
                        help="--export: a PyTorch CLIP state dict file, or a transformers CLIPModel/SiglipModel folder")


def run(args, overrides) -> int:
    if overrides:
        print(f"contrastive-jax convert: takes no --config overrides (got {overrides})", file=sys.stderr)
        return 2
    from contrastive_jax import interop

    try:
        if args.export:
            import numpy as np

            from contrastive_jax.train.restore import load_run

            config, _, params, tokenizer = load_run(args.source, args.step)
            if args.format == "hf":
                from contrastive_jax.interop.hf import export_hf_folder

                print(json.dumps(export_hf_folder(args.output, params, config, tokenizer)))
                return 0
            written = interop.save_clip_checkpoint(args.output, params, config, layout=args.layout or "openai",
                                                   dtype=np.dtype(args.dtype))
            print(json.dumps({"output": args.output, "tensors": len(written), "act": config.model.image.act}))
            return 0
        from contrastive_jax.interop.hf import reads_as_hf_folder

        if reads_as_hf_folder(args.source):
            return _import_hf(args)
        ckpt = interop.load_clip_checkpoint(
            args.source, vocab=args.vocab, layout=args.layout or "auto", act=args.act, image_heads=args.image_heads,
            text_heads=args.text_heads, open_clip_config=args.open_clip_config, scan=args.scan)
        directory = ckpt.save(args.output)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"contrastive-jax convert: {e}", file=sys.stderr)
        return 2
    _print_summary(directory, ckpt.config, ckpt.tokenizer, ckpt.notes, layout=ckpt.layout)
    return 0


def _import_hf(args) -> int:
    """A transformers folder -> a model directory; the file-only options are refused (one line, exit 2)."""
    given = [f"--{o.replace('_', '-')}" for o in _FILE_OPTIONS if getattr(args, o) is not None]
    if given:
        print(f"contrastive-jax convert: {', '.join(given)} do not apply to the transformers folder {args.source} "
              "(its config.json and tokenizer files say all of it)", file=sys.stderr)
        return 2
    import os

    from contrastive_jax.interop.hf import load_hf_folder

    existing = os.path.join(os.path.abspath(args.output), "checkpoints", "0")
    if os.path.exists(existing):  # before reading any weights
        print(f"contrastive-jax convert: {existing} exists; choose an empty output directory", file=sys.stderr)
        return 2
    try:
        ckpt = load_hf_folder(args.source, scan=args.scan)
        directory = ckpt.save(args.output)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"contrastive-jax convert: {e}", file=sys.stderr)
        return 2
    _print_summary(directory, ckpt.config, ckpt.tokenizer, ckpt.notes, layout=f"transformers {ckpt.kind}")
    return 0


def _print_summary(directory, config, tokenizer, notes, *, layout) -> None:
    m = config.model
    print(json.dumps({
        "output": directory, "layout": layout, "image": f"ViT width {m.image.width} x {m.image.depth}, patch "
        f"{m.image.patch_size}, {config.data.image_size} px", "text": f"width {m.text.width} x {m.text.depth}, "
        f"context {m.text.context_length}, vocab {m.text.vocab_size}", "act": m.image.act,
        "tokenizer": tokenizer is not None, "notes": notes}))
