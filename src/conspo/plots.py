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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path, title: str) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    return out


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
    plt = _pyplot()
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
    return _save(fig, out, title)


def plot_bands(runs: dict[str, list[Sequence[dict]]], keys: Sequence[tuple[str, str]], out: str | Path,
               title: str = "") -> Path:
    """Mean over seeds with a band of one standard deviation, one panel per ``(title, key)``.

    ``runs`` maps a method to the metric records of each of its seeds. Steps are those logged by every
    seed of a method (so a band is never drawn from a single seed at some steps).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, (panel, key) in zip(axes[0], keys):
        for method, seeds in runs.items():
            per_seed = [dict(zip(*series(records, key))) for records in seeds]
            per_seed = [s for s in per_seed if s]
            if not per_seed:
                continue
            steps = sorted(set.intersection(*(set(s) for s in per_seed)))
            if not steps:
                continue
            values = [[s[step] for s in per_seed] for step in steps]
            mean = [sum(v) / len(v) for v in values]
            std = [(sum((x - m) ** 2 for x in v) / len(v)) ** 0.5 for v, m in zip(values, mean)]
            line = ax.plot(steps, mean, label=f"{method} (n={len(per_seed)})")[0]
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=line.get_color(), alpha=0.2)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out, title)


def plot_credit(panels: dict[str, tuple[list[float], list[float], list[bool]]], out: str | Path,
                title: str = "") -> Path:
    """Per-rollout credit against score, one panel per method: ``{method: (scores, credits, correct)}``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (method, (scores, credits, correct)) in zip(axes[0], panels.items()):
        for flag, colour, label in ((True, "tab:green", "correct"), (False, "tab:red", "incorrect")):
            xs = [s for s, c in zip(scores, correct) if c == flag]
            ys = [v for v, c in zip(credits, correct) if c == flag]
            ax.scatter(xs, ys, s=14, c=colour, alpha=0.7, label=label)
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("score s_i (mean token log-prob)")
        ax.set_ylabel("credit (-dL/ds_i)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out, title)
