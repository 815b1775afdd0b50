"""Input-pipeline throughput: decoded-and-augmented examples/s per grain worker count (JSON).

    python tools/bench_data.py                       # quickstart data (shapes, batch 256)
    python tools/bench_data.py --dataset jpeg --recipe simclr --views 2

``shapes``: the quickstart's own dataset and config (raw 64x64 arrays, no augmentation).
``jpeg``: a generated folder of JPEG photos (--photo-size px) converted with
``contrastive-jax data convert``, decoded with PIL and resized/augmented to --image-size.
Each worker count is timed in the same process run, one after another, after a warm-up of
--warmup batches; compare ratios, the machine may be shared.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time

import numpy as np


def _make_jpeg_dataset(root: str, n: int, photo_size: int) -> str:
    from PIL import Image

    from contrastive_jax.data.convert import convert

    os.makedirs(os.path.join(root, "photos"), exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        # Smooth gradients plus noise: JPEG sizes close to real photos at this resolution.
        yy, xx = np.mgrid[0:photo_size, 0:photo_size] / photo_size
        base = np.stack([xx, yy, (xx + yy) / 2], -1) * rng.uniform(50, 255, 3)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        name = f"{i:05d}.jpg"
        Image.fromarray(img).save(os.path.join(root, "photos", name), quality=90)
        rows.append((name, f"photo number {i}"))
    with open(os.path.join(root, "captions.csv"), "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    convert(os.path.join(root, "photos"), name="bench_photos", data_dir=os.path.join(root, "tfds"),
            captions=os.path.join(root, "captions.csv"), test_fraction=0.0, progress=False)
    return os.path.join(root, "tfds")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("shapes", "jpeg"), default="shapes")
    p.add_argument("--workers", default="0,1,2", help="comma-separated grain worker counts")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=20, help="timed batches per worker count")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--photo-size", type=int, default=256)
    p.add_argument("--num-photos", type=int, default=2048)
    p.add_argument("--recipe", choices=("none", "simclr"), default="none")
    p.add_argument("--views", type=int, default=1)
    p.add_argument("--data-dir", default=None, help="shapes: where it is (default: the config's)")
    args = p.parse_args()

    from contrastive_jax import data
    from contrastive_jax.train.config import load_config

    here = os.path.dirname(os.path.abspath(__file__))
    config = load_config(os.path.join(here, "..", "configs", "quickstart.py"))
    cfg = config.data
    tmp = None
    if args.dataset == "jpeg":
        tmp = tempfile.TemporaryDirectory()
        cfg.name, cfg.data_dir = "bench_photos", _make_jpeg_dataset(tmp.name, args.num_photos, args.photo_size)
        cfg.image_size = args.image_size
    elif args.data_dir:
        cfg.data_dir = args.data_dir
    cfg.num_views = args.views
    if args.recipe == "simclr":
        cfg.augment.update(crop="random_resized_crop", flip_prob=0.5, jitter_prob=0.8,
                           grayscale_prob=0.2, blur_prob=0.5)
    tokenizer = data.build_tokenizer(cfg)
    results = []
    for workers in (int(w) for w in args.workers.split(",")):
        cfg.worker_count = workers
        it = data.make_train_iterator(cfg, tokenizer=tokenizer, global_batch_size=args.batch,
                                      process_index=0, process_count=1)
        for _ in range(args.warmup):
            next(it)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        dt = time.perf_counter() - t0
        results.append({"workers": workers, "examples_per_s": round(args.batch * args.batches / dt, 1)})
        del it
    print(json.dumps({
        "benchmark": "data_pipeline", "dataset": args.dataset, "batch": args.batch,
        "image_size": int(cfg.image_size), "recipe": args.recipe, "views": args.views,
        "photo_size": args.photo_size if args.dataset == "jpeg" else None,
        "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "machine": platform.machine(), "results": results,
        "quickstart_consumption_examples_per_s": 350,
    }, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
