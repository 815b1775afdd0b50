"""Evaluation: zero-shot classification, retrieval at scale, probes, representation diagnostics,
and the PNG report.

Pure numpy / jax functions on embeddings, plus :class:`EvalRunner` (the evaluators of
``config.eval`` on a model's sharded encoders) and :func:`write_report`.
"""
from contrastive_jax.evaluate.diagnostics import (
    alignment,
    matryoshka_prefix,
    modality_gap,
    norm_stats,
    rankme,
    representation_diagnostics,
    uniformity,
)
from contrastive_jax.evaluate.encode import encode_in_batches
from contrastive_jax.evaluate.metrics import retrieval_metrics, true_item_ranks, zero_shot_accuracy
from contrastive_jax.evaluate.probes import (
    fit_logistic,
    few_shot_probe,
    knn_classify,
    knn_probe,
    logistic_probe,
    ridge_probe,
    sample_k_shot,
)
from contrastive_jax.evaluate.retrieval import (
    ShardedGallery,
    recall_from_ranks,
    retrieval_eval,
    shard_gallery,
    streaming_retrieval,
)
from contrastive_jax.evaluate.runner import EvalRunner, Evaluation, EvaluatorSpec, make_encoders, parse_evaluators
from contrastive_jax.evaluate.two_tower import evaluate_two_tower
from contrastive_jax.evaluate.zero_shot import (
    average_precision,
    l2_normalize_np,
    load_templates,
    prompt_class_embeddings,
    read_lines,
    zero_shot_class_embeddings,
    zero_shot_multilabel,
)


def write_report(*args, **kwargs):
    """See :func:`contrastive_jax.evaluate.report.write_report` (imported lazily: matplotlib)."""
    from contrastive_jax.evaluate.report import write_report as _write_report

    return _write_report(*args, **kwargs)


__all__ = [
    "EvalRunner",
    "Evaluation",
    "EvaluatorSpec",
    "ShardedGallery",
    "alignment",
    "average_precision",
    "encode_in_batches",
    "evaluate_two_tower",
    "few_shot_probe",
    "fit_logistic",
    "knn_classify",
    "knn_probe",
    "l2_normalize_np",
    "load_templates",
    "logistic_probe",
    "make_encoders",
    "matryoshka_prefix",
    "modality_gap",
    "norm_stats",
    "parse_evaluators",
    "prompt_class_embeddings",
    "rankme",
    "read_lines",
    "recall_from_ranks",
    "representation_diagnostics",
    "retrieval_eval",
    "retrieval_metrics",
    "ridge_probe",
    "sample_k_shot",
    "shard_gallery",
    "streaming_retrieval",
    "true_item_ranks",
    "uniformity",
    "write_report",
    "zero_shot_accuracy",
    "zero_shot_class_embeddings",
    "zero_shot_multilabel",
]
