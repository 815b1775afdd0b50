"""The notebook API: load a model from a training run or a PyTorch CLIP checkpoint and embed.

    import contrastive_jax
    model = contrastive_jax.load("runs/quickstart")        # or "ViT-B-32.pt", vocab="bpe_simple_vocab_16e6.txt.gz"
    image_emb = model.encode_images(images)                # uint8 [N, H, W, 3] -> float32 [N, D], unit norm
    text_emb = model.encode_texts(["a photo of a dog"])    # -> float32 [N, D], unit norm
    classify = model.zero_shot_classifier(["dog", "cat"], ["a photo of a {}."])
    probs = classify(images)                                # float32 [N, 2]

Everything runs on one device (the first of this process: a CPU, or a GPU if jax has one), with
no config file and no mesh; the config a model needs comes with it (a run's ``config.json``, or
the one :mod:`contrastive_jax.interop` derives from a checkpoint).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_DEFAULT_TEMPLATES = ("a photo of a {}.",)


def load(path: str | os.PathLike, *, step: int | None = None, ema: bool = False,
         vocab: str | os.PathLike | None = None, **convert_options: Any) -> "Model":
    """Loads a model for encoding.

    Args:
      path: a training workdir or a model directory (``contrastive-jax convert`` /
        :meth:`Model.save`), a PyTorch CLIP checkpoint file (``.pt`` / ``.bin`` /
        ``.safetensors`` of OpenAI CLIP or open_clip, converted on the fly), or a Hugging Face
        ``transformers`` CLIPModel / SiglipModel ``save_pretrained`` folder (``config.json`` with a
        ``model_type``, ``model.safetensors``, tokenizer files; converted on the fly, see
        :mod:`contrastive_jax.interop.hf`).
      step: checkpoint step of a directory (None: the newest readable one).
      ema: a directory's EMA parameters instead of the trained ones.
      vocab: CLIP's BPE merges file, for checkpoint files (and directories saved without a
        tokenizer); ``encode_texts`` needs a tokenizer.
      convert_options: for checkpoint files, passed to
        :func:`contrastive_jax.interop.load_clip_checkpoint` (``act``, ``layout``,
        ``image_heads``, ``text_heads``, ``open_clip_config``).
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    from contrastive_jax.interop.hf import reads_as_hf_folder

    if reads_as_hf_folder(path):
        return _load_hf(path, step=step, ema=ema, vocab=vocab, **convert_options)
    from contrastive_jax.interop.clip import find_open_clip_weights  # issue 16 (helper A)

    path = find_open_clip_weights(path) or path  # an open_clip hub folder is read as its weights file
    if os.path.isdir(path):
        from contrastive_jax.train.restore import load_run

        if convert_options:
            raise TypeError(f"{sorted(convert_options)} apply to checkpoint files, not to the directory {path}")
        config, module, params, tokenizer = load_run(path, step, ema=ema)
        if vocab is not None:
            from contrastive_jax.interop.clip import clip_tokenizer

            text = config.model.text
            tokenizer = clip_tokenizer(vocab, int(text.vocab_size), int(text.context_length))
        return Model(config, module, params, tokenizer)
    if os.path.isfile(path):
        if step is not None or ema:
            raise TypeError("step= and ema= apply to directories; a checkpoint file has one set of weights")
        from contrastive_jax import models
        from contrastive_jax.interop import load_clip_checkpoint

        ckpt = load_clip_checkpoint(path, vocab=vocab, **convert_options)
        module = models.build(ckpt.config.model)
        params = jax.device_put(ckpt.params, jax.local_devices()[0])
        return Model(ckpt.config, module, params, ckpt.tokenizer)
    raise FileNotFoundError(f"{path}: neither a run/model directory nor a checkpoint file")


def _load_hf(path: str, *, step, ema, vocab, **convert_options) -> "Model":
    """A transformers CLIPModel / SiglipModel ``save_pretrained`` folder, converted on the fly."""
    if step is not None or ema or vocab is not None:
        raise TypeError(f"step=, ema= and vocab= do not apply to the transformers folder {path} (its tokenizer "
                        "files are read from it)")
    unknown = sorted(set(convert_options) - {"scan"})
    if unknown:
        raise TypeError(f"{unknown} do not apply to a transformers folder (it says its architecture); known: scan")
    from contrastive_jax import models
    from contrastive_jax.interop.hf import load_hf_folder

    ckpt = load_hf_folder(path, **convert_options)
    module = models.build(ckpt.config.model)
    params = jax.device_put(ckpt.params, jax.local_devices()[0])
    return Model(ckpt.config, module, params, ckpt.tokenizer)


def _check_texts(texts: Any, what: str) -> list[str]:
    """A list of str, or TypeError naming the argument (and the index of the first non-string).
    One string is refused: iterating it would silently make one item per character."""
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{what} must be a list of strings, got one string {texts[:40]!r}; wrap it: [{texts[:40]!r}]")
    if not isinstance(texts, Sequence) and not isinstance(texts, np.ndarray):
        raise TypeError(f"{what} must be a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] must be a str, got {type(t).__name__} {t!r:.40}")
    return texts


def _rescale(arr: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray:
    """Float images -> float32 in [0, 1] (from ``value_range``, default (0, 1)); uint8 unchanged.
    Raises ValueError for values outside the range (0..255 floats read as 0..1 embed wrongly)."""
    if arr.dtype == np.uint8:
        if value_range is not None and tuple(value_range) != (0, 255):
            raise ValueError(f"value_range={value_range} does not apply to uint8 images (always 0..255)")
        return arr
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"images must be uint8 or float arrays, got dtype {arr.dtype}")
    lo, hi = (0.0, 1.0) if value_range is None else (float(value_range[0]), float(value_range[1]))
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    arr = arr.astype(np.float32)
    if arr.size and (arr.min() < lo - 1e-3 * (hi - lo) or arr.max() > hi + 1e-3 * (hi - lo)):
        hint = " (pass value_range=(0, 255) for 0..255 floats, or uint8)" if value_range is None else ""
        raise ValueError(f"float image values span [{arr.min():g}, {arr.max():g}], outside "
                         f"value_range=({lo:g}, {hi:g}){hint}")
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0) if value_range is not None else arr


def _as_rgb(arr: np.ndarray, *, batched: bool) -> np.ndarray:
    """``[N, H, W(, 1|3)]`` (batched) or ``[H, W(, 1|3)]`` -> ``[N, H, W, 3]`` / ``[H, W, 3]``:
    grayscale repeated to 3 channels. Batched input of rank 3 is ``[N, H, W]`` gray unless its last
    axis is 3 (then one ``[H, W, 3]`` image, as before)."""
    shape = arr.shape
    if batched:
        if arr.ndim == 2:  # [H, W] one gray image
            arr = arr[None, ..., None]
        elif arr.ndim == 3:
            arr = arr[None] if shape[-1] == 3 else arr[..., None]
        if arr.ndim != 4:
            raise ValueError(f"images must be [N, H, W, 3], [H, W, 3], [N, H, W] or [H, W], got shape {shape}")
    else:
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3:
            raise ValueError(f"an image must be [H, W, 3] or [H, W], got shape {shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] != 3:
        raise ValueError(f"images need 1 or 3 channels (last axis), got shape {shape}")
    return arr


def _bucket(n: int, batch_size: int) -> int:
    """Rows per encode call: the next power of two >= n, capped at batch_size (few compiles,
    little padding)."""
    return max(1, min(batch_size, 1 << max(n - 1, 0).bit_length()))


class Model:
    """A loaded model with numpy-in, numpy-out encoders.

    Attributes:
      config: the run config (``model``, ``data.image_size``, ``data.mean/std``, tokenizer rules).
      module: the flax module; params: its parameters (on one device); tokenizer: or None.
      image_size: input resolution (pixels); images of another size are resized (shorter side,
        bicubic) and centre-cropped, as evaluation does.
    """

    def __init__(self, config, module, params, tokenizer=None):
        self.config, self.module, self.params, self.tokenizer = config, module, params, tokenizer
        self.image_size = int(config.data.image_size)
        self._encode = jax.jit(lambda p, name, x: module.apply({"params": p}, name, x, method="encode"),
                               static_argnums=1)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.module.modalities)

    @property
    def logit_scale(self) -> float:
        """The learned temperature's inverse, ``exp(log_scale)`` clamped at ``model.max_scale``."""
        return float(min(np.exp(np.asarray(self.params["log_scale"])), float(self.config.model.max_scale)))

    @property
    def activation(self) -> str:
        """``'sigmoid'`` for models trained with a sigmoid loss (SigLIP: per-pair probabilities
        ``sigmoid(scale * cos + bias)``), else ``'softmax'`` (CLIP: a distribution over classes)."""
        loss = getattr(self.config, "loss", None)
        name = str(loss.get("name", "") if hasattr(loss, "get") else getattr(loss, "name", "")) if loss is not None else ""
        return "sigmoid" if name.startswith("sigmoid") else "softmax"

    @property
    def logit_bias(self) -> float:
        """The learned logit bias (``params['bias']``; 0.0 when the model has none)."""
        return float(np.asarray(self.params["bias"])) if "bias" in self.params else 0.0

    def __repr__(self) -> str:
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
        return (f"Model({type(self.module).__name__}, modalities={self.modalities}, params={n:,}, "
                f"image_size={self.image_size}, tokenizer={self.tokenizer!r})")

    def save(self, directory: str) -> str:
        """Writes a model directory (config, tokenizer, params) that :func:`load`, ``contrastive-jax
        eval --checkpoint`` and ``checkpoint.init_from`` read."""
        from contrastive_jax.train.restore import write_model_dir

        return write_model_dir(directory, self.config, self.params, self.tokenizer)

    def export(self, path: str, *, format: str = "state_dict", layout: str = "openai",
               dtype: Any = np.float32) -> dict | None:
        """Writes the model for PyTorch.

        Args:
          format: ``'state_dict'``: the params as a PyTorch CLIP state dict file (``.safetensors`` /
            ``.pt`` / ``.bin``) of OpenAI's or open_clip's key ``layout``
            (:func:`contrastive_jax.interop.save_clip_checkpoint`); ``'hf'``: a new folder ``path``
            that ``transformers.AutoModel.from_pretrained`` loads as CLIPModel or SiglipModel
            (``config.json``, ``model.safetensors`` float32, the tokenizer's files when it came from
            a transformers folder; :func:`contrastive_jax.interop.hf.export_hf_folder`), whose
            summary is returned.
        """
        if format == "hf":
            from contrastive_jax.interop.hf import export_hf_folder

            if np.dtype(dtype) != np.float32:
                raise ValueError(f"format='hf' writes float32 (got dtype={np.dtype(dtype)})")
            return export_hf_folder(path, self.params, self.config, self.tokenizer)
        if format != "state_dict":
            raise ValueError(f"format={format!r}; known: 'state_dict', 'hf'")
        from contrastive_jax.interop import save_clip_checkpoint

        save_clip_checkpoint(path, self.params, self.config, layout=layout, dtype=dtype)
        return None

    # -- inputs ------------------------------------------------------------------------------

    def preprocess_images(self, images: Any, *, value_range: tuple[float, float] | None = None) -> np.ndarray:
        """Images -> float32 ``[N, S, S, 3]`` normalized with ``config.data.mean/std``.

        Accepts a uint8 array (0..255) or a float array (0..1) of shape ``[N, H, W, 3]`` or
        ``[H, W, 3]``, or a list of such arrays, PIL images or file paths. Grayscale / RGBA inputs
        of PIL images and files are converted to RGB; arrays of another size are resized and
        centre-cropped (floats go through uint8 for that). Grayscale arrays ``[N, H, W]`` / ``[H, W]``
        (or a trailing channel of 1) are expanded to 3 channels. Float images must lie in [0, 1]
        unless ``value_range=(lo, hi)`` says otherwise (e.g. ``(0, 255)``): they are rescaled to
        [0, 1]; values outside the range raise ``ValueError`` (read as 0..1 they would embed wrongly).
        """
        if isinstance(images, (np.ndarray, jax.Array)):
            arr = _as_rgb(_rescale(np.asarray(images), value_range), batched=True)
            if arr.shape[1:3] == (self.image_size, self.image_size):
                return self._normalize(arr)
            images, value_range = list(arr), None  # already rescaled to 0..1 above
        if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
            raise TypeError("images: an array [N, H, W, 3] or a list of arrays / PIL images / paths, "
                            f"got {type(images).__name__}")
        if not len(images):
            return np.zeros((0, self.image_size, self.image_size, 3), np.float32)
        # Per image: a list may mix uint8 and float images, which normalize differently.
        return np.stack([self._normalize(self._fit(img, value_range)) for img in images])

    def _fit(self, img: Any, value_range: tuple[float, float] | None = None) -> np.ndarray:
        from PIL import Image

        from contrastive_jax.data.transforms import resize_center_crop

        if isinstance(img, (str, os.PathLike)):
            with Image.open(img) as f:
                img = f.convert("RGB")
        elif isinstance(img, Image.Image):
            img = img.convert("RGB")
        else:
            arr = _as_rgb(_rescale(np.asarray(img), value_range), batched=False)
            if arr.shape[:2] == (self.image_size, self.image_size):
                return arr
            if arr.dtype != np.uint8:
                arr = np.clip(np.round(arr.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
        return np.asarray(resize_center_crop(img, self.image_size))

    def _normalize(self, arr: np.ndarray) -> np.ndarray:
        """uint8 (0..255) or float (0..1) ``[..., 3]`` -> float32 normalized with mean/std, as the
        data pipeline does (:func:`contrastive_jax.data.transforms.normalize_images`)."""
        from contrastive_jax.data.transforms import normalize_images

        return normalize_images(np.asarray(arr), self.config.data.mean, self.config.data.std)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> int32 ``[N, L]`` with the model's tokenizer and text rules."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass vocab='bpe_simple_vocab_16e6.txt.gz' (CLIP's "
                             "merges file) to contrastive_jax.load")
        return np.asarray(self.tokenizer.encode(_check_texts(texts, "texts")), np.int32)

    # -- encoders ----------------------------------------------------------------------------

    def _encoder(self, name: str):
        """``[B, ...] -> [B, D]`` of modality ``name`` with this model's params (jitted)."""
        if name not in self.modalities:
            raise ValueError(f"this model has no {name!r} modality (it has {self.modalities})")
        return lambda batch: self._encode(self.params, name, jnp.asarray(batch))

    def _run(self, name: str, x: np.ndarray, batch_size: int) -> np.ndarray:
        encode = self._encoder(name)
        if x.shape[0] == 0:
            return np.zeros((0, int(self.config.model.embed_dim)), np.float32)
        from contrastive_jax.evaluate.encode import encode_in_batches

        return encode_in_batches(encode, x, _bucket(x.shape[0], batch_size))

    def encode_images(self, images: Any, *, batch_size: int = 128,
                      value_range: tuple[float, float] | None = None) -> np.ndarray:
        """Images (see :meth:`preprocess_images`, also for ``value_range``) -> float32 ``[N, D]``,
        unit L2 norm."""
        self._encoder("image")  # a model without images fails before any preprocessing
        return self._run("image", self.preprocess_images(images, value_range=value_range), batch_size)

    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 256) -> np.ndarray:
        """``list[str]`` -> float32 ``[N, D]``, unit L2 norm."""
        self._encoder("text")  # a model without text fails before tokenizing
        return self._run("text", self.tokenize(texts), batch_size)

    def caption(self, images: Any, *, max_len: int | None = None, beam_size: int = 1, alpha: float = 0.0,
                batch_size: int = 64, value_range: tuple[float, float] | None = None) -> list[str]:
        """Captions of ``images`` (see :meth:`preprocess_images`) from the model's decoder
        (``model.name='coca'``): greedy (``beam_size=1``) or beam search with length penalty
        ``alpha``; ``max_len`` tokens at most (default: the text length the model was trained
        with). Returns one string per image, decoded by the model's tokenizer."""
        if getattr(self.module, "decoder", None) is None:
            raise ValueError(f"this model has no captioning decoder (model.name={self.config.model.name!r}); "
                             "train one with model.name='coca'")
        if self.tokenizer is None:
            raise ValueError("captioning needs the model's tokenizer (its EOS id and vocabulary)")
        max_len = int(max_len or self.config.data.max_text_len)
        eos = int(self.tokenizer.eos_id)
        key = (max_len, beam_size, float(alpha))
        cache = self.__dict__.setdefault("_caption_fns", {})
        if key not in cache:
            cache[key] = jax.jit(lambda p, x: self.module.apply({"params": p}, x, method="caption", max_len=max_len,
                                                                eos_id=eos, beam_size=beam_size, alpha=alpha).tokens)
        x = self.preprocess_images(images, value_range=value_range)
        out = []
        for start in range(0, x.shape[0], batch_size):
            chunk = x[start:start + batch_size]
            n = chunk.shape[0]
            padded = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)]) \
                if n < batch_size and x.shape[0] > batch_size else chunk
            out.append(np.asarray(cache[key](self.params, jnp.asarray(padded)))[:n])
        ids = np.concatenate(out) if out else np.zeros((0, max_len), np.int32)
        return list(self.tokenizer.decode(ids))

    def similarity(self, images: Any, texts: Sequence[str]) -> np.ndarray:
        """Cosine similarities ``[N_images, N_texts]`` float32."""
        return self.encode_images(images) @ self.encode_texts(texts).T

    def zero_shot_classifier(self, class_names: Sequence[str], templates: Sequence[str] | str | None = None, *,
                             prompts: Sequence[Sequence[str]] | None = None) -> "ZeroShotClassifier":
        """A classifier over ``class_names`` from prompts (CLIP's prompt ensembling: each class is
        the normalized mean of its normalized prompt embeddings).

        Args:
          templates: format strings with one ``{}`` (default ``('a photo of a {}.',)``); one such
            string; a built-in set by name (``'imagenet'``: CLIP's 80); or a templates file path.
          prompts: instead of templates, ready-made prompts per class (``prompts[c]`` for class
            ``c``; classes may have different numbers), e.g. a dataset's own prompt lists.
        """
        from contrastive_jax.evaluate.zero_shot import load_templates, prompt_class_embeddings

        class_names = _check_texts(class_names, "class_names")
        if self.tokenizer is None:
            self.tokenize([])  # raises the error that says how to give the model a tokenizer
        if prompts is not None:
            if templates is not None:
                raise ValueError("give templates or prompts, not both")
            prompts = [list(p) for p in prompts]
            if len(prompts) != len(class_names):
                raise ValueError(f"prompts has {len(prompts)} lists for {len(class_names)} classes")
        else:
            if isinstance(templates, str):
                templates = [templates] if "{}" in templates else load_templates(templates)
            templates = list(templates or _DEFAULT_TEMPLATES)
            bad = [t for t in templates if t.count("{}") != 1]
            if bad:
                raise ValueError(f"each template needs exactly one '{{}}', got {bad[:3]}")
            prompts = [[t.format(name) for t in templates] for name in class_names]
        rows = _bucket(sum(len(p) for p in prompts), 256)
        weights = prompt_class_embeddings(self._encoder("text"), self.tokenizer, prompts, rows)
        return ZeroShotClassifier(self, list(class_names), templates, weights)


class ZeroShotClassifier:
    """``classifier(images) -> float32 [N, C]`` class probabilities: for CLIP-style (softmax-trained)
    models a softmax over classes of ``logit_scale * cos``; for sigmoid-trained models (SigLIP)
    independent per-class ``sigmoid(logit_scale * cos + logit_bias)``, which need not sum to 1.
    ``activation`` says which (``'softmax'`` / ``'sigmoid'``).

    Every method takes images (anything :meth:`Model.encode_images` takes) or, to encode once and
    reuse, ``embeddings=`` from :meth:`Model.encode_images`.

    Attributes:
      class_names: ``C`` names; templates: the prompt templates (None when built from prompts);
      class_embeddings: float32 ``[C, D]``, unit norm (the classifier's weights).
    """

    def __init__(self, model: Model, class_names: list[str], templates: list[str] | None,
                 class_embeddings: np.ndarray):
        self.model, self.class_names, self.templates = model, class_names, templates
        self.class_embeddings = class_embeddings
        self.activation = model.activation

    def __repr__(self) -> str:
        return (f"ZeroShotClassifier(classes={len(self.class_names)}, activation={self.activation!r}, "
                f"templates={None if self.templates is None else len(self.templates)})")

    def logits(self, images: Any = None, *, embeddings: np.ndarray | None = None) -> np.ndarray:
        """``logit_scale * cos(image, class)`` (plus ``logit_bias`` for sigmoid models): float32 ``[N, C]``."""
        if (images is None) == (embeddings is None):
            raise TypeError("pass images or embeddings=")
        emb = self.model.encode_images(images) if embeddings is None else np.asarray(embeddings, np.float32)
        logits = self.model.logit_scale * (emb @ self.class_embeddings.T)
        if self.activation == "sigmoid":
            logits = logits + self.model.logit_bias
        return logits.astype(np.float32)

    def __call__(self, images: Any = None, *, embeddings: np.ndarray | None = None) -> np.ndarray:
        logits = self.logits(images, embeddings=embeddings)
        if self.activation == "sigmoid":
            return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
        logits = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)

    def predict(self, images: Any = None, *, embeddings: np.ndarray | None = None) -> np.ndarray:
        """Index of the most similar class per image, int ``[N]``."""
        return np.argmax(self.logits(images, embeddings=embeddings), axis=1)

    def predict_names(self, images: Any = None, *, embeddings: np.ndarray | None = None) -> list[str]:
        return [self.class_names[i] for i in self.predict(images, embeddings=embeddings)]
