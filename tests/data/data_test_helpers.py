"""Builders shared by the tests in tests/data (imported by name: pytest puts this folder on sys.path).

The fixtures built from them (a generated ``shapes`` dataset, a converted user-data folder) are in
tests/data/conftest.py.
"""
import csv
import io
import os

import numpy as np
from PIL import Image

# The generated shapes dataset of the ``shapes_*`` fixtures.
N_TRAIN, N_VAL, N_TEST = 300, 40, 60
# Good images in the user-data folder of the ``user_folder`` fixture (plus 5 bad records).
N_GOOD = 36


def shapes_config(data_dir, **overrides):
    """``config.data`` for a small shapes dataset (N_TRAIN / N_VAL / N_TEST) under ``data_dir``."""
    from contrastive_jax.train.config import default_config  # not at import: conftest.py imports this

    cfg = default_config().data
    cfg.data_dir = str(data_dir)
    cfg.num_train, cfg.num_validation, cfg.num_test = N_TRAIN, N_VAL, N_TEST
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def user_config(data_dir, name, **overrides):
    """``config.data`` for dataset ``name`` under ``data_dir`` at 24 px; dict values update sub-configs."""
    from contrastive_jax.train.config import default_config

    c = default_config().data
    c.name, c.data_dir, c.image_size = name, str(data_dir), 24
    for k, v in overrides.items():
        if isinstance(v, dict):
            c[k].update(v)
        else:
            c[k] = v
    return c


def png(rng, h=28, w=36):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(rng, h=30, w=30):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_user_folder(root):
    """``root/imgs``: 36 good images (PNG/JPEG, 1-2 captions each) + 5 bad records, listed in
    ``root/captions.csv``. Returns ({file name: encoded bytes}, {file name: stripped captions})
    for the good ones."""
    rng = np.random.default_rng(0)
    os.makedirs(root / "imgs")
    files, captions, rows = {}, {}, []
    for i in range(N_GOOD):
        name = f"im{i:02d}.{'png' if i % 2 else 'jpg'}"
        blob = png(rng, 24 + i % 9) if i % 2 else jpeg(rng, 30, 24 + i % 7)
        (root / "imgs" / name).write_bytes(blob)
        files[name] = blob
        caps = [f"a photo number {i}"] + ([f"  Second   caption {i} "] if i % 3 == 0 else [])
        captions[name] = [c.strip() for c in caps]
        rows += [(name, c) for c in caps]
    good_jpeg = files["im00.jpg"]
    (root / "imgs" / "zero.jpg").write_bytes(b"")
    (root / "imgs" / "text.jpg").write_bytes(b"this is not an image")
    (root / "imgs" / "trunc.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (root / "imgs" / "blank.png").write_bytes(png(rng))
    rows += [("zero.jpg", "zero"), ("text.jpg", "text"), ("trunc.jpg", "trunc"),
             ("blank.png", " \t "), ("missing.jpg", "gone")]
    with open(root / "captions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows(rows)
    return files, captions
