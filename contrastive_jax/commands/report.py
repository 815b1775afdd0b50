"""``contrastive-jax report WORKDIR [--recompute] [--step N]``: the PNG report of a run.

Draws into ``WORKDIR/report/`` the training curves (from ``metrics.jsonl``) and the pictures of
the final evaluation (from ``WORKDIR/eval_details.npz``, written at the end of training). With
``--recompute``, or when that file is missing, the checkpoint is loaded and evaluated again.
"""
from __future__ import annotations

import os
import sys

HELP = "write the PNG report (curves, similarity heatmap, retrieval examples, per-class bars) of a run"


def add_arguments(parser) -> None:
    parser.add_argument("workdir", help="a run directory (config.json, metrics.jsonl, checkpoints/)")
    parser.add_argument("--recompute", action="store_true", help="re-evaluate the checkpoint for the pictures")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step with --recompute (default: latest)")


def run(args, overrides) -> int:
    from contrastive_jax.evaluate.report import DETAILS_FILE, write_report

    workdir = os.path.abspath(os.path.expanduser(args.workdir))
    if not os.path.isdir(workdir):
        print(f"contrastive-jax report: no such run directory: {workdir}", file=sys.stderr)
        return 2
    if overrides:
        print(f"contrastive-jax report: takes no --config overrides (got {overrides})", file=sys.stderr)
        return 2
    if args.recompute or not os.path.isfile(os.path.join(workdir, DETAILS_FILE)):
        from contrastive_jax.commands.eval import build_runner_from_checkpoint

        try:
            runner, params, _ = build_runner_from_checkpoint(workdir, args.step, overrides=())
        except (FileNotFoundError, ImportError) as e:
            print(f"contrastive-jax report: cannot evaluate the run for the pictures ({e}); drawing the curves only",
                  file=sys.stderr)
            runner = params = None
        written = write_report(workdir, runner, params)
    else:
        written = write_report(workdir)
    for path in written:
        print(path)
    return 0
