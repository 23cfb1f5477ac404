"""ConSPOTrainer and presets: construction errors, TRL internals, presets, diagnostics, learning."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from tiny import build_tokenizer, odd_digit_parity  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from conspo import ConSPOConfig, ConSPOTrainer  # noqa: E402
from conspo.config import check_trl_internals  # noqa: E402
from conspo.presets import ALL_METHODS, PRESETS, preset_config, preset_reward_funcs  # noqa: E402

BASE = dict(use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True)


def _config(tmp_path, **kw):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                    max_completion_length=4, max_steps=2, logging_steps=1, **BASE)
    settings.update(kw)
    return ConSPOConfig(**settings)


def _dataset(n=64):
    return Dataset.from_dict({"prompt": [f"{i % 10}+{i // 10}=" for i in range(n)]})


def starts_odd(prompts, completions, **kwargs):
    return [float(c[:1] in ("1", "3", "5", "7", "9")) for c in completions]


# ------------------------------------------------------------------------------------- construction errors


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (dict(objective="ppo"), "objective='ppo' is not supported; accepted values: 'conspo', 'disco', 'gmpo', 'trl'"),
        (dict(tau=0.0), "tau must be a number in [0.001, 1000]"),
        (dict(tau=float("nan")), "tau must be a number in [0.001, 1000]"),
        (dict(margin_max=-0.1), "m_max must be a finite number >= 0"),
        (dict(margin_schedule="exp"), "margin_schedule='exp' is not supported"),
        (dict(margin_schedule="step"), "schedule='step' needs step_at"),
        (dict(margin_ramp_frac=0.0), "ramp_frac must be in (0, 1]"),
        (dict(neg_reduce="max"), "neg_reduce='max' is not supported"),
        (dict(group_norm="batch"), "group_norm='batch' is not supported"),
        (dict(disco_variant="kl"), "disco_variant='kl' is not supported"),
        (dict(truncated="keep"), "truncated='keep' is not supported"),
        (dict(trust_region_delta=0), "trust_region_delta must be a positive finite number"),
        (dict(use_liger_kernel=True), "use_liger_kernel=True"),
        (dict(num_generations=1, per_device_train_batch_size=8), "num_generations must be an integer in [2, inf)"),
        (dict(per_device_train_batch_size=6, gradient_accumulation_steps=2, group_batching="whole_groups"),
         "multiple of num_generations (4)"),
        (dict(per_device_train_batch_size=6, gradient_accumulation_steps=1), "divisible by num_generations"),
        (dict(gradient_accumulation_steps=2, steps_per_generation=3), "multiple of gradient_accumulation_steps"),
        (dict(group_batching="sometimes"), "group_batching='sometimes' is not supported"),
        (dict(dump_batch_step=0), "dump_batch_step must be None or an optimizer step >= 1"),
        (dict(dump_batch_step=1.5), "dump_batch_step must be None or an optimizer step >= 1"),
    ],
)
def test_bad_config_fails_at_construction(tmp_path, overrides, needle):
    with pytest.raises(ValueError) as err:
        _config(tmp_path, **overrides)
    assert needle in str(err.value)


def test_group_batching_auto_picks_the_exact_strategy(tmp_path):
    assert _config(tmp_path).group_batching == "whole_groups"
    # 6 rollouts per device with groups of 4 and 2 accumulation steps: groups straddle micro-batches
    assert _config(tmp_path, per_device_train_batch_size=6, gradient_accumulation_steps=2).group_batching == "credit"


def test_tau_default_is_the_papers_for_both_objectives(tmp_path):
    assert _config(tmp_path).tau == 10.0
    assert _config(tmp_path, objective="disco").tau == 10.0
    assert _config(tmp_path, objective="trl").tau is None  # not read by TRL's losses
    assert _config(tmp_path, objective="disco", tau=2.0).tau == 2.0


def test_trainer_needs_a_conspo_config(tmp_path, model_dir):
    from trl import GRPOConfig

    with pytest.raises(TypeError, match="ConSPOConfig"):
        ConSPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=starts_odd,
                      args=GRPOConfig(output_dir=str(tmp_path), **BASE), train_dataset=_dataset(),
                      processing_class=build_tokenizer())


def test_unknown_correctness_reward_is_named(tmp_path, model_dir):
    with pytest.raises(ValueError, match="correctness_reward='accuracy' is not one of the reward functions: starts_odd"):
        ConSPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=starts_odd,
                      args=_config(tmp_path, correctness_reward="accuracy"), train_dataset=_dataset(),
                      processing_class=build_tokenizer())


def test_trl_internals_match_the_supported_range():
    check_trl_internals()  # raises with the changed method named


def test_trl_internals_check_fails_loudly_on_a_changed_signature(monkeypatch):
    from trl import GRPOTrainer

    def changed(self, model, inputs, extra):  # a TRL release that adds a parameter
        return None

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", changed)
    with pytest.raises(RuntimeError, match=r"GRPOTrainer._compute_loss.*changed shape"):
        check_trl_internals()


def test_trl_version_outside_the_range_is_refused(monkeypatch):
    import trl

    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(RuntimeError, match=r"trl>=1.16,<1.17"):
        check_trl_internals()


# ------------------------------------------------------------------------------------- presets


def test_presets_follow_the_spec(tmp_path):
    assert set(ALL_METHODS) == set(PRESETS)
    out = str(tmp_path)
    grpo = preset_config("grpo", output_dir=out, **BASE)
    assert (grpo.objective, grpo.loss_type, grpo.epsilon, grpo.scale_rewards, grpo.beta) == ("trl", "grpo", 0.2, "group", 0.0)
    dr = preset_config("dr_grpo", output_dir=out, **BASE)
    assert (dr.loss_type, dr.scale_rewards) == ("dr_grpo", "none")
    dapo = preset_config("dapo", output_dir=out, **BASE)
    assert (dapo.loss_type, dapo.epsilon, dapo.epsilon_high, dapo.mask_truncated_completions) == ("dapo", 0.2, 0.28, True)
    gspo = preset_config("gspo", output_dir=out, **BASE)
    assert (gspo.importance_sampling_level, gspo.loss_type, gspo.epsilon, gspo.epsilon_high) == ("sequence", "grpo", 3e-4, 4e-4)
    assert preset_config("cispo", output_dir=out, **BASE).loss_type == "cispo"
    assert preset_config("conspo", output_dir=out, **BASE).objective == "conspo"
    assert preset_config("disco", output_dir=out, **BASE).objective == "disco"
    # overrides win over the preset
    assert preset_config("grpo", output_dir=out, epsilon=0.1, **BASE).epsilon == 0.1


def test_unknown_preset_lists_methods():
    with pytest.raises(ValueError, match="unknown method 'ppo'; accepted values: conspo, disco, grpo"):
        preset_config("ppo", output_dir="x")


def test_dapo_adds_soft_overlong_punishment(tmp_path):
    config = preset_config("dapo", output_dir=str(tmp_path), max_completion_length=8, **BASE)
    (punish,) = preset_reward_funcs("dapo", config)
    # budget 8, cache 2: lengths up to 6 are free, 7 costs 1/2, 8 costs 1
    assert punish(completion_ids=[[1] * 6, [1] * 7, [1] * 8]) == [0.0, -0.5, -1.0]
    assert preset_reward_funcs("grpo", config) == []


def test_dapo_overlong_window_starts_past_the_longest_complete_answer(tmp_path):
    config = preset_config("dapo", output_dir=str(tmp_path), max_completion_length=24, **BASE)
    # Without the task's bound: cache 6, so a 20-token complete answer would cost (18 - 20) / 6 = -1/3.
    (default,) = preset_reward_funcs("dapo", config)
    assert default(completion_ids=[[1] * 18, [1] * 20]) == pytest.approx([0.0, -1 / 3])
    # The task says complete answers take at most 21 tokens: the window is 21..24, cache 3.
    (bounded,) = preset_reward_funcs("dapo", config, overlong_after=21)
    assert bounded(completion_ids=[[1] * 20, [1] * 21, [1] * 22, [1] * 24, [1] * 25]) == pytest.approx(
        [0.0, 0.0, -1 / 3, -1.0, -1.0])
    # A bound at or past the budget leaves no window past it: the default window again.
    (fallback,) = preset_reward_funcs("dapo", config, overlong_after=24)
    assert fallback(completion_ids=[[1] * 20]) == pytest.approx([-1 / 3])
    for bad in (0, -3, 2.5, True, "21"):
        with pytest.raises(ValueError, match="overlong_after must be a positive number of tokens"):
            preset_reward_funcs("dapo", config, overlong_after=bad)


def test_preset_functions_are_exported_at_the_top_level():
    import conspo

    assert conspo.preset_reward_funcs is preset_reward_funcs and conspo.preset_config is preset_config
    assert "preset_reward_funcs" in conspo.__all__


def test_worked_arithmetic_answers_are_never_punished_for_length(tmp_path):
    from conspo.tasks.arithmetic import ArithmeticSpec, make_task

    task = make_task(difficulty=ArithmeticSpec(3, 2, "+-"), n_train=2000, n_test=200, worked=True)
    config = preset_config("dapo", output_dir=str(tmp_path), max_completion_length=task.max_completion_length, **BASE)
    (punish,) = preset_reward_funcs("dapo", config, overlong_after=task.overlong_after)
    lengths = [len(p["solution"]) + 1 for p in task.train + task.test]  # characters + end-of-sequence
    assert max(lengths) == task.overlong_after
    assert set(punish(completion_ids=[[1] * n for n in lengths])) == {0.0}
    assert punish(completion_ids=[[1] * task.max_completion_length]) == [-1.0]


# ------------------------------------------------------------------------------------- diagnostics and learning


@pytest.mark.parametrize("method", ["grpo", "gspo", "disco"])
def test_every_method_logs_the_shared_diagnostics(tmp_path, model_dir, method):
    config = preset_config(method, output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4,
                           max_completion_length=4, max_steps=2, logging_steps=1, **BASE)
    trainer = ConSPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=odd_digit_parity,
                            args=config, train_dataset=_dataset(), processing_class=build_tokenizer())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "conspo/auc" in h]
    assert len(logged) == 2
    for h in logged:
        assert 0.0 <= h["conspo/auc"] <= 1.0
        assert 0.0 <= h["conspo/valid_frac"] <= 1.0
        assert h["conspo/reward_mean"] == pytest.approx(h["reward"], abs=1e-6)


def test_truncated_completions_can_be_dropped(tmp_path, model_dir):
    """With every completion truncated (budget of 1 token, no EOS), 'drop' leaves nothing to train on."""
    trainer = ConSPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=odd_digit_parity,
                            args=_config(tmp_path, truncated="drop", max_completion_length=1, max_steps=1),
                            train_dataset=_dataset(), processing_class=build_tokenizer())
    trainer.train()
    (logged,) = [h for h in trainer.state.log_history if "conspo/valid_frac" in h]
    assert logged["conspo/valid_frac"] == 0.0
    assert logged["loss"] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["conspo", "disco"])
def test_short_run_raises_the_reward(tmp_path, model_dir, objective):
    config = _config(tmp_path, objective=objective, per_device_train_batch_size=32, num_generations=8,
                     max_steps=15, learning_rate=3e-2, seed=0)
    trainer = ConSPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=starts_odd,
                            args=config, train_dataset=_dataset(), processing_class=build_tokenizer())
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-5:]) / 5
    assert last > first + 0.2, rewards
