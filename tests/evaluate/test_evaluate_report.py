"""Zero-shot extras (templates files, multi-label mAP) and the PNG report / `report` command."""
import json
import os

import numpy as np
import pytest

from contrastive_jax import evaluate
from contrastive_jax.evaluate import report


def test_builtin_imagenet_templates_and_template_files(tmp_path):
    t = evaluate.load_templates("imagenet")
    assert len(t) == 80 and len(set(t)) == 80 and all(x.count("{}") == 1 for x in t)
    assert "a photo of a {}." in t
    f = tmp_path / "t.txt"
    f.write_text("# comment\na {} here\n\nthe {}\n")
    assert evaluate.load_templates(str(f)) == ["a {} here", "the {}"]
    f.write_text("no slot\n")
    with pytest.raises(ValueError, match=r"t.txt.*exactly one"):
        evaluate.load_templates(str(f))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        evaluate.read_lines(str(tmp_path / "missing.txt"))


def test_average_precision_matches_sklearn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the test-only reference")
    rng = np.random.default_rng(0)
    for _ in range(5):
        scores = rng.integers(0, 6, size=40).astype(float)  # many ties
        pos = rng.random(40) < 0.3
        assert evaluate.average_precision(scores, pos) == pytest.approx(metrics.average_precision_score(pos, scores))
    # Hand case: ranking pos, neg, pos -> (1/1 + 2/3) / 2.
    assert evaluate.average_precision(np.array([3.0, 2.0, 1.0]), np.array([1, 0, 1], bool)) == pytest.approx(5 / 6)


def test_zero_shot_multilabel():
    image = np.array([[1, 0, 0], [0, 1, 0], [0.6, 0.8, 0]], np.float32)
    classes = np.eye(3, dtype=np.float32)
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0]])
    out = evaluate.zero_shot_multilabel(image, classes, labels)
    # precision@1: image 0 -> class 0 (yes), image 1 -> class 1 (yes), image 2 -> class 1 (yes).
    assert out["precision@1"] == 1.0
    # Class 0 ranks images by [1, 0, 0.6]: positives 0 and 1 -> ranks 1 and 3 -> (1 + 2/3) / 2.
    assert out["per_class_ap"][0] == pytest.approx(5 / 6)
    assert np.isnan(out["per_class_ap"][2])  # no positive
    assert out["mAP"] == pytest.approx((5 / 6 + 1.0) / 2)


def fake_run(workdir):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as fh:
        for s in range(25, 201, 25):
            fh.write(json.dumps({"step": s, "train/loss": 4.0 - s / 100, "train/lr": 1e-3 * s / 200,
                                 "train/scale": 14.3 + s / 50}) + "\n")
            if s % 100 == 0:
                fh.write(json.dumps({"step": s, "eval/zeroshot/color/top1": s / 250,
                                     "eval/retrieval/image_to_text/R@1": s / 400, "eval/diag/alignment": "nan"}) + "\n")
    rng = np.random.default_rng(0)
    return {
        "per_class": {"color": {"names": ["red", "green", "blue"], "values": [1.0, 0.5, float("nan")],
                                "metric": "top-1 accuracy"}},
        "heatmap": {"similarity": rng.uniform(-1, 1, size=(4, 4)).tolist(), "captions": ["a", "b", "c", "d"]},
        "retrieval": {"image_queries": [0, 2], "image_to_text": [[0, 1], [2, 0]], "text_queries": [0, 2],
                      "text_to_image": [[1, 0], [2, 3]], "captions": {0: "red one", 1: "green one", 2: "blue one"},
                      "images": {i: rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8) for i in range(4)}},
    }


def test_write_report_and_report_command(tmp_path):
    import matplotlib.image

    from contrastive_jax import cli

    workdir = str(tmp_path / "run")
    details = fake_run(workdir)
    written = report.write_report(workdir, details=details)
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["accuracy.png", "loss.png", "lr_scale.png", "per_class_accuracy.png",
                     "retrieval_examples.png", "similarity_heatmap.png"]
    for p in written:
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200 and img.std() > 0.01
    # The details were saved; reloading them gives back the same pictures' inputs.
    back = report.load_details(os.path.join(workdir, report.DETAILS_FILE))
    assert back["retrieval"]["captions"] == details["retrieval"]["captions"]
    np.testing.assert_array_equal(back["retrieval"]["images"][3], details["retrieval"]["images"][3])
    assert back["per_class"]["color"]["names"] == ["red", "green", "blue"]
    # `contrastive-jax report WORKDIR` redraws the same files from the saved details.
    for p in written:
        os.remove(p)
    assert cli.main(["report", workdir]) == 0
    assert sorted(os.listdir(os.path.join(workdir, "report"))) == names


def test_report_curves_only_without_details(tmp_path):
    workdir = str(tmp_path / "run")
    fake_run(workdir)
    written = report.write_report(workdir)
    assert sorted(os.path.basename(p) for p in written) == ["accuracy.png", "loss.png", "lr_scale.png"]
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as fh:
            fh.write("{broken\n")
        # A broken line names the file and line (the line number of the broken record).
        lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as fh:
            fh.write("\n".join([lines[0], lines[-1]]) + "\n")
        report.read_metrics(workdir)
