"""Benchmark: sharded streaming retrieval over a large random gallery; prints one JSON line.

    python tools/bench_retrieval.py --gallery 1000000 --dim 512 --queries 1024 [--devices 8]

The gallery (unit vectors) is generated on the devices, shard by shard in chunks, so it exists
once (Ng·D·4 bytes) and never on the host. Every query is a noisy copy of a known gallery item,
its positive; the run computes the exact pessimistic rank of that positive and the top-k list
(``evaluate.streaming_retrieval``). Reported: wall time (after a warm-up on a small gallery of
the same block shapes), the process's peak RSS (``ru_maxrss``: Python + XLA + gallery +
temporaries), and a check that the ranks are right (a positive with little noise must be ranked
first; a sampled subset is re-ranked in float64 numpy).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gallery", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--devices", type=int, default=1, help="simulated CPU devices (sets XLA_FLAGS)")
    p.add_argument("--gallery-block", type=int, default=4096)
    p.add_argument("--query-block", type=int, default=256)
    p.add_argument("--noise", type=float, default=0.05, help="query = positive + noise·N(0, I/D), renormalized")
    p.add_argument("--check", type=int, default=16, help="queries re-ranked with float64 numpy")
    args = p.parse_args(argv)
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from jax.sharding import PartitionSpec as P

    from contrastive_jax.evaluate import retrieval as R
    from contrastive_jax.parallel.mesh import make_mesh

    n, d = args.gallery, args.dim
    mesh = make_mesh([("data", args.devices)], jax.devices()[: args.devices])
    axes = ("data",)
    n_pad, block = R.padded_gallery_size(n, mesh, axes, args.gallery_block)
    per_shard = n_pad // args.devices
    chunk = block

    def local_gallery(key):
        # Fill this device's shard chunk by chunk: only one chunk of random bits at a time.
        shard = lax.axis_index("data")
        key = jax.random.fold_in(key, shard)

        def body(i, buf):
            x = jax.random.normal(jax.random.fold_in(key, i), (chunk, d), jnp.float32)
            x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
            return lax.dynamic_update_slice_in_dim(buf, x, i * chunk, axis=0)

        return lax.fori_loop(0, per_shard // chunk, body, jnp.zeros((per_shard, d), jnp.float32))

    make = jax.jit(jax.shard_map(local_gallery, mesh=mesh, in_specs=P(), out_specs=P("data", None),
                                 check_vma=False))
    t0 = time.perf_counter()
    gallery_emb = make(jax.random.key(0))
    gallery_emb.block_until_ready()
    t_gen = time.perf_counter() - t0

    # Host views of the shards (zero-copy on CPU). Indexing the global array with Python ints or
    # slices instead would compile one program per distinct index.
    shards = sorted(((sh.index[0].start or 0, np.asarray(sh.data)) for sh in gallery_emb.addressable_shards),
                    key=lambda t: t[0])

    def rows(lo, hi):
        out = []
        for s, data in shards:
            a, b = max(lo, s), min(hi, s + data.shape[0])
            if a < b:
                out.append(data[a - s:b - s])
        return np.concatenate(out)

    rng = np.random.default_rng(1)
    targets = np.sort(rng.choice(n, args.queries, replace=False))
    positives = np.stack([rows(int(t), int(t) + 1)[0] for t in targets])
    queries = positives + args.noise * rng.normal(size=positives.shape).astype(np.float32) / np.sqrt(d)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    gal = R.shard_gallery(gallery_emb, np.arange(n), mesh=mesh, axes=axes, block=args.gallery_block, num_items=n)
    # Warm-up: compiles the program of the timed run (same query block and gallery shapes).
    qb = min(args.query_block, args.queries)
    R.streaming_retrieval(queries[:qb], gal, query_labels=targets[:qb], k=args.k, query_block=qb)
    t0 = time.perf_counter()
    out = R.streaming_retrieval(queries, gal, query_labels=targets, k=args.k, query_block=args.query_block)
    t_run = time.perf_counter() - t0
    peak_retrieval_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB

    # Independent check on a few queries: float64 ranks from the full row, fetched in chunks.
    check = rng.choice(args.queries, min(args.check, args.queries), replace=False)
    ok = True
    host_rows = 1 << 13  # small host chunks: the check must not raise the peak
    sims = np.zeros((len(check), n))
    for s in range(0, n, host_rows):
        g = rows(s, min(s + host_rows, n)).astype(np.float64)
        sims[:, s:s + g.shape[0]] = queries[check].astype(np.float64) @ g.T
    for row, q in zip(sims, check):
        t = targets[q]
        ref_rank = int(np.sum(np.delete(row, t) >= row[t]))
        ref_top = np.lexsort((np.arange(n), -row))[: args.k]
        ok &= ref_rank == out["ranks"][q] and np.array_equal(ref_top, out["topk_indices"][q])
    del sims

    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    flops = 2 * 2 * args.queries * n_pad * d  # two passes (best positive + count) over the gallery
    print(json.dumps({
        "bench": "streaming_retrieval", "gallery": n, "dim": d, "queries": args.queries, "k": args.k,
        "devices": args.devices, "gallery_block": block, "query_block": args.query_block,
        "gallery_gib": n * d * 4 / 2**30, "generate_s": round(t_gen, 2), "retrieval_s": round(t_run, 2),
        "queries_per_s": round(args.queries / t_run, 1), "gflops": round(flops / t_run / 1e9, 1),
        "recall@1": float(np.mean(out["ranks"] < 1)), "median_rank": float(np.median(out["ranks"] + 1)),
        "checked_queries": len(check), "check_ok": bool(ok),
        "peak_rss_gib_after_retrieval": round(peak_retrieval_gib, 3), "peak_rss_gib": round(peak_gib, 3),
    }))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
