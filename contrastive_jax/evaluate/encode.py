"""Encoding whole arrays through a fixed-batch-size encoder."""
from __future__ import annotations

from typing import Callable

import numpy as np


def encode_in_batches(encode_fn: Callable, array: np.ndarray, batch_size: int) -> np.ndarray:
    """Runs ``encode_fn`` over ``array`` in batches of exactly ``batch_size`` rows.

    The last batch is padded (by repeating its last row, so padded inputs are valid examples —
    e.g. texts still contain an EOS) so a jitted, sharded ``encode_fn`` sees a single shape and
    compiles once; the padded rows' outputs are dropped.

    Args:
      encode_fn: ``[batch_size, ...] -> [batch_size, D]``. Its output must be readable with
        ``np.asarray`` (on multi-host runs: replicated or gathered by the caller).
      array: ``[N, ...]`` inputs (numpy or anything ``np.asarray`` accepts).
      batch_size: rows per call.

    Returns:
      ``[N, D]`` numpy array (the dtype ``encode_fn`` returns).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    array = np.asarray(array)
    n = array.shape[0]
    outputs, valid_rows = [], []
    # Dispatch every batch before reading any result back, so device work overlaps host padding.
    for start in range(0, max(n, 1), batch_size):
        batch = array[start : start + batch_size]
        valid = batch.shape[0]
        if valid < batch_size:
            filler = batch[-1:] if valid else np.zeros((1,) + array.shape[1:], array.dtype)
            batch = np.concatenate([batch, np.repeat(filler, batch_size - valid, axis=0)], axis=0)
        outputs.append(encode_fn(batch))
        valid_rows.append(valid)
    result = []
    for out, valid in zip(outputs, valid_rows):
        out = np.asarray(out)
        if out.shape[0] != batch_size:
            raise ValueError(f"encode_fn returned {out.shape[0]} rows for a batch of {batch_size}")
        result.append(out[:valid])
    return np.concatenate(result, axis=0)
