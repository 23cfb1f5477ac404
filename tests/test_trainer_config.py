"""ConSPOConfig and the trainer's fidelity to the paper (issues 13 and 15): defaults, refused settings, one margin
per generation batch, tau='auto' (and its resume), zero-token rows, the new presets."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from tiny import build_tokenizer, odd_digit_parity  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from conspo import ConSPOConfig, ConSPOTrainer  # noqa: E402
from conspo import objectives as obj  # noqa: E402
from conspo.config import ADVANTAGE_FIELDS, TRL_LOSS_FIELDS  # noqa: E402
from conspo.presets import ABLATIONS, PRESETS, preset_config  # noqa: E402

BASE = dict(use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True)


def _config(tmp_path, **kw):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                    max_completion_length=4, max_steps=2, logging_steps=1, **BASE)
    settings.update(kw)
    return ConSPOConfig(**settings)


def _dataset(n=64):
    return Dataset.from_dict({"prompt": [f"{i % 10}+{i // 10}=" for i in range(n)]})


def _trainer(model_dir, config, reward=odd_digit_parity):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return ConSPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=_dataset(),
                         processing_class=build_tokenizer())


# ------------------------------------------------------------------------------------- paper defaults


def test_defaults_are_the_papers(tmp_path):
    c = _config(tmp_path)
    assert (c.objective, c.tau, c.score) == ("conspo", 10.0, "logprob")
    assert (c.margin_schedule, c.margin_start, c.margin_max, c.margin_ramp_frac) == ("cosine", 0.0, 0.01, 0.3)
    assert (c.neg_reduce, c.group_norm, c.trust_region) == ("sum", "valid", False)
    disco = _config(tmp_path, objective="disco")
    assert (disco.tau, disco.trust_region) == (10.0, True)


@pytest.mark.parametrize(("progress", "want"), [(0.0, 0.0), (0.15, 0.005), (0.3, 0.01), (1.0, 0.01)])
def test_default_margin_curriculum(tmp_path, progress, want):
    c = _config(tmp_path)
    assert c.margin(round(progress * 1000), 1000) == pytest.approx(want, abs=1e-12)


# ------------------------------------------------------------------------------------- refused settings


def test_trl_loss_fields_are_refused_under_own_objectives(tmp_path):
    changed = dict(loss_type="grpo", epsilon=0.3, epsilon_high=0.28, delta=2.0, importance_sampling_level="sequence",
                   top_entropy_quantile=0.5, off_policy_mask_threshold=0.5, sapo_temperature_pos=2.0,
                   entropy_coef=0.01, use_bias_correction_kl=False)
    assert set(changed) <= set(TRL_LOSS_FIELDS)
    for objective in ("conspo", "disco", "gmpo"):
        for name, value in changed.items():
            with pytest.raises(ValueError, match=rf"objective='{objective}' would ignore these settings.*{name}="):
                _config(tmp_path, objective=objective, **{name: value})
    for name, value in dict(scale_rewards="none", multi_objective_aggregation="normalize_then_sum").items():
        assert name in ADVANTAGE_FIELDS
        for objective in ("conspo", "disco"):
            with pytest.raises(ValueError, match=rf"{name}="):
                _config(tmp_path, objective=objective, **{name: value})
        assert getattr(_config(tmp_path, objective="gmpo", **{name: value}), name) == value  # GMPO reads advantages


@pytest.mark.parametrize(("objective", "field", "value"), [
    ("trl", "tau", 0.3), ("trl", "margin_max", 0.1), ("trl", "trust_region", True), ("trl", "neg_reduce", "mean"),
    ("disco", "margin_schedule", "linear"), ("disco", "neg_reduce", "mean"), ("disco", "score", "clipped_ratio"),
    ("conspo", "disco_variant", "basic"), ("conspo", "gmpo_epsilon_low", 0.2), ("gmpo", "tau", 1.0),
    ("disco", "tau_auto_factor", 2.0),
])
def test_own_fields_without_effect_are_refused(tmp_path, objective, field, value):
    with pytest.raises(ValueError, match=rf"objective='{objective}' would ignore.*{field}={value!r}"):
        _config(tmp_path, objective=objective, **{field: value})


def test_clipped_ratio_score_reads_epsilon(tmp_path):
    c = _config(tmp_path, score="clipped_ratio", epsilon=0.1)
    assert c.epsilon == 0.1
    with pytest.raises(ValueError, match=r"epsilon must be in \(0, 1\)"):
        _config(tmp_path, score="clipped_ratio", epsilon=1.5)


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("beta", -1.0, r"beta must be a finite number in \[0, inf\)"),
    ("learning_rate", -1e-4, r"learning_rate must be a finite number in \[0, inf\)"),
    ("max_completion_length", -5, r"max_completion_length must be an integer in \[1, inf\)"),
    ("temperature", -1.0, r"temperature must be a finite number in \(0, inf\)"),
    ("temperature", float("nan"), r"temperature must be a finite number"),
    ("top_p", 1.5, r"top_p must be a finite number in \(0, 1\]"),
    ("num_iterations", 0, r"num_iterations must be an integer in \[1, inf\)"),
])
def test_trl_numbers_are_validated(tmp_path, field, value, needle):
    for objective in ("conspo", "trl"):
        with pytest.raises(ValueError, match=needle):
            _config(tmp_path, objective=objective, **{field: value})


@pytest.mark.parametrize("tau", [obj.TAU_MIN, obj.TAU_MAX])
def test_tau_at_both_ends_of_the_range_is_accepted_and_finite(tmp_path, tau):
    assert _config(tmp_path, tau=tau).tau == tau
    s = torch.tensor([-0.3, -0.25, -40.0, -0.2, -0.01, -35.0], dtype=torch.float64, requires_grad=True)
    correct = torch.tensor([1, 0, 0, 1, 1, 0], dtype=torch.bool)
    ids = torch.tensor([0, 0, 0, 0, 1, 1])
    out = obj.conspo_loss(s, correct, ids, tau=tau, margin=0.01)
    (grad,) = torch.autograd.grad(out.loss, s)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(-grad, out.credit)


@pytest.mark.parametrize("tau", [1e-40, obj.TAU_MIN * 0.999, obj.TAU_MAX * 1.001, 1e300, float("inf")])
def test_tau_outside_the_range_is_refused(tmp_path, tau):
    with pytest.raises(ValueError, match=r"tau must be a number in \[0.001, 1000\]"):
        _config(tmp_path, tau=tau)
    with pytest.raises(ValueError, match=r"tau must be a number in \[0.001, 1000\]"):
        obj.conspo_loss(torch.zeros(2), torch.tensor([True, False]), torch.zeros(2, dtype=torch.long), tau=tau)


def test_nan_normaliser_and_nan_old_logps_are_refused():
    s = torch.tensor([-0.3, -0.2])
    c = torch.tensor([True, False])
    ids = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="normalizer must be a finite count"):
        obj.conspo_loss(s, c, ids, normalizer=torch.tensor(float("nan")))
    logps = torch.full((2, 3), -1.0)
    old = logps.clone()
    old[0, 1] = float("nan")
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="old_logps must be finite on masked tokens"):
        obj.kl_trust_region(logps, old, mask)
    mask[0, 1] = 0  # a NaN on a padded position is ignored
    assert torch.isfinite(obj.kl_trust_region(logps, old, mask).penalty)


def test_several_steps_per_generation_need_whole_groups_per_step(tmp_path):
    # The reproduction: 6 rows per step, groups of 4, two optimizer steps per generation batch.
    with pytest.raises(ValueError, match=r"per_device_train_batch_size x gradient_accumulation_steps = 6, must be a "
                                         r"multiple of num_generations \(4\)"):
        _config(tmp_path, per_device_train_batch_size=6, gradient_accumulation_steps=1, steps_per_generation=2)
    # one optimizer step per generation batch: credit mode handles groups straddling micro-batches
    assert _config(tmp_path, per_device_train_batch_size=6, gradient_accumulation_steps=2).group_batching == "credit"


def test_preset_defining_fields_cannot_change(tmp_path):
    with pytest.raises(ValueError, match=r"method 'grpo' is defined by objective='trl', loss_type='grpo'.*"
                                         r"objective='conspo'"):
        preset_config("grpo", output_dir=str(tmp_path), objective="conspo", **BASE)
    with pytest.raises(ValueError, match=r"loss_type='dapo' \(the preset has 'cispo'\)"):
        preset_config("cispo", output_dir=str(tmp_path), loss_type="dapo", **BASE)


def test_new_presets(tmp_path):
    out = str(tmp_path)
    assert preset_config("sapo", output_dir=out, **BASE).loss_type == "sapo"
    gmpo = preset_config("gmpo", output_dir=out, **BASE)
    assert (gmpo.objective, gmpo.gmpo_epsilon_low, gmpo.gmpo_epsilon_high) == ("gmpo", 0.4, 0.4)
    linear = preset_config("conspo_linear_gap", output_dir=out, **BASE)
    assert (linear.objective, linear.disco_variant, linear.trust_region) == ("disco", "basic", False)
    assert preset_config("conspo_clipped_ratio", output_dir=out, **BASE).score == "clipped_ratio"
    assert preset_config("conspo_no_margin", output_dir=out, **BASE).margin(999, 1000) == 0.0
    fixed = preset_config("conspo_fixed_margin", output_dir=out, **BASE)
    assert fixed.margin(0, 1000) == fixed.margin(999, 1000) == 0.01
    assert set(ABLATIONS) <= set(PRESETS)


# ------------------------------------------------------------------------------------- one margin per batch


def test_margin_is_read_once_per_generation_batch(model_dir, tmp_path):
    # 2 optimizer steps per generation batch, 4 steps: margins m(0) m(0) m(2) m(2) of a linear ramp over all steps.
    config = _config(tmp_path, gradient_accumulation_steps=2, steps_per_generation=4, max_steps=4,
                     margin_schedule="linear", margin_max=0.4, margin_ramp_frac=1.0)
    trainer = _trainer(model_dir, config)
    trainer.train()
    margins = [h["conspo/margin"] for h in trainer.state.log_history if "conspo/margin" in h]
    assert margins == pytest.approx([0.0, 0.0, 0.2, 0.2])


# ------------------------------------------------------------------------------------- tau = "auto"


def test_auto_tau_from_a_batch_with_known_spread(model_dir, tmp_path):
    trainer = _trainer(model_dir, _config(tmp_path, tau="auto", tau_auto_factor=2.0))
    # group 0: scores -1, -3 (sd 1); group 1: -2, -2, -2, -6 (sd sqrt(3)); median of (1, sqrt 3) = (1 + 1.732) / 2
    rows = {"scores": torch.tensor([-1.0, -3.0, -2.0, -2.0, -2.0, -6.0]),
            "correct": torch.tensor([True, False, True, False, False, False]),
            "group_ids": torch.tensor([0, 0, 1, 1, 1, 1]), "keep": torch.ones(6, dtype=torch.bool)}
    trainer._resolve_auto_tau(rows)
    assert trainer._tau() == pytest.approx(2.0 * (1.0 + math.sqrt(3.0)) / 2)


def test_auto_tau_waits_for_a_mixed_group(model_dir, tmp_path):
    trainer = _trainer(model_dir, _config(tmp_path, tau="auto"))
    rows = {"scores": torch.tensor([-1.0, -3.0]), "correct": torch.tensor([True, True]),
            "group_ids": torch.tensor([0, 0]), "keep": torch.ones(2, dtype=torch.bool)}
    trainer._resolve_auto_tau(rows)
    assert trainer._auto_tau.tau is None  # all correct: no contrast, nothing to calibrate yet


def test_auto_tau_is_refused_for_other_objectives(tmp_path):
    with pytest.raises(ValueError, match="tau='auto'"):
        _config(tmp_path, objective="disco", tau="auto")
    with pytest.raises(ValueError, match="objective='gmpo' would ignore these settings, so they are refused: tau='auto'"):
        _config(tmp_path, objective="gmpo", tau="auto")


def test_auto_tau_is_logged_kept_and_survives_a_resume(model_dir, tmp_path):
    settings = dict(tau="auto", max_steps=3, save_strategy="steps", save_steps=1, seed=3)
    first = _trainer(model_dir, _config(tmp_path, **settings))
    first.train()
    logged = [h["conspo/tau"] for h in first.state.log_history if "conspo/tau" in h]
    sd = [h["conspo/score_sd"] for h in first.state.log_history if "conspo/score_sd" in h]
    assert len(logged) == 3 and logged[0] == pytest.approx(sd[0], rel=1e-5)  # the first step's spread
    assert logged == [logged[0]] * 3  # fixed for the run
    stored = json.loads((tmp_path / "out" / "checkpoint-1" / "trainer_state.json").read_text())
    assert stored["stateful_callbacks"]["_AutoTau"]["attributes"]["tau"] == pytest.approx(logged[0])
    # A resumed run starts from checkpoint-1 and must go on with the same tau, not measure step 2's spread.
    resumed = _trainer(model_dir, _config(tmp_path, **settings))
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    after = [h["conspo/tau"] for h in resumed.state.log_history if "conspo/tau" in h]
    assert after[-2:] == pytest.approx([logged[0]] * 2)


# ------------------------------------------------------------------------------------- zero-token rows


class _Recorder(ConSPOTrainer):
    """Keeps each generation batch as the trainer handed it to the loss."""

    seen: list

    def _compute_loss(self, model, inputs):
        self.seen.append({k: v.detach().clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)})
        return super()._compute_loss(model, inputs)


@pytest.mark.parametrize("method", ["conspo", "disco", "dapo"])
def test_rows_without_loss_tokens_leave_their_group(model_dir, tmp_path, method):
    """With mask_truncated_completions, truncated rows keep no token: they are neither positives nor negatives for the
    loss or any diagnostic. Expected values come from the completions (which ended without EOS) and the rewards."""
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_generations=4,
                    max_completion_length=3, max_steps=1, logging_steps=1, mask_truncated_completions=True,
                    dump_batch_step=1, learning_rate=0.0, generation_kwargs={"suppress_tokens": [0]}, **BASE)
    # (the pad token is never sampled, so a completion has finished exactly when it holds EOS)
    if method == "dapo":
        config = preset_config("dapo", **settings)
    else:
        config = ConSPOConfig(objective=method, **settings)
    tok = build_tokenizer()
    trainer = _Recorder(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=odd_digit_parity,
                        args=config, train_dataset=_dataset(), processing_class=tok)
    trainer.seen = []
    trainer.train()
    (batch,) = trainer.seen
    ended = (batch["completion_ids"] == tok.eos_token_id).any(1)
    assert (~ended).any() and ended.sum() >= 2, "the set-up must produce truncated and finished rows"
    assert torch.equal(batch["conspo_keep"], ended)  # exactly the finished rows are kept

    # Independent reference: scores of the finished rows only, from a fresh forward pass; groups from prompt text.
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    att = torch.cat([batch["prompt_mask"], (batch["completion_ids"] != tok.pad_token_id).long()], 1)
    t = batch["completion_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits[:, -t - 1 : -1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    texts = tok.batch_decode(batch["completion_ids"], skip_special_tokens=True)
    prompts = tok.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
    correct = torch.tensor([r >= 0.5 for r in odd_digit_parity(prompts, texts)])
    group = torch.tensor([sorted(set(prompts)).index(p) for p in prompts])
    mask = (batch["completion_ids"] != tok.pad_token_id) & ended.unsqueeze(1)
    scores = obj.sequence_scores(logps, mask)[ended]
    want = obj.separation_metrics(scores, correct[ended], group[ended])
    dumped = json.loads((tmp_path / "out" / "batch-step1.json").read_text())
    assert len(dumped["scores"]) == int(ended.sum())  # no row without tokens in the diagnostics
    assert 0.0 not in dumped["scores"]
    logged = trainer.state.log_history[0]
    for name in ("score_sd", "auc", "score_gap", "valid_frac"):
        assert logged[f"conspo/{name}"] == pytest.approx(float(want[name]), rel=1e-4, abs=1e-6), name
    if method == "conspo":
        value = obj.conspo_loss(scores, correct[ended], group[ended], tau=10.0, margin=0.0).loss
        assert logged["loss"] == pytest.approx(float(value), rel=1e-4, abs=1e-6)


# ------------------------------------------------------------------------------------- new objectives train


@pytest.mark.parametrize("method", ["gmpo", "sapo", "conspo_clipped_ratio", "conspo_linear_gap"])
def test_new_methods_train(model_dir, tmp_path, method):
    config = preset_config(method, output_dir=str(tmp_path / "out"), per_device_train_batch_size=8,
                           num_generations=4, max_completion_length=4, max_steps=2, logging_steps=1,
                           gradient_accumulation_steps=2, steps_per_generation=4, **BASE)
    trainer = _trainer(model_dir, config)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert all("conspo/auc" in h for h in logs)
    moved = any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert moved
