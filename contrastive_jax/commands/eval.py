"""``contrastive-jax eval --checkpoint WORKDIR[/checkpoints/STEP] [--config FILE[:ARG]] [--config.a.b=v ...]``.

Loads a run's model and params (``contrastive_jax.train.restore.load_run``), runs every evaluator
of ``config.eval`` and writes ``eval.json`` (default: into the run directory). The run's own
config is used; ``--config FILE`` replaces its ``eval`` group (and ``data`` fields other than the
ones the model was trained with are left alone), and ``--config.eval.x=v`` overrides apply last.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

HELP = "evaluate a checkpoint with the evaluators of config.eval; writes eval.json"


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a run directory (latest checkpoint) or RUN/checkpoints/STEP")
    parser.add_argument("--config", default=None, help="config file whose `eval` group replaces the run's")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--output", default=None, help="where to write eval.json (default: RUN/eval.json)")
    parser.add_argument("--report", action="store_true", help="also write the PNG report into RUN/report/")


def split_checkpoint(path: str, step: int | None) -> tuple[str, int | None]:
    """``RUN`` or ``RUN/checkpoints/STEP`` -> ``(RUN, step)``."""
    path = os.path.abspath(os.path.expanduser(path.rstrip("/")))
    m = re.fullmatch(r"(.*)/checkpoints/(\d+)", path)
    if m:
        return m.group(1), int(m.group(2)) if step is None else step
    return path, step


def build_runner_from_checkpoint(checkpoint: str, step: int | None, *, overrides, eval_config_spec: str | None = None):
    """``(EvalRunner, params placed on the mesh, config)`` for a finished or running run."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from contrastive_jax.evaluate import EvalRunner
    from contrastive_jax.parallel.mesh import batch_axes_of, make_mesh
    from contrastive_jax.train.config import apply_override, load_config
    from contrastive_jax.train.restore import load_run  # the trainer's loader (train/restore.py)

    workdir, step = split_checkpoint(checkpoint, step)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"no such run directory: {workdir}")
    config, model, params, tokenizer = load_run(workdir, step)
    if eval_config_spec:
        other = load_config(eval_config_spec)
        with config.unlocked():
            config.eval = other.eval
    for item in overrides:
        apply_override(config, item, source="command line")
    mesh = make_mesh(config.mesh)
    axes = batch_axes_of(mesh, config.sharding.batch_axes)
    # Evaluation needs no optimizer state: replicated params fit wherever the model was trained.
    replicated = NamedSharding(mesh, P())
    shardings = jax.tree.map(lambda _: replicated, params)
    params = jax.device_put(params, shardings)
    runner = EvalRunner(config, model, mesh, axes, shardings, tokenizer)
    return runner, params, config


def run(args, overrides) -> int:
    from contrastive_jax.train.config import ConfigError

    t0 = time.time()
    try:
        runner, params, config = build_runner_from_checkpoint(
            args.checkpoint, args.step, overrides=overrides, eval_config_spec=args.config)
    except ConfigError as e:
        print(f"contrastive-jax: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"contrastive-jax eval: {e}", file=sys.stderr)
        return 2
    results = runner(params)
    workdir, step = split_checkpoint(args.checkpoint, args.step)
    out = {"eval": results, "eval_split": config.data.eval_split, "checkpoint": workdir, "step": step,
           "evaluators": [s.name for s in runner.specs], "wall_time_s": time.time() - t0}
    import jax

    if jax.process_index() == 0:
        path = args.output or os.path.join(workdir, "eval.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2)
        print(json.dumps(out, indent=2))
        print(f"written to {path}", file=sys.stderr)
    if args.report:
        from contrastive_jax.evaluate.report import write_report

        write_report(workdir, runner, params)
    return 0
