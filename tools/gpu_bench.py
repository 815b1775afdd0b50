"""One prepared GPU benchmark (issue 19, point 6), printing one JSON object.

Records, on whatever accelerator ``jax.devices()[0]`` is:

* ``train_step``: the real train step of ``configs/clip.py:vit_b16`` (ViT-B/16 at 224 px + the
  12-layer text tower, softmax loss, AdamW), built with ``contrastive_jax.train.build_training``
  (the loop's builder) with ``model.dtype='auto'`` (bf16 compute, fp32 params/optimizer on a
  GPU): median step time, examples/s, and MFU = (3 x forward FLOPs per example x batch / step
  time) / the device's datasheet dense bf16 peak (:data:`PEAK_BF16_FLOPS`, matched on
  ``device_kind``; MFU is null for an unknown device);
* ``loss``: the softmax loss's forward + backward on [B, D] embeddings at B = 65,536 (``--loss-batch``),
  ``impl='chunked'`` vs ``'dense'``: median time and the device's peak bytes in use
  (``memory_stats()['peak_bytes_in_use']``, reset between by running chunked first; dense may OOM,
  recorded as an error string);
* ``attention``: the same train step with ``attention_impl='cudnn'`` vs ``'xla'`` in both towers
  (cuDNN only where the backend supports it; an error string otherwise). The ``train_step`` run
  uses the default ``'auto'`` (cuDNN on a GPU in bf16), so that one is not compiled twice.

    python tools/gpu_bench.py                 # on the GPU machine; about 5 minutes on an H100
    python tools/gpu_bench.py --smoke         # tiny shapes on CPU, seconds (tested)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Datasheet dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by substring of device_kind.
# NVIDIA H100 SXM5 989.4 TF, H100 PCIe 756 TF, H200 (SXM) 989.4 TF, A100 312 TF.
PEAK_BF16_FLOPS = (
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100", 989.4e12),  # SXM / HBM3 parts report e.g. 'NVIDIA H100 80GB HBM3'
    ("A100", 312.0e12),
)


def peak_flops(device_kind: str) -> float | None:
    """Datasheet bf16 dense peak of ``device_kind`` in FLOP/s, or None when unknown (e.g. CPU)."""
    for key, value in PEAK_BF16_FLOPS:
        if key.lower() in device_kind.lower():
            return value
    return None


def _timed(fn, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


def _peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _train_config(args, attention: str | None):
    from contrastive_jax.train import load_config

    overrides = ["train.total_steps=100", "optim.warmup_steps=10", f"train.batch_size={args.batch}",
                 f"eval.batch_size={args.batch}", "model.dtype=auto", "data.normalize_on_device=True"]
    if args.smoke:
        overrides += ["model.image.width=32", "model.image.depth=1", "model.image.num_heads=2",
                      "model.image.mlp_dim=64", "model.text.width=32", "model.text.depth=1",
                      "model.text.num_heads=2", "model.text.mlp_dim=64", "model.text.vocab_size=64",
                      "model.text.eos_id=63", "model.embed_dim=32", "data.image_size=32", "model.image.patch_size=16",
                      "model.text.context_length=8", "data.max_text_len=8"]
    if attention:
        overrides += [f"model.image.attention_impl={attention}", f"model.text.attention_impl={attention}"]
    return load_config(os.path.join(REPO, "configs", "clip.py:vit_b16"), overrides)


def bench_train_step(args, attention: str | None = None) -> dict:
    """Median step time of the loop's train step on synthetic data, examples/s and MFU."""
    from contrastive_jax.models.inspect import model_summary
    from contrastive_jax.train import build_training

    config = _train_config(args, attention)
    training = build_training(config)
    sample = [jnp.zeros((2, *s.shape[1:]), s.dtype) for s in training.inputs]
    flops_per_example = model_summary(training.model, sample, batch_size=args.batch)["train_flops_per_example"]
    rng = np.random.default_rng(0)
    spec = training.batch_spec()
    host = {}
    for name, s in spec.items():
        if s.dtype == jnp.uint8:
            host[name] = rng.integers(0, 256, size=s.shape, dtype=np.uint8)
        elif jnp.issubdtype(s.dtype, jnp.integer):
            vocab = int(config.model.text.vocab_size)
            ids = rng.integers(1, vocab - 1, size=s.shape, dtype=np.int32)
            ids[:, -1] = int(config.model.text.eos_id)
            host[name] = ids
        else:
            host[name] = rng.standard_normal(s.shape).astype(np.float32)
    batch = training.device_batch(host)
    state = training.init_state(seed=0)
    t0 = time.perf_counter()
    state, metrics = training.step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = training.step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    peak = peak_flops(jax.devices()[0].device_kind)
    achieved = flops_per_example * args.batch / step_s / jax.device_count()
    return {"batch": args.batch, "devices": jax.device_count(), "compile_plus_first_step_seconds": round(compile_s, 2),
            "step_seconds": step_s, "step_seconds_all": [round(t, 5) for t in times],
            "examples_per_second": args.batch / step_s, "train_flops_per_example": flops_per_example,
            "achieved_flops_per_device": achieved, "mfu": (achieved / peak) if peak else None,
            "loss": float(metrics["loss"]), "peak_bytes_in_use": _peak_bytes()}


def bench_loss(args) -> dict:
    """Softmax loss forward + backward at B = ``--loss-batch``: chunked vs dense, time and peak memory."""
    from contrastive_jax.losses.contrastive import softmax_contrastive_loss

    b, d = args.loss_batch, args.loss_dim
    key_x, key_y = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (b, d), jnp.float32)
    y = jax.random.normal(key_y, (b, d), jnp.float32)
    x, y = x / jnp.linalg.norm(x, axis=-1, keepdims=True), y / jnp.linalg.norm(y, axis=-1, keepdims=True)
    out = {}
    for impl in ("chunked", "dense"):  # chunked first: the device's peak counter only grows
        fn = jax.jit(jax.value_and_grad(
            lambda a, c, impl=impl: softmax_contrastive_loss(a, c, scale=10.0, impl=impl, block_size=args.block_size),
            argnums=(0, 1)))
        try:
            compiled = fn.lower(x, y).compile()
            mem = compiled.memory_analysis()
            value, _ = compiled(x, y)
            jax.block_until_ready(value)
            times = _timed(lambda: compiled(x, y), args.steps)
            out[impl] = {"seconds": statistics.median(times), "loss": float(value),
                         "compiled_temp_bytes": int(mem.temp_size_in_bytes) if mem else None,
                         "device_peak_bytes_in_use": _peak_bytes()}
        except Exception as e:  # noqa: BLE001 - an OOM of the dense [B, B] logits is a result
            out[impl] = {"error": " ".join(str(e).split())[:300]}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, runs on CPU in seconds (for the tests)")
    p.add_argument("--batch", type=int, default=None, help="train-step global batch (default 256; smoke 8)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 10; smoke 2)")
    p.add_argument("--loss-batch", type=int, default=None, help="loss benchmark batch (default 65536; smoke 256)")
    p.add_argument("--loss-dim", type=int, default=512)
    p.add_argument("--block-size", type=int, default=None, help="chunked loss block (default 1024; smoke 64)")
    args = p.parse_args(argv)
    args.batch = args.batch or (8 if args.smoke else 256)
    args.steps = args.steps or (2 if args.smoke else 10)
    args.loss_batch = args.loss_batch or (256 if args.smoke else 65536)
    args.block_size = args.block_size or (64 if args.smoke else 1024)
    if args.smoke:
        args.loss_dim = min(args.loss_dim, 32)
    device = jax.devices()[0]
    out = {"device": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
           "jax": jax.__version__, "peak_flops": peak_flops(device.device_kind), "smoke": bool(args.smoke)}
    out["train_step"] = bench_train_step(args)
    out["loss_shape"] = {"batch": args.loss_batch, "dim": args.loss_dim, "block_size": args.block_size}
    out["loss"] = bench_loss(args)
    out["attention"] = {}
    for impl in ("xla", "cudnn"):
        if impl == "cudnn" and device.platform != "gpu":
            out["attention"][impl] = {"error": f"cudnn needs a GPU; this is {device.platform}"}
            continue
        from contrastive_jax.models.layers import resolve_attention_impl

        try:
            default_impl = resolve_attention_impl("auto", jnp.bfloat16, 64)
        except ValueError:
            default_impl = "xla"
        if impl == default_impl:
            # The train step above ran attention_impl='auto', which resolves to this one here
            # (cudnn on a GPU in bf16, xla on CPU): reuse it instead of compiling it again.
            out["attention"][impl] = {k: out["train_step"][k] for k in ("step_seconds", "examples_per_second", "mfu")}
            continue
        try:
            r = bench_train_step(args, attention=impl)
            out["attention"][impl] = {k: r[k] for k in ("step_seconds", "examples_per_second", "mfu")}
        except Exception as e:  # noqa: BLE001 - an unsupported shape/backend is a result
            out["attention"][impl] = {"error": " ".join(str(e).split())[:300]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
