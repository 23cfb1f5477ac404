"""`conspo compare`: several methods on the same task, data, rollout budget and seeds, then one table.

Every (method, seed) run lives in ``<output>/<method>/seed<k>/`` and is the ordinary main job
(:func:`conspo.run.train`), so a run interrupted half-way resumes from its last checkpoint and a
finished run (one with ``summary.json``) recorded with the same settings (the hash in its ``run.json``) is
reused: rerunning the same command finishes the comparison. A run recorded with other settings (another task,
config, budget or model) is trained again, never reported. Every run is planned and checked before the first
one starts.

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
from conspo.run import (
    METRICS_FILE,
    RunError,
    _entries,
    overwrite_problem,
    plan_run,
    read_run_record,
    settings_diff,
    train,
)

SUMMARY = "summary.json"


def parse_methods(text: str) -> list[str]:
    from conspo.presets import ALL_METHODS as METHODS

    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise RunError(f"--methods {text!r} names no method; give comma-separated methods from: {', '.join(METHODS)}")
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
    from conspo.evaluation import evaluate
    from conspo.loading import load_model
    from conspo.run import resolve_task

    options = {**(train_options.get("task_options") or {}),
               **({"difficulty": train_options["difficulty"]} if train_options.get("difficulty") else {})}
    task = resolve_task(train_options.get("task"), train_options.get("dataset"), seed=summary["seed"],
                        question_field=train_options.get("question_field"),
                        answer_field=train_options.get("answer_field"), options=options)
    model, tokenizer = load_model(summary["final_checkpoint"])
    _, result = evaluate(model, tokenizer, task, samples=samples, ks=ks, temperature=temperature,
                         seed=summary["seed"], limit=limit, template=train_options.get("template") or "plain",
                         progress=False)
    write_atomic(cached, json.dumps(result, indent=2))  # a kill never leaves a torn cache for the rerun
    return result


COMPARE_FILE = "compare.json"


def _check_root(root: Path) -> None:
    """The comparison's directory: new, empty, or one conspo compare made (it holds ``compare.json``)."""
    if root.exists() and not root.is_dir():
        raise RunError(f"--output-dir {root} is a file; name a directory for the comparison")
    if not root.is_dir() or not any(root.iterdir()):
        return
    if (root / COMPARE_FILE).is_file() or (root / "results.md").is_file():
        return  # (results.md: a comparison made before compare.json was written)
    raise RunError(f"--output-dir {root} is not empty and holds no comparison (no {COMPARE_FILE}); conspo compare "
                   f"writes only into a new or empty directory or one of its own comparisons: choose another "
                   f"--output-dir")


def plan_comparison(methods: list[str], seeds: int, root: Path, **train_options: Any) -> list[tuple]:
    """``[(method, seed, plan, action)]`` for every run, every setting checked before any run starts.

    action: ``"reuse"`` (finished with the same settings), ``"resume"`` (unfinished, same settings), ``"new"``,
    or ``"rerun"`` (the directory holds a run recorded with other settings: it is trained again)."""
    for name, why in (("seed", "the seeds are 0..N-1 of --seeds"), ("resume", "unfinished runs resume by themselves"),
                      ("overwrite", "runs recorded with other settings are trained again by themselves"),
                      ("output_dir", "each run goes to <output-dir>/<method>/seed<k>")):
        if name in train_options:
            raise RunError(f"conspo compare does not take {name}: {why}")
    plans = []
    for method in methods:
        for seed in range(seeds):
            run_dir = root / method / f"seed{seed}"
            plan = plan_run(method=method, seed=seed, output_dir=run_dir, **train_options)
            record = read_run_record(run_dir)
            if record is None and _entries(run_dir):
                raise RunError(f"{run_dir} is not empty and holds no conspo run; move it away or choose another "
                               f"--output-dir")
            if record is None:
                action, differs = "new", {}
            else:
                differs = settings_diff(record, plan)
                if differs:
                    action = "rerun"
                    problem = overwrite_problem(plan)
                    if problem is not None:
                        raise RunError(f"{run_dir} holds a run with other settings, which would be trained again, "
                                       f"but {problem}; choose another --output-dir")
                else:
                    action = "reuse" if (run_dir / SUMMARY).is_file() else "resume"
            plans.append((method, seed, plan, action, differs))
    return plans


def compare(methods: list[str], seeds: int, output_dir: str | Path, *, eval_samples: int = 0,
            ks: list[int] | None = None, sample_limit: int | None = 200, eval_temperature: float = 1.0,
            **train_options: Any) -> dict[str, Any]:
    """Train every method with every seed, evaluate each final checkpoint with the same sampling settings
    (``eval_samples`` > 0, on the first ``sample_limit`` held-out problems), then write the table and figures.
    ``train_options`` go to :func:`conspo.run.train` (its ``eval_limit`` included).

    A finished run recorded with the same settings (``run.json``'s hash) is reused, an unfinished one resumed, and
    one recorded with other settings (another task, config, budget, model) trained again: the table never mixes
    runs made with different settings."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise RunError(f"--seeds must be an integer >= 1, got {seeds!r}")
    ks = sorted(set(ks or [1]))
    if eval_samples and ks[-1] > eval_samples:
        raise RunError(f"--k {','.join(map(str, ks))}: every k must be <= --eval-samples ({eval_samples})")
    root = Path(output_dir)
    _check_root(root)
    plans = plan_comparison(methods, seeds, root, **train_options)
    config = train_options.get("config")
    if isinstance(config, (str, Path)) and plans:
        from conspo.run import load_yaml_config

        if "seed" in load_yaml_config(config):
            print(f"[conspo compare] the seed in {config} is not used: the runs have seeds 0..{seeds - 1} (--seeds)")
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(root / COMPARE_FILE, json.dumps({"written_by": "conspo compare", "methods": methods,
                                                  "seeds": seeds}, indent=2))
    summaries: dict[str, list[dict]] = {m: [] for m in methods}
    for method, seed, plan, action, differs in plans:
        run_dir = plan.output_dir
        done = run_dir / SUMMARY
        if action == "reuse":
            print(f"[conspo compare] reusing {run_dir} (finished, same settings)")
        else:
            if action == "rerun":
                fields = ", ".join(list(differs)[:6]) + (", ..." if len(differs) > 6 else "")
                print(f"[conspo compare] {run_dir} holds a run with other settings ({fields}); training it again")
            print(f"[conspo compare] {method} seed {seed} -> {run_dir}")
            train(method=method, seed=seed, output_dir=run_dir, resume=action == "resume",
                  overwrite=action == "rerun", **train_options)
        summary = json.loads(done.read_text())
        if eval_samples:
            summary["sampled"] = sampled_eval(run_dir, summary, train_options, samples=eval_samples, ks=ks,
                                              limit=sample_limit, temperature=eval_temperature)
        summaries[method].append(summary)
    return write_report(root, summaries, context=_context(plans))


def _context(plans: list[tuple]) -> dict[str, Any]:
    """What every run of the comparison shares: task, model, budget (from the first plan; all share them)."""
    if not plans:
        return {}
    plan = plans[0][2]
    args = plan.args
    return {
        "task": plan.task_label,
        "model": plan.settings["model"],
        "max_steps": args.max_steps,
        "rollouts_per_step": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length,
        "heldout_problems": len(plan.task.test[:plan.eval_limit] if plan.eval_limit else plan.task.test),
        "seeds": sorted({p[1] for p in plans}),
        "val_size": len(plan.val),
    }


def write_report(root: Path, summaries: dict[str, list[dict]], context: dict | None = None) -> dict[str, Any]:
    context = context or {}
    rows = []
    for method, runs in summaries.items():
        before = _mean_std([r["heldout_before"] for r in runs])
        after = _mean_std([r["heldout_after"] for r in runs])
        gain = _mean_std([r["heldout_after"] - r["heldout_before"] for r in runs])
        row = {"method": method, "seeds": len(runs), "steps": runs[0]["steps"] if runs else 0,
               "before_mean": before[0], "before_std": before[1], "after_mean": after[0],
               "after_std": after[1], "gain_mean": gain[0], "gain_std": gain[1]}
        if runs and all("selection" in r for r in runs):
            chosen = _mean_std([r["selection"]["heldout_accuracy"] for r in runs])
            row["best_mean"], row["best_std"] = chosen
            row["best_steps"] = " ".join(str(r["selection"]["best_step"]) for r in runs)
        for name in _sampled_names(runs):
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std([r["sampled"]["overall"][name] for r in runs])
        rows.append(row)
    with (root / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    best = all("best_mean" in r for r in rows)
    sampled = [k[: -len("_mean")] for k in rows[0] if k.endswith("_mean") and "@" in k]
    lines = []
    if context:
        seeds = context["seeds"]
        lines += [
            f"Task: {context['task']} (held-out accuracy on {context['heldout_problems']} test problems); model: "
            f"{context['model']}; budget: {context['max_steps']} optimizer steps of {context['rollouts_per_step']} "
            f"rollouts ({context['num_generations']} per prompt, completions up to {context['max_completion_length']} "
            f"tokens); seeds {', '.join(map(str, seeds))}.",
            "",
        ]
    lines += [
        "| method | seeds | steps | held-out before | held-out after | gain (points) |"
        + (" best checkpoint (validation-chosen) | best steps |" if best else "")
        + "".join(f" {name} |" for name in sampled),
        "|---|---|---|---|---|---|" + ("---|---|" if best else "") + "---|" * len(sampled),
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['seeds']} | {r['steps']} | {100 * r['before_mean']:.1f} ± {100 * r['before_std']:.1f} "
            f"| {100 * r['after_mean']:.1f} ± {100 * r['after_std']:.1f} | {100 * r['gain_mean']:+.1f} ± "
            f"{100 * r['gain_std']:.1f} |"
            + (f" {100 * r['best_mean']:.1f} ± {100 * r['best_std']:.1f} | {r['best_steps']} |" if best else "")
            + "".join(f" {100 * r[f'{n}_mean']:.1f} ± {100 * r[f'{n}_std']:.1f} |" for n in sampled)
        )
    lines.append("")
    lines.append("Held-out accuracy is greedy (temperature 0) on the task's held-out problems; ± is the standard "
                 "deviation over seeds (n-1), in points.")
    if best:
        rule = next(iter(summaries.values()))[0]["selection"]["rule"]
        lines.append(f"Best checkpoint: the held-out accuracy of the {rule}; chosen once per run, its test "
                     f"accuracy measured once.")
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
    print("\n".join(lines))
    print(f"[conspo compare] table: {root / 'results.md'} and {root / 'results.csv'}; figures: "
          f"{', '.join(str(p) for p in figures.values())}")
    return {"rows": rows, "figures": {k: str(v) for k, v in figures.items()}, "context": context}


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


COMPARE_OPTIONS = ("methods", "seeds", "eval_samples", "k")


def compare_command(ns) -> int:
    """``conspo compare``: the namespace of ``conspo.cli.build_compare_parser`` (``ns._explicit``: flags given)."""
    from conspo.checkpoints import SaveError
    from conspo.evaluation import EvalError
    from conspo.run import report_error, split_namespace
    from conspo.tasks.datasets import DatasetError

    script, config_fields = split_namespace(ns, getattr(ns, "_explicit", set()), own=COMPARE_OPTIONS)
    output_dir = script.pop("output_dir", None) or "runs/compare"
    try:
        methods = parse_methods(ns.methods)
        from conspo.evaluation import parse_ks

        if ns.eval_samples < 0:
            raise RunError(f"--eval-samples must be >= 0 (0: greedy held-out accuracy only), got {ns.eval_samples}")
        try:
            ks = parse_ks(ns.k, max(1, ns.eval_samples)) if ns.eval_samples else [1]
        except EvalError as err:  # parse_ks speaks of conspo eval's --samples; here it is --eval-samples
            raise RunError(str(err).replace("--samples", "--eval-samples")) from err
        compare(methods, ns.seeds, output_dir, eval_samples=ns.eval_samples, ks=ks, **script, **config_fields)
    except (RunError, DatasetError, EvalError) as err:
        report_error("compare", err)
        return 2
    except SaveError as err:
        report_error("compare", err)
        return 1
    return 0


__all__ = ["compare", "compare_command", "parse_methods", "write_report", "METRICS_FILE"]
