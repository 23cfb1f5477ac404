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
  it balances *whole groups* across data-parallel ranks (verl's own balancing splits groups) and tells
  the estimator the training step, which drives the margin curriculum.

Exactness (spec section 9, "whole groups per micro-batch"): every loss call decodes the groups it holds,
raises if one is incomplete or comes from another generation batch, and evaluates the objective of
``conspo.objectives`` on them at the current parameters. Dividing by the number of groups in verl's
global mini-batch (``global_batch_size / rollout.n``) and multiplying by ``dp_size`` (verl averages
gradients over ranks) makes the summed gradient that of the full mini-batch loss, for any micro-batch
split, at every optimizer step, ppo_epochs > 1 included. Two documented departures (docs/verl.md):

* groups are averaged over *all* groups of the mini-batch (``group_norm="all"``, the DisCO code's choice):
  the number of *valid* groups of a mini-batch is not known to a micro-batch;
* the trust-region hinge ``beta * [KL - delta]_+`` uses each micro-batch's own KL estimate, each weighted
  by its share of the mini-batch's tokens; with one micro-batch per rank it is the spec's exactly.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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

    from conspo.objectives import (
        DISCO_VARIANTS,
        MARGIN_SCHEDULES,
        NEG_REDUCES,
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
# --------------------------------------------------------------------------------------------------


def _number(name: str, value: Any, *, low: float, low_inclusive: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < low or (value == low and not low_inclusive):
        bound = f">= {low}" if low_inclusive else f"> {low}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _choice(name: str, value: Any, accepted: tuple[str, ...]) -> str:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; accepted values: {', '.join(map(repr, accepted))}")
    return value


def _group_norm(prefix: str, value: Any) -> str:
    if value != "all":
        raise ValueError(
            f"{prefix}.group_norm={value!r}: under verl only 'all' is exact (mean over the groups of each global "
            "mini-batch); a micro-batch cannot know how many groups of its mini-batch are valid. "
            "With algorithm.filter_groups every group is valid and 'all' equals 'valid'."
        )
    return value


@dataclass(frozen=True)
class ConSPOOptions:
    """``policy_loss.conspo``: ConSPO's options (spec sections 4-6), defaults as in the spec."""

    tau: float = 0.1
    """InfoNCE temperature, > 0 (the order of the within-group score spread, nats per token)."""
    margin_schedule: str = "linear"
    """Margin curriculum: constant, linear, cosine or step (spec section 5)."""
    m0: float = 0.0
    """Margin at the first training step, >= 0."""
    m_max: float = 0.1
    """Margin at the end of the ramp, >= 0."""
    ramp_frac: float = 1.0
    """Fraction of total_steps over which the margin ramps, in (0, 1]."""
    step_at: int | None = None
    """Training step t_1 at which schedule 'step' switches from m0 to m_max."""
    total_steps: int | None = None
    """verl's trainer.total_training_steps; required unless the margin is constant."""
    neg_reduce: str = "sum"
    """How the negatives enter the InfoNCE denominator: sum (standard) or mean."""
    group_norm: str = "all"
    """Only 'all' under verl: each mini-batch's loss is the mean over its groups."""
    tr_delta: float = 1e-4
    """Trust-region KL budget delta, > 0."""
    tr_beta: float = 1e3
    """Trust-region hinge weight beta, > 0."""

    def __post_init__(self) -> None:
        p = "policy_loss.conspo"
        _number(f"{p}.tau", self.tau, low=0.0, low_inclusive=False)
        _choice(f"{p}.margin_schedule", self.margin_schedule, MARGIN_SCHEDULES)
        _choice(f"{p}.neg_reduce", self.neg_reduce, NEG_REDUCES)
        _group_norm(p, self.group_norm)
        _number(f"{p}.tr_delta", self.tr_delta, low=0.0, low_inclusive=False)
        _number(f"{p}.tr_beta", self.tr_beta, low=0.0, low_inclusive=False)
        if self.margin_schedule != "constant" and self.m0 != self.m_max:
            if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 1:
                raise ValueError(
                    f"{p}.total_steps must be an integer >= 1 for margin_schedule={self.margin_schedule!r}, got "
                    f"{self.total_steps!r}; set it to trainer.total_training_steps (or use margin_schedule=constant)"
                )
        self.margin(0)  # validates m0, m_max, ramp_frac and step_at with the core's messages

    def margin(self, step: int) -> float:
        """m(t) at training step ``step`` (0 for verl's first step)."""
        return margin_at(
            step,
            self.total_steps or 1,
            schedule=self.margin_schedule,
            m0=self.m0,
            m_max=self.m_max,
            ramp_frac=self.ramp_frac,
            step_at=self.step_at,
        )


@dataclass(frozen=True)
class DiscoOptions:
    """``policy_loss.disco``: DisCO's options (spec section 7)."""

    tau: float = 10.0
    """Temperature of the DRO log-sum-exp over negatives, > 0 (DisCO's paper: 10 for log-L)."""
    variant: str = "dro"
    """dro (default) or basic (mean of positives minus mean of negatives)."""
    group_norm: str = "all"
    """Only 'all' under verl (DisCO's code does the same)."""
    tr_delta: float = 1e-4
    """Trust-region KL budget delta, > 0."""
    tr_beta: float = 1e3
    """Trust-region hinge weight beta, > 0."""

    def __post_init__(self) -> None:
        p = "policy_loss.disco"
        _number(f"{p}.tau", self.tau, low=0.0, low_inclusive=False)
        _choice(f"{p}.variant", self.variant, DISCO_VARIANTS)
        _group_norm(p, self.group_norm)
        _number(f"{p}.tr_delta", self.tr_delta, low=0.0, low_inclusive=False)
        _number(f"{p}.tr_beta", self.tr_beta, low=0.0, low_inclusive=False)


def _options(cls: type, section: Any, where: str) -> Any:
    if section is None:
        return cls()
    if isinstance(section, cls):
        return section
    if not isinstance(section, Mapping):
        raise ValueError(f"{where} must be a mapping of options, got {type(section).__name__}")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"{where} has unknown option(s) {unknown}; accepted: {sorted(known)}")
    return cls(**{k: section[k] for k in section})


def _section(config: Any, key: str) -> Any:
    return config.get(key, None) if config is not None and hasattr(config, "get") else getattr(config, key, None)


# The registered dataclass for verl's config. verl instantiates ``policy_loss`` from its ``_target_``, so
# pointing that at this class is what lets Hydra accept the extra keys.
_PolicyLossConfigBase: Any
try:
    from verl.workers.config import PolicyLossConfig as _PolicyLossConfigBase
except Exception as _exc:
    _report_failure(_exc)
    raise


@dataclass
class ConSPOPolicyLossConfig(_PolicyLossConfigBase):
    """verl's ``PolicyLossConfig`` plus the options of loss_mode conspo and disco, validated at load.

    Select it with ``actor_rollout_ref.actor.policy_loss._target_=conspo.verl_plugin.ConSPOPolicyLossConfig``
    and set options as ``+actor_rollout_ref.actor.policy_loss.conspo.tau=0.1``.
    """

    conspo: Any = field(default_factory=dict)
    disco: Any = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Validate the active method's options when the config loads, not at the first loss call. BaseConfig
        # freezes assigned fields, so the typed options are stored through object.__setattr__.
        for method, cls in (("conspo", ConSPOOptions), ("disco", DiscoOptions)):
            if self.loss_mode == method:
                object.__setattr__(self, method, _options(cls, getattr(self, method), f"policy_loss.{method}"))


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
    threshold = _number(
        "algorithm.conspo.correct_threshold", options.get("correct_threshold", 0.5), low=-math.inf, low_inclusive=True
    )
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
    # One device-to-host copy: the row codes and whether any completion token disagrees with its row's code.
    mixed_row = ((advantages != advantages[:, :1]) & response_mask.bool()).any(-1)
    host = torch.stack([advantages[:, 0], mixed_row.to(torch.float64)]).cpu()
    codes, mixed_row = host[0], host[1] != 0
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
    included = state != EXCLUDED
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
    options = _options(
        ConSPOOptions if method == "conspo" else DiscoOptions,
        _section(_section(config, "policy_loss"), method),
        f"policy_loss.{method}",
    )
    mask = response_mask.bool()
    batch = _decode_micro_batch(advantages, mask, _section(config, "rollout_n"))
    n_tokens_here = mask.sum()
    n_groups, dp_size, tokens = _normaliser(config, batch.n_groups, n_tokens_here)

    # Trust region (spec section 6) on this micro-batch's KL, weighted by its share of the mini-batch tokens.
    trust = kl_trust_region(log_prob, old_log_prob, mask, delta=options.tr_delta, beta=options.tr_beta)
    trust_term = trust.penalty * (n_tokens_here.to(trust.penalty.dtype) / tokens) * dp_size

    prefix = f"actor/{method}/"
    metrics: dict[str, Tensor] = {prefix + "kl": trust.kl, prefix + "trust_region": trust_term.detach()}
    if batch.rows.numel() == 0:  # only padding rows: no objective, keep the graph for the backward pass
        return (log_prob * 0).sum() + trust_term, metrics
    scores = sequence_scores(log_prob[batch.rows], mask[batch.rows])
    correct, group = batch.correct, batch.group
    if method == "conspo":
        margin = options.margin(batch.step)
        out = conspo_loss(
            scores, correct, group, tau=options.tau, margin=margin, neg_reduce=options.neg_reduce, group_norm="all"
        )
    else:
        out = disco_loss(scores, correct, group, tau=options.tau, variant=options.variant, group_norm="all")
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
    """verl policy loss ``conspo``: ConSPO's group-wise InfoNCE (spec section 4) plus the trust region.

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
    """verl policy loss ``disco``: DisCO's objective (spec section 7) plus the trust region; as :func:`conspo_policy_loss`."""
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
