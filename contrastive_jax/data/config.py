"""Schema of ``config.data``: which dataset, where it lives, and how examples are preprocessed.

Merged into the run schema by :func:`contrastive_jax.train.config.default_config` as
``config.data``; this package owns these fields. Every preprocessing choice that changes what the
model sees (crop, colour, text rules) is a field here, so a run's ``config.json`` records it.
"""
from __future__ import annotations

import os

import ml_collections


def augment_defaults() -> ml_collections.ConfigDict:
    """``config.data.augment``: the training-image recipe (evaluation never augments).

    The defaults do nothing beyond fitting the image to ``image_size``. The SimCLR recipe (Chen et
    al. 2020, appendix A) is ``crop='random_resized_crop', crop_scale=(0.08, 1.0),
    flip_prob=0.5, jitter_prob=0.8, brightness=contrast=saturation=0.4, hue=0.1,
    grayscale_prob=0.2, blur_prob=0.5, blur_sigma=(0.1, 2.0)`` (BYOL adds ``solarize_prob=0.2``).
    Operations run in that order: crop, flip, colour jitter, grayscale, blur, solarize.
    """
    a = ml_collections.ConfigDict()
    # 'resize': shorter side to image_size, centre crop (the eval transform);
    # 'random_resized_crop': Inception-style crop of a random area/aspect, resized to image_size.
    a.crop = "resize"
    a.crop_scale = (0.08, 1.0)  # random_resized_crop: fraction of the image area kept
    a.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)  # random_resized_crop: width / height, log-uniform
    a.flip_prob = 0.0  # horizontal flip
    a.jitter_prob = 0.0  # probability of applying colour jitter at all
    a.brightness = 0.4  # jitter strengths: factor drawn from [1 - s, 1 + s]
    a.contrast = 0.4
    a.saturation = 0.4
    a.hue = 0.1  # hue shift drawn from [-hue, hue], in turns (0.5 = 180 degrees)
    a.grayscale_prob = 0.0
    a.blur_prob = 0.0
    a.blur_sigma = (0.1, 2.0)  # Gaussian blur sigma range, in pixels of the output image
    a.solarize_prob = 0.0
    a.solarize_threshold = 128  # pixels >= threshold (0..255) are inverted
    # Multi-crop local views (data.local_views >= 1): always random_resized_crop, with this
    # fraction of the image area (SwAV: (0.05, 0.14) against (0.14, 1.0) for the global crops),
    # then the recipe's other operations with the same probabilities.
    a.local_crop_scale = (0.05, 0.14)
    return a


def tokenizer_defaults() -> ml_collections.ConfigDict:
    """``config.data.tokenizer``: which tokenizer and its text rules.

    The rules are saved with the tokenizer in ``WORKDIR/tokenizer.json``, so evaluation and later
    loading tokenize exactly as training did.
    """
    t = ml_collections.ConfigDict()
    # 'auto': the dataset's word vocabulary (shapes; user datasets converted by
    # `contrastive-jax data convert` carry one); 'word'; 'sentencepiece' (path = .model file or a
    # saved tokenizer .json); 'clip_bpe' (path = merges file, e.g. bpe_simple_vocab_16e6.txt.gz).
    t.kind = "auto"
    t.path = ""  # local file; never downloaded
    t.lowercase = True
    # 'none' | 'whitespace' (collapse runs of whitespace, strip) | 'basic' (also HTML-unescape and
    # Unicode NFC normalization) | 'clip' (open_clip's cleaning: ftfy, HTML-unescape twice,
    # whitespace; the default of clip_bpe tokenizers).
    t.clean = "whitespace"
    # Append EOS after the tokens (truncation keeps room for it); the causal text tower pools there.
    t.add_eos = True
    t.bpe_merges = -1  # clip_bpe: use the first N merges of the file (OpenAI CLIP: 48894); -1 all
    return t


def defaults() -> ml_collections.ConfigDict:
    """Every ``config.data`` field with its default."""
    c = ml_collections.ConfigDict()
    # A registered dataset ('shapes'), or any TFDS dataset prepared under data_dir (what
    # `contrastive-jax data convert` writes), optionally 'name/config:version'.
    c.name = "shapes"
    c.data_dir = os.path.join("~", ".cache", "contrastive_jax", "tfds")
    c.train_split = "train"
    c.eval_split = "test"
    c.image_size = 64  # pixels; images are resized / cropped to image_size x image_size
    c.num_train = 20000  # shapes: examples in the train split
    c.num_validation = 1000
    c.num_test = 2000
    c.dataset_seed = 0  # shapes: seed of the procedural generator
    c.shuffle_seed = 0  # also seeds augmentations and caption sampling
    c.worker_count = 0  # grain worker processes (0 = in the main process)
    c.read_threads = 4  # threads decoding batches ahead of the consumer (per process)
    c.prefetch_batches = 4  # host batches those threads may hold
    c.max_text_len = 16  # tokens, including EOS
    c.mean = (0.5, 0.5, 0.5)  # normalization: (x / 255 - mean) / std per RGB channel
    c.std = (0.5, 0.5, 0.5)
    # Training batches keep uint8 images and the jitted step normalizes each (micro-)batch on
    # device: 4x less host->device traffic and batch memory (what lets GradCache batches grow).
    c.normalize_on_device = False
    # Keep the training split's records in memory once read (parsed, before decoding/augmenting),
    # in each process that reads them: later epochs skip the read and the parse. For splits
    # that fit in RAM (the quickstart's 20,000 shapes: ~0.2 GB).
    c.cache_raw = False

    # Fields of TFDS datasets loaded by name ('' = automatic: 'image'; 'captions' or 'caption').
    c.image_key = ""
    c.text_key = ""
    # Int label features carried into batches (and used for zero-shot evaluation when they are
    # ClassLabels); () = every ClassLabel feature of a TFDS dataset.
    c.label_keys = ()

    # Text: 'random' picks one of an image's non-empty captions per visit (seeded by position in
    # the stream); 'first' always the first. Evaluation always uses the first.
    c.caption_policy = "random"
    # Token masking: each caption token (not EOS/padding) is replaced by the tokenizer's mask id
    # with this probability during training.
    c.text_mask_prob = 0.0

    # Views of each training image: >= 2 adds 'image_views' [B, V, H, W, 3] (SimCLR).
    c.num_views = 1
    # Multi-crop (Caron et al. 2020, SwAV): local_views >= 1 adds 'image_local_views'
    # [B, N, s, s, 3], N small crops of side s = local_view_size pixels (< image_size; crop area
    # augment.local_crop_scale) next to the num_views global crops. Training only.
    c.local_views = 0
    c.local_view_size = 32
    c.augment = augment_defaults()
    c.tokenizer = tokenizer_defaults()

    # Streaming shards instead of a prepared dataset (docs/data.md): with name='sources', a list of
    # {path, format, weight, name, image_key, text_key, filters}; path = a glob, a brace range
    # ('shard-{00000..41454}.tar') or a list, local or s3:// / gs://; format 'webdataset' |
    # 'parquet' | 'array_record'; filters e.g. ['json.similarity >= 0.28'] (before decoding).
    c.sources = ()
    c.eval_sources = ()  # same form (weights unused): the evaluation split, read whole in order
    # Lanes of the stream (0 = one per host): fixed lanes give the same global batches on any number
    # of hosts dividing them; each lane reads shards [lane::lanes] of every source.
    c.stream_lanes = 0
    c.shuffle_buffer = 1000  # records per (lane, source) shuffled together (a window, exactly resumable)
    c.resample = False  # draw shards with replacement, no epochs (open_clip's --dataset-resampled)
    c.stream_examples = -1  # size of the streamed training set for *_epochs; -1 = count / estimate

    # Records that fail (undecodable image, empty caption) are replaced by the next good record
    # and counted; more than this fraction of failures stops the run with an error.
    c.max_bad_fraction = 0.05
    return c


def complete(data_config) -> ml_collections.ConfigDict:
    """``data_config`` with every missing field taken from :func:`defaults`, for partial configs
    built by hand (notebooks); a full run config comes back unchanged (as a copy)."""
    def fill(base: ml_collections.ConfigDict, given) -> ml_collections.ConfigDict:
        for key, value in given.items():
            if isinstance(base.get(key), ml_collections.ConfigDict) and hasattr(value, "items"):
                fill(base[key], value)
            else:
                with base.unlocked():
                    base[key] = value
        return base

    return fill(defaults(), data_config)
