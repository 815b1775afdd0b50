"""``tools/bench_vs_open_clip.py`` times the same training on both sides: checked on a tiny shape.

open_clip runs in the test: its CLIP, its ``ClipLoss`` and PyTorch's AdamW with open_clip's
weight-decay groups, three updates on one batch. Our step (built by ``build_training``, started
from open_clip's converted initial weights) must give the same losses, so the benchmark's ratio
compares the same computation, and the parameter counts must match (ours has one more scalar,
the sigmoid loss's logit bias).
"""
import importlib.util
import pathlib

import pytest

pytest.importorskip("open_clip", reason="open_clip_torch is not installed: the benchmark's peer ([test] extra)")

TOOL = pathlib.Path(__file__).resolve().parents[2] / "tools" / "bench_vs_open_clip.py"


def _bench(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOL.parent))  # as when run as a script: it imports bench_train
    spec = importlib.util.spec_from_file_location("bench_vs_open_clip", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_vs_open_clip_trains_the_same_model_as_open_clip(monkeypatch):
    bench = _bench(monkeypatch)
    args = bench.parse_args([
        "--batch", "8", "--image-size", "32", "--patch", "16", "--image-width", "64", "--image-layers", "2",
        "--text-width", "64", "--text-layers", "2", "--text-heads", "2", "--context", "16", "--vocab", "1000",
        "--embed-dim", "32", "--rounds", "1", "--steps", "1", "--warmup", "1", "--check-steps", "3",
        "--lr", "1e-2"])
    result = bench.run(args)
    assert result["params_ours"] == result["params_open_clip"] + 1
    assert len(result["loss_ours"]) == 3
    # lr 1e-2: three updates move the loss visibly, so agreement means the same optimizer too.
    assert abs(result["loss_open_clip"][2] - result["loss_open_clip"][0]) > 1e-3
    assert result["max_loss_diff"] < 1e-4, (result["loss_open_clip"], result["loss_ours"])
    assert result["examples_per_s_ours"][0] > 0 and result["examples_per_s_open_clip"][0] > 0
