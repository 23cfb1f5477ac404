"""Shared machinery of the exactness tests: train with capture, then recompute each step in one pass.

A capturing ConSPOTrainer records, for every optimizer step, the parameters at its start, every
micro-batch it back-propagated, and the gradient just before the optimizer update. The reference
recomputes the step's loss from scratch -- its own forward pass and log-softmax, `sequence_scores`,
one `conspo_loss`/`disco_loss` call over all rows of all processes -- and differentiates it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from conspo import ConSPOConfig, ConSPOTrainer
from conspo import objectives as obj

KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
        "conspo_correct", "conspo_group_ids", "conspo_keep")
OPTIONAL_KEYS = ("advantages", "old_per_token_logps")


class _GradCapture(TrainerCallback):
    def __init__(self, owner):
        self.owner = owner

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        model = self.owner.accelerator.unwrap_model(self.owner.model)
        self.owner.captured_grads.append(
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        )


class CapturingTrainer(ConSPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.captured_params: list[dict[str, torch.Tensor]] = []
        self.captured_batches: list[list[dict[str, torch.Tensor]]] = []
        self.captured_grads: list[dict[str, torch.Tensor]] = []
        self.add_callback(_GradCapture(self))

    def _compute_loss(self, model, inputs):
        if self.model.training:
            if self._step % self.current_gradient_accumulation_steps == 0:
                unwrapped = self.accelerator.unwrap_model(self.model)
                self.captured_params.append({n: p.detach().clone() for n, p in unwrapped.named_parameters()})
                self.captured_batches.append([])
            batch = {k: inputs[k].detach().clone() for k in KEYS}
            for k in OPTIONAL_KEYS:  # GMPO reads TRL's advantages and, when TRL stored them, the old log-probs
                if inputs.get(k) is not None:
                    batch[k] = inputs[k].detach().clone()
            self.captured_batches[-1].append(batch)
        return super()._compute_loss(model, inputs)


def make_trainer(model_dir: Path, out_dir: Path, tokenizer, dataset, reward, **overrides) -> CapturingTrainer:
    settings = dict(
        output_dir=str(out_dir), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        per_device_train_batch_size=8, num_generations=4, gradient_accumulation_steps=2,
        max_completion_length=6, max_steps=2, logging_steps=1, learning_rate=2e-2, max_grad_norm=0.0,
        seed=0, trust_region=False, temperature=1.0,
    )
    settings.update(overrides)
    if settings.get("objective", "conspo") not in ("conspo", "disco"):
        settings.pop("trust_region")  # GMPO has none; the config refuses a setting without effect
    config = ConSPOConfig(**settings)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return CapturingTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                            processing_class=tokenizer)


def reference_logps(model, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """Token log-probabilities of the sampled completion tokens, written out by hand."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    t = batch["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -t - 1 : -1, :].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


def generation_step(config: ConSPOConfig, step: int) -> int:
    """The optimizer step at which the generation batch feeding optimizer step ``step`` was generated: one
    generation batch feeds steps_per_generation / gradient_accumulation_steps * num_iterations optimizer steps."""
    per_generation = config.steps_per_generation // config.gradient_accumulation_steps * config.num_iterations
    return step - step % per_generation


def _reference_scores(model, batches, config):
    scores, correct, gids = [], [], []
    for batch in batches:  # one forward per micro-batch: widths differ between processes
        keep = batch["conspo_keep"]
        mask = batch["completion_mask"] * keep.unsqueeze(1)
        scores.append(obj.sequence_scores(reference_logps(model, batch, config.temperature), mask))
        correct.append(batch["conspo_correct"])
        gids.append(batch["conspo_group_ids"])
    return torch.cat(scores), torch.cat(correct), torch.cat(gids)


def reference_auto_tau(model_dir: Path, params: dict[str, torch.Tensor], batches, config: ConSPOConfig) -> float:
    """tau='auto' written out: the median over groups of the within-group population sd of the first step's scores
    (kept rows only), times tau_auto_factor."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.load_state_dict({**model.state_dict(), **copy.deepcopy(params)})
    with torch.no_grad():
        scores, _, gids = _reference_scores(model, batches, config)
    keep = torch.cat([b["conspo_keep"] for b in batches])
    sds = sorted(float(scores[keep & (gids == g)].double().std(unbiased=False))
                 for g in gids[keep].unique() if int((keep & (gids == g)).sum()) > 1)
    middle = (sds[(len(sds) - 1) // 2] + sds[len(sds) // 2]) / 2
    return middle * config.tau_auto_factor


def reference_gradient(model_dir: Path, params: dict[str, torch.Tensor], batches: list[dict[str, torch.Tensor]],
                       config: ConSPOConfig, step: int, max_steps: int, tau: float | None = None
                       ) -> dict[str, torch.Tensor]:
    """Gradient of the full-batch objective over ``batches`` (all micro-batches of all processes) at optimizer
    step ``step``; the margin is the one of the step at which its generation batch was generated."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.load_state_dict({**model.state_dict(), **copy.deepcopy(params)})
    model.train()
    if config.objective == "gmpo":
        return _gmpo_reference_gradient(model, batches, config)
    scores, correct, gids = _reference_scores(model, batches, config)
    tau = config.tau if tau is None else tau
    if config.objective == "conspo":
        loss = obj.conspo_loss(scores, correct, gids, tau=tau, margin=config.margin(generation_step(config, step), max_steps),
                               neg_reduce=config.neg_reduce, group_norm=config.group_norm).loss
    else:
        loss = obj.disco_loss(scores, correct, gids, tau=tau, variant=config.disco_variant,
                              group_norm=config.group_norm).loss
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _gmpo_reference_gradient(model, batches, config: ConSPOConfig) -> dict[str, torch.Tensor]:
    """GMPO over all rows of the step in one call: the mean over kept sequences (gmpo_loss's own normaliser)."""
    total = None
    n_rows = sum(int(b["conspo_keep"].sum()) for b in batches)
    for batch in batches:
        logps = reference_logps(model, batch, config.temperature)
        old = batch.get("old_per_token_logps", logps.detach())
        mask = batch["completion_mask"] * batch["conspo_keep"].unsqueeze(1)
        part = obj.gmpo_loss(logps, old, batch["advantages"], mask, eps_low=config.gmpo_epsilon_low,
                             eps_high=config.gmpo_epsilon_high, normalizer=n_rows).loss
        total = part if total is None else total + part
    total.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_match(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol=1e-4, atol=1e-6):
    """Compare parameter by parameter; returns the reference gradient's norm (0 for a step with no
    valid group, whose actual gradient must then be zero too)."""
    assert set(actual) == set(expected), "gradients cover different parameters"
    for name, exp in expected.items():
        torch.testing.assert_close(actual[name], exp, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    return float(torch.sqrt(sum((e.double() ** 2).sum() for e in expected.values())))
