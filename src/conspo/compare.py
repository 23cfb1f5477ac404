"""`conspo compare`: several methods on the same task, data, rollout budget and seeds, then one table.

Every (method, seed) run lives in ``<output>/<method>/seed<k>/`` and is the ordinary main job
(:func:`conspo.run.train`), so a run interrupted half-way resumes from its last checkpoint and a
finished run (one with ``summary.json``) is reused: rerunning the same command finishes the comparison.

Outputs: ``results.md`` and ``results.csv`` (mean and standard deviation over seeds),
``heldout.png`` (held-out accuracy against step, band over seeds), ``separation.png`` (score gap and
separation AUC) and ``credit.png`` (per-rollout credit against score under GRPO's and ConSPO's rules, on
one logged batch).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from conspo.plots import plot_bands, plot_credit, read_metrics
from conspo.run import METRICS_FILE, RunError, train

SUMMARY = "summary.json"


def parse_methods(text: str) -> list[str]:
    from conspo.presets import METHODS

    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise RunError(f"--methods {text!r}: unknown {unknown}; accepted values: {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise RunError(f"--methods {text!r} names a method twice")
    return methods


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, std


def compare(methods: list[str], seeds: int, output_dir: str | Path, **train_options: Any) -> dict[str, Any]:
    """Train every method with every seed (reusing finished runs), then write the table and figures."""
    if seeds < 1:
        raise RunError(f"--seeds must be >= 1, got {seeds}")
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, list[dict]] = {m: [] for m in methods}
    for method in methods:
        for seed in range(seeds):
            run_dir = root / method / f"seed{seed}"
            done = run_dir / SUMMARY
            if done.is_file():
                print(f"[conspo compare] reusing {run_dir}")
            else:
                print(f"[conspo compare] {method} seed {seed} -> {run_dir}")
                train(method=method, seed=seed, output_dir=run_dir, resume=run_dir.exists(), **train_options)
            summaries[method].append(json.loads(done.read_text()))
    return write_report(root, summaries)


def write_report(root: Path, summaries: dict[str, list[dict]]) -> dict[str, Any]:
    rows = []
    for method, runs in summaries.items():
        before = _mean_std([r["heldout_before"] for r in runs])
        after = _mean_std([r["heldout_after"] for r in runs])
        gain = _mean_std([r["heldout_after"] - r["heldout_before"] for r in runs])
        rows.append({"method": method, "seeds": len(runs), "steps": runs[0]["steps"] if runs else 0,
                     "before_mean": before[0], "before_std": before[1], "after_mean": after[0],
                     "after_std": after[1], "gain_mean": gain[0], "gain_std": gain[1]})
    with (root / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| method | seeds | steps | held-out before | held-out after | gain (points) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['seeds']} | {r['steps']} | {100 * r['before_mean']:.1f} ± {100 * r['before_std']:.1f} "
            f"| {100 * r['after_mean']:.1f} ± {100 * r['after_std']:.1f} | {100 * r['gain_mean']:+.1f} ± "
            f"{100 * r['gain_std']:.1f} |"
        )
    lines.append("")
    lines.append("Held-out accuracy is greedy (temperature 0) on the task's held-out problems; ± is the standard "
                 "deviation over seeds (n-1).")
    (root / "results.md").write_text("\n".join(lines) + "\n")

    records = {m: [read_metrics(Path(r["metrics"])) for r in runs] for m, runs in summaries.items()}
    figures = {
        "heldout": plot_bands(records, [("held-out accuracy (greedy)", "eval/heldout_accuracy")],
                              root / "heldout.png"),
        "separation": plot_bands(records, [("score gap (mean_P s - mean_N s)", "conspo/score_gap"),
                                           ("separation AUC", "conspo/auc")], root / "separation.png"),
    }
    credit = credit_figure(root, summaries)
    if credit is not None:
        figures["credit"] = credit
    print("\n".join(lines[: len(rows) + 2]))
    print(f"[conspo compare] table: {root / 'results.md'} and {root / 'results.csv'}; figures: "
          f"{', '.join(str(p) for p in figures.values())}")
    return {"rows": rows, "figures": {k: str(v) for k, v in figures.items()}}


def credit_figure(root: Path, summaries: dict[str, list[dict]]) -> Path | None:
    """GRPO's and ConSPO's credit rules applied to the same logged batch (the first run that dumped one)."""
    batch = None
    for runs in summaries.values():
        for r in runs:
            for path in sorted(Path(r["final_checkpoint"]).parent.glob("batch-step*.json")):
                batch = json.loads(path.read_text())
                break
            if batch:
                break
        if batch:
            break
    if batch is None:
        return None
    import torch

    from conspo import objectives as obj

    scores = torch.tensor(batch["scores"], dtype=torch.float64)
    correct = torch.tensor(batch["correct"], dtype=torch.bool)
    gids = torch.tensor(batch["group_ids"])
    conspo = obj.conspo_loss(scores, correct, gids)
    n_valid = float(conspo.metrics["valid_frac"]) * len(set(batch["group_ids"]))
    panels = {
        "GRPO (spec section 3): fixed by reward counts": (batch["scores"], obj.grpo_credit(correct, gids).tolist(),
                                                           batch["correct"]),
        "ConSPO (tau 0.1, m 0), per group": (batch["scores"], (conspo.credit * n_valid).tolist(), batch["correct"]),
    }
    return plot_credit(panels, root / "credit.png",
                       title=f"credit against score on one batch ({batch['objective']} run, step {batch['step']})")


def compare_command(ns) -> int:
    try:
        methods = parse_methods(ns.methods)
        compare(methods, ns.seeds, ns.output_dir or "runs/compare", task=ns.task, dataset=ns.dataset,
                question_field=ns.question_field, answer_field=ns.answer_field, template=ns.template,
                model=ns.model, config=ns.config, max_steps=ns.max_steps, report_to=ns.report_to, lora=ns.lora,
                lora_r=ns.lora_r)
    except RunError as err:
        print(f"conspo compare: error: {err}")
        return 2
    return 0


__all__ = ["compare", "compare_command", "parse_methods", "write_report", "METRICS_FILE"]
