"""Figures from logged metrics (``metrics.jsonl``). Imports matplotlib only, never torch."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

# (title, metric key) of the learning-curve panels; a key absent from the log leaves its panel empty.
CURVES = (
    ("reward (train rollouts)", "reward"),
    ("held-out accuracy (greedy)", "eval/heldout_accuracy"),
    ("score gap (mean_P s - mean_N s)", "conspo/score_gap"),
    ("separation AUC", "conspo/auc"),
    ("margin m(t)", "conspo/margin"),
    ("completion length", "completions/mean_length"),
)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics JSONL file; a torn last line (a crash while writing) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def series(records: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of ``key``, the last record winning when a step was logged twice (resume)."""
    points: dict[float, float] = {}
    for r in records:
        if key in r and r[key] is not None and "step" in r:
            points[float(r["step"])] = float(r[key])
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def plot_learning_curves(runs: dict[str, Sequence[dict]], out: str | Path, title: str = "") -> Path:
    """One panel per entry of :data:`CURVES`, one line per run (``{label: records}``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (panel, key) in zip(axes.flat, CURVES):
        for label, records in runs.items():
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=label)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if len(runs) > 1 and handles:
        fig.legend(handles, labels, loc="upper right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
