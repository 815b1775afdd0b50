"""Subcommands of ``contrastive-jax``; one module each, listed in :data:`COMMANDS`.

A command module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args, overrides) -> int`` (the exit code). ``overrides`` are the ``--config.a.b=v`` items
(prefix removed), for commands that take a config.
"""
from __future__ import annotations

import sys
from typing import Sequence

# name -> module under contrastive_jax.commands (imported only when that command runs).
COMMANDS = {
    "train": "train",
    "eval": "eval",
    "report": "report",
    "data": "data",
    "inspect": "inspect",
    "convert": "convert",
    "plan": "plan",
    "benchmark": "benchmark",
}

EXIT_CONFIG_ERROR = 2


def load_config_or_none(spec: str, overrides: Sequence[str]):
    """Loads a run config; on a ConfigError prints it to stderr and returns None (exit code 2)."""
    from contrastive_jax.train.config import ConfigError, load_config

    try:
        return load_config(spec, overrides)
    except ConfigError as e:
        print(f"contrastive-jax: config error: {e}", file=sys.stderr)
        return None
