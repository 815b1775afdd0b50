"""``contrastive-jax train --config FILE[:ARG] --workdir DIR [--config.a.b=v ...]``.

Exit codes: 0 done (or stopped by ``train.max_steps_per_run``), 2 config error, 3 non-finite
loss/gradient under ``train.nonfinite='stop'``, 75 stopped by SIGTERM or ``train.deadline_minutes``
after saving a checkpoint (re-run the same command to resume).

Multi-host: every process runs the same command. ``--coordinator HOST:PORT --num-processes N
--process-id I`` start ``jax.distributed`` explicitly; ``--distributed`` lets JAX detect the
cluster (TPU pod slices, SLURM, Open MPI). See docs/multihost.md.
"""
from __future__ import annotations

import json
import os
import sys

from contrastive_jax.commands import EXIT_CONFIG_ERROR, load_config_or_none

HELP = "train (or resume) a run described by a config file"
EXIT_NONFINITE = 3


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="config file, optionally PATH:ARG")
    parser.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, summary")
    parser.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (explicit multi-process launch)")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--distributed", action="store_true",
                        help="initialize jax.distributed from the cluster environment (TPU, SLURM, MPI)")


def run(args, overrides) -> int:
    config = load_config_or_none(args.config, overrides)
    if config is None:
        return EXIT_CONFIG_ERROR
    from contrastive_jax.parallel.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
    import jax

    from contrastive_jax.train.loop import EXIT_PREEMPTED, NonFiniteLossError, train

    try:
        summary = train(config, args.workdir)
    except NonFiniteLossError as e:
        print(f"contrastive-jax: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except ValueError as e:
        if str(e).startswith("invalid config") or "config." in str(e):
            print(f"contrastive-jax: {e}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        raise
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2))
        if summary.get("complete"):
            print(f"summary written to {os.path.join(os.path.abspath(args.workdir), 'summary.json')}", file=sys.stderr)
    return EXIT_PREEMPTED if summary.get("preempted") else 0
