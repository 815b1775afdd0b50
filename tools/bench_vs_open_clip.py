"""Our train step vs open_clip's, side by side on this machine: examples/s of each and the ratio.

The same CLIP is built twice: in open_clip (PyTorch, eager, fp32, ``torch.get_num_threads()``
threads, i.e. all cores) as ``open_clip.CLIP(embed_dim, vision_cfg, text_cfg)`` and here through
``contrastive_jax.train.build_training`` (the training loop's own builder, so the timed step is the
step a run executes: both towers, the global softmax loss, the AdamW update, the non-finite guard
and the metrics). Our architecture is read off open_clip's state dict by the interop converter
(``interop.clip.infer_model_config``: class token with its own position, LayerNorm before and after
the encoder, bias-free patch projection and heads, exact GELU as open_clip's default ``nn.GELU``,
LayerNorm eps 1e-5, causal text pooled at the end-of-text id), and our initial params ARE open_clip's
initial weights (``interop.clip.convert_state_dict``), so both sides start from the same function.

Default shape (issue 19): ViT-S/16 at 96 px (width 384, 12 layers, 6 heads of 64, MLP 1536, 36
patches + class token), a 6-layer 384-wide text tower (6 heads, MLP 1536, context 77, vocabulary
49,408), 384-d joint embedding; batch 64; fp32.

Training math on both sides: ``ClipLoss`` (open_clip) / ``loss.name='softmax', impl='dense'``
(ours): the symmetric InfoNCE over the whole batch with the learned logit scale; AdamW with
the same lr, betas, eps and weight decay, constant lr, no gradient clipping, weight decay on the
same tensors (open_clip's rule: every tensor of >= 2 dims except norms; so embeddings and position
embeddings decay, class token, norms, biases and the logit scale do not).

As a check that the two steps compute the same thing, the losses of the first ``--check-steps``
updates on one fixed batch are printed for both (``loss_open_clip`` / ``loss_ours``); they agree to
float32 rounding (``max_loss_diff``).

Timing: warm up both (``--warmup`` steps each; ours compiles), then ``--rounds`` rounds, each timing
``--steps`` steps of open_clip and ``--steps`` steps of ours back to back, the order alternating
between rounds, so both see the same machine load. Printed as ONE JSON line: per-round examples/s
of each, their medians and ``ratio`` = median(ours / open_clip per round).

Example::

    python tools/bench_vs_open_clip.py                    # the issue-19 shape, layers as configs/clip.py
    python tools/bench_vs_open_clip.py --layout unrolled  # one module per layer, no remat

``--layout scan`` (the default) runs our towers as ``configs/clip.py`` builds them (``nn.scan`` over
the layers, ``dots_saveable`` remat: the layout that doubled the step's MFU on CPU); ``unrolled`` is
the model schema's default layout. Same parameters and the same math either way.

The machine must be otherwise idle: under contention (load average far above the core count)
PyTorch's worker threads lose much more than XLA's and the ratio is meaningless (2.6x was seen
at load 5-17 for the unrolled layout, which gives 0.82-0.96x on an idle-ish machine); compare the
per-round lists, not just medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from bench_train import cpu_model  # tools/ is on sys.path when a tool runs as a script


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--image-width", type=int, default=384)
    p.add_argument("--image-layers", type=int, default=12)
    p.add_argument("--text-width", type=int, default=384)
    p.add_argument("--text-layers", type=int, default=6)
    p.add_argument("--text-heads", type=int, default=6)
    p.add_argument("--context", type=int, default=77, help="text context length (tokens)")
    p.add_argument("--vocab", type=int, default=49408)
    p.add_argument("--embed-dim", type=int, default=384)
    p.add_argument("--quick-gelu", action="store_true", help="QuickGELU on both sides (default: exact GELU)")
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side (ours compiles)")
    p.add_argument("--check-steps", type=int, default=3, help="updates whose losses are compared")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--layout", choices=("scan", "unrolled"), default="scan",
                   help="our towers' layer layout: scanned + dots_saveable remat (configs/clip.py) or unrolled")
    p.add_argument("--override", action="append", default=[],
                   help="our config override a.b=v (repeatable), e.g. model.image.scan=False")
    return p.parse_args(argv)


def build_open_clip(args):
    """open_clip's CLIP at the benchmark shape, its AdamW (open_clip's weight-decay groups) and loss."""
    import open_clip
    import torch

    torch.manual_seed(0)
    vision = open_clip.CLIPVisionCfg(layers=args.image_layers, width=args.image_width, head_width=64,
                                     mlp_ratio=4.0, patch_size=args.patch, image_size=args.image_size)
    text = open_clip.CLIPTextCfg(context_length=args.context, vocab_size=args.vocab, width=args.text_width,
                                 heads=args.text_heads, layers=args.text_layers)
    model = open_clip.CLIP(args.embed_dim, vision, text, quick_gelu=args.quick_gelu).train()
    # open_clip's training script (training/main.py): no decay for <2-D tensors, norms, biases, logit_scale.
    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
              {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": args.weight_decay}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    return model, opt, open_clip.ClipLoss()


def open_clip_step(model, opt, loss_fn):
    import torch

    def step(images, tokens):
        opt.zero_grad(set_to_none=True)
        image_features, text_features, logit_scale = model(images, tokens)
        loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        opt.step()
        with torch.no_grad():  # open_clip's training loop clamps the scale after each step
            model.logit_scale.clamp_(0, 4.6052)
        return float(loss.detach())

    return step


def build_ours(args, state_dict):
    """Our config and :class:`Training` for the same architecture, state holding open_clip's weights."""
    import jax
    import numpy as np

    from contrastive_jax.interop import clip as clip_lib
    from contrastive_jax.train import build_training
    from contrastive_jax.train.config import apply_override, default_config, merge

    act = "quick_gelu" if args.quick_gelu else "gelu_exact"
    model_cfg, params, _ = clip_lib.convert_state_dict(state_dict, layout="openai", act=act,
                                                       image_heads=args.image_width // 64, text_heads=args.text_heads)
    groups = clip_lib.run_config(model_cfg)
    config = merge(default_config(), groups, source="bench_vs_open_clip")
    config.train.batch_size = args.batch
    config.train.total_steps = 10**6
    config.loss.name, config.loss.impl = "softmax", "dense"
    config.optim.update(dict(name="adamw", lr=args.lr, b1=0.9, b2=0.98, eps=1e-6, weight_decay=args.weight_decay,
                             schedule="constant", warmup_steps=0, grad_clip_norm=0.0,
                             no_decay=(r".*(bias|scale)$", r".*norm.*", r".*cls$")))
    if args.layout == "scan":
        for tower in (config.model.image, config.model.text):
            tower.scan, tower.remat = True, "dots_saveable"
    for item in args.override:
        apply_override(config, item, source="--override")
    training = build_training(config)  # the loop's own builder: the step a run executes
    if config.model.image.scan or config.model.text.scan:
        stacked = clip_lib.stack_layers(params)
        params = {k: (stacked[k] if getattr(config.model, k, None) is not None and config.model[k].scan else v)
                  for k, v in params.items()}
    state = training.init_state(seed=0)
    same_tree = jax.tree.structure(state.params) == jax.tree.structure(params)
    if not same_tree:
        raise SystemExit(f"converted params do not match the model's tree:\n{jax.tree.structure(params)}\n"
                         f"{jax.tree.structure(state.params)}")
    new = jax.tree.map(lambda ref, v: jax.device_put(np.asarray(v, ref.dtype).reshape(ref.shape), ref.sharding),
                       state.params, params)
    return config, training, state.replace(params=new)


def make_batch(args, seed=0):
    """Images [B, H, W, 3] float32 (already normalized) and CLIP token ids [B, context] int32: random
    ids, the end-of-text id (vocab - 1) at a random length, zeros after (open_clip's padding)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.normal(size=(args.batch, args.image_size, args.image_size, 3)).astype(np.float32)
    tokens = rng.integers(1, args.vocab - 2, size=(args.batch, args.context)).astype(np.int32)
    lengths = rng.integers(5, args.context + 1, size=args.batch)
    tokens[:, 0] = args.vocab - 2  # <start_of_text>
    pos = np.arange(args.context)[None]
    tokens[pos == (lengths[:, None] - 1)] = args.vocab - 1
    tokens[pos >= lengths[:, None]] = 0
    return images, tokens


def timed(fn, n):
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t


def run(args):
    import jax
    import numpy as np
    import torch

    model, opt, loss_fn = build_open_clip(args)
    state_dict = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    config, training, state = build_ours(args, state_dict)
    images, tokens = make_batch(args)
    t_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    t_tokens = torch.from_numpy(tokens).long()
    batch = training.device_batch({"image": images, "text": tokens})
    torch_step = open_clip_step(model, opt, loss_fn)
    holder = {"state": state}

    def ours():
        holder["state"], metrics = training.step(holder["state"], batch)
        return metrics

    # Same weights, same batch, same optimizer: the losses of the first updates must agree.
    losses_oc, losses_ours = [], []
    for _ in range(max(args.check_steps, args.warmup)):
        losses_oc.append(torch_step(t_images, t_tokens))
        losses_ours.append(float(jax.block_until_ready(ours())["loss"]))
    times = {"open_clip": [], "ours": []}
    runs = {"open_clip": lambda: timed(lambda: torch_step(t_images, t_tokens), args.steps),
            "ours": lambda: timed(lambda: jax.block_until_ready(ours()), args.steps)}
    for r in range(args.rounds):
        for name in (("open_clip", "ours") if r % 2 == 0 else ("ours", "open_clip")):
            times[name].append(runs[name]())
    eps = {k: [args.batch * args.steps / t for t in v] for k, v in times.items()}
    ratios = [o / c for o, c in zip(eps["ours"], eps["open_clip"])]
    n_oc = sum(p.numel() for p in model.parameters())
    n_ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(holder["state"].params))
    check = min(args.check_steps, len(losses_oc))
    return dict(
        shape=dict(batch=args.batch, image_size=args.image_size, patch=args.patch, image_width=args.image_width,
                   image_layers=args.image_layers, text_width=args.text_width, text_layers=args.text_layers,
                   context=args.context, vocab=args.vocab, embed_dim=args.embed_dim,
                   act="quick_gelu" if args.quick_gelu else "gelu_exact", dtype="float32"),
        layout=args.layout, overrides=args.override,
        params_open_clip=n_oc,
        # Ours has one more scalar: the logit bias of the sigmoid loss (unused by softmax, zero gradient).
        params_ours=n_ours,
        loss_open_clip=[round(x, 6) for x in losses_oc[:check]],
        loss_ours=[round(x, 6) for x in losses_ours[:check]],
        max_loss_diff=float(max(abs(a - b) for a, b in zip(losses_oc[:check], losses_ours[:check]))) if check else None,
        examples_per_s_open_clip=[round(x, 2) for x in eps["open_clip"]],
        examples_per_s_ours=[round(x, 2) for x in eps["ours"]],
        median_open_clip=round(statistics.median(eps["open_clip"]), 2),
        median_ours=round(statistics.median(eps["ours"]), 2),
        ratio=round(statistics.median(ratios), 3),
        ratios=[round(x, 3) for x in ratios],
        image_scan=bool(config.model.image.scan), image_remat=str(config.model.image.remat),
        attention_impl=str(config.model.image.attention_impl),
        torch_threads=torch.get_num_threads(), torch=torch.__version__, jax=jax.__version__,
        cpu=cpu_model(), cpu_count=os.cpu_count(), loadavg_1min=round(os.getloadavg()[0], 2),
    )


def main(argv=None):
    args = parse_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
