"""The options of verl's loss_mode ``conspo`` and ``disco`` (``actor_rollout_ref.actor.policy_loss.{conspo,disco}``).

One job: turn a section of verl's config into typed, validated options. Names and defaults are those of the TRL
trainer's ``ConSPOConfig`` (docs/objectives.md); this plug-in's former names (``m0``, ``m_max``, ``ramp_frac``,
``step_at``, ``tr_delta``, ``tr_beta``, ``variant``) are deprecated aliases, translated with a FutureWarning. An
option that has no effect under the chosen settings, or that only the TRL trainer has, is refused with a message
naming it and where its equivalent is. Imports no verl: ``conspo.verl_plugin`` wires these into verl's config.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from conspo import checks
from conspo.objectives import DISCO_VARIANTS, MARGIN_SCHEDULES, NEG_REDUCES, TAU_MAX, TAU_MIN, check_tau, margin_at

__all__ = ["ConSPOOptions", "DiscoOptions", "METHOD_OPTIONS", "parse_options", "section", "is_empty", "field_defaults"]


def _tau(prefix: str, value: Any) -> float:
    if value == "auto":
        raise ValueError(
            f"{prefix}.tau='auto' (calibrated from the first step's score spread) is available in the TRL trainer "
            f"only; under verl give a number in [{TAU_MIN:g}, {TAU_MAX:g}] (the paper's: 10)"
        )
    try:
        return check_tau(value)
    except ValueError as exc:
        raise ValueError(f"{prefix}.{exc}") from None


def _group_norm(prefix: str, value: Any) -> str:
    if value != "all":
        raise ValueError(
            f"{prefix}.group_norm={value!r}: under verl only 'all' is exact (mean over the groups of each global "
            "mini-batch); a micro-batch cannot know how many groups of its mini-batch are valid. "
            "With algorithm.filter_groups every group is valid and 'all' equals 'valid'."
        )
    return value


def _trust_region(prefix: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{prefix}.trust_region must be true, false or unset (default: {default}), got {value!r}")
    return value


def field_defaults(cls: type) -> dict[str, Any]:
    """Each field of a dataclass and its default."""
    return {f.name: f.default for f in fields(cls)}


def _refuse_idle(prefix: str, options: Any, idle: dict[str, str]) -> None:
    """Refuse the options in ``idle`` (name -> why it is not read) that differ from their default."""
    default = field_defaults(type(options))
    set_idle = [f"{prefix}.{name}={getattr(options, name)!r} ({why})" for name, why in idle.items()
                if getattr(options, name) != default[name]]  # fmt: skip
    if set_idle:
        raise ValueError(
            f"{prefix}: these options would have no effect, so they are refused: {'; '.join(set_idle)}. "
            "Remove them, or choose the setting that reads them."
        )


@dataclass(frozen=True)
class ConSPOOptions:
    """``policy_loss.conspo``: ConSPO's options, named and defaulted as the TRL trainer's ``ConSPOConfig``.

    Defaults follow the ConSPO paper (arXiv 2605.12969v3, section 5.1): tau 10, a cosine margin from 0 to
    0.01 over the first 30% of training, no trust region (docs/objectives.md).
    """

    tau: float = 10.0
    """InfoNCE temperature, in [TAU_MIN, TAU_MAX] = [1e-3, 1e3]."""
    margin_schedule: str = "cosine"
    """Margin curriculum: cosine (the paper's), constant, linear or step (docs/objectives.md, section 5)."""
    margin_start: float = 0.0
    """Margin m0 at the first training step, >= 0 (not read by schedule constant)."""
    margin_max: float = 0.01
    """Margin M at the end of the ramp, >= 0 (the paper's 0.01; 0: no margin)."""
    margin_ramp_frac: float = 0.3
    """Fraction of total_steps over which the margin ramps, in (0, 1] (linear and cosine; the paper's 0.3)."""
    margin_step_at: int | None = None
    """Schedule step only: the training step from which the margin is margin_max."""
    total_steps: int | None = None
    """verl's trainer.total_training_steps (generation batches); required by linear and cosine ramps."""
    neg_reduce: str = "sum"
    """How the negatives enter the InfoNCE denominator: sum (standard) or mean."""
    group_norm: str = "all"
    """Only 'all' under verl: each mini-batch's loss is the mean over its groups (the TRL trainer's default is
    'valid')."""
    trust_region: bool | None = None
    """DisCO's squared-hinge KL penalty; unset means off (the ConSPO paper has none)."""
    trust_region_delta: float = 1e-4
    """Trust-region KL budget delta, > 0 (read only with trust_region=True)."""
    trust_region_beta: float = 1e3
    """Trust-region hinge weight beta, > 0 (read only with trust_region=True)."""

    aliases: ClassVar[dict[str, str]] = {
        "m0": "margin_start", "m_max": "margin_max", "ramp_frac": "margin_ramp_frac", "step_at": "margin_step_at",
        "tr_delta": "trust_region_delta", "tr_beta": "trust_region_beta",
    }  # fmt: skip
    """Deprecated option names (this plug-in's before it took the TRL trainer's) and their replacements."""

    def __post_init__(self) -> None:
        p = "policy_loss.conspo"
        object.__setattr__(self, "tau", _tau(p, self.tau))
        checks.choice(f"{p}.margin_schedule", self.margin_schedule, MARGIN_SCHEDULES)
        checks.choice(f"{p}.neg_reduce", self.neg_reduce, NEG_REDUCES)
        _group_norm(p, self.group_norm)
        object.__setattr__(self, "trust_region", _trust_region(p, self.trust_region, False))
        checks.at_least(f"{p}.trust_region_delta", self.trust_region_delta, 0, inclusive=False)
        checks.at_least(f"{p}.trust_region_beta", self.trust_region_beta, 0, inclusive=False)
        schedule = self.margin_schedule
        idle = {}
        if schedule == "constant":
            idle["margin_start"] = "margin_schedule constant uses margin_max from the first step"
        if schedule not in ("linear", "cosine"):
            idle["margin_ramp_frac"] = idle["total_steps"] = f"margin_schedule {schedule} has no ramp"
        if schedule != "step":
            idle["margin_step_at"] = "read only by margin_schedule step"
        if not self.trust_region:
            idle["trust_region_delta"] = idle["trust_region_beta"] = "the trust region is off: set trust_region=True"
        _refuse_idle(p, self, idle)
        checks.at_least(f"{p}.margin_start", self.margin_start, 0, inclusive=True)
        checks.at_least(f"{p}.margin_max", self.margin_max, 0, inclusive=True)
        frac = self.margin_ramp_frac
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
            raise ValueError(f"{p}.margin_ramp_frac must be in (0, 1], got {frac!r}")
        at = self.margin_step_at
        if schedule == "step" and (isinstance(at, bool) or not isinstance(at, int) or at < 0):
            raise ValueError(f"{p}.margin_step_at must be an integer >= 0 (a training step) for margin_schedule "
                             f"'step', got {at!r}")  # fmt: skip
        total = self.total_steps
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
            raise ValueError(f"{p}.total_steps must be an integer >= 1 (trainer.total_training_steps), got {total!r}")
        if schedule in ("linear", "cosine") and self.margin_start != self.margin_max and total is None:
            raise ValueError(
                f"{p}.total_steps must be an integer >= 1 for margin_schedule={schedule!r}, got None; set it to "
                "trainer.total_training_steps (or use margin_schedule=constant)"
            )
        self.margin(0)

    def margin(self, step: int) -> float:
        """m(t) for the generation batch of training step ``step`` (0 for verl's first step)."""
        return margin_at(
            step,
            self.total_steps or 1,
            schedule=self.margin_schedule,
            m0=self.margin_start,
            m_max=self.margin_max,
            ramp_frac=self.margin_ramp_frac,
            step_at=self.margin_step_at,
        )


@dataclass(frozen=True)
class DiscoOptions:
    """``policy_loss.disco``: DisCO's options, named and defaulted as the TRL trainer's ``ConSPOConfig``."""

    tau: float = 10.0
    """Temperature of the DRO log-sum-exp over negatives, in [1e-3, 1e3] (DisCO's paper: 10); not read by basic."""
    disco_variant: str = "dro"
    """dro (default) or basic (mean of positives minus mean of negatives)."""
    group_norm: str = "all"
    """Only 'all' under verl (DisCO's code does the same)."""
    trust_region: bool | None = None
    """DisCO's squared-hinge KL penalty; unset means on (DisCO's paper)."""
    trust_region_delta: float = 1e-4
    """Trust-region KL budget delta, > 0."""
    trust_region_beta: float = 1e3
    """Trust-region hinge weight beta, > 0."""

    aliases: ClassVar[dict[str, str]] = {
        "variant": "disco_variant", "tr_delta": "trust_region_delta", "tr_beta": "trust_region_beta",
    }  # fmt: skip
    """Deprecated option names and their replacements."""

    def __post_init__(self) -> None:
        p = "policy_loss.disco"
        object.__setattr__(self, "tau", _tau(p, self.tau))
        checks.choice(f"{p}.disco_variant", self.disco_variant, DISCO_VARIANTS)
        _group_norm(p, self.group_norm)
        object.__setattr__(self, "trust_region", _trust_region(p, self.trust_region, True))
        checks.at_least(f"{p}.trust_region_delta", self.trust_region_delta, 0, inclusive=False)
        checks.at_least(f"{p}.trust_region_beta", self.trust_region_beta, 0, inclusive=False)
        idle = {}
        if self.disco_variant == "basic":
            idle["tau"] = "disco_variant basic has no temperature"
        if not self.trust_region:
            idle["trust_region_delta"] = idle["trust_region_beta"] = "the trust region is off: set trust_region=True"
        _refuse_idle(p, self, idle)


# TRL-trainer options with no verl counterpart here, and where verl users find the equivalent.
_NOT_UNDER_VERL = {
    "score": "score='clipped_ratio' (the paper's Table 6 ablation) is available in the TRL trainer only; under verl "
    "the score is the length-normalised log-probability",
    "tau_auto_factor": "tau='auto' is available in the TRL trainer only",
    "correct_threshold": "under verl it is +algorithm.conspo.correct_threshold (the estimator decides correctness)",
    "correctness_reward": "under verl a rollout's reward is the sum of verl's token-level rewards",
    "truncated": "under verl a truncated completion is judged by its reward like any other",
    "group_batching": "under verl whole groups come from trainer.v1.trainer_mode=conspo and the micro-batch settings",
    "gmpo_epsilon_low": "GMPO under verl is verl's loss_mode=geo_mean with actor_rollout_ref.actor.clip_ratio_low",
    "gmpo_epsilon_high": "GMPO under verl is verl's loss_mode=geo_mean with actor_rollout_ref.actor.clip_ratio_high",
}
METHOD_OPTIONS = {"conspo": ConSPOOptions, "disco": DiscoOptions}


def parse_options(cls: type, given: Any, where: str) -> Any:
    """The typed options of one ``policy_loss.<method>`` section (a mapping), deprecated names translated."""
    if given is None:
        return cls()
    if isinstance(given, cls):
        return given
    if not isinstance(given, Mapping):
        raise ValueError(f"{where} must be a mapping of options, got {type(given).__name__}")
    values = dict(given)
    for old, new in cls.aliases.items():
        if old not in values:
            continue
        if new in values:
            raise ValueError(f"{where} sets both {new} and its deprecated alias {old}; keep {new}")
        warnings.warn(
            f"{where}.{old} is deprecated, use {where}.{new} (the TRL trainer's name); the old name will be removed",
            FutureWarning,
            stacklevel=3,
        )
        values[new] = values.pop(old)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        why = []
        for name in unknown:
            if name in _NOT_UNDER_VERL:
                why.append(f"{name}: {_NOT_UNDER_VERL[name]}")
            for method, other in METHOD_OPTIONS.items():
                if other is not cls and (name in {f.name for f in fields(other)} or name in other.aliases):
                    why.append(f"{name}: read only by loss_mode {method} (policy_loss.{method}.{name})")
        raise ValueError(
            f"{where} has unknown option(s) {unknown}; accepted: {sorted(known)}"
            + (f" ({'; '.join(why)})" if why else "")
        )
    return cls(**values)


def section(config: Any, key: str) -> Any:
    """``config[key]`` of a verl config node, a mapping or an object (None when absent)."""
    return config.get(key, None) if config is not None and hasattr(config, "get") else getattr(config, key, None)


def is_empty(given: Any) -> bool:
    """Nothing set: None or an empty mapping."""
    return given is None or (isinstance(given, Mapping) and len(given) == 0)
