"""Largest global batch for which ONE exact training step of the quickstart model fits in memory.

Compares, side by side in one run on this machine:

* ``baseline``: the dense loss, no micro-batching, float32 images (the whole batch's activations
  and the [B, B] logits live at once);
* ``gradcache``: the chunked loss + GradCache micro-batches (``train.microbatch_size``) + uint8
  images normalized per micro-batch on device (``data.normalize_on_device``).

Both are built with ``contrastive_jax.train.build_training``, the builder the training loop uses,
from the quickstart config plus the overrides above, so the step measured is the step such a run
executes. For each candidate B that jitted train step is compiled and XLA's buffer assignment
(``compiled.memory_analysis()``: arguments + temporaries + outputs, which is what the CPU
runtime allocates) is compared with the memory budget; a binary search finds the largest B that
fits. ``--run B`` additionally EXECUTES one step at that size (synthetic data) and reports its
wall time and the process's peak RSS, to show the step completes.

    python tools/bench_batch.py --budget-gib 20 [--run-baseline] [--run-gradcache B]

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from contrastive_jax.parallel import make_mesh  # noqa: E402
from contrastive_jax.train import build_training, load_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64


def _setup(mode: str, microbatch: int):
    """The loop's training for ``mode``: quickstart config, one device, a 10-step schedule."""
    overrides = ["train.total_steps=10", "optim.warmup_steps=0", f"model.text.vocab_size={VOCAB}"]
    if mode == "baseline":
        overrides += ["loss.impl=dense", "train.microbatch_size=0", "data.normalize_on_device=False"]
    else:
        overrides += ["loss.impl=chunked", f"train.microbatch_size={microbatch}", "data.normalize_on_device=True"]
    if mode != "baseline":
        overrides.append(f"train.batch_size={microbatch}")  # validation: the micro-batch divides the batch
    config = load_config(os.path.join(REPO, "configs", "quickstart.py:classic"), overrides)
    return build_training(config, make_mesh([("data", 1)]))


def _bytes_needed(training, batch: int) -> int:
    m = training.step.lower(training.abstract_state, training.batch_spec(batch)).compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes)


def largest_batch(setup, budget: int, granularity: int, lo: int, hi: int) -> tuple[int, int]:
    """Binary search over multiples of ``granularity``: largest B with bytes_needed(B) <= budget."""
    best, best_bytes = 0, 0
    lo, hi = lo // granularity, hi // granularity
    while lo <= hi:
        mid = (lo + hi) // 2
        need = _bytes_needed(setup, mid * granularity)
        if need <= budget:
            best, best_bytes, lo = mid * granularity, need, mid + 1
        else:
            hi = mid - 1
    return best, best_bytes


def run_one_step(training, batch: int) -> dict:
    state = training.init_state(seed=0)
    rng = np.random.default_rng(0)
    spec = training.batch_spec(batch)
    images = rng.integers(0, 256, size=spec["image"].shape, dtype=np.uint8)
    if spec["image"].dtype == jnp.float32:
        images = (images.astype(np.float32) / 255.0 - 0.5) / 0.5
    text = rng.integers(3, VOCAB, size=spec["text"].shape, dtype=np.int32)
    text[:, -1] = 1
    t0 = time.perf_counter()
    state, metrics = training.step(state, training.device_batch({"image": images, "text": text}))
    loss = float(metrics["loss"])
    return {"batch": batch, "step_seconds": time.perf_counter() - t0, "loss": loss,
            "log_batch": float(np.log(batch)), "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-gib", type=float, default=20.0, help="memory the step may use")
    parser.add_argument("--microbatch", type=int, default=256)
    parser.add_argument("--mode", choices=("both", "baseline", "gradcache"), default="both")
    parser.add_argument("--run", type=int, default=0, help="execute one step of --mode at this batch size")
    args = parser.parse_args()
    budget = int(args.budget_gib * 2**30)
    out = {"device": jax.devices()[0].device_kind, "budget_gib": args.budget_gib, "microbatch": args.microbatch}
    modes = ("baseline", "gradcache") if args.mode == "both" else (args.mode,)
    for mode in modes:
        setup = _setup(mode, args.microbatch)
        if args.run:
            out[f"{mode}_run"] = run_one_step(setup, args.run)
            continue
        gran = 256 if mode == "baseline" else args.microbatch * 16
        hi = 1 << 16 if mode == "baseline" else 1 << 22
        best, need = largest_batch(setup, budget, gran, gran, hi)
        out[mode] = {"largest_batch": best, "bytes_needed_gib": need / 2**30}
    if "baseline" in out and "gradcache" in out and out["baseline"]["largest_batch"]:
        out["ratio"] = out["gradcache"]["largest_batch"] / out["baseline"]["largest_batch"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
