"""``contrastive-jax train --config FILE[:ARG] --workdir DIR [--config.a.b=v ...]``."""
from __future__ import annotations

import json
import os
import sys

from contrastive_jax.commands import EXIT_CONFIG_ERROR, load_config_or_none

HELP = "train (or resume) a run described by a config file"


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="config file, optionally PATH:ARG")
    parser.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, summary")


def run(args, overrides) -> int:
    config = load_config_or_none(args.config, overrides)
    if config is None:
        return EXIT_CONFIG_ERROR
    from contrastive_jax.train.loop import train

    summary = train(config, args.workdir)
    print(json.dumps(summary, indent=2))
    print(f"summary written to {os.path.join(os.path.abspath(args.workdir), 'summary.json')}", file=sys.stderr)
    return 0
