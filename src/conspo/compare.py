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

from conspo.checkpoints import write_atomic
from conspo.plots import plot_bands, plot_credit, read_metrics
from conspo.run import METRICS_FILE, RunError, train

SUMMARY = "summary.json"


def parse_methods(text: str) -> list[str]:
    from conspo.presets import ALL_METHODS as METHODS

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


EVAL_SUMMARY = "eval_summary.json"


def sampled_eval(run_dir: Path, summary: dict, train_options: dict, *, samples: int, ks: list[int],
                 limit: int | None, temperature: float) -> dict:
    """avg@k / pass@k / maj@k of a run's final checkpoint on its held-out problems (cached in the run; a cache
    made with other sampling settings is evaluated again, never mixed into the table)."""
    cached = run_dir / EVAL_SUMMARY
    if cached.is_file():
        result = json.loads(cached.read_text())
        made = result.get("settings", {})
        if (result.get("ks") == ks and made.get("samples") == samples and made.get("limit") == limit
                and made.get("temperature") == temperature):
            return result
        print(f"[conspo compare] {cached} was made with other sampling settings; evaluating again")
    from conspo.evaluation import evaluate, load_model
    from conspo.run import resolve_task

    task = resolve_task(train_options.get("task"), train_options.get("dataset"), seed=summary["seed"],
                        question_field=train_options.get("question_field"),
                        answer_field=train_options.get("answer_field"))
    model, tokenizer = load_model(summary["final_checkpoint"])
    _, result = evaluate(model, tokenizer, task, samples=samples, ks=ks, temperature=temperature,
                         seed=summary["seed"], limit=limit, template=train_options.get("template") or "plain",
                         progress=False)
    write_atomic(cached, json.dumps(result, indent=2))  # a kill never leaves a torn cache for the rerun
    return result


def compare(methods: list[str], seeds: int, output_dir: str | Path, *, eval_samples: int = 0,
            ks: list[int] | None = None, sample_limit: int | None = 200, eval_temperature: float = 1.0,
            **train_options: Any) -> dict[str, Any]:
    """Train every method with every seed (reusing finished runs), evaluate each final checkpoint with the
    same sampling settings (``eval_samples`` > 0, on the first ``sample_limit`` held-out problems), then write the
    table and figures. ``train_options`` go to :func:`conspo.run.train` (its ``eval_limit`` included)."""
    if seeds < 1:
        raise RunError(f"--seeds must be >= 1, got {seeds}")
    ks = sorted(set(ks or [1]))
    if eval_samples and ks[-1] > eval_samples:
        raise RunError(f"--k {','.join(map(str, ks))}: every k must be <= --eval-samples ({eval_samples})")
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
            summary = json.loads(done.read_text())
            if eval_samples:
                summary["sampled"] = sampled_eval(run_dir, summary, train_options, samples=eval_samples, ks=ks,
                                                  limit=sample_limit, temperature=eval_temperature)
            summaries[method].append(summary)
    return write_report(root, summaries)


def write_report(root: Path, summaries: dict[str, list[dict]]) -> dict[str, Any]:
    rows = []
    for method, runs in summaries.items():
        before = _mean_std([r["heldout_before"] for r in runs])
        after = _mean_std([r["heldout_after"] for r in runs])
        gain = _mean_std([r["heldout_after"] - r["heldout_before"] for r in runs])
        row = {"method": method, "seeds": len(runs), "steps": runs[0]["steps"] if runs else 0,
               "before_mean": before[0], "before_std": before[1], "after_mean": after[0],
               "after_std": after[1], "gain_mean": gain[0], "gain_std": gain[1]}
        for name in _sampled_names(runs):
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std([r["sampled"]["overall"][name] for r in runs])
        rows.append(row)
    with (root / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    sampled = [k[: -len("_mean")] for k in rows[0] if k.endswith("_mean") and "@" in k]
    lines = [
        "| method | seeds | steps | held-out before | held-out after | gain (points) |"
        + "".join(f" {name} |" for name in sampled),
        "|---|---|---|---|---|---|" + "---|" * len(sampled),
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['seeds']} | {r['steps']} | {100 * r['before_mean']:.1f} ± {100 * r['before_std']:.1f} "
            f"| {100 * r['after_mean']:.1f} ± {100 * r['after_std']:.1f} | {100 * r['gain_mean']:+.1f} ± "
            f"{100 * r['gain_std']:.1f} |"
            + "".join(f" {100 * r[f'{n}_mean']:.1f} ± {100 * r[f'{n}_std']:.1f} |" for n in sampled)
        )
    lines.append("")
    lines.append("Held-out accuracy is greedy (temperature 0) on the task's held-out problems; ± is the standard "
                 "deviation over seeds (n-1), in points.")
    if sampled:
        settings = summaries[rows[0]["method"]][0]["sampled"].get("settings", {})
        lines.append(f"avg@k, pass@k (unbiased) and maj@k sample {settings.get('samples')} completions per held-out "
                     f"problem at temperature {settings.get('temperature')} from each final checkpoint.")
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


def _sampled_names(runs: list[dict]) -> list[str]:
    if not runs or any("sampled" not in r for r in runs):
        return []
    from conspo.metrics import metric_names

    return metric_names(runs[0]["sampled"]["ks"])


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
    from conspo.checkpoints import SaveError
    from conspo.evaluation import EvalError
    from conspo.tasks.datasets import DatasetError

    try:
        methods = parse_methods(ns.methods)
        from conspo.evaluation import parse_ks

        if ns.eval_samples < 0:
            raise RunError(f"--eval-samples must be >= 0 (0: greedy held-out accuracy only), got {ns.eval_samples}")
        try:
            ks = parse_ks(ns.k, max(1, ns.eval_samples)) if ns.eval_samples else [1]
        except EvalError as err:  # parse_ks speaks of conspo eval's --samples; here it is --eval-samples
            raise RunError(str(err).replace("--samples", "--eval-samples")) from err
        compare(methods, ns.seeds, ns.output_dir or "runs/compare", eval_samples=ns.eval_samples,
                ks=ks, task=ns.task, dataset=ns.dataset,
                question_field=ns.question_field, answer_field=ns.answer_field, template=ns.template,
                model=ns.model, config=ns.config, max_steps=ns.max_steps, report_to=ns.report_to, lora=ns.lora,
                lora_r=ns.lora_r)
    except (RunError, DatasetError, EvalError) as err:
        print(f"conspo compare: error: {err}")
        return 2
    except SaveError as err:
        print(f"conspo compare: error: {err}")
        return 1
    return 0


__all__ = ["compare", "compare_command", "parse_methods", "write_report", "METRICS_FILE"]
