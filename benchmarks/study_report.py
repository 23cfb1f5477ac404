"""Tables and figures of the study (issue 19) from the run directories ``scripts/study_cpu.sh`` and
``scripts/study_smollm2.sh`` leave: nothing is trained here, every number is read from a run's own files.

A *variant* is one directory ``<root>/<part>/<method>/`` holding ``seed<k>/`` runs: ``methods/grpo``,
``ablations/conspo_no_margin``, ``tau_0.1/conspo`` ... Each run gives its held-out greedy accuracy before and
after training (``summary.json``), the validation-chosen checkpoint's held-out accuracy (``selection``), the
paper-protocol sampled metrics of that checkpoint (``eval_paper/eval_summary.json``, when made), its generated
rollouts and ConSPO's credit diagnostics (``metrics.jsonl``). Differences are paired by seed against a reference
variant (``--reference``, default ``methods/conspo``): the mean of the per-seed differences, their standard
deviation, and whether every seed agrees in sign.

    python benchmarks/study_report.py runs/study2/arithmetic                 # markdown tables on stdout
    python benchmarks/study_report.py runs/study2/arithmetic --figures docs/figures --prefix study2
    python benchmarks/study_report.py runs/smollm2 --reference conspo      # greedy (eval) and sampled: final/

For study_smollm2.sh runs the "greedy before/after" columns are training's one-problem check (--eval-limit 1);
the held-out numbers are "greedy (eval)" and the sampled columns.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def read_run(run: Path) -> dict | None:
    """One finished run's numbers, or None while it has no summary.json."""
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    rows = _rows(run / "metrics.jsonl")
    per_step = summary.get("rollouts_per_step") or 0
    generated, curve, total = [], [], 0
    for row in rows:
        if "loss" in row:  # one optimizer step
            total += int(row.get("conspo/rollouts_generated", per_step))
            generated.append((row["step"], total))
    at_step = dict(generated)
    for row in rows:
        if "eval/heldout_accuracy" in row:
            curve.append((at_step.get(row["step"], 0), row["eval/heldout_accuracy"]))
    train = [r for r in rows if "loss" in r]

    def diag(key: str) -> float | None:
        values = [r[key] for r in train if key in r]
        return statistics.mean(values) if values else None

    out = {
        "seed": summary["seed"], "before": summary["heldout_before"], "after": summary["heldout_after"],
        "steps": summary["steps"], "generated": total, "curve": curve, "wall": summary.get("wall_seconds"),
        "neg_entropy_ratio": diag("conspo/neg_entropy_ratio"), "gate_sd": diag("conspo/gate_sd"),
        "gate_mean": diag("conspo/gate_mean"), "tau": diag("conspo/tau"),
    }
    selection = summary.get("selection") or {}
    if "heldout_accuracy" in selection:
        out["best"] = selection["heldout_accuracy"]
        out["best_step"] = selection.get("best_step")
    # the paper's sampling on best/ (study_cpu.sh), or on final/ (study_smollm2.sh, which also decodes greedily)
    for sampled in (run / "eval_paper" / "eval_summary.json", run / "eval" / "sampled" / "eval_summary.json"):
        if sampled.is_file():
            result = json.loads(sampled.read_text())
            out["sampled"] = {k: v for k, v in result["overall"].items() if "@" in k}
            out["sampled_settings"] = result.get("settings", {})
    greedy = run / "eval" / "greedy" / "eval_summary.json"
    if greedy.is_file():
        out["greedy_eval"] = json.loads(greedy.read_text())["overall"]["avg@1"]
    return out


def read_variants(root: Path) -> dict[str, list[dict]]:
    """``<part>/<method>/seed<k>`` runs (study_cpu.sh), named ``part/method``; or ``<method>/seed<k>`` runs
    (study_smollm2.sh), named ``method``."""
    variants: dict[str, list[dict]] = {}
    for method_dir in sorted(p for p in [*root.glob("*"), *root.glob("*/*")] if p.is_dir() and any(p.glob("seed*"))):
        runs = [r for r in (read_run(s) for s in sorted(method_dir.glob("seed*"))) if r is not None]
        if runs:
            name = method_dir.name if method_dir.parent == root else f"{method_dir.parent.name}/{method_dir.name}"
            variants[name] = sorted(runs, key=lambda r: r["seed"])
    return variants


def paired(runs: list[dict], reference: list[dict], get) -> tuple[float, float, str] | None:
    """Mean and sd of get(run) - get(reference run) over the seeds both have, and the signs per seed."""
    ref = {r["seed"]: get(r) for r in reference}
    diffs = [get(r) - ref[r["seed"]] for r in runs if r["seed"] in ref and get(r) is not None
             and ref[r["seed"]] is not None]
    if not diffs:
        return None
    mean, sd = _mean_sd(diffs)
    return mean, sd, "".join("+" if d > 0 else "-" if d < 0 else "0" for d in diffs)


def _pct(mean: float, sd: float | None = None) -> str:
    if mean != mean:
        return "-"
    return f"{100 * mean:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def _sampled(run: dict, name: str) -> float | None:
    return run.get("sampled", {}).get(name)


def table(variants: dict[str, list[dict]], reference: str) -> str:
    ks = sorted({k for runs in variants.values() for r in runs for k in r.get("sampled", {})},
                key=lambda k: (k.split("@")[0], int(k.split("@")[1])))
    evals = any("greedy_eval" in r for runs in variants.values() for r in runs)
    head = ["variant", "seeds", "rollouts", "steps", "greedy before", "greedy after", "Δ vs ref (paired)",
            "val-chosen ckpt", "Δ vs ref (paired)", *(["greedy (eval)", "Δ vs ref (paired)"] if evals else []), *ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = variants.get(reference, [])
    for name, runs in variants.items():
        cells = [name, str(len(runs)), f"{statistics.mean(r['generated'] for r in runs):.0f}",
                 f"{statistics.mean(r['steps'] for r in runs):.0f}",
                 _pct(*_mean_sd([r["before"] for r in runs])), _pct(*_mean_sd([r["after"] for r in runs]))]
        for key in ("after", "best", *(["greedy_eval"] if evals else [])):
            if key != "after":
                cells.append(_pct(*_mean_sd([r[key] for r in runs if key in r])))
            d = paired(runs, ref, lambda r, key=key: r.get(key)) if name != reference else None
            cells.append("-" if d is None else f"{100 * d[0]:+.1f} ± {100 * d[1]:.1f} ({d[2]})")
        for k in ks:
            cells.append(_pct(*_mean_sd([v for v in (_sampled(r, k) for r in runs) if v is not None])))
            d = paired(runs, ref, lambda r, k=k: _sampled(r, k)) if name != reference else None
            if d is not None:
                cells[-1] += f" ({100 * d[0]:+.1f} ± {100 * d[1]:.1f} {d[2]})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def credit_table(variants: dict[str, list[dict]]) -> str:
    """How far ConSPO's credit is from uniform, averaged over training steps and seeds."""

    def avg(runs: list[dict], key: str, spec: str) -> str:
        values = [r[key] for r in runs if r[key] is not None]
        return format(statistics.mean(values), spec) if values else "-"

    lines = ["| variant | tau (logged) | neg_entropy / log N (1 = uniform) | gate mean | gate sd |",
             "|---|---|---|---|---|"]
    for name, runs in variants.items():
        if all(r["neg_entropy_ratio"] is None for r in runs):
            continue
        lines.append(f"| {name} | {avg(runs, 'tau', '.3g')} | {avg(runs, 'neg_entropy_ratio', '.4f')} | "
                     f"{avg(runs, 'gate_mean', '.3f')} | {avg(runs, 'gate_sd', '.3f')} |")
    return "\n".join(lines)


def figure(variants: dict[str, list[dict]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    for name, runs in variants.items():
        n = min(len(r["curve"]) for r in runs)
        if n == 0:
            continue
        xs = [statistics.mean(r["curve"][i][0] for r in runs) for i in range(n)]
        ys = [statistics.mean(r["curve"][i][1] for r in runs) for i in range(n)]
        style = "-" if name.endswith("/conspo") and name.startswith("methods") else "--" if "conspo" in name else ":"
        ax.plot(xs, [100 * y for y in ys], style, marker="o", markersize=3, label=f"{name} ({len(runs)} seeds)")
    ax.set_xlabel("generated rollouts")
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def credit_figure(batch_file: Path, taus: list[float], out: Path) -> None:
    """Credit against score of one logged batch (``dump_batch_step``) under ConSPO at each temperature."""
    import torch

    from conspo.objectives import conspo_loss
    from conspo.plots import plot_credit

    batch = json.loads(batch_file.read_text())
    scores = torch.tensor(batch["scores"], dtype=torch.float64)
    correct = torch.tensor(batch["correct"], dtype=torch.bool)
    groups = torch.tensor(batch["group_ids"])
    panels = {}
    for tau in taus:
        credit = conspo_loss(scores, correct, groups, tau=tau).credit
        panels[f"ConSPO, tau = {tau:.3g}"] = (scores.tolist(), credit.tolist(), correct.tolist())
    plot_credit(panels, out, f"credit of one batch ({batch_file.parent.name}, step {batch['step']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--reference", default="methods/conspo")
    parser.add_argument("--figures", type=Path, help="directory for <prefix>_heldout.png")
    parser.add_argument("--prefix", default="study")
    parser.add_argument("--credit", type=Path, help="a run's batch-step<N>.json: also <prefix>_credit.png")
    parser.add_argument("--credit-taus", default="10", help="comma-separated temperatures for --credit")
    ns = parser.parse_args()
    if not ns.root.is_dir():
        parser.error(f"{ns.root}: no such directory")
    taus: list[float] = []
    if ns.credit:  # checked before anything is read or written
        if not ns.credit.is_file():
            parser.error(f"--credit {ns.credit}: no such file (a run's batch-step<N>.json)")
        try:
            taus = [float(t) for t in ns.credit_taus.split(",") if t.strip()]
        except ValueError:
            parser.error(f"--credit-taus {ns.credit_taus!r}: give comma-separated numbers, e.g. 10,0.269")
    variants = read_variants(ns.root)
    if not variants:
        parser.error(f"{ns.root}: no finished runs (<part>/<method>/seed<k>/summary.json)")
    if ns.reference not in variants:
        parser.error(f"--reference {ns.reference!r}: no such variant under {ns.root}; accepted: {', '.join(variants)}")
    print(table(variants, ns.reference))
    print()
    print(credit_table(variants))
    if ns.figures:
        ns.figures.mkdir(parents=True, exist_ok=True)
        figure(variants, ns.figures / f"{ns.prefix}_heldout.png", f"{ns.root}: held-out accuracy (mean over seeds)")
        if ns.credit:
            credit_figure(ns.credit, taus, ns.figures / f"{ns.prefix}_credit.png")


if __name__ == "__main__":
    main()
