"""The built-in ``shapes`` dataset: procedurally rendered shapes with captions.

Each example is an RGB image holding ONE shape, described by four attributes -- ``kind``,
``color``, ``size`` and ``position`` -- and a caption written from one of several paraphrased
templates ("a small red triangle in the top left", "top left: a tiny red triangle", ...).

The dataset is a TFDS ``GeneratorBasedBuilder`` that writes array_record files, so it is read
back through ``tfds.data_source`` with random access and without TensorFlow. It is generated
locally (a few seconds) the first time a setting is used; every setting (image size, split
sizes, seed) is its own ``BuilderConfig`` and therefore its own directory on disk.

Compositional generalization: the ``test`` split holds only (kind, color) pairs that never occur
in ``train`` / ``validation`` (see :func:`held_out_pairs`); every kind and every colour on its
own still occurs in training.

Everything is deterministic in the seed: example ``i`` of a split is rendered from a numpy
Generator seeded with ``(seed, split, i)``, so the same seed yields byte-identical examples.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import re
from typing import Any, Iterator

import numpy as np
from etils import epath
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

# --------------------------------------------------------------------------------------------
# Attributes, captions, zero-shot prompts
# --------------------------------------------------------------------------------------------

#: Class names per attribute, in label order. They are the words the captions use.
ATTRIBUTES: dict[str, list[str]] = {
    "kind": ["circle", "square", "triangle", "star", "cross", "diamond"],
    "color": ["red", "green", "blue", "yellow", "purple", "orange"],
    "size": ["small", "large"],
    # A 2x2 grid (index = row * GRID + col). Few cells on purpose: with 6 colours x 2 sizes x 4
    # positions = 48 cells, a batch of 256 holds ~5 images per image that differ from it ONLY in
    # kind, which is what forces the image tower to learn shape kind quickly (with a 3x3 grid a
    # small CLIP solved most of the batch from colour/size/position and left kind at chance).
    "position": ["top left", "top right", "bottom left", "bottom right"],
}

#: Side of the square grid of positions.
GRID = 2

#: Surface forms a caption may use for a class name (the class name itself comes first and is
#: the most frequent). Synonyms are deliberately few: enough that captions are not one fixed
#: string per attribute combination, few enough that zero-shot prompts with the class name work.
SYNONYMS: dict[str, dict[str, list[str]]] = {
    "size": {"small": ["small", "tiny", "little"], "large": ["large", "big"]},
    "position": {
        name: [name] + ([name.replace("top", "upper").replace("bottom", "lower")]
                        if ("top" in name or "bottom" in name) else [])
        for name in ATTRIBUTES["position"]
    },
}

#: Caption templates, indexed by the stored ``template_id``.
CAPTION_TEMPLATES: list[str] = [
    "a {size} {color} {kind} in the {position}",
    "{position}: a {size} {color} {kind}",
    "a {color} {kind}, {size}, at the {position}",
    "there is a {size} {color} {kind} in the {position}",
    "a {size} {kind} colored {color}, {position}",
    "the {position} has a {size} {color} {kind}",
    "{size} {color} {kind} at the {position}",
    "in the {position} there is a {color} {kind}, {size}",
]

#: Zero-shot prompts per attribute; ``{}`` is replaced by a class name of :data:`ATTRIBUTES`.
#: Phrased like the captions, mentioning only the one attribute.
ZERO_SHOT_TEMPLATES: dict[str, list[str]] = {
    "kind": ["a {}", "there is a {}", "a {} somewhere", "a {} in the image"],
    "color": ["a {} shape", "something {}", "a {} object", "there is a {} shape"],
    "size": ["a {} shape", "a {} object", "there is a {} shape", "something {}"],
    "position": [
        "a shape in the {}", "{}: a shape", "there is a shape in the {}", "something at the {}",
    ],
}

_ARTICLE = re.compile(r"\ba (?=[aeiou])")


def fix_articles(text: str) -> str:
    """'a orange circle' -> 'an orange circle' (the only article fix our words need)."""
    return _ARTICLE.sub("an ", text)


def zero_shot_prompts(attribute: str) -> list[list[str]]:
    """Prompts [n_classes][n_templates] for ``attribute``: templates filled with class names.

    Use these rather than formatting :data:`ZERO_SHOT_TEMPLATES` by hand: they get the article
    right ('an orange object'), as the captions do.
    """
    return [[fix_articles(t.format(name)) for t in ZERO_SHOT_TEMPLATES[attribute]]
            for name in ATTRIBUTES[attribute]]


def ensemble_prompts(attribute: str) -> list[list[str]]:
    """Prompt ensemble per class of ``attribute`` (CLIP-style prompt ensembling, Radford et al.
    2021 §3.1.4): the class name in every caption template, with every value of the OTHER
    attributes, e.g. for kind=circle "a small red circle in the top left", ... — [C][T] strings.

    Why not one-attribute prompts ("a circle")? Every training caption names all four
    attributes, so a partial description is out of the text tower's distribution; averaging
    full captions over the other attributes marginalizes them out instead.
    """
    others = [a for a in ATTRIBUTES if a != attribute]
    out = []
    for name in ATTRIBUTES[attribute]:
        prompts = []
        for template in CAPTION_TEMPLATES:
            for values in itertools.product(*(ATTRIBUTES[o] for o in others)):
                slots = dict(zip(others, values), **{attribute: name})
                prompts.append(fix_articles(template.format(**slots)))
        out.append(prompts)
    return out


SPLITS = ("train", "validation", "test")
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}

_NUM_KINDS = len(ATTRIBUTES["kind"])
_NUM_COLORS = len(ATTRIBUTES["color"])


def held_out_pairs() -> frozenset[tuple[int, int]]:
    """(kind, color) label pairs that occur only in the ``test`` split.

    Colour ``c`` is held out with kind ``c mod n_kinds``: one pair per colour and (with as many
    kinds as colours) one per kind, so each kind and each colour still has
    ``n - 1`` partners in training.
    """
    return frozenset((c % _NUM_KINDS, c) for c in range(_NUM_COLORS))


#: The held-out pairs as class names, e.g. ``('circle', 'red')``.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    (ATTRIBUTES["kind"][k], ATTRIBUTES["color"][c]) for k, c in held_out_pairs()
)


@functools.lru_cache(maxsize=None)
def _pairs_for_split(split: str) -> list[tuple[int, int]]:
    held = held_out_pairs()
    all_pairs = [(k, c) for k in range(_NUM_KINDS) for c in range(_NUM_COLORS)]
    if split == "test":
        return sorted(held)
    return [p for p in all_pairs if p not in held]


def vocabulary_texts() -> list[str]:
    """Every piece of text the dataset can produce or prompt with (for building a vocabulary).

    Covers all caption templates, all zero-shot templates and every class name and synonym, so
    a vocabulary built from it does not depend on which examples were sampled.
    """
    texts = [t.format(size="", color="", kind="", position="") for t in CAPTION_TEMPLATES]
    texts += [t.format("") for ts in ZERO_SHOT_TEMPLATES.values() for t in ts]
    texts += [name for names in ATTRIBUTES.values() for name in names]
    texts += [s for forms in SYNONYMS.values() for ss in forms.values() for s in ss]
    texts += ["an"]  # from fix_articles
    return texts


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

_RGB = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (145, 60, 190),
    "orange": (245, 140, 30),
}

# Shape "radius" (half its extent) as a fraction of the image side. The gap between the two
# ranges keeps the size label unambiguous; small stays >= ~15 px across at 64 px.
_RADIUS_FRACTION = {"small": (0.13, 0.155), "large": (0.245, 0.285)}

# Max rotation (degrees) that leaves the kind recognisable: a square turned 45 degrees reads as
# a diamond and a cross as an X, so those only wobble; stars and circles may turn freely.
_MAX_ROTATION = {"circle": 0.0, "square": 15.0, "triangle": 15.0, "star": 180.0, "cross": 15.0,
                 "diamond": 12.0}

_SUPERSAMPLE = 4  # draw at 4x and box-filter down: antialiased edges, cheap at these sizes


def _unit_polygon(kind: str) -> np.ndarray:
    """Vertices [V, 2] (x, y; y down) of a kind inside the unit circle, centred on the origin."""
    if kind == "circle":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        return 0.92 * np.stack([np.cos(t), np.sin(t)], axis=1)
    if kind == "square":
        h = 0.78
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    if kind == "triangle":
        # Equilateral, pointing up, shifted so its bounding box (not centroid) is centred.
        t = np.deg2rad([-90, 30, 150])
        return np.stack([np.cos(t), np.sin(t) + 0.25], axis=1)
    if kind == "star":
        t = np.deg2rad(np.arange(10) * 36 - 90)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t) + 0.05], axis=1)
    if kind == "cross":
        a, w = 0.92, 0.3
        return np.array([[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w], [w, a], [-w, a],
                         [-w, w], [-a, w], [-a, -w], [-w, -w]])
    if kind == "diamond":
        return np.array([[0.0, -1.0], [0.62, 0.0], [0.0, 1.0], [-0.62, 0.0]])
    raise ValueError(f"unknown kind {kind!r}")


_UNIT_POLYGONS = {k: _unit_polygon(k) for k in ATTRIBUTES["kind"]}


@functools.lru_cache(maxsize=8)
def _unit_grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (y, x), each float32 [s, s] in [-0.5, 0.5)."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / np.float32(s) - np.float32(0.5)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def render_example(
    rng: np.random.Generator, kind: int, color: int, size: int, position: int, image_size: int
) -> np.ndarray:
    """Renders one image; returns uint8 [image_size, image_size, 3].

    Jitter (all from ``rng``): sub-cell offset of the centre, radius within the size's range,
    rotation within what keeps the kind recognisable, slight per-channel colour shift (hue stays
    put), and a background of a random grey level, tint, linear gradient and pixel noise.
    """
    s = image_size
    kind_name = ATTRIBUTES["kind"][kind]
    size_name = ATTRIBUTES["size"][size]

    lo, hi = _RADIUS_FRACTION[size_name]
    radius = rng.uniform(lo, hi) * s
    # Centres lie on a GRID x GRID lattice inside the area the shape can occupy without
    # clipping, inset by the jitter amplitude so jitter never pushes a shape off the canvas;
    # the jitter (< half the spacing) never makes neighbouring positions overlap.
    margin = 1.08 * radius + 0.03 * s
    jitter = 0.15 * (s - 2 * margin)
    inner = margin + jitter
    spacing = (s - 2 * inner) / (GRID - 1)
    row, col = divmod(position, GRID)
    cx = inner + col * spacing + rng.uniform(-1.0, 1.0) * jitter
    cy = inner + row * spacing + rng.uniform(-1.0, 1.0) * jitter

    angle = np.deg2rad(rng.uniform(-1.0, 1.0) * _MAX_ROTATION[kind_name])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = (_UNIT_POLYGONS[kind_name] @ rot.T) * radius + np.array([cx, cy])

    big = s * _SUPERSAMPLE
    mask_img = Image.new("L", (big, big), 0)
    ImageDraw.Draw(mask_img).polygon([tuple(p) for p in (pts * _SUPERSAMPLE)], fill=255)
    mask = np.asarray(mask_img.resize((s, s), Image.Resampling.BOX), np.float32)[..., None] / 255

    # Background: a mid grey (every shape colour stands out from it by hue or brightness) with a
    # random tint, a linear gradient and pixel noise, so "uniform background" is not a cue.
    yy, xx = _unit_grid(s)
    f32 = np.float32
    grad_dir = rng.uniform(0, 2 * np.pi)
    gradient = (f32(np.cos(grad_dir)) * xx + f32(np.sin(grad_dir)) * yy) * f32(rng.uniform(0, 40))
    bg = (rng.uniform(95, 165) + rng.uniform(-12, 12, size=3)).astype(f32) + gradient[..., None]

    fg = np.array(_RGB[ATTRIBUTES["color"][color]], f32)
    fg = fg * f32(rng.uniform(0.9, 1.08)) + rng.uniform(-12, 12, size=3).astype(f32)
    # Mild shading across the shape so it is not a flat fill.
    shade_dir = rng.uniform(0, 2 * np.pi)
    shade = f32(1.0) + f32(0.25) * (f32(np.cos(shade_dir)) * xx + f32(np.sin(shade_dir)) * yy)
    img = bg + mask * (fg * shade[..., None] - bg)
    img += rng.standard_normal(size=(s, s, 3), dtype=f32) * f32(6.0)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_caption(
    rng: np.random.Generator, kind: int, color: int, size: int, position: int
) -> tuple[str, int]:
    """Returns (caption, template_id); the words come from :data:`SYNONYMS` / class names."""
    template_id = int(rng.integers(len(CAPTION_TEMPLATES)))

    def surface(attr: str, label: int) -> str:
        name = ATTRIBUTES[attr][label]
        forms = SYNONYMS.get(attr, {}).get(name, [name])
        # The class name itself half the time, else a synonym (if any).
        if len(forms) == 1 or rng.uniform() < 0.5:
            return name
        return forms[1 + int(rng.integers(len(forms) - 1))]

    caption = fix_articles(CAPTION_TEMPLATES[template_id].format(
        kind=ATTRIBUTES["kind"][kind],
        color=ATTRIBUTES["color"][color],
        size=surface("size", size),
        position=surface("position", position),
    ))
    return caption, template_id


#: Length of the ``attributes`` feature: one-hot blocks for kind, colour, size, position.
ATTRIBUTE_VECTOR_DIM = sum(len(v) for v in ATTRIBUTES.values())

#: Standard deviation of the Gaussian noise on the ``attributes`` vector.
ATTRIBUTE_NOISE = 0.3


def attribute_vector(seed: int, split: str, index: int, kind: int, color: int, size: int,
                     position: int) -> np.ndarray:
    """The ``attributes`` feature: float32 [ATTRIBUTE_VECTOR_DIM], the concatenated one-hot codes
    of (kind, color, size, position) plus N(0, ATTRIBUTE_NOISE^2) noise -- a small third view of
    the same scene (e.g. for Symile's third tower).

    The noise has its own RNG stream (seeded with ``(seed, split, index, 1)``), so adding this
    feature left every image, caption and label of the dataset byte-identical.
    """
    vec = np.zeros(ATTRIBUTE_VECTOR_DIM, np.float32)
    offset = 0
    for attr, label in zip(ATTRIBUTES, (kind, color, size, position)):
        vec[offset + label] = 1.0
        offset += len(ATTRIBUTES[attr])
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index, 1])
    return vec + rng.standard_normal(ATTRIBUTE_VECTOR_DIM).astype(np.float32) * np.float32(ATTRIBUTE_NOISE)


def generate_example(seed: int, split: str, index: int, image_size: int) -> dict[str, Any]:
    """Example ``index`` of ``split``: image uint8 [S, S, 3], caption str, int labels, and the
    ``attributes`` vector float32 [ATTRIBUTE_VECTOR_DIM] (:func:`attribute_vector`).

    A pure function of its arguments (the RNG is seeded with ``(seed, split, index)``), which is
    what makes the dataset deterministic and independent of generation order.
    """
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    pairs = _pairs_for_split(split)
    kind, color = pairs[int(rng.integers(len(pairs)))]
    size = int(rng.integers(len(ATTRIBUTES["size"])))
    position = int(rng.integers(len(ATTRIBUTES["position"])))
    image = render_example(rng, kind, color, size, position, image_size)
    caption, template_id = make_caption(rng, kind, color, size, position)
    attributes = attribute_vector(seed, split, index, kind, color, size, position)
    return dict(image=image, caption=caption, kind=kind, color=color, size=size,
                position=position, template_id=template_id, attributes=attributes)


# --------------------------------------------------------------------------------------------
# TFDS builder
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """One setting of the generator; its name encodes every parameter (see :func:`config_name`)."""

    image_size: int = 64
    num_train: int = 20000
    num_validation: int = 1000
    num_test: int = 2000
    seed: int = 0


def config_name(image_size: int, num_train: int, num_validation: int, num_test: int,
                seed: int) -> str:
    """E.g. ``s64_n20000_1000_2000_seed0``: distinct settings get distinct directories."""
    return f"s{image_size}_n{num_train}_{num_validation}_{num_test}_seed{seed}"


def make_config(image_size: int = 64, num_train: int = 20000, num_validation: int = 1000,
                num_test: int = 2000, seed: int = 0) -> ShapesConfig:
    for field, value in dict(image_size=image_size, num_train=num_train,
                             num_validation=num_validation, num_test=num_test).items():
        if int(value) <= 0:
            raise ValueError(f"shapes dataset: {field} must be positive, got {value}")
    if image_size < 16:
        raise ValueError(f"shapes dataset: image_size must be >= 16 px, got {image_size}")
    return ShapesConfig(
        name=config_name(image_size, num_train, num_validation, num_test, seed),
        description=(f"{image_size}px images; {num_train}/{num_validation}/{num_test} "
                     f"train/validation/test examples; generator seed {seed}"),
        image_size=int(image_size), num_train=int(num_train),
        num_validation=int(num_validation), num_test=int(num_test), seed=int(seed),
    )


class Shapes(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of the ``shapes`` dataset (array_record; read without TensorFlow)."""

    VERSION = tfds.core.Version("3.2.0")
    RELEASE_NOTES = {
        "1.0.0": "First release (3x3 positions).",
        "2.0.0": "2x2 positions.",
        "3.0.0": "Images stored as raw uint8 tensors instead of PNG.",
        "3.1.0": "Adds 'attributes' (noisy one-hot attribute vector, a third modality); every "
                 "other feature unchanged.",
        "3.2.0": "'image' stored as one bytes field (Encoding.BYTES) instead of a list of int64: "
                 "the same pixels, ~6x faster to read back.",
    }
    BUILDER_CONFIGS = [make_config()]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds' lookup of the defining file goes through the optional `importlib_resources`
        # package (not a dependency of ours); the file is simply this one.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        s = cfg.image_size
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({
                # Raw uint8, not PNG: the noisy backgrounds make PNG only ~1.5x smaller, and
                # decoding it cost ~1 ms/example on the training host, a third of a 2-core
                # machine's time at quickstart speed. (User datasets keep encoded images.) As one
                # bytes field: tfds' default for a Tensor is a protobuf list of int64, which
                # numpy converted at ~0.9 ms per 64x64 image, the same cost again.
                "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8,
                                              encoding=tfds.features.Encoding.BYTES),
                "caption": tfds.features.Text(),
                "kind": tfds.features.ClassLabel(names=ATTRIBUTES["kind"]),
                "color": tfds.features.ClassLabel(names=ATTRIBUTES["color"]),
                "size": tfds.features.ClassLabel(names=ATTRIBUTES["size"]),
                "position": tfds.features.ClassLabel(names=ATTRIBUTES["position"]),
                "template_id": tfds.features.Scalar(dtype=np.int32),
                "attributes": tfds.features.Tensor(shape=(ATTRIBUTE_VECTOR_DIM,), dtype=np.float32),
            }),
            supervised_keys=None,
            # Keep generation order on disk: record i of a split is generate_example(i).
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        cfg = self.builder_config
        sizes = {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}
        return {split: self._generate_examples(split, n) for split, n in sizes.items()}

    def _generate_examples(self, split: str, num_examples: int) -> Iterator[tuple[int, dict]]:
        cfg = self.builder_config
        yield from enumerate(generate_split(cfg.seed, split, num_examples, cfg.image_size))


#: Below this many examples a split is rendered in-process: starting worker interpreters
#: (~2 s each, they import this module) would cost more than it saves.
PARALLEL_MIN_EXAMPLES = 4000

_CHUNK = 256  # examples per pickled message from a render worker

# Run by each worker interpreter: the pickles go to a duplicate of fd 1, and fd 1 itself is
# pointed at stderr, so a stray print or warning cannot corrupt the stream.
_WORKER_CODE = (
    "import os; out = os.fdopen(os.dup(1), 'wb'); os.dup2(2, 1)\n"
    "from contrastive_jax.data.shapes import _render_chunks\n"
    "_render_chunks({seed}, {split!r}, {n}, {size}, {first}, {stride}, out)\n"
)


def _render_chunks(seed: int, split: str, num_examples: int, image_size: int, first: int,
                   stride: int, out) -> None:
    """Worker side of :func:`generate_split`: pickles chunks first, first + stride, ... (each a
    list of up to ``_CHUNK`` examples, in index order) to the binary stream ``out``."""
    import pickle

    for c in range(first, -(-num_examples // _CHUNK), stride):
        lo, hi = c * _CHUNK, min(num_examples, (c + 1) * _CHUNK)
        pickle.dump([generate_example(seed, split, i, image_size) for i in range(lo, hi)], out,
                    protocol=pickle.HIGHEST_PROTOCOL)
    out.flush()


def generate_split(seed: int, split: str, num_examples: int, image_size: int,
                   workers: int | None = None) -> Iterator[dict[str, Any]]:
    """``generate_example(seed, split, i, image_size)`` for i = 0 .. num_examples-1, in order.

    Rendering (~1 ms/example at 64 px, PIL + numpy) runs in ``workers`` separate interpreters
    (default: one per usable CPU up to 8, serial below :data:`PARALLEL_MIN_EXAMPLES`), each rendering every
    ``workers``-th chunk of ``_CHUNK`` examples while this process writes the records. Plain
    ``python -c`` subprocesses rather than a ``multiprocessing`` pool: a spawned pool re-imports
    the caller's ``__main__``, so a script without an ``if __name__ == '__main__'`` guard would
    recurse (and the pool would hang respawning dead workers); a forked one is unsafe once jax's
    threads exist. Every example is a pure function of its index, so the output is identical
    for any number of workers.
    """
    if workers is None:
        # The CPUs this process may use (a container's share, not the host's count), at most
        # 8: each worker interpreter holds ~300 MB once tensorflow_datasets is imported.
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = min(usable, 8) if num_examples >= PARALLEL_MIN_EXAMPLES else 1
    if workers <= 1:
        for i in range(num_examples):
            yield generate_example(seed, split, i, image_size)
        return
    import pickle
    import subprocess
    import sys

    procs = [subprocess.Popen(
        [sys.executable, "-c", _WORKER_CODE.format(seed=int(seed), split=str(split), n=int(num_examples),
                                                   size=int(image_size), first=k, stride=workers)],
        stdout=subprocess.PIPE) for k in range(workers)]
    try:
        for c in range(-(-num_examples // _CHUNK)):
            proc = procs[c % workers]
            try:
                chunk = pickle.load(proc.stdout)
            except EOFError:
                raise RuntimeError(
                    f"shapes dataset: render worker {c % workers} for split {split!r} exited with "
                    f"code {proc.wait()} before chunk {c} (its traceback is on stderr above)") from None
            yield from chunk
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()
            proc.wait()


def make_builder(data_config) -> Shapes:
    """An (unprepared) :class:`Shapes` builder for ``config.data``; fields listed in the module."""
    cfg = make_config(
        image_size=data_config.image_size,
        num_train=data_config.num_train,
        num_validation=data_config.num_validation,
        num_test=data_config.num_test,
        seed=data_config.dataset_seed,
    )
    # The default setting is a registered BuilderConfig, and tfds refuses a second object with
    # the same name, so reuse the registered one.
    cfg = Shapes.builder_configs.get(cfg.name, cfg)
    data_dir = os.path.expanduser(os.fspath(data_config.data_dir))
    return Shapes(data_dir=data_dir, config=cfg, file_format="array_record")


def prepare(data_config) -> dict[str, Any]:
    """Generates the dataset if it is not on disk yet; returns {split: random-access source}.

    Each source supports ``len()`` and ``source[i]`` -> dict with ``image`` uint8 [S, S, 3],
    ``caption`` bytes (UTF-8), int64 ``kind``/``color``/``size``/``position``, int32
    ``template_id``.
    """
    builder = make_builder(data_config)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(
            try_download_gcs=False,  # generated locally; never look for a prebuilt copy
            compute_stats=tfds.download.ComputeStatsMode.SKIP,
        ),
    )
    return builder.as_data_source()
