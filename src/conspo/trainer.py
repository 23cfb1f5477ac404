"""ConSPO, DisCO and GMPO on TRL's ``GRPOTrainer``, with exact group-coupled gradients.

TRL does generation (vLLM or transformers), rewards, accelerate/DeepSpeed, PEFT, logging and
checkpoints; this subclass only changes what its own objectives need (docs/objectives.md, section 9):

1. Each rollout's correctness (thresholded reward) and group id ride along in the generation batch
   (``conspo_correct``, ``conspo_group_ids``, ``conspo_keep``). A row with no token left in its loss mask is not
   kept: it leaves its group for the loss and every diagnostic, for every objective.
2. Every optimizer step holds whole groups, by one of two exact strategies (``group_batching``; the row
   bookkeeping is ``conspo.batching``): ``whole_groups`` (the default when ``per_device_train_batch_size %
   num_generations == 0``) shuffles whole groups and normalises each micro-batch by the groups of its whole
   optimizer step, with no extra forward pass; ``credit`` (groups straddle processes or micro-batches) scores the
   step's rollouts once at the current parameters, no grad, and back-propagates the surrogate ``-sum_i c_i s_i``
   with the full-batch credit ``c = -dL/ds`` (one extra forward pass per step).
3. Losses are multiplied by the world size because DDP averages gradients over processes, so the
   micro-batch losses add up to exactly the objective on the full batch, for any gradient
   accumulation, any ``num_iterations`` and any number of processes. The logged loss is its value.
4. Dynamic sampling (``dynamic_sampling``) and ``drop_degenerate_groups`` select mixed groups after scoring, for
   every objective; the margin is read once per generation batch; ``tau="auto"`` is measured once and checkpointed.

The GRPO-family baselines run TRL's own loss (``objective="trl"``); this class only adds the shared
diagnostics (score gap, separation AUC) so every method can be plotted alike, and is bit-identical to
``GRPOTrainer`` for them unless dynamic sampling or dropping is asked for. The config and the TRL-version guard
are ``conspo.config`` (``ConSPOConfig`` is re-exported here).

Why this file is long: it is the whole TRL adapter, one subclass whose overrides share the trainer's state.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from trl import GRPOTrainer

from conspo import auto_tau, batching
from conspo import fast_generation as fastgen
from conspo import objectives as obj
from conspo.config import GROUP_COUPLED, ConSPOConfig, check_trl_internals, keep_vllm_cpu_weights_plain
from conspo.rollout_budget import RolloutBudget

logger = logging.getLogger("conspo.trainer")

NO_SIGNAL_WARN_STEPS = 10  # warn after this many consecutive optimizer steps without a mixed group


class ConSPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with ConSPO/DisCO objectives and shared diagnostics. Same constructor as TRL's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_trl_internals()
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if not isinstance(config, ConSPOConfig):
            raise TypeError(f"ConSPOTrainer needs args=ConSPOConfig(...), got {type(config).__name__}")
        if config.use_vllm and config.vllm_mode == "colocate" and not torch.cuda.is_available():
            keep_vllm_cpu_weights_plain()
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
        self._generation_step = 0  # the optimizer step at which the buffered generation batch was generated
        self._auto_tau = auto_tau._AutoTau()
        self.add_callback(self._auto_tau)
        self._rollout_budget = RolloutBudget(config.max_rollouts)
        self.add_callback(self._rollout_budget)
        stale = config.stale_rollouts_warning()
        if stale:
            logger.warning(stale)

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
        if mode == "train":  # every process generates alike (dynamic sampling's rounds are agreed over processes)
            self._rollout_budget.count(n_local * self.accelerator.num_processes, self.state)

        rewards_per_func = self._rewards_per_func.to(device)
        if args.correctness_reward is not None:
            reward = rewards_per_func[:, self.reward_func_names.index(args.correctness_reward)]
        else:
            reward = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        rows = slice(rank * n_local, (rank + 1) * n_local)
        correct = (reward >= args.correct_threshold) & ~unscorable
        keep = ~unscorable[rows]
        # A row with no token left in its loss mask (TRL's mask_truncated_completions, tool masks) has no score: it
        # leaves its group for the loss and every diagnostic, for every objective (docs/objectives.md, section 6).
        keep = keep & (batching.loss_mask(out).sum(1) > 0)
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
        args: ConSPOConfig = self.args
        selecting = args.dynamic_sampling or args.drop_degenerate_groups
        if not self.model.training or (args.objective == "trl" and not selecting):
            return super()._prepare_inputs(generation_batch)
        steps = args.steps_per_generation
        if self._step % (steps * self.num_iterations) == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            if args.dynamic_sampling or (args.drop_degenerate_groups and args.objective == "trl"):
                batch = self._select_mixed_groups(batch, generation_batch)
            elif args.drop_degenerate_groups:  # own objectives: rows of degenerate groups leave every count
                batch["conspo_keep"] = batch["conspo_keep"] & batching.mixed_rows(batch, self.num_generations)
            if args.objective == "trl":
                self._buffered_inputs = batching.trl_split(batch, steps)
                return self._buffered_inputs[self._step % steps]
            self._buffered_inputs = self._split_generation_batch(batch)
            self._generation_step = self.state.global_step  # one generation batch, one margin
        k = self._step % steps
        accumulation = self.args.gradient_accumulation_steps
        if k % accumulation == 0:  # first micro-batch of an optimizer step
            chunks = self._buffered_inputs[k : k + accumulation]
            if self.args.group_batching == "credit" and self.args.objective in GROUP_COUPLED:
                self._attach_credits(chunks)  # resolves tau='auto' from the same scores
            elif self._auto_tau_pending():
                self._resolve_auto_tau(self._step_scores(chunks))
        return self._buffered_inputs[k]

    @torch.no_grad()
    def _step_scores(self, chunks: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Scores of every rollout of one optimizer step at the current parameters, gathered over processes."""
        scores = []
        for chunk in chunks:
            input_ids = torch.cat([chunk["prompt_ids"], chunk["completion_ids"]], dim=1)
            attention_mask = torch.cat([chunk["prompt_mask"], chunk["completion_mask"]], dim=1)
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, chunk["completion_ids"].size(1),
                batch_size=self.args.per_device_train_batch_size,
            )
            mask = batching.loss_mask(chunk) * chunk["conspo_keep"].unsqueeze(1)
            scores.append(self._scores(logps, chunk.get("old_per_token_logps"), mask, chunk["conspo_correct"]))
        local = {
            "scores": torch.cat(scores),
            "correct": torch.cat([c["conspo_correct"] for c in chunks]),
            "group_ids": torch.cat([c["conspo_group_ids"] for c in chunks]),
            "keep": torch.cat([c["conspo_keep"] for c in chunks]),
        }
        return {k: self.accelerator.gather(v) for k, v in local.items()}

    def _resolve_auto_tau(self, rows: dict[str, torch.Tensor]) -> None:
        """tau='auto': measured on this optimizer step if it holds a mixed group (conspo.auto_tau), then fixed."""
        found = auto_tau.calibrate(rows, self.args.tau_auto_factor)
        if found is not None:
            self._auto_tau.tau = found.tau
            if self.accelerator.is_main_process:
                logger.warning(found.note)

    def _auto_tau_pending(self) -> bool:
        """tau='auto' and not chosen yet (a resumed run first takes the value chosen before the interruption)."""
        if self.args.tau != "auto" or self._auto_tau.tau is not None:
            return False
        self._auto_tau.restore(self.state.stateful_callbacks)
        return self._auto_tau.tau is None

    def _tau(self) -> float:
        if self.args.tau != "auto":
            return self.args.tau
        # Before any step with a mixed group the loss is zero for every tau; the placeholder only fills the call.
        return self._auto_tau.tau if self._auto_tau.tau is not None else 1.0

    def _attach_credits(self, chunks: list[dict[str, Any]]) -> None:
        """Full-batch credits of one optimizer step, from scores at the current parameters on every process."""
        rows = self._step_scores(chunks)
        if self._auto_tau_pending():
            self._resolve_auto_tau(rows)
        keep = rows["keep"]
        gid = torch.where(keep, rows["group_ids"], -1 - torch.arange(keep.shape[0], device=keep.device))
        full = self._objective(rows["scores"], rows["correct"], gid, normalizer=None)
        n_local = sum(c["conspo_correct"].shape[0] for c in chunks)
        rank = self.accelerator.process_index
        credit = full.credit[rank * n_local : (rank + 1) * n_local]
        start = 0
        for chunk in chunks:
            size = chunk["conspo_correct"].shape[0]
            chunk["conspo_credit"] = credit[start : start + size]
            chunk["conspo_loss_value"] = full.loss.detach()
            start += size

    # ---------------------------------------------------------------- dynamic sampling (docs/objectives.md, 8a)

    def _select_mixed_groups(self, batch: dict[str, Any], generation_batch: list[dict]) -> dict[str, Any]:
        """Keep only mixed groups (a correct and an incorrect rollout), generating further rounds of prompts while
        some process has fewer than its configured number of groups (dynamic sampling), or none (drop).

        Every process ends with the same number of whole groups, a multiple of steps_per_generation so that every
        micro-batch is cut alike: the count is the smallest over processes. Extra prompts are drawn from the train
        set by a generator seeded with (seed, optimizer step, round, process), so a resumed run draws the same.
        """
        args: ConSPOConfig = self.args
        g = self.num_generations
        target = batch["conspo_correct"].shape[0] // g
        used: set[str] | None = None  # prompts of this generation batch on every process: not drawn again

        def more(round_: int) -> dict[str, Any]:
            nonlocal used
            if used is None:
                local = [repr(row["prompt"]) for row in generation_batch]
                used = set(gather_object(local) if self.accelerator.num_processes > 1 else local)
            seed = hash((args.seed, self.state.global_step, round_)) % (2**63)
            generator = torch.Generator().manual_seed(seed)
            prompts = batching.draw_prompts(self.train_dataset, target, g, used=used, generator=generator,
                                            world=self.accelerator.num_processes, rank=self.accelerator.process_index)
            return self._generate_and_score_completions(prompts)

        pieces, chosen, rounds = batching.collect_mixed_groups(
            batch, g, max_rounds=args.dynamic_sampling_max_rounds if args.dynamic_sampling else 0,
            fewest=lambda found: self._reduce_int(found, "min"), more=more)
        steps = args.steps_per_generation
        kept = min(self._reduce_int(len(chosen), "min"), target) // steps * steps
        generated = self._reduce_int(len(pieces) * target, "sum")
        world_kept = kept * self.accelerator.num_processes
        metrics = self._metrics["train"]
        metrics["conspo/dynamic_rounds"].append(float(rounds))
        metrics["conspo/groups_generated"].append(float(generated))
        metrics["conspo/groups_kept"].append(float(world_kept))
        metrics["conspo/kept_frac"].append(world_kept / max(1, generated))
        metrics["conspo/rollouts_generated"].append(float(generated * g))
        if kept == 0:
            # Nothing to train on: the step runs on the batch as generated (zero loss, zero gradient for every
            # objective here), and the no-signal counter warns when this repeats.
            return batch
        if kept < target and self.accelerator.is_main_process:
            why = (f"after {rounds} extra generation round(s) (dynamic_sampling_max_rounds="
                   f"{args.dynamic_sampling_max_rounds})" if args.dynamic_sampling else "(drop_degenerate_groups)")
            logger.warning("training on %d mixed group(s) per process instead of %d %s: the others were all correct "
                           "or all wrong%s.", kept, target, why,
                           "" if kept % steps == 0 and len(chosen) == kept else
                           f"; kept a multiple of steps_per_generation ({steps}), the same on every process")
        selected = batching.concat_groups([(pieces[i], k) for i, k in chosen[:kept]], g, self._tokenizer.pad_token_id)
        rank = self.accelerator.process_index
        selected["conspo_group_ids"] = rank * kept + torch.arange(kept * g, device=selected["conspo_group_ids"].device) // g
        if "num_items_in_batch" in batch:  # TRL's token count over the generation batch on all processes
            selected["num_items_in_batch"] = self.accelerator.gather(batching.loss_mask(selected).sum()).sum()
        return selected

    def _reduce_int(self, value: int, how: str) -> int:
        t = torch.tensor([value], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            op = torch.distributed.ReduceOp.MIN if how == "min" else torch.distributed.ReduceOp.SUM
            torch.distributed.all_reduce(t, op=op)
        return int(t.item())

    def _split_generation_batch(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Shuffle and cut the local generation batch into ``steps_per_generation`` micro-batches so that every
        optimizer step holds whole groups (docs/objectives.md, section 9), and attach to each micro-batch the group,
        rollout and token counts of its optimizer step over all processes.

        Groups (not rows) are shuffled whenever the generation batch feeds several optimizer steps or micro-batches
        must hold whole groups (``whole_groups``). With one optimizer step per generation batch under ``credit``,
        rows are shuffled as TRL does (groups may then straddle micro-batches and processes; the credits are exact).
        """
        if "pixel_values" in batch:
            raise NotImplementedError(f"objective={self.args.objective!r} does not support multimodal batches yet")
        args: ConSPOConfig = self.args
        steps, accumulation = args.steps_per_generation, args.gradient_accumulation_steps
        whole = args.group_batching == "whole_groups"
        order = batching.shuffle_order(batch["conspo_group_ids"], self.num_generations,
                                       by_groups=whole or steps > accumulation)
        chunks = batching.split_steps(batch, order, steps)
        # Counts per micro-batch, [groups counted by group_norm, rollouts, loss tokens], added over processes.
        counts = torch.stack([batching.chunk_counts(c, self.num_generations, group_norm=args.group_norm,
                                                    whole_groups=whole) for c in chunks])  # (steps, 3)
        counts = self.accelerator.gather(counts.unsqueeze(0)).view(-1, steps, 3).sum(0)
        window = batching.step_totals(counts, accumulation)  # per optimizer step
        for i, chunk in enumerate(chunks):
            groups, rollouts, tokens = window[i // accumulation]
            chunk["conspo_normalizer"] = groups
            chunk["conspo_num_rollouts"] = rollouts
            chunk["conspo_num_tokens"] = tokens
        return chunks

    def _objective(self, scores, correct, group_ids, *, normalizer) -> obj.LossOutput:
        args: ConSPOConfig = self.args
        if args.objective == "conspo":
            return obj.conspo_loss(scores, correct, group_ids, tau=self._tau(), margin=self._current_margin(),
                                   neg_reduce=args.neg_reduce, group_norm=args.group_norm, normalizer=normalizer)
        return obj.disco_loss(scores, correct, group_ids, tau=self._tau(), variant=args.disco_variant,
                              group_norm=args.group_norm, normalizer=normalizer)

    def _scores(self, logps, old_logps, mask, correct) -> torch.Tensor:
        """Each rollout's score: the length-normalised log-probability, or (score='clipped_ratio') the clipped
        ratio scores of the paper's Eq. 6. Without stored old log-probabilities the parameters are pi_old's."""
        if self.args.score == "logprob" or self.args.objective != "conspo":
            return obj.sequence_scores(logps, mask)
        old = logps.detach() if old_logps is None else old_logps
        high = self.args.epsilon_high if self.args.epsilon_high is not None else self.args.epsilon
        return obj.clipped_ratio_scores(logps, old, mask, correct, eps_low=self.args.epsilon, eps_high=high)

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
        return self._own_loss(model, inputs)

    def _own_loss(self, model, inputs):
        """ConSPO, DisCO or GMPO on one micro-batch, scaled so that the micro-batches of an optimizer step add up to
        the objective on the whole step (any accumulation, any number of processes)."""
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
        mask = batching.loss_mask(inputs) * keep.unsqueeze(1)

        # vLLM importance-sampling correction: weight each token's gradient by TRL's truncated ratio,
        # leaving the loss value (the true objective) unchanged.
        grad_logps = logps
        if "importance_sampling_ratio" in inputs:
            weight = inputs["importance_sampling_ratio"].detach()
            grad_logps = logps + (weight - 1.0) * (logps - logps.detach())
        old = inputs.get("old_per_token_logps")
        training = mode == "train"
        world = self.accelerator.num_processes if training else 1
        if args.objective == "gmpo":
            out = obj.gmpo_loss(grad_logps, logps.detach() if old is None else old, inputs["advantages"], mask,
                                eps_low=args.gmpo_epsilon_low, eps_high=args.gmpo_epsilon_high,
                                normalizer=inputs["conspo_num_rollouts"] if training else None)
            for name, value in out.metrics.items():
                self._metrics[mode][f"gmpo/{name}"].append(self.accelerator.gather(value.detach()).float().mean().item())
            return self._reference_kl(out.loss * world, inputs, logps, mask, mode, world, entropies)
        scores = self._scores(grad_logps, old, mask, inputs["conspo_correct"])

        # Dropped rows become singleton groups: degenerate, so they contribute nothing.
        gid = inputs["conspo_group_ids"]
        gid = torch.where(keep, gid, -1 - torch.arange(gid.shape[0], device=gid.device))
        if training and "conspo_credit" in inputs:
            # Decoupled credit: the surrogate's gradient is the full-batch loss's; its value is reported.
            surrogate = -(inputs["conspo_credit"] * scores).sum() * world
            share = 1.0 / self.current_gradient_accumulation_steps
            loss = surrogate - surrogate.detach() + inputs["conspo_loss_value"] * share
        else:
            normalizer = inputs["conspo_normalizer"] if training else None
            loss = self._objective(scores, inputs["conspo_correct"], gid, normalizer=normalizer).loss * world

        if args.trust_region and old is not None:
            region = obj.kl_trust_region(logps, old, mask, delta=args.trust_region_delta,
                                         beta=args.trust_region_beta)
            share = mask.sum() / inputs["conspo_num_tokens"].clamp(min=1) if training else 1.0
            loss = loss + region.penalty * share * world
            self._metrics[mode]["conspo/trust_region_kl"].append(self.accelerator.gather(region.kl).mean().item())

        return self._reference_kl(loss, inputs, logps, mask, mode, world, entropies)

    def _reference_kl(self, loss, inputs, logps, mask, mode, world, entropies=None):
        """TRL's reference-model KL (``beta``), added exactly as TRL adds it for GRPO; then the logged entropy."""
        training = mode == "train"
        keep = inputs["conspo_keep"]
        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref - logps) - (ref - logps) - 1
            seq_kl = (per_token_kl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
            rollouts = inputs["conspo_num_rollouts"].clamp(min=1) if training else keep.sum().clamp(min=1)
            loss = loss + self.beta * seq_kl.sum() / rollouts * world
            kl_stats = self.accelerator.reduce(torch.stack([(per_token_kl * mask).sum(), mask.sum()]), "sum")
            self._metrics[mode]["kl"].append((kl_stats[0] / kl_stats[1].clamp(min=1)).item())

        if entropies is not None:
            ent = self.accelerator.reduce(torch.stack([(entropies * mask).sum(), mask.sum()]).detach(), "sum")
            self._metrics[mode]["entropy"].append((ent[0] / ent[1].clamp(min=1)).item())
        if training:
            self._record_rows(inputs, logps.detach())
        return loss

    def _current_margin(self) -> float:
        """The margin of the current generation batch: read at the step it was generated (one batch, one margin)."""
        if self.args.objective != "conspo":
            return 0.0
        step = self._generation_step if self.model.training else self.state.global_step
        return self.args.margin(step, self.state.max_steps)

    # ---------------------------------------------------------------- diagnostics, once per optimizer step

    def _record_rows(self, inputs: dict[str, Any], logps: torch.Tensor) -> None:
        mask = batching.loss_mask(inputs)
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
        if self.args.objective in GROUP_COUPLED:
            metrics = self._objective(scores, correct, gid, normalizer=None).metrics
            if self.args.tau == "auto":
                metrics["tau"] = torch.tensor(self._tau() if self._auto_tau.tau is not None else float("nan"))
        else:
            metrics = obj.separation_metrics(scores, correct, gid)
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
