"""``ConSPOConfig``: TRL's ``GRPOConfig`` plus conspo's options, each checked at construction; and the TRL guard.

One job: say which settings a run of ``ConSPOTrainer`` accepts. Every field is validated in ``__post_init__`` with
an error that names it and the accepted values, a field the chosen ``objective`` never reads is refused
(``_refuse_without_effect``), and the TRL numbers the objectives depend on are range-checked before TRL's own checks.
``check_trl_internals`` refuses a TRL release outside the tested range, or one whose overridden methods changed
shape, before the trainer is built; ``keep_vllm_cpu_weights_plain`` readies colocated vLLM on a CPU for TRL's
weight sync (the one environment fix the trainer needs before TRL builds its engine). The trainer itself lives in ``conspo.trainer`` (which re-exports the config).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

from trl import GRPOConfig, GRPOTrainer

from conspo import checks
from conspo import fast_generation as fastgen
from conspo import objectives as obj

OBJECTIVES = ("conspo", "disco", "gmpo", "trl")
GROUP_COUPLED = ("conspo", "disco")  # objectives whose loss couples the rollouts of a group
TRUNCATED_POLICIES = ("negative", "drop")
GROUP_BATCHING = ("auto", "whole_groups", "credit")
SUPPORTED_TRL = ((1, 16), (1, 17))  # [low, high)

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
    max_rollouts: int | None = field(
        default=None,
        metadata={"help": "Stop training once this many rollouts (completions, over all processes) have been "
                  "generated, dynamic sampling's extra rounds included; max_steps still caps the run. For comparing "
                  "methods at one generation budget. Default: no budget."},
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
        budget = self.max_rollouts
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"max_rollouts must be a positive integer or unset, got {budget!r}")
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

    def stale_rollouts_warning(self) -> str | None:
        """What to warn about when a group-coupled objective without a trust region trains several optimizer steps
        on one generation batch (the later steps train on an older policy's rollouts, uncorrected); else None."""
        drift = self.steps_per_generation > self.gradient_accumulation_steps or self.num_iterations > 1
        if self.objective not in GROUP_COUPLED or not drift or self.trust_region:
            return None
        why = ("num_iterations > 1" if self.num_iterations > 1 else
               f"{self.steps_per_generation // self.gradient_accumulation_steps} optimizer steps per generation batch")
        return (f"objective={self.objective!r} without a trust region and {why}: the optimizer steps after the first of "
                "each generation batch train on rollouts of an older policy with no correction (the ConSPO paper "
                "mentions no constraint). Set trust_region=True for DisCO's KL penalty.")

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


def keep_vllm_cpu_weights_plain() -> None:
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
        logging.getLogger("conspo.trainer").warning("colocated vLLM on CPU: oneDNN weight packing turned off so that TRL's weight sync can load "
                       "the trainer's weights into vLLM")
