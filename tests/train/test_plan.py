"""The memory planner (``contrastive_jax.train.plan``, ``contrastive-jax plan``) and the GPU
benchmark's smoke mode (``tools/gpu_bench.py --smoke``)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from contrastive_jax.cli import main
from contrastive_jax.train import build_training, load_config
from contrastive_jax.train.plan import fit_config, loss_temporaries, parse_bytes, plan_memory
from tests.train.test_resilience import _env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")
BASE = ["train.total_steps=10", "model.text.vocab_size=64", "optim.warmup_steps=1"]


def _config(*overrides):
    return load_config(QUICKSTART + ":tiny", [*BASE, *overrides])


def test_plan_matches_compiled_memory_analysis():
    config = _config("train.batch_size=32", "eval.batch_size=32")
    plan = plan_memory(config, 2)
    # Independent count of the state: every parameter in float32, AdamW's two moments, replicated
    # over the 2-device data-only mesh; the batch split over 2 devices.
    training = build_training(config, jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",)))
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(training.abstract_state.params))
    assert plan.params == 4 * n_params
    assert plan.optimizer >= 2 * 4 * n_params
    spec = training.batch_spec()
    assert plan.batch == sum(math.prod(s.shape) * s.dtype.itemsize for s in spec.values()) // 2
    compiled = training.step.lower(training.abstract_state, spec).compile().memory_analysis()
    arguments = plan.params + plan.optimizer + plan.ema + plan.other_state + plan.batch
    assert abs(arguments - compiled.argument_size_in_bytes) <= 0.01 * compiled.argument_size_in_bytes
    peak = (compiled.argument_size_in_bytes + compiled.temp_size_in_bytes + compiled.output_size_in_bytes
            - compiled.alias_size_in_bytes)
    assert abs(plan.total - peak) <= 0.10 * peak


def test_loss_memory_flat_with_ring_grows_with_dense():
    """Fixed per-device batch 64, 1..8 devices: the ring loss's per-device temporaries stay flat
    from 2 devices on (within 15%: O(b*d + block^2); one device has no ring buffers to pass), the
    dense loss's grow with the global batch (its [b, B] logits)."""
    per_device = 64

    def temps(impl):
        out = []
        for n in (1, 2, 4, 8):
            b = per_device * n
            out.append(loss_temporaries(_config(f"loss.impl={impl}", "loss.block_size=64", f"train.batch_size={b}",
                                                f"eval.batch_size={b}"), n))
        return out

    ring, dense = temps("ring"), temps("dense")
    assert max(ring[1:]) <= 1.15 * min(ring[1:]), ring
    print("ring", ring, "dense", dense)
    assert dense[-1] >= 4 * dense[0], dense  # 8x the global batch: logits [64, 512] vs [64, 64]
    assert dense[-1] > 2 * ring[-1], (dense, ring)


def test_fit_overrides_compile_within_budget():
    # Remat already 'full' and the smallest block: the search is over micro-batch sizes only,
    # which keeps this test to a few small compiles.
    base = ["train.batch_size=64", "eval.batch_size=64", "loss.impl=chunked", "loss.block_size=32",
            "model.image.remat=full", "model.text.remat=full"]
    config = _config(*base)
    full = build_training(config, jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    m = full.step.lower(full.abstract_state, full.batch_spec()).compile().memory_analysis()
    need = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    budget = int(0.9 * need)  # 90% of what the config needs as it is
    fit = fit_config(config, 1, budget, headroom=0.0, max_tries=3)
    assert fit.overrides, fit.tried
    # Applied the way a user would (command-line strings) and compiled here, independently.
    args = [a[len("--config."):] for a in fit.override_args()]
    assert set(fit.overrides) == {"train.microbatch_size"}
    fitted = _config(*base, *args)
    training = build_training(fitted, jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    m = training.step.lower(training.abstract_state, training.batch_spec()).compile().memory_analysis()
    peak = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    assert peak <= budget


@pytest.mark.parametrize("argv, message", [
    (["--devices", "0"], "--devices 0 must be >= 1"),
    (["--devices", "two"], "is not an integer"),
    (["--device-memory", "80XB"], "not a positive size"),
    (["--device-memory", "0GiB"], "not a positive size"),
    (["--fit"], "--fit needs --device-memory"),
])
def test_bad_arguments_one_line_exit_2(argv, message, capsys):
    assert main(["plan", "--config", QUICKSTART + ":tiny", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("16GB") == 16 * 10**9
    assert parse_bytes("1.5 MiB") == int(1.5 * 2**20)
    assert parse_bytes("4096") == 4096


def test_cli_json_reports_fit(capsys):
    code = main(["plan", "--config", QUICKSTART + ":tiny", "--devices", "1", "--device-memory", "1GiB", "--json",
                 *[f"--config.{o}" for o in BASE]])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["fits"] is True
    assert out["plan"]["method"] == "compile" and out["plan"]["total"] == out["plan"]["compiled"]["peak"]


def test_gpu_bench_smoke_json_keys():
    env = _env(1)  # one device, with the suite's cheap-compile flags
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "gpu_bench.py"), "--smoke"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    for key in ("device", "peak_flops", "train_step", "loss", "attention"):
        assert key in out, out
    step = out["train_step"]
    assert step["step_seconds"] > 0 and step["examples_per_second"] > 0
    assert np.isfinite(step["loss"])
    assert set(out["loss"]) == {"chunked", "dense"} and all(v["seconds"] > 0 for v in out["loss"].values())
    assert out["loss"]["chunked"]["loss"] == pytest.approx(out["loss"]["dense"]["loss"], rel=1e-4)
    assert set(out["attention"]) >= {"xla"}
