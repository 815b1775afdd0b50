"""Metric sinks: JSON lines and TensorBoard (tensorboardX: no TensorFlow), written by process 0.

The workdir may be local or on object storage (``s3://``, ``gs://``, through
:mod:`contrastive_jax.storage`). Locally each line is appended as it is written. An object store
has no append, so there lines are buffered and the object rewritten at most every
``flush_every_s`` seconds, at :meth:`MetricWriter.flush` (the trainer calls it after each
checkpoint save) and at :meth:`MetricWriter.close`; a killed run loses at most the lines since the
last flush, which describe steps after its last checkpoint.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any

import jax

from contrastive_jax import storage


class MetricWriter:
    """Appends ``{"step": s, **metrics}`` to ``WORKDIR/metrics.jsonl`` and scalars to
    ``WORKDIR/tensorboard``. Other processes write nothing, so each file has one writer.

    Args:
      workdir: local path or URL of the run directory.
      tensorboard: also write TensorBoard event files (tensorboardX handles ``s3://`` itself).
      flush_every_s: remote workdirs only: the longest time lines stay buffered (seconds).
    """

    def __init__(self, workdir: str, *, tensorboard: bool = True, flush_every_s: float = 30.0):
        self.enabled = jax.process_index() == 0
        self.path = storage.join(workdir, "metrics.jsonl")
        self._remote = storage.is_remote(self.path)
        self._buffer: list[str] = []
        self._flush_every_s = float(flush_every_s)
        self._last_flush = time.time()
        self._tb = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(storage.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Records the float-convertible entries of ``metrics`` (NaN/inf as strings) at ``step``."""
        if not self.enabled:
            return
        clean = {}
        for k, v in metrics.items():
            try:
                f = float(v)
            except (TypeError, ValueError):
                continue
            clean[k] = f if math.isfinite(f) else str(f)
            if self._tb is not None and math.isfinite(f):
                self._tb.add_scalar(k, f, step)
        line = json.dumps({"step": int(step), **clean}) + "\n"
        if self._remote:
            self._buffer.append(line)
            if time.time() - self._last_flush >= self._flush_every_s:
                self.flush()
        else:
            storage.append_text(self.path, line)
        if self._tb is not None:
            self._tb.flush()

    def flush(self) -> None:
        """Writes buffered lines (remote workdirs; local lines are never buffered)."""
        if self._buffer:
            storage.append_text(self.path, "".join(self._buffer))
            self._buffer.clear()
        self._last_flush = time.time()

    def close(self) -> None:
        if self.enabled:
            self.flush()
        if self._tb is not None:
            self._tb.close()
