"""Data: the built-in ``shapes`` TFDS dataset, user datasets, grain pipelines and tokenizers.

Nothing here imports TensorFlow: datasets are array_record files read through
``tfds.data_source`` and images are PNG-decoded with PIL.

The public names below are imported on first use (PEP 562), so that importing a light piece
(``contrastive_jax.data.config``, ``contrastive_jax.data.transforms``, a tokenizer) does not pull
in grain or TFDS.
"""
import importlib

_EXPORTS = {
    "pipeline": ("SKIP_REASONS", "DataQualityError", "ExampleProcessor", "TrainIterator", "load_eval_arrays",
                 "make_train_iterator"),
    "transforms": ("normalize_images", "denormalize_images"),
    "registry": ("DatasetEntry", "available_datasets", "build_dataset", "dataset_info", "get_dataset",
                 "register_dataset", "resolve_dataset"),
    "shapes": ("ATTRIBUTES", "CAPTION_TEMPLATES", "HELD_OUT_PAIRS", "ZERO_SHOT_TEMPLATES", "held_out_pairs",
               "zero_shot_prompts"),
    "tokenizer": ("ClipBpeTokenizer", "SentencePieceTokenizer", "TextRules", "Tokenizer", "WordTokenizer",
                  "build_tokenizer", "load_tokenizer", "train_sentencepiece", "normalize_text", "split_words"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE) + ["shapes"]


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    if name == "shapes":
        return importlib.import_module(f"{__name__}.shapes")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
