"""The ``contrastive-jax`` command.

    contrastive-jax train --config configs/quickstart.py[:arg] --workdir DIR [--config.a.b=value ...]

Overrides use the dotted form of any config field; an unknown key fails at once, naming the key.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates ``--config.a.b=v`` / ``--config.a.b v`` overrides from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise SystemExit(f"error: {arg} needs a value")
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contrastive-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (or resume) a run described by a config file")
    train.add_argument("--config", required=True, help="config file, optionally PATH:ARG")
    train.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, summary")
    train.add_argument("--log-level", default="WARNING")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().level > logging.INFO:
        # tfds/absl warn about things that are expected here (custom builder configs, PIL
        # instead of OpenCV); keep the terminal for our own progress and results.
        logging.getLogger("absl").setLevel(logging.ERROR)

    from contrastive_jax.train.config import ConfigError, load_config

    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"contrastive-jax: config error: {e}", file=sys.stderr)
        return 2

    if args.command == "train":
        from contrastive_jax.train.loop import train

        summary = train(config, args.workdir)
        print(json.dumps(summary, indent=2))
        print(f"summary written to {os.path.join(os.path.abspath(args.workdir), 'summary.json')}", file=sys.stderr)
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
