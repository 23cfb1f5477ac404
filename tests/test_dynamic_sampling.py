"""Dynamic sampling and drop_degenerate_groups (issue 16): what reaches the loss is judged from the prompts,
completions and rewards themselves, never from the trainer's flags or group ids."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from tiny import build_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from conspo import ConSPOConfig, ConSPOTrainer  # noqa: E402
from conspo.presets import preset_config  # noqa: E402

BASE = dict(use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1,
            generation_kwargs={"suppress_tokens": [0]})  # the pad token is never sampled


def rare_seven(prompts, completions, **kwargs):
    """1 when the completion starts with '7' or '9': about 1 rollout in 9, so most groups of 4 are all wrong."""
    return [float(c[:1] in ("7", "9")) for c in completions]


def _dataset(n=64):
    return Dataset.from_dict({"prompt": [f"{i}*{i % 7}=" for i in range(n)]})


class _Seen(ConSPOTrainer):
    """Records every micro-batch the loss sees (decoded), and every generation round."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen: list[dict] = []
        self.generated_rounds = 0

    def _generate_and_score_completions(self, inputs):
        self.generated_rounds += 1
        return super()._generate_and_score_completions(inputs)

    def _compute_loss(self, model, inputs):
        tok = self.processing_class
        self.seen.append({
            "step": self.state.global_step,
            "prompts": tok.batch_decode(inputs["prompt_ids"], skip_special_tokens=True),
            "completions": tok.batch_decode(inputs["completion_ids"], skip_special_tokens=True),
            "inputs": {k: v.detach().clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)},
        })
        return super()._compute_loss(model, inputs)


def _groups_by_prompt(seen):
    groups = defaultdict(list)
    for micro in seen:
        for p, c in zip(micro["prompts"], micro["completions"]):
            groups[(micro["step"], p)].append(rare_seven([p], [c])[0])
    return groups


@pytest.mark.parametrize("method", ["conspo", "dapo", "gmpo"])
def test_every_group_reaching_the_loss_is_mixed(model_dir, tmp_path, method):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_generations=4,
                    max_completion_length=3, max_steps=3, **BASE)
    if method == "dapo":  # the preset turns dynamic sampling on
        # truncation is common here; without masking, mixing is judged on rewards alone
        config = preset_config("dapo", dynamic_sampling_max_rounds=3, mask_truncated_completions=False, **settings)
    else:
        config = preset_config(method, dynamic_sampling=True, dynamic_sampling_max_rounds=3, **settings)
    assert config.dynamic_sampling
    trainer = _Seen(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=rare_seven, args=config,
                    train_dataset=_dataset(), processing_class=build_tokenizer())
    trainer.train()
    groups = _groups_by_prompt(trainer.seen)
    assert groups, "nothing reached the loss"
    logs = [h for h in trainer.state.log_history if "conspo/dynamic_rounds" in h]
    assert all(h["conspo/groups_kept"] > 0 for h in logs), "a step found no mixed group at all: re-seed the test"
    for (step, prompt), rewards in groups.items():
        assert len(rewards) == 4, f"step {step}, {prompt!r}: {len(rewards)} rollouts reached the loss, not 4"
        assert 0 < sum(rewards) < 4, f"step {step}, {prompt!r}: a degenerate group reached the loss {rewards}"
    logs = [h for h in trainer.state.log_history if "conspo/dynamic_rounds" in h]
    assert len(logs) == 3
    assert all(0 <= h["conspo/dynamic_rounds"] <= 3 for h in logs)
    # one initial round per step plus the extra rounds, no more
    assert trainer.generated_rounds == 3 + sum(int(h["conspo/dynamic_rounds"]) for h in logs)
    assert any(h["conspo/dynamic_rounds"] >= 1 for h in logs), "the task was meant to need extra rounds"
    for h in logs:
        assert h["conspo/rollouts_generated"] == 16 * (1 + h["conspo/dynamic_rounds"])
        assert h["conspo/kept_frac"] == pytest.approx(h["conspo/groups_kept"] / h["conspo/groups_generated"])
        kept_rows = sum(len(r) for (s, _), r in groups.items() if s == logs.index(h))
        assert h["conspo/groups_kept"] * 4 == kept_rows


def test_degenerate_groups_dropped_from_trls_loss(model_dir, tmp_path):
    """GRPO with drop_degenerate_groups: the logged loss equals TRL's own loss computed by a plain GRPOTrainer on
    the generated batch with its degenerate groups (judged from the rewards) removed."""
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_generations=4,
                    max_completion_length=3, max_steps=1, learning_rate=0.0, **BASE)
    config = preset_config("grpo", drop_degenerate_groups=True, **settings)

    class Generated(_Seen):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            self.full = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
            return out

    tok = build_tokenizer()
    trainer = Generated(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=rare_seven, args=config,
                        train_dataset=_dataset(), processing_class=tok)
    trainer.train()
    full = trainer.full
    texts = tok.batch_decode(full["completion_ids"], skip_special_tokens=True)
    prompts = tok.batch_decode(full["prompt_ids"], skip_special_tokens=True)
    rewards = torch.tensor(rare_seven(prompts, texts)).view(-1, 4)
    mixed = ((rewards > 0).any(1) & (rewards == 0).any(1)).repeat_interleave(4)
    assert 0 < int(mixed.sum()) < 16, "the set-up must hold mixed and degenerate groups"
    (micro,) = trainer.seen
    assert len(micro["completions"]) == int(mixed.sum())
    assert sorted(micro["completions"]) == sorted(t for t, m in zip(texts, mixed.tolist()) if m)

    plain = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=rare_seven,
                        args=GRPOConfig(loss_type="grpo", epsilon=0.2, scale_rewards="group", **settings),
                        train_dataset=_dataset(), processing_class=tok)
    reduced = {k: (v[mixed] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == 16 else v)
               for k, v in full.items() if not k.startswith("conspo_")}
    plain.model.train()
    plain.current_gradient_accumulation_steps = 1  # set by the training loop; one micro-batch here
    want = plain._compute_loss(plain.model, reduced)
    logged = trainer.state.log_history[0]["loss"]
    assert logged == pytest.approx(float(want), rel=1e-5, abs=1e-7)


def test_drop_degenerate_groups_for_own_objectives_leaves_counts(model_dir, tmp_path):
    """ConSPO with group_norm='all' and drop_degenerate_groups: exactly the rows of the mixed groups (judged from the
    decoded completions' rewards) stay in the loss's rows, so the degenerate ones leave the 'all' normaliser too."""
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_generations=4,
                    max_completion_length=3, max_steps=1, learning_rate=0.0, group_norm="all", **BASE)
    trainer = _Seen(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=rare_seven,
                    args=ConSPOConfig(drop_degenerate_groups=True, **settings), train_dataset=_dataset(),
                    processing_class=build_tokenizer())
    trainer.train()
    (micro,) = trainer.seen
    groups = _groups_by_prompt(trainer.seen)
    mixed = {p for (_, p), r in groups.items() if 0 < sum(r) < 4}
    keep = micro["inputs"]["conspo_keep"]
    assert sorted(set(p for p, k in zip(micro["prompts"], keep.tolist()) if k)) == sorted(mixed)


def test_settings_without_effect_are_refused(tmp_path):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="dynamic_sampling_max_rounds has no effect without dynamic_sampling"):
        ConSPOConfig(dynamic_sampling_max_rounds=2, **base)
    with pytest.raises(ValueError, match="drop_degenerate_groups=True has no effect with dynamic_sampling=True"):
        ConSPOConfig(dynamic_sampling=True, drop_degenerate_groups=True, **base)
    assert preset_config("dapo", **base).dynamic_sampling
    assert not preset_config("grpo", **base).dynamic_sampling
