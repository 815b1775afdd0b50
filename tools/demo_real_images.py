"""Zero-shot classification and retrieval on real images that ship inside installed packages, offline.

Images (nothing downloaded): scikit-learn's two sample photos (``load_sample_images``: a pagoda by
a lake, an orange dahlia) and its handwritten digits (``load_digits``: 8x8 grey, 0..16, scaled to
0..255 and upsampled by the model's own resize), plus scikit-image's photos in ``skimage.data``
when scikit-image is installed (astronaut, camera man, cat, coffee, rocket, coins, moon, ...).
The class names and captions are written here, one per photo.

What runs, end to end, with the library's public API (:func:`contrastive_jax.load`,
``Model.zero_shot_classifier``, ``encode_images`` / ``encode_texts``):

- photos: zero-shot top-1 / top-5 over the photos' class names (template ``'a photo of a {}.'``),
  image->text and text->image recall@1/5 between the photos and their captions;
- digits: zero-shot top-1 over ``'a photo of the number "{}".'`` (classes "zero".."nine"), and a
  logistic probe on the image embeddings (half train, half test), which measures what the image
  tower's features hold even when its text side is untrained;
- with ``--model open_clip:NAME`` (default ``open_clip:ViT-B-32``): an open_clip architecture built by
  open_clip itself with **random weights** (``torch.manual_seed(--seed)``; no pretrained weights can be
  fetched offline), saved as a state dict and converted by ``contrastive_jax.load``; the same inputs
  go through open_clip's ``encode_image`` / ``encode_text`` and the JSON reports the largest
  difference and whether the zero-shot predictions agree. Random weights put every accuracy at
  chance level: the demo shows that the pipeline runs on real photos and that it computes what
  open_clip computes, not that the model knows anything.
- with ``--model PATH``: anything ``contrastive_jax.load`` reads (a training run, a model folder, an
  OpenAI / open_clip checkpoint file with ``--vocab``, a transformers folder). A real pretrained
  checkpoint you have on disk gives meaningful numbers here. (The quickstart run trains on the
  ``shapes`` dataset with a word vocabulary of its captions; photos and digits are outside it.)

Prints ONE JSON object on stdout; progress on stderr.

Example::

    python tools/demo_real_images.py                          # random-weight open_clip ViT-B-32
    python tools/demo_real_images.py --model ViT-B-32.pt --vocab bpe_simple_vocab_16e6.txt.gz
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

# (loader in sklearn.datasets / skimage.data, class name, caption) -- written for these images.
SKLEARN_PHOTOS = (
    ("china.jpg", "pagoda", "a tall red and green pagoda on a hill above a lake, with trees in front"),
    ("flower.jpg", "dahlia", "a close-up of an orange dahlia flower in front of dark green leaves"),
)
SKIMAGE_PHOTOS = (
    ("astronaut", "astronaut", "a smiling astronaut in an orange spacesuit beside her helmet, a flag behind her"),
    ("camera", "cameraman", "a black and white photo of a man looking through a camera on a tripod"),
    ("chelsea", "cat", "a tabby cat with green eyes looking to the side"),
    ("coffee", "coffee", "a red cup of coffee on a saucer with a spoon on a wooden table"),
    ("rocket", "rocket", "a rocket standing on its lit launch pad at dusk"),
    ("coins", "coins", "a grey photo of many old coins laid out in rows"),
    ("moon", "moon", "a grey close-up of the cratered surface of the moon"),
    ("hubble_deep_field", "galaxy", "a telescope image of many small distant galaxies in black space"),
    ("immunohistochemistry", "tissue", "a microscope image of stained tissue cells in brown and blue"),
    ("retina", "retina", "a photo of the back of a human eye with red blood vessels"),
    ("page", "book page", "a scanned page of printed text"),
    ("horse", "horse", "a black silhouette of a horse on a white background"),
    ("brick", "brick wall", "a grey close-up texture of a brick wall"),
    ("grass", "grass", "a grey close-up texture of grass"),
    ("gravel", "gravel", "a grey close-up texture of gravel stones"),
    ("colorwheel", "color wheel", "a circle of rainbow colours fading to white in the middle"),
    ("stereo_motorcycle", "motorcycle", "a red motorcycle parked in a garage"),
    ("clock", "clock", "a grey photo of a round clock, blurred by motion"),
)
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _as_uint8_rgb(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3]).astype(np.uint8)


def load_photos() -> tuple[list[np.ndarray], list[str], list[str], list[str], dict]:
    """(images uint8 [H, W, 3] of varying sizes, ids, class names, captions, sources)."""
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    by_name = {os.path.basename(f): img for f, img in zip(sample.filenames, sample.images)}
    images, ids, names, captions = [], [], [], []
    for file, name, caption in SKLEARN_PHOTOS:
        images.append(_as_uint8_rgb(by_name[file]))
        ids.append(f"sklearn:{file}")
        names.append(name)
        captions.append(caption)
    sources = {"scikit-learn": __import__("sklearn").__version__}
    try:
        import skimage
        import skimage.data
    except ImportError:
        sources["scikit-image"] = "not installed (pip install scikit-image adds 18 photos)"
        return images, ids, names, captions, sources
    sources["scikit-image"] = skimage.__version__
    for loader, name, caption in SKIMAGE_PHOTOS:
        img = getattr(skimage.data, loader)()
        img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)
        images.append(_as_uint8_rgb(img))
        ids.append(f"skimage:{loader}")
        names.append(name)
        captions.append(caption)
    return images, ids, names, captions, sources


def load_digit_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` digits (a seeded, class-balanced-by-chance sample): uint8 [n, 8, 8, 3], labels int [n]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.sort(np.random.default_rng(seed).permutation(len(d.target))[:n])
    # 0..16 ink levels; white background like a photo of a written digit (ink dark).
    img = 255 - np.clip(np.round(d.images[idx] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=-1), d.target[idx].astype(np.int64)


def recall_at(similarity: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """Row i's true column is i: fraction of rows whose true column ranks in the top k (ties count
    against: rank = number of columns scoring strictly higher or equal, excluding itself)."""
    s = np.asarray(similarity, np.float64)
    true = np.diag(s)[:, None]
    rank = (s > true).sum(1) + ((s == true).sum(1) - 1)  # 0 = first
    return {f"r{k}": float(np.mean(rank < k)) for k in ks}


def build_open_clip(name: str, seed: int, workdir: str):
    """(open_clip torch model, path of its saved state dict): random weights, nothing downloaded."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    oc = open_clip.create_model(name, pretrained=None).eval()
    path = os.path.join(workdir, f"{name}-random.bin")
    torch.save(oc.state_dict(), path)
    return oc, path, open_clip


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="open_clip:ViT-B-32",
                   help="open_clip:ARCH (random weights, converted) or a path contrastive_jax.load reads")
    p.add_argument("--vocab", default=None, help="CLIP BPE merges file for checkpoint files "
                   "(default for open_clip:ARCH: open_clip's packaged one)")
    p.add_argument("--digits", type=int, default=200, help="how many digits to use (of 1,797)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compare", action="store_true", help="skip running open_clip on the same inputs")
    args = p.parse_args(argv)
    if args.digits < 20:
        p.error("--digits must be at least 20 (half train, half test for the probe)")

    import jax

    import contrastive_jax

    out: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                             "jax_device": str(jax.devices()[0])}}
    t0 = time.perf_counter()
    photos, ids, names, captions, sources = load_photos()
    digits, digit_y = load_digit_images(args.digits, args.seed)
    out["data"] = {"sources": sources, "photos": len(photos), "digits": len(digits)}

    oc = open_clip = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.model.startswith("open_clip:"):
            arch = args.model.split(":", 1)[1]
            _log(f"building open_clip {arch} with random weights (seed {args.seed}) ...")
            oc, path, open_clip = build_open_clip(arch, args.seed, tmp)
            # open_clip's own config of the architecture says its activation and head counts.
            model = contrastive_jax.load(path, vocab=args.vocab or open_clip.tokenizer.default_bpe(),
                                         open_clip_config=open_clip.get_model_config(arch))
            out["model"] = {"source": f"open_clip.create_model({arch!r}, pretrained=None), converted",
                            "weights": f"RANDOM (torch.manual_seed({args.seed})): no pretrained weights offline; "
                                       "every accuracy is expected at chance level"}
        else:
            model = contrastive_jax.load(args.model, vocab=args.vocab)
            out["model"] = {"source": args.model, "weights": "as loaded"}
        out["model"].update(repr=repr(model), image_size=model.image_size)
        out["seconds"] = {"load": round(time.perf_counter() - t0, 1)}

        # Photos: zero-shot over their class names, and caption retrieval.
        t = time.perf_counter()
        _log(f"encoding {len(photos)} photos and {len(captions)} captions ...")
        img = model.encode_images(photos)
        txt = model.encode_texts(captions)
        classes = sorted(set(names))
        clf = model.zero_shot_classifier(classes, ["a photo of a {}."])
        logits = clf.logits(embeddings=img)
        label = np.array([classes.index(n) for n in names])
        top5 = np.argsort(-logits, axis=1)[:, :5]
        out["photos"] = {
            "n": len(photos), "classes": len(classes),
            "zero_shot_top1": float(np.mean(top5[:, 0] == label)),
            "zero_shot_top5": float(np.mean((top5 == label[:, None]).any(1))),
            "chance_top1": 1.0 / len(classes),
            "image_to_text": recall_at(img @ txt.T), "text_to_image": recall_at(txt @ img.T),
            "chance_r1": 1.0 / len(photos),
            "predictions": {i: classes[k] for i, k in zip(ids, top5[:, 0])},
        }
        # Digits: zero-shot, and a logistic probe on the image embeddings.
        _log(f"encoding {len(digits)} digits ...")
        dimg = model.encode_images(digits)
        dclf = model.zero_shot_classifier(list(DIGIT_NAMES), ['a photo of the number "{}".'])
        dpred = dclf.predict(embeddings=dimg)
        from contrastive_jax.evaluate.probes import logistic_probe

        half = len(digits) // 2
        probe = logistic_probe(dimg[:half], digit_y[:half], dimg[half:], digit_y[half:], num_classes=10)
        out["digits"] = {"n": len(digits), "zero_shot_top1": float(np.mean(dpred == digit_y)), "chance_top1": 0.1,
                         "logistic_probe_top1": float(probe["top1"]), "probe_train_test": [half, len(digits) - half],
                         "majority_class_test": float(np.bincount(digit_y[half:]).max() / (len(digits) - half))}
        out["seconds"]["encode_and_score"] = round(time.perf_counter() - t, 1)

        if oc is not None and not args.no_compare:
            # The same preprocessed pixels and token ids through open_clip itself.
            import torch

            t = time.perf_counter()
            _log("running open_clip on the same inputs ...")
            tok = open_clip.get_tokenizer(args.model.split(":", 1)[1])
            with torch.no_grad():
                def oc_img(x):
                    pix = torch.from_numpy(model.preprocess_images(x).transpose(0, 3, 1, 2).copy())
                    return oc.encode_image(pix, normalize=True).numpy()

                ref_img = np.concatenate([oc_img(photos), oc_img(digits)])
                ref_txt = oc.encode_text(tok(captions), normalize=True).numpy()
                ref_cls = oc.encode_text(tok([f'a photo of the number "{n}".' for n in DIGIT_NAMES]),
                                         normalize=True).numpy()
            ours_img = np.concatenate([img, dimg])
            ref_dpred = np.argmax(ref_img[len(photos):] @ ref_cls.T, axis=1)
            out["open_clip_parity"] = {
                "max_abs_diff_image_embedding": float(np.abs(ours_img - ref_img).max()),
                "max_abs_diff_text_embedding": float(np.abs(txt - ref_txt).max()),
                "digit_zero_shot_predictions_equal": float(np.mean(ref_dpred == dpred)),
                "token_ids_equal": bool(np.array_equal(model.tokenize(captions), tok(captions).numpy())),
            }
            out["seconds"]["open_clip_reference"] = round(time.perf_counter() - t, 1)
    out["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
