"""Memory and time of the captioning loss's forward+backward: fused (chunked) vs dense logits.

Both sides are ``jax.value_and_grad`` of :func:`contrastive_jax.losses.captioning.fused_cross_entropy`
w.r.t. the hidden states, the output projection and its bias, compiled for one device. For
each side XLA's buffer assignment (``compiled.memory_analysis()``: arguments + outputs +
temporaries, which is what the CPU runtime allocates for the program) is reported; the chunked
side is also executed (``--repeats`` timed runs after one warm-up) with the process's peak RSS.
The dense side at the default size needs ~30 GiB (its [N, V] float32 logits alone are 16 GiB),
more than this machine has, so it is only compiled unless ``--run-dense`` is given.

    python tools/bench_captioning.py [--n 16384] [--v 256000] [--d 128] [--run-dense]

Prints one JSON object; ``peak_ratio`` is chunked / dense compiled peak bytes.
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

from contrastive_jax.losses.captioning import fused_cross_entropy  # noqa: E402


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _inputs(n, d, v, dtype):
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(n, d)), dtype)
    w = jnp.asarray(rng.normal(size=(d, v)) * d**-0.5, dtype)
    b = jnp.zeros((v,), jnp.float32)
    t = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    m = jnp.asarray(rng.random(n) > 0.1, jnp.float32)
    return h, w, b, t, m


def _compile(impl, args, vocab_block, token_block, eps):
    def f(h, w, b, t, m):
        return fused_cross_entropy(h, w, t, m, b, impl=impl, label_smoothing=eps, vocab_block=vocab_block,
                                   token_block=token_block).loss

    step = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    t0 = time.perf_counter()
    compiled = step.lower(*structs).compile()
    mem = compiled.memory_analysis()
    return compiled, {
        "compile_s": round(time.perf_counter() - t0, 2),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "temp_bytes": int(mem.temp_size_in_bytes),
        "peak_bytes": int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes),
    }


def _run(compiled, args, repeats):
    out = compiled(*args)
    jax.block_until_ready(out)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return {"loss": float(out[0]), "fwd_bwd_s": round(min(times), 3), "peak_rss_gib": round(_rss_gib(), 3)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16384, help="tokens (batch x length)")
    p.add_argument("--v", type=int, default=256000, help="vocabulary size")
    p.add_argument("--d", type=int, default=128, help="hidden width")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--vocab-block", type=int, default=4096)
    p.add_argument("--token-block", type=int, default=4096)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--run-dense", action="store_true", help="also execute the dense version (needs its memory)")
    p.add_argument("--skip-run", action="store_true", help="compile only")
    a = p.parse_args(argv)

    rss0 = _rss_gib()
    args = _inputs(a.n, a.d, a.v, jnp.dtype(a.dtype))
    result = {
        "device": jax.devices()[0].device_kind, "n_tokens": a.n, "vocab": a.v, "d": a.d, "dtype": a.dtype,
        "vocab_block": a.vocab_block, "token_block": a.token_block, "label_smoothing": a.label_smoothing,
        "dense_logits_bytes": a.n * a.v * 4, "rss_after_inputs_gib": round(rss0, 3),
    }
    dense_c, result["dense"] = _compile("dense", args, a.vocab_block, a.token_block, a.label_smoothing)
    chunk_c, result["chunked"] = _compile("chunked", args, a.vocab_block, a.token_block, a.label_smoothing)
    result["peak_ratio"] = round(result["chunked"]["peak_bytes"] / result["dense"]["peak_bytes"], 4)
    result["temp_ratio"] = round(result["chunked"]["temp_bytes"] / result["dense"]["temp_bytes"], 4)
    if not a.skip_run:
        result["chunked"].update(_run(chunk_c, args, a.repeats))
        if a.run_dense:
            result["dense"].update(_run(dense_c, args, a.repeats))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
