"""``contrastive-jax benchmark --checkpoint RUN_OR_MODEL (--suite NAME | --datasets a,b,c) [--data-dir DIR]
[--wds-root DIR] [--compositional-root DIR] [--output DIR] [--batch-size N]``.

Zero-shot classification (acc1, acc5, mean per-class recall), image<->text retrieval (recall@1/5/10)
and the compositional benchmarks on the standard datasets found on disk, by name (CLIP_benchmark's
names; suites ``clip``, ``vtab``, ``retrieval``, ``compositional``, ``all``). Nothing is downloaded:
datasets come from TFDS folders under ``--data-dir`` or CLIP_benchmark WebDataset exports under
``--wds-root`` (see docs/evaluation.md). Writes ``benchmark.json``, ``benchmark.csv``
(CLIP_benchmark's columns) and ``benchmark.png`` into ``--output`` (default:
``./benchmark/<checkpoint name>``), prints the table on stdout and a progress bar per dataset on
stderr. A missing dataset is listed as missing; the exit code is 0 when at least one dataset ran, 1
when none did, 2 for bad arguments.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

HELP = "zero-shot / retrieval / compositional benchmark suite on datasets on disk; writes benchmark.json/csv/png"


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="what contrastive_jax.load reads: a run or model directory, a CLIP .pt/.bin/.safetensors, "
                             "an open_clip or Hugging Face folder")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--suite", choices=("clip", "vtab", "retrieval", "compositional", "all"))
    which.add_argument("--datasets", help="comma-separated dataset names (benchmark names or prepared TFDS names)")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir holding prepared datasets "
                        "(default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    parser.add_argument("--wds-root", default=None, help="folder of CLIP_benchmark WebDataset exports")
    parser.add_argument("--compositional-root", default=None, help="folder of SugarCrepe / ARO / Winoground files")
    parser.add_argument("--output", default=None, help="output folder (default: ./benchmark/<checkpoint name>); "
                        "benchmark.json/csv/png there are replaced")
    parser.add_argument("--batch-size", type=int, default=256, help="images / texts per encode call (global)")
    parser.add_argument("--vocab", default=None, help="CLIP's BPE merges file, for checkpoint files")
    parser.add_argument("--model-name", default=None, help="the CSV's `model` column (default: the checkpoint's name)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _fail(message: str, code: int = 2) -> int:
    print(f"contrastive-jax benchmark: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def _names(args) -> list[str]:
    from contrastive_jax.evaluate.benchmark.datasets import suite_names
    from contrastive_jax.evaluate.benchmark.runner import compositional_names

    if args.suite:
        return suite_names(args.suite, compositional_names())
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    if not names:
        raise ValueError("--datasets names no dataset")
    return list(dict.fromkeys(names))


def run(args, overrides) -> int:
    if overrides:
        return _fail(f"takes no --config overrides (got {overrides})")
    if args.batch_size <= 0:
        return _fail(f"--batch-size must be positive, got {args.batch_size}")
    checkpoint = os.path.abspath(os.path.expanduser(args.checkpoint))
    if not os.path.exists(checkpoint):
        return _fail(f"no such checkpoint: {checkpoint}")
    try:
        names = _names(args)
    except ValueError as e:
        return _fail(e)
    data_dir = args.data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    model_name = args.model_name or os.path.basename(checkpoint.rstrip("/"))
    # Default: beside the caller, never inside the checkpoint's folder (an open_clip / HF folder is the user's).
    output = os.path.abspath(os.path.expanduser(args.output or os.path.join("benchmark", model_name)))
    from contrastive_jax.commands.eval import check_writable

    try:
        os.makedirs(output, exist_ok=True)
    except OSError as e:
        return _fail(f"cannot create --output {output} ({e.strerror or e})")
    # Before anything is evaluated: results that cannot be saved must not cost a benchmark run.
    problem = check_writable(os.path.join(output, "benchmark.json"), "pass --output DIR")
    if problem:
        return _fail(problem)

    import contrastive_jax
    from contrastive_jax.commands.data import stdout_to_stderr
    from contrastive_jax.evaluate.benchmark import table
    from contrastive_jax.evaluate.benchmark.runner import run_benchmark

    t0 = time.time()
    try:
        with stdout_to_stderr():
            model = contrastive_jax.load(checkpoint, **({"vocab": args.vocab} if args.vocab else {}))
    except (FileNotFoundError, ValueError, TypeError) as e:
        return _fail(f"cannot load {checkpoint}: {e}")
    with stdout_to_stderr():
        rows = run_benchmark(model, names, data_dir=data_dir, wds_root=args.wds_root,
                             compositional_root=args.compositional_root, batch_size=args.batch_size,
                             progress=not args.no_progress)
    ran = [r for r in rows if r["status"] == "ok"]
    payload = {"model": model_name, "checkpoint": checkpoint, "data_dir": data_dir, "wds_root": args.wds_root,
               "compositional_root": args.compositional_root, "results": rows,
               "missing": [r["dataset"] for r in rows if r["status"] == "missing"],
               "failed": [r["dataset"] for r in rows if r["status"] in ("error", "unavailable")],
               "wall_time_s": round(time.time() - t0, 3)}
    from contrastive_jax import storage

    storage.write_text(os.path.join(output, "benchmark.json"),
                       json.dumps(_strict(payload), indent=2, default=_to_json, allow_nan=False))
    storage.write_text(os.path.join(output, "benchmark.csv"), table.csv_text(rows, model_name, checkpoint))
    png = table.plot(rows, os.path.join(output, "benchmark.png"), title=model_name)
    print(table.format_table(rows))
    print(f"{len(ran)} of {len(rows)} datasets ran; results in {output}/benchmark.json, benchmark.csv"
          + (", benchmark.png" if png else ""), file=sys.stderr)
    return 0 if ran else 1


def _strict(value):
    """NaN / inf (e.g. acc5 with fewer than 5 classes) -> None, so benchmark.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _to_json(value):
    return _strict(value.tolist()) if hasattr(value, "tolist") else str(value)
