"""grain input pipelines: the per-host training stream and whole-split evaluation arrays.

Training stream (one per host)::

    source --shuffle(seed), reshuffled every epoch--> repeat forever --> decode + tokenize
           --> blocks of b = G / P consecutive elements --> block p, p + P, p + 2P, ... (this host)
           --> normalize --> iterator (optionally in worker processes)

At step ``s`` the GLOBAL batch is elements ``[s*G, (s+1)*G)`` of the shuffled stream and host
``p`` holds rows ``[p*b, (p+1)*b)`` of it, so the global batch does not depend on the number of
hosts, and each host decodes only its own rows (random access into the shuffled MapDataset).
"""
from __future__ import annotations

from typing import Any, Sequence

import grain
from absl import flags
import jax
import numpy as np

from contrastive_jax.data.registry import build_dataset, get_dataset
from contrastive_jax.data.tokenizer import Tokenizer

# Threads reading (decoding) batches ahead of the consumer, and how many batches they may hold.
# Kept small: each prefetched item is a whole host batch.
_READ_THREADS = 4
_PREFETCH_BATCHES = 4


def normalize_images(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 ``[..., H, W, 3]`` in 0..255 -> float32 ``(x / 255 - mean) / std`` per channel."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return (np.asarray(images, np.float32) / np.float32(255.0) - mean) / std


def _ensure_absl_flags_parsed() -> None:
    # grain's worker processes read an absl flag, which raises unless flags were parsed. Outside
    # an absl app (notebooks, pytest, argparse CLIs) nothing parses them, so accept the defaults.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _caption_str(caption: Any) -> str:
    return caption.decode("utf-8") if isinstance(caption, (bytes, np.bytes_)) else str(caption)


class _ToExample(grain.transforms.Map):
    """Source record -> ``image`` uint8 [H, W, 3], ``text`` int32 [L], int32 scalar labels."""

    def __init__(self, tokenizer: Tokenizer, label_keys: Sequence[str]):
        self._tokenizer = tokenizer
        self._label_keys = tuple(label_keys)

    def map(self, record: dict) -> dict:
        out = {
            "image": np.asarray(record["image"], np.uint8),
            "text": self._tokenizer.encode([_caption_str(record["caption"])])[0],
        }
        for key in self._label_keys:
            out[key] = np.int32(record[key])
        return out


class _NormalizeImages(grain.transforms.Map):
    """Batch-level (vectorized) image normalization; see :func:`normalize_images`."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self._mean = tuple(float(m) for m in mean)
        self._std = tuple(float(s) for s in std)

    def map(self, batch: dict) -> dict:
        batch = dict(batch)
        batch["image"] = normalize_images(batch["image"], self._mean, self._std)
        return batch


def make_train_iterator(
    data_config,
    *,
    tokenizer: Tokenizer,
    global_batch_size: int,
    seed: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """Infinite, shuffled iterator over ``data_config.train_split`` for THIS host.

    Args:
      data_config: ``config.data`` (``name``, ``train_split``, ``worker_count``, ``mean``, ``std``
        and the dataset's own fields).
      tokenizer: turns captions into ``text``; its ``max_len`` is the text length.
      global_batch_size: G, examples per step across all hosts.
      seed: shuffle seed (None: ``data_config.shuffle_seed``). The order is reshuffled every
        epoch, deterministically from this seed.
      process_index, process_count: this host and the number of hosts (default: from jax).

    Returns:
      A grain ``DatasetIterator`` yielding dicts for b = G / process_count examples:
      ``image`` float32 [b, H, W, 3] normalized with ``data_config.mean/std``, ``text`` int32
      [b, max_len], and int32 [b] labels (``kind``, ``color``, ``size``, ``position`` for shapes).
      ``get_state()`` returns a JSON-serializable dict; ``set_state`` resumes exactly there.
    """
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count} (each host loads global_batch_size / process_count)"
        )
    host_batch = global_batch_size // process_count
    seed = data_config.shuffle_seed if seed is None else seed

    entry = get_dataset(data_config.name)
    source = build_dataset(data_config)[data_config.train_split]
    if len(source) < global_batch_size:
        raise ValueError(f"split {data_config.train_split!r} has {len(source)} examples, fewer "
                         f"than one global batch ({global_batch_size})")

    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    ds = ds.map(_ToExample(tokenizer, entry.label_keys))
    # Blocks of host_batch consecutive stream elements; block k belongs to host k mod P, so
    # host p's i-th batch is rows [p*b, (p+1)*b) of global batch i. MapDataset batching is lazy:
    # this host never reads other hosts' blocks.
    ds = ds.batch(host_batch, drop_remainder=True)
    ds = ds[process_index::process_count]
    ds = ds.map(_NormalizeImages(data_config.mean, data_config.std))
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)
    )
    if data_config.worker_count > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=int(data_config.worker_count))
        )
    return iter(it_ds)


def load_eval_arrays(
    data_config, split: str, *, tokenizer: Tokenizer, max_examples: int = -1
) -> dict[str, Any]:
    """A whole split (or its first ``max_examples``) as arrays, in the split's stored order.

    Returns:
      ``image`` float32 [N, H, W, 3] (normalized like training), ``text`` int32 [N, max_len],
      int32 [N] labels, and ``caption``: list of N str.
    """
    entry = get_dataset(data_config.name)
    source = build_dataset(data_config)[split]
    n = len(source) if max_examples is None or max_examples < 0 else min(max_examples, len(source))
    to_example = _ToExample(tokenizer, entry.label_keys)
    images, texts, captions = [], [], []
    labels = {key: [] for key in entry.label_keys}
    for i in range(n):
        record = source[i]
        ex = to_example.map(record)
        images.append(ex["image"])
        texts.append(ex["text"])
        captions.append(_caption_str(record["caption"]))
        for key in entry.label_keys:
            labels[key].append(ex[key])
    if n == 0:
        raise ValueError(f"split {split!r} of dataset {data_config.name!r} is empty")
    out: dict[str, Any] = {
        "image": normalize_images(np.stack(images), data_config.mean, data_config.std),
        "text": np.stack(texts).astype(np.int32),
        "caption": captions,
    }
    for key, values in labels.items():
        out[key] = np.asarray(values, np.int32)
    return out
