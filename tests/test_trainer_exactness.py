"""The gradient of a ConSPOTrainer optimizer step equals that of the full-batch objective (issue 3)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from exactness import assert_grads_match, make_trainer, reference_auto_tau, reference_gradient  # noqa: E402
from tiny import build_tokenizer, odd_digit_parity  # noqa: E402

HERE = Path(__file__).parent


def _dataset(n=64):
    return Dataset.from_dict({"prompt": [f"{i % 10}+{i // 10}=" for i in range(n)]})


def _check_all_steps(trainer, model_dir):
    trainer.train()
    steps = len(trainer.captured_grads)
    assert steps == trainer.args.max_steps
    tau = None
    if trainer.args.tau == "auto":  # the first step's spread, measured by the reference itself
        tau = reference_auto_tau(model_dir, trainer.captured_params[0], trainer.captured_batches[0], trainer.args)
        assert trainer._tau() == pytest.approx(tau, rel=1e-5)
    norms = []
    for t in range(steps):
        expected = reference_gradient(model_dir, trainer.captured_params[t], trainer.captured_batches[t],
                                      trainer.args, step=t, max_steps=trainer.args.max_steps, tau=tau)
        norms.append(assert_grads_match(trainer.captured_grads[t], expected))
    assert max(norms) > 1e-6, "no step had a valid group: the test had no signal"
    return len(norms)


CASES = {
    # name: overrides
    "conspo-accumulation": dict(gradient_accumulation_steps=2, margin_schedule="linear", margin_max=0.2),
    "conspo-iterations": dict(gradient_accumulation_steps=2, num_iterations=2, max_steps=4),
    "conspo-two-steps-per-generation": dict(gradient_accumulation_steps=2, steps_per_generation=4, max_steps=4),
    "conspo-credit-straddling": dict(per_device_train_batch_size=6, gradient_accumulation_steps=2,
                                     num_iterations=2, max_steps=4),
    "conspo-credit-forced": dict(group_batching="credit", gradient_accumulation_steps=2, num_iterations=2,
                                 max_steps=4, neg_reduce="mean", group_norm="all"),
    "disco-iterations": dict(objective="disco", gradient_accumulation_steps=2, num_iterations=2, max_steps=4),
    "disco-basic-credit": dict(objective="disco", disco_variant="basic", per_device_train_batch_size=6,
                               gradient_accumulation_steps=2, max_steps=2),
    "gmpo-accumulation": dict(objective="gmpo", gradient_accumulation_steps=2, max_steps=2),
    "gmpo-two-steps-per-generation": dict(objective="gmpo", gradient_accumulation_steps=2, steps_per_generation=4,
                                          max_steps=4),
    "gmpo-straddling": dict(objective="gmpo", per_device_train_batch_size=6, gradient_accumulation_steps=2,
                            num_iterations=2, max_steps=4),
    "conspo-dynamic-sampling": dict(dynamic_sampling=True, gradient_accumulation_steps=2, max_steps=2),
    "conspo-dynamic-sampling-two-steps": dict(dynamic_sampling=True, gradient_accumulation_steps=1,
                                              steps_per_generation=2, max_steps=2),
    "conspo-auto-tau-credit": dict(tau="auto", per_device_train_batch_size=6, gradient_accumulation_steps=2,
                                   max_steps=2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_optimizer_step_gradient_equals_full_batch(name, model_dir, tmp_path):
    overrides = CASES[name]
    trainer = make_trainer(model_dir, tmp_path / "out", build_tokenizer(), _dataset(), odd_digit_parity, **overrides)
    expected_mode = overrides.get("group_batching") or (
        "whole_groups" if overrides.get("per_device_train_batch_size", 8) % 4 == 0 else "credit"
    )
    assert trainer.args.group_batching == expected_mode
    assert _check_all_steps(trainer, model_dir) == trainer.args.max_steps


def test_reported_loss_is_the_objective(model_dir, tmp_path):
    """With one micro-batch and one process, the logged loss equals conspo_loss on the captured batch."""
    from exactness import reference_logps
    from transformers import AutoModelForCausalLM

    from conspo import objectives as obj

    trainer = make_trainer(model_dir, tmp_path / "out", build_tokenizer(), _dataset(), odd_digit_parity,
                           gradient_accumulation_steps=1, max_steps=1, margin_schedule="constant", margin_max=0.05)
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.load_state_dict({**model.state_dict(), **trainer.captured_params[0]})
    (batch,) = trainer.captured_batches[0]
    with torch.no_grad():
        scores = obj.sequence_scores(reference_logps(model, batch, 1.0), batch["completion_mask"])
    value = obj.conspo_loss(scores, batch["conspo_correct"], batch["conspo_group_ids"], margin=0.05).loss
    assert logged[0] == pytest.approx(float(value), rel=1e-4, abs=1e-6)


@pytest.mark.multiproc
@pytest.mark.parametrize("objective", ["conspo", "gmpo", "conspo-dynamic"])
def test_two_processes_with_straddling_groups(model_dir, tmp_path, objective):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    out = tmp_path / "dist"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(HERE / "dist_exactness.py"), str(model_dir), str(out),
           objective]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    ids0 = torch.cat([b["conspo_group_ids"] for b in ranks[0]["batches"][0]])
    ids1 = torch.cat([b["conspo_group_ids"] for b in ranks[1]["batches"][0]])
    if objective == "conspo-dynamic":
        assert ranks[0]["group_batching"] == "whole_groups"
        assert not set(ids0.tolist()) & set(ids1.tolist()), "group ids must stay unique across processes"
        rows = [sum(b["conspo_correct"].shape[0] for b in r["batches"][0]) for r in ranks]
        assert rows[0] == rows[1], "every process must train on the same number of rows"
        for r in ranks:  # every group reaching the loss is mixed, from its rollouts' correctness
            for batch in r["batches"][0]:
                for gid in batch["conspo_group_ids"].unique():
                    c = batch["conspo_correct"][batch["conspo_group_ids"] == gid]
                    assert c.any() and not c.all()
    else:
        assert ranks[0]["group_batching"] == "credit"
        # groups straddle processes: some group id appears on both ranks
        assert set(ids0.tolist()) & set(ids1.tolist()), "the set-up was meant to split a group across processes"
    config = ranks[0]["config"]
    signal = 0.0
    for t in range(len(ranks[0]["grads"])):
        batches = ranks[0]["batches"][t] + ranks[1]["batches"][t]
        expected = reference_gradient(model_dir, ranks[0]["params"][t], batches, config, step=t,
                                      max_steps=config.max_steps)
        norms = [assert_grads_match(ranks[r]["grads"][t], expected) for r in range(2)]  # both ranks, after all-reduce
        signal = max(signal, *norms)
    assert signal > 1e-6, "no step had a valid group: the test had no signal"
