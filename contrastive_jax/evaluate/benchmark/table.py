"""Benchmark results as ``benchmark.json``, ``benchmark.csv`` (CLIP_benchmark's columns), a text
table and a per-dataset bar chart (PNG).

CSV layout: CLIP_benchmark's ``clip_benchmark build`` output has one row per (model, dataset) with
the columns ``dataset, model, pretrained, task`` and the metric names as columns (``acc1, acc5,
mean_per_class_recall``, ``image_retrieval_recall@k``, ``text_retrieval_recall@k``) plus
``model_fullname`` (= model + ' ' + pretrained); a metric a task does not have is empty. The same
columns come first here, in a fixed order, then any further metric columns (the compositional
benchmarks'), then ``status`` and ``num_examples`` (rows of missing datasets are kept, with empty
metrics, so the file says what was not run).
"""
from __future__ import annotations

import csv
import io
import math
import os
from typing import Sequence

from contrastive_jax.evaluate.benchmark import compositional
from contrastive_jax.evaluate.benchmark.runner import RECALL_KS

CLASSIFICATION_COLUMNS = ("acc1", "acc5", "mean_per_class_recall")
RETRIEVAL_COLUMNS = tuple(f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in RECALL_KS)
LEADING = ("dataset", "model", "pretrained", "task")
TRAILING = ("model_fullname", "status", "num_examples")


def csv_columns(rows: Sequence[dict]) -> list[str]:
    extra = sorted({k for r in rows for k in r.get("metrics", {})} - set(CLASSIFICATION_COLUMNS + RETRIEVAL_COLUMNS))
    return list(LEADING + CLASSIFICATION_COLUMNS + RETRIEVAL_COLUMNS) + extra + list(TRAILING)


def _cell(v):
    if isinstance(v, float) and not math.isfinite(v):
        return ""
    return v


def csv_text(rows: Sequence[dict], model: str, pretrained: str) -> str:
    """The CSV (header + one line per dataset) as a string."""
    columns = csv_columns(rows)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        line = {"dataset": r["dataset"], "model": model, "pretrained": pretrained, "task": r.get("task", ""),
                "model_fullname": f"{model} {pretrained}", "status": r["status"],
                "num_examples": r.get("num_examples", "")}
        line.update({k: _cell(v) for k, v in r.get("metrics", {}).items()})
        writer.writerow(line)
    return out.getvalue()


def _fmt(v) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.2f}"


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table (metrics in %): classification acc1/acc5/mean-per-class recall,
    retrieval R@1/5/10 both ways, other metrics as ``name=value``, and why a dataset did not run."""
    head = ("dataset", "task", "n", "acc1", "acc5", "mpcr", "img R@1/5/10", "txt R@1/5/10", "other / status")
    lines = []
    for r in rows:
        m = r.get("metrics", {})
        task = {"zeroshot_classification": "zs-cls", "zeroshot_retrieval": "retrieval"}.get(r.get("task"), r.get("task", ""))
        if r["status"] != "ok":
            # Where a missing dataset was looked for is long: it is in benchmark.json ('reason').
            why = "missing" if r["status"] == "missing" else f"{r['status']}: {r.get('reason', '')}"[:120]
            lines.append((r["dataset"], task, "", "", "", "", "", "", why))
            continue
        rec = lambda side: "/".join(_fmt(m.get(f"{side}_retrieval_recall@{k}")) for k in RECALL_KS)  # noqa: E731
        known = set(CLASSIFICATION_COLUMNS + RETRIEVAL_COLUMNS)
        # The paper's headline number first; counts (n, num_*) are not percentages: JSON/CSV only.
        main = compositional.MAIN_METRIC.get(r["dataset"])
        keys = ([main] if main in m else []) + [k for k in sorted(m) if k != main and k not in known
                                                  and k != "n" and not k.startswith("num_")]
        other = " ".join(f"{k}={_fmt(m[k])}" for k in keys)
        lines.append((r["dataset"], task, str(r.get("num_examples", "")), _fmt(m.get("acc1")), _fmt(m.get("acc5")),
                      _fmt(m.get("mean_per_class_recall")),
                      rec("image") if "image_retrieval_recall@1" in m else "",
                      rec("text") if "text_retrieval_recall@1" in m else "", other))
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(ln) for ln in lines])


def headline(row: dict) -> list[tuple[str, float]]:
    """The bars drawn for one finished dataset: acc1 (classification), image and text R@5
    (retrieval), the paper's headline metric (compositional, :data:`compositional.MAIN_METRIC`)."""
    m = row.get("metrics", {})
    main = compositional.MAIN_METRIC.get(row["dataset"])
    if main in m:
        return [(main, m[main])]
    if "acc1" in m:
        return [("acc1", m["acc1"])]
    if "image_retrieval_recall@5" in m:
        return [("image R@5", m["image_retrieval_recall@5"]), ("text R@5", m["text_retrieval_recall@5"])]
    return sorted(m.items())


def plot(rows: Sequence[dict], path: str, title: str = "") -> str | None:
    """Horizontal bars (in %) of :func:`headline` per finished dataset, written to ``path`` (PNG);
    None when nothing ran."""
    bars = [(f"{r['dataset']} {label}" if len(headline(r)) > 1 or r.get("task") == "compositional" else r["dataset"],
             100 * float(v)) for r in rows if r["status"] == "ok" for label, v in headline(r)
            if isinstance(v, (int, float)) and math.isfinite(v)]
    if not bars:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.3 * len(bars) + 1.2))
    labels, values = zip(*bars)
    y = range(len(bars))
    ax.barh(list(y), values, color="#4c72b0")
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("%")
    for yi, v in zip(y, values):
        ax.text(min(v + 1, 92), yi, f"{v:.1f}", va="center", fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
