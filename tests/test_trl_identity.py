"""objective="trl" is TRL's own trainer: every TRL-backed preset trains bit-identically to plain GRPOTrainer (issue 13).

Same seed, data, tiny model and reward functions; ``ConSPOTrainer(args=preset_config(name, ...))`` against
``trl.GRPOTrainer(args=GRPOConfig(...))`` built from the same fields less those only ConSPOConfig has. After a few
optimizer steps on CPU every parameter must be equal (``torch.equal``) and every logged number the same. The
presets are read from ``conspo.presets.PRESETS``, so a new TRL-backed preset is checked without editing this file.

A preset may add to TRL's method a setting only conspo has (``ADDITIONS``: e.g. dynamic sampling), which GRPOTrainer
cannot do; such settings are set back to their defaults for this comparison, which then checks the TRL part of the
preset, and the test names them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from tiny import build_tokenizer, odd_digit_parity  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from conspo import ConSPOConfig, ConSPOTrainer  # noqa: E402
from conspo.presets import PRESETS, preset_config, preset_reward_funcs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: the tiny models run faster so

TRL_PRESETS = [name for name, settings in PRESETS.items() if settings.get("objective") == "trl"]
GRPO_FIELDS = {f.name for f in dataclasses.fields(GRPOConfig)}
CONSPO_ONLY = {f.name for f in dataclasses.fields(ConSPOConfig)} - GRPO_FIELDS
CONSPO_DEFAULTS = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                   for f in dataclasses.fields(ConSPOConfig) if f.name in CONSPO_ONLY}
# Settings of each TRL-backed preset that only ConSPOConfig has, besides objective itself.
ADDITIONS = {name: {k: v for k, v in PRESETS[name].items() if k in CONSPO_ONLY and k != "objective"}
             for name in TRL_PRESETS}
STEPS = 3
TIMING = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}
# Two micro-batches per optimizer step and two optimizer steps per generation batch: TRL's old log-probabilities,
# ratios and clipping are in play, and the third step starts a second generation batch.
COMMON = dict(use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True,
              per_device_train_batch_size=8, num_generations=4, gradient_accumulation_steps=2,
              steps_per_generation=4, max_completion_length=6, max_steps=STEPS, logging_steps=1,
              learning_rate=5e-2, seed=0)


def _dataset():
    return Dataset.from_dict({"prompt": [f"{i % 10}+{i // 10}=" for i in range(64)]})


def _train(trainer_cls, config, model_dir, rewards):
    trainer = trainer_cls(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=rewards, args=config,
                          train_dataset=_dataset(), processing_class=build_tokenizer())
    trainer.train()
    history = [{k: v for k, v in h.items() if k not in TIMING} for h in trainer.state.log_history]
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return trainer, history, params


def test_the_trl_backed_presets_are_found():
    assert TRL_PRESETS, "no preset with objective='trl'"
    assert "conspo" not in TRL_PRESETS and "disco" not in TRL_PRESETS


@pytest.mark.parametrize("name", TRL_PRESETS)
def test_trl_objective_trains_exactly_like_grpo_trainer(name, model_dir, tmp_path):
    reset = {k: CONSPO_DEFAULTS[k] for k in ADDITIONS[name]}  # conspo's additions to the method: off
    label = f"preset {name}" + (f" (with {', '.join(map(str, ADDITIONS[name].items()))} reset)" if reset else "")
    ours = preset_config(name, output_dir=str(tmp_path / "conspo"), **COMMON, **reset)
    fields = {**PRESETS[name], **COMMON, "output_dir": str(tmp_path / "trl")}
    dropped = set(fields) - GRPO_FIELDS
    assert dropped <= CONSPO_ONLY, f"{label} sets fields neither config has: {dropped - CONSPO_ONLY}"
    theirs = GRPOConfig(**{k: v for k, v in fields.items() if k in GRPO_FIELDS})
    # every field TRL reads has the same value in both configs
    differ = {f: (getattr(ours, f), getattr(theirs, f)) for f in GRPO_FIELDS - {"output_dir", "logging_dir"}
              if getattr(ours, f) != getattr(theirs, f)}
    assert not differ, f"{label}: ConSPOConfig and GRPOConfig disagree on {differ}"

    rewards = [odd_digit_parity, *preset_reward_funcs(name, ours)]
    _, want_log, want = _train(GRPOTrainer, theirs, model_dir, rewards)
    trainer, got_log, got = _train(ConSPOTrainer, ours, model_dir, rewards)
    assert trainer.args.objective == "trl"
    want_loss = [h["loss"] for h in want_log if "loss" in h]
    got_loss = [h["loss"] for h in got_log if "loss" in h]

    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert any(not torch.equal(want[n], initial[n]) for n in want), f"{label}: GRPOTrainer did not train"
    assert len(want_loss) == len(got_loss) == STEPS
    assert got_loss == want_loss, f"{label}: logged losses differ: conspo {got_loss}, trl {want_loss}"
    # every other number TRL logs is the same too; ConSPOTrainer only adds its conspo/* diagnostics
    assert len(got_log) == len(want_log)
    for step, (g, w) in enumerate(zip(got_log, want_log)):
        assert {k for k in g if not k.startswith("conspo/")} == set(w), f"{label}, record {step}: other keys"
        differ = {k: (g[k], v) for k, v in w.items() if g[k] != v}
        assert not differ, f"{label}, record {step}: logged values differ (conspo, trl): {differ}"
    assert set(got) == set(want)
    unequal = {n: float((got[n] - want[n]).abs().max()) for n in want if not torch.equal(got[n], want[n])}
    assert not unequal, f"{label}: parameters differ after {STEPS} steps (max abs difference): {unequal}"
