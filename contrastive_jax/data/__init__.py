"""Data: the built-in ``shapes`` TFDS dataset, user datasets, grain pipelines and tokenizers.

Nothing here imports TensorFlow: datasets are array_record files read through
``tfds.data_source`` and images are PNG-decoded with PIL.

The public names below are imported on first use (PEP 562), so that importing a light piece
(``contrastive_jax.data.config``, ``contrastive_jax.data.transforms``, a tokenizer) does not pull
in grain or TFDS.
"""
from contrastive_jax._lazy import lazy_exports

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

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, ("shapes",))
__all__ += ["shapes"]  # `from contrastive_jax.data import *` brings the built-in dataset module too
