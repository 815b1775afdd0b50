"""The standard zero-shot / retrieval / compositional benchmark suite, by dataset name.

``contrastive-jax benchmark`` (:mod:`contrastive_jax.commands.benchmark`) is the entry point;
:func:`run_benchmark` does the work on a :class:`contrastive_jax.api.Model`:

    from contrastive_jax.evaluate.benchmark import run_benchmark
    rows = run_benchmark(model, ["cifar10", "mscoco_captions"], data_dir="~/tensorflow_datasets")

Modules: :mod:`.datasets` (the name -> task / source / class names / templates table and the
suites), :mod:`.sources` (TFDS and CLIP_benchmark-WebDataset readers), :mod:`.runner` (sharded
encoding and metrics), :mod:`.table` (JSON / CSV / text table / PNG), and ``compositional``
(SugarCrepe, ARO, Winoground). Names are imported on first use, so importing this package pulls
in neither jax nor TFDS.
"""
from contrastive_jax._lazy import lazy_exports

_EXPORTS = {
    "runner": ("run_benchmark", "ShardedEncoder", "classification_metrics", "retrieval_metrics"),
    "datasets": ("DATASETS", "SUITES", "suite_names"),
    "table": ("csv_text", "format_table", "plot"),
}
_SUBMODULES = ("datasets", "sources", "runner", "table", "compositional")

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _SUBMODULES)
