"""The ``contrastive-jax`` command.

    contrastive-jax train --config configs/quickstart.py[:arg] --workdir DIR [--config.a.b=value ...]

Run ``contrastive-jax -h`` for every subcommand. Overrides use the dotted form of any config field;
an unknown key fails at once, naming the key.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from contrastive_jax.commands import COMMANDS, EXIT_CONFIG_ERROR


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
                    print(f"contrastive-jax: config error: {arg} needs a value (--config.a.b=VALUE)",
                          file=sys.stderr)
                    raise SystemExit(EXIT_CONFIG_ERROR)
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _command_module(name: str):
    return importlib.import_module(f"contrastive_jax.commands.{COMMANDS[name]}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="contrastive-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        module = _command_module(name)
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(p)
        p.add_argument("--log-level", default="WARNING")
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
    try:
        return int(_command_module(args.command).run(args, overrides))
    except ValueError as e:
        # A ConfigError from any depth of any command is the user's to fix: one line, exit 2. The
        # class is looked up where it was raised from, so commands that never load the run schema
        # (data convert) do not pay for importing it.
        config_module = sys.modules.get("contrastive_jax.train.config")
        if config_module is None or not isinstance(e, config_module.ConfigError):
            raise
        print(f"contrastive-jax: config error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


if __name__ == "__main__":
    sys.exit(main())
