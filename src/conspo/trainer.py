"""ConSPO and DisCO on TRL's ``GRPOTrainer``, with exact group-coupled gradients.

TRL does generation (vLLM or transformers), rewards, accelerate/DeepSpeed, PEFT, logging and
checkpoints; this subclass only changes what a group-coupled loss needs (spec section 9):

1. Each rollout's correctness (thresholded reward) and group id ride along in the generation batch
   (``conspo_correct``, ``conspo_group_ids``, ``conspo_keep``).
2. Two exact strategies, chosen by ``group_batching``:

   * ``whole_groups`` (the default whenever ``per_device_train_batch_size % num_generations == 0``):
     rows are shuffled at *group* granularity before the generation batch is cut into
     gradient-accumulation micro-batches. TRL's sampler gives every process contiguous runs of ``G``
     rollouts per prompt, so no group straddles a process or a micro-batch. Each micro-batch computes
     the loss of its groups at the current parameters, normalised by the number of groups counted over
     the whole optimizer-step batch on every process. No extra forward pass.
   * ``credit`` (the fallback when groups straddle processes or micro-batches): at the start of each
     optimizer step a no-grad pass scores every rollout of the step at the current parameters, the
     scores are gathered over processes, and the closed-form credit ``c = -dL/ds`` of the full batch is
     attached to each row. Each micro-batch then back-propagates the surrogate ``-sum_i c_i s_i``,
     whose gradient is exactly that of the full-batch loss. Costs one extra forward pass per step.

3. Losses are multiplied by the world size because DDP averages gradients over processes, so the
   micro-batch losses add up to exactly ``conspo_loss`` on the full batch, for any gradient
   accumulation, any ``num_iterations`` and any number of processes. The logged loss is its value.

The GRPO-family baselines run TRL's own loss (``objective="trl"``); this class only adds the shared
diagnostics (score gap, separation AUC) so every method can be plotted alike.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer

from conspo import fast_generation as fastgen
from conspo import objectives as obj

logger = logging.getLogger("conspo.trainer")

OBJECTIVES = ("conspo", "disco", "trl")
TRUNCATED_POLICIES = ("negative", "drop")
GROUP_BATCHING = ("auto", "whole_groups", "credit")
SUPPORTED_TRL = ((1, 16), (1, 17))  # [low, high)
NO_SIGNAL_WARN_STEPS = 10  # warn after this many consecutive optimizer steps without a mixed group

# TRL methods this trainer overrides or calls, with the parameters it relies on. A change here fails loudly.
TRL_INTERNALS = {
    "_generate": ["self", "prompts"],
    "_generate_single_turn": ["self", "prompt_ids", "images", "multimodal_fields", "num_generations", "has_tool_images"],
    "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],
    "_generate_and_score_completions": ["self", "inputs"],
    "_prepare_inputs": ["self", "generation_batch"],
    "_compute_loss": ["self", "model", "inputs"],
}


@dataclass
class ConSPOConfig(GRPOConfig):
    """TRL's ``GRPOConfig`` plus the ConSPO and DisCO options of ``shared/spec/objectives.md``.

    Every GRPOConfig field keeps its meaning. ``beta`` (KL to a frozen reference model) and vLLM's
    importance-sampling correction apply to ConSPO and DisCO as they do to GRPO.
    """

    objective: str = field(
        default="conspo",
        metadata={"help": "'conspo', 'disco', or 'trl' (TRL's own loss_type: the GRPO-family baselines)."},
    )
    tau: float | None = field(
        default=None,
        metadata={"help": "Temperature of the contrast. Default: 0.1 for conspo, 10.0 for disco (its paper's value)."},
    )
    margin_schedule: str = field(
        default="linear", metadata={"help": "ConSPO margin curriculum: constant, linear, cosine or step."}
    )
    margin_start: float = field(default=0.0, metadata={"help": "Margin m0 at step 0 (>= 0)."})
    margin_max: float = field(default=0.1, metadata={"help": "Margin m_max reached at the end of the ramp (>= 0)."})
    margin_ramp_frac: float = field(
        default=1.0, metadata={"help": "Fraction of the planned optimizer steps over which the margin ramps, (0, 1]."}
    )
    margin_step_at: int | None = field(
        default=None, metadata={"help": "For margin_schedule='step': the optimizer step where m jumps to m_max."}
    )
    neg_reduce: str = field(default="sum", metadata={"help": "ConSPO negatives: 'sum' (InfoNCE) or 'mean'."})
    group_norm: str = field(
        default="valid", metadata={"help": "Average over 'valid' (mixed) groups or over 'all' groups of the batch."}
    )
    disco_variant: str = field(default="dro", metadata={"help": "DisCO objective: 'dro' or 'basic'."})
    trust_region: bool = field(
        default=True,
        metadata={"help": "DisCO's squared-hinge KL(pi_old || pi) penalty; active only when parameters drift "
                  "from pi_old within a generation batch (num_iterations > 1 or several optimizer steps)."},
    )
    trust_region_delta: float = field(default=1e-4, metadata={"help": "KL budget delta of the trust region (> 0)."})
    trust_region_beta: float = field(default=1e3, metadata={"help": "Penalty coefficient of the trust region (> 0)."})
    correct_threshold: float = field(
        default=0.5, metadata={"help": "A rollout is a positive when its reward is >= this threshold."}
    )
    correctness_reward: str | None = field(
        default=None,
        metadata={"help": "Name of the reward function that decides correctness (e.g. when a length penalty is "
                  "added). Default: the weighted sum of all reward functions."},
    )
    truncated: str = field(
        default="negative",
        metadata={"help": "Truncated completions (no EOS): 'negative' (count as incorrect) or 'drop' (from P and N)."},
    )

    dump_batch_step: int | None = field(
        default=None,
        metadata={"help": "Write the scores, correctness and group ids of this optimizer step's batch (1-based) to "
                  "output_dir/batch-step<N>.json, for credit-assignment figures."},
    )
    group_batching: str = field(
        default="auto",
        metadata={"help": "How group-coupled gradients stay exact under batching: 'whole_groups', 'credit' "
                  "(one extra no-grad forward per step; works when groups straddle processes), or 'auto'."},
    )
    fast_generation: str = field(
        default="auto",
        metadata={"help": "Rollouts through transformers' generate with bf16 weights, a static KV cache and compiled "
                  "decoding (see conspo.fast_generation): 'auto' (on for CUDA without vLLM; falls back to TRL's "
                  "default path with the reason logged), 'on' (also on CPU and fp32; errors where unsupported) or "
                  "'off'."},
    )
    fast_generation_compile: dict | str | None = field(
        default=None,
        metadata={"help": "torch.compile settings of the decoding step, as transformers' CompileConfig fields "
                  "(fullgraph, dynamic, backend, mode, options; a dict or JSON). Default: inductor, reduce-overhead."},
    )

    _VALID_DICT_FIELDS = GRPOConfig._VALID_DICT_FIELDS + ["fast_generation_compile"]

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("objective", self.objective, OBJECTIVES)
        _choice("group_batching", self.group_batching, GROUP_BATCHING)
        _choice("margin_schedule", self.margin_schedule, obj.MARGIN_SCHEDULES)
        _choice("neg_reduce", self.neg_reduce, obj.NEG_REDUCES)
        _choice("group_norm", self.group_norm, obj.GROUP_NORMS)
        _choice("disco_variant", self.disco_variant, obj.DISCO_VARIANTS)
        _choice("truncated", self.truncated, TRUNCATED_POLICIES)
        _choice("fast_generation", self.fast_generation, fastgen.MODES)
        compile_options = self.fast_generation_compile
        if compile_options is not None and (not isinstance(compile_options, dict)
                                            or not set(compile_options) <= set(fastgen.COMPILE_KEYS)):
            raise ValueError(f"fast_generation_compile must be a dict with keys among {', '.join(fastgen.COMPILE_KEYS)}; "
                             f"got {compile_options!r}")
        if self.tau is None:
            self.tau = 10.0 if self.objective == "disco" else 0.1
        _positive("tau", self.tau)
        _positive("trust_region_delta", self.trust_region_delta)
        _positive("trust_region_beta", self.trust_region_beta)
        step = self.dump_batch_step
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
            raise ValueError(f"dump_batch_step must be None or an optimizer step >= 1 (1-based), got {step!r}")
        if not math.isfinite(self.correct_threshold):
            raise ValueError(f"correct_threshold must be finite, got {self.correct_threshold!r}")
        # margin_at validates the schedule parameters; call it once so errors come at construction.
        obj.margin_at(0, 1, schedule=self.margin_schedule, m0=self.margin_start, m_max=self.margin_max,
                      ramp_frac=self.margin_ramp_frac, step_at=self.margin_step_at)
        if self.objective == "trl":
            return
        if self.use_liger_kernel:
            raise ValueError(
                f"use_liger_kernel=True replaces TRL's loss with Liger's GRPO loss, which cannot compute "
                f"objective={self.objective!r}; set use_liger_kernel=False."
            )
        g = self.num_generations
        whole = self.per_device_train_batch_size % g == 0
        if self.group_batching == "whole_groups" and not whole:
            raise ValueError(
                f"group_batching='whole_groups' needs every micro-batch to hold whole groups: "
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be a multiple of "
                f"num_generations ({g}); or set group_batching='credit' (or 'auto')."
            )
        if self.group_batching == "auto":
            self.group_batching = "whole_groups" if whole else "credit"
        if self.steps_per_generation % self.gradient_accumulation_steps != 0:
            raise ValueError(
                f"objective={self.objective!r} needs each optimizer step to see whole generation batches or a whole "
                f"fraction of one: steps_per_generation ({self.steps_per_generation}) must be a multiple of "
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps}); leave steps_per_generation and "
                f"generation_batch_size unset to get TRL's default (equal)."
            )

    def margin(self, step: int, total_steps: int) -> float:
        """The margin at optimizer step ``step`` of ``total_steps`` (spec section 5)."""
        return obj.margin_at(step, max(1, total_steps), schedule=self.margin_schedule, m0=self.margin_start,
                             m_max=self.margin_max, ramp_frac=self.margin_ramp_frac, step_at=self.margin_step_at)


def _choice(name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; accepted values: {', '.join(map(repr, accepted))}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_trl_internals() -> None:
    """Raise if the installed TRL is outside the tested range or its overridden internals changed shape."""
    import trl

    version = tuple(int(p) for p in trl.__version__.split(".")[:2] if p.isdigit())
    low, high = SUPPORTED_TRL
    if not low <= version < high:
        raise RuntimeError(
            f"conspo's trainer is tested with trl>={low[0]}.{low[1]},<{high[0]}.{high[1]}; found trl {trl.__version__}. "
            f"Install a supported TRL (pip install 'trl>={low[0]}.{low[1]},<{high[0]}.{high[1]}')."
        )
    for name, expected in TRL_INTERNALS.items():
        method = getattr(GRPOTrainer, name, None)
        if method is None:
            raise RuntimeError(f"GRPOTrainer.{name} is missing in trl {trl.__version__}; conspo overrides it")
        params = list(inspect.signature(method).parameters)
        if params != expected:
            raise RuntimeError(
                f"GRPOTrainer.{name}{tuple(params)} changed shape in trl {trl.__version__} "
                f"(conspo expects {tuple(expected)})"
            )
    if getattr(GRPOTrainer, "loss_is_scaled_for_ga", None) is not True:
        raise RuntimeError("GRPOTrainer.loss_is_scaled_for_ga is no longer True; conspo's loss scaling relies on it")


class ConSPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with ConSPO/DisCO objectives and shared diagnostics. Same constructor as TRL's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_trl_internals()
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if not isinstance(config, ConSPOConfig):
            raise TypeError(f"ConSPOTrainer needs args=ConSPOConfig(...), got {type(config).__name__}")
        super().__init__(*args, **kwargs)
        self.fast_generation = fastgen.setup(self, config.fast_generation, config.fast_generation_compile)
        if config.correctness_reward is not None and config.correctness_reward not in self.reward_func_names:
            raise ValueError(
                f"correctness_reward={config.correctness_reward!r} is not one of the reward functions: "
                f"{', '.join(self.reward_func_names)}"
            )
        self._rewards_per_func: torch.Tensor | None = None
        self._completion_ids_list: list | None = None
        self._step_rows: list[dict[str, torch.Tensor]] = []

    def train(self, *args: Any, **kwargs: Any):
        # A new run (or a resumed one) restarts global_step and may load other weights: the bf16 generator must
        # not go on generating from the weights of the step number it last saw.
        self.fast_generation.invalidate()
        return super().train(*args, **kwargs)

    # ---------------------------------------------------------------- generation: carry correctness and groups

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        with self.fast_generation.generating(self, prompt_ids):
            result = super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                   has_tool_images)
        if self.fast_generation.enabled:
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["fast_generation/graphs_compiled"].append(self.fast_generation.stats["graphs_compiled"])
        return result

    def _generate(self, prompts):
        result = super()._generate(prompts)
        self._completion_ids_list = result[1]
        return result

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        infinite = torch.isinf(rewards)
        if infinite.any():  # TRL would silently zero the advantages of the whole group; ConSPO would count +inf correct
            names = [self.reward_func_names[i] for i in infinite.any(0).nonzero().flatten().tolist()]
            raise ValueError(
                f"reward function(s) {', '.join(names)} returned an infinite reward for {int(infinite.sum())} of "
                f"{rewards.shape[0]} completions; rewards must be finite. Return None for a completion a function does "
                f"not score, or wrap a verifier with conspo.rewards.make_reward_func (non-finite scores become 0.0, logged)."
            )
        self._rewards_per_func = rewards  # (B_global, n_funcs), gathered over processes by TRL
        return rewards

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        args: ConSPOConfig = self.args
        device = out["completion_ids"].device
        n_local = out["completion_ids"].shape[0]
        rank = self.accelerator.process_index
        mode = "train" if self.model.training else "eval"
        g = self.num_generations if mode == "train" else self.num_generations_eval

        rewards_per_func = self._rewards_per_func.to(device)
        if args.correctness_reward is not None:
            reward = rewards_per_func[:, self.reward_func_names.index(args.correctness_reward)]
        else:
            reward = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        rows = slice(rank * n_local, (rank + 1) * n_local)
        correct = (reward >= args.correct_threshold) & ~unscorable
        keep = ~unscorable[rows]
        if args.truncated == "drop":
            eos_and_pad = {*self.eos_token_ids, self._tokenizer.pad_token_id}
            truncated = torch.tensor(
                [len(ids) > 0 and ids[-1] not in eos_and_pad for ids in self._completion_ids_list], device=device
            )
            keep = keep & ~truncated
        # TRL's sampler lays the global generation batch out as runs of G rollouts of one prompt.
        global_row = torch.arange(rank * n_local, (rank + 1) * n_local, device=device)
        out["conspo_correct"] = correct[rows]
        out["conspo_group_ids"] = global_row // g
        out["conspo_keep"] = keep
        return out

    # ---------------------------------------------------------------- batching: whole groups per micro-batch

    def _prepare_inputs(self, generation_batch):
        if self.args.objective == "trl" or not self.model.training:
            return super()._prepare_inputs(generation_batch)
        steps = self.args.steps_per_generation
        if self.args.group_batching == "credit":
            inputs = super()._prepare_inputs(generation_batch)  # TRL's row shuffle and split
            k = self._step % steps
            accumulation = self.args.gradient_accumulation_steps
            if k % accumulation == 0:  # first micro-batch of an optimizer step: credits at current parameters
                self._attach_credits(self._buffered_inputs[k : k + accumulation])
            return inputs
        if self._step % (steps * self.num_iterations) == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            self._buffered_inputs = self._split_whole_groups(batch)
        return self._buffered_inputs[self._step % steps]

    @torch.no_grad()
    def _attach_credits(self, chunks: list[dict[str, Any]]) -> None:
        """Full-batch credits of one optimizer step, from scores at the current parameters on every process."""
        scores = []
        for chunk in chunks:
            input_ids = torch.cat([chunk["prompt_ids"], chunk["completion_ids"]], dim=1)
            attention_mask = torch.cat([chunk["prompt_mask"], chunk["completion_mask"]], dim=1)
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, chunk["completion_ids"].size(1),
                batch_size=self.args.per_device_train_batch_size,
            )
            scores.append(obj.sequence_scores(logps, _loss_mask(chunk) * chunk["conspo_keep"].unsqueeze(1)))
        local = {
            "scores": torch.cat(scores),
            "correct": torch.cat([c["conspo_correct"] for c in chunks]),
            "group_ids": torch.cat([c["conspo_group_ids"] for c in chunks]),
            "keep": torch.cat([c["conspo_keep"] for c in chunks]),
        }
        rows = {k: self.accelerator.gather(v) for k, v in local.items()}
        keep = rows["keep"]
        gid = torch.where(keep, rows["group_ids"], -1 - torch.arange(keep.shape[0], device=keep.device))
        full = self._objective(rows["scores"], rows["correct"], gid, normalizer=None)
        n_local = local["scores"].shape[0]
        rank = self.accelerator.process_index
        credit = full.credit[rank * n_local : (rank + 1) * n_local]
        counts = torch.stack([self._chunk_counts(c)[1:] for c in chunks]).sum(0)
        counts = self.accelerator.reduce(counts, "sum")
        start = 0
        for chunk in chunks:
            size = chunk["conspo_correct"].shape[0]
            chunk["conspo_credit"] = credit[start : start + size]
            chunk["conspo_loss_value"] = full.loss.detach()
            chunk["conspo_num_rollouts"], chunk["conspo_num_tokens"] = counts[0], counts[1]
            start += size

    def _split_whole_groups(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Shuffle groups (not rows), cut into ``steps_per_generation`` micro-batches of whole groups, and
        attach to each the group, rollout and token counts of its optimizer step over all processes."""
        if "pixel_values" in batch:
            raise NotImplementedError("objective='conspo'/'disco' does not support multimodal batches yet")
        args: ConSPOConfig = self.args
        g = self.num_generations
        gid = batch["conspo_group_ids"]
        n = gid.shape[0]
        if n % g != 0 or not torch.equal(gid.view(-1, g), gid.view(-1, g)[:, :1].expand(-1, g)):
            raise RuntimeError(
                f"the local generation batch ({n} rollouts) does not hold whole groups of num_generations={g}; "
                f"set per_device_train_batch_size to a multiple of num_generations"
            )
        order = (torch.randperm(n // g, device=gid.device)[:, None] * g + torch.arange(g, device=gid.device)).flatten()
        batch = {k: _take(v, order, n) for k, v in batch.items()}

        steps = args.steps_per_generation
        size = n // steps
        chunks = [{k: _slice(v, i * size, (i + 1) * size, n) for k, v in batch.items()} for i in range(steps)]

        # Counts per micro-batch: [groups counted by group_norm, rollouts, loss tokens].
        counts = torch.stack([self._chunk_counts(c) for c in chunks])  # (steps, 3)
        counts = self.accelerator.gather(counts.unsqueeze(0)).view(-1, steps, 3).sum(0)  # over processes
        accumulation = args.gradient_accumulation_steps
        window = counts.view(steps // accumulation, accumulation, 3).sum(1)  # per optimizer step
        for i, chunk in enumerate(chunks):
            groups, rollouts, tokens = window[i // accumulation]
            chunk["conspo_normalizer"] = groups
            chunk["conspo_num_rollouts"] = rollouts
            chunk["conspo_num_tokens"] = tokens
        return chunks

    def _chunk_counts(self, chunk: dict[str, Any]) -> torch.Tensor:
        """[groups counted by group_norm (whole-group chunks only), kept rollouts, loss tokens]."""
        keep = chunk["conspo_keep"]
        groups = torch.zeros((), device=keep.device)
        if self.args.group_batching == "whole_groups":
            g = self.num_generations
            rows = keep.view(-1, g)
            correct = chunk["conspo_correct"].view(-1, g) & rows
            wrong = ~chunk["conspo_correct"].view(-1, g) & rows
            groups = (correct.any(1) & wrong.any(1)) if self.args.group_norm == "valid" else rows.any(1)
            groups = groups.sum().float()
        mask = _loss_mask(chunk) * keep.unsqueeze(1)
        return torch.stack([groups, keep.sum().float(), mask.sum().float()])

    def _objective(self, scores, correct, group_ids, *, normalizer) -> obj.LossOutput:
        args: ConSPOConfig = self.args
        if args.objective == "conspo":
            return obj.conspo_loss(scores, correct, group_ids, tau=args.tau, margin=self._current_margin(),
                                   neg_reduce=args.neg_reduce, group_norm=args.group_norm, normalizer=normalizer)
        return obj.disco_loss(scores, correct, group_ids, tau=args.tau, variant=args.disco_variant,
                              group_norm=args.group_norm, normalizer=normalizer)

    # ---------------------------------------------------------------- the loss

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        self._last_logps = result[0]
        return result

    def _compute_loss(self, model, inputs):
        if self.args.objective == "trl":
            loss = super()._compute_loss(model, inputs)
            if self.model.training:
                self._record_rows(inputs, self._last_logps.detach())
            return loss
        return self._contrastive_loss(model, inputs)

    def _contrastive_loss(self, model, inputs):
        args: ConSPOConfig = self.args
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True
        )
        keep = inputs["conspo_keep"]
        mask = _loss_mask(inputs) * keep.unsqueeze(1)

        # vLLM importance-sampling correction: weight each token's gradient by TRL's truncated ratio,
        # leaving the loss value (the true objective) unchanged.
        grad_logps = logps
        if "importance_sampling_ratio" in inputs:
            weight = inputs["importance_sampling_ratio"].detach()
            grad_logps = logps + (weight - 1.0) * (logps - logps.detach())
        scores = obj.sequence_scores(grad_logps, mask)

        # Dropped rows become singleton groups: degenerate, so they contribute nothing.
        gid = inputs["conspo_group_ids"]
        gid = torch.where(keep, gid, -1 - torch.arange(gid.shape[0], device=gid.device))
        training = mode == "train"
        world = self.accelerator.num_processes if training else 1
        if training and "conspo_credit" in inputs:
            # Decoupled credit: the surrogate's gradient is the full-batch loss's; its value is reported.
            surrogate = -(inputs["conspo_credit"] * scores).sum() * world
            share = 1.0 / self.current_gradient_accumulation_steps
            loss = surrogate - surrogate.detach() + inputs["conspo_loss_value"] * share
        else:
            normalizer = inputs["conspo_normalizer"] if training else None
            loss = self._objective(scores, inputs["conspo_correct"], gid, normalizer=normalizer).loss * world

        old = inputs.get("old_per_token_logps")
        if args.trust_region and old is not None:
            region = obj.kl_trust_region(logps, old, mask, delta=args.trust_region_delta,
                                         beta=args.trust_region_beta)
            share = mask.sum() / inputs["conspo_num_tokens"].clamp(min=1) if training else 1.0
            loss = loss + region.penalty * share * world
            self._metrics[mode]["conspo/trust_region_kl"].append(self.accelerator.gather(region.kl).mean().item())

        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref - logps) - (ref - logps) - 1
            seq_kl = (per_token_kl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
            rollouts = inputs["conspo_num_rollouts"].clamp(min=1) if training else keep.sum().clamp(min=1)
            loss = loss + self.beta * seq_kl.sum() / rollouts * world
            kl_stats = self.accelerator.reduce(torch.stack([(per_token_kl * mask).sum(), mask.sum()]), "sum")
            self._metrics[mode]["kl"].append((kl_stats[0] / kl_stats[1].clamp(min=1)).item())

        ent = self.accelerator.reduce(torch.stack([(entropies * mask).sum(), mask.sum()]).detach(), "sum")
        self._metrics[mode]["entropy"].append((ent[0] / ent[1].clamp(min=1)).item())
        if training:
            self._record_rows(inputs, logps.detach())
        return loss

    def _current_margin(self) -> float:
        if self.args.objective != "conspo":
            return 0.0
        return self.args.margin(self.state.global_step, self.state.max_steps)

    # ---------------------------------------------------------------- diagnostics, once per optimizer step

    def _record_rows(self, inputs: dict[str, Any], logps: torch.Tensor) -> None:
        mask = _loss_mask(inputs)
        self._step_rows.append({
            "scores": obj.sequence_scores(logps, mask),
            "correct": inputs["conspo_correct"],
            "group_ids": inputs["conspo_group_ids"],
            "keep": inputs["conspo_keep"],
        })
        if len(self._step_rows) >= self.current_gradient_accumulation_steps:
            self._log_diagnostics()

    def _log_diagnostics(self) -> None:
        rows = {k: torch.cat([r[k] for r in self._step_rows]) for k in self._step_rows[0]}
        self._step_rows = []
        rows = {k: self.accelerator.gather(v) for k, v in rows.items()}
        keep = rows["keep"]
        scores, correct, gid = rows["scores"][keep], rows["correct"][keep], rows["group_ids"][keep]
        step = self.state.global_step + 1  # the step being taken, as TRL logs it
        if self.args.dump_batch_step == step and self.accelerator.is_main_process:
            path = Path(self.args.output_dir) / f"batch-step{step}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"step": step, "objective": self.args.objective,
                                        "scores": scores.tolist(), "correct": correct.tolist(),
                                        "group_ids": gid.tolist()}))
        if self.args.objective == "trl":
            metrics = obj.separation_metrics(scores, correct, gid)
        else:
            metrics = self._objective(scores, correct, gid, normalizer=None).metrics
        for name, value in metrics.items():
            self._metrics["train"][f"conspo/{name}"].append(float(value))
        self._count_steps_without_signal(metrics)

    _steps_without_signal = 0

    def _count_steps_without_signal(self, metrics: dict[str, torch.Tensor]) -> None:
        """A step whose groups are all correct or all wrong has zero loss and gradient (``conspo/valid_frac`` 0):
        training goes on, and every ``NO_SIGNAL_WARN_STEPS`` such steps in a row a warning says why."""
        if float(metrics["valid_frac"]) > 0:
            self._steps_without_signal = 0
            return
        self._steps_without_signal += 1
        if self._steps_without_signal % NO_SIGNAL_WARN_STEPS == 0 and self.accelerator.is_main_process:
            reward = float(metrics["reward_mean"])
            why = ("every rollout is wrong: the task is too hard for the policy, or the verifier rejects its answer "
                   "format" if reward == 0 else "every rollout is correct: the task is saturated" if reward == 1
                   else "each group is all correct or all wrong")
            logger.warning(
                "%d optimizer steps in a row without a group holding both a correct and an incorrect rollout "
                "(conspo/valid_frac = 0, mean correctness %.3f): %s. The loss and gradient are zero on these steps; "
                "training continues.", self._steps_without_signal, reward, why)


def _loss_mask(inputs: dict[str, Any]) -> torch.Tensor:
    mask = inputs["completion_mask"]
    return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]


def _take(value: Any, order: torch.Tensor, n: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n:
        return value[order.to(value.device)]
    if isinstance(value, list) and len(value) == n:
        return [value[i] for i in order.tolist()]
    return value


def _slice(value: Any, start: int, stop: int, n: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n:
        return value[start:stop]
    if isinstance(value, list) and len(value) == n:
        return value[start:stop]
    return value
