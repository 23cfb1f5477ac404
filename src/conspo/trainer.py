"""ConSPO, DisCO and GMPO on TRL's ``GRPOTrainer``, with exact group-coupled gradients.

TRL does generation (vLLM or transformers), rewards, accelerate/DeepSpeed, PEFT, logging and
checkpoints; this subclass only changes what its own objectives need (docs/objectives.md, section 9):

1. Each rollout's correctness (thresholded reward) and group id ride along in the generation batch
   (``conspo_correct``, ``conspo_group_ids``, ``conspo_keep``). A row with no token left in its loss mask is not
   kept: it leaves its group for the loss and every diagnostic, for every objective.
2. Every optimizer step holds whole groups. Two exact strategies, chosen by ``group_batching``:

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
     With several optimizer steps per generation batch, groups (not rows) are shuffled here too.

3. Losses are multiplied by the world size because DDP averages gradients over processes, so the
   micro-batch losses add up to exactly the objective on the full batch, for any gradient
   accumulation, any ``num_iterations`` and any number of processes. The logged loss is its value.
4. Dynamic sampling (``dynamic_sampling``) and ``drop_degenerate_groups`` select mixed groups after scoring, for
   every objective; the margin is read once per generation batch; ``tau="auto"`` is measured once and checkpointed.

The GRPO-family baselines run TRL's own loss (``objective="trl"``); this class only adds the shared
diagnostics (score gap, separation AUC) so every method can be plotted alike, and is bit-identical to
``GRPOTrainer`` for them unless dynamic sampling or dropping is asked for.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState
from trl import GRPOConfig, GRPOTrainer

from conspo import checks
from conspo import fast_generation as fastgen
from conspo import objectives as obj

logger = logging.getLogger("conspo.trainer")

OBJECTIVES = ("conspo", "disco", "gmpo", "trl")
GROUP_COUPLED = ("conspo", "disco")  # objectives whose loss couples the rollouts of a group
TRUNCATED_POLICIES = ("negative", "drop")
GROUP_BATCHING = ("auto", "whole_groups", "credit")
SUPPORTED_TRL = ((1, 16), (1, 17))  # [low, high)
NO_SIGNAL_WARN_STEPS = 10  # warn after this many consecutive optimizer steps without a mixed group

# GRPOConfig fields that only TRL's own loss reads. Under objective conspo/disco/gmpo they would change nothing, so a
# value other than TRL's default is refused (docs/objectives.md, section 9: never train silently on another objective than asked).
# Checked against TRL 1.16's GRPOConfig and GRPOTrainer._compute_loss.
TRL_LOSS_FIELDS = (
    "loss_type", "epsilon", "epsilon_high", "delta", "importance_sampling_level",
    "sapo_temperature_pos", "sapo_temperature_neg",
    "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg",
    "top_entropy_quantile", "off_policy_mask_threshold", "use_bias_correction_kl",
    "entropy_coef", "use_adaptive_entropy", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta",
    "entropy_target",
)
# Fields that shape TRL's advantages: read by TRL's losses and GMPO, not by ConSPO or DisCO (they use correctness).
ADVANTAGE_FIELDS = ("scale_rewards", "multi_objective_aggregation")
# conspo's own fields and the objectives under which each has an effect.
OWN_FIELD_OBJECTIVES = {
    "tau": ("conspo", "disco"), "tau_auto_factor": ("conspo",), "score": ("conspo",),
    "margin_schedule": ("conspo",), "margin_start": ("conspo",), "margin_max": ("conspo",),
    "margin_ramp_frac": ("conspo",), "margin_step_at": ("conspo",), "neg_reduce": ("conspo",),
    "group_norm": ("conspo", "disco"), "disco_variant": ("disco",), "trust_region": ("conspo", "disco"),
    "trust_region_delta": ("conspo", "disco"), "trust_region_beta": ("conspo", "disco"),
    "group_batching": ("conspo", "disco", "gmpo"),
    "gmpo_epsilon_low": ("gmpo",), "gmpo_epsilon_high": ("gmpo",),
}

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
    """TRL's ``GRPOConfig`` plus the ConSPO, DisCO and GMPO options (docs/objectives.md).

    Every GRPOConfig field keeps its meaning. ``beta`` (KL to a frozen reference model) and vLLM's
    importance-sampling correction apply to ConSPO and DisCO as they do to GRPO. Defaults follow the ConSPO paper
    (arXiv 2605.12969v3, section 5.1): tau 10, a cosine margin from 0 to 0.01 over the first 30% of training, no
    trust region. A field that has no effect under the chosen ``objective`` is refused when set to a non-default
    value.
    """

    objective: str = field(
        default="conspo",
        metadata={"help": "'conspo', 'disco', 'gmpo', or 'trl' (TRL's own loss_type: the GRPO-family baselines)."},
    )
    tau: float | str | None = field(
        default=None,
        metadata={"help": "Temperature of the contrast, in [1e-3, 1e3]. Default 10 (the ConSPO paper's; DisCO's paper "
                  "uses 10 too). 'auto' (conspo only, this project's calibration): the median within-group score sd "
                  "of the first optimizer step with a mixed group, times tau_auto_factor, then fixed for the run."},
    )
    tau_auto_factor: float = field(
        default=1.0, metadata={"help": "With tau='auto': the factor applied to the measured score spread (> 0)."}
    )
    score: str = field(
        default="logprob",
        metadata={"help": "ConSPO's rollout score: 'logprob' (length-normalised log-probability, the paper's) or "
                  "'clipped_ratio' (the clipped importance ratios of the paper's Eq. 6, its Table 6 ablation; "
                  "clipped at 1 - epsilon and 1 + epsilon_high, TRL's fields)."},
    )
    margin_schedule: str = field(
        default="cosine", metadata={"help": "ConSPO margin curriculum: cosine (the paper's), constant, linear or step."}
    )
    margin_start: float = field(default=0.0, metadata={"help": "Margin m0 at step 0 (>= 0)."})
    margin_max: float = field(
        default=0.01, metadata={"help": "Margin M reached at the end of the ramp (>= 0; the paper's 0.01; 0: no margin)."}
    )
    margin_ramp_frac: float = field(
        default=0.3, metadata={"help": "Fraction of the planned optimizer steps over which the margin ramps, (0, 1] "
                               "(the paper's alpha = 0.3)."}
    )
    margin_step_at: int | None = field(
        default=None, metadata={"help": "For margin_schedule='step': the optimizer step where m jumps to m_max."}
    )
    neg_reduce: str = field(default="sum", metadata={"help": "ConSPO negatives: 'sum' (InfoNCE) or 'mean'."})
    group_norm: str = field(
        default="valid", metadata={"help": "Average over 'valid' (mixed) groups or over 'all' groups of the batch."}
    )
    disco_variant: str = field(default="dro", metadata={"help": "DisCO objective: 'dro' or 'basic'."})
    trust_region: bool | None = field(
        default=None,
        metadata={"help": "DisCO's squared-hinge KL(pi_old || pi) penalty; active only when parameters drift from "
                  "pi_old within a generation batch. Default: on for disco (its paper), off for conspo (the ConSPO "
                  "paper mentions none)."},
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
    dynamic_sampling: bool = field(
        default=False,
        metadata={"help": "DAPO's dynamic sampling, for every objective: groups whose rollouts are all correct or all "
                  "wrong are set aside and further prompts are generated and scored until the generation batch holds "
                  "its configured number of mixed groups, or dynamic_sampling_max_rounds extra rounds are spent. "
                  "Costs extra generation (logged: conspo/rollouts_generated)."},
    )
    dynamic_sampling_max_rounds: int = field(
        default=4, metadata={"help": "With dynamic_sampling: the most extra generation rounds per generation batch."}
    )
    drop_degenerate_groups: bool = field(
        default=False,
        metadata={"help": "The paper's weaker form: degenerate groups leave the loss and its normaliser (and, for "
                  "TRL's losses, the token and sequence counts) without being replaced."},
    )
    gmpo_epsilon_low: float = field(
        default=0.4, metadata={"help": "GMPO: lower clip of the token log-ratio, in log space (> 0)."}
    )
    gmpo_epsilon_high: float = field(
        default=0.4, metadata={"help": "GMPO: upper clip of the token log-ratio, in log space (> 0)."}
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
        _check_trl_numbers(self)  # before TRL's own checks, which fail on some of these with less clear errors
        super().__post_init__()
        checks.choice("objective", self.objective, OBJECTIVES)
        checks.choice("group_batching", self.group_batching, GROUP_BATCHING)
        checks.choice("margin_schedule", self.margin_schedule, obj.MARGIN_SCHEDULES)
        checks.choice("neg_reduce", self.neg_reduce, obj.NEG_REDUCES)
        checks.choice("group_norm", self.group_norm, obj.GROUP_NORMS)
        checks.choice("disco_variant", self.disco_variant, obj.DISCO_VARIANTS)
        checks.choice("truncated", self.truncated, TRUNCATED_POLICIES)
        checks.choice("score", self.score, obj.SCORES)
        checks.choice("fast_generation", self.fast_generation, fastgen.MODES)
        compile_options = self.fast_generation_compile
        if compile_options is not None and (not isinstance(compile_options, dict)
                                            or not set(compile_options) <= set(fastgen.COMPILE_KEYS)):
            raise ValueError(f"fast_generation_compile must be a dict with keys among {', '.join(fastgen.COMPILE_KEYS)}; "
                             f"got {compile_options!r}")
        _refuse_without_effect(self)
        if isinstance(self.tau, str) and self.tau != "auto":  # from a command line or YAML: "0.3", "1e-2"
            try:
                self.tau = float(self.tau)
            except ValueError:
                raise ValueError(f"tau must be a number in [{obj.TAU_MIN:g}, {obj.TAU_MAX:g}] or 'auto', got "
                                 f"{self.tau!r}") from None
        if self.tau is None and self.objective in GROUP_COUPLED:
            self.tau = 10.0
        if self.tau is None:
            pass  # not read by this objective
        elif self.tau == "auto":
            if self.objective != "conspo":
                raise ValueError(f"tau='auto' calibrates ConSPO's temperature; objective={self.objective!r} takes a "
                                 f"number (in [{obj.TAU_MIN:g}, {obj.TAU_MAX:g}])")
        else:
            self.tau = obj.check_tau(self.tau)
        checks.positive("tau_auto_factor", self.tau_auto_factor)
        if self.trust_region is None and self.objective in GROUP_COUPLED:
            self.trust_region = self.objective == "disco"
        if self.trust_region is not None and not isinstance(self.trust_region, bool):
            raise ValueError(f"trust_region must be true, false or unset (None: on for disco, off otherwise), "
                             f"got {self.trust_region!r}")
        checks.positive("trust_region_delta", self.trust_region_delta)
        checks.positive("trust_region_beta", self.trust_region_beta)
        checks.positive("gmpo_epsilon_low", self.gmpo_epsilon_low)
        checks.positive("gmpo_epsilon_high", self.gmpo_epsilon_high)
        rounds = self.dynamic_sampling_max_rounds
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"dynamic_sampling_max_rounds must be an integer >= 1, got {rounds!r}")
        if not self.dynamic_sampling and rounds != 4:
            raise ValueError("dynamic_sampling_max_rounds has no effect without dynamic_sampling=True")
        if self.dynamic_sampling and self.drop_degenerate_groups:
            raise ValueError("drop_degenerate_groups=True has no effect with dynamic_sampling=True, which already sets "
                             "degenerate groups aside (and replaces them); set one of the two")
        if self.dynamic_sampling or (self.drop_degenerate_groups and self.objective in ("trl",)):
            local = self.per_device_train_batch_size * self.steps_per_generation
            if local % self.num_generations != 0:
                raise ValueError(
                    f"{'dynamic_sampling' if self.dynamic_sampling else 'drop_degenerate_groups'} selects whole groups "
                    f"on each process: the local generation batch, per_device_train_batch_size x steps_per_generation "
                    f"= {local}, must be a multiple of num_generations ({self.num_generations})")
        if self.score == "clipped_ratio" and not 0 < self.epsilon < 1:
            raise ValueError(f"score='clipped_ratio' clips negatives' ratios at 1 - epsilon: epsilon must be in (0, 1), "
                             f"got {self.epsilon!r}")
        step = self.dump_batch_step
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
            raise ValueError(f"dump_batch_step must be None or an optimizer step >= 1 (1-based), got {step!r}")
        checks.finite("correct_threshold", self.correct_threshold)
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
        accumulation = self.gradient_accumulation_steps
        if self.steps_per_generation % accumulation != 0:
            raise ValueError(
                f"objective={self.objective!r} needs each optimizer step to see whole generation batches or a whole "
                f"fraction of one: steps_per_generation ({self.steps_per_generation}) must be a multiple of "
                f"gradient_accumulation_steps ({accumulation}); leave steps_per_generation and "
                f"generation_batch_size unset to get TRL's default (equal)."
            )
        share = self.per_device_train_batch_size * accumulation
        if self.steps_per_generation > accumulation and share % g != 0:
            raise ValueError(
                f"objective={self.objective!r} with several optimizer steps per generation batch (steps_per_generation "
                f"{self.steps_per_generation} > gradient_accumulation_steps {accumulation}) gives every optimizer step "
                f"whole groups, so each process's share of one optimizer step, per_device_train_batch_size x "
                f"gradient_accumulation_steps = {share}, must be a multiple of num_generations ({g}); or use one "
                f"optimizer step per generation batch (steps_per_generation = gradient_accumulation_steps)."
            )

    def margin(self, step: int, total_steps: int) -> float:
        """The margin at optimizer step ``step`` of ``total_steps`` (docs/objectives.md, section 5)."""
        return obj.margin_at(step, max(1, total_steps), schedule=self.margin_schedule, m0=self.margin_start,
                             m_max=self.margin_max, ramp_frac=self.margin_ramp_frac, step_at=self.margin_step_at)


def _grpo_default(name: str) -> Any:
    spec = GRPOConfig.__dataclass_fields__[name]
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default


def _refuse_without_effect(config: ConSPOConfig) -> None:
    """Refuse every field set to a non-default value that the chosen objective never reads."""
    objective = config.objective
    idle: list[str] = []
    if objective != "trl":
        for name in TRL_LOSS_FIELDS:
            if name in ("epsilon", "epsilon_high") and objective == "conspo" and config.score == "clipped_ratio":
                continue  # the clipped-ratio scores are clipped at 1 - epsilon and 1 + epsilon_high
            if getattr(config, name) != _grpo_default(name):
                idle.append(f"{name}={getattr(config, name)!r} (read only by TRL's loss, objective='trl')")
    if objective in GROUP_COUPLED:
        for name in ADVANTAGE_FIELDS:
            if getattr(config, name) != _grpo_default(name):
                idle.append(f"{name}={getattr(config, name)!r} (shapes TRL's advantages; {objective} uses correctness)")
    own_defaults = {f.name: f.default for f in dataclasses.fields(ConSPOConfig) if f.name in OWN_FIELD_OBJECTIVES}
    for name, objectives in OWN_FIELD_OBJECTIVES.items():
        if objective not in objectives and getattr(config, name) != own_defaults[name]:
            idle.append(f"{name}={getattr(config, name)!r} (read only under objective "
                        f"{' or '.join(map(repr, objectives))})")
    if objective == "disco" and config.tau == "auto":
        idle.append("tau='auto' (a calibration of ConSPO's temperature)")
    if idle:
        raise ValueError(f"objective={objective!r} would ignore these settings, so they are refused: "
                         f"{'; '.join(idle)}. Remove them, or choose the objective that reads them.")


def _check_trl_numbers(config: ConSPOConfig) -> None:
    """The TRL fields the objectives depend on, checked with the field and the accepted range in the message."""
    checks.in_range("learning_rate", config.learning_rate, 0)
    checks.in_range("beta", config.beta, 0)
    checks.in_range("temperature", config.temperature, 0, low_open=True)
    checks.in_range("top_p", config.top_p, 0, 1, low_open=True)
    checks.in_range("max_completion_length", config.max_completion_length, 1, integer=True)
    checks.in_range("num_generations", config.num_generations, 2, integer=True)
    checks.in_range("num_iterations", config.num_iterations, 1, integer=True)
    checks.in_range("epsilon", config.epsilon, 0)
    if config.epsilon_high is not None:
        checks.in_range("epsilon_high", config.epsilon_high, 0)


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
        if config.use_vllm and config.vllm_mode == "colocate" and not torch.cuda.is_available():
            _plain_vllm_cpu_weights()
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
        self._auto_tau = _AutoTau()
        self.add_callback(self._auto_tau)
        drift = config.steps_per_generation > config.gradient_accumulation_steps or config.num_iterations > 1
        if config.objective in GROUP_COUPLED and drift and not config.trust_region:
            logger.warning(
                "objective=%r without a trust region and %s: the optimizer steps after the first of each generation "
                "batch train on rollouts of an older policy with no correction (the ConSPO paper mentions no "
                "constraint). Set trust_region=True for DisCO's KL penalty.", config.objective,
                "num_iterations > 1" if config.num_iterations > 1 else
                f"{config.steps_per_generation // config.gradient_accumulation_steps} optimizer steps per generation batch")

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
        # A row with no token left in its loss mask (TRL's mask_truncated_completions, tool masks) has no score: it
        # leaves its group for the loss and every diagnostic, for every objective (docs/objectives.md, section 6).
        keep = keep & (_loss_mask(out).sum(1) > 0)
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
                batch["conspo_keep"] = batch["conspo_keep"] & _mixed_rows(batch, self.num_generations)
            if args.objective == "trl":
                self._buffered_inputs = _trl_split(batch, steps)
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
            mask = _loss_mask(chunk) * chunk["conspo_keep"].unsqueeze(1)
            scores.append(self._scores(logps, chunk.get("old_per_token_logps"), mask, chunk["conspo_correct"]))
        local = {
            "scores": torch.cat(scores),
            "correct": torch.cat([c["conspo_correct"] for c in chunks]),
            "group_ids": torch.cat([c["conspo_group_ids"] for c in chunks]),
            "keep": torch.cat([c["conspo_keep"] for c in chunks]),
        }
        return {k: self.accelerator.gather(v) for k, v in local.items()}

    def _resolve_auto_tau(self, rows: dict[str, torch.Tensor]) -> None:
        """tau='auto': the median within-group score sd of the first optimizer step that holds a mixed group, times
        tau_auto_factor, clamped to the accepted range; fixed for the rest of the run (and across a resume)."""
        keep = rows["keep"]
        metrics = obj.separation_metrics(rows["scores"][keep], rows["correct"][keep], rows["group_ids"][keep])
        if float(metrics["valid_frac"]) == 0:
            return  # no mixed group: this step's loss is zero whatever tau is; try again at the next step
        spread = float(metrics["score_sd"]) * self.args.tau_auto_factor
        tau = min(max(spread, obj.TAU_MIN), obj.TAU_MAX)
        self._auto_tau.tau = tau
        if self.accelerator.is_main_process:
            logger.warning("tau='auto': tau = %.6g (median within-group score sd %.6g x tau_auto_factor %g%s), fixed "
                           "for the rest of the run", tau, float(metrics["score_sd"]), self.args.tau_auto_factor,
                           "" if tau == spread else f", clamped to [{obj.TAU_MIN:g}, {obj.TAU_MAX:g}]")

    def _auto_tau_pending(self) -> bool:
        """tau='auto' and not chosen yet (a resumed run first takes the value chosen before the interruption)."""
        if self.args.tau != "auto" or self._auto_tau.tau is not None:
            return False
        stored = self.state.stateful_callbacks.get(_AutoTau.__name__)
        if isinstance(stored, dict) and stored.get("attributes", {}).get("tau") is not None:
            self._auto_tau.tau = float(stored["attributes"]["tau"])
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
        pieces = [batch]
        chosen = [(0, k) for k in _mixed_groups(batch, g)]
        rounds = 0
        used: set[str] | None = None  # prompts of this generation batch on every process: not drawn again
        while args.dynamic_sampling and rounds < args.dynamic_sampling_max_rounds:
            fewest = self._reduce_int(len(chosen), "min")
            if fewest >= target:
                break
            if used is None:
                local = [repr(row["prompt"]) for row in generation_batch]
                used = set(gather_object(local) if self.accelerator.num_processes > 1 else local)
            rounds += 1
            extra = self._generate_and_score_completions(self._draw_prompts(target, rounds, used))
            pieces.append(extra)
            chosen += [(len(pieces) - 1, k) for k in _mixed_groups(extra, g)]
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
        selected = _concat_groups([(pieces[i], k) for i, k in chosen[:kept]], g, self._tokenizer.pad_token_id)
        rank = self.accelerator.process_index
        selected["conspo_group_ids"] = rank * kept + torch.arange(kept * g, device=selected["conspo_group_ids"].device) // g
        if "num_items_in_batch" in batch:  # TRL's token count over the generation batch on all processes
            selected["num_items_in_batch"] = self.accelerator.gather(_loss_mask(selected).sum()).sum()
        return selected

    def _reduce_int(self, value: int, how: str) -> int:
        t = torch.tensor([value], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            op = torch.distributed.ReduceOp.MIN if how == "min" else torch.distributed.ReduceOp.SUM
            torch.distributed.all_reduce(t, op=op)
        return int(t.item())

    def _draw_prompts(self, count: int, round_: int, used: set[str]) -> list[dict]:
        """``count`` train prompts for this process, each repeated num_generations times as TRL's sampler lays them
        out. All processes walk one permutation seeded by (seed, optimizer step, round), skip the prompts already in
        the generation batch (``used``, updated) and take consecutive slices, so no prompt appears twice in a
        generation batch while the train set has enough of them, and a resumed run draws the same prompts."""
        dataset = self.train_dataset
        generator = torch.Generator().manual_seed(hash((self.args.seed, self.state.global_step, round_)) % (2**63))
        wanted = count * self.accelerator.num_processes
        picked: list[int] = []
        for i in torch.randperm(len(dataset), generator=generator).tolist():
            key = repr(dataset[i]["prompt"])
            if key not in used:
                used.add(key)
                picked.append(i)
                if len(picked) == wanted:
                    break
        while len(picked) < wanted:  # a train set smaller than the batch: repeat prompts rather than stall
            picked.append(picked[len(picked) % max(1, len(picked))] if picked else 0)
        rank = self.accelerator.process_index
        rows = [dataset[i] for i in picked[rank * count : (rank + 1) * count]]
        return [row for row in rows for _ in range(self.num_generations)]

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
        g = self.num_generations
        gid = batch["conspo_group_ids"]
        n = gid.shape[0]
        steps, accumulation = args.steps_per_generation, args.gradient_accumulation_steps
        if args.group_batching == "whole_groups" or steps > accumulation:
            if n % g != 0 or not torch.equal(gid.view(-1, g), gid.view(-1, g)[:, :1].expand(-1, g)):
                raise RuntimeError(
                    f"the local generation batch ({n} rollouts) does not hold whole groups of num_generations={g}; "
                    f"set per_device_train_batch_size to a multiple of num_generations"
                )
            order = (torch.randperm(n // g, device=gid.device)[:, None] * g
                     + torch.arange(g, device=gid.device)).flatten()
        else:
            order = torch.randperm(n)  # TRL's own shuffle, drawn from the same generator
        batch = {k: _take(v, order, n) for k, v in batch.items()}

        size = n // steps
        chunks = [{k: _slice(v, i * size, (i + 1) * size, n) for k, v in batch.items()} for i in range(steps)]

        # Counts per micro-batch: [groups counted by group_norm, rollouts, loss tokens].
        counts = torch.stack([self._chunk_counts(c) for c in chunks])  # (steps, 3)
        counts = self.accelerator.gather(counts.unsqueeze(0)).view(-1, steps, 3).sum(0)  # over processes
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
        mask = _loss_mask(inputs) * keep.unsqueeze(1)

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


class _AutoTau(TrainerCallback, ExportableState):
    """Carries the temperature chosen by ``tau='auto'`` in every checkpoint's trainer_state.json, so that a resumed
    run goes on with the same tau instead of measuring a new one."""

    def __init__(self, tau: float | None = None) -> None:
        self.tau = tau

    def state(self) -> dict:
        return {"args": {}, "attributes": {"tau": self.tau}}


def _mixed_groups(batch: dict[str, Any], g: int) -> list[int]:
    """Indices of the local groups (contiguous runs of g rows, as TRL's sampler lays them out) that hold a kept
    correct and a kept incorrect rollout."""
    keep = batch["conspo_keep"].view(-1, g)
    correct = batch["conspo_correct"].view(-1, g)
    mixed = (correct & keep).any(1) & (~correct & keep).any(1)
    return mixed.nonzero().flatten().tolist()


def _mixed_rows(batch: dict[str, Any], g: int) -> torch.Tensor:
    """(B,) bool: the row belongs to a mixed group (whole groups of g contiguous rows)."""
    keep = batch["conspo_keep"].view(-1, g)
    correct = batch["conspo_correct"].view(-1, g)
    mixed = (correct & keep).any(1) & (~correct & keep).any(1)
    return mixed.repeat_interleave(g)


# Per-token tensors are right-padded like completions; prompt tensors left-padded. Values used for padding.
_LEFT_PADDED = {"prompt_ids": "pad", "prompt_mask": 0}


def _concat_groups(parts: list[tuple[dict[str, Any], int]], g: int, pad_id: int) -> dict[str, Any]:
    """The rows of the chosen groups (batch, local group index) from batches generated in different rounds, padded
    to common widths: prompts on the left, completions and per-token values on the right."""
    first = parts[0][0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        n = first["conspo_correct"].shape[0]
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n:
            rows = [b[key][k * g : (k + 1) * g] for b, k in parts]
            if value.dim() == 1:
                out[key] = torch.cat(rows)
                continue
            width = max(r.shape[1] for r in rows)
            left = key in _LEFT_PADDED
            fill = pad_id if ("_ids" in key and key != "conspo_group_ids") else 0
            padded = []
            for r in rows:
                extra = width - r.shape[1]
                pad = torch.full((r.shape[0], extra, *r.shape[2:]), fill, dtype=r.dtype, device=r.device)
                padded.append(torch.cat([pad, r] if left else [r, pad], dim=1))
            out[key] = torch.cat(padded)
        elif isinstance(value, list) and len(value) == n:
            out[key] = [b[key][i] for b, k in parts for i in range(k * g, (k + 1) * g)]
        else:
            out[key] = value
    return out


def _trl_split(batch: dict[str, Any], steps: int) -> list[dict[str, Any]]:
    """TRL's own shuffle and split of a generation batch (GRPOTrainer._prepare_inputs), for TRL's losses."""
    from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

    return split_tensor_dict(shuffle_sequence_dict(batch), steps)


def _plain_vllm_cpu_weights() -> None:
    """Colocated vLLM on a CPU (the ``vllm-cpu`` build): keep the linear weights plain.

    vLLM's CPU backend repacks linear weights for oneDNN and drops the Parameters that TRL's weight sync writes to
    (``'Parameter' object has no attribute 'weight_loader'`` at the first sync). Turning the packing off before the
    engine is built keeps them, and the sync then reaches vLLM (tests/test_vllm.py). A no-op without vLLM."""
    try:
        from vllm import _custom_ops
    except ImportError:
        return
    if getattr(_custom_ops, "_supports_onednn", False):
        _custom_ops._supports_onednn = False
        logger.warning("colocated vLLM on CPU: oneDNN weight packing turned off so that TRL's weight sync can load "
                       "the trainer's weights into vLLM")
