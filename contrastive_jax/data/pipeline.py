"""grain input pipelines: the per-host training stream and whole-split evaluation arrays.

Training stream (one per host)::

    source --shuffle(seed), reshuffled every epoch--> repeat forever
           --> process (decode, augment V views, pick + tokenize a caption, mask tokens);
               a bad record is replaced by the next good one of the stream and counted
           --> blocks of b = G / P consecutive elements --> block p, p + P, p + 2P, ... (this host)
           --> normalize --> iterator (optionally in worker processes) --> counters

At step ``s`` the GLOBAL batch is elements ``[s*G, (s+1)*G)`` of the shuffled stream and host
``p`` holds rows ``[p*b, (p+1)*b)`` of it, so the global batch does not depend on the number of
hosts, and each host decodes only its own rows (random access into the shuffled MapDataset).
Every random choice of element ``i`` (crop, flip, jitter, caption, masked tokens) is drawn from a
generator seeded with ``(seed, i)``, so the stream is a pure function of the seed and resumes
exactly from a saved iterator state.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import grain
from absl import flags
import jax
import numpy as np

from contrastive_jax.data.config import complete
from contrastive_jax.data.registry import DatasetEntry, build_dataset, resolve_dataset
from contrastive_jax.data.tokenizer import Tokenizer
from contrastive_jax.data.transforms import BadImageError, ImageTransform, decode_image, normalize_images

log = logging.getLogger("contrastive_jax.data")

# Why a record was skipped; the code travels through the batch (worker processes cannot share
# counters with the main process), 0 = the record was fine.
SKIP_REASONS = ("empty_image", "undecodable", "empty_caption", "bad_record")
_REASON_CODE = {r: i + 1 for i, r in enumerate(SKIP_REASONS)}
# A run of this many consecutive bad records means the data (not a few files) is broken.
_MAX_CONSECUTIVE_BAD = 100
# The bad fraction is judged only after this many records (or the whole split, if smaller).
_MIN_RECORDS_FOR_FRACTION = 100
_LOG_FIRST_BAD = 10
CAPTION_POLICIES = ("random", "first")


class DataQualityError(RuntimeError):
    """Too many records of a dataset failed to decode; the message names the dataset and reasons."""


class BadRecordError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _ensure_absl_flags_parsed() -> None:
    # grain's worker processes read an absl flag, which raises unless flags were parsed. Outside
    # an absl app (notebooks, pytest, argparse CLIs) nothing parses them, so accept the defaults.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _text(value: Any) -> str:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def record_captions(record: dict, text_key: str) -> list[str]:
    """The record's captions (one or several), as stripped non-empty strings; may be empty."""
    value = record[text_key]
    if isinstance(value, (str, bytes, np.bytes_)) or (isinstance(value, np.ndarray) and value.ndim == 0):
        values = [value]
    else:
        values = list(value)
    return [t for t in (_text(v).strip() for v in values) if t]


class ExampleProcessor:
    """One source record -> one training/eval example (numpy), or :class:`BadRecordError`.

    Output: ``image`` uint8 [S, S, 3] (view 0), ``image_views`` uint8 [V, S, S, 3] when V >= 2,
    ``image_local_views`` uint8 [N, s, s, 3] when training with ``local_views = N >= 1``
    (multi-crop, SwAV; ``s = local_view_size``), ``text`` int32 [max_len] (datasets with text),
    int32 scalar labels, extra features unchanged. Every view draws from its own generator
    seeded ``(seed, index, 1 + v)`` -- global view ``v`` in ``0..V-1``, local crop ``n`` as
    ``v = V + n`` -- so adding local crops leaves the global views unchanged.

    Args:
      entry: the dataset's :class:`DatasetEntry` (field names, labels, extras).
      tokenizer: turns the chosen caption into ids.
      data_config: ``config.data`` (image_size, num_views, augment, caption_policy,
        text_mask_prob, shuffle_seed).
      train: augment, sample captions and mask tokens; False = the evaluation transform and the
        first caption.
      seed: base seed of every random choice (default ``data_config.shuffle_seed``).
    """

    def __init__(self, entry: DatasetEntry, tokenizer: Tokenizer, data_config, *, train: bool,
                 seed: int | None = None):
        self.entry = entry
        self.tokenizer = tokenizer
        self.train = bool(train)
        self.size = int(data_config.image_size)
        self.seed = int(data_config.shuffle_seed if seed is None else seed)
        self.num_views = int(data_config.num_views) if train else 1
        if self.num_views < 1:
            raise ValueError(f"config.data.num_views must be >= 1, got {data_config.num_views}")
        self.policy = str(data_config.caption_policy)
        if self.policy not in CAPTION_POLICIES:
            raise ValueError(f"config.data.caption_policy={self.policy!r}; known: {CAPTION_POLICIES}")
        self.mask_prob = float(data_config.text_mask_prob) if train else 0.0
        if not 0.0 <= self.mask_prob < 1.0:
            raise ValueError(f"config.data.text_mask_prob={data_config.text_mask_prob} must be in [0, 1)")
        self.transform = ImageTransform(self.size, data_config.augment if train else None)
        self.local_views, self.local_transform = 0, None
        if train:
            n, local = data_config.get("local_views", 0), data_config.get("local_view_size", 0)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"config.data.local_views={n!r} is invalid: must be an integer >= 0 (0 = no multi-crop)")
            if n and (isinstance(local, bool) or not isinstance(local, int) or not 0 < local <= self.size):
                raise ValueError(f"config.data.local_view_size={local!r} is invalid: must be an integer in "
                                 f"[1, image_size={self.size}] (pixels)")
            if n:
                self.local_views = n
                self.local_transform = ImageTransform(local, data_config.augment, local=True)

    def key_of(self, record: dict) -> str:
        if self.entry.key_field and self.entry.key_field in record:
            return _text(record[self.entry.key_field])
        return "?"

    def _image(self, data: Any, view: int, index: int) -> np.ndarray:
        if self.transform.passes_through(data):
            return data  # already the output (e.g. shapes' raw arrays): no PIL round trip, no RNG
        rng = np.random.default_rng([self.seed, index, 1 + view])
        try:
            img = decode_image(data, draft_size=self.size)
        except BadImageError as e:
            raise BadRecordError(e.reason, str(e)) from None
        return self.transform(img, rng)

    def _local(self, data: Any, rng: np.random.Generator) -> np.ndarray:
        try:
            img = decode_image(data, draft_size=self.size)
        except BadImageError as e:
            raise BadRecordError(e.reason, str(e)) from None
        return self.local_transform(img, rng)

    def __call__(self, record: dict, index: int) -> dict:
        e = self.entry
        try:
            image_data = record[e.image_key]
        except (KeyError, TypeError):
            raise BadRecordError("bad_record", f"record has no image field {e.image_key!r}") from None
        out: dict[str, Any] = {}
        if e.text_key is not None:
            captions = record_captions(record, e.text_key)
            if not captions:
                raise BadRecordError("empty_caption", "no non-empty caption")
            rng_text = np.random.default_rng([self.seed, index, 0])
            pick = int(rng_text.integers(len(captions))) if self.train and self.policy == "random" else 0
            ids = self.tokenizer.encode([captions[pick]])[0]
            if self.mask_prob > 0:
                special = {self.tokenizer.eos_id, self.tokenizer.pad_id}
                if self.tokenizer.bos_id is not None:
                    special.add(self.tokenizer.bos_id)
                content = ~np.isin(ids, list(special))
                ids = np.where(content & (rng_text.random(ids.shape) < self.mask_prob),
                               self.tokenizer.mask_id, ids).astype(np.int32)
            out["text"] = ids
        views = [self._image(image_data, v, index) for v in range(self.num_views)]
        out["image"] = views[0]
        if self.num_views >= 2:
            out["image_views"] = np.stack(views)
        if self.local_views:
            out["image_local_views"] = np.stack([self._local(image_data, np.random.default_rng(
                [self.seed, index, 1 + self.num_views + n])) for n in range(self.local_views)])
        for key in e.label_keys:
            out[key] = np.int32(record[key])
        for key in e.extra_features:
            if key not in record:
                raise BadRecordError("bad_record", f"record has no extra feature {key!r}")
            out[key] = np.asarray(record[key])
        return out


_EXAMPLE_ID = "__example_id__"


class _WithExampleId:
    """``(index, record)`` -> the record with its position in the training split attached: the
    batch's ``example_id``, a stable id per example across epochs and resumes (for objectives
    with per-example state such as iSogCLR). The index is taken modulo the split's size: grain
    hands the source's map the stream position, which keeps growing over the repeated epochs."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, index: int, record: Any) -> Any:
        if isinstance(record, dict):
            record = dict(record)
            record[_EXAMPLE_ID] = index % self.size
        return record


class _ProcessOrReplace(grain.MapDataset):
    """Element ``i`` = the processed record ``i``, or -- when that record is bad -- the next good
    record of the stream (``i+1``, ``i+2``, ...), with the bad record's reason attached once, at
    its own position, so each bad record in the stream is counted exactly once."""

    def __init__(self, parent: grain.MapDataset, processor: ExampleProcessor):
        super().__init__(parent)
        self._processor = processor

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return "ProcessOrReplace"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        reason, key, last_error = 0, "", ""
        for k in range(_MAX_CONSECUTIVE_BAD + 1):
            record = self._parent[(index + k) % len(self._parent)]
            try:
                ex = self._processor(record, index)
            except BadRecordError as e:
                last_error = str(e)
                if k == 0:
                    reason, key = _REASON_CODE[e.reason], self._processor.key_of(record)
                continue
            if _EXAMPLE_ID in record:
                ex["example_id"] = np.int32(record[_EXAMPLE_ID])
            ex["_skip_reason"] = np.int32(reason)
            ex["_skip_key"] = np.frombuffer(key.encode("utf-8")[:64].ljust(64, b"\0"), np.uint8)
            return ex
        raise DataQualityError(f"{_MAX_CONSECUTIVE_BAD + 1} consecutive records of the stream are "
                               f"bad from position {index} (last: {last_error})")


class _ReopenedSource:
    """A split's random-access source that worker processes reopen from the config instead of
    unpickling it: unpickling a TFDS builder in a fresh process can clash with the builder
    configs that process registered on import (seen with the default ``shapes`` setting).

    ``cache``: keep every record read, as parsed, in this process's memory (``config.data.
    cache_raw``, as big_vision's ``cache_raw``): from the second epoch on no record is read or
    parsed again. The records are the same objects each time; nothing downstream writes to them.
    """

    def __init__(self, data_config, split: str, source, *, cache: bool = False):
        self._config, self._split, self._source, self._len = data_config, split, source, len(source)
        self._cache = {} if cache else None

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        if self._source is None:
            self._source = build_dataset(self._config)[self._split]
        record = self._source[index]
        if self._cache is not None:
            self._cache[index] = record
        return record

    def __getstate__(self):
        return {**self.__dict__, "_source": None, "_cache": None if self._cache is None else {}}


class _NormalizeImages(grain.transforms.Map):
    """Batch-level (vectorized) image normalization; see :func:`normalize_images`."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self._mean = tuple(float(m) for m in mean)
        self._std = tuple(float(s) for s in std)

    def map(self, batch: dict) -> dict:
        batch = dict(batch)
        for key in ("image", "image_views", "image_local_views"):
            if key in batch:
                batch[key] = normalize_images(batch[key], self._mean, self._std)
        return batch


class TrainIterator:
    """The training iterator: grain's iterator plus skipped-record counters.

    ``next(it)`` -> the host batch; ``get_state()`` / ``set_state()`` -> JSON-serializable
    position AND counters (resume-exact); ``stats()`` -> counters for logging. Raises
    :class:`DataQualityError` when more than ``max_bad_fraction`` of the records seen were bad.
    """

    def __init__(self, inner, *, dataset: str, max_bad_fraction: float, split_size: int, shapes=None):
        self._inner = inner
        self._shapes = shapes
        self._dataset = dataset
        self._max_bad = float(max_bad_fraction)
        self._min_seen = min(_MIN_RECORDS_FOR_FRACTION, int(split_size))
        self._seen = 0
        self._skipped = {r: 0 for r in SKIP_REASONS}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = dict(next(self._inner))
        reasons = np.asarray(batch.pop("_skip_reason"))
        keys = np.asarray(batch.pop("_skip_key"))
        for row in np.flatnonzero(reasons):
            reason = SKIP_REASONS[int(reasons[row]) - 1]
            if sum(self._skipped.values()) < _LOG_FIRST_BAD:
                key = keys[row].tobytes().rstrip(b"\0").decode("utf-8", "replace")
                log.warning("dataset %s: skipped record %s (%s)", self._dataset, key, reason)
            self._skipped[reason] += 1
        self._seen += int(reasons.shape[0])
        total = sum(self._skipped.values())
        if self._seen >= self._min_seen and total > self._max_bad * self._seen:
            raise DataQualityError(
                f"dataset {self._dataset!r}: {total} of {self._seen} records read were bad "
                f"({total / self._seen:.1%} > config.data.max_bad_fraction={self._max_bad}); by "
                f"reason: {self._nonzero()}")
        return batch

    def _nonzero(self) -> dict:
        return {k: v for k, v in self._skipped.items() if v}

    def peek_shapes(self) -> dict | None:
        """``{key: (shape, dtype)}`` of this host's batches, from one example put through the
        pipeline's batching and normalization by random access: the iterator's position,
        counters and worker are untouched. None when unknown (a stream without random access,
        or an example that fails to load: the iterator itself reports that). The loop compiles
        the train step from it while the run is set up."""
        if self._shapes is None:
            return None
        try:
            shapes = self._shapes()
        except Exception:  # noqa: BLE001 — next() raises it with its context
            return None
        return {k: v for k, v in shapes.items() if not k.startswith("_skip_")}

    def stats(self) -> dict[str, float]:
        """``data/records_read``, ``data/skipped``, ``data/skipped_fraction`` and
        ``data/skipped/<reason>`` for THIS host, cumulative since the start of the run."""
        total = sum(self._skipped.values())
        out = {"data/records_read": float(self._seen), "data/skipped": float(total),
               "data/skipped_fraction": total / self._seen if self._seen else 0.0}
        out.update({f"data/skipped/{k}": float(v) for k, v in self._skipped.items()})
        return out

    def get_state(self) -> dict:
        return {"pipeline": self._inner.get_state(),
                "counters": {"records_read": self._seen, "skipped": dict(self._skipped)}}

    def set_state(self, state: dict) -> None:
        if "pipeline" not in state:  # a checkpoint written before counters existed
            self._inner.set_state(state)
            return
        self._inner.set_state(state["pipeline"])
        self._seen = int(state["counters"]["records_read"])
        self._skipped = {r: int(state["counters"]["skipped"].get(r, 0)) for r in SKIP_REASONS}


def make_train_iterator(
    data_config,
    *,
    tokenizer: Tokenizer,
    global_batch_size: int,
    seed: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainIterator:
    """Infinite, shuffled iterator over ``data_config.train_split`` for THIS host.

    With ``data_config.name == 'sources'`` the examples stream from ``data_config.sources``
    (WebDataset / Parquet / ArrayRecord shards, local or remote) instead: see
    :func:`contrastive_jax.data.streaming.make_stream_iterator`; same batches and interface.

    Args:
      data_config: ``config.data`` (``name``, ``train_split``, ``worker_count``, ``read_threads``,
        ``prefetch_batches``, ``mean``, ``std``, ``num_views``, ``augment``, ``caption_policy``,
        ``text_mask_prob``, ``max_bad_fraction`` and the dataset's own fields).
      tokenizer: turns captions into ``text``; its ``max_len`` is the text length.
      global_batch_size: G, examples per step across all hosts.
      seed: shuffle and augmentation seed (None: ``data_config.shuffle_seed``). The order is
        reshuffled every epoch, deterministically from this seed.
      process_index, process_count: this host and the number of hosts (default: from jax).

    Returns:
      A :class:`TrainIterator` yielding dicts for b = G / process_count examples: ``image``
      float32 [b, H, W, 3] normalized with ``data_config.mean/std``; with ``num_views >= 2`` also
      ``image_views`` float32 [b, V, H, W, 3] (``image`` is view 0); ``text`` int32 [b, max_len]
      (datasets with captions); ``image_local_views`` float32 [b, N, s, s, 3] with
      ``local_views = N >= 1`` (multi-crop); int32 [b] labels (``kind``, ``color``, ``size``, ``position`` for
      shapes); the dataset's extra features stacked ``[b, ...]``; ``example_id`` int32 [b], each
      example's index in the training split (stable across epochs; with the replacement of a bad
      record, the id of the record used). ``get_state()`` returns a
      JSON-serializable dict; ``set_state`` resumes exactly there; ``stats()`` the counters.
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
    data_config = complete(data_config)
    seed = data_config.shuffle_seed if seed is None else seed
    if str(data_config.name) == "sources":
        from contrastive_jax.data.streaming import make_stream_iterator

        return make_stream_iterator(data_config, tokenizer=tokenizer, global_batch_size=global_batch_size,
                                    seed=int(seed), process_index=process_index, process_count=process_count)
    if data_config.sources:
        raise ValueError(f"config.data.sources is set but config.data.name={data_config.name!r}: set "
                         "config.data.name='sources' to train on the streamed shards (or clear sources)")
    entry = resolve_dataset(data_config)
    splits = build_dataset(data_config)
    if data_config.train_split not in splits:
        raise ValueError(f"config.data.train_split={data_config.train_split!r} is not a split of "
                         f"{data_config.name!r} (splits: {', '.join(sorted(splits))})")
    source = splits[data_config.train_split]
    if len(source) < global_batch_size:
        # "config." in the message: the train command reports it as a config error (exit 2).
        raise ValueError(f"config.train.batch_size={global_batch_size} is larger than split "
                         f"{data_config.train_split!r} of dataset {data_config.name!r} ({len(source)} "
                         f"examples): use a batch size <= {len(source)} or a bigger dataset")
    processor = ExampleProcessor(entry, tokenizer, data_config, train=True, seed=int(seed))
    source = _ReopenedSource(data_config, data_config.train_split, source, cache=bool(data_config.cache_raw))
    ds = grain.MapDataset.source(source).map_with_index(_WithExampleId(len(source))).shuffle(seed=seed).repeat(None)
    ds = examples = _ProcessOrReplace(ds, processor)

    def normalized(d):
        return d if data_config.get("normalize_on_device", False) else d.map(
            _NormalizeImages(data_config.mean, data_config.std))

    def shapes() -> dict:
        # One example through the same batching and normalization: the batches' fields, shapes
        # and dtypes without reading or decoding a whole batch.
        one = normalized(examples[0:1].batch(1))[0]
        return {k: ((host_batch, *np.shape(v)[1:]), np.asarray(v).dtype) for k, v in one.items()}

    # Blocks of host_batch consecutive stream elements; block k belongs to host k mod P, so
    # host p's i-th batch is rows [p*b, (p+1)*b) of global batch i. MapDataset batching is lazy:
    # this host never reads other hosts' blocks.
    ds = normalized(ds.batch(host_batch, drop_remainder=True)[process_index::process_count])
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=int(data_config.read_threads),
                          prefetch_buffer_size=int(data_config.prefetch_batches))
    )
    if data_config.worker_count > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=int(data_config.worker_count))
        )
    return TrainIterator(iter(it_ds), dataset=str(data_config.name),
                         max_bad_fraction=float(data_config.max_bad_fraction), split_size=len(source),
                         shapes=shapes)


def load_eval_arrays(
    data_config, split: str, *, tokenizer: Tokenizer, max_examples: int = -1
) -> dict[str, Any]:
    """A whole split (or its first ``max_examples``) as arrays, in the split's stored order.

    Images get the evaluation transform (shorter side to ``image_size``, centre crop); each
    example's first caption is used. Bad records are skipped (and logged), not fatal, unless
    more than ``max_bad_fraction`` of them are bad.

    Returns:
      ``image`` float32 [N, H, W, 3] (normalized like training), ``text`` int32 [N, max_len] and
      ``caption`` (list of N str) for datasets with captions, int32 [N] labels, extra features.
    """
    data_config = complete(data_config)
    entry = resolve_dataset(data_config)
    splits = build_dataset(data_config)
    if split not in splits:
        hint = ("config.data.eval_sources (the evaluation shards)" if str(data_config.name) == "sources"
                else "config.data.eval_split")
        raise ValueError(f"split {split!r} is not a split of dataset {data_config.name!r} "
                         f"(splits: {', '.join(sorted(splits))}); set {hint}")
    source = splits[split]
    n = len(source) if max_examples is None or max_examples < 0 else min(max_examples, len(source))
    processor = ExampleProcessor(entry, tokenizer, data_config, train=False)
    examples, captions, skipped = [], [], []
    for i in range(n):
        record = source[i]
        try:
            ex = processor(record, i)
        except BadRecordError as e:
            skipped.append((processor.key_of(record), e.reason))
            continue
        examples.append(ex)
        if entry.text_key is not None:
            captions.append(record_captions(record, entry.text_key)[0])
    if skipped:
        log.warning("dataset %s split %s: skipped %d bad records (first: %s)", data_config.name,
                    split, len(skipped), skipped[:_LOG_FIRST_BAD])
        if len(skipped) > float(data_config.max_bad_fraction) * n:
            raise DataQualityError(f"dataset {data_config.name!r} split {split!r}: {len(skipped)} "
                                   f"of {n} records are bad (> config.data.max_bad_fraction="
                                   f"{data_config.max_bad_fraction}); first: {skipped[:5]}")
    if not examples:
        raise ValueError(f"split {split!r} of dataset {data_config.name!r} is empty")
    out: dict[str, Any] = {
        "image": normalize_images(np.stack([ex["image"] for ex in examples]),
                                  data_config.mean, data_config.std),
    }
    if entry.text_key is not None:
        out["text"] = np.stack([ex["text"] for ex in examples]).astype(np.int32)
        out["caption"] = captions
    for key in (*entry.label_keys, *entry.extra_features):
        out[key] = np.stack([ex[key] for ex in examples])
    return out
