"""Checkpointing with orbax: the TrainState and the data-iterator position, saved together.

Each checkpoint is a step directory holding two items: ``state`` (the sharded TrainState, written
by every process for its own shards) and ``data`` (the grain iterator state, JSON). Orbax writes
to a temporary directory and renames it when complete, so a run killed mid-save leaves the previous
checkpoint as the latest one.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves every ``every_steps`` steps (and when forced), keeps the newest ``keep``.

    Args:
      directory: where step directories go (created if missing); an absolute path.
    """

    def __init__(self, directory: str, *, every_steps: int, keep: int):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max(int(keep), 1),
            save_interval_steps=max(int(every_steps), 1),
            create=True,
            # A previous process killed mid-save leaves a tmp dir; it is never a restore candidate.
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Saves if ``step`` is on the interval (or ``force``); returns whether it saved.

        The device-to-host copy completes before this returns (the write itself continues in the
        background), so the caller may donate ``state``'s buffers to the next step.
        """
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

    def wait(self) -> None:
        """Blocks until background writes are finished (call before exiting)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
