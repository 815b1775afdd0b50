"""Evaluation: zero-shot classification, retrieval at scale, probes, representation diagnostics,
and the PNG report.

Pure numpy / jax functions on embeddings, plus :class:`EvalRunner` (the evaluators of
``config.eval`` on a model's sharded encoders) and :func:`write_report`.

The public names below are imported on first use (PEP 562), so that importing a light piece
(``contrastive_jax.evaluate.config``, which the run schema imports) does not pull in jax, grain,
TFDS or matplotlib.
"""
from contrastive_jax._lazy import lazy_exports

_EXPORTS = {
    "diagnostics": ("alignment", "matryoshka_prefix", "modality_gap", "norm_stats", "rankme",
                    "representation_diagnostics", "uniformity"),
    "encode": ("encode_in_batches",),
    "metrics": ("true_item_ranks", "zero_shot_accuracy"),
    "probes": ("fit_logistic", "few_shot_probe", "knn_classify", "knn_probe", "logistic_probe", "ridge_probe",
               "sample_k_shot"),
    "retrieval": ("ShardedGallery", "recall_from_ranks", "retrieval_eval", "shard_gallery", "streaming_retrieval"),
    "runner": ("EvalRunner", "Evaluation", "EvaluatorSpec", "make_encoders", "parse_evaluators"),
    "zero_shot": ("average_precision", "l2_normalize_np", "load_templates", "prompt_class_embeddings", "read_lines",
                  "zero_shot_class_embeddings", "zero_shot_multilabel"),
    "report": ("write_report",),
    "captions": ("bleu", "caption_metrics", "cider_d", "exact_match", "tokenize"),
}
# Submodules resolve as attributes too (``evaluate.retrieval``), as when this file imported them.
_SUBMODULES = ("captions", "config", "diagnostics", "encode", "metrics", "probes", "report", "retrieval", "runner", "zero_shot")

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _SUBMODULES)
