"""Data: the built-in ``shapes`` TFDS dataset, user datasets, grain pipelines and tokenizers.

Nothing here imports TensorFlow: datasets are array_record files read through
``tfds.data_source`` and images are PNG-decoded with PIL.
"""
from contrastive_jax.data import shapes
from contrastive_jax.data.pipeline import (
    SKIP_REASONS,
    DataQualityError,
    ExampleProcessor,
    TrainIterator,
    load_eval_arrays,
    make_train_iterator,
    normalize_images,
)
from contrastive_jax.data.registry import (
    DatasetEntry,
    available_datasets,
    build_dataset,
    dataset_info,
    get_dataset,
    register_dataset,
    resolve_dataset,
)
from contrastive_jax.data.shapes import (
    ATTRIBUTES,
    CAPTION_TEMPLATES,
    HELD_OUT_PAIRS,
    ZERO_SHOT_TEMPLATES,
    held_out_pairs,
    zero_shot_prompts,
)
from contrastive_jax.data.tokenizer import (
    ClipBpeTokenizer,
    SentencePieceTokenizer,
    TextRules,
    Tokenizer,
    WordTokenizer,
    build_tokenizer,
    load_tokenizer,
    train_sentencepiece,
    normalize_text,
    split_words,
)

__all__ = [
    "ClipBpeTokenizer",
    "DataQualityError",
    "ExampleProcessor",
    "SKIP_REASONS",
    "SentencePieceTokenizer",
    "TextRules",
    "TrainIterator",
    "load_tokenizer",
    "resolve_dataset",
    "train_sentencepiece",
    "ATTRIBUTES",
    "CAPTION_TEMPLATES",
    "DatasetEntry",
    "HELD_OUT_PAIRS",
    "Tokenizer",
    "WordTokenizer",
    "ZERO_SHOT_TEMPLATES",
    "available_datasets",
    "build_dataset",
    "dataset_info",
    "build_tokenizer",
    "get_dataset",
    "held_out_pairs",
    "load_eval_arrays",
    "make_train_iterator",
    "normalize_images",
    "normalize_text",
    "register_dataset",
    "shapes",
    "split_words",
    "zero_shot_prompts",
]
