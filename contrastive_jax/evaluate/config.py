"""Schema of ``config.eval``: what is evaluated, how often and on how much data.

Merged into the run schema by :func:`contrastive_jax.train.config.default_config` as
``config.eval``; this package owns these fields. ``evaluators`` is a list whose entries are
validated by :func:`contrastive_jax.evaluate.runner.parse_evaluators` against the evaluator table
``contrastive_jax.evaluate.runner.EVALUATORS`` (unknown names or keys are errors naming
``config.eval.evaluators[i]``); see ``docs/evaluation.md`` for every option.

Deliberately light (only ml_collections): the run schema imports it.
"""
from __future__ import annotations

import ml_collections


def default_evaluators() -> list:
    """Zero-shot, retrieval and diagnostics at every evaluation; probes only at the end (they
    encode part of the train split as well)."""
    return [
        dict(name="zero_shot"),
        dict(name="retrieval"),
        dict(name="diagnostics"),
        dict(name="linear_probe", every_steps=0),
        dict(name="knn", every_steps=0),
        dict(name="few_shot", every_steps=0),
    ]


def defaults() -> ml_collections.ConfigDict:
    """Every ``config.eval`` field with its default."""
    c = ml_collections.ConfigDict()
    # Evaluation interval during training: set at most one (none set: only at the end).
    c.every_steps = -1
    c.every_epochs = -1.0
    c.every_examples = -1
    c.batch_size = 512  # global eval batch; the last batch is padded and the padding dropped
    c.max_examples = -1  # -1: the whole split
    c.recall_ks = (1, 5, 10)  # retrieval recall@k cut-offs
    c.zero_shot_ks = (1, 5)  # zero-shot top-k accuracies
    # Each entry: a name ('zero_shot', 'retrieval', 'diagnostics', 'linear_probe', 'knn',
    # 'few_shot') or a dict with 'name' plus common keys (dataset, split, every_steps: -1 = the
    # run's interval, 0 = only at the end, N = every N steps; max_examples; tag) and the
    # evaluator's own options.
    c.evaluators = default_evaluators()
    # Write the PNG report (curves, heatmap, retrieval grid, per-class bars) at the end of training.
    c.write_report = True
    return c
