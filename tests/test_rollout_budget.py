"""max_rollouts: training stops at the end of the optimizer step whose generation reaches the budget, counting
dynamic sampling's extra rounds. The count is taken from what the reward function was asked to score (every
generated completion), never from the trainer's own counters; a resumed run stops where an uninterrupted one does."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from tiny import build_tokenizer, save_tiny  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402

from conspo import ConSPOConfig, ConSPOTrainer  # noqa: E402
from conspo.presets import preset_config  # noqa: E402

BASE = dict(use_cpu=True, bf16=False, report_to="none", disable_tqdm=True, logging_steps=1,
            per_device_train_batch_size=16, num_generations=4, max_completion_length=3, lr_scheduler_type="constant",
            generation_kwargs={"suppress_tokens": [0]})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


class Scored:
    """A reward (1 for completions starting with 7 or 9: most groups of 4 are all wrong, so dynamic sampling
    generates extra rounds) that records how many completions it scored before each optimizer step ended."""

    __name__ = "rare_seven"

    def __init__(self):
        self.scored = 0
        self.at_step_end: list[int] = []

    def __call__(self, prompts, completions, **kwargs):
        self.scored += len(completions)
        return [float(c[:1] in ("7", "9")) for c in completions]


class _StepEnd(TrainerCallback):
    def __init__(self, reward: Scored):
        self.reward = reward

    def on_step_end(self, args, state, control, **kwargs):
        self.reward.at_step_end.append(self.reward.scored)


def _train(model_dir, tmp_path, budget, *, dynamic, max_steps=12, resume=False, save_steps=None):
    reward = Scored()
    method = "dapo" if dynamic else "conspo"
    extra = dict(mask_truncated_completions=False) if dynamic else {}
    config = preset_config(method, output_dir=str(tmp_path / "out"), max_steps=max_steps, max_rollouts=budget,
                           save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                           **extra, **BASE)
    trainer = ConSPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=reward, args=config,
                            train_dataset=Dataset.from_dict({"prompt": [f"{i}*{i % 7}=" for i in range(64)]}),
                            processing_class=build_tokenizer(), callbacks=[_StepEnd(reward)])
    trainer.train(resume_from_checkpoint=resume or None)
    return trainer, reward


def _expected_steps(at_step_end, budget):
    """1-based index of the first step at whose end the scored count reached the budget."""
    return next(i + 1 for i, n in enumerate(at_step_end) if n >= budget)


@pytest.mark.parametrize("dynamic", [False, True])
def test_training_stops_at_the_step_that_reaches_the_budget(model_dir, tmp_path, dynamic):
    budget = 40 if not dynamic else 100
    trainer, reward = _train(model_dir, tmp_path, budget, dynamic=dynamic)
    steps = trainer.state.global_step
    assert steps == _expected_steps(reward.at_step_end, budget) == len(reward.at_step_end)
    assert reward.at_step_end[-1] >= budget and (steps == 1 or reward.at_step_end[-2] < budget)
    if dynamic:  # extra rounds were paid for: fewer steps than plain generation would take for the same budget
        assert reward.scored > 16 * steps
    else:
        assert steps == -(-budget // 16)


def test_budget_larger_than_max_steps_changes_nothing(model_dir, tmp_path):
    trainer, reward = _train(model_dir, tmp_path, 10**9, dynamic=False, max_steps=3)
    assert trainer.state.global_step == 3 and reward.scored == 48


def test_a_resumed_run_counts_on_from_its_checkpoint(model_dir, tmp_path):
    budget = 300
    whole, whole_reward = _train(model_dir, tmp_path / "whole", budget, dynamic=True)
    # the same run (constant learning rate, so max_steps changes nothing else) stopped after 2 steps with a
    # checkpoint, then resumed with the full max_steps
    _train(model_dir, tmp_path / "cut", budget, dynamic=True, max_steps=2, save_steps=2)
    resumed, _ = _train(model_dir, tmp_path / "cut", budget, dynamic=True, resume=True)
    assert whole.state.global_step > 2
    assert resumed.state.global_step == whole.state.global_step


def test_bad_budget_is_refused():
    for bad in (0, -5, 2.5, True, "10"):
        with pytest.raises(ValueError, match="max_rollouts"):
            ConSPOConfig(output_dir="unused", max_rollouts=bad, use_cpu=True, report_to="none")
