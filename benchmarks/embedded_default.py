"""Check the embedded default's RL headroom: warm start, held-out greedy accuracy, plain GRPO, accuracy again.

Uses TRL's GRPOTrainer directly (loss_type="grpo") with the module defaults: ``make_task()``,
``warm_start()`` (``WarmStartConfig``, ``TinyModelSpec``) and ``DEFAULT_RL``. Prints one JSON line with the
timings and accuracies recorded in docs/embedded_default.md.

    python benchmarks/embedded_default.py [--seed 0] [--fresh] [--threads N] [--eval-every 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

T0 = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="task, warm start and RL seed")
    parser.add_argument("--fresh", action="store_true", help="warm start in a new temporary cache (times it)")
    parser.add_argument(
        "--cache-dir", default=None, help="warm-start cache (default: $CONSPO_CACHE or ~/.cache/conspo)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--eval-every", type=int, default=0, help="also evaluate every N RL steps (0: only at the end)")
    parser.add_argument("--rl", default="{}", help="JSON of GRPOConfig fields overriding DEFAULT_RL")
    parser.add_argument("--warm", default="{}", help="JSON of WarmStartConfig fields overriding its defaults")
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from conspo import embedded
    from conspo.evaluation import greedy_accuracy
    from conspo.presets import DEFAULT_RL
    from conspo.tasks.arithmetic import make_task

    if args.threads:
        torch.set_num_threads(args.threads)
    task = make_task(seed=args.seed)
    cache = tempfile.mkdtemp(prefix="conspo-bench-") if args.fresh else args.cache_dir
    t = time.perf_counter()
    warm = embedded.WarmStartConfig(**json.loads(args.warm))
    path = embedded.warm_start(task, seed=args.seed, cache_dir=cache, config=warm)
    warm_s = time.perf_counter() - t
    info = json.loads((path / "warm_start.json").read_text())
    model, tokenizer = embedded.load_tiny(path)

    def heldout() -> float:
        return greedy_accuracy(
            model, tokenizer, task.test, task.verifier, max_new_tokens=task.max_completion_length
        )

    before = heldout()

    def reward(prompts, completions, answer, **_):
        return [task.verifier(c, a).score for c, a in zip(completions, answer)]

    rl = {**DEFAULT_RL, "max_completion_length": task.max_completion_length, **json.loads(args.rl)}
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="conspo-bench-grpo-"),
        loss_type="grpo",
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        seed=args.seed,
        **rl,
    )
    train = Dataset.from_list([{"prompt": p["question"], "answer": p["answer"]} for p in task.train])
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=train, processing_class=tokenizer
    )
    curve: list[tuple[int, float]] = []
    eval_s = 0.0

    class Curve(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            nonlocal eval_s
            if args.eval_every and state.global_step % args.eval_every == 0:
                e = time.perf_counter()
                curve.append((state.global_step, heldout()))
                eval_s += time.perf_counter() - e

    trainer.add_callback(Curve())
    t = time.perf_counter()
    trainer.train()
    rl_s = time.perf_counter() - t - eval_s
    after = heldout()
    rewards = [round(log["reward"], 3) for log in trainer.state.log_history if "reward" in log]
    print(
        json.dumps(
            {
                "seed": args.seed,
                "warm_start_s": round(warm_s, 1),
                "warm_start_steps": info["steps"],
                "warm_start_val_accuracy": round(info["val_accuracy"], 3),
                "heldout_before": round(before, 3),
                "heldout_after": round(after, 3),
                "gain_points": round(100 * (after - before), 1),
                "rl_s": round(rl_s, 1),
                "rl": rl,
                "curve": curve,
                "rewards_every_10_steps": rewards,
                "total_s": round(time.perf_counter() - T0, 1),
                "threads": torch.get_num_threads(),
                "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
            }
        )
    )


if __name__ == "__main__":
    main()
