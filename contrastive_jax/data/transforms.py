"""Image decoding and augmentation on the host (numpy + PIL; no TensorFlow).

Everything works on one example: ``uint8 [H, W, 3]`` in, ``uint8 [S, S, 3]`` out, with every
random choice drawn from a ``numpy.random.Generator`` the caller seeds -- the pipeline seeds it
from (shuffle seed, position in the stream, view), so augmentations are deterministic given the
seed and the step and resume exactly. Normalization to float happens later, per batch.

The recipe fields are documented in :func:`contrastive_jax.data.config.augment_defaults`; the
SimCLR recipe is Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", appendix A; the random-resized crop is Szegedy et al. 2015 (Inception).
"""
from __future__ import annotations

import io
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

CROPS = ("resize", "random_resized_crop")


def normalize_images(images: Any, mean: Any, std: Any) -> Any:
    """The one image normalization: ``[..., 3]`` pixels -> float32 ``(x - mean) / std`` per channel.

    uint8 images (0..255) are scaled to 0..1 first (``x / 255``); float images are taken to be in
    0..1 already. numpy in, numpy out (the host pipeline); a ``jax.Array`` or tracer in, jax out
    (inside the jitted train step for ``data.normalize_on_device``), with the same float32
    operations in the same order (XLA may still round the fused expression differently: host and
    device agree to ~1e-6, far below one pixel step).
    """
    xp = jnp if isinstance(images, jax.Array) else np
    x = xp.asarray(images)
    scale = x.dtype == xp.uint8
    if xp is np:
        # The same three float32 operations, in place: one batch-sized buffer instead of four
        # (a batch of 128 x 48 x 48: ~15 ms under the profiler before, 6.3 ms after).
        x = x.astype(np.float32, copy=True)
        if scale:
            np.divide(x, np.float32(255.0), out=x)
        np.subtract(x, np.asarray(mean, np.float32), out=x)
        return np.divide(x, np.asarray(std, np.float32), out=x)
    x = x.astype(xp.float32)
    if scale:
        x = x / xp.float32(255.0)
    return (x - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32)


def denormalize_images(images: Any, mean: Any, std: Any) -> np.ndarray:
    """Inverse of :func:`normalize_images` for display: float32 ``[..., 3]`` -> uint8 0..255."""
    x = np.asarray(images, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


class BadImageError(ValueError):
    """An image that cannot be used; ``reason`` is a short code for counters."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def decode_image(data: Any, *, draft_size: int | None = None) -> Image.Image:
    """Encoded bytes (JPEG, PNG, ...) or a uint8 ``[H, W, 3]`` array -> an RGB PIL image.

    The whole image is decoded here, so truncated files fail now rather than later.
    ``draft_size``: let JPEG decode at a reduced scale not smaller than this (much faster for
    large photos that are resized anyway).

    Raises:
      BadImageError: ``reason`` 'empty_image' (zero bytes) or 'undecodable' (anything PIL rejects).
    """
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 3:
        if data.shape[-1] != 3:
            raise BadImageError("undecodable", f"image array has {data.shape[-1]} channels, need 3")
        return Image.fromarray(data)
    if isinstance(data, np.ndarray):
        data = data.tobytes() if data.dtype != object else data.item()
    if not data:
        raise BadImageError("empty_image", "image has zero bytes")
    try:
        img = Image.open(io.BytesIO(data))
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        return img.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad data
        raise BadImageError("undecodable", f"cannot decode image: {type(e).__name__}: {e}") from None


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bicubic), then the central ``size x size`` square."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """A crop covering a fraction in ``scale`` of the area, aspect (w/h) log-uniform in ``ratio``,
    resized to ``size x size``. After 10 rejected draws it falls back to the central crop."""
    w, h = img.size
    area = w * h
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = int(rng.integers(0, w - cw + 1))
            y0 = int(rng.integers(0, h - ch + 1))
            return img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    # Central crop at the nearest allowed aspect ratio.
    aspect = min(max(w / h, ratio[0]), ratio[1])
    cw, ch = (w, int(round(w / aspect))) if w / h < aspect else (int(round(h * aspect)), h)
    cw, ch = min(cw, w), min(ch, h)
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))


def _shift_hue(img: Image.Image, shift: float) -> Image.Image:
    """Rotates hue by ``shift`` turns (PIL's HSV stores hue in 0..255)."""
    h, s, v = img.convert("HSV").split()
    offset = int(round(shift * 256)) % 256
    h = h.point(lambda x: (x + offset) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def color_jitter(img: Image.Image, rng: np.random.Generator, brightness: float, contrast: float,
                 saturation: float, hue: float) -> Image.Image:
    """Brightness, contrast, saturation and hue changes, applied in a random order (SimCLR)."""
    ops = []
    if brightness > 0:
        f = rng.uniform(max(0.0, 1 - brightness), 1 + brightness)
        ops.append(lambda im, f=f: ImageEnhance.Brightness(im).enhance(f))
    if contrast > 0:
        f = rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
        ops.append(lambda im, f=f: ImageEnhance.Contrast(im).enhance(f))
    if saturation > 0:
        f = rng.uniform(max(0.0, 1 - saturation), 1 + saturation)
        ops.append(lambda im, f=f: ImageEnhance.Color(im).enhance(f))
    if hue > 0:
        f = rng.uniform(-hue, hue)
        ops.append(lambda im, f=f: _shift_hue(im, f))
    for i in rng.permutation(len(ops)):
        img = ops[i](img)
    return img


def _literal(value: Any) -> str:
    return repr(tuple(value)) if isinstance(value, (list, tuple)) else repr(value)


class ImageTransform:
    """``(decoded PIL image, rng) -> uint8 [size, size, 3]`` per ``config.data.augment``.

    Args:
      size: output side in pixels.
      augment: the ``config.data.augment`` group, or None for the evaluation transform
        (:func:`resize_center_crop` only).
      local: the multi-crop local-view transform (SwAV, Caron et al. 2020): always
        ``random_resized_crop`` with ``augment.local_crop_scale`` as the area range; the other
        operations as the recipe says.
    """

    def __init__(self, size: int, augment=None, *, local: bool = False):
        self.size = int(size)
        a = augment
        self.train = a is not None
        if a is None:
            return
        if a.crop not in CROPS:
            raise ValueError(f"config.data.augment.crop={a.crop!r}; known: {', '.join(CROPS)}")
        for field in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            if not 0.0 <= float(a[field]) <= 1.0:
                raise ValueError(f"config.data.augment.{field}={a[field]} is not a probability")
        scale_field = "local_crop_scale" if local else "crop_scale"
        scale = a.get(scale_field, (0.05, 0.14))
        try:
            lo, hi = (float(x) for x in scale)
        except (TypeError, ValueError):
            lo, hi = -1.0, -1.0
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"config.data.augment.{scale_field}={_literal(scale)} is invalid: must be (lo, hi) with "
                             "0 < lo <= hi <= 1")
        self.crop = "random_resized_crop" if local else str(a.crop)
        self.crop_scale = (lo, hi)
        self.crop_ratio = tuple(float(x) for x in a.crop_ratio)
        self.flip_prob = float(a.flip_prob)
        self.jitter_prob = float(a.jitter_prob)
        self.jitter = (float(a.brightness), float(a.contrast), float(a.saturation), float(a.hue))
        self.grayscale_prob = float(a.grayscale_prob)
        self.blur_prob = float(a.blur_prob)
        self.blur_sigma = tuple(float(x) for x in a.blur_sigma)
        self.solarize_prob = float(a.solarize_prob)
        self.solarize_threshold = int(a.solarize_threshold)

    def passes_through(self, data: Any) -> bool:
        """Whether ``data`` (a record's stored image) is already this transform's output: a uint8
        ``[size, size, 3]`` array and a transform that, at that size, changes nothing (evaluation,
        or training with ``crop='resize'`` and every random operation at probability 0). Such
        images skip the PIL round trip, which was a third of the input worker's time per batch on
        the built-in dataset (docs/benchmarks.md, "Session 13")."""
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape == (self.size, self.size, 3)):
            return False
        if not self.train:
            return True
        return self.crop == "resize" and not any(
            (self.flip_prob, self.jitter_prob, self.grayscale_prob, self.blur_prob, self.solarize_prob))

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        if not self.train:
            return np.asarray(resize_center_crop(img, self.size), np.uint8)
        if self.crop == "random_resized_crop":
            img = random_resized_crop(img, self.size, rng, self.crop_scale, self.crop_ratio)
        else:
            img = resize_center_crop(img, self.size)
        # Each probability is drawn even when zero, so enabling one op does not shift the
        # random numbers of the others.
        u = rng.uniform(size=5)
        if u[0] < self.flip_prob:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if u[1] < self.jitter_prob:
            img = color_jitter(img, rng, *self.jitter)
        if u[2] < self.grayscale_prob:
            img = img.convert("L").convert("RGB")
        if u[3] < self.blur_prob:
            img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*self.blur_sigma)))
        if u[4] < self.solarize_prob:
            img = ImageOps.solarize(img, threshold=self.solarize_threshold)
        return np.asarray(img, np.uint8)
