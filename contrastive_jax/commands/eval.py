"""``contrastive-jax eval --checkpoint WORKDIR[/checkpoints/STEP] [--config FILE[:ARG]] [--config.a.b=v ...]``.

Loads a run's model and params (``contrastive_jax.train.restore.load_run_and_step``), runs every
evaluator of ``config.eval``, writes ``eval.json`` (default: into the run directory; ``--output``
elsewhere, e.g. for a read-only run directory) atomically and prints the same JSON on stdout (the
only thing on stdout; logs go to stderr). ``step`` in it is the checkpoint actually evaluated.
The run's own config is used; ``--config FILE`` replaces its ``eval`` group (and ``data`` fields
other than the ones the model was trained with are left alone), and ``--config.eval.x=v``
overrides apply last. An output that cannot be written fails in one line before evaluating.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
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
    return build_runner_and_step(checkpoint, step, overrides=overrides, eval_config_spec=eval_config_spec)[:3]


def build_runner_and_step(checkpoint: str, step: int | None, *, overrides, eval_config_spec: str | None = None):
    """:func:`build_runner_from_checkpoint` plus the checkpoint step actually restored."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from contrastive_jax.evaluate import EvalRunner
    from contrastive_jax.parallel.mesh import batch_axes_of, make_mesh
    from contrastive_jax.train.config import apply_override, load_config

    workdir, step = split_checkpoint(checkpoint, step)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"no such run directory: {workdir}")
    from contrastive_jax.train.restore import load_run_and_step

    config, model, params, tokenizer, used = load_run_and_step(workdir, step)
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
    return runner, params, config, used


def check_writable(path: str, what: str) -> str | None:
    """None when a file can be created next to ``path`` (by trying: permission bits say nothing
    for root or on a read-only mount), else the one-line reason naming ``what`` to pass instead."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        return f"{path} is a directory; {what}"
    try:
        fd, probe = tempfile.mkstemp(prefix=".eval-write-test-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return f"cannot write {path} ({e.strerror or e}); {what}"
    return None


def write_json_atomic(path: str, payload: dict) -> None:
    """Writes ``path`` whole or not at all (:func:`contrastive_jax.storage.write_text`: a temporary
    file, then ``os.replace``; a reader never sees half a file, an earlier eval.json survives)."""
    from contrastive_jax import storage

    storage.write_text(path, json.dumps(payload, indent=2, default=_to_json))


def _to_json(value):
    """numpy / jax scalars and arrays in results -> Python numbers and lists; anything else as its
    text (a result is never lost to a value JSON cannot hold)."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _fail(message: str) -> int:
    print(f"contrastive-jax eval: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def run(args, overrides) -> int:
    from contrastive_jax.commands.data import stdout_to_stderr
    from contrastive_jax.train.config import ConfigError

    t0 = time.time()
    workdir, step = split_checkpoint(args.checkpoint, args.step)
    path = os.path.abspath(os.path.expanduser(args.output)) if args.output else os.path.join(workdir, "eval.json")
    # Before anything is evaluated: a result that cannot be saved must not cost an evaluation.
    problem = check_writable(path, "pass --output PATH to write the results elsewhere")
    if problem is None and args.report:
        problem = check_writable(os.path.join(workdir, "report", "x.png") if os.path.isdir(
            os.path.join(workdir, "report")) else os.path.join(workdir, "report"),
            "--report writes into RUN/report/; leave out --report")
    if problem and os.path.isdir(workdir):
        return _fail(problem)
    try:
        with stdout_to_stderr():  # TFDS / dataset generation lines: stdout carries the JSON only
            runner, params, config, used = build_runner_and_step(
                args.checkpoint, args.step, overrides=overrides, eval_config_spec=args.config)
            results = runner(params)
    except ConfigError as e:
        print(f"contrastive-jax: config error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        return _fail(e)
    out = {"eval": results, "eval_split": config.data.eval_split, "checkpoint": workdir, "step": used,
           "evaluators": [s.name for s in runner.specs], "wall_time_s": time.time() - t0}
    import jax

    if jax.process_index() != 0:
        return 0
    try:
        write_json_atomic(path, out)
    except OSError as e:
        # The results are printed all the same: an evaluation is never lost to a failed write.
        print(json.dumps(out, indent=2, default=_to_json), flush=True)
        return _fail(f"could not write {path} ({e.strerror or e}); the results are on stdout")
    print(json.dumps(dict(out, output=path), indent=2, default=_to_json), flush=True)
    print(f"written to {path}", file=sys.stderr)
    if args.report:
        from contrastive_jax.evaluate.report import write_report

        with stdout_to_stderr():
            write_report(workdir, runner, params)
    return 0
