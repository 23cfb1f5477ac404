"""ConSPO and DisCO as verl policy losses (verl 0.9.1); the only conspo module that imports verl.

How verl finds it: ``pip install conspo`` declares the entry point ``conspo = "conspo.verl_plugin"`` in
the group ``verl.plugins``, which ``import verl`` loads in every process (driver, Ray workers).
``VERL_USE_EXTERNAL_MODULES=conspo.verl_plugin`` does the same for releases without entry points.
verl logs a failing entry point only at DEBUG level, so this module logs its own failure as an ERROR
before re-raising.

What it registers:

* policy losses ``conspo`` and ``disco`` (``actor_rollout_ref.actor.policy_loss.loss_mode``);
* advantage estimators ``conspo`` and ``disco`` (``algorithm.adv_estimator``, the same function): verl
  hands a policy loss per-token tensors of one micro-batch, never rewards or prompt ids, so the
  estimator writes into ``advantages`` a *group code* per rollout: its verdict, its group, the group's
  size and the training step (layout in :func:`encode_group_codes`);
* the v1 trainer mode ``conspo`` (``trainer.v1.trainer_mode=conspo``): verl's sync trainer, except that
  it balances *whole groups* across data-parallel ranks (verl's own balancing splits groups), tells the
  estimator the training step, which drives the margin curriculum, and checks the settings below on the
  driver before any worker starts.

Options (``policy_loss.conspo`` / ``policy_loss.disco``) carry the names and defaults of the TRL trainer's
``ConSPOConfig`` (the paper's: tau 10, cosine margin from 0 to 0.01 over the first 30% of training, trust
region off for ConSPO and on for DisCO); this plug-in's former names (``m0``, ``m_max``, ``ramp_frac``,
``step_at``, ``tr_delta``, ``tr_beta``, ``variant``) are deprecated aliases. A setting that has no effect under
the chosen loss is refused with a message naming it.

The margin is read once per generation batch: in verl one training step is one generation batch, the
estimator writes the step (verl's global step minus one) into every rollout's code, and every loss call of
that batch (all micro-batches, mini-batches and PPO epochs) reads m(step) of ``total_steps`` training steps.

A rollout with no token in its loss mask takes no part: it leaves its group for the loss and every metric,
as in the TRL trainer (docs/objectives.md, section 6).

Exactness (docs/objectives.md, section 9, "whole groups per micro-batch"): every loss call decodes the
groups it holds, raises if one is incomplete or comes from another generation batch, and evaluates the
objective of ``conspo.objectives`` on them at the current parameters. Dividing by the number of groups in
verl's global mini-batch (``global_batch_size / rollout.n``) and multiplying by ``dp_size`` (verl averages
gradients over ranks) makes the summed gradient that of the full mini-batch loss, for any micro-batch split,
at every optimizer step, ppo_epochs > 1 included. Documented departures (docs/verl.md):

* groups are averaged over *all* groups of the mini-batch (``group_norm="all"``, the DisCO code's choice):
  the number of *valid* groups of a mini-batch is not known to a micro-batch (and a group none of whose
  rollouts has a token still counts among them);
* with the trust region on, the hinge ``beta * [KL - delta]_+`` uses each micro-batch's own KL estimate,
  each weighted by its share of the mini-batch's tokens; with one micro-batch per rank it is exact.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

_log = logging.getLogger(__name__)


def _report_failure(exc: BaseException) -> None:
    _log.error(
        "conspo's verl plug-in failed to load (%s: %s); the policy losses 'conspo' and 'disco' are NOT "
        "registered. conspo.verl_plugin needs verl==0.9.1: pip install 'conspo[verl]'.",
        type(exc).__name__,
        exc,
    )


try:
    from verl.trainer.ppo.core_algos import register_adv_est, register_policy_loss

    from conspo import checks
    from conspo.objectives import (
        DISCO_VARIANTS,
        MARGIN_SCHEDULES,
        NEG_REDUCES,
        TAU_MAX,
        TAU_MIN,
        check_tau,
        conspo_loss,
        disco_loss,
        kl_trust_region,
        margin_at,
        sequence_scores,
    )
except Exception as _exc:  # verl swallows plug-in errors at DEBUG level: say it loudly first
    _report_failure(_exc)
    raise

__all__ = [
    "ConSPOOptions",
    "DiscoOptions",
    "ConSPOPolicyLossConfig",
    "conspo_policy_loss",
    "disco_policy_loss",
    "compute_group_codes",
    "encode_group_codes",
    "decode_group_codes",
    "group_balanced_order",
    "check_trainer_config",
]

# Settings a user changes when groups arrive split; every integrity error names them.
_GROUP_SETTINGS = (
    "keep each prompt's rollouts together in every micro-batch: trainer.v1.trainer_mode=conspo (verl's own "
    "batch balancing splits groups across data-parallel ranks), actor_rollout_ref.actor.use_dynamic_bsz=False, "
    "actor_rollout_ref.actor.shuffle=False, actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu a multiple of "
    "actor_rollout_ref.rollout.n, and actor_rollout_ref.actor.ppo_mini_batch_size a multiple of the "
    "data-parallel size"
)


# --------------------------------------------------------------------------------------------------
# Options, reachable from verl's config as actor_rollout_ref.actor.policy_loss.{conspo,disco}.
# Names and defaults are those of the TRL trainer's ConSPOConfig (docs/objectives.md); the old names of
# this plug-in are deprecated aliases.
# --------------------------------------------------------------------------------------------------


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


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in fields(cls)}


def _refuse_idle(prefix: str, options: Any, idle: dict[str, str]) -> None:
    """Refuse the options in ``idle`` (name -> why it is not read) that differ from their default."""
    defaults = _defaults(type(options))
    set_idle = [f"{prefix}.{name}={getattr(options, name)!r} ({why})" for name, why in idle.items()
                if getattr(options, name) != defaults[name]]  # fmt: skip
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
_METHOD_OPTIONS = {"conspo": ConSPOOptions, "disco": DiscoOptions}


def _options(cls: type, section: Any, where: str) -> Any:
    """The typed options of one ``policy_loss.<method>`` section (a mapping), deprecated names translated."""
    if section is None:
        return cls()
    if isinstance(section, cls):
        return section
    if not isinstance(section, Mapping):
        raise ValueError(f"{where} must be a mapping of options, got {type(section).__name__}")
    values = dict(section)
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
            for method, other in _METHOD_OPTIONS.items():
                if other is not cls and (name in {f.name for f in fields(other)} or name in other.aliases):
                    why.append(f"{name}: read only by loss_mode {method} (policy_loss.{method}.{name})")
        raise ValueError(
            f"{where} has unknown option(s) {unknown}; accepted: {sorted(known)}"
            + (f" ({'; '.join(why)})" if why else "")
        )
    return cls(**values)


def _section(config: Any, key: str) -> Any:
    return config.get(key, None) if config is not None and hasattr(config, "get") else getattr(config, key, None)


def _is_empty(section: Any) -> bool:
    return section is None or (isinstance(section, Mapping) and len(section) == 0)


# The registered dataclass for verl's config. verl instantiates ``policy_loss`` from its ``_target_``, so
# pointing that at this class is what lets Hydra accept the extra keys.
_PolicyLossConfigBase: Any
try:
    from verl.workers.config import ActorConfig as _ActorConfig
    from verl.workers.config import PolicyLossConfig as _PolicyLossConfigBase
except Exception as _exc:
    _report_failure(_exc)
    raise

# verl settings read only by verl's own policy losses: under loss_mode conspo/disco they change nothing, so a value
# other than verl's default is refused (as the TRL trainer refuses TRL's loss fields).
_IDLE_POLICY_LOSS_FIELDS = ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef", "dro_beta")
_IDLE_ACTOR_FIELDS = ("clip_ratio", "clip_ratio_low", "clip_ratio_high", "clip_ratio_c")


def _refuse_idle_verl_settings(method: str, values: Mapping[str, Any], names: tuple[str, ...], prefix: str,
                               defaults: Mapping[str, Any]) -> None:  # fmt: skip
    idle = [f"{prefix}.{name}={values[name]!r}" for name in names if name in values and values[name] != defaults[name]]
    if idle:
        raise ValueError(
            f"loss_mode {method} never reads {', '.join(idle)} (read only by verl's own policy losses), so "
            f"{'it is' if len(idle) == 1 else 'they are'} refused; remove {'it' if len(idle) == 1 else 'them'}"
        )


def _check_actor_settings(method: str, actor: Any) -> None:
    """Refuse actor settings that loss_mode ``method`` never reads (verl's PPO clip ranges)."""
    values = {name: _section(actor, name) for name in _IDLE_ACTOR_FIELDS}
    values = {k: v for k, v in values.items() if v is not None}
    _refuse_idle_verl_settings(method, values, _IDLE_ACTOR_FIELDS, "actor_rollout_ref.actor", _defaults(_ActorConfig))


@dataclass
class ConSPOPolicyLossConfig(_PolicyLossConfigBase):
    """verl's ``PolicyLossConfig`` plus the options of loss_mode conspo and disco, validated at load.

    Select it with ``actor_rollout_ref.actor.policy_loss._target_=conspo.verl_plugin.ConSPOPolicyLossConfig``
    and set options as ``+actor_rollout_ref.actor.policy_loss.conspo.tau=10``. Options of the method that
    ``loss_mode`` does not select, and verl's own policy-loss settings under conspo/disco, are refused: they
    would have no effect.
    """

    conspo: Any = field(default_factory=dict)
    disco: Any = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Validate the active method's options when the config loads, not at the first loss call. BaseConfig
        # freezes assigned fields, so the typed options are stored through object.__setattr__.
        for method, cls in _METHOD_OPTIONS.items():
            section = getattr(self, method)
            if self.loss_mode == method:
                object.__setattr__(self, method, _options(cls, section, f"policy_loss.{method}"))
            elif not _is_empty(section):
                keys = sorted(section) if isinstance(section, Mapping) else [type(section).__name__]
                raise ValueError(
                    f"policy_loss.{method} options {keys} would have no effect under loss_mode={self.loss_mode!r}, "
                    f"so they are refused; remove them, or set loss_mode={method}"
                )
        if self.loss_mode in _METHOD_OPTIONS:
            values = {name: getattr(self, name) for name in _IDLE_POLICY_LOSS_FIELDS}
            _refuse_idle_verl_settings(self.loss_mode, values, _IDLE_POLICY_LOSS_FIELDS, "policy_loss",
                                       _defaults(_PolicyLossConfigBase))  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Group codes: what the estimator tells the loss, one exact integer per rollout carried in float64.
# --------------------------------------------------------------------------------------------------

NEGATIVE, POSITIVE, EXCLUDED = 1, 2, 3  # 0 means "no code": the row did not come from this estimator
_STATE_BITS, _SIZE_BITS, _GROUP_BITS, _STEP_BITS = 2, 10, 20, 21  # 53 bits: exact in float64
MAX_GROUP_SIZE = 1 << _SIZE_BITS
MAX_GROUPS = 1 << _GROUP_BITS
MAX_STEP = (1 << _STEP_BITS) - 1


def encode_group_codes(state: Tensor, group: Tensor, size: Tensor, step: int) -> Tensor:
    """Pack per-rollout fields into float64 integers below 2**53 (exact), shape (B,).

    ``code = state + 4 * ((size - 1) + 1024 * (group + 2**20 * step))``; ``state`` is NEGATIVE, POSITIVE
    or EXCLUDED (no completion token: verl's padding rows), ``group`` the compact prompt-group index in
    the generation batch (< 2**20), ``size`` the group's number of rollouts (1..1024), ``step`` the
    training step (< 2**21).
    """
    if not 0 <= step <= MAX_STEP:
        raise ValueError(f"step must be in [0, {MAX_STEP}], got {step}")
    if group.numel() and int(group.max()) >= MAX_GROUPS:
        raise ValueError(f"a generation batch may hold at most {MAX_GROUPS} prompt groups, got {int(group.max()) + 1}")
    if size.numel() and (int(size.min()) < 1 or int(size.max()) > MAX_GROUP_SIZE):
        raise ValueError(f"group sizes must be in [1, {MAX_GROUP_SIZE}], got up to {int(size.max())}")
    rest = ((size.long() - 1) + MAX_GROUP_SIZE * (group.long() + MAX_GROUPS * step)) << _STATE_BITS
    return (rest + state.long()).to(torch.float64)


def decode_group_codes(codes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inverse of :func:`encode_group_codes` on a float64 (B,) tensor: (state, group, size, step), int64."""
    c = codes.long()
    state = c & ((1 << _STATE_BITS) - 1)
    c = c >> _STATE_BITS
    size = (c & (MAX_GROUP_SIZE - 1)) + 1
    c = c >> _SIZE_BITS
    return state, c & (MAX_GROUPS - 1), size, c >> _GROUP_BITS


class _StepSource:
    """The training step for the margin curriculum, set by the ``conspo`` trainer around each estimator call."""

    trainer_step: int | None = None
    calls = 0
    warned = False


def compute_group_codes(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: Any = None,
    config: Any = None,
    **_: Any,
) -> tuple[Tensor, Tensor]:
    """verl advantage estimator ``conspo`` / ``disco``: group codes in place of advantages.

    Args:
        token_level_rewards: (B, T) verl's rewards; a rollout is correct when their sum is at least
            ``algorithm.conspo.correct_threshold`` (default 0.5).
        response_mask: (B, T) completion-token mask; rows with no token (verl's padding) are excluded.
        index: (B,) verl's prompt uid of each rollout; rollouts of one prompt form a group.
        config: verl's ``algorithm`` config.

    Returns:
        ``(advantages, returns)``: (B, T) float64 codes repeated over every position (verl logs their
        statistics as critic/advantages/*: they are codes, not advantages), and zeros.
    """
    if index is None:
        raise ValueError("the conspo estimator needs verl's prompt uid ('index'); the batch has no 'uid' field")
    options = _section(config, "conspo") or {}
    threshold = checks.finite("algorithm.conspo.correct_threshold", options.get("correct_threshold", 0.5))
    unknown = sorted(set(options) - {"correct_threshold"})
    if unknown:
        raise ValueError(f"algorithm.conspo has unknown option(s) {unknown}; accepted: ['correct_threshold']")
    b, t = token_level_rewards.shape
    if len(index) != b:
        raise ValueError(f"index has {len(index)} entries for {b} rollouts")
    group_of: dict[Any, int] = {}
    group = torch.tensor([group_of.setdefault(uid, len(group_of)) for uid in index], dtype=torch.long)
    size = torch.bincount(group, minlength=len(group_of))[group]
    correct = (token_level_rewards.sum(-1) >= threshold).cpu()
    has_tokens = (response_mask.sum(-1) > 0).cpu()
    state = torch.where(has_tokens, torch.where(correct, POSITIVE, NEGATIVE), EXCLUDED)
    codes = encode_group_codes(state, group, size, _training_step())
    advantages = codes.to(token_level_rewards.device)[:, None].expand(b, t).contiguous()
    return advantages, torch.zeros_like(token_level_rewards)


def _training_step() -> int:
    _StepSource.calls += 1
    if _StepSource.trainer_step is not None:
        return _StepSource.trainer_step
    if not _StepSource.warned:
        _StepSource.warned = True
        _log.warning(
            "conspo estimator: the margin curriculum counts estimator calls in this process (restarts at 0 on "
            "resume); trainer.v1.trainer_mode=conspo passes verl's global step instead."
        )
    return _StepSource.calls - 1


# --------------------------------------------------------------------------------------------------
# The policy losses.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MicroBatch:
    """What the loss needs from the codes of one micro-batch, for the rows that take part (not EXCLUDED)."""

    rows: Tensor  # (n,) int64 on the loss's device: indices of the included rows
    group: Tensor  # (n,) int64 on the device
    correct: Tensor  # (n,) bool on the device
    step: int
    n_groups: int  # groups with at least one included row


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """One host-to-device copy that does not wait for the GPU (pinned memory, non-blocking)."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _decode_micro_batch(advantages: Tensor, response_mask: Tensor, rollout_n: int | None) -> _MicroBatch:
    if advantages.dtype != torch.float64:
        raise ValueError(
            f"loss_mode conspo/disco needs the group codes of algorithm.adv_estimator=conspo (or disco), which are "
            f"float64; got advantages of dtype {advantages.dtype}. Set algorithm.adv_estimator=conspo, and check that "
            "nothing between the estimator and the actor casts advantages."
        )
    b = advantages.shape[0]
    if b == 0:
        empty = torch.zeros(0, dtype=torch.long, device=advantages.device)
        return _MicroBatch(empty, empty, empty.bool(), 0, 0)
    # One device-to-host copy: the row codes, whether any completion token disagrees with its row's code, and
    # whether the row has a token in the loss mask.
    mask = response_mask.bool()
    mixed_row = ((advantages != advantages[:, :1]) & mask).any(-1)
    host = torch.stack([advantages[:, 0], mixed_row.to(torch.float64), mask.any(-1).to(torch.float64)]).cpu()
    codes, mixed_row, has_token = host[0], host[1] != 0, host[2] != 0
    valid = (codes >= 1) & (codes < 2.0**53) & (codes == codes.round()) & ~mixed_row
    state, group, size, step = decode_group_codes(torch.where(valid, codes, 0.0))
    if not bool((valid & (state >= NEGATIVE)).all()):
        raise ValueError(
            "advantages do not hold conspo group codes: set algorithm.adv_estimator=conspo (or disco) together "
            "with policy_loss.loss_mode=conspo (or disco)"
        )
    if int(step.min()) != int(step.max()):
        raise ValueError(
            f"a micro-batch mixes rollouts of training steps {sorted(set(step.tolist()))}: groups must come from one "
            f"generation batch (use trainer.v1.trainer_mode=conspo, not an asynchronous trainer); {_GROUP_SETTINGS}"
        )
    # A rollout without a token in the loss mask leaves its group (the estimator already marks the rows without a
    # completion token; this also covers a loss mask that differs from the estimator's response mask).
    included = (state != EXCLUDED) & has_token
    ids, local, counts = torch.unique(group, return_inverse=True, return_counts=True)
    expected = torch.zeros_like(counts).index_put_((local,), size)
    in_play = torch.zeros_like(counts, dtype=torch.bool).index_fill_(0, local[included], True)
    incomplete = in_play & (counts != expected)
    if bool(incomplete.any()):
        k = int(incomplete.nonzero()[0])
        raise ValueError(
            f"incomplete prompt group in a micro-batch: group {int(ids[k])} has {int(counts[k])} of its "
            f"{int(expected[k])} rollouts here. ConSPO/DisCO couple the rollouts of a group, so a split group "
            f"would train on a wrong objective. To fix: {_GROUP_SETTINGS}."
        )
    if rollout_n is not None and bool((size[included] != rollout_n).any()):
        raise ValueError(
            f"prompt groups of {sorted(set(size[included].tolist()))} rollouts, but actor_rollout_ref.rollout.n="
            f"{rollout_n}: the loss normalises by global_batch_size / rollout.n groups, so every group must hold "
            "rollout.n rollouts"
        )
    rows = included.nonzero().squeeze(-1)
    packed = _to_device(torch.stack([rows, group[rows], (state[rows] == POSITIVE).long()]), advantages.device)
    return _MicroBatch(packed[0], packed[1], packed[2].bool(), int(step[0]), int(in_play.sum()))


def _normaliser(config: Any, n_groups_here: int, n_tokens_here: Tensor) -> tuple[float, float, Tensor | float]:
    """(groups in the global mini-batch, dp_size, tokens in the global mini-batch) from verl's batch info.

    Without global information (a direct call, dp_size 1) the micro-batch is the whole batch.
    """
    info = getattr(config, "global_batch_info", None) or {}
    dp_size = int(info.get("dp_size") or 1)
    global_rows, global_tokens = info.get("global_batch_size"), info.get("batch_num_tokens")
    rollout_n = _section(config, "rollout_n")
    if global_rows is None:
        if dp_size > 1:
            raise ValueError("global_batch_size is required in config.global_batch_info when dp_size > 1")
        n_groups = float(max(n_groups_here, 1))
    else:
        if not rollout_n or global_rows % rollout_n:
            raise ValueError(f"global_batch_size={global_rows} is not a multiple of rollout.n={rollout_n}")
        n_groups = global_rows / rollout_n
    if global_tokens is None:
        if dp_size > 1:
            raise ValueError("batch_num_tokens is required in config.global_batch_info when dp_size > 1")
        return n_groups, float(dp_size), n_tokens_here.clamp(min=1)
    return n_groups, float(dp_size), float(max(global_tokens, 1))


def _group_policy_loss(
    method: str,
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    config: Any,
    rollout_is_weights: Tensor | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    if config is None:
        raise ValueError(f"loss_mode {method} needs verl's actor config")
    if rollout_is_weights is not None:
        raise ValueError(
            f"loss_mode {method} has no token importance ratio to correct: disable algorithm.rollout_correction"
        )
    _check_actor_settings(method, config)
    options = _options(
        _METHOD_OPTIONS[method], _section(_section(config, "policy_loss"), method), f"policy_loss.{method}"
    )
    mask = response_mask.bool()
    batch = _decode_micro_batch(advantages, mask, _section(config, "rollout_n"))
    n_tokens_here = mask.sum()
    n_groups, dp_size, tokens = _normaliser(config, batch.n_groups, n_tokens_here)

    prefix = f"actor/{method}/"
    metrics: dict[str, Tensor] = {}
    trust_term: Tensor | float = 0.0
    if options.trust_region:
        # DisCO's trust region (docs/objectives.md, section 6) on this micro-batch's KL, weighted by its share of the
        # mini-batch tokens.
        trust = kl_trust_region(
            log_prob, old_log_prob, mask, delta=options.trust_region_delta, beta=options.trust_region_beta
        )
        trust_term = trust.penalty * (n_tokens_here.to(trust.penalty.dtype) / tokens) * dp_size
        metrics[prefix + "kl"] = trust.kl
        metrics[prefix + "trust_region"] = trust_term.detach()
    else:  # the KL of this micro-batch as a diagnostic only (no device sync)
        diff = torch.where(mask, old_log_prob.detach() - log_prob.detach(), 0.0)
        metrics[prefix + "kl"] = diff.sum() / n_tokens_here.clamp(min=1).to(diff.dtype)
    if batch.rows.numel() == 0:  # no rollout takes part: no objective, but a graph for the backward pass
        return log_prob[:, :0].sum() + trust_term, metrics
    scores = sequence_scores(log_prob[batch.rows], mask[batch.rows])
    correct, group = batch.correct, batch.group
    if method == "conspo":
        margin = options.margin(batch.step)  # one margin per generation batch: the step is in the codes
        out = conspo_loss(
            scores, correct, group, tau=options.tau, margin=margin, neg_reduce=options.neg_reduce, group_norm="all"
        )
    else:
        out = disco_loss(scores, correct, group, tau=options.tau, variant=options.disco_variant, group_norm="all")
    # The core averages over the groups it was given; rescale to the groups of the global mini-batch.
    objective = out.loss * (batch.n_groups / n_groups) * dp_size
    metrics.update({prefix + k: v for k, v in out.metrics.items()})
    metrics[prefix + "objective"] = objective.detach()
    return objective + trust_term, metrics


def conspo_policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """verl policy loss ``conspo``: ConSPO's group-wise InfoNCE (docs/objectives.md, section 4), plus the trust
    region when ``policy_loss.conspo.trust_region=True``.

    ``old_log_prob``, ``log_prob``, ``response_mask``: (b, T) for the b rollouts of one micro-batch;
    ``advantages``: (b, T) group codes from the ``conspo`` estimator. ``loss_agg_mode`` is ignored: the
    objective fixes its own reduction (length-normalised scores, mean over groups). Returns the loss
    (summed over micro-batches and averaged over ranks it is the mini-batch objective) and detached
    0-d tensor metrics under ``actor/conspo/``.
    """
    del loss_agg_mode
    return _group_policy_loss("conspo", old_log_prob, log_prob, advantages, response_mask, config, rollout_is_weights)


def disco_policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """verl policy loss ``disco``: DisCO's objective (docs/objectives.md, section 7) plus, by default, its trust
    region; as :func:`conspo_policy_loss`."""
    del loss_agg_mode
    return _group_policy_loss("disco", old_log_prob, log_prob, advantages, response_mask, config, rollout_is_weights)


# --------------------------------------------------------------------------------------------------
# The v1 trainer mode "conspo": whole groups per data-parallel rank, and the step for the margin.
# --------------------------------------------------------------------------------------------------


def group_balanced_order(uids: list[Any], seqlens: list[int], padding: list[bool], dp_size: int) -> list[int]:
    """A row order whose ``dp_size`` equal contiguous slices hold whole prompt groups, balanced in tokens.

    Groups (rows sharing a uid) stay contiguous; verl's padding rows are spread evenly at the slice ends.
    Raises if the groups cannot be split evenly (their number must be a multiple of ``dp_size`` and their
    sizes equal).
    """
    from verl.utils.seqlen_balancing import calculate_workload, get_seqlen_balanced_partitions

    groups: dict[Any, list[int]] = {}
    pads = []
    for row, (uid, is_pad) in enumerate(zip(uids, padding, strict=True)):
        (pads if is_pad else groups.setdefault(uid, [])).append(row)
    members = list(groups.values())
    if len(members) % dp_size or len(pads) % dp_size or len({len(m) for m in members}) > 1:
        raise ValueError(
            f"trainer mode conspo cannot give {dp_size} data-parallel ranks equal whole groups: {len(members)} prompt "
            f"groups of sizes {sorted({len(m) for m in members})}, {len(pads)} padding rows. Make data.train_batch_size "
            "(prompts per step, after any filtering) a multiple of the actor's data-parallel size."
        )
    workload = calculate_workload(torch.tensor(seqlens, dtype=torch.int64)).tolist()
    group_load = [int(sum(workload[r] for r in m)) for m in members]
    parts = get_seqlen_balanced_partitions(group_load, k_partitions=dp_size, equal_size=True)
    per_rank_pads = len(pads) // dp_size
    order: list[int] = []
    for rank, part in enumerate(parts):
        for g in part:
            order.extend(members[g])
        order.extend(pads[rank * per_rank_pads : (rank + 1) * per_rank_pads])
    return order


def check_trainer_config(config: Any, total_training_steps: int) -> None:
    """What trainer mode ``conspo`` checks on the driver before any worker starts (``config`` is verl's full config).

    Under loss_mode conspo/disco it refuses verl's clip settings (no effect), and under conspo a margin ramp whose
    ``total_steps`` is not verl's number of training steps: the curriculum would reach M at the wrong time (the TRL
    trainer ramps over its planned optimizer steps, which it knows). Without a trust region and with several
    optimizer steps per generation batch it logs the TRL trainer's warning.
    """
    actor = config.actor_rollout_ref.actor
    policy_loss = _section(actor, "policy_loss")
    method = _section(policy_loss, "loss_mode")
    if method not in _METHOD_OPTIONS:
        return
    _check_actor_settings(method, actor)
    options = _options(_METHOD_OPTIONS[method], _section(policy_loss, method), f"policy_loss.{method}")
    mini, prompts = _section(actor, "ppo_mini_batch_size"), config.data.train_batch_size
    epochs = _section(actor, "ppo_epochs") or 1
    if not options.trust_region and ((mini and prompts and mini < prompts) or epochs > 1):
        _log.warning(
            "loss_mode %s without a trust region and %s: the optimizer steps after the first of each generation batch "
            "train on rollouts of an older policy with no correction (the ConSPO paper mentions no constraint). Set "
            "+actor_rollout_ref.actor.policy_loss.%s.trust_region=True for DisCO's KL penalty.", method,
            f"ppo_epochs={epochs}" if epochs > 1 else f"{prompts // mini} optimizer steps per generation batch "
            f"(ppo_mini_batch_size={mini}, data.train_batch_size={prompts})", method,
        )  # fmt: skip
    if method != "conspo":
        return
    ramps = options.margin_schedule in ("linear", "cosine") and options.margin_start != options.margin_max
    if ramps and options.total_steps != total_training_steps:
        raise ValueError(
            f"policy_loss.conspo.total_steps={options.total_steps} but verl trains for {total_training_steps} steps "
            f"(trainer.total_training_steps, or the dataset's steps per epoch times trainer.total_epochs): the margin "
            f"would ramp over {options.margin_ramp_frac:g} of the wrong length. Set "
            f"+actor_rollout_ref.actor.policy_loss.conspo.total_steps={total_training_steps}."
        )


def _register_trainer() -> None:
    from verl.trainer.ppo.padding_utils import upsample_batch_to_divisible_size
    from verl.trainer.ppo.v1 import register_trainer
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
    from verl.utils.seqlen_balancing import log_seqlen_unbalance

    class ConSPOTrainer(PPOTrainerSync):
        """verl's sync trainer with group-preserving balancing and the step passed to the estimator."""

        def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
            worker_group = self.actor_rollout_wg
            if "actor" not in worker_group._dispatch_info:
                worker_group._dispatch_info["actor"] = worker_group._query_dispatch_info("actor")
            dp_size = max(worker_group._dispatch_info["actor"]) + 1
            multiple = self._get_required_batch_multiple(dp_size)
            batch = upsample_batch_to_divisible_size(batch, multiple, self.tokenizer.eos_token_id)
            uids = [key.rsplit("_", 2)[0] for key in batch.keys]
            seqlens = [int(tag["seq_len"]) for tag in batch.tags]
            padding = [bool(tag.get("is_padding", False)) for tag in batch.tags]
            order = group_balanced_order(uids, seqlens, padding, dp_size)
            batch.reorder(order)
            per_rank = len(order) // dp_size
            partitions = [order[r * per_rank : (r + 1) * per_rank] for r in range(dp_size)]
            metrics.update(log_seqlen_unbalance(seqlen_list=seqlens, partitions=partitions, prefix=logging_prefix))
            return batch

        def _init_dataloader(self):
            super()._init_dataloader()  # sets total_training_steps; the workers are created after it
            check_trainer_config(self.config, self.total_training_steps)

        def _compute_advantage(self, batch, metrics):
            _StepSource.trainer_step = max(int(self.global_steps) - 1, 0)  # verl counts steps from 1
            try:
                return super()._compute_advantage(batch, metrics)
            finally:
                _StepSource.trainer_step = None

    register_trainer("conspo")(ConSPOTrainer)


class _RegisterTrainerOnImport:
    """Registers the trainer mode once verl's v1 trainer package is imported (it needs TransferQueue and is
    heavy, so ``import verl`` in a worker should not pay for it)."""

    target = "verl.trainer.ppo.v1"

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.target:
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            try:
                _register_trainer()
            except Exception as exc:  # never break verl's own trainers because ours failed
                _log.error("conspo: trainer mode 'conspo' not registered (%s: %s)", type(exc).__name__, exc)

        spec.loader.exec_module = exec_and_register  # type: ignore[method-assign]
        return spec


def _install() -> None:
    register_policy_loss("conspo")(conspo_policy_loss)
    register_policy_loss("disco")(disco_policy_loss)
    register_adv_est("conspo")(compute_group_codes)
    register_adv_est("disco")(compute_group_codes)
    if _RegisterTrainerOnImport.target in sys.modules:
        _register_trainer()
    elif not any(isinstance(f, _RegisterTrainerOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterTrainerOnImport())  # type: ignore[arg-type]


try:
    _install()
except Exception as _exc:
    _report_failure(_exc)
    raise
