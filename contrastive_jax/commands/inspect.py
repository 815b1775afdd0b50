"""``contrastive-jax inspect --config FILE[:ARG] [--json] [--config.a.b=v ...]``.

Prints the model's parameter count per tower (encoder + projection head) and its training FLOPs
per example (3 x the forward matmul/conv FLOPs, see ``contrastive_jax.models.inspect``), plus the
contrastive loss's share at ``train.batch_size``. Nothing is allocated (``jax.eval_shape``), so
billion-parameter configs inspect in seconds on a laptop. ``model.text.vocab_size = -1`` is
resolved from the data config's tokenizer, as training does.
"""
from __future__ import annotations

import copy
import json
import sys

from contrastive_jax.commands import EXIT_CONFIG_ERROR, load_config_or_none

HELP = "print parameters per tower and training FLOPs per example of a config's model"


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="config file, optionally PATH:ARG")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def summarize(config) -> dict:
    """The inspect summary of ``config`` (see ``models.inspect.model_summary``) plus its name."""
    from contrastive_jax import models
    from contrastive_jax.models.inspect import model_summary

    model_config = copy.deepcopy(config.model)
    # Text towers with vocab_size -1 take the tokenizer's vocabulary, as training does.
    groups = [model_config.text] if "text" in model_config else []
    groups += [t for t in model_config.get("towers", {}).values() if t.get("encoder") == "transformer"]
    if any(int(g.get("vocab_size", -1)) == -1 for g in groups):
        from contrastive_jax.data import build_tokenizer

        vocab = int(build_tokenizer(config.data).vocab_size)
        for g in groups:
            if int(g.get("vocab_size", -1)) == -1:
                g["vocab_size"] = vocab
    model = models.build(model_config)
    inputs = models.sample_inputs(model_config, config.data, batch=2, modalities=tuple(model.modalities))
    summary = model_summary(model, inputs, batch_size=int(config.train.batch_size))
    summary["model"] = model_config.get("name", "two_tower")
    summary["dtype"] = model_config.dtype
    summary["batch_size"] = int(config.train.batch_size)
    summary["inputs"] = {m: list(s.shape[1:]) for m, s in zip(model.modalities, inputs)}
    return summary


def _fmt(n: float, unit: str) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {suffix}{unit}"
    return f"{n:,.0f} {unit}"


def run(args, overrides) -> int:
    config = load_config_or_none(args.config, overrides)
    if config is None:
        return EXIT_CONFIG_ERROR
    try:
        summary = summarize(config)
    except ValueError as e:
        print(f"contrastive-jax inspect: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"model {summary['model']} ({args.config}), compute dtype {summary['dtype']}")
    print(f"{'tower':<12}{'input':<18}{'params':>16}{'train FLOPs / example':>26}")
    for name, t in summary["towers"].items():
        flops = t["train_flops_per_example"]
        print(f"{name:<12}{str(tuple(summary['inputs'][name])):<18}{t['params']:>16,}"
              f"{(_fmt(flops, 'FLOP') if flops is not None else 'n/a'):>26}")
    print(f"{'loss':<12}{'batch ' + str(summary['batch_size']):<18}{summary['other_params']:>16,}"
          f"{_fmt(summary['loss_train_flops_per_example'], 'FLOP'):>26}")
    print(f"{'total':<30}{summary['total_params']:>16,}{_fmt(summary['train_flops_per_example'], 'FLOP'):>26}")
    print(f"({_fmt(summary['total_params'], 'params')}; embedding dim {summary['embed_dim']})")
    return 0
