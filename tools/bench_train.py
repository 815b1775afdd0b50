"""Benchmark the real train step: throughput (examples/s) and model FLOPs utilization (MFU).

Builds everything from a config (default ``configs/clip.py:vit_s16_96``: ViT-S/16 at 96 px, a
6-layer text tower, 384-d embedding) with ``contrastive_jax.train.build_training``, the builder
the training loop uses, so the step timed here is the step a run executes (both towers, the loss,
the optimizer update, and whatever the config sets: logical sharding, freezing, EMA, GradCache
micro-batches, uint8 images normalized on device); runs it on random inputs and prints ONE JSON
line:

- ``step_s``: median wall time of one step (``--steps`` timed steps after ``--warmup``).
- ``examples_per_s``: batch / step_s.
- ``train_flops_per_example``: 3 x forward matmul/conv FLOPs (``contrastive_jax.models.inspect``;
  elementwise work and remat recomputation not counted), plus the loss's similarity matmuls.
- ``matmul_peak_flops``: median FLOP/s of a jitted ``--matmul-size``-cubed matmul in the same dtype,
  probed right after every timed step so both see the same machine load.
- ``mfu``: median over steps of (FLOPs per example x batch / step time) / probed peak.
- ``components`` (``--components``): the same measurement for the bare image-tower and
  text-tower forward+backward (``jax.value_and_grad`` of a sum of the embeddings), to see where
  the step loses time relative to its towers.

Example::

    python tools/bench_train.py --batch 64 --steps 5
    python tools/bench_train.py --config configs/clip.py:vit_b16 --dtype bfloat16 --batch 128
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="config PATH[:ARG]; default configs/clip.py:vit_s16_96")
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model.dtype")
    p.add_argument("--matmul-size", type=int, default=2048, help="edge of the peak-matmul probe")
    p.add_argument("--components", action="store_true", help="also time each tower's fwd+bwd alone")
    p.add_argument("--override", action="append", default=[], help="config override a.b=v (repeatable)")
    return p.parse_args(argv)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TFDS_DISABLE_GCS", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from contrastive_jax.models.inspect import model_summary
    from contrastive_jax.train import build_training, load_config

    spec = args.config or os.path.join(root, "configs", "clip.py") + ":vit_s16_96"
    total = args.warmup + args.steps
    config = load_config(spec, [f"model.dtype={args.dtype}", f"train.batch_size={args.batch}",
                                f"train.total_steps={total}", *args.override])
    training = build_training(config)  # the loop's own builder: the step a run executes
    model, mesh = training.model, training.mesh
    inputs = [jax.ShapeDtypeStruct((args.batch, *s.shape[1:]), s.dtype) for s in training.inputs]
    summary = model_summary(model, inputs, batch_size=args.batch)
    flops_per_example = summary["train_flops_per_example"]
    state = training.init_state(seed=0)
    step = training.step

    rng = np.random.default_rng(0)
    batch = {}
    for name, s in training.batch_spec(args.batch).items():
        if s.dtype == jnp.uint8:  # data.normalize_on_device: raw pixels
            x = rng.integers(0, 256, size=s.shape, dtype=np.uint8)
        elif jnp.issubdtype(s.dtype, jnp.integer):  # token ids: 1..vocab-1, then pads
            vocab = int(config.model.text.vocab_size)
            x = rng.integers(1, vocab, size=s.shape).astype(np.int32)
            lengths = rng.integers(s.shape[1] // 2, s.shape[1] + 1, size=s.shape[0])
            x[np.arange(s.shape[1])[None] >= lengths[:, None]] = 0
        else:
            x = rng.normal(size=s.shape).astype(np.float32)
        batch[name] = x
    batch = training.device_batch(batch)

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    n = args.matmul_size
    a = jnp.asarray(rng.normal(size=(n, n)), dtype)
    b = jnp.asarray(rng.normal(size=(n, n)), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()

    def probe():
        times = []
        for _ in range(3):
            t = time.perf_counter()
            matmul(a, b).block_until_ready()
            times.append(time.perf_counter() - t)
        return 2 * n**3 / min(times)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_and_warmup_s = time.perf_counter() - t0
    step_times, peaks = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        step_times.append(time.perf_counter() - t)
        peaks.append(probe())
    step_s = statistics.median(step_times)
    mfus = [flops_per_example * args.batch / st / pk for st, pk in zip(step_times, peaks)]
    result = dict(
        config=os.path.relpath(spec, root) if os.path.isabs(spec.split(":")[0]) else spec,
        batch=args.batch,
        dtype=args.dtype,
        devices=len(mesh.devices.flat),
        step_s=round(step_s, 4),
        step_s_all=[round(t, 4) for t in step_times],
        examples_per_s=round(args.batch / step_s, 2),
        train_flops_per_example=flops_per_example,
        achieved_flops=round(flops_per_example * args.batch / step_s / 1e9, 2) * 1e9,
        matmul_peak_flops=round(statistics.median(peaks) / 1e9, 2) * 1e9,
        mfu=round(statistics.median(mfus), 4),
        loss=float(metrics["loss"]),
        compile_and_warmup_s=round(compile_and_warmup_s, 1),
        params=summary["total_params"],
        cpu=cpu_model() if jax.default_backend() == "cpu" else str(jax.devices()[0].device_kind),
        backend=jax.default_backend(),
        loadavg_1min=round(os.getloadavg()[0], 2),
        cpu_count=os.cpu_count(),
    )

    if args.components:
        params = state.params
        comps = {}
        for name, x in zip(training.modalities, [batch[m] for m in training.modalities]):
            fl = summary["towers"][name]["train_flops_per_example"] * args.batch

            def loss(p, x, name=name):
                return jnp.sum(model.apply({"params": p}, name, x, train=True, method="encode",
                                           rngs={"dropout": jax.random.key(0)}))

            fb = jax.jit(jax.value_and_grad(loss))
            jax.block_until_ready(fb(params, x))
            ts, pk = [], []
            for _ in range(args.steps):
                t = time.perf_counter()
                jax.block_until_ready(fb(params, x))
                ts.append(time.perf_counter() - t)
                pk.append(probe())
            comps[name] = dict(fwd_bwd_s=round(statistics.median(ts), 4),
                               mfu=round(statistics.median([fl / t / p for t, p in zip(ts, pk)]), 4))
        result["components"] = comps
    print(json.dumps(result))


if __name__ == "__main__":
    main()
