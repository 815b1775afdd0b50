"""``contrastive-jax train --config FILE[:ARG] --workdir DIR [--config.a.b=v ...]``.

Exit codes: 0 done (or stopped by ``train.max_steps_per_run``), 2 config error or an unusable
workdir (read-only, in use by a live trainer, holding another model's run, no readable checkpoint),
3 non-finite loss/gradient under ``train.nonfinite='stop'`` (or more than
``train.max_nonfinite_fraction`` of the steps skipped under 'skip'), 74 a checkpoint could not be written (disk full;
the previous checkpoint is intact), 75 stopped by SIGTERM or ``train.deadline_minutes``
or Ctrl-C after saving a checkpoint (re-run the same command to resume), 130 Ctrl-C before
training started.

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
EXIT_IO_ERROR = 74  # EX_IOERR: a checkpoint could not be written (disk full, ...); the previous one is intact


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="config file, optionally PATH:ARG")
    parser.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, summary")
    parser.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (explicit multi-process launch)")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--distributed", action="store_true",
                        help="initialize jax.distributed from the cluster environment (TPU, SLURM, MPI)")


EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C outside the training loop (nothing to save yet)


def run(args, overrides) -> int:
    try:
        return _run(args, overrides)
    except KeyboardInterrupt:
        # The loop turns Ctrl-C into a checkpoint and exit 75; this is Ctrl-C before the loop
        # started (imports, data generation, compilation) or after it ended (final evaluation).
        print("contrastive-jax: interrupted (Ctrl-C); every checkpoint written so far is intact",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def _run(args, overrides) -> int:
    config = load_config_or_none(args.config, overrides)
    if config is None:
        return EXIT_CONFIG_ERROR
    from contrastive_jax.parallel.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
    import jax

    from contrastive_jax.train.checkpoint import CheckpointSaveError
    from contrastive_jax.train.loop import EXIT_PREEMPTED, NonFiniteLossError, train
    from contrastive_jax.train.workdir import WorkdirError

    try:
        summary = train(config, args.workdir)
    except WorkdirError as e:  # a workdir in use, read-only, or holding another run: one line
        print(f"contrastive-jax: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR
    except NonFiniteLossError as e:
        if getattr(e, "summary", None) is not None and jax.process_index() == 0:
            print(json.dumps(e.summary, indent=2))  # a finished run that skipped too many steps
        print(f"contrastive-jax: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except CheckpointSaveError as e:  # helper E (issue 17.10): a full disk etc. is one line, not a traceback
        print(f"contrastive-jax: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # orbax may still hold threads writing the failed checkpoint; exiting now, without the
        # interpreter's teardown, avoids their noise. Everything complete is already on disk.
        os._exit(EXIT_IO_ERROR)
    except ValueError as e:
        if str(e).startswith("invalid config") or "config." in str(e):
            print(f"contrastive-jax: {e}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        raise
    if jax.process_index() == 0:
        print(json.dumps(summary, indent=2))
        if summary.get("complete"):
            from contrastive_jax import storage  # helper E: s3:// workdirs

            print(f"summary written to {storage.join(storage.abspath(args.workdir), 'summary.json')}", file=sys.stderr)
    return EXIT_PREEMPTED if summary.get("preempted") else 0
