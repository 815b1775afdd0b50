"""The benchmark's dataset table: name -> task, where it lives on disk, class names and templates.

Names are CLIP_benchmark's (``imagenet1k``, ``cars``, ``pets``, ``mscoco_captions`` ...; its
``vtab/`` prefix is dropped), so rows of ``benchmark.csv`` line up with the tables open_clip
publishes. Each dataset can be read from (a) a TFDS dataset prepared under ``--data-dir`` by its
TFDS name (:class:`TfdsSource`) and/or (b) CLIP_benchmark's WebDataset export under
``--wds-root`` (``<root>/<folder>/test/*.tar``; the folder names tried are
:attr:`BenchmarkDataset.wds_folders`).

Class names and templates ship in ``data/`` (JSON, no dependency at run time):
``classnames.json`` and ``templates.json`` hold CLIP's published class names and prompt templates
(Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
``data/prompts.md`` and the ImageNet prompt-engineering notebook of github.com/openai/CLIP), plus,
for the VTAB tasks the paper did not evaluate, the names/templates CLIP_benchmark uses;
``imagenet_subsets.json`` holds the 1,000 ImageNet WordNet ids in label order and the 200-class
subsets of ImageNet-A and ImageNet-R as index lists into them. See ``data/SOURCES.md``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

CLASSIFICATION = "zeroshot_classification"
RETRIEVAL = "zeroshot_retrieval"
COMPOSITIONAL = "compositional"

_DATA = os.path.join(os.path.dirname(__file__), "data")


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """Where a dataset lives in TFDS.

    Attributes:
      name: TFDS name, with its config when it has several (``'eurosat/rgb'``).
      split: the evaluation split (the test split where TFDS has one).
      image_key: the image feature.
      label_key: the int class label feature (classification).
      captions_key: the captions feature (retrieval), ``'captions/text'`` for a sequence of dicts.
      label_fn: a named transform of the example into the class id, for VTAB tasks whose label is
        derived (``'clevr_count'``: number of objects - 3).
    """

    name: str
    split: str = "test"
    image_key: str = "image"
    label_key: str = "label"
    captions_key: str | None = None
    label_fn: str | None = None


@dataclasses.dataclass(frozen=True)
class BenchmarkDataset:
    """One benchmark dataset.

    Attributes:
      name: CLIP_benchmark's name; task: :data:`CLASSIFICATION` or :data:`RETRIEVAL`.
      tfds: where it is in TFDS (None: only the WebDataset export exists for it).
      wds: CLIP_benchmark's dataset name of the WebDataset export (``'vtab/cifar10'``).
      names_key / templates_key: keys into the shipped ``classnames.json`` / ``templates.json``.
      subset: ``'imagenet-a'`` / ``'imagenet-r'``: the class names are this subset of ImageNet's.
      note: why a source is missing, shown to the user.
    """

    name: str
    task: str = CLASSIFICATION
    tfds: TfdsSource | None = None
    wds: str | None = None
    names_key: str | None = None
    templates_key: str | None = None
    subset: str | None = None
    note: str = ""

    @property
    def wds_folders(self) -> tuple[str, ...]:
        """Folder names tried under ``--wds-root``: ours, CLIP_benchmark's (``vtab/cifar10``), and
        the Hugging Face repository name of its export (``wds_vtab-cifar10``)."""
        cb = self.wds or self.name
        # (CLIP_benchmark's README also names a local mscoco export 'wds_vtab-mscoco_captions'.)
        return tuple(dict.fromkeys([self.name, cb, "wds_" + cb.replace("/", "-"), cb.replace("/", "-"),
                                    "wds_vtab-" + self.name]))


def _c(name, tfds=None, wds=None, names=None, templates=None, **kw) -> BenchmarkDataset:
    return BenchmarkDataset(name, CLASSIFICATION, tfds, wds or name, names or name, templates or names or name, **kw)


_IMAGENET = dict(names="imagenet1k", templates="imagenet1k")
DATASETS: dict[str, BenchmarkDataset] = {d.name: d for d in [
    # CLIP's evaluation set (paper Table 9) and the ImageNet robustness sets
    _c("imagenet1k", TfdsSource("imagenet2012", "validation")),
    _c("imagenetv2", TfdsSource("imagenet_v2"), **_IMAGENET),
    _c("imagenet_sketch", TfdsSource("imagenet_sketch"), **_IMAGENET),
    _c("imagenet-a", TfdsSource("imagenet_a"), subset="imagenet-a", **_IMAGENET),
    _c("imagenet-r", TfdsSource("imagenet_r"), subset="imagenet-r", **_IMAGENET),
    _c("food101", TfdsSource("food101", "validation")),
    _c("cifar10", TfdsSource("cifar10"), wds="vtab/cifar10"),
    _c("cifar100", TfdsSource("cifar100"), wds="vtab/cifar100"),
    _c("birdsnap", note="not in TFDS nor in CLIP_benchmark's export; convert it with `contrastive-jax data convert --format classes` and pass it by --datasets as a TFDS name"),
    _c("sun397", TfdsSource("sun397/tfds")),
    _c("cars", TfdsSource("cars196")),
    _c("fgvc_aircraft", note="not in TFDS: use CLIP_benchmark's export"),
    _c("voc2007", note="CLIP's VOC2007 crops objects from the detection set: use CLIP_benchmark's export"),
    _c("dtd", TfdsSource("dtd"), wds="vtab/dtd"),
    _c("pets", TfdsSource("oxford_iiit_pet"), wds="vtab/pets"),
    _c("caltech101", wds="vtab/caltech101",
       note="TFDS orders its classes alphabetically, CLIP's list does not: use CLIP_benchmark's export"),
    _c("flowers", TfdsSource("oxford_flowers102"), wds="vtab/flowers"),
    _c("mnist", TfdsSource("mnist")),
    _c("fer2013", note="not in TFDS: use CLIP_benchmark's export"),
    _c("stl10", TfdsSource("stl10")),
    # TFDS has only a train split of these: VTAB and CLIP_benchmark evaluate on their own split of it,
    # so only the export gives comparable numbers.
    _c("eurosat", wds="vtab/eurosat", note="TFDS has no test split: use CLIP_benchmark's export"),
    _c("resisc45", wds="vtab/resisc45", note="TFDS has no test split: use CLIP_benchmark's export"),
    _c("gtsrb", note="not in TFDS: use CLIP_benchmark's export"),
    _c("kitti_closest_vehicle_distance", wds="vtab/kitti_closest_vehicle_distance",
       note="the label is derived from KITTI's boxes: use CLIP_benchmark's export"),
    _c("country211", note="not in TFDS: use CLIP_benchmark's export"),
    _c("pcam", TfdsSource("patch_camelyon"), wds="vtab/pcam"),
    _c("clevr_count_all", TfdsSource("clevr", "validation", label_fn="clevr_count"), wds="vtab/clevr_count_all"),
    _c("renderedsst2", note="not in TFDS: use CLIP_benchmark's export"),
    # VTAB-only tasks
    _c("svhn", TfdsSource("svhn_cropped"), wds="vtab/svhn"),
    _c("diabetic_retinopathy", TfdsSource("diabetic_retinopathy_detection/btgraham-300"),
       wds="vtab/diabetic_retinopathy"),
    _c("dmlab", TfdsSource("dmlab"), wds="vtab/dmlab"),
    _c("clevr_closest_object_distance", wds="vtab/clevr_closest_object_distance",
       note="the label is derived from CLEVR's scene: use CLIP_benchmark's export"),
    _c("dsprites_label_x_position", wds="vtab/dsprites_label_x_position",
       note="TFDS has no test split: use CLIP_benchmark's export"),
    _c("dsprites_label_orientation", wds="vtab/dsprites_label_orientation",
       note="TFDS has no test split: use CLIP_benchmark's export"),
    _c("smallnorb_label_azimuth", TfdsSource("smallnorb", label_key="label_azimuth"),
       wds="vtab/smallnorb_label_azimuth"),
    _c("smallnorb_label_elevation", TfdsSource("smallnorb", label_key="label_elevation"),
       wds="vtab/smallnorb_label_elevation"),
    # retrieval (Karpathy test splits: COCO 5k images, Flickr30k 1k; about 5 captions per image)
    BenchmarkDataset("mscoco_captions", RETRIEVAL,
                     TfdsSource("coco_captions", "test", captions_key="captions/text")),
    BenchmarkDataset("flickr30k", RETRIEVAL, note="not in TFDS: use CLIP_benchmark's export"),
    BenchmarkDataset("flickr8k", RETRIEVAL, note="not in TFDS: use CLIP_benchmark's export"),
]}

# CLIP's 27-dataset zero-shot set (Table 9) less the three that are not image classification here
# (UCF101 and Kinetics700 are video, Hateful Memes is image+text); ImageNet stands for itself.
CLIP_SUITE = ("imagenet1k", "food101", "cifar10", "cifar100", "birdsnap", "sun397", "cars", "fgvc_aircraft",
              "voc2007", "dtd", "pets", "caltech101", "flowers", "mnist", "fer2013", "stl10", "eurosat", "resisc45",
              "gtsrb", "kitti_closest_vehicle_distance", "country211", "pcam", "clevr_count_all", "renderedsst2")
# VTAB's 19 natural / specialized / structured tasks (Zhai et al. 2019), by CLIP_benchmark's names.
VTAB_SUITE = ("caltech101", "cifar100", "dtd", "flowers", "pets", "sun397", "svhn", "pcam", "eurosat", "resisc45",
              "diabetic_retinopathy", "clevr_count_all", "clevr_closest_object_distance", "dmlab",
              "kitti_closest_vehicle_distance", "dsprites_label_x_position", "dsprites_label_orientation",
              "smallnorb_label_azimuth", "smallnorb_label_elevation")
ROBUSTNESS = ("imagenetv2", "imagenet_sketch", "imagenet-a", "imagenet-r")
RETRIEVAL_SUITE = ("mscoco_captions", "flickr30k")
SUITES = ("clip", "vtab", "retrieval", "compositional", "all")


@functools.lru_cache(maxsize=None)
def _json(name: str):
    with open(os.path.join(_DATA, name), encoding="utf-8") as fh:
        return json.load(fh)


def class_names(dataset: BenchmarkDataset) -> list[list[str]]:
    """Per class, its names: one for most datasets, several synonyms for some (CLIP's FER2013);
    prompts are made for every synonym and averaged together. ImageNet-A/R: their 200 classes."""
    raw = _json("classnames.json")[dataset.names_key]
    names = [[n] if isinstance(n, str) else list(n) for n in raw]
    if dataset.subset:
        names = [names[i] for i in _json("imagenet_subsets.json")[dataset.subset]]
    return names


def templates(dataset: BenchmarkDataset) -> list[str]:
    """Prompt templates with one ``{}`` each."""
    return list(_json("templates.json")[dataset.templates_key])


def imagenet_subset(name: str) -> list[int]:
    """Indices (ascending, into ImageNet's 1,000 classes) of ImageNet-A's or -R's 200 classes."""
    return list(_json("imagenet_subsets.json")[name])


def suite_names(suite: str, compositional: tuple[str, ...] = ()) -> list[str]:
    """The dataset names of a suite (``compositional``: the names the compositional module has)."""
    if suite == "clip":
        return list(CLIP_SUITE)
    if suite == "vtab":
        return list(VTAB_SUITE)
    if suite == "retrieval":
        return list(RETRIEVAL_SUITE)
    if suite == "compositional":
        return list(compositional)
    if suite == "all":
        return list(dict.fromkeys(CLIP_SUITE + ROBUSTNESS + VTAB_SUITE + RETRIEVAL_SUITE + tuple(compositional)))
    raise ValueError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
