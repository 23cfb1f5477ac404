"""Dynamic sampling against plain sampling at one rollout budget, counted in *generated* rollouts.

Two settings on the embedded tiny model (warm-started on the default arithmetic task, cached):

* ``default``: the embedded default's task (two-digit sums and differences), where 6-19% of groups are degenerate;
* ``hard``: the same task from a warm start cut to ``HARD_WARM_STEPS`` supervised steps, where the policy starts
  far lower and most groups are all wrong (the situation of a real model on competition math).

For each setting, method (ConSPO with the paper's defaults) and seed, one run without and one with dynamic sampling,
interleaved seed by seed so that machine noise falls on both alike. A run stops when it has generated the budget of
rollouts (dynamic sampling spends more per optimizer step, so it takes fewer steps). Printed side by side: held-out
greedy accuracy before and after, the gain per 1,000 generated rollouts, optimizer steps taken, wall time per step.

    python benchmarks/dynamic_sampling.py                      # 2 settings x 2 seeds, budget 2,560 rollouts
    python benchmarks/dynamic_sampling.py --seeds 3 --budget 5120 --settings default
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

HARD_WARM_STEPS = 250


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def run_one(setting: str, seed: int, dynamic: bool, budget: int, prompts: int, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from conspo import embedded
    from conspo.evaluation import heldout_accuracy
    from conspo.presets import DEFAULT_RL, preset_config
    from conspo.prompts import problem_prompt
    from conspo.rewards import make_reward_func
    from conspo.tasks import arithmetic
    from conspo.trainer import ConSPOTrainer

    task = arithmetic.make_task()
    steps = None if setting == "default" else HARD_WARM_STEPS
    policy, tokenizer = embedded.load_tiny(embedded.warm_start(task, seed=0, steps=steps))
    group = DEFAULT_RL["num_generations"]
    per_step = prompts * group

    class Budget(TrainerCallback):
        """Stops training once the run has generated ``budget`` rollouts."""

        def __init__(self):
            self.generated = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.generated += int(logs.get("conspo/rollouts_generated", per_step))
                if self.generated >= budget:
                    control.should_training_stop = True

    settings = {**DEFAULT_RL, "per_device_train_batch_size": per_step,
                "max_completion_length": task.max_completion_length, "max_steps": budget // per_step,
                "output_dir": str(workdir / f"{setting}-{seed}-{int(dynamic)}"), "save_strategy": "no",
                "logging_steps": 1, "report_to": "none", "use_cpu": True, "bf16": False, "seed": seed,
                "disable_tqdm": True}
    if dynamic:
        settings["dynamic_sampling"] = True
    config = preset_config("conspo", **settings)
    rows = [{"prompt": problem_prompt(p, task.instruction, "plain", tokenizer), "answer": p["answer"]}
            for p in task.train]
    budget_cb = Budget()
    trainer = ConSPOTrainer(model=policy, reward_funcs=make_reward_func(task.verifier, name="correct"), args=config,
                            train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[budget_cb])
    before = heldout_accuracy(trainer.model, tokenizer, task, limit=300)
    torch.manual_seed(seed)
    started = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - started
    after = heldout_accuracy(trainer.model, tokenizer, task, limit=300)
    steps = trainer.state.global_step
    kept = [h["conspo/kept_frac"] for h in trainer.state.log_history if "conspo/kept_frac" in h]
    valid = [h["conspo/valid_frac"] for h in trainer.state.log_history if "conspo/valid_frac" in h]
    return {"before": before, "after": after, "steps": steps, "generated": budget_cb.generated,
            "s_per_step": elapsed / max(1, steps), "kept_frac": statistics.mean(kept) if kept else None,
            "valid_frac": statistics.mean(valid) if valid else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="default,hard", help="comma list of: default, hard")
    parser.add_argument("--seeds", type=_positive, default=2)
    parser.add_argument("--budget", type=_positive, default=2560, help="generated rollouts per run")
    parser.add_argument("--prompts", type=_positive, default=8, help="prompts per generation batch")
    ns = parser.parse_args()
    chosen = [s.strip() for s in ns.settings.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in ("default", "hard")]
    if not chosen or unknown:
        parser.error(f"--settings: unknown {unknown or chosen}; accepted values: default, hard")
    if ns.budget < ns.prompts * 8:
        parser.error(f"--budget must hold at least one step ({ns.prompts * 8} rollouts)")

    results: dict[tuple[str, bool], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in chosen:
            for seed in range(ns.seeds):
                for dynamic in (False, True):  # interleaved: both variants see the same machine state
                    r = run_one(setting, seed, dynamic, ns.budget, ns.prompts, Path(tmp))
                    results.setdefault((setting, dynamic), []).append(r)
                    print(f"{setting:8s} seed {seed} dynamic={dynamic!s:5s} held-out {r['before']:.3f} -> "
                          f"{r['after']:.3f}  steps {r['steps']:3d}  generated {r['generated']}  "
                          f"{r['s_per_step']:.2f} s/step", flush=True)

    def mean(values):
        return statistics.mean(values) if values else float("nan")

    print(f"\nbudget {ns.budget} generated rollouts per run, {ns.prompts} prompts x 8 per generation batch, "
          f"ConSPO (paper defaults), {ns.seeds} seed(s)")
    print("| setting | sampling | held-out after | gain per 1k rollouts | steps | s/step | ratio s/step | "
          "valid groups (plain) / kept (dynamic) |")
    print("|---|---|---|---|---|---|---|---|")
    for setting in chosen:
        plain = results[(setting, False)]
        base_time = mean([r["s_per_step"] for r in plain])
        for dynamic in (False, True):
            rs = results[(setting, dynamic)]
            gain = mean([(r["after"] - r["before"]) * 1000 / r["generated"] for r in rs])
            frac = mean([r["kept_frac"] if dynamic else r["valid_frac"] for r in rs])
            t = mean([r["s_per_step"] for r in rs])
            print(f"| {setting} | {'dynamic' if dynamic else 'plain'} | {mean([r['after'] for r in rs]):.3f} | "
                  f"{gain:+.4f} | {mean([r['steps'] for r in rs]):.1f} | {t:.2f} | {t / base_time:.2f} | "
                  f"{frac:.2f} |")


if __name__ == "__main__":
    main()
