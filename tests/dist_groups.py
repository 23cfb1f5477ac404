"""Run under `torchrun --nproc_per_node 2`: short ConSPO runs with steps_per_generation 2.

Each rank saves what it recorded (generation batches and micro-batches as decoded prompts and completions, with
their optimizer step) to <out>/<case>/rank<r>.pt, for tests/test_trainer_groups.py to check across ranks.
"""

import sys
from pathlib import Path

import torch
from grouping import distinct_prompts, make_trainer
from tiny import build_tokenizer, odd_digit_parity

# case: settings. Two generation batches, steps_per_generation 2.
CASES = {
    # 2 x 16 rollouts, 8 groups, each rank holding whole ones; two optimizer steps per generation batch
    "whole": dict(per_device_train_batch_size=8, gradient_accumulation_steps=1),
    # the same batches under credit: two optimizer steps per generation batch
    "credit-forced": dict(group_batching="credit", per_device_train_batch_size=8, gradient_accumulation_steps=1),
    # 2 x 10 rollouts, 5 groups, the middle one on both ranks; one optimizer step (2 micro-batches) per generation
    # batch, as each step of 5 rollouts per rank could not hold whole groups
    "credit-b5": dict(per_device_train_batch_size=5, gradient_accumulation_steps=2),
}


def main(model_dir: str, out_dir: str, *cases: str) -> None:
    for case in cases:
        out = Path(out_dir) / case
        trainer = make_trainer(Path(model_dir), out / "run", build_tokenizer(), distinct_prompts(), odd_digit_parity,
                               steps_per_generation=2, max_steps=4 // CASES[case]["gradient_accumulation_steps"],
                               **CASES[case])
        trainer.train()
        record = trainer.record()
        record["weights"] = record["weights"][-1:]  # only the last: the checks here read prompts and completions
        out.mkdir(parents=True, exist_ok=True)
        torch.save(record, out / f"rank{record['rank']}.pt")
        trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *sys.argv[3:])
