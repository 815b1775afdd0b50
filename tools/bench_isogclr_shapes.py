"""iSogCLR at a small batch against CLIP's softmax at the same and at an 8x batch, on `shapes`.

Three training runs of the quickstart model through the loop (``contrastive_jax.train.loop.train``,
the same builder, data pipeline and final evaluation as ``contrastive-jax train``), the same number
of steps and the same optimizer settings each:

* ``isogclr_b64``: ``configs/isogclr.py`` at batch ``--small-batch`` (default 64);
* ``softmax_b64``: ``configs/quickstart.py`` (CLIP InfoNCE, learned scale) at the same batch;
* ``softmax_b512``: the same at ``--large-batch`` (default 512).

Reported per run: the final zero-shot accuracies on the ``test`` split (whose colour-kind pairs
never occur in training; ``kind`` is the hardest attribute), the final mean temperatures for
iSogCLR, wall time. Only the zero-shot evaluator runs, once, at the end. Prints ONE JSON line.

Example::

    python tools/bench_isogclr_shapes.py --steps 300 --workdir /tmp/isogclr_shapes
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300, help="training steps of every run")
    p.add_argument("--small-batch", type=int, default=64)
    p.add_argument("--large-batch", type=int, default=512)
    p.add_argument("--workdir", default="/tmp/bench_isogclr_shapes", help="one sub-directory per run")
    p.add_argument("--overwrite", action="store_true", help="replace existing run sub-directories (else refused)")
    p.add_argument("--runs", default="isogclr_b64,softmax_b64,softmax_b512", help="comma-separated subset")
    p.add_argument("--override", action="append", default=[], help="extra key=value for every run")
    return p.parse_args(argv)


def _config(spec, batch, steps, extra):
    from contrastive_jax.train import load_config

    warmup = max(1, min(50, steps // 10))
    c = load_config(spec, [f"train.batch_size={batch}", f"train.total_steps={steps}", f"optim.warmup_steps={warmup}",
                           f"eval.every_steps={steps}", f"checkpoint.every_steps={steps}", "eval.write_report=false",
                           f"train.log_every_steps={max(1, steps // 10)}", *extra])
    c.eval.evaluators = ["zero_shot"]
    return c


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, REPO)
    import shutil

    from contrastive_jax.train.loop import train

    specs = {
        "isogclr_b64": (os.path.join(REPO, "configs", "isogclr.py"), args.small_batch),
        "softmax_b64": (os.path.join(REPO, "configs", "quickstart.py:classic"), args.small_batch),
        "softmax_b512": (os.path.join(REPO, "configs", "quickstart.py:classic"), args.large_batch),
    }
    results = {}
    for name in args.runs.split(","):
        spec, batch = specs[name]
        workdir = os.path.join(args.workdir, name)
        if os.path.exists(workdir):
            if not args.overwrite:
                sys.exit(f"{workdir} exists: pass --overwrite to replace it, or another --workdir")
            shutil.rmtree(workdir)
        t0 = time.perf_counter()
        summary = train(_config(spec, batch, args.steps, args.override), workdir)
        wall = time.perf_counter() - t0
        ev = summary["eval"]
        row = dict(batch=batch, steps=summary["steps"], examples_seen=summary["examples_seen"],
                   wall_s=round(wall, 1), nonfinite_steps=summary["nonfinite_steps"],
                   **{a: round(float(ev[f"zeroshot/{a}/top1"]), 4) for a in ("kind", "color", "size", "position")})
        if name.startswith("isogclr"):
            # The last logged training metrics: mean temperature used by each side.
            with open(os.path.join(workdir, "metrics.jsonl")) as fh:
                last = [json.loads(line) for line in fh if '"train/tau_image"' in line][-1]
            row.update(tau_image=round(last["train/tau_image"], 5), tau_text=round(last["train/tau_text"], 5))
        results[name] = row
        print(json.dumps({name: row}), file=sys.stderr, flush=True)
    print(json.dumps(dict(steps=args.steps, eval_split="test (held-out colour-kind pairs)", runs=results)))


if __name__ == "__main__":
    main()
