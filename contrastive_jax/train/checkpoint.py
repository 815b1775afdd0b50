"""Checkpointing with orbax: the TrainState and the data-iterator position, saved together.

Each checkpoint is a step directory holding two items: ``state`` (the sharded TrainState: params,
optimizer state, EMA, RNG and step, written by every process for its own shards) and ``data`` (the
grain iterator state, JSON). Orbax writes asynchronously to a temporary directory and renames it
when complete, so a run killed mid-save leaves the previous checkpoint as the latest one.

A checkpoint that fails to restore (a truncated or corrupt file) is moved aside to
``<dir>_corrupt/`` with a warning and the previous one is tried, so a damaged latest checkpoint
costs the steps since the one before it, not the run.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from contrastive_jax.parallel.distributed import barrier

log = logging.getLogger("contrastive_jax")


class Checkpointer:
    """Saves every ``every_steps`` steps (and when forced), keeps the newest ``keep``.

    Args:
      directory: where step directories go (created if missing).
      async_save: write in background threads while training continues.
    """

    def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.every_steps = max(int(every_steps), 1)
        self._keep = max(int(keep), 1)
        self._async = bool(async_save)
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._keep,
            save_interval_steps=self.every_steps,
            create=True,
            # A previous process killed mid-save leaves a tmp dir; it is never a restore candidate.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=self._async,
        )
        return ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        """``step`` is on the save interval (orbax's own rule would also save the first step)."""
        return int(step) % self.every_steps == 0

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Saves if ``step`` is on the interval (or ``force``); returns whether it saved.

        The device-to-host copy completes before this returns (the write itself continues in the
        background), so the caller may donate ``state``'s buffers to the next step.
        """
        if int(step) in self.manager.all_steps():
            return False  # already saved (e.g. the interval save of the final step)
        return self.manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any, shardings: Any) -> tuple[Any, dict]:
        """Restores ``(state, data_state)`` at ``step`` directly into ``shardings``."""
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings
        )
        restored = self.manager.restore(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()),
        )
        return restored["state"], restored["data"]

    def restore_latest_good(self, abstract_state: Any, shardings: Any, *, quarantine: bool = True
                            ) -> tuple[int, Any, dict] | None:
        """``(step, state, data_state)`` of the newest checkpoint that restores, or None.

        Checkpoints that fail (truncated/corrupt files, missing items, non-finite params) are
        skipped with a warning, newest first; with ``quarantine`` (the trainer) they are also moved
        to ``<directory>_corrupt/<step>-<unix time>`` so the run can save that step again.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, data_state = self.restore(step, abstract_state, shardings)
                jax.block_until_ready(state)
                _check_finite_params(state)
                return step, state, data_state
            except Exception as e:  # noqa: BLE001 - any failure to read means "not a good checkpoint"
                message = f"checkpoint at step {step} in {self.directory} is unreadable ({type(e).__name__}: {str(e)[:300]}); trying the previous one"
                log.warning(message)
                if jax.process_index() == 0:
                    print(f"WARNING: {message}", flush=True)
                if quarantine:
                    self._quarantine(step)
        return None

    def _quarantine(self, step: int) -> None:
        # Moved out of the manager's directory: a later save of the same step must not collide
        # with it, and it stays on disk for inspection.
        barrier(f"quarantine-{step}-start")
        if jax.process_index() == 0:
            aside = self.directory.rstrip("/") + "_corrupt"
            os.makedirs(aside, exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), os.path.join(aside, f"{step}-{int(time.time())}"))
        barrier(f"quarantine-{step}-done")
        self.manager.close()
        self.manager = self._open()

    def wait(self) -> None:
        """Blocks until background writes are finished (call before exiting)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _check_finite_params(state: Any) -> None:
    leaves = [x for x in jax.tree.leaves(getattr(state, "params", state)) if np.issubdtype(np.dtype(x.dtype), np.floating)]
    if leaves and not bool(jax.jit(lambda xs: jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(x).all() for x in xs])))(leaves)):
        raise ValueError("restored parameters contain NaN/inf")


def step_dirs(directory: str) -> list[int]:
    """Steps of the complete checkpoints in ``directory`` (step dirs holding a ``state`` item),
    newest first; [] when there is none or no such directory."""
    if not os.path.isdir(directory):
        return []
    return sorted((int(d) for d in os.listdir(directory)
                   if d.isdigit() and os.path.isdir(os.path.join(directory, d, "state"))), reverse=True)


def find_step_dir(path: str) -> str:
    """The newest complete step directory under ``path`` (a workdir, a checkpoints dir or a step
    dir itself); raises FileNotFoundError naming what was searched."""
    path = os.path.abspath(os.path.expanduser(path))
    for candidate in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(os.path.join(candidate, "state")):
            return candidate
        steps = step_dirs(candidate)
        if steps:
            return os.path.join(candidate, str(steps[0]))
    raise FileNotFoundError(f"no checkpoint found at {path} (looked for a step dir with a 'state' item, "
                            "a checkpoints/ dir or a workdir)")


def load_params_from(spec: str, abstract_params: Any, shardings: Any, *, into: str = "") -> tuple[Any, list[str]]:
    """Parameters for ``checkpoint.init_from = 'PATH[:SUBTREE[,SUBTREE...]]'``.

    Args:
      spec: PATH (see :func:`find_step_dir`), optionally ``:`` and comma-separated '/'-joined
        parameter path prefixes to take (e.g. ``image,image_proj``); none = every parameter.
      abstract_params: the new model's parameter shapes (the tree to fill).
      shardings: their shardings.
      into: '/'-joined prefix in the new model under which the checkpoint's parameters go
        (``'teacher'``: source ``image/...`` fills ``teacher/image/...``); '' = same paths.

    Returns:
      ``(params_or_None_tree, taken_paths)``: a tree shaped like ``abstract_params`` with loaded
      arrays where taken and None elsewhere, and the list of parameter paths taken.

    Raises:
      ValueError: a requested parameter is missing in the checkpoint or has another shape (all
        such paths listed).
    """
    from contrastive_jax.parallel.sharding import path_str

    path, subtrees = spec, ""
    if ":" in spec and not os.path.exists(os.path.expanduser(spec)):
        path, _, subtrees = spec.rpartition(":")
    prefixes = [s.strip().strip("/") for s in subtrees.split(",") if s.strip()]
    step_dir = find_step_dir(path)
    restored = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
    source = restored["params"] if isinstance(restored, dict) and "params" in restored else restored
    flat_src = {path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(source)}

    def wanted(name: str) -> bool:
        return not prefixes or any(name == p or name.startswith(p + "/") for p in prefixes)

    problems, taken = [], []

    into_prefix = into.strip("/")

    def one(p, leaf, sharding):
        name = path_str(p)
        if into_prefix:
            if not name.startswith(into_prefix + "/"):
                return None
            name = name[len(into_prefix) + 1:]
        if not wanted(name):
            return None
        if name not in flat_src:
            problems.append(f"{name}: missing in {step_dir}")
            return None
        value = np.asarray(flat_src[name])
        if tuple(value.shape) != tuple(leaf.shape):
            problems.append(f"{name}: checkpoint shape {value.shape} != model shape {tuple(leaf.shape)}")
            return None
        taken.append(name)
        return jax.device_put(value.astype(leaf.dtype), sharding)

    loaded = jax.tree_util.tree_map_with_path(one, abstract_params, shardings)
    if prefixes and not taken and not problems:
        problems.append(f"no parameter matches {prefixes}; the model has e.g. {sorted(flat_src)[:5]}")
    if problems:
        raise ValueError(f"checkpoint.init_from={spec!r}:\n  " + "\n  ".join(problems))
    return loaded, taken
