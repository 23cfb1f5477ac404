"""Shared machinery of the group-placement tests (issue 13): train while recording, then check from the data.

A recording ConSPOTrainer keeps, as decoded text and token ids, every generation batch it produced and
every micro-batch it back-propagated, with the optimizer step each micro-batch belonged to, and the
weights after every optimizer step. The checks never use the trainer's notion of a group: a group is
the set of rollouts of one prompt text within one generation batch (the dataset prompts are distinct),
and an optimizer step is counted from the micro-batches (``gradient_accumulation_steps`` of them each).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from conspo import ConSPOConfig, ConSPOTrainer

# Every objective setting is given, so a change of default cannot change what these tests check.
OBJECTIVE = dict(objective="conspo", tau=0.1, score="logprob", margin_schedule="constant", margin_start=0.0,
                 margin_max=0.0, neg_reduce="sum", group_norm="valid", trust_region=False, correct_threshold=0.5,
                 truncated="negative", beta=0.0, num_iterations=1, temperature=1.0)
# Plain SGD with a constant step and no clipping, so weights after a step are w - lr * grad.
OPTIMIZER = dict(optim="sgd", learning_rate=5e-2, weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant",
                 warmup_steps=0)


def distinct_prompts(n: int = 64) -> list[str]:
    """``n`` different prompt strings over the tiny tokenizer's characters."""
    prompts = [f"{i}*{i % 7}=" for i in range(n)]
    assert len(set(prompts)) == n
    return prompts


def prompt_texts(tokenizer, prompts: list[str]) -> dict[str, str]:
    """Each dataset prompt as the trainer's rows decode to (token ids through the tokenizer), to that prompt."""
    texts = {tokenizer.decode(tokenizer(p, add_special_tokens=False)["input_ids"], skip_special_tokens=True): p
             for p in prompts}
    assert len(texts) == len(prompts), "two prompts decode alike: a prompt text would not identify a group"
    return texts


class _AfterStep(TrainerCallback):
    def __init__(self, owner):
        self.owner = owner

    def on_step_end(self, args, state, control, **kwargs):
        self.owner.weights.append(self.owner.snapshot())
        self.owner.step_ends.append(state.global_step)


class RecordingTrainer(ConSPOTrainer):
    """ConSPOTrainer that records generation batches, micro-batches and weights (rows of this process only)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generations: list[dict] = []  # one per generation batch
        self.micro: list[dict] = []  # one per back-propagated micro-batch
        self.weights: list[dict[str, torch.Tensor]] = [self.snapshot()]  # before step 0, then after each step
        self.step_ends: list[int] = []
        self.add_callback(_AfterStep(self))

    def snapshot(self) -> dict[str, torch.Tensor]:
        model = self.accelerator.unwrap_model(self.model)
        return {n: p.detach().clone().cpu() for n, p in model.named_parameters()}

    def _rows(self, batch) -> dict:
        tok = self.processing_class
        prompts = [tok.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
                   for ids, m in zip(batch["prompt_ids"], batch["prompt_mask"])]
        completion_ids = [ids[m.bool()].tolist() for ids, m in zip(batch["completion_ids"], batch["completion_mask"])]
        return {
            "prompts": prompts,
            "prompt_ids": [ids[m.bool()].tolist() for ids, m in zip(batch["prompt_ids"], batch["prompt_mask"])],
            "raw_completion_ids": batch["completion_ids"].tolist(),
            "completion_ids": completion_ids,
            "completions": [tok.decode(ids, skip_special_tokens=True) for ids in completion_ids],
            "group_ids": batch["conspo_group_ids"].tolist(),
        }

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.model.training:
            self.generations.append({**self._rows(out), "global_step": self.state.global_step})
        return out

    def _compute_loss(self, model, inputs):
        if self.model.training:
            index = len(self.micro)
            self.micro.append({**self._rows(inputs), "generation": len(self.generations) - 1,
                               # counted here from the micro-batches, and as the trainer's state says it
                               "step": index // self.args.gradient_accumulation_steps,
                               "global_step": self.state.global_step})
        return super()._compute_loss(model, inputs)

    def record(self) -> dict:
        return {"generations": self.generations, "micro": self.micro, "weights": self.weights,
                "step_ends": self.step_ends, "world_size": self.accelerator.num_processes,
                "rank": self.accelerator.process_index, "group_batching": self.args.group_batching,
                "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
                "steps_per_generation": self.args.steps_per_generation,
                "num_generations": self.args.num_generations, "learning_rate": self.args.learning_rate}


def make_trainer(model_dir: Path, out_dir: Path, tokenizer, prompts: list[str], reward, **overrides) -> RecordingTrainer:
    from datasets import Dataset

    settings = dict(output_dir=str(out_dir), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                    disable_tqdm=True, per_device_train_batch_size=8, num_generations=4,
                    gradient_accumulation_steps=1, max_completion_length=6, logging_steps=1, seed=0,
                    **OBJECTIVE, **OPTIMIZER)
    settings.update(overrides)
    config = ConSPOConfig(**settings)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return RecordingTrainer(model=model, reward_funcs=reward, args=config,
                            train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)


# ------------------------------------------------------------------------------------------ checks from the data


def _rows_of(records: list[dict]) -> Counter:
    """Multiset of (prompt text, completion token ids) over records (micro-batches or generation batches)."""
    return Counter((p, tuple(c)) for r in records for p, c in zip(r["prompts"], r["completion_ids"]))


def steps_of(ranks: list[dict]) -> dict[int, list[dict]]:
    """Micro-batches of every rank, by optimizer step (counted from the micro-batches)."""
    steps: dict[int, list[dict]] = {}
    for rank in ranks:
        for m in rank["micro"]:
            steps.setdefault(m["step"], []).append(m)
    return steps


def check_step_counting(ranks: list[dict]) -> None:
    """The optimizer step counted from micro-batches is the trainer's global_step, on every rank."""
    for rank in ranks:
        for i, m in enumerate(rank["micro"]):
            assert m["global_step"] == m["step"], (
                f"rank {rank['rank']} micro-batch {i}: counted step {m['step']}, global_step {m['global_step']}")


def check_generation_batches(ranks: list[dict], known: set[str], g: int) -> list[Counter]:
    """Each generation batch (all ranks) holds g rollouts of each of its prompts, all dataset prompts (``known``:
    their decoded texts)."""
    counts = []
    n = len(ranks[0]["generations"])
    assert n >= 1 and all(len(r["generations"]) == n for r in ranks)
    for k in range(n):
        texts = Counter(p for r in ranks for p in r["generations"][k]["prompts"])
        assert set(texts) <= known, f"generation batch {k}: prompts not in the dataset: {set(texts) - known}"
        assert set(texts.values()) == {g}, f"generation batch {k}: rollouts per prompt {dict(texts)}"
        counts.append(texts)
    return counts


def group_split(records: list[dict]) -> dict[str, int]:
    return dict(Counter(p for r in records for p in r["prompts"]))


def check_whole_groups_per_step(ranks: list[dict], known: set[str], g: int) -> None:
    """Every prompt present in an optimizer step has all g rollouts of its generation batch there, and the
    steps fed by a generation batch partition its rollouts (as (prompt, completion) rows)."""
    check_step_counting(ranks)
    check_generation_batches(ranks, known, g)
    steps = steps_of(ranks)
    by_generation: dict[int, list[int]] = {}
    for t, micro in sorted(steps.items()):
        generations = {m["generation"] for m in micro}
        assert len(generations) == 1, f"optimizer step {t} mixes generation batches {sorted(generations)}"
        by_generation.setdefault(generations.pop(), []).append(t)
    layout = {k: {t: group_split(steps[t]) for t in ts} for k, ts in by_generation.items()}
    for k, ts in by_generation.items():
        for t in ts:
            split = layout[k][t]
            assert set(split.values()) == {g}, (
                f"optimizer step {t} (generation batch {k}) holds part of a group: rollouts per prompt in each "
                f"step of that generation batch: {layout[k]}")
        generated = _rows_of([r["generations"][k] for r in ranks])
        trained = _rows_of([m for t in ts for m in steps[t]])
        assert trained == generated, (
            f"the optimizer steps {ts} of generation batch {k} do not partition its rollouts: "
            f"{sum((trained - generated).values())} rows trained but not generated, "
            f"{sum((generated - trained).values())} generated but not trained")
    # every generation batch was trained on
    assert sorted(by_generation) == list(range(len(ranks[0]["generations"])))


def check_group_ids_follow_prompts(ranks: list[dict]) -> None:
    """Within a generation batch (all ranks), one group id means one prompt text and one prompt one group id,
    in the generated batch and in every micro-batch trained on."""
    n = len(ranks[0]["generations"])
    for k in range(n):
        records = [r["generations"][k] for r in ranks]
        records += [m for r in ranks for m in r["micro"] if m["generation"] == k]
        prompt_of: dict[int, set[str]] = {}
        gid_of: dict[str, set[int]] = {}
        for rec in records:
            for p, gid in zip(rec["prompts"], rec["group_ids"]):
                prompt_of.setdefault(gid, set()).add(p)
                gid_of.setdefault(p, set()).add(gid)
        mixed = {gid: sorted(ps) for gid, ps in prompt_of.items() if len(ps) > 1}
        assert not mixed, f"generation batch {k}: group ids holding several prompts: {mixed}"
        shared = {p: sorted(ids) for p, ids in gid_of.items() if len(ids) > 1}
        assert not shared, f"generation batch {k}: prompts carrying several group ids: {shared}"
