"""Runs the benchmark: finds each dataset on disk, encodes it sharded over the devices, scores it.

Metrics follow CLIP_benchmark (github.com/LAION-AI/CLIP_benchmark), so numbers compare with the
tables open_clip publishes:

- zero-shot classification: class weights by CLIP's prompt ensembling (per class, the normalized
  mean of its normalized prompt embeddings; Radford et al. 2021, sec. 3.1.4); ``acc1``, ``acc5``
  (top-k accuracy; ``nan`` with fewer than 5 classes) and ``mean_per_class_recall`` (recall
  averaged over the classes that have examples, i.e. balanced accuracy). Ties between class
  scores count against the image (see :mod:`contrastive_jax.evaluate.metrics`).
- retrieval: ``image_retrieval_recall@k`` (text query -> images: is its image in the top k) and
  ``text_retrieval_recall@k`` (image query -> texts: is any of its captions, usually 5, in the top
  k), k = 1, 5, 10; every caption is its own gallery item (identical strings are not merged).

All fractions in [0, 1]. Images are decoded, resized (shorter side, bicubic) and centre-cropped to
the model's input size, normalized with its mean/std, and encoded in global batches split over a
1-D mesh of the given devices; retrieval galleries are sharded over the same mesh.
"""
from __future__ import annotations

import dataclasses
import io
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from contrastive_jax.evaluate.benchmark import datasets as ds
from contrastive_jax.evaluate.benchmark import compositional, sources
from contrastive_jax.evaluate.encode import encode_in_batches
from contrastive_jax.evaluate.metrics import zero_shot_accuracy
from contrastive_jax.evaluate.retrieval import retrieval_eval
from contrastive_jax.evaluate.zero_shot import l2_normalize_np

RECALL_KS = (1, 5, 10)
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def compositional_names() -> tuple[str, ...]:
    """The compositional benchmarks' names (SugarCrepe, ARO, Winoground)."""
    return tuple(compositional.DATASETS)


class ShardedEncoder:
    """A :class:`contrastive_jax.api.Model`'s encoders, jitted over a 1-D ``('batch',)`` mesh.

    Params are replicated; each call's global batch (``batch_size`` rounded up to a multiple of the
    device count) is split over the devices. Single-process only (inputs are host numpy arrays).

    Args:
      model: the loaded model (``module``, ``params``, ``tokenizer``, ``preprocess_images``).
      devices: the devices to use (default: all of this process's).
      batch_size: rows per encode call.
    """

    def __init__(self, model, devices: Sequence[Any] | None = None, batch_size: int = 256):
        devices = list(devices if devices is not None else jax.local_devices())
        self.model, self.num_devices = model, len(devices)
        self.mesh, self.axes = Mesh(np.asarray(devices), ("batch",)), ("batch",)
        replicated, rows = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P("batch"))
        self.params = jax.device_put(model.params, replicated)
        self.batch_size = -(-max(1, int(batch_size)) // self.num_devices) * self.num_devices
        module = model.module

        def make(name):
            return jax.jit(lambda p, x: module.apply({"params": p}, name, x, method="encode"),
                           in_shardings=(replicated, rows), out_shardings=replicated)

        self._fns = {name: make(name) for name in ("image", "text") if name in model.modalities}

    def rows(self, n: int) -> int:
        """Rows per call for ``n`` inputs: the next power of two >= n (few compiles, little
        padding), capped at ``batch_size``, a multiple of the device count."""
        r = min(self.batch_size, 1 << max(n - 1, 0).bit_length())
        return -(-r // self.num_devices) * self.num_devices

    def fn(self, name: str) -> Callable:
        """``[rows, ...] -> [rows, D]`` of modality ``name``."""
        if name not in self._fns:
            raise ValueError(f"the model has no {name!r} encoder (it has {sorted(self._fns)})")
        return lambda batch: self._fns[name](self.params, np.asarray(batch))

    def encode(self, name: str, x: np.ndarray) -> np.ndarray:
        """``[N, ...]`` -> float32 ``[N, D]``, unit L2 norm."""
        if x.shape[0] == 0:
            return np.zeros((0, int(self.model.config.model.embed_dim)), np.float32)
        return l2_normalize_np(encode_in_batches(self.fn(name), x, self.rows(x.shape[0])))

    def images(self, images: list) -> np.ndarray:
        """Encoded bytes / uint8 arrays -> float32 ``[N, D]``."""
        return self.encode("image", self.model.preprocess_images([decode_image(im) for im in images]))

    def texts(self, texts: list[str]) -> np.ndarray:
        return self.encode("text", self.model.tokenize(texts))


def decode_image(image):
    """Encoded bytes -> RGB PIL image; a uint8 array ``[H, W(, C)]`` passes through as RGB."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        with Image.open(io.BytesIO(image)) as img:
            return img.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr).convert("RGB")


def class_embeddings(encoder: ShardedEncoder, names: Sequence[Sequence[str]], templates: Sequence[str]) -> np.ndarray:
    """CLIP prompt ensembling: ``[C, D]`` float32 unit-norm class weights; a class with several
    names (synonyms) averages the prompts of all of them."""
    prompts = [[t.format(n) for n in syns for t in templates] for syns in names]
    flat = [p for per in prompts for p in per]
    emb = encoder.texts(flat)
    bounds = np.cumsum([0] + [len(p) for p in prompts])
    return l2_normalize_np(np.stack([emb[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])]))


def classification_metrics(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``acc1``, ``acc5`` (nan below 5 classes) and ``mean_per_class_recall`` of images ``[N, D]``
    against class weights ``[C, D]`` for int labels ``[N]``."""
    m = zero_shot_accuracy(image_emb, class_emb, labels, ks=(1, 5))
    return {"acc1": m["top1"], "acc5": m.get("top5", float("nan")), "mean_per_class_recall": m["mean_per_class_top1"]}


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray, *,
                      mesh: Mesh | None = None, axes=None) -> dict[str, float]:
    """CLIP_benchmark's recall@k (k in :data:`RECALL_KS`) of images ``[Ni, D]`` and captions
    ``[Nt, D]``, caption ``t`` describing image ``text_image[t]``."""
    out = retrieval_eval(image_emb, text_emb, text_image=text_image, ks=RECALL_KS, mesh=mesh, axes=axes)
    res = {}
    for k in RECALL_KS:
        res[f"image_retrieval_recall@{k}"] = out.get(f"text_to_image/R@{k}", float("nan"))
        res[f"text_retrieval_recall@{k}"] = out.get(f"image_to_text/R@{k}", float("nan"))
    return res


def _bar(desc: str, total: int | None, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not progress, file=sys.stderr, leave=False)


def _chunks(it: Iterable[dict], n: int) -> Iterable[list[dict]]:
    chunk = []
    for ex in it:
        chunk.append(ex)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run_classification(encoder: ShardedEncoder, examples: Iterable[dict], names, templates, *,
                       desc: str = "", total: int | None = None, progress: bool = True) -> tuple[dict, int]:
    """``(metrics, number of images)`` of zero-shot classification over ``examples``."""
    cls = class_embeddings(encoder, names, templates)
    embs, labels = [], []
    with _bar(desc, total, progress) as bar:
        for chunk in _chunks(examples, encoder.batch_size):
            if "label" not in chunk[0]:
                raise ValueError("examples have no class label (a retrieval dataset?)")
            embs.append(encoder.images([ex["image"] for ex in chunk]))
            labels.extend(int(ex["label"]) for ex in chunk)
            bar.update(len(chunk))
    if not labels:
        raise ValueError("no examples")
    labels = np.asarray(labels)
    if labels.min() < 0 or labels.max() >= len(names):
        raise ValueError(f"labels span [{labels.min()}, {labels.max()}] but there are {len(names)} class names")
    return classification_metrics(np.concatenate(embs), cls, labels), len(labels)


def run_retrieval(encoder: ShardedEncoder, examples: Iterable[dict], *, desc: str = "", total: int | None = None,
                  progress: bool = True) -> tuple[dict, int]:
    """``(metrics, number of images)`` of image<->text retrieval over ``examples`` (each with its
    ``captions``)."""
    embs, captions, text_image = [], [], []
    n = 0
    with _bar(desc, total, progress) as bar:
        for chunk in _chunks(examples, encoder.batch_size):
            if "captions" not in chunk[0]:
                raise ValueError("examples have no captions (a classification dataset?)")
            embs.append(encoder.images([ex["image"] for ex in chunk]))
            for ex in chunk:
                if not ex["captions"]:
                    raise ValueError(f"image {n} has no caption")
                captions.extend(ex["captions"])
                text_image.extend([n] * len(ex["captions"]))
                n += 1
            bar.update(len(chunk))
    if not n:
        raise ValueError("no examples")
    text_emb = encoder.texts(captions)
    return retrieval_metrics(np.concatenate(embs), text_emb, np.asarray(text_image),
                             mesh=encoder.mesh, axes=encoder.axes), n


def _clean(name: str) -> str:
    return name.replace("_", " ")


def _locate(name: str, data_dir: str | None, wds_root: str | None):
    """``(BenchmarkDataset, kind, path)`` with kind ``'wds'`` / ``'tfds'`` / None (not found).
    For a benchmark name the export is preferred (its test splits are the ones CLIP_benchmark's
    numbers use), then TFDS; a TFDS name (``coco_captions``) reads that TFDS dataset only."""
    known = ds.DATASETS.get(name)
    alias = next((d for d in ds.DATASETS.values() if d.tfds and d.tfds.name == name), None)
    if known:
        dataset = known
    elif alias:  # a TFDS name ('coco_captions', 'oxford_iiit_pet'): that TFDS dataset, as its benchmark entry
        dataset = dataclasses.replace(alias, name=name)
    else:  # any other prepared TFDS dataset (split 'test'), under its own name
        dataset = ds.BenchmarkDataset(name, tfds=ds.TfdsSource(name))
    path = sources.find_wds(dataset, wds_root) if known else None
    if path:
        return dataset, "wds", path
    path = sources.find_tfds(dataset.tfds, data_dir) if dataset.tfds else None
    if path and not known and not alias:
        # A dataset of the user's: its features say the task (a `data convert` output has captions,
        # and a ClassLabel `label` with --format classes).
        what = sources.tfds_task(path)
        if what is None:
            raise sources.SourceUnavailable(f"{path}: has neither a ClassLabel 'label' nor 'captions' to benchmark")
        if what[0] == "captions":
            dataset = dataclasses.replace(dataset, task=ds.RETRIEVAL,
                                          tfds=dataclasses.replace(dataset.tfds, captions_key=what[1]))
    if path:
        return dataset, "tfds", path
    return dataset, None, None


def _missing_reason(dataset: ds.BenchmarkDataset, known: bool, data_dir, wds_root) -> str:
    where = []
    if dataset.tfds:
        where.append(f"TFDS {dataset.tfds.name!r} under --data-dir {data_dir}" if data_dir else
                     f"TFDS {dataset.tfds.name!r} (no --data-dir given)")
    if known:
        where.append(f"a CLIP_benchmark export {{{','.join(dataset.wds_folders)}}}/test/*.tar under --wds-root "
                     f"{wds_root}" if wds_root else "its CLIP_benchmark export (no --wds-root given)")
    reason = "not found: looked for " + " and ".join(where)
    if not known and dataset.names_key is None:  # neither a benchmark name nor a TFDS alias of one
        reason = "not a benchmark dataset name, and " + reason
    return reason + (f" ({dataset.note})" if dataset.note else "")


def _evaluate_one(encoder, dataset, kind, path, progress) -> tuple[dict, int]:
    if kind == "wds":
        examples = sources.wds_examples(path)
        total = None
    else:
        examples = sources.tfds_examples(path, dataset.tfds)
        total = sources.tfds_size(path, dataset.tfds.split)
    if dataset.task == ds.RETRIEVAL:
        return run_retrieval(encoder, examples, desc=dataset.name, total=total, progress=progress)
    names = templates = None
    if kind == "wds":
        export_names = sources.wds_text_file(path, "classnames.txt")
        names = [[n] for n in export_names] if export_names else None
        templates = sources.wds_text_file(path, "zeroshot_classification_templates.txt")
    tfds_names = sources.tfds_class_names(path, dataset.tfds.label_key) if kind == "tfds" else None
    if names is None and dataset.names_key:
        names = ds.class_names(dataset)
        if tfds_names and len(tfds_names) != len(names):  # another version/config of the dataset
            raise sources.SourceUnavailable(f"{path}: {len(tfds_names)} classes in TFDS, {len(names)} class "
                                            f"names shipped for {dataset.name}")
    if names is None and tfds_names:
        names = [[_clean(n)] for n in tfds_names]
    if names is None:
        raise sources.SourceUnavailable(f"{path}: no class names (no classnames.txt, none shipped, no ClassLabel)")
    if templates is None:
        templates = ds.templates(dataset) if dataset.templates_key else list(DEFAULT_TEMPLATES)
    return run_classification(encoder, examples, names, templates, desc=dataset.name, total=total, progress=progress)


def run_benchmark(model, names: Sequence[str], *, data_dir: str | None = None, wds_root: str | None = None,
                  compositional_root: str | None = None, batch_size: int = 256, devices=None,
                  progress: bool = True) -> list[dict]:
    """Evaluates ``model`` on each dataset of ``names`` found on disk.

    Returns one row per name: ``dataset``, ``task``, ``status`` (``'ok'``, ``'missing'``,
    ``'unavailable'``: on disk but unreadable here, ``'error'``: failed while evaluating),
    ``source`` (``'wds:PATH'`` / ``'tfds:PATH'`` / the compositional path), ``reason`` (when not
    ok), ``metrics`` (dict of floats), ``num_examples`` and ``seconds``. A failing dataset never
    stops the others.
    """
    encoder = ShardedEncoder(model, devices, batch_size)
    comp_names = compositional_names()
    rows = []
    for name in names:
        t0 = time.time()
        row: dict = {"dataset": name, "metrics": {}}
        try:
            if name in comp_names:
                row.update(_run_compositional(model, name, compositional_root, batch_size, progress))
            else:
                dataset, kind, path = _locate(name, data_dir, wds_root)
                row["task"] = dataset.task
                if kind is None:
                    row.update(status="missing",
                               reason=_missing_reason(dataset, name in ds.DATASETS, data_dir, wds_root))
                else:
                    row["source"] = f"{kind}:{path}"
                    metrics, n = _evaluate_one(encoder, dataset, kind, path, progress)
                    row.update(status="ok", metrics=metrics, num_examples=n)
        except sources.SourceUnavailable as e:
            row.update(status="unavailable", reason=str(e))
        except Exception as e:  # one dataset's failure is reported, the others still run
            row.update(status="error", reason=f"{type(e).__name__}: {e}")
        row.setdefault("task", ds.COMPOSITIONAL if name in comp_names else ds.CLASSIFICATION)
        row["seconds"] = round(time.time() - t0, 3)
        rows.append(row)
    return rows


def _run_compositional(model, name: str, root: str | None, batch_size: int, progress: bool) -> dict:
    path = compositional.find(name, root) if root else None
    if path is None:
        return {"task": ds.COMPOSITIONAL, "status": "missing",
                "reason": f"not found under --compositional-root {root}" if root else "no --compositional-root given"}
    metrics = compositional.evaluate(name, path, model, batch_size=batch_size, progress=progress)
    return {"task": ds.COMPOSITIONAL, "status": "ok", "source": path,
            "metrics": {k: float(v) for k, v in metrics.items()}}
