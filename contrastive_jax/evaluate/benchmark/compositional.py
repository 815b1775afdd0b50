"""Compositional benchmarks read from their published files: SugarCrepe, ARO, Winoground.

Each benchmark asks whether a model's image-text similarity prefers a correct caption over a
caption with the same words (or nearly) in a different composition. All scores here are
cosines of L2-normalized embeddings (``model.encode_images`` / ``model.encode_texts``, normalized
again here in float64), compared exactly as each paper's reference code compares them, ties
included (each scorer's docstring says how a tie counts).

Benchmarks (:data:`DATASETS`) and the expected layout under one folder each. :func:`find` looks for
the folder at ``root`` itself and at ``root/<folder name>`` (the names listed first):

``sugarcrepe`` -- Hsieh et al., "SugarCrepe: Fixing Hackable Benchmarks for Vision-Language
Compositionality", NeurIPS 2023 Datasets & Benchmarks (github.com/RAIVNLab/sugar-crepe)::

    sugarcrepe/  (or sugar_crepe/, sugar-crepe/)
      add_att.json add_obj.json replace_att.json replace_obj.json
      replace_rel.json swap_att.json swap_obj.json      (the repo's data/*.json; data/ also accepted)
      val2017/000000565045.jpg ...                       (COCO 2017 validation images)

  Each JSON is ``{"0": {"filename": "000000565045.jpg", "caption": POSITIVE, "negative_caption":
  NEGATIVE}, ...}``.

``aro_vg_relation``, ``aro_vg_attribution``, ``aro_coco_order``, ``aro_flickr_order`` -- Yuksekgonul
et al., "When and Why Vision-Language Models Behave like Bags-of-Words, and What to Do About It?",
ICLR 2023 (github.com/mertyg/vision-language-models-are-bows)::

    aro/
      visual_genome_relation.json                        (VG-Relation)
      visual_genome_attribution.json                     (VG-Attribution)
      images/2315375.jpg ...                             (vgr_vga_images.zip, extracted)
    coco/  (or aro/coco/)
      coco_karpathy_test.json                            (BLIP's Karpathy test split)
      val2014/COCO_val2014_000000391895.jpg ...
    flickr30k/  (or aro/flickr30k/)
      flickr30k_test.json                                (BLIP's Flickr30k test split)
      flickr30k-images/1007129816.jpg ...

  VG entries: ``{"image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption",
  "false_caption", "relation_name"}`` (Relation) or ``"attributes": [a, b]`` (Attribution); the
  image is cropped to the box (the union of the two objects' boxes, as published). Karpathy /
  Flickr entries: ``{"image": "val2014/....jpg", "caption": [5 captions]}``; each caption becomes
  one test case against four perturbations of itself made here (see :func:`order_options`).

``winoground`` -- Thrush et al., "Winoground: Probing Vision and Language Models for
Visio-Linguistic Compositionality", CVPR 2022 (huggingface.co/datasets/facebook/winoground)::

    winoground/
      examples.jsonl                                     (data/examples.jsonl; data/ also accepted)
      images/ex_0_img_0.png ...                          (data/images.zip, extracted)

  Each line: ``{"id", "caption_0", "caption_1", "image_0": "ex_0_img_0", "image_1": ..., "tag", ...}``.

:func:`evaluate` returns ``dict[str, float]``; the headline number of each benchmark is under the key
in :data:`MAIN_METRIC`. Nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Callable, Iterable, Sequence

import numpy as np

DATASETS = ("sugarcrepe", "aro_vg_relation", "aro_vg_attribution", "aro_coco_order", "aro_flickr_order",
            "winoground")

# The number each paper headlines, for one-column tables.
MAIN_METRIC = {"sugarcrepe": "mean", "aro_vg_relation": "accuracy", "aro_vg_attribution": "accuracy",
               "aro_coco_order": "accuracy", "aro_flickr_order": "accuracy", "winoground": "group_score"}

SUGARCREPE_SUBSETS = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")

# Folder names find() tries under root, in order.
_FOLDERS = {
    "sugarcrepe": ("sugarcrepe", "sugar_crepe", "sugar-crepe"),
    "aro_vg_relation": ("aro",),
    "aro_vg_attribution": ("aro",),
    "aro_coco_order": ("coco", os.path.join("aro", "coco")),
    "aro_flickr_order": ("flickr30k", os.path.join("aro", "flickr30k")),
    "winoground": ("winoground",),
}

# VG-Attribution: the ARO code scores only attribute pairs with at least this many test cases.
ARO_MIN_ATTRIBUTE_COUNT = 25
# VG-Relation: relations the ARO authors leave out of the reported macro accuracy because swapping
# their subject and object need not make the caption false (their reproduction notebook,
# "Replicate ARO! VG-Relation, VG-Attribution.ipynb"). Data, kept verbatim so that the number is
# comparable with the paper's.
ARO_VG_RELATION_EXCLUDED = frozenset((
    "adjusting", "attached to", "between", "bigger than", "biting", "boarding", "brushing", "chewing", "cleaning",
    "climbing", "close to", "coming from", "coming out of", "contain", "crossing", "dragging", "draped over",
    "drinking", "drinking from", "driving", "driving down", "driving on", "eating from", "eating in", "enclosing",
    "exiting", "facing", "filled with", "floating in", "floating on", "flying", "flying above", "flying in",
    "flying over", "flying through", "full of", "going down", "going into", "going through", "grazing in",
    "growing in", "growing on", "guiding", "hanging from", "hanging in", "hanging off", "hanging over",
    "higher than", "holding onto", "hugging", "in between", "jumping off", "jumping on", "jumping over", "kept in",
    "larger than", "leading", "leaning over", "leaving", "licking", "longer than", "looking in", "looking into",
    "looking out", "looking over", "looking through", "lying next to", "lying on top of", "making", "mixed with",
    "mounted on", "moving", "on the back of", "on the edge of", "on the front of", "on the other side of",
    "opening", "painted on", "parked at", "parked beside", "parked by", "parked in", "parked in front of",
    "parked near", "parked next to", "perched on", "petting", "piled on", "playing", "playing in", "playing on",
    "playing with", "pouring", "reaching for", "reading", "reflected on", "riding on", "running in", "running on",
    "running through", "seen through", "sitting behind", "sitting beside", "sitting by", "sitting in front of",
    "sitting near", "sitting next to", "sitting under", "skiing down", "skiing on", "sleeping in", "sleeping on",
    "smiling at", "sniffing", "splashing", "sprinkled on", "stacked on", "standing against", "standing around",
    "standing behind", "standing beside", "standing in front of", "standing near", "standing next to", "staring at",
    "stuck in", "surrounding", "swimming in", "swinging", "talking to", "topped with", "touching",
    "traveling down", "traveling on", "tying", "typing on", "underneath", "wading in", "waiting for",
    "walking across", "walking by", "walking down", "walking next to", "walking through", "working in",
    "working on", "worn on", "wrapped around", "wrapped in", "by", "of", "near", "next to", "with", "beside",
    "on the side of", "around"))

# Penn Treebank tags the ARO perturbations treat as nouns / adjectives.
_NOUN_TAGS = frozenset(("NN", "NNS", "NNP", "NNPS"))
_ADJ_TAGS = frozenset(("JJ", "JJR", "JJS"))
ORDER_MAX_WORDS = 30  # ARO truncates every caption option to 30 words after cleaning


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown compositional benchmark {name!r}; known: {', '.join(DATASETS)}")


# -- layout ---------------------------------------------------------------------------------------

def _nonempty_dir(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    with os.scandir(path) as it:
        return any(True for _ in it)


def _first_dir_with(folder: str, files: Sequence[str]) -> str | None:
    """``folder`` or ``folder/data`` when it holds every one of ``files``."""
    for d in (folder, os.path.join(folder, "data")):
        if all(os.path.isfile(os.path.join(d, f)) for f in files):
            return d
    return None


def _layout(name: str, folder: str) -> dict[str, str] | str:
    """The files of benchmark ``name`` in ``folder``, or a one-line reason they are not there."""
    if name == "sugarcrepe":
        files = [f"{s}.json" for s in SUGARCREPE_SUBSETS]
        ann = _first_dir_with(folder, files)
        if ann is None:
            have = [f for f in files if os.path.isfile(os.path.join(folder, f))
                    or os.path.isfile(os.path.join(folder, "data", f))]
            return f"needs {', '.join(files)} in {folder} (or its data/); found {len(have)} of 7"
        images = os.path.join(folder, "val2017")
        if not _nonempty_dir(images):
            return f"needs the COCO val2017 images in {images}"
        return {"annotations": ann, "images": images}
    if name in ("aro_vg_relation", "aro_vg_attribution"):
        fname = "visual_genome_relation.json" if name == "aro_vg_relation" else "visual_genome_attribution.json"
        ann, images = os.path.join(folder, fname), os.path.join(folder, "images")
        if not os.path.isfile(ann):
            return f"needs {ann}"
        if not _nonempty_dir(images):
            return f"needs the VG-Relation/VG-Attribution images in {images}"
        return {"annotations": ann, "images": images}
    if name in ("aro_coco_order", "aro_flickr_order"):
        fname, sub = (("coco_karpathy_test.json", "val2014") if name == "aro_coco_order"
                      else ("flickr30k_test.json", "flickr30k-images"))
        ann, images = os.path.join(folder, fname), os.path.join(folder, sub)
        if not os.path.isfile(ann):
            return f"needs {ann}"
        if not _nonempty_dir(images):
            return f"needs the images in {images}"
        return {"annotations": ann, "images": folder}  # entries' paths are relative to the folder
    # winoground
    d = _first_dir_with(folder, ["examples.jsonl"])
    if d is None:
        return f"needs {os.path.join(folder, 'examples.jsonl')} (or data/examples.jsonl)"
    images = os.path.join(d, "images")
    if not _nonempty_dir(images):
        return f"needs the extracted images.zip in {images}"
    return {"annotations": os.path.join(d, "examples.jsonl"), "images": images}


def find(name: str, root: str | os.PathLike | None) -> str | None:
    """The folder of benchmark ``name`` under ``root`` (see the module docstring for the layouts):
    ``root`` itself or ``root/<folder>``, when its published files are all there; else None.
    Only the annotation files and a non-empty image folder are checked here; :func:`evaluate` reports
    images that are missing. Raises ValueError for an unknown name."""
    _check_name(name)
    if root is None:
        return None
    root = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.isdir(root):
        return None
    for folder in (root, *(os.path.join(root, f) for f in _FOLDERS[name])):
        if os.path.isdir(folder) and isinstance(_layout(name, folder), dict):
            return folder
    return None


# -- scoring (pure numpy on embeddings) ---------------------------------------------------------

def _unit(x: Any) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {x.shape}")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("nd,nd->n", a, b)


def sugarcrepe_correct(image: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """SugarCrepe's test (Hsieh et al., 2023): ``cos(image, positive) > cos(image, negative)``.

    Args: float ``[N, D]`` each (normalized here). Returns bool ``[N]``; a tie is wrong (strict ``>``,
    as the reference ``main_eval.py``).
    """
    image, positive, negative = _unit(image), _unit(positive), _unit(negative)
    return _rowdot(image, positive) > _rowdot(image, negative)


def group_accuracy(correct: np.ndarray, groups: Sequence[str], *, min_count: int = 1,
                   exclude: Iterable[str] = ()) -> tuple[float, dict[str, float]]:
    """Macro accuracy: the unweighted mean over groups of each group's accuracy.

    Args:
      correct: bool ``[N]``; groups: ``N`` group names.
      min_count: groups with fewer test cases are left out; exclude: group names left out.
    Returns ``(macro accuracy, {group: accuracy})`` over the groups kept (nan when none is kept).
    """
    correct, groups = np.asarray(correct, bool), np.asarray(list(groups), dtype=object)
    if correct.shape != groups.shape:
        raise ValueError(f"correct has shape {correct.shape}, groups {groups.shape}")
    skip = set(exclude)
    per = {}
    for g in sorted(set(groups.tolist())):
        mask = groups == g
        if g in skip or mask.sum() < min_count:
            continue
        per[g] = float(correct[mask].mean())
    return (float(np.mean(list(per.values()))) if per else float("nan")), per


def order_correct(image: np.ndarray, options: np.ndarray) -> np.ndarray:
    """ARO order test (Yuksekgonul et al., 2023): the true caption (option 0) ranks first.

    Args: image float ``[N, D]``; options float ``[N, K, D]`` (option 0 the true caption).
    Returns bool ``[N]``: ``argmax_k cos(image, option_k) == 0``. As in the reference (numpy's argmax
    takes the first maximum), a tie with the true caption counts as correct -- this happens when a
    perturbation leaves the caption unchanged.
    """
    image = _unit(image)
    options = np.asarray(options, np.float64)
    n, k, d = options.shape
    options = _unit(options.reshape(n * k, d)).reshape(n, k, d)
    return np.argmax(np.einsum("nd,nkd->nk", image, options), axis=1) == 0


def vg_correct(image: np.ndarray, true: np.ndarray, false: np.ndarray) -> np.ndarray:
    """ARO VG-Relation / VG-Attribution test: ``cos(image, true) > cos(image, false)``, bool ``[N]``.
    A tie is wrong: the reference takes the argmax over ``[false, true]``, and a tie picks false."""
    image, true, false = _unit(image), _unit(true), _unit(false)
    return _rowdot(image, true) > _rowdot(image, false)


def winoground_scores(similarity: np.ndarray) -> dict[str, float]:
    """Winoground's three scores (Thrush et al., 2022) from ``similarity[n, c, i]`` = score of caption
    ``c`` with image ``i`` of example ``n`` (float ``[N, 2, 2]``).

    text: both images prefer their own caption (``s[0,0] > s[1,0]`` and ``s[1,1] > s[0,1]``);
    image: both captions prefer their own image (``s[0,0] > s[0,1]`` and ``s[1,1] > s[1,0]``);
    group: both. Strict comparisons: a tie fails. Fractions of examples, in [0, 1].
    """
    s = np.asarray(similarity, np.float64)
    if s.ndim != 3 or s.shape[1:] != (2, 2):
        raise ValueError(f"similarity must be [N, 2, 2], got shape {s.shape}")
    text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    return {"text_score": float(text.mean()), "image_score": float(image.mean()),
            "group_score": float((text & image).mean()), "n": float(len(s))}


# -- ARO order perturbations --------------------------------------------------------------------

def clean_caption(caption: str, max_words: int = ORDER_MAX_WORDS) -> str:
    """ARO's caption cleaning for the order tests: lowercase, the characters ``.!"()*#:;~`` become
    spaces, runs of spaces collapse, ends are stripped, then at most ``max_words`` words."""
    text = re.sub(r'[.!"()*#:;~]', " ", caption.lower())
    text = re.sub(r" {2,}", " ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def word_tokens(text: str) -> list[str]:
    """Words and punctuation marks as separate tokens (for the trigram perturbations). The ARO code
    uses ``nltk.word_tokenize``; this splits the same way on plain captions (words, numbers,
    ``'s``-style clitics, punctuation) without NLTK's data files."""
    return re.findall(r"\w+(?:[-']\w+)*|'\w+|[^\w\s]", text)


def _trigrams(tokens: list[str]) -> list[list[str]]:
    return [tokens[i:i + 3] for i in range(0, len(tokens), 3)]


def order_options(caption: str, rng: np.random.Generator,
                  tagger: Callable[[str], list[tuple[str, str]]]) -> list[str]:
    """The five caption options of one ARO order test case: the cleaned true caption, then the four
    perturbations of the paper (each cleaned as :func:`clean_caption`):

    1. nouns shuffled among themselves and adjectives among themselves;
    2. every word that is neither noun nor adjective shuffled among those words;
    3. words shuffled within each trigram (consecutive groups of 3 tokens);
    4. the trigrams shuffled as units.

    Args:
      caption: the original caption; rng: the random source (the reference's draws are not
        reproduced bit for bit: its numbers are means over random perturbations too).
      tagger: ``text -> [(token, Penn Treebank tag)]`` (the reference uses spaCy's en_core_web_sm).
    """
    tagged = tagger(caption)
    tokens = np.array([t for t, _ in tagged], dtype=object)
    tags = [tag for _, tag in tagged]

    def shuffled(idx):
        out = tokens.copy()
        if len(idx):
            out[idx] = out[rng.permutation(idx)]
        return " ".join(out.tolist())

    nouns = [i for i, t in enumerate(tags) if t in _NOUN_TAGS]
    adjs = [i for i, t in enumerate(tags) if t in _ADJ_TAGS]
    out = tokens.copy()
    for idx in (nouns, adjs):
        if idx:
            out[idx] = out[rng.permutation(idx)]
    p1 = " ".join(out.tolist())
    p2 = shuffled([i for i, t in enumerate(tags) if t not in _NOUN_TAGS and t not in _ADJ_TAGS])
    words = word_tokens(caption)
    p3 = " ".join(" ".join(g[j] for j in rng.permutation(len(g))) for g in _trigrams(words))
    grams = _trigrams(words)
    p4 = " ".join(" ".join(grams[j]) for j in rng.permutation(len(grams)))
    return [clean_caption(c) for c in (caption, p1, p2, p3, p4)]


def spacy_tagger() -> Callable[[str], list[tuple[str, str]]]:
    """spaCy's ``en_core_web_sm`` as a tagger (the one the ARO code uses); RuntimeError if absent."""
    try:
        import spacy

        nlp = spacy.load("en_core_web_sm")
    except (ImportError, OSError) as e:
        raise RuntimeError("the ARO order benchmarks tag nouns/adjectives with spaCy's en_core_web_sm, as the "
                           "paper's code does: pip install spacy && python -m spacy download en_core_web_sm "
                           f"({type(e).__name__}: {e})") from None
    return lambda text: [(tok.text, tok.tag_) for tok in nlp(text)]


# -- encoding -------------------------------------------------------------------------------------

class _Progress:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="item", file=sys.stderr, leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _load_image(spec: tuple[str, tuple[float, float, float, float] | None]):
    from PIL import Image

    path, box = spec
    with Image.open(path) as f:
        img = f.convert("RGB")
    if box is not None:
        x, y, w, h = box
        img = img.crop((x, y, x + w, y + h))
    return img


def _encode(encode: Callable, items: list, batch_size: int, bar: _Progress,
            load: Callable = lambda item: item) -> np.ndarray:
    """Unit float64 ``[len(items), D]`` of ``encode`` over ``items``, ``batch_size`` at a time;
    ``load`` turns an item into the encoder's input as its batch comes up (images are read lazily)."""
    out = []
    for i in range(0, len(items), batch_size):
        chunk = [load(x) for x in items[i:i + batch_size]]
        out.append(_unit(encode(chunk)))
        bar.update(len(chunk))
    return np.concatenate(out) if out else np.zeros((0, 1))


def _unique(items: list) -> tuple[list, np.ndarray]:
    """Distinct items (first-seen order) and the index of each item into them."""
    where: dict = {}
    index = np.array([where.setdefault(x, len(where)) for x in items], np.int64)
    return list(where), index


def _embed(model, name: str, image_specs: list, texts: list[str], batch_size: int, progress: bool):
    """Embeds the distinct images and texts once: (image emb ``[len(image_specs), D]``, text emb
    ``[len(texts), D]``), unit float64 rows in the given order."""
    missing = [p for p, _ in dict.fromkeys(image_specs) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{name}: {len(missing)} image file(s) missing, e.g. {missing[0]}")
    uimg, iidx = _unique(image_specs)
    utxt, tidx = _unique(texts)
    bar = _Progress(len(uimg) + len(utxt), name, progress)
    try:
        img = _encode(model.encode_images, uimg, batch_size, bar, load=_load_image)
        txt = _encode(model.encode_texts, utxt, batch_size, bar)
    finally:
        bar.close()
    return img[iidx], txt[tidx]


# -- readers + evaluation -------------------------------------------------------------------------

def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _need(entry: Any, keys: Sequence[str], where: str) -> None:
    if not isinstance(entry, dict) or any(k not in entry for k in keys):
        have = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"{where}: needs keys {list(keys)}, has {have}")


def _sugarcrepe(files, model, batch_size, progress) -> dict[str, float]:
    specs, pos, neg, subset = [], [], [], []
    for s in SUGARCREPE_SUBSETS:
        path = os.path.join(files["annotations"], f"{s}.json")
        data = _read_json(path)
        if not isinstance(data, dict) or not data:
            raise ValueError(f"{path}: expected a non-empty JSON object of test cases")
        for key, e in data.items():
            _need(e, ("filename", "caption", "negative_caption"), f"{path}[{key!r}]")
            specs.append((os.path.join(files["images"], e["filename"]), None))
            pos.append(e["caption"])
            neg.append(e["negative_caption"])
            subset.append(s)
    img, txt = _embed(model, "sugarcrepe", specs, pos + neg, batch_size, progress)
    correct = sugarcrepe_correct(img, txt[:len(pos)], txt[len(pos):])
    subset = np.array(subset)
    out = {s: float(correct[subset == s].mean()) for s in SUGARCREPE_SUBSETS}
    for kind in ("add", "replace", "swap"):  # the paper's three hard-negative families
        out[kind] = float(np.mean([out[s] for s in SUGARCREPE_SUBSETS if s.startswith(kind + "_")]))
    out["mean"] = float(np.mean([out[s] for s in SUGARCREPE_SUBSETS]))
    out["n"] = float(len(correct))
    return out


def _aro_vg(name, files, model, batch_size, progress) -> dict[str, float]:
    path = files["annotations"]
    data = _read_json(path)
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of test cases")
    group_key = "relation_name" if name == "aro_vg_relation" else "attributes"
    keys = ("image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption", "false_caption", group_key)
    specs, true, false, groups = [], [], [], []
    for i, e in enumerate(data):
        _need(e, keys, f"{path}[{i}]")
        box = tuple(float(e[k]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
        specs.append((os.path.join(files["images"], e["image_path"]), box))
        true.append(e["true_caption"])
        false.append(e["false_caption"])
        g = e[group_key]
        groups.append(g if group_key == "relation_name" else f"{g[0]}_{g[1]}")
    img, txt = _embed(model, name, specs, true + false, batch_size, progress)
    correct = vg_correct(img, txt[:len(true)], txt[len(true):])
    out = {"micro_accuracy": float(correct.mean()), "n": float(len(correct))}
    if name == "aro_vg_relation":
        # The paper's number: macro over relations, the ones whose swap need not be false left out.
        out["accuracy"], per = group_accuracy(correct, groups, exclude=ARO_VG_RELATION_EXCLUDED)
        out["macro_accuracy_all_relations"], _ = group_accuracy(correct, groups)
        out["num_relations"] = float(len(per))
    else:
        out["accuracy"], per = group_accuracy(correct, groups, min_count=ARO_MIN_ATTRIBUTE_COUNT)
        out["num_attribute_pairs"] = float(len(per))
    return out


def _aro_order(name, files, model, batch_size, progress, *, seed: int, tagger) -> dict[str, float]:
    path = files["annotations"]
    data = _read_json(path)
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of images with captions")
    tagger = tagger or spacy_tagger()
    rng = np.random.default_rng(seed)
    specs, options = [], []
    for i, e in enumerate(data):
        _need(e, ("image", "caption"), f"{path}[{i}]")
        captions = [e["caption"]] if isinstance(e["caption"], str) else list(e["caption"])
        for c in captions:
            specs.append((os.path.join(files["images"], e["image"]), None))
            options.extend(order_options(c, rng, tagger))
    img, txt = _embed(model, name, specs, options, batch_size, progress)
    correct = order_correct(img, txt.reshape(len(specs), 5, -1))
    return {"accuracy": float(correct.mean()), "n": float(len(correct))}


def _winoground(files, model, batch_size, progress) -> dict[str, float]:
    path = files["annotations"]
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                e = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err})") from None
            _need(e, ("caption_0", "caption_1", "image_0", "image_1"), f"{path}:{line_no}")
            examples.append(e)
    if not examples:
        raise ValueError(f"{path}: no examples")
    specs = [(os.path.join(files["images"], e[k] + ".png"), None) for e in examples for k in ("image_0", "image_1")]
    texts = [e[k] for e in examples for k in ("caption_0", "caption_1")]
    img, txt = _embed(model, "winoground", specs, texts, batch_size, progress)
    n = len(examples)
    img, txt = img.reshape(n, 2, -1), txt.reshape(n, 2, -1)
    return winoground_scores(np.einsum("ncd,nid->nci", txt, img))


def evaluate(name: str, path: str | os.PathLike, model, *, batch_size: int = 64, progress: bool = True,
             seed: int = 1, tagger: Callable[[str], list[tuple[str, str]]] | None = None) -> dict[str, float]:
    """Scores ``model`` on compositional benchmark ``name`` read from ``path`` (its folder, as
    :func:`find` returns it).

    Args:
      model: anything with ``encode_images(list of PIL images) -> [N, D]`` and
        ``encode_texts(list[str]) -> [N, D]`` (a :class:`contrastive_jax.api.Model`); rows are
        L2-normalized here. Each distinct image and caption is encoded once.
      batch_size: images / texts per encode call; progress: a tqdm bar on stderr.
      seed, tagger: the ARO order tests only: the perturbations' random seed, and the
        part-of-speech tagger (default spaCy's en_core_web_sm, RuntimeError when not installed).

    Returns ``{metric: value}``, accuracies as fractions in [0, 1], counts under ``n`` /
    ``num_*``:

      * sugarcrepe: one accuracy per subset (:data:`SUGARCREPE_SUBSETS`), ``add`` / ``replace`` /
        ``swap`` (mean of their subsets), ``mean`` (unweighted mean of the 7), ``n``.
      * aro_vg_relation: ``accuracy`` = the paper's macro accuracy (mean over relations of
        per-relation accuracy, :data:`ARO_VG_RELATION_EXCLUDED` left out, as the authors' notebook),
        ``macro_accuracy_all_relations``, ``micro_accuracy`` (over test cases), ``num_relations``.
      * aro_vg_attribution: ``accuracy`` = macro over attribute pairs with at least
        :data:`ARO_MIN_ATTRIBUTE_COUNT` cases (as the ARO code), ``micro_accuracy``, ``num_attribute_pairs``.
      * aro_coco_order / aro_flickr_order: ``accuracy`` = fraction of (image, caption) cases whose true
        caption beats its 4 perturbations (the paper's Precision@1).
      * winoground: ``text_score``, ``image_score``, ``group_score``.
    """
    _check_name(name)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    folder = os.path.abspath(os.path.expanduser(os.fspath(path)))
    files = _layout(name, folder) if os.path.isdir(folder) else f"{folder} is not a directory"
    if isinstance(files, str):
        raise FileNotFoundError(f"{name}: {files}")
    if name == "sugarcrepe":
        return _sugarcrepe(files, model, batch_size, progress)
    if name in ("aro_vg_relation", "aro_vg_attribution"):
        return _aro_vg(name, files, model, batch_size, progress)
    if name in ("aro_coco_order", "aro_flickr_order"):
        return _aro_order(name, files, model, batch_size, progress, seed=seed, tagger=tagger)
    return _winoground(files, model, batch_size, progress)
