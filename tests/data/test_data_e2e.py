"""The README's "Your own data" path, end to end through the CLI: a folder of images + captions
CSV -> `contrastive-jax data convert` -> `contrastive-jax train` (quickstart tiny, one override for
the dataset) -> evaluation (retrieval only: the dataset has no class labels)."""
import csv
import json
import os

import numpy as np
from PIL import Image

from contrastive_jax import cli, data

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220)}


def test_folder_to_trained_and_evaluated_model(tmp_path):
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "photos")
    rows = []
    for i in range(60):
        name = list(COLORS)[i % 3]
        img = np.clip(np.array(COLORS[name]) + rng.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
        fname = f"p{i:03d}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(img).save(tmp_path / "photos" / fname)
        rows.append((fname, f"a {name} photo"))
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    rows.append(("broken.jpg", "a broken photo"))
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])

    tfds_dir = str(tmp_path / "tfds")
    rc = cli.main(["data", "convert", str(tmp_path / "photos"), "--captions", str(tmp_path / "captions.csv"),
                   "--name", "my_photos", "--data-dir", tfds_dir, "--test-fraction", "0.2",
                   "--no-progress"])
    assert rc == 0
    workdir = tmp_path / "run"
    rc = cli.main(["train", "--config", "configs/quickstart.py:tiny", "--workdir", str(workdir),
                   "--config.data.name=my_photos", f"--config.data.data_dir={tfds_dir}",
                   # Speed only: 2 small steps.
                   "--config.train.total_steps=2", "--config.eval.every_steps=0",
                   "--config.train.batch_size=16", "--config.loss.impl=dense",
                   "--config.log.progress=False", "--config.log.tensorboard=False"])
    assert rc == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["complete"] and summary["steps"] == 2
    ev = summary["eval"]
    n_test = ev["num_examples"]
    assert n_test > 0 and not any(k.startswith("zeroshot/") for k in ev)
    for k in ("retrieval/image_to_text/R@1", "retrieval/text_to_image/R@1"):
        assert 0.0 <= ev[k] <= 1.0
    # The saved tokenizer tokenizes exactly like the one the run built from the config.
    saved = data.load_tokenizer(workdir / "tokenizer.json")
    cfg = json.loads((workdir / "config.json").read_text())["data"]
    assert cfg["name"] == "my_photos"
    built = data.WordTokenizer.from_texts(["a red photo", "a green photo", "a blue photo"], saved.max_len)
    np.testing.assert_array_equal(saved.encode(["a blue photo", "a broken photo"]),
                                  built.encode(["a blue photo", "a broken photo"]))
