"""Evaluation during (and after) training: sharded encoders plus the evaluators of ``config.eval``.

The training loop builds one :class:`EvalRunner` and calls ``runner(params, step=step)`` whenever
``runner.due(step)``, and ``runner(params)`` (every evaluator) at the end. The runner owns
everything evaluation needs (jitted encoders, the eval sets, prompts), so the loop does not know
which evaluators exist.

Evaluators (``config.eval.evaluators``, see ``docs/evaluation.md``):

- ``zero_shot``: per labelled attribute, class embeddings averaged over prompt templates
  (CLIP ensembling), top-k, per-class and mean-per-class accuracy; multi-label mAP.
- ``retrieval``: image→text and text→image recall@k and median rank (sharded, streamed).
- ``diagnostics``: RankMe, alignment/uniformity, modality gap, embedding norms.
- ``linear_probe`` (ridge sweep + logistic regression), ``knn``, ``few_shot``: probes trained on
  features of part of the train split, scored on the eval split.

Zero-shot and retrieval are repeated at each Matryoshka prefix of ``config.model.matryoshka_dims``
(keys prefixed ``mrl{d}/``). Every eval set is encoded once per call, in global batches of
``config.eval.batch_size`` split over the mesh's batch axes; the last batch is padded and the
padded rows are dropped before any metric sees them.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from contrastive_jax.evaluate import diagnostics as diag
from contrastive_jax.evaluate import probes
from contrastive_jax.evaluate.encode import encode_in_batches
from contrastive_jax.evaluate.metrics import zero_shot_accuracy
from contrastive_jax.evaluate.retrieval import retrieval_eval
from contrastive_jax.evaluate.zero_shot import (
    l2_normalize_np,
    load_templates,
    prompt_class_embeddings,
    read_lines,
    zero_shot_class_embeddings,
    zero_shot_multilabel,
)
from contrastive_jax.parallel.logical import uses_logical_rules, with_activation_rules
from contrastive_jax.parallel.mesh import batch_sharding, replicated_batch_to_global, to_host

log = logging.getLogger("contrastive_jax")

# Keys every evaluator accepts.
COMMON_KEYS = {"name": None, "dataset": None, "split": None, "every_steps": -1, "max_examples": None, "tag": None}
_TRAIN_FEATURES = {"train_split": None, "train_examples": 2000, "label_keys": None}
# name -> its own options with their defaults.
EVALUATORS: dict[str, dict[str, Any]] = {
    "zero_shot": {"ks": None, "class_names": None, "templates": None, "label_key": None, "multi_label": False},
    "retrieval": {"ks": None, "gallery_block": 4096, "query_block": 256},
    "diagnostics": {"max_items": 8192},
    "linear_probe": {**_TRAIN_FEATURES, "ridge_alphas": probes.DEFAULT_RIDGE_ALPHAS,
                     "logistic_l2": (1e-6, 1e-5, 1e-4, 1e-3), "logistic_steps": 300},
    "knn": {**_TRAIN_FEATURES, "k": 20, "temperature": 0.07},
    "few_shot": {**_TRAIN_FEATURES, "shots": (1, 5, 10), "seeds": 3},
}
# Result-key prefix of each evaluator (``zeroshot`` and ``retrieval`` are the historical names).
_PREFIX = {"zero_shot": "zeroshot", "retrieval": "retrieval", "diagnostics": "diag",
           "linear_probe": "probe", "knn": "knn", "few_shot": "fewshot"}


@dataclasses.dataclass(frozen=True)
class EvaluatorSpec:
    """One validated ``config.eval.evaluators`` entry (see :func:`parse_evaluators`)."""

    name: str
    dataset: str
    split: str
    every_steps: int  # -1: the run's interval; 0: only at the end; N: every N steps
    max_examples: int
    tag: str  # result-key prefix ('' for the run's own dataset and eval split)
    options: Mapping[str, Any]


def parse_evaluators(eval_config: Any, data_config: Any) -> list[EvaluatorSpec]:
    """Validates ``config.eval.evaluators`` and fills every default.

    Raises:
      ValueError: naming ``config.eval.evaluators[i]`` and the unknown name or key.
    """
    entries = list(eval_config.get("evaluators", []) or [])
    specs = []
    for i, entry in enumerate(entries):
        where = f"config.eval.evaluators[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not hasattr(entry, "items"):
            raise ValueError(f"{where} must be a name or a dict with 'name', got {entry!r}")
        entry = dict(entry.items())
        name = entry.get("name")
        if name not in EVALUATORS:
            raise ValueError(f"{where}.name={name!r} is not an evaluator; known: {', '.join(EVALUATORS)}")
        allowed = {**COMMON_KEYS, **EVALUATORS[name]}
        unknown = sorted(set(entry) - set(allowed))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in {where} ({name}); known: {', '.join(sorted(allowed))}")
        merged = {**allowed, **entry}
        dataset = merged["dataset"] or data_config.name
        split = merged["split"] or data_config.eval_split
        max_examples = int(eval_config.max_examples if merged["max_examples"] is None else merged["max_examples"])
        own = dataset == data_config.name and split == data_config.eval_split
        tag = merged["tag"] if merged["tag"] is not None else ("" if own else f"{dataset}:{split}/")
        if tag and not tag.endswith("/"):
            tag += "/"
        options = {k: merged[k] for k in EVALUATORS[name]}
        if "train_split" in options and options["train_split"] is None:
            options["train_split"] = data_config.train_split
        if name == "zero_shot" and options["class_names"] is not None and options["label_key"] is None:
            raise ValueError(f"{where}: class_names needs label_key (the label array they index)")
        specs.append(EvaluatorSpec(name, dataset, split, int(merged["every_steps"]), max_examples, tag, options))
    return specs


# Evaluators that need a text encoder.
TEXT_EVALUATORS = ("zero_shot", "retrieval")


def _encode_method(model, side: str):
    """A method returning the embedding BEFORE its L2 normalization where the model exposes
    the parts (two-tower: ``{side}_proj(side(x))``; evaluation normalizes, and the norms feed the
    diagnostics), else the model's own ``encode_{side}`` / ``encode(side, x)``."""

    def method(m, x):
        tower, head = getattr(m, side, None), getattr(m, f"{side}_proj", None)
        if callable(tower) and callable(head):
            return head(tower(x, train=False))
        if hasattr(m, f"encode_{side}"):
            return getattr(m, f"encode_{side}")(x)
        return m.encode(side, x)

    if not (hasattr(model, f"encode_{side}") or hasattr(model, "encode")):
        raise ValueError(f"model {type(model).__name__} has neither encode_{side} nor encode(name, x)")
    return method


def make_encoders(model, mesh: Mesh, batch_axes: Sequence[str], param_shardings: Any, sharding_config: Any = None):
    """Jitted, sharded ``(params, batch) -> [B, D]`` image and text encoders (embeddings before
    the final L2 normalization where the model exposes it; see :func:`_encode_method`).
    ``sharding_config`` (``config.sharding``): its logical rules constrain the activations."""
    in_sh = batch_sharding(mesh, batch_axes)

    def make(side):
        method = _encode_method(model, side)

        def encode(p, x):
            return model.apply({"params": p}, x, method=method)

        if sharding_config is not None and uses_logical_rules(sharding_config):
            encode = with_activation_rules(encode, sharding_config, mesh)
        return jax.jit(
            encode,
            in_shardings=(param_shardings, in_sh),
            out_shardings=in_sh,
        )

    return make("image"), make("text")


def _denormalize(images: np.ndarray, mean, std) -> np.ndarray:
    """Normalized float images -> uint8 for pictures."""
    x = np.asarray(images, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


class Evaluation:
    """Runs evaluator specs given host-level encoders and eval arrays; no model, no mesh.

    Args:
      encode_image / encode_text: ``[batch_size, ...] -> [batch_size, D]`` numpy-readable;
        ``encode_text`` None for image-only models (text features are then not computed).
      load_arrays: ``(dataset, split, max_examples) -> dict`` of arrays (``image``, ``text``,
        ``caption``, int labels), as :func:`contrastive_jax.data.load_eval_arrays` returns.
      dataset_info: ``dataset -> dict`` (``class_names``, ``templates``, ``prompts``,
        ``label_keys``), as :func:`contrastive_jax.data.dataset_info` returns.
      tokenizer: ``encode(list[str]) -> int32 [M, L]``.
      mesh, batch_axes: where retrieval / k-NN shard their galleries (None: one device).
    """

    def __init__(self, specs: Sequence[EvaluatorSpec], *, encode_image: Callable, encode_text: Callable | None,
                 load_arrays: Callable, dataset_info: Callable, tokenizer, batch_size: int,
                 recall_ks: Sequence[int] = (1, 5, 10), zero_shot_ks: Sequence[int] = (1, 5),
                 matryoshka_dims: Sequence[int] = (), mesh: Mesh | None = None,
                 batch_axes: Sequence[str] | None = None, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)):
        self.specs = list(specs)
        self.encode_image, self.encode_text = encode_image, encode_text
        self.load_arrays, self.dataset_info = load_arrays, dataset_info
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.recall_ks, self.zero_shot_ks = tuple(recall_ks), tuple(zero_shot_ks)
        self.matryoshka_dims = tuple(int(d) for d in matryoshka_dims)
        self.mesh, self.axes = mesh, (tuple(batch_axes) if batch_axes else None)
        self.image_mean, self.image_std = image_mean, image_std
        self.details: dict = {}

    # -- encoding (cached within one call) ------------------------------------------------------

    def _features(self, cache: dict, dataset: str, split: str, max_examples: int) -> dict:
        key = (dataset, split, max_examples)
        if key not in cache:
            data = self.load_arrays(dataset, split, max_examples)
            feats = {"data": data}
            feats["raw_image"] = encode_in_batches(self.encode_image, data["image"], self.batch_size)
            feats["image"] = l2_normalize_np(feats["raw_image"])
            if "text" in data and self.encode_text is not None:
                feats["raw_text"] = encode_in_batches(self.encode_text, data["text"], self.batch_size)
                feats["text"] = l2_normalize_np(feats["raw_text"])
            cache[key] = feats
        return cache[key]

    def _prefixes(self, emb_dim: int) -> list[tuple[str, int | None]]:
        out = [("", None)]
        for d in self.matryoshka_dims:
            if d < emb_dim:
                out.append((f"mrl{d}/", d))
        return out

    @staticmethod
    def _cut(emb: np.ndarray, dim: int | None) -> np.ndarray:
        return emb if dim is None else diag.matryoshka_prefix(emb, dim)

    # -- the evaluators -------------------------------------------------------------------------

    def _zero_shot(self, spec, feats, results, details):
        info = self.dataset_info(spec.dataset)
        opts = spec.options
        data = feats["data"]
        ks = tuple(opts["ks"] or self.zero_shot_ks)
        if opts["class_names"] is not None:
            names = opts["class_names"]
            names = read_lines(names, what="class names") if isinstance(names, str) else list(names)
            tasks = {opts["label_key"]: (names, None)}
        else:
            tasks = {k: (v, info["prompts"].get(k)) for k, v in info["class_names"].items()}
            if opts["label_key"] is not None:
                tasks = {opts["label_key"]: tasks[opts["label_key"]]}
        for attr, (names, prompts) in tasks.items():
            if attr not in data:
                raise KeyError(f"eval set {spec.dataset}:{spec.split} has no label array {attr!r} for zero-shot")
            if opts["templates"] is not None:
                t = opts["templates"]
                templates = load_templates(t) if isinstance(t, str) else list(t)
                class_emb = zero_shot_class_embeddings(self.encode_text, self.tokenizer, list(names), templates,
                                                       self.batch_size)
            elif prompts:
                class_emb = prompt_class_embeddings(self.encode_text, self.tokenizer, prompts, self.batch_size)
            else:
                templates = list(info["templates"].get(attr, ["{}"]))
                class_emb = zero_shot_class_embeddings(self.encode_text, self.tokenizer, list(names), templates,
                                                       self.batch_size)
            labels = np.asarray(data[attr])
            for pre, dim in self._prefixes(class_emb.shape[1]):
                img, cls = self._cut(feats["image"], dim), self._cut(class_emb, dim)
                key = f"{spec.tag}{pre}zeroshot/{attr}"
                if opts["multi_label"] or labels.ndim == 2:
                    acc = zero_shot_multilabel(img, cls, labels)
                    per_class, per_class_key = acc.pop("per_class_ap"), "AP"
                else:
                    acc = zero_shot_accuracy(img, cls, labels, ks=ks)
                    per_class, per_class_key = acc.pop("per_class_top1"), "top-1 accuracy"
                for k, v in acc.items():
                    results[f"{key}/{k}"] = float(v)
                if not pre:
                    details.setdefault("per_class", {})[f"{spec.tag}{attr}"] = {
                        "names": [str(n) for n in names], "values": np.asarray(per_class, np.float64).tolist(),
                        "metric": per_class_key}

    def _retrieval(self, spec, feats, results, details):
        if "text" not in feats:
            raise KeyError(f"eval set {spec.dataset}:{spec.split} has no text: retrieval needs captions")
        data = feats["data"]
        strings = list(data["caption"]) if "caption" in data else None
        ks = tuple(spec.options["ks"] or self.recall_ks)
        for pre, dim in self._prefixes(feats["image"].shape[1]):
            out = retrieval_eval(
                self._cut(feats["image"], dim), self._cut(feats["text"], dim), text_strings=strings, ks=ks,
                mesh=self.mesh, axes=self.axes, gallery_block=int(spec.options["gallery_block"]),
                query_block=int(spec.options["query_block"]), return_topk=0 if pre else 5)
            if not pre and not spec.tag:
                details["retrieval"] = {"image_to_text": out.pop("image_to_text/topk"),
                                        "text_to_image": out.pop("text_to_image/topk")}
            for k, v in out.items():
                if np.ndim(v) == 0:
                    results[f"{spec.tag}{pre}retrieval/{k}"] = float(v)

    def _diagnostics(self, spec, feats, results, details):
        out = diag.representation_diagnostics(feats["image"], feats.get("text"), raw_image=feats["raw_image"],
                                              raw_text=feats.get("raw_text"), max_items=int(spec.options["max_items"]))
        for k, v in out.items():
            results[f"{spec.tag}diag/{k}"] = v

    def _probe(self, spec, feats, results, details, cache):
        opts = spec.options
        info = self.dataset_info(spec.dataset)
        train_split = opts["train_split"]
        train = self._features(cache, spec.dataset, train_split, int(opts["train_examples"]))
        keys = opts["label_keys"] or [k for k in info["label_keys"] if k in feats["data"]]
        for attr in keys:
            for where, data in (("eval", feats["data"]), (train_split, train["data"])):
                if attr not in data:
                    raise KeyError(f"{spec.dataset}:{where} has no label array {attr!r} for {spec.name}")
            c = len(info["class_names"].get(attr, [])) or None
            args = (train["image"], train["data"][attr], feats["image"], feats["data"][attr])
            key = f"{spec.tag}{_PREFIX[spec.name]}/{attr}"
            if spec.name == "linear_probe":
                ridge = probes.ridge_probe(*args, alphas=opts["ridge_alphas"], num_classes=c)
                logistic = probes.logistic_probe(*args, l2_values=opts["logistic_l2"],
                                                 steps=int(opts["logistic_steps"]), num_classes=c)
                results[f"{key}/ridge/top1"], results[f"{key}/ridge/alpha"] = ridge["top1"], ridge["alpha"]
                results[f"{key}/logistic/top1"], results[f"{key}/logistic/l2"] = logistic["top1"], logistic["l2"]
            elif spec.name == "knn":
                temp = opts["temperature"]
                out = probes.knn_probe(*args, k=int(opts["k"]), temperature=None if temp is None else float(temp),
                                       num_classes=c, mesh=self.mesh, axes=self.axes)
                results[f"{key}/top1"] = out["top1"]
            else:
                out = probes.few_shot_probe(*args, shots=tuple(opts["shots"]), seeds=int(opts["seeds"]), num_classes=c)
                for k, v in out.items():
                    results[f"{key}/{k}"] = v

    def _pictures(self, feats, details, n_heat: int = 16, n_queries: int = 4):
        """Small arrays for the report: a similarity heatmap and retrieval examples."""
        data = feats["data"]
        if "text" not in feats:
            return
        n = feats["image"].shape[0]
        m = min(n_heat, n)
        details["heatmap"] = {"similarity": (feats["image"][:m] @ feats["text"][:m].T).tolist(),
                              "captions": [str(c) for c in list(data.get("caption", []))[:m]]}
        if "retrieval" not in details:
            return
        q = np.unique(np.linspace(0, n - 1, min(n_queries, n)).astype(int))
        i2t, t2i = details["retrieval"]["image_to_text"][q], details["retrieval"]["text_to_image"][q]
        needed = np.unique(np.concatenate([q, t2i.ravel()]))
        captions = list(data.get("caption", [str(i) for i in range(n)]))
        details["retrieval"] = {
            "image_queries": q.tolist(), "image_to_text": i2t.tolist(),
            "text_queries": q.tolist(), "text_to_image": t2i.tolist(),
            "captions": {int(i): str(captions[i]) for i in np.unique(np.concatenate([q, i2t.ravel()]))},
            "images": {int(i): _denormalize(data["image"][i], self.image_mean, self.image_std) for i in needed},
        }

    def __call__(self, specs: Sequence[EvaluatorSpec] | None = None) -> dict[str, float]:
        specs = self.specs if specs is None else list(specs)
        cache: dict = {}
        results: dict[str, float] = {}
        details: dict = {}
        for spec in specs:
            feats = self._features(cache, spec.dataset, spec.split, spec.max_examples)
            results[f"{spec.tag}num_examples"] = float(feats["image"].shape[0])
            if spec.name == "zero_shot":
                self._zero_shot(spec, feats, results, details)
            elif spec.name == "retrieval":
                self._retrieval(spec, feats, results, details)
            elif spec.name == "diagnostics":
                self._diagnostics(spec, feats, results, details)
            else:
                self._probe(spec, feats, results, details, cache)
        own = [s for s in specs if not s.tag]
        if own:
            self._pictures(self._features(cache, own[0].dataset, own[0].split, own[0].max_examples), details)
        self.details = details
        return results


class EvalRunner:
    """``runner(params, step=None) -> {metric_name: float}`` for the evaluators of ``config.eval``.

    Args:
      config: the run config (reads ``data``, ``eval`` and ``model.matryoshka_dims``).
      model: the built model (``encode_image`` / ``encode_text``, or ``encode(name, x)``).
      mesh, batch_axes: where the encoders run; eval batches and retrieval galleries are split
        over ``batch_axes``.
      param_shardings: shardings of the params tree passed to ``__call__``.
      tokenizer: the run's tokenizer (prompts are tokenized exactly as training captions).
      default_every_steps: the run's evaluation interval in steps for evaluators that do not set
        their own (default ``config.eval.every_steps``; <= 0: only at the end).

    After a call, ``runner.details`` holds the arrays the report draws (per-class accuracy, a
    similarity heatmap, retrieval examples).
    """

    def __init__(self, config: Any, model, mesh: Mesh, batch_axes: Sequence[str], param_shardings: Any, tokenizer,
                 *, default_every_steps: int | None = None):
        from contrastive_jax import data as data_lib

        self.config = config
        self.mesh = mesh
        self.batch_axes = tuple(batch_axes)
        self.tokenizer = tokenizer
        self.specs = parse_evaluators(config.eval, config.data)
        self.default_every = int(config.eval.every_steps if default_every_steps is None else default_every_steps)
        self.encoders = make_encoders(model, mesh, self.batch_axes, param_shardings, config.sharding)
        # Image-only models (SimCLR's 'multiview') have no text side: text-based evaluators are
        # dropped and the rest (probes, k-NN, few-shot, diagnostics) run on image embeddings.
        self.has_text = "text" in tuple(getattr(model, "modalities", ("image", "text")))
        if not self.has_text:
            dropped = [s.name for s in self.specs if s.name in TEXT_EVALUATORS]
            if dropped:
                log.warning("model %s has no text modality: skipping evaluators %s",
                            type(model).__name__, dropped)
            self.specs = [s for s in self.specs if s.name not in TEXT_EVALUATORS]
        self._arrays: dict = {}
        self._infos: dict = {}

        def data_config(dataset):
            dc = copy.deepcopy(config.data)
            if dataset != dc.name:
                with dc.unlocked():
                    dc.name = dataset
            return dc

        def load(dataset, split, max_examples):
            key = (dataset, split, max_examples)
            if key not in self._arrays:  # loaded once for the whole run
                self._arrays[key] = data_lib.load_eval_arrays(data_config(dataset), split, tokenizer=tokenizer,
                                                              max_examples=max_examples)
            return self._arrays[key]

        def info(dataset):
            if dataset not in self._infos:
                self._infos[dataset] = data_lib.dataset_info(data_config(dataset))
            return self._infos[dataset]

        self._params = None

        def enc(i):
            def fn(x):
                return to_host(self.encoders[i](self._params, replicated_batch_to_global(x, mesh, self.batch_axes)))
            return fn

        self.evaluation = Evaluation(
            self.specs, encode_image=enc(0), encode_text=enc(1) if self.has_text else None, load_arrays=load,
            dataset_info=info,
            tokenizer=tokenizer, batch_size=int(config.eval.batch_size), recall_ks=tuple(config.eval.recall_ks),
            zero_shot_ks=tuple(config.eval.get("zero_shot_ks", (1, 5))),
            matryoshka_dims=tuple(config.model.get("matryoshka_dims", ()) or ()),
            mesh=mesh, batch_axes=self.batch_axes, image_mean=config.data.mean, image_std=config.data.std)
        # Load every eval set now (and the probes' train features): a missing split or label
        # fails at start-up, not at the end of a long run.
        for s in self.specs:
            load(s.dataset, s.split, s.max_examples)
            if "train_split" in s.options:
                load(s.dataset, s.options["train_split"], int(s.options["train_examples"]))

    def _interval(self, spec: EvaluatorSpec) -> int:
        return self.default_every if spec.every_steps < 0 else spec.every_steps

    def due(self, step: int) -> bool:
        """Whether any evaluator runs at training step ``step`` (the end is always due)."""
        return any(self._interval(s) > 0 and step % self._interval(s) == 0 for s in self.specs)

    def specs_at(self, step: int | None) -> list[EvaluatorSpec]:
        if step is None:
            return list(self.specs)
        return [s for s in self.specs if self._interval(s) > 0 and step % self._interval(s) == 0]

    @property
    def details(self) -> dict:
        return self.evaluation.details

    def __call__(self, params: Any, step: int | None = None) -> dict:
        """Runs the evaluators due at ``step`` (``None``: all of them, as at the end of training).

        Every process must call it (the encoders are SPMD programs); every process gets the same
        results.
        """
        self._params = params
        try:
            return self.evaluation(self.specs_at(step))
        finally:
            self._params = None
