"""The ``contrastive-jax`` command.

    contrastive-jax train --config configs/quickstart.py[:arg] --workdir DIR [--config.a.b=value ...]

Run ``contrastive-jax -h`` for every subcommand. Overrides use the dotted form of any config field;
an unknown key fails at once, naming the key.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
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


# The commands that run XLA on the host's CPU long enough for the allocator to matter.
_HUGEPAGE_COMMANDS = ("train", "eval", "benchmark")
HUGEPAGES_ENV = "CONTRASTIVE_JAX_HUGEPAGES"


def _hugepage_malloc_env(argv: list[str], environ: dict, *, platform: str = sys.platform,
                         thp_file: str = "/sys/kernel/mm/transparent_hugepage/enabled") -> dict | None:
    """The environment to re-run this command with glibc's malloc on transparent huge pages
    (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, glibc >= 2.35), or None to run as is.

    Why: XLA:CPU allocates each step's buffers afresh; with 4 KiB pages every step faults them in
    again (~33,000 minor faults and ~0.1 CPU-s per step of the fast quickstart on 2 cores), and
    huge pages cut that to a few hundred: the step ran ~10% faster (docs/benchmarks.md, "Session
    13"). Only where it can help: Linux with glibc >= 2.35, transparent huge pages in ``madvise``
    mode (``always`` needs nothing, ``never`` cannot), a compute command, and neither the tunable
    already set nor ``CONTRASTIVE_JAX_HUGEPAGES=0``.
    """
    if platform != "linux" or environ.get(HUGEPAGES_ENV, "1") == "0":
        return None
    if not argv or argv[0] not in _HUGEPAGE_COMMANDS or "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
        return None
    import platform as platform_lib

    lib, version = platform_lib.libc_ver()
    try:
        if lib != "glibc" or tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
            return None
        with open(thp_file) as f:
            if "[madvise]" not in f.read():
                return None
    except (OSError, ValueError):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:glibc.malloc.hugetlb=1" if tunables else "glibc.malloc.hugetlb=1"}


def _started_as_program() -> bool:
    """Whether this process is the ``contrastive-jax`` program (the console script or ``python -m
    contrastive_jax.cli``), not another program that calls :func:`main` (a wrapper that patches
    something first would lose its patch to a re-exec)."""
    first = sys.argv[0] if sys.argv else ""
    return os.path.basename(first) == "contrastive-jax" or os.path.abspath(first) == os.path.abspath(__file__)


def main(argv: list[str] | None = None) -> int:
    if argv is None and _started_as_program():
        # exec replaces the process: only the program itself, never a caller's process.
        env = _hugepage_malloc_env(sys.argv[1:], dict(os.environ))
        if env is not None:
            os.execve(sys.executable, [sys.executable, "-m", "contrastive_jax.cli", *sys.argv[1:]], env)
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
