"""The PNG report of a run: training curves, a similarity heatmap, retrieval examples and
per-class accuracy, written to ``WORKDIR/report/``.

Sources: ``WORKDIR/metrics.jsonl`` (curves) and the evaluation details of the final evaluation
(``EvalRunner.details``), which :func:`write_report` stores as ``WORKDIR/eval_details.npz`` so that
``contrastive-jax report WORKDIR`` redraws the same pictures later without a model.

Figures are drawn with matplotlib's object API (``Figure`` + Agg canvas, no pyplot state), so it
works headless and from threads.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import numpy as np

DETAILS_FILE = "eval_details.npz"
REPORT_DIR = "report"


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def read_metrics(workdir: str) -> list[dict]:
    """Records of ``WORKDIR/metrics.jsonl`` (``{"step": s, name: value, ...}``); [] if absent.
    Non-numeric values (``"nan"``) become NaN; a malformed line raises naming file and line."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
            out.append({k: (v if k == "step" else _float(v)) for k, v in rec.items()})
    return out


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def save_details(details: dict, path: str) -> None:
    """Stores ``EvalRunner.details`` (JSON-able parts + uint8 images) in one ``.npz``."""
    details = dict(details)
    arrays = {}
    retrieval = details.get("retrieval")
    if retrieval and "images" in retrieval:
        retrieval = dict(retrieval)
        for i, img in retrieval.pop("images").items():
            arrays[f"image_{int(i)}"] = np.asarray(img, np.uint8)
        details["retrieval"] = retrieval
    blob = json.dumps(details, default=lambda o: np.asarray(o).tolist())
    np.savez_compressed(path, details_json=np.asarray(blob), **arrays)


def load_details(path: str) -> dict:
    """Inverse of :func:`save_details`."""
    with np.load(path, allow_pickle=False) as z:
        details = json.loads(str(z["details_json"]))
        images = {int(k.split("_", 1)[1]): z[k] for k in z.files if k.startswith("image_")}
    if "retrieval" in details:
        r = details["retrieval"]
        r["images"] = images
        r["captions"] = {int(k): v for k, v in r.get("captions", {}).items()}
    return details


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
    if not pts:
        return np.zeros(0), np.zeros(0)
    s, v = zip(*pts)
    return np.asarray(s), np.asarray(v)


def plot_loss(records, path: str) -> str | None:
    steps, loss = _series(records, "train/loss")
    if not len(steps):
        return None
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    ax.plot(steps, loss, label="train loss", color="tab:blue")
    ax.set(title="Training loss", xlabel="step", ylabel="contrastive loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)
    return path


_ACCURACY_PANELS = (
    ("Zero-shot top-1 accuracy", lambda k: k.startswith("eval/zeroshot/") and k.endswith("/top1")),
    ("Retrieval recall@1", lambda k: k.startswith("eval/retrieval/") and k.endswith("/R@1")),
    ("Probe top-1 accuracy (ridge, logistic, k-NN)",
     lambda k: k.startswith(("eval/probe/", "eval/knn/")) and k.endswith("/top1")),
)


def plot_accuracy(records, path: str) -> str | None:
    """One panel per family (zero-shot, retrieval, probes) of the run's own eval split."""
    keys = sorted({k for r in records for k in r if k.startswith("eval/") and "mrl" not in k})
    panels = [(title, [k for k in keys if pick(k)]) for title, pick in _ACCURACY_PANELS]
    panels = [(t, ks) for t, ks in panels if ks]
    if not panels:
        return None
    fig = _figure(9, 3.2 * len(panels))
    markers = "osD^vP*X<>"
    for i, (title, ks) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        for j, key in enumerate(ks):
            steps, vals = _series(records, key)
            ax.plot(steps, 100 * vals, marker=markers[j % len(markers)], color=f"C{j % 10}",
                    ls="-" if j < 10 else "--", label=key[len("eval/"):])
        ax.set(title=title, xlabel="step", ylabel="%", ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(path)
    return path


def plot_lr_scale(records, path: str) -> str | None:
    panels = [(k, lab) for k, lab in (("train/lr", "learning rate"), ("train/scale", "logit scale (1/temperature)"),
                                      ("train/bias", "logit bias")) if len(_series(records, k)[0])]
    if not panels:
        return None
    fig = _figure(7, 2.6 * len(panels))
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        steps, vals = _series(records, key)
        ax.plot(steps, vals, label=key, color=f"C{i}")
        ax.set(title=label.capitalize(), xlabel="step", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path)
    return path


def plot_heatmap(details, path: str) -> str | None:
    heat = details.get("heatmap")
    if not heat:
        return None
    sims = np.asarray(heat["similarity"])
    fig = _figure(9, 8)
    ax = fig.add_subplot()
    im = ax.imshow(sims, cmap="viridis")
    fig.colorbar(im, ax=ax, label="cosine similarity")
    ax.set(title=f"Image–text similarity of the first {sims.shape[0]} eval pairs (diagonal = true pairs)",
           xlabel="caption", ylabel="image")
    caps = heat.get("captions") or []
    if caps:
        ax.set_xticks(range(len(caps)), [c[:28] for c in caps], rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(sims.shape[0]))
    fig.savefig(path)
    return path


def plot_retrieval_examples(details, path: str) -> str | None:
    r = details.get("retrieval")
    if not r or "images" not in r:
        return None
    images, captions = r["images"], r["captions"]
    i_queries, t_queries = r["image_queries"], r["text_queries"]
    k = len(r["text_to_image"][0]) if r["text_to_image"] else 0
    rows = len(i_queries) + len(t_queries)
    height = 2.1 * rows + 0.6
    # Fixed margins: every axis is off, and the constrained layout's solver took ~40% of the
    # report's time (3.7 of 9.8 s on 2 cores) to place a grid that needs no solving.
    fig = _figure(2.0 * (k + 1) + 1, height, layout=None)
    fig.suptitle("Retrieval examples (✓ = the query's own pair)")
    grid = fig.add_gridspec(rows, k + 1, left=0.01, right=0.99, bottom=0.01, top=1 - 0.6 / height,
                            hspace=0.35, wspace=0.08)
    for row, (q, tops) in enumerate(zip(i_queries, r["image_to_text"])):
        ax = fig.add_subplot(grid[row, 0])
        ax.imshow(images[q])
        ax.set_title(f"image query #{q}", fontsize=8)
        ax.axis("off")
        ax = fig.add_subplot(grid[row, 1:])
        ax.axis("off")
        text = "\n".join(f"{j + 1}. {captions.get(t, str(t))}{'  ✓' if captions.get(t) == captions.get(q) else ''}"
                         for j, t in enumerate(tops))
        ax.text(0.0, 0.5, "top texts:\n" + text, va="center", fontsize=9, family="monospace")
    for row, (q, tops) in enumerate(zip(t_queries, r["text_to_image"]), start=len(i_queries)):
        ax = fig.add_subplot(grid[row, 0])
        ax.axis("off")
        ax.text(0.0, 0.5, "text query:\n" + "\n".join(_wrap(captions.get(q, str(q)), 22)), va="center", fontsize=8)
        for j, t in enumerate(tops):
            ax = fig.add_subplot(grid[row, j + 1])
            ax.imshow(images[t])
            ax.set_title(f"{j + 1}. #{t}{' ✓' if t == q else ''}", fontsize=8)
            ax.axis("off")
    fig.savefig(path)
    return path


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width and cur:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return lines + ([cur] if cur else [])


def plot_per_class(details, path: str, max_classes: int = 60) -> str | None:
    per = details.get("per_class")
    if not per:
        return None
    n = len(per)
    fig = _figure(8, 2.8 * n + 0.4)
    for i, (attr, d) in enumerate(sorted(per.items())):
        ax = fig.add_subplot(n, 1, i + 1)
        vals = 100 * np.nan_to_num(np.asarray(d["values"], np.float64), nan=0.0)
        names = list(d["names"])
        if len(vals) > max_classes:  # e.g. ImageNet: the worst classes are the informative ones
            order = np.argsort(vals)[:max_classes]
            vals, names = vals[order], [names[j] for j in order]
        ax.bar(range(len(vals)), vals, color="tab:green", label=f"per-class {d.get('metric', 'accuracy')}")
        ax.axhline(np.mean(vals), color="k", ls="--", lw=1, label=f"mean {np.mean(vals):.1f}%")
        ax.set_xticks(range(len(vals)), names, rotation=45 if len(vals) > 8 else 0, ha="right" if len(vals) > 8 else "center",
                      fontsize=8)
        ax.set(title=f"Zero-shot per-class accuracy: {attr}", ylabel="%", ylim=(0, 105))
        ax.legend(fontsize="small", loc="lower right")
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def write_report(workdir: str, runner: Any = None, params: Any = None, *, details: dict | None = None) -> list[str]:
    """Writes the PNG report into ``WORKDIR/report/``; returns the files written.

    Args:
      workdir: the run directory (``metrics.jsonl`` is read from it).
      runner, params: an :class:`~contrastive_jax.evaluate.EvalRunner` and the final params. If
        the runner has no details yet it is run once (every process must then call this).
        Its details are saved to ``WORKDIR/eval_details.npz``.
      details: details to draw instead (default: the runner's, else the saved file).
    """
    import jax

    if details is None and runner is not None:
        if not runner.details and params is not None:
            runner(params)
        details = runner.details
    if jax.process_index() != 0:
        return []
    details_path = os.path.join(workdir, DETAILS_FILE)
    if details:
        save_details(details, details_path)
    elif os.path.isfile(details_path):
        details = load_details(details_path)
    details = details or {}
    out_dir = os.path.join(workdir, REPORT_DIR)
    os.makedirs(out_dir, exist_ok=True)
    records = read_metrics(workdir)
    written = [
        plot_loss(records, os.path.join(out_dir, "loss.png")),
        plot_accuracy(records, os.path.join(out_dir, "accuracy.png")),
        plot_lr_scale(records, os.path.join(out_dir, "lr_scale.png")),
        plot_heatmap(details, os.path.join(out_dir, "similarity_heatmap.png")),
        plot_retrieval_examples(details, os.path.join(out_dir, "retrieval_examples.png")),
        plot_per_class(details, os.path.join(out_dir, "per_class_accuracy.png")),
    ]
    return [p for p in written if p]
