"""Largest global batch for which ONE exact training step of the quickstart model fits in memory.

Compares, side by side in one run on this machine:

* ``baseline``: the dense loss, no micro-batching, float32 images (the whole batch's activations
  and the [B, B] logits live at once);
* ``gradcache``: the chunked loss + GradCache micro-batches (``train.microbatch_size``) + uint8
  images normalized per micro-batch on device (``data.normalize_on_device``).

For each candidate B the real jitted train step is compiled and XLA's buffer assignment
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

from contrastive_jax import models  # noqa: E402
from contrastive_jax.parallel import host_batch_to_global, make_mesh  # noqa: E402
from contrastive_jax.train import create_train_state, load_config, make_optimizer, make_train_step  # noqa: E402
from contrastive_jax.train.loop import model_config_for  # noqa: E402
from contrastive_jax.train.state import abstract_train_state  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64


class _Vocab:
    vocab_size = VOCAB


def _setup(mode: str, microbatch: int):
    impl = "dense" if mode == "baseline" else "chunked"
    config = load_config(os.path.join(REPO, "configs", "quickstart.py"), [f"loss.impl={impl}"])
    mesh = make_mesh([("data", 1)])
    model = models.build(model_config_for(config, _Vocab))
    tx, schedule = make_optimizer(config.optim, 10, warmup_steps=0)
    size, length = int(config.data.image_size), int(config.data.max_text_len)
    sample = [jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32), jax.ShapeDtypeStruct((1, length), jnp.int32)]
    abstract, shardings = abstract_train_state(model, tx, sample, rules=config.sharding.rules, mesh=mesh)
    step = make_train_step(model, tx, schedule, config.loss, mesh, ("data",), shardings,
                           microbatch_size=microbatch if mode == "gradcache" else 0,
                           image_mean=config.data.mean, image_std=config.data.std)
    image_dtype = jnp.float32 if mode == "baseline" else jnp.uint8
    return config, mesh, model, tx, sample, abstract, shardings, step, image_dtype, size, length


def _bytes_needed(setup, batch: int) -> int:
    *_, abstract, _, step, image_dtype, size, length = setup
    spec = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), image_dtype),
            "text": jax.ShapeDtypeStruct((batch, length), jnp.int32)}
    m = step.lower(abstract, spec).compile().memory_analysis()
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


def run_one_step(setup, batch: int) -> dict:
    config, mesh, model, tx, sample, _, _, step, image_dtype, size, length = setup
    state, _ = create_train_state(model, tx, sample, seed=0, rules=config.sharding.rules, mesh=mesh)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)
    if image_dtype == jnp.float32:
        images = (images.astype(np.float32) / 255.0 - 0.5) / 0.5
    text = rng.integers(3, VOCAB, size=(batch, length), dtype=np.int32)
    text[:, -1] = 1
    t0 = time.perf_counter()
    state, metrics = step(state, host_batch_to_global({"image": images, "text": text}, mesh, ("data",)))
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
