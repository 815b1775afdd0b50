"""Evaluation during (and after) training: sharded encoders plus the evaluators of ``config.eval``.

The training loop builds one :class:`EvalRunner` and calls ``runner(params, step=step)`` whenever
``runner.due(step)``, and ``runner(params)`` (every evaluator) at the end. The runner owns
everything evaluation needs (jitted encoders, the eval sets, prompts), so the loop does not know
which evaluators exist.

Evaluators (``config.eval.evaluators``, see ``docs/evaluation.md``) are the rows of
:data:`EVALUATORS`, which alone decides which names and options are valid, what runs, and the
result-key family each one writes:

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
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from contrastive_jax.data.transforms import denormalize_images
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


@dataclasses.dataclass
class _Run:
    """One evaluator applied to one eval set, within one call of :class:`Evaluation`.

    ``feats`` is the encoded eval set: ``data`` (the arrays ``load_arrays`` returned), ``image``
    float32 ``[N, D]`` L2-normalized and ``raw_image`` before normalization, and, when the set
    has text and the model a text side, ``text`` / ``raw_text`` likewise (row i pairs with
    image i).
    """

    ev: "Evaluation"
    spec: EvaluatorSpec
    feats: dict
    prefix: str  # the evaluator's result-key family, from its EVALUATORS row
    results: dict
    details: dict
    cache: dict  # encoded eval sets of this call, shared by every evaluator

    def put(self, key: str, value, mrl: str = "") -> None:
        """Records ``{tag}{mrl}{prefix}/{key}`` as a float (``mrl``: ``''`` or ``'mrl{d}/'``)."""
        self.results[f"{self.spec.tag}{mrl}{self.prefix}/{key}"] = float(value)

    def features(self, split: str, max_examples: int) -> dict:
        """Another split of this evaluator's dataset, encoded like ``feats`` (once per call)."""
        return self.ev._features(self.cache, self.spec.dataset, split, max_examples)


# -- the evaluators ------------------------------------------------------------------------------
# Each takes a _Run and writes its floats through run.put (and report arrays into run.details).


def _zero_shot_class_embeddings(run: _Run, info: dict, attr: str, names: Sequence[str], prompts) -> np.ndarray:
    """``[C, D]`` float32 unit-norm class embeddings of ``attr``. Precedence: the entry's own
    ``templates``, then the dataset's ready-made ``prompts``, then its templates (``'{}'``)."""
    ev, t = run.ev, run.spec.options["templates"]
    if t is not None:
        templates = load_templates(t) if isinstance(t, str) else list(t)
        return zero_shot_class_embeddings(ev.encode_text, ev.tokenizer, list(names), templates, ev.batch_size)
    if prompts:
        return prompt_class_embeddings(ev.encode_text, ev.tokenizer, prompts, ev.batch_size)
    templates = list(info["templates"].get(attr, ["{}"]))
    return zero_shot_class_embeddings(ev.encode_text, ev.tokenizer, list(names), templates, ev.batch_size)


def _zero_shot(run: _Run) -> None:
    """``{attr}/top{k}`` and ``{attr}/mean_per_class_top1`` (fractions in [0, 1]; multi-label
    ``[N, C]`` labels: ``{attr}/mAP`` and ``{attr}/precision@1``) per labelled attribute, at the
    full size and each Matryoshka prefix; per-class values go to ``details['per_class']``."""
    ev, spec, opts, data = run.ev, run.spec, run.spec.options, run.feats["data"]
    info = ev.dataset_info(spec.dataset)
    ks = tuple(opts["ks"] or ev.zero_shot_ks)
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
        class_emb = _zero_shot_class_embeddings(run, info, attr, names, prompts)
        labels = np.asarray(data[attr])
        for mrl, dim in ev._prefixes(class_emb.shape[1]):
            img, cls = ev._cut(run.feats["image"], dim), ev._cut(class_emb, dim)
            if opts["multi_label"] or labels.ndim == 2:
                acc = zero_shot_multilabel(img, cls, labels)
                per_class, per_class_key = acc.pop("per_class_ap"), "AP"
            else:
                acc = zero_shot_accuracy(img, cls, labels, ks=ks)
                per_class, per_class_key = acc.pop("per_class_top1"), "top-1 accuracy"
            for k, v in acc.items():
                run.put(f"{attr}/{k}", v, mrl)
            if not mrl:
                run.details.setdefault("per_class", {})[f"{spec.tag}{attr}"] = {
                    "names": [str(n) for n in names], "values": np.asarray(per_class, np.float64).tolist(),
                    "metric": per_class_key}


def _retrieval(run: _Run) -> None:
    """``image_to_text/R@{k}``, ``image_to_text/median_rank`` (1 = first) and the same for
    ``text_to_image``, at the full size and each Matryoshka prefix; the run's own eval set also
    leaves its top-5 lists in ``details['retrieval']`` for the report's pictures."""
    ev, spec, feats = run.ev, run.spec, run.feats
    if "text" not in feats:
        raise KeyError(f"eval set {spec.dataset}:{spec.split} has no text: retrieval needs captions")
    data = feats["data"]
    strings = list(data["caption"]) if "caption" in data else None
    ks = tuple(spec.options["ks"] or ev.recall_ks)
    for mrl, dim in ev._prefixes(feats["image"].shape[1]):
        out = retrieval_eval(
            ev._cut(feats["image"], dim), ev._cut(feats["text"], dim), text_strings=strings, ks=ks,
            mesh=ev.mesh, axes=ev.axes, gallery_block=int(spec.options["gallery_block"]),
            query_block=int(spec.options["query_block"]), return_topk=0 if mrl else 5)
        if not mrl and not spec.tag:
            run.details["retrieval"] = {"image_to_text": out.pop("image_to_text/topk"),
                                        "text_to_image": out.pop("text_to_image/topk")}
        for k, v in out.items():
            if np.ndim(v) == 0:  # the top-k arrays of other eval sets are not metrics
                run.put(k, v, mrl)


def _diagnostics(run: _Run) -> None:
    """RankMe, uniformity and norm statistics per side, alignment and the modality gap (see
    :func:`~contrastive_jax.evaluate.diagnostics.representation_diagnostics`)."""
    feats = run.feats
    out = diag.representation_diagnostics(feats["image"], feats.get("text"), raw_image=feats["raw_image"],
                                          raw_text=feats.get("raw_text"), max_items=int(run.spec.options["max_items"]))
    for k, v in out.items():
        run.put(k, v)


def _probe_sets(run: _Run):
    """Yields ``(attr, (train_x [Nt, D], train_y [Nt], test_x [N, D], test_y [N]), num_classes)``
    for each label a probe scores: L2-normalized image features of ``train_examples`` items of
    ``train_split`` and of the eval set, with their int labels; ``num_classes`` None when the
    dataset does not name the classes (then inferred from the labels)."""
    spec, opts, feats = run.spec, run.spec.options, run.feats
    info = run.ev.dataset_info(spec.dataset)
    train_split = opts["train_split"]
    train = run.features(train_split, int(opts["train_examples"]))
    keys = opts["label_keys"] or [k for k in info["label_keys"] if k in feats["data"]]
    for attr in keys:
        for where, data in (("eval", feats["data"]), (train_split, train["data"])):
            if attr not in data:
                raise KeyError(f"{spec.dataset}:{where} has no label array {attr!r} for {spec.name}")
        c = len(info["class_names"].get(attr, [])) or None
        yield attr, (train["image"], train["data"][attr], feats["image"], feats["data"][attr]), c


def _linear_probe(run: _Run) -> None:
    """``{attr}/ridge/top1`` with the chosen ``ridge/alpha``, ``{attr}/logistic/top1`` with the
    chosen ``logistic/l2`` (accuracies in [0, 1])."""
    opts = run.spec.options
    for attr, sets, c in _probe_sets(run):
        ridge = probes.ridge_probe(*sets, alphas=opts["ridge_alphas"], num_classes=c)
        logistic = probes.logistic_probe(*sets, l2_values=opts["logistic_l2"], steps=int(opts["logistic_steps"]),
                                         num_classes=c)
        run.put(f"{attr}/ridge/top1", ridge["top1"])
        run.put(f"{attr}/ridge/alpha", ridge["alpha"])
        run.put(f"{attr}/logistic/top1", logistic["top1"])
        run.put(f"{attr}/logistic/l2", logistic["l2"])


def _knn(run: _Run) -> None:
    """``{attr}/top1``: cosine k-NN accuracy in [0, 1], neighbours searched on the mesh."""
    opts, ev = run.spec.options, run.ev
    temp = opts["temperature"]
    for attr, sets, c in _probe_sets(run):
        out = probes.knn_probe(*sets, k=int(opts["k"]), temperature=None if temp is None else float(temp),
                               num_classes=c, mesh=ev.mesh, axes=ev.axes)
        run.put(f"{attr}/top1", out["top1"])


def _few_shot(run: _Run) -> None:
    """``{attr}/{k}shot/top1`` and ``{attr}/{k}shot/top1_std`` over the seeds, for each k."""
    opts = run.spec.options
    for attr, sets, c in _probe_sets(run):
        out = probes.few_shot_probe(*sets, shots=tuple(opts["shots"]), seeds=int(opts["seeds"]), num_classes=c)
        for k, v in out.items():
            run.put(f"{attr}/{k}", v)


def _captioning(run: _Run) -> None:
    """Decodes a caption for every eval image with the model's decoder (``model.name='coca'``)
    and scores it against the set's caption: BLEU-4, CIDEr-D and exact match
    (:mod:`contrastive_jax.evaluate.captions`), plus ``examples`` in the details."""
    from contrastive_jax.evaluate.captions import caption_metrics

    ev, data = run.ev, run.feats["data"]
    if ev.caption_images is None:
        raise ValueError("eval.evaluators 'captioning' needs a model with a captioning decoder (model.name='coca')")
    if "caption" not in data:
        raise ValueError(f"eval.evaluators 'captioning': dataset {run.spec.dataset!r} has no captions")
    opts = run.spec.options
    ids = encode_in_batches(lambda x: ev.caption_images(x, opts.get("max_len"), int(opts.get("beam_size") or 1)),
                            data["image"], ev.batch_size)
    candidates = list(ev.tokenizer.decode(np.asarray(ids)))
    references = [[str(c)] for c in data["caption"]]
    for key, value in caption_metrics(candidates, references).items():
        run.put(key, value)
    run.details["captions"] = {"candidates": candidates[:8], "references": [r[0] for r in references[:8]]}


def _check_zero_shot(options: Mapping[str, Any]) -> str | None:
    if options["class_names"] is not None and options["label_key"] is None:
        return "class_names needs label_key (the label array they index)"
    return None


class Evaluator(NamedTuple):
    """One row of :data:`EVALUATORS`."""

    defaults: Mapping[str, Any]  # the evaluator's own options (beyond COMMON_KEYS) and defaults
    run: Callable[[_Run], None]
    prefix: str  # result-key family: '{tag}[mrl{d}/]{prefix}/...'
    needs_text: bool = False  # dropped for image-only models
    check: Callable[[Mapping[str, Any]], str | None] | None = None  # a problem with the options, or None


# Keys every evaluator accepts.
COMMON_KEYS = {"name": None, "dataset": None, "split": None, "every_steps": -1, "max_examples": None, "tag": None}
_TRAIN_FEATURES = {"train_split": None, "train_examples": 2000, "label_keys": None}
# name -> (defaults, function, result prefix, ...). The only list of evaluators: validation
# (parse_evaluators), dispatch (Evaluation) and result names all read it. 'zeroshot' and
# 'retrieval' are historical key names.
EVALUATORS: dict[str, Evaluator] = {
    "zero_shot": Evaluator(
        {"ks": None, "class_names": None, "templates": None, "label_key": None, "multi_label": False},
        _zero_shot, "zeroshot", needs_text=True, check=_check_zero_shot),
    "retrieval": Evaluator({"ks": None, "gallery_block": 4096, "query_block": 256}, _retrieval, "retrieval",
                           needs_text=True),
    "diagnostics": Evaluator({"max_items": 8192}, _diagnostics, "diag"),
    "captioning": Evaluator({"max_len": None, "beam_size": 1}, _captioning, "caption", needs_text=True),
    "linear_probe": Evaluator(
        {**_TRAIN_FEATURES, "ridge_alphas": probes.DEFAULT_RIDGE_ALPHAS, "logistic_l2": (1e-6, 1e-5, 1e-4, 1e-3),
         "logistic_steps": 300},
        _linear_probe, "probe"),
    "knn": Evaluator({**_TRAIN_FEATURES, "k": 20, "temperature": 0.07}, _knn, "knn"),
    "few_shot": Evaluator({**_TRAIN_FEATURES, "shots": (1, 5, 10), "seeds": 3}, _few_shot, "fewshot"),
}


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
        row = EVALUATORS[name]
        allowed = {**COMMON_KEYS, **row.defaults}
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
        options = {k: merged[k] for k in row.defaults}
        if "train_split" in options and options["train_split"] is None:
            options["train_split"] = data_config.train_split
        problem = row.check(options) if row.check is not None else None
        if problem:
            raise ValueError(f"{where}: {problem}")
        specs.append(EvaluatorSpec(name, dataset, split, int(merged["every_steps"]), max_examples, tag, options))
    return specs


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


class Evaluation:
    """Runs evaluator specs given host-level encoders and eval arrays; no model, no mesh, and no
    image normalization (the report's pictures are left as ``load_arrays`` gave them).

    Args:
      encode_image / encode_text: ``[batch_size, ...] -> [batch_size, D]`` numpy-readable;
        ``encode_text`` None for image-only models (text features are then not computed).
      load_arrays: ``(dataset, split, max_examples) -> dict`` of arrays (``image``, ``text``,
        ``caption``, int labels), as :func:`contrastive_jax.data.load_eval_arrays` returns.
      dataset_info: ``dataset -> dict`` (``class_names``, ``templates``, ``prompts``,
        ``label_keys``), as :func:`contrastive_jax.data.dataset_info` returns.
      tokenizer: ``encode(list[str]) -> int32 [M, L]``.
      mesh, batch_axes: where retrieval / k-NN shard their galleries (None: one device).
      caption_images: ``(images, max_len, beam_size) -> int32 [n, L]`` caption token ids, for
        the ``captioning`` evaluator (None: the model has no decoder).
      image_mean, image_std: deprecated. Given, the pictures in ``details`` are turned into
        uint8 with them as before; instead, convert them with
        :func:`contrastive_jax.data.transforms.denormalize_images` (:class:`EvalRunner` does, with
        ``config.data.mean/std``).

    After a call, ``details`` holds the arrays the report draws: ``per_class`` (per-class
    zero-shot values), ``heatmap`` (``[m, m]`` cosine similarities of the first m <= 16 pairs
    and their captions) and ``retrieval`` (query ids, top-5 lists, captions, and ``images``:
    ``{row: image [H, W, 3]}`` as in the eval arrays).
    """

    def __init__(self, specs: Sequence[EvaluatorSpec], *, encode_image: Callable, encode_text: Callable | None,
                 load_arrays: Callable, dataset_info: Callable, tokenizer, batch_size: int,
                 recall_ks: Sequence[int] = (1, 5, 10), zero_shot_ks: Sequence[int] = (1, 5),
                 matryoshka_dims: Sequence[int] = (), mesh: Mesh | None = None,
                 batch_axes: Sequence[str] | None = None, image_mean=None, image_std=None,
                 caption_images: Callable | None = None):
        self.specs = list(specs)
        # (images [n, H, W, 3], max_len or None, beam_size) -> token ids [n, L]; captioning models only.
        self.caption_images = caption_images
        self.encode_image, self.encode_text = encode_image, encode_text
        self.load_arrays, self.dataset_info = load_arrays, dataset_info
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.recall_ks, self.zero_shot_ks = tuple(recall_ks), tuple(zero_shot_ks)
        self.matryoshka_dims = tuple(int(d) for d in matryoshka_dims)
        self.mesh, self.axes = mesh, (tuple(batch_axes) if batch_axes else None)
        self._pixels = None  # (mean, std) of the deprecated arguments
        if image_mean is not None or image_std is not None:
            warnings.warn(
                "Evaluation(image_mean=, image_std=) is deprecated: details keep the eval arrays' images; "
                "convert them with contrastive_jax.data.transforms.denormalize_images (EvalRunner does)",
                DeprecationWarning, stacklevel=2)
            default = (0.5, 0.5, 0.5)  # the arguments' former defaults
            self._pixels = (default if image_mean is None else image_mean, default if image_std is None else image_std)
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
        """``[('', None), ('mrl{d}/', d), ...]``: the full size, then each Matryoshka size below it."""
        out = [("", None)]
        for d in self.matryoshka_dims:
            if d < emb_dim:
                out.append((f"mrl{d}/", d))
        return out

    @staticmethod
    def _cut(emb: np.ndarray, dim: int | None) -> np.ndarray:
        return emb if dim is None else diag.matryoshka_prefix(emb, dim)

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
        images = {int(i): data["image"][i] for i in needed}
        if self._pixels is not None:
            images = {i: denormalize_images(img, *self._pixels) for i, img in images.items()}
        details["retrieval"] = {
            "image_queries": q.tolist(), "image_to_text": i2t.tolist(),
            "text_queries": q.tolist(), "text_to_image": t2i.tolist(),
            "captions": {int(i): str(captions[i]) for i in np.unique(np.concatenate([q, i2t.ravel()]))},
            "images": images,
        }

    def __call__(self, specs: Sequence[EvaluatorSpec] | None = None) -> dict[str, float]:
        """Runs ``specs`` (default: all of them): ``{result key: float}``, keys in the order the
        evaluators write them; ``details`` is replaced."""
        specs = self.specs if specs is None else list(specs)
        cache: dict = {}
        results: dict[str, float] = {}
        details: dict = {}
        for spec in specs:
            feats = self._features(cache, spec.dataset, spec.split, spec.max_examples)
            results[f"{spec.tag}num_examples"] = float(feats["image"].shape[0])
            evaluator = EVALUATORS[spec.name]
            evaluator.run(_Run(self, spec, feats, evaluator.prefix, results, details, cache))
        own = [s for s in specs if not s.tag]
        if own:
            self._pictures(self._features(cache, own[0].dataset, own[0].split, own[0].max_examples), details)
        self.details = details
        return results


class EvalRunner:
    """``runner(params, step=None) -> {metric_name: float}`` for the evaluators of ``config.eval``.

    Args:
      config: the run config (reads ``data`` -- including ``mean``/``std``, the images'
        normalization, to turn the report's pictures back into uint8 --, ``eval``,
        ``sharding`` and ``model.matryoshka_dims``).
      model: the built model (``encode_image`` / ``encode_text``, or ``encode(name, x)``).
      mesh, batch_axes: where the encoders run; eval batches and retrieval galleries are split
        over ``batch_axes``.
      param_shardings: shardings of the params tree passed to ``__call__``.
      tokenizer: the run's tokenizer (prompts are tokenized exactly as training captions).
      default_every_steps: the run's evaluation interval in steps for evaluators that do not set
        their own (default ``config.eval.every_steps``; <= 0: only at the end).

    After a call, ``runner.details`` holds the arrays the report draws (per-class accuracy, a
    similarity heatmap, retrieval examples with uint8 ``[H, W, 3]`` images).
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
            dropped = [s.name for s in self.specs if EVALUATORS[s.name].needs_text]
            if dropped:
                log.warning("model %s has no text modality: skipping evaluators %s",
                            type(model).__name__, dropped)
            self.specs = [s for s in self.specs if not EVALUATORS[s.name].needs_text]
        # Every eval set is loaded with config.data's normalization (see data_config below).
        self._mean, self._std = config.data.mean, config.data.std
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

        caption_fns: dict = {}

        def caption(x, max_len, beam_size):
            key = (int(max_len or config.data.max_text_len), int(beam_size))
            if key not in caption_fns:
                eos = int(tokenizer.eos_id)
                caption_fns[key] = jax.jit(lambda p, imgs: model.apply(
                    {"params": p}, imgs, method="caption", max_len=key[0], eos_id=eos, beam_size=key[1]).tokens)
            return to_host(caption_fns[key](self._params, replicated_batch_to_global(x, mesh, self.batch_axes)))

        self.evaluation = Evaluation(
            self.specs, encode_image=enc(0), encode_text=enc(1) if self.has_text else None, load_arrays=load,
            caption_images=caption if getattr(model, "decoder", None) is not None else None,
            dataset_info=info,
            tokenizer=tokenizer, batch_size=int(config.eval.batch_size), recall_ks=tuple(config.eval.recall_ks),
            zero_shot_ks=tuple(config.eval.get("zero_shot_ks", (1, 5))),
            matryoshka_dims=tuple(config.model.get("matryoshka_dims", ()) or ()),
            mesh=mesh, batch_axes=self.batch_axes)
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
            results = self.evaluation(self.specs_at(step))
        finally:
            self._params = None
        pictures = self.evaluation.details.get("retrieval", {}).get("images")
        if pictures is not None:  # the report draws uint8 pixels
            self.evaluation.details["retrieval"]["images"] = {
                i: denormalize_images(img, self._mean, self._std) for i, img in pictures.items()}
        return results
