"""Benchmark interop with a released-size CLIP: conversion time / memory and encode throughput vs PyTorch.

Builds ``tests/clip_reference.Clip`` (OpenAI's CLIP ViT architecture in PyTorch, random weights,
nothing downloaded) at OpenAI ViT-B/32's shapes (``--variant b32``: 224 px, patch 32, image
768 x 12 layers / 12 heads, text 512 x 12 / 8 heads, vocabulary 49,408, context 77, embedding 512;
151 M parameters) or at a tiny size (``--variant tiny``, seconds), writes its state dict in float16
as a ``.pt`` (``torch.save``) and a ``.safetensors`` file, and prints ONE JSON object:

- ``conversion``: each step in a fresh subprocess (so memory peaks do not mix), timed around the
  call only (imports and setup excluded and reported separately):
  ``convert_pt`` / ``convert_safetensors`` = ``interop.load_clip_checkpoint(file)``;
  ``save_model_dir`` = ``ckpt.save(dir)`` of a converted checkpoint;
  ``load_model_dir`` = ``contrastive_jax.load(dir)`` (params on the device);
  ``export_safetensors`` = ``interop.save_clip_checkpoint(out, params, config)`` (float32) of a
  model loaded from that directory. ``op_peak_rss_mib`` is the process's resident-set high-water
  mark during the call (``VmHWM`` after resetting it through ``/proc/self/clear_refs`` just before
  the call), ``rss_before_op_mib`` the resident set just before it (interpreter, jax, torch,
  whatever the setup loaded), ``setup_peak_rss_mib`` the high-water mark of the imports and setup
  before the call. (``ru_maxrss`` is not used: Linux carries the parent's value into a forked child.)
- ``files``: sizes of the fp16 ``.pt`` / ``.safetensors``, the model directory and the export;
  ``export_bit_exact``: the exported float32 tensors equal the fp16 inputs upcast, key for key.
- ``encode``: throughput of our converted model (``model.encode_images`` on uint8 images,
  ``--batch`` per call; the jitted text encoder that ``encode_texts`` calls, on ``--texts``
  int32 token rows of short random captions ending in the end-of-text id) against the PyTorch
  reference (``torch.inference_mode()``, ``torch.set_num_threads(--torch-threads)``) on the same
  inputs, same process: one warm-up call each (JAX compiles), then ``--repeats`` repeats in
  alternating order (JAX first on even repeats, PyTorch first on odd ones). ``jax_over_torch`` is the
  median over repeats of (JAX throughput / PyTorch throughput) in that repeat. ``gflop_per_item``
  counts forward matmul/conv FLOPs (``contrastive_jax.models.inspect``); the same work is done
  by both. ``max_abs_diff`` compares the two frameworks' unit-norm float32 embeddings.

Image preprocessing (uint8 -> normalized float32) is ``model.preprocess_images`` for both sides;
the PyTorch side additionally transposes to NCHW. Tokenization is not timed (no CLIP vocabulary
file is used).

Example::

    python tools/bench_interop.py --variant tiny
    python tools/bench_interop.py --variant b32 --repeats 5 --batch 32 --texts 256
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench_train import cpu_model  # tools/ is on sys.path when a tool runs as a script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tests/clip_reference.Clip keyword arguments; heads passed to the conversion explicitly.
VARIANTS = {
    "b32": dict(image_size=224, patch=32, vision_width=768, vision_layers=12, vision_heads=12, vocab=49408,
                context=77, text_width=512, text_layers=12, text_heads=8, embed_dim=512),
    "tiny": dict(image_size=32, patch=8, vision_width=128, vision_layers=2, vision_heads=2, vocab=600,
                 context=12, text_width=64, text_layers=2, text_heads=4, embed_dim=48),
}
CHILD_STEPS = ("convert_pt", "convert_safetensors", "save_model_dir", "load_model_dir", "export_safetensors")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", choices=sorted(VARIANTS), default="b32")
    p.add_argument("--repeats", type=int, default=5, help="timed encode repeats per framework (after 1 warm-up)")
    p.add_argument("--batch", type=int, default=32, help="images per encode call")
    p.add_argument("--texts", type=int, default=256, help="token rows per text encode call")
    p.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--skip-conversion", action="store_true", help="only the encode comparison")
    p.add_argument("--workdir", default=None, help="where the files go (default: a temporary directory, removed)")
    p.add_argument("--_child", choices=CHILD_STEPS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- machine ----------------------------------------------------------------------------------

def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _mib(kib: float) -> float:
    return round(kib / 1024, 1)


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# -- one conversion step in its own process ----------------------------------------------------

def child(step: str, workdir: str, variant: str) -> None:
    t0 = time.perf_counter()
    import jax

    import contrastive_jax
    from contrastive_jax import interop

    v = VARIANTS[variant]
    heads = dict(act="quick_gelu", image_heads=v["vision_heads"], text_heads=v["text_heads"])
    pt, st = os.path.join(workdir, "clip_fp16.pt"), os.path.join(workdir, "clip_fp16.safetensors")
    model_dir, export = os.path.join(workdir, "model_dir"), os.path.join(workdir, "export.safetensors")
    if step == "convert_pt":
        import torch  # noqa: F401  (imported before the timer, as a user's notebook would have it)

    setup = None
    if step == "save_model_dir":
        setup = interop.load_clip_checkpoint(st, **heads)
    elif step == "export_safetensors":
        setup = contrastive_jax.load(model_dir)
    setup_s = time.perf_counter() - t0

    rss_before, setup_peak = _status_kib("VmRSS"), _status_kib("VmHWM")
    reset = _reset_peak()
    t = time.perf_counter()
    if step == "convert_pt":
        out = interop.load_clip_checkpoint(pt, **heads)
    elif step == "convert_safetensors":
        out = interop.load_clip_checkpoint(st, **heads)
    elif step == "save_model_dir":
        out = setup.save(model_dir)
    elif step == "load_model_dir":
        out = contrastive_jax.load(model_dir)
        jax.block_until_ready(out.params)
    else:
        out = interop.save_clip_checkpoint(export, setup.params, setup.config)
    op_s = time.perf_counter() - t
    peak = _status_kib("VmHWM")
    del out
    print(json.dumps(dict(
        step=step, op_s=round(op_s, 3), imports_and_setup_s=round(setup_s, 2),
        rss_before_op_mib=_mib(rss_before), op_peak_rss_mib=_mib(peak) if reset else None,
        op_peak_minus_before_mib=_mib(peak - rss_before) if reset else None,
        setup_peak_rss_mib=_mib(setup_peak))))


def run_child(step: str, workdir: str, variant: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", step, "--workdir", workdir,
                           "--variant", variant], capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{step} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the whole benchmark --------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TFDS_DISABLE_GCS", "1")
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    if args._child:
        return child(args._child, args.workdir, args.variant)

    t_start = time.perf_counter()
    load_start = loadavg()
    import clip_reference
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    import contrastive_jax
    from contrastive_jax import interop
    from contrastive_jax.models.inspect import forward_flops

    torch.set_num_threads(args.torch_threads)
    v = VARIANTS[args.variant]
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_interop_")
    os.makedirs(workdir, exist_ok=True)
    pt, st = os.path.join(workdir, "clip_fp16.pt"), os.path.join(workdir, "clip_fp16.safetensors")
    model_dir, export = os.path.join(workdir, "model_dir"), os.path.join(workdir, "export.safetensors")
    for path in (model_dir, export):  # a rerun in the same --workdir
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else (
            os.remove(path) if os.path.exists(path) else None)
    result = dict(variant=args.variant, shapes=v, repeats=args.repeats, batch=args.batch, texts=args.texts)

    try:
        # The reference, stored in fp16 like OpenAI's files; in fp32 from the fp16 values it then
        # holds exactly the weights the conversion reads.
        t = time.perf_counter()
        ref = clip_reference.Clip(act=clip_reference.QuickGELU, seed=0, **v).eval()
        ref.half()
        sd16 = {k: t_.detach().clone() for k, t_ in ref.state_dict().items()}
        torch.save(sd16, pt)
        sd16_np = {k: t_.numpy() for k, t_ in sd16.items()}
        save_file(sd16_np, st, metadata={"format": "pt"})
        ref.float()
        result["params"] = int(sum(p.numel() for p in ref.parameters()))
        result["build_reference_s"] = round(time.perf_counter() - t, 1)

        if not args.skip_conversion:
            conv = {}
            for step in CHILD_STEPS:
                conv[step] = run_child(step, workdir, args.variant)
            result["conversion"] = conv
            back = interop.read_state_dict(export)
            result["export_bit_exact"] = bool(sorted(back) == sorted(sd16_np) and all(
                back[k].dtype == np.float32 and np.array_equal(back[k], sd16_np[k].astype(np.float32))
                for k in sd16_np))
            del back
            result["files_mib"] = {name: round(_size(p) / 2**20, 1) for name, p in (
                ("pt_fp16", pt), ("safetensors_fp16", st), ("model_dir_fp32", model_dir),
                ("export_safetensors_fp32", export))}
            model = contrastive_jax.load(model_dir)
        else:
            model = contrastive_jax.load(st, act="quick_gelu", image_heads=v["vision_heads"],
                                         text_heads=v["text_heads"])
        del sd16, sd16_np

        # Inputs: uint8 images; token rows <sot> ids... <eot> 0-padding, lengths of short captions.
        rng = np.random.default_rng(0)
        size, ctx, vocab = v["image_size"], v["context"], v["vocab"]
        images = rng.integers(0, 256, size=(args.batch, size, size, 3), dtype=np.uint8)
        tokens = np.zeros((args.texts, ctx), np.int32)
        lengths = rng.integers(min(5, ctx), min(20, ctx) + 1, size=args.texts)
        for i, n in enumerate(lengths):
            tokens[i, 0] = vocab - 2
            tokens[i, 1:n - 1] = rng.integers(0, vocab - 2, size=n - 2)
            tokens[i, n - 1] = vocab - 1
        assert int(model.config.model.text.eos_id) == vocab - 1
        tokens_jnp, tokens_torch = jnp.asarray(tokens), torch.from_numpy(tokens).long()

        def jax_images():
            return model.encode_images(images, batch_size=args.batch)

        def torch_images():
            x = model.preprocess_images(images).transpose(0, 3, 1, 2).copy()
            with torch.inference_mode():
                return ref.encode_image(torch.from_numpy(x)).numpy()

        def jax_texts():  # what encode_texts runs after tokenizing (one call of <= 256 rows)
            return np.asarray(model._encode(model.params, "text", tokens_jnp))

        def torch_texts():
            with torch.inference_mode():
                return ref.encode_text(tokens_torch).numpy()

        def timed(fn):
            t = time.perf_counter()
            out = fn()
            return time.perf_counter() - t, out

        enc = {}
        load_before_encode = loadavg()
        for kind, n, fj, ft in (("images", args.batch, jax_images, torch_images),
                                ("texts", args.texts, jax_texts, torch_texts)):
            first_jax, ej = timed(fj)  # compiles
            first_torch, et = timed(ft)
            times = {"jax": [], "torch": []}
            for r in range(args.repeats):
                order = (("jax", fj), ("torch", ft)) if r % 2 == 0 else (("torch", ft), ("jax", fj))
                for name, fn in order:
                    times[name].append(timed(fn)[0])
            med = {k: statistics.median(ts) for k, ts in times.items()}
            enc[kind] = dict(
                items_per_call=n,
                jax_per_s=round(n / med["jax"], 2), torch_per_s=round(n / med["torch"], 2),
                jax_over_torch=round(statistics.median(tt / tj for tj, tt in zip(times["jax"], times["torch"])), 3),
                jax_s_all=[round(x, 3) for x in times["jax"]], torch_s_all=[round(x, 3) for x in times["torch"]],
                jax_first_call_s=round(first_jax, 2), torch_first_call_s=round(first_torch, 2),
                max_abs_diff=float(np.max(np.abs(ej - et))))
        # Forward matmul/conv FLOPs per item (same for both frameworks).
        for kind, name, spec in (
                ("images", "image", jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)),
                ("texts", "text", jax.ShapeDtypeStruct((1, ctx), jnp.int32))):
            fl = forward_flops(lambda p, x, name=name: model.module.apply({"params": p}, name, x, method="encode"),
                               model.params, spec)
            e = enc[kind]
            e["gflop_per_item"] = round(fl / 1e9, 3)
            e["jax_gflop_per_s"] = round(fl * e["jax_per_s"] / 1e9, 1)
            e["torch_gflop_per_s"] = round(fl * e["torch_per_s"] / 1e9, 1)
        result["encode"] = enc
        result["loadavg_before_encode"] = load_before_encode
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    result["machine"] = dict(
        cpu=cpu_model(), cpu_count=os.cpu_count(), affinity=len(os.sched_getaffinity(0)),
        mem_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        python=platform.python_version(), jax=jax.__version__, jax_backend=jax.default_backend(),
        torch=torch.__version__, torch_threads=torch.get_num_threads(), numpy=np.__version__)
    result["loadavg_start"] = load_start
    result["loadavg_end"] = loadavg()
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
