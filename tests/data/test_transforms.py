"""contrastive_jax.data.transforms: augmentation ops against hand-derivable results (numpy/PIL references)."""
import numpy as np
import pytest
from PIL import Image

from contrastive_jax.data.config import augment_defaults
from contrastive_jax.data.transforms import (
    BadImageError,
    ImageTransform,
    decode_image,
    random_resized_crop,
    resize_center_crop,
)


def _img(h=40, w=30, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _aug(**kw):
    a = augment_defaults()
    a.update(kw)
    return ImageTransform(16, a)


def test_default_recipe_is_the_eval_transform():
    img = _img()
    want = np.asarray(resize_center_crop(img, 16))
    assert want.shape == (16, 16, 3) and want.dtype == np.uint8
    np.testing.assert_array_equal(_aug()(img, np.random.default_rng(0)), want)
    np.testing.assert_array_equal(ImageTransform(16)(img), want)


def test_flip_grayscale_solarize_exact():
    img = _img()
    base = np.asarray(resize_center_crop(img, 16)).astype(np.int64)
    rng = np.random.default_rng
    np.testing.assert_array_equal(_aug(flip_prob=1.0)(img, rng(0)), base[:, ::-1])
    gray = _aug(grayscale_prob=1.0)(img, rng(0)).astype(np.int64)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    # ITU-R 601 luma, as PIL's 'L' conversion: within rounding.
    luma = (base[..., 0] * 299 + base[..., 1] * 587 + base[..., 2] * 114) / 1000
    assert np.abs(gray[..., 0] - luma).max() <= 1
    sol = _aug(solarize_prob=1.0, solarize_threshold=100)(img, rng(0)).astype(np.int64)
    np.testing.assert_array_equal(sol, np.where(base >= 100, 255 - base, base))


def test_random_resized_crop_full_area_is_a_resize_and_shapes_hold():
    img = _img(40, 40)
    rng = np.random.default_rng(0)
    full = random_resized_crop(img, 16, rng, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    np.testing.assert_array_equal(np.asarray(full), np.asarray(img.resize((16, 16), Image.BILINEAR)))
    simclr = _aug(crop="random_resized_crop", flip_prob=0.5, jitter_prob=0.8, grayscale_prob=0.2,
                  blur_prob=0.5, solarize_prob=0.2)
    outs = [simclr(_img(seed=s), np.random.default_rng(s)) for s in range(8)]
    assert all(o.shape == (16, 16, 3) and o.dtype == np.uint8 for o in outs)
    again = simclr(_img(seed=3), np.random.default_rng(3))
    np.testing.assert_array_equal(again, outs[3])  # deterministic given the generator
    assert not np.array_equal(simclr(_img(seed=3), np.random.default_rng(4)), outs[3])


def test_jitter_brightness_scales_pixels():
    img = _img()
    base = np.asarray(resize_center_crop(img, 16)).astype(np.float64)
    out = _aug(jitter_prob=1.0, brightness=0.5, contrast=0.0, saturation=0.0, hue=0.0)(
        img, np.random.default_rng(0)).astype(np.float64)
    # Brightness multiplies every pixel by one factor in [0.5, 1.5] (up to rounding and clipping).
    mask = (base > 20) & (out < 250)
    ratio = out[mask] / base[mask]
    assert 0.5 - 0.05 <= ratio.mean() <= 1.5 + 0.05 and ratio.std() < 0.05


def test_bad_bytes_raise_with_reasons():
    with pytest.raises(BadImageError) as e:
        decode_image(b"")
    assert e.value.reason == "empty_image"
    with pytest.raises(BadImageError) as e:
        decode_image(b"\x89PNG\r\n\x1a\n truncated")
    assert e.value.reason == "undecodable"


def test_bad_recipe_fields_are_named():
    with pytest.raises(ValueError, match="augment.crop"):
        _aug(crop="zoom")
    with pytest.raises(ValueError, match="augment.flip_prob"):
        _aug(flip_prob=1.5)


def test_normalize_images_is_one_formula_on_host_and_device():
    """The one normalization: uint8 -> (x/255 - mean)/std, float taken as 0..1; numpy and jax
    (jitted, as in the train step) agree to float32 rounding; denormalize inverts it to the pixel."""
    import jax
    import jax.numpy as jnp

    from contrastive_jax.data.transforms import denormalize_images, normalize_images

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(2, 5, 4, 3), dtype=np.uint8)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    ref = (pixels.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)
    host = normalize_images(pixels, mean, std)
    assert isinstance(host, np.ndarray) and host.dtype == np.float32
    np.testing.assert_allclose(host, ref, rtol=1e-6, atol=1e-6)
    # The host path works in place on its own copy: the bits of the plain float32 expression,
    # the input untouched (floats too).
    plain = (pixels.astype(np.float32) / np.float32(255.0) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    np.testing.assert_array_equal(host.view(np.int32), plain.view(np.int32))
    floats = pixels / np.float32(255.0)
    before = floats.copy()
    assert normalize_images(floats, mean, std) is not floats
    np.testing.assert_array_equal(floats, before)
    device = jax.jit(lambda x: normalize_images(x, mean, std))(jnp.asarray(pixels))
    assert isinstance(device, jax.Array) and device.dtype == jnp.float32
    # XLA may round the fused expression differently from numpy (one ulp of x/255, amplified
    # by 1/std after the subtraction): far below a pixel step (1/255/std ~ 0.015).
    np.testing.assert_allclose(np.asarray(device), host, rtol=0, atol=1e-6)
    # Floats are already in 0..1: no second division by 255.
    np.testing.assert_allclose(normalize_images(pixels / 255.0, mean, std), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(denormalize_images(host, mean, std), pixels)


def test_pass_through_only_where_the_pil_path_is_the_identity():
    """Stored uint8 arrays at the output size skip PIL only when the PIL path returns them as is."""
    arr = np.asarray(_img(16, 16))
    rng = np.random.default_rng
    for t in (ImageTransform(16), _aug()):
        assert t.passes_through(arr)
        np.testing.assert_array_equal(t(decode_image(arr), rng(0)), arr)  # what the skip stands for
    # Any other size, dtype or layout, or any random operation that could fire: the PIL path.
    assert not _aug().passes_through(np.asarray(_img(20, 16)))
    assert not _aug().passes_through(arr.astype(np.float32))
    assert not _aug().passes_through(arr.tobytes())
    for changed in (dict(flip_prob=0.5), dict(jitter_prob=0.1), dict(grayscale_prob=0.1), dict(blur_prob=0.1),
                    dict(solarize_prob=0.1), dict(crop="random_resized_crop")):
        t = _aug(**changed)
        assert not t.passes_through(arr), changed
    assert not np.array_equal(_aug(flip_prob=1.0)(decode_image(arr), rng(0)), arr)
