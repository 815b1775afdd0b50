"""Metric sinks: JSON lines and TensorBoard (tensorboardX: no TensorFlow), written by process 0."""
from __future__ import annotations

import json
import math
import os
from typing import Any

import jax


class MetricWriter:
    """Appends ``{"step": s, **metrics}`` to ``WORKDIR/metrics.jsonl`` and scalars to
    ``WORKDIR/tensorboard``. Other processes write nothing, so each file has one writer."""

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
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
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": int(step), **clean}) + "\n")
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
