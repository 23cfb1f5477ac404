"""Run under `torchrun --nproc_per_node 2`: a short ConSPO run whose groups straddle the two processes.

Each rank saves what it captured (parameters, micro-batches, gradients) for the test to check.
"""

import sys
from pathlib import Path

import torch
from datasets import Dataset
from exactness import make_trainer
from tiny import build_tokenizer, odd_digit_parity


def main(model_dir: str, out_dir: str, objective: str = "conspo") -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = Dataset.from_dict({"prompt": [f"{i % 10}+{i // 10}=" for i in range(64)]})
    if objective == "conspo-dynamic":
        # Dynamic sampling: whole groups on each rank (8 rollouts = 2 groups), extra rounds drawn on both ranks.
        settings = dict(per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=2,
                        dynamic_sampling=True, dynamic_sampling_max_rounds=2)
    else:
        # 2 processes x 6 rollouts = 12 = 3 groups of 4: the middle group is split between the ranks.
        settings = dict(per_device_train_batch_size=6, gradient_accumulation_steps=1, num_iterations=2,
                        max_steps=2, objective=objective)
    trainer = make_trainer(Path(model_dir), out / "run", build_tokenizer(), dataset, odd_digit_parity, **settings)
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save({
        "world_size": trainer.accelerator.num_processes,
        "group_batching": trainer.args.group_batching,
        "config": trainer.args,
        "params": trainer.captured_params,
        "batches": trainer.captured_batches,
        "grads": trainer.captured_grads,
    }, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:4])
