"""Benchmark one contrastive loss implementation: forward+backward time, memory, GFLOP/s.

Prints ONE JSON line with: loss, impl, batch, dim, devices, dtype, block_size, median_s (median
wall time of one jitted forward+backward over --repeats runs, after one warm-up run), peak_rss_bytes
(peak resident memory of the whole process, ``resource.getrusage(...).ru_maxrss``: interpreter,
XLA, inputs, the loss's buffers and two N x N probe operands), gflops (achieved, from the median
time), matmul_gflops (median over repeats of the peak of a large jitted matmul in the same process
and dtype, probed right after each timed run so both see the same machine load),
frac_of_matmul_peak (median over repeats of achieved / probed-peak).

``--loss isogclr`` times iSogCLR's step (dense, the per-example state gathered and scattered).
``--loss`` also takes any objective of ``contrastive_jax.losses.OBJECTIVES`` that works on
image/text embeddings (dcl, dclw, hard_negative, cwcl, multi_positive, sigmoid_multi_positive,
distill, symile; default config.loss fields): it is built with ``make_objective`` and fed
``outputs = {image: x, text: y, attributes: z (symile), scale, bias}`` and ``batch = {group:
i // 4, teacher_image: x, teacher_text: y}`` (cwcl's targets are the image embeddings).

``--loss swav`` (Caron et al. 2020; :mod:`contrastive_jax.losses.swav`, default config.loss.swav
fields, no queue) treats x and y as the two global views of B examples: their scores against
``--prototypes`` K fixed unit prototypes (``[B, 2, K]``, computed inside the timed function, so
the gradient reaches x and y), Sinkhorn-Knopp codes and the swapped prediction. Its useful work is
about 6 * 2 * B * K * D (not the B^2 of the pairwise losses), so compare its time and memory, not
its gflops, with softmax at the same B and D.

FLOP count: 6 * B^2 * D for every loss, i.e. the useful matmul work of the dense algorithm
(forward logits 2*B^2*D, backward dx and dy 2*B^2*D each). ``chunked``/``ring`` actually run one
more logits matmul in the backward (recompute, 8 * B^2 * D) and elementwise work (exp, softplus)
is not counted, so the fraction is a conservative "useful work" efficiency.

``--loss moco`` (stateful, :mod:`contrastive_jax.losses.moco`): the image-text objective with
queues of ``--queue-size`` keys per modality (random unit vectors, all slots filled, sharded along
K; the enqueue is kept in the timed program) and the teacher's keys set to the student's
embeddings (the teacher's forward pass is a second model forward in the train step, not part of
this number); its useful FLOPs are ``8 * B * (B + K) * D`` (two directions, forward logits and the
query gradient; keys and queue get no gradient).

Example::

    python tools/bench_loss.py --loss softmax --impl chunked --batch 8192 --dim 512 --devices 1
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


# Objectives benchmarked through the registry (see the module docstring).
OBJECTIVE_NAMES = ["dcl", "dclw", "hard_negative", "cwcl", "multi_positive", "sigmoid_multi_positive", "distill",
                   "symile"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--loss", choices=["softmax", "sigmoid", "isogclr", *OBJECTIVE_NAMES, "moco", "swav", "filip"],
                   default="softmax")
    p.add_argument("--image-tokens", type=int, default=64, help="filip: image tokens per example")
    p.add_argument("--text-tokens", type=int, default=32, help="filip: text tokens per example")
    p.add_argument("--prototypes", type=int, default=3000, help="swav: number of prototypes K (paper: 3000)")
    p.add_argument("--queue-size", type=int, default=65536, help="moco: K keys per queue")
    # Checked after jax is imported (XLA_FLAGS first), by the library's one check: losses.IMPLS.
    p.add_argument("--impl", default="chunked", help="dense | chunked | ring (contrastive_jax.losses.IMPLS)")
    p.add_argument("--batch", type=int, default=8192, help="global batch B")
    p.add_argument("--dim", type=int, default=512, help="embedding dim D")
    p.add_argument("--devices", type=int, default=1, help="simulated CPU devices (mesh over all)")
    p.add_argument("--block-size", type=int, default=None, help="default: the library default")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    p.add_argument("--matmul-size", type=int, default=4096, help="edge of the peak-matmul probe")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Must happen before jax is imported anywhere.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from contrastive_jax import losses
    from contrastive_jax.losses.streaming import check_impl

    check_impl(args.impl)
    B, D = args.batch, args.dim
    dtype = jnp.dtype(args.dtype)
    block = args.block_size or losses.DEFAULT_BLOCK_SIZE
    mesh = Mesh(np.array(jax.devices()[: args.devices]), ("data",)) if args.devices > 1 else None
    sharding = NamedSharding(mesh, P("data")) if mesh is not None else None

    # FILIP scores token sequences: x [B, Li, D], y [B, Lt, D] (unit tokens) instead of [B, D].
    tokens = ((args.image_tokens,), (args.text_tokens,)) if args.loss == "filip" else ((), ())

    def make(key):
        kx, ky = jax.random.split(key)
        x = jax.random.normal(kx, (B, *tokens[0], D), jnp.float32)
        y = jax.random.normal(ky, (B, *tokens[1], D), jnp.float32)
        if not args.loss == "filip":
            y = x + y
        x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        y = y / jnp.linalg.norm(y, axis=-1, keepdims=True)
        return x.astype(dtype), y.astype(dtype)

    out_shardings = (sharding, sharding) if sharding is not None else None
    x, y = jax.jit(make, out_shardings=out_shardings)(jax.random.key(0))

    kw = dict(impl=args.impl, block_size=block, mesh=mesh)
    if args.loss == "softmax":
        def loss_fn(x, y, s, b):
            return losses.softmax_contrastive_loss(x, y, scale=s, **kw)
    elif args.loss == "sigmoid":
        def loss_fn(x, y, s, b):
            return losses.sigmoid_contrastive_loss(x, y, scale=s, bias=b, **kw)
    elif args.loss == "filip":
        # Token-wise late interaction (the objective's own impls: dense | chunked); tiles of
        # --block-size images x texts (default 32), no token pruning.
        fblock = args.block_size or 32
        block = fblock

        def loss_fn(x, y, s, b):
            return losses.filip_loss(x, y, scale=s, impl=args.impl, block_size=fblock, mesh=mesh,
                                     batch_axes=("data",) if mesh is not None else None)
    elif args.loss == "isogclr":
        # Stateful: N = B per-example slots (first visit; both branches of the u update are
        # computed either way), impl forced to 'dense' (the only one it has). The new state enters
        # the returned value through 0 * sum(state) so XLA keeps the gather / update / scatter.
        from contrastive_jax.losses import config as loss_config

        cfg = loss_config.defaults()
        cfg.update(name="isogclr", impl="dense")
        cfg.isogclr.num_examples = B
        objective = losses.make_objective(cfg, mesh, ("data",) if mesh is not None else None)
        ids = jnp.arange(B, dtype=jnp.int32)
        iso_state = objective.init_state()

        def loss_fn(x, y, s, b):
            loss, _, new = objective(dict(image=x, text=y, scale=s, bias=b), dict(example_id=ids), iso_state, 0)
            return loss + 0.0 * sum(jnp.sum(v) for v in jax.tree.leaves(new))
    elif args.loss == "moco":
        from contrastive_jax.losses import config as loss_config

        cfg = loss_config.defaults()
        cfg.update(name="moco", impl=args.impl, block_size=block)
        cfg.moco.update(mode="image_text", queue_size=args.queue_size, embed_dim=D, learned_scale=True)
        objective = losses.make_objective(cfg, mesh, ("data",) if mesh is not None else None)
        K = args.queue_size
        unit = lambda a: a / jnp.linalg.norm(a, axis=1, keepdims=True)
        queue_sh = NamedSharding(mesh, P("data")) if mesh is not None else None
        moco_state = {name: jax.jit(lambda key: unit(jax.random.normal(key, (K, D), jnp.float32)),
                                    out_shardings=queue_sh)(jax.random.key(7 + i))
                      for i, name in enumerate(("queue_image", "queue_text"))}
        moco_state.update(ptr=jnp.int32(0), filled=jnp.int32(K))

        def loss_fn(x, y, s, b):
            out = dict(image=x, text=y, scale=s, teacher=dict(image=x, text=y))
            loss, _, new = objective(out, {}, moco_state, jnp.int32(0))
            return loss + 0.0 * (jnp.sum(new["queue_image"]) + jnp.sum(new["queue_text"]))
    elif args.loss == "swav":
        from contrastive_jax.losses import config as loss_config

        cfg = loss_config.defaults()
        cfg.name = "swav"
        objective = losses.make_objective(cfg, mesh, ("data",) if mesh is not None else None)
        protos = jax.random.normal(jax.random.key(2), (args.prototypes, D), jnp.float32)
        protos = (protos / jnp.linalg.norm(protos, axis=1, keepdims=True)).astype(dtype)
        swav_state = objective.init_state()

        def loss_fn(x, y, s, b):
            scores = jnp.einsum("bvd,kd->bvk", jnp.stack([x, y], axis=1), protos,
                                preferred_element_type=jnp.float32)
            return objective({"image_views_scores": scores}, {}, swav_state, jnp.int32(0))[0]
    else:
        from contrastive_jax.losses import config as loss_config

        cfg = loss_config.defaults()
        cfg.update(name=args.loss, impl=args.impl, block_size=block)
        objective = losses.make_objective(cfg, mesh, ("data",) if mesh is not None else None)
        group = jnp.arange(B, dtype=jnp.int32) // 4

        def loss_fn(x, y, s, b):
            out = dict(image=x, text=y, scale=s, bias=b)
            if args.loss == "symile":
                z = x * y  # a third modality: any [B, D] array derived from the inputs
                out["attributes"] = z / jnp.linalg.norm(z.astype(jnp.float32), axis=1, keepdims=True).astype(z.dtype)
            return objective(out, dict(group=group, teacher_image=x, teacher_text=y))[0]

    out_sh = (None, (sharding, sharding, None, None)) if sharding is not None else None
    step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3)), out_shardings=out_sh)
    s, b = jnp.float32(10.0), jnp.float32(-10.0)
    t0 = time.perf_counter()
    compiled = step.lower(x, y, s, b).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        jax.block_until_ready(compiled(x, y, s, b))

    def timed_run():
        t0 = time.perf_counter()
        out = compiled(x, y, s, b)
        jax.block_until_ready(out)
        elapsed = time.perf_counter() - t0
        return elapsed, float(out[0])

    times = []
    t, loss_value = timed_run()
    times.append(t)
    # Peak RSS of the whole process (interpreter, XLA, inputs, the loss's buffers), read before
    # the matmul probe's operands exist.
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    # Matmul peak in the same process and dtype: an N^3 jitted matmul, probed right after every
    # timed loss run (best of 2), so that both see the same machine load (the CPU may be shared).
    N = args.matmul_size
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (N, N), jnp.float32).astype(dtype)
    c = jax.random.normal(kb, (N, N), jnp.float32).astype(dtype)
    mm = jax.jit(lambda a, c: jnp.dot(a, c, preferred_element_type=jnp.float32)).lower(a, c).compile()
    jax.block_until_ready(mm(a, c))

    def probe():
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            jax.block_until_ready(mm(a, c))
            best = min(best, time.perf_counter() - t0)
        return 2 * N**3 / best / 1e9

    peaks = [probe()]
    for _ in range(args.repeats - 1):
        t, loss_value = timed_run()
        times.append(t)
        peaks.append(probe())
    median = float(np.median(times))
    matmul_gflops = float(np.median(peaks))
    flops = (8 * B * (B + args.queue_size) * D if args.loss == "moco" else
             6 * B * B * args.image_tokens * args.text_tokens * D if args.loss == "filip" else 6 * B * B * D)
    frac = float(np.median([flops / t / 1e9 / p for t, p in zip(times, peaks)]))

    gflops = flops / median / 1e9
    print(json.dumps(dict(
        loss=args.loss, impl="dense" if args.loss == "isogclr" else args.impl, batch=B, dim=D, devices=args.devices, dtype=args.dtype,
        block_size=block, **({"prototypes": args.prototypes} if args.loss == "swav" else {}),
        **({"image_tokens": args.image_tokens, "text_tokens": args.text_tokens} if args.loss == "filip" else {}),
        median_s=round(median, 4), min_s=round(min(times), 4),
        times_s=[round(t, 4) for t in times],
        compile_s=round(compile_s, 2), peak_rss_bytes=int(peak_rss),
        peak_rss_gib=round(peak_rss / 2**30, 3), gflops=round(gflops, 1),
        matmul_gflops=round(matmul_gflops, 1), matmul_gflops_each=[round(p, 1) for p in peaks],
        frac_of_matmul_peak=round(frac, 3),
        loss_value=loss_value, jax=jax.__version__,
        **(dict(queue_size=args.queue_size) if args.loss == "moco" else {}),
    )))


if __name__ == "__main__":
    main()
