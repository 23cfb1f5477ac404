"""The math core of conspo: sequence scores, the ConSPO, DisCO and GMPO objectives, credits, margins.

Everything here is a pure function of torch tensors and imports nothing but torch and two torch-only neighbours:
``conspo.groups`` (input checks and per-group sums without Python loops, one device synchronisation at most, in the
input checks) and ``conspo.diagnostics`` (the metrics every method logs), plus the argument checks of
``conspo.checks``. The contract is ``docs/objectives.md``; section numbers below refer to it.

Shapes are named once: ``B`` rollouts in a batch (completions of several prompts, each prompt a *group*), ``T``
completion tokens (right-padded, with a 0/1 mask), ``G`` rollouts per group (groups may differ in size here).
Groups are given by an integer id per rollout; ids are arbitrary and members need not be contiguous.

ConSPO is Zhang et al., arXiv 2605.12969 (v3): the loss is its Eq. 8/13, the credit its Lemma 2, the margin
curriculum its section 4.3; defaults are the paper's (tau = 10, cosine margin to 0.01 over the first 30% of
training). ``docs/objectives.md`` maps each equation to the function here and the test that checks it. DisCO is
Li et al., arXiv 2505.12366.

Why this file is long: one function per objective (ConSPO, DisCO, GMPO, GRPO's credit, the trust region, the
margin), each with its equation and its checks; splitting them would scatter the contract docs/objectives.md maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from conspo import checks
from conspo.diagnostics import gate_metrics, neg_entropy, neg_entropy_ratio, separation_metrics
from conspo.groups import (
    Groups,
    check_group_inputs,
    check_normalizer,
    check_row_normalizer,
    compact_groups,
    describe,
    float_dtype,
    group_sum,
    safe_div,
)

__all__ = [
    "LossOutput", "TrustRegion", "sequence_scores", "clipped_ratio_scores", "conspo_loss", "disco_loss", "margin_at",
    "kl_trust_region", "grpo_credit", "gmpo_loss", "group_advantages", "separation_metrics", "check_tau",
    "ADVANTAGE_SCALES", "MARGIN_SCHEDULES", "NEG_REDUCES", "GROUP_NORMS", "DISCO_VARIANTS", "SCORES", "TAU_MIN",
    "TAU_MAX",
]

MARGIN_SCHEDULES = ("constant", "linear", "cosine", "step")
SCORES = ("logprob", "clipped_ratio")
# The accepted temperature range. Inside it the loss, its gradient and the credit are finite for any finite scores
# (tests/test_objectives.py checks both ends against a float64 reference); outside it exp(s/tau) and tau*log(...)
# leave the float range for scores that real models produce.
TAU_MIN, TAU_MAX = 1e-3, 1e3
NEG_REDUCES = ("sum", "mean")
GROUP_NORMS = ("valid", "all")
DISCO_VARIANTS = ("dro", "basic")


@dataclass(frozen=True)
class LossOutput:
    """What an objective returns.

    loss:    0-d tensor, the true value of the objective (to minimise), differentiable in ``scores``.
    credit:  (B,) ``-dloss/dscores`` in closed form, detached. Positive credit raises a rollout's score.
    metrics: detached 0-d tensors (docs/objectives.md, section 10), keyed by plain names such as ``"score_gap"``.
    """

    loss: Tensor
    credit: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class TrustRegion(NamedTuple):
    """``penalty`` carries the gradient of docs/objectives.md, section 6; ``kl`` is the detached KL(pi_old || pi) estimate."""

    penalty: Tensor
    kl: Tensor


# --------------------------------------------------------------------------------------------------
# Input checks. Every error names the argument and what is accepted.
# --------------------------------------------------------------------------------------------------


def check_tau(value: float) -> float:
    """``tau`` as a float, or a ValueError naming the accepted range [TAU_MIN, TAU_MAX]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not TAU_MIN <= value <= TAU_MAX:
        raise ValueError(f"tau must be a number in [{TAU_MIN:g}, {TAU_MAX:g}] (the range where the contrast is computed "
                         f"stably), got {value!r}")
    return float(value)


def _neg_logsumexp(x: Tensor, neg: Tensor, groups: Groups) -> tuple[Tensor, Tensor]:
    """Per-group ``LSE_{j in N}(x_j)`` and the softmax ``pi_j`` over each group's negatives.

    Groups without negatives get LSE 0 (a safe placeholder, never used with a non-zero weight), so no
    log of an empty sum is ever differentiated. ``pi`` is 0 on positives.
    """
    neg_inf = torch.full((groups.size,), -math.inf, dtype=x.dtype, device=x.device)
    x_neg = torch.where(neg, x, torch.full_like(x, -math.inf))
    peak = neg_inf.scatter_reduce(0, groups.index, x_neg, reduce="amax", include_self=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)).detach()
    # Shift only the negatives: exp of a large positive's score could overflow, and a where() over an
    # infinite branch would turn its zero gradient into NaN.
    shifted = torch.where(neg, torch.exp(torch.where(neg, x - peak[groups.index], 0.0)), 0.0)
    total = group_sum(shifted, groups)
    safe_total = torch.where(groups.n_neg > 0, total, torch.ones_like(total))
    lse = torch.log(safe_total) + peak
    pi = shifted / safe_total[groups.index]
    return lse, pi


def _group_norm_denominator(
    groups: Groups, group_norm: str, dtype: torch.dtype, normalizer: float | Tensor | None
) -> Tensor:
    if normalizer is not None:
        # The caller counted the groups over the whole optimizer-step batch (micro-batching, several ranks).
        value = torch.as_tensor(normalizer, dtype=dtype, device=groups.index.device)
        return value.detach().clamp(min=1.0)
    count = groups.valid if group_norm == "valid" else groups.present
    return count.sum().to(dtype).clamp(min=1.0)


# --------------------------------------------------------------------------------------------------
# Public functions.
# --------------------------------------------------------------------------------------------------


def sequence_scores(logps: Tensor, mask: Tensor) -> Tensor:
    """Length-normalised sequence log-probability (docs/objectives.md, section 4).

    ``s_i = (1/|o_i|) * sum_t logp_{i,t}``, computed in float32 (float64 stays float64).

    Args:
        logps: (B, T) token log-probabilities of the sampled tokens.
        mask:  (B, T) 1 for completion tokens, 0 for padding (bool, integer or float).

    Returns:
        (B,) scores. A row with no token scores 0; padded positions never leak, even if they hold NaN.
    """
    if not isinstance(logps, Tensor) or logps.dim() != 2 or not logps.is_floating_point():
        raise ValueError(f"logps must be a 2-D floating-point tensor of shape (B, T), got {describe(logps)}")
    if not isinstance(mask, Tensor) or mask.shape != logps.shape:
        raise ValueError(f"mask must have the shape of logps {tuple(logps.shape)}, got {describe(mask)}")
    dtype = float_dtype(logps)
    keep = mask if mask.dtype == torch.bool else mask != 0
    total = torch.where(keep, logps.to(dtype), 0.0).sum(-1)
    length = keep.sum(-1).clamp(min=1).to(dtype)
    return total / length


def clipped_ratio_scores(
    logps: Tensor, old_logps: Tensor, mask: Tensor, correct: Tensor, *, eps_low: float = 0.2, eps_high: float = 0.2
) -> Tensor:
    """The clipped importance-ratio scores of the paper's Eq. 6, its Table 6 ablation of the score (section 4).

    With ``rho_t = exp(logp_t - logp_old_t)``: a positive scores ``mean_t min(rho_t, 1 + eps_high)``, a negative
    ``mean_t max(rho_t, 1 - eps_low)`` (GRPO's clipped surrogate seen per class, Lemma 1). ConSPO's InfoNCE is then
    applied to these scores instead of the length-normalised log-probabilities. At ``pi = pi_old`` every score is 1
    and its gradient is that of :func:`sequence_scores`.

    Args:
        logps, old_logps: (B, T) token log-probabilities under pi_theta and pi_old (``old_logps`` is detached).
        mask:    (B, T) completion-token mask.
        correct: (B,) bool, the verifier's verdict (decides which side is clipped).
    Returns:
        (B,) scores; a row with no token scores 0.
    """
    if not isinstance(logps, Tensor) or logps.dim() != 2 or not logps.is_floating_point():
        raise ValueError(f"logps must be a 2-D floating-point tensor of shape (B, T), got {describe(logps)}")
    for name, t in (("old_logps", old_logps), ("mask", mask)):
        if not isinstance(t, Tensor) or t.shape != logps.shape:
            raise ValueError(f"{name} must have the shape of logps {tuple(logps.shape)}, got {describe(t)}")
    if not isinstance(correct, Tensor) or correct.shape != logps.shape[:1]:
        raise ValueError(f"correct must be a tensor of shape ({logps.shape[0]},), got {describe(correct)}")
    eps_low = checks.positive("eps_low", eps_low)
    eps_high = checks.positive("eps_high", eps_high)
    if eps_low >= 1:
        raise ValueError(f"eps_low must be in (0, 1) (the ratio floor 1 - eps_low must stay positive), got {eps_low!r}")
    dtype = float_dtype(logps)
    keep = mask if mask.dtype == torch.bool else mask != 0
    log_ratio = torch.where(keep, logps.to(dtype) - old_logps.detach().to(dtype), 0.0)
    ratio = torch.exp(log_ratio)
    positive = correct.bool().unsqueeze(1)
    clipped = torch.where(positive, torch.clamp(ratio, max=1 + eps_high), torch.clamp(ratio, min=1 - eps_low))
    total = torch.where(keep, clipped, 0.0).sum(-1)
    return total / keep.sum(-1).clamp(min=1).to(dtype)


def conspo_loss(
    scores: Tensor,
    correct: Tensor,
    group_ids: Tensor,
    *,
    tau: float = 10.0,
    margin: float = 0.0,
    neg_reduce: str = "sum",
    group_norm: str = "valid",
    normalizer: float | Tensor | None = None,
) -> LossOutput:
    """ConSPO's group-wise InfoNCE objective on sequence scores (docs/objectives.md, section 4).

    For a group with positives P and negatives N, each positive i is contrasted with N only::

        l_i     = tau * softplus( LSE_{j in N}(s_j / tau) - (s_i - m) / tau ) = -tau * log q_i
        L_group = mean_{i in P} l_i
        L       = sum over valid groups of L_group / |V|       (group_norm="valid"; "all": / #groups)

    ``neg_reduce="mean"`` subtracts ``log |N|`` inside the softplus. Groups with no positive or no
    negative contribute exactly zero loss and gradient. The credit is ``-dL/ds``::

        positive i:  g_i / |P| / norm        with g_i = 1 - q_i (the gate)
        negative j: -(sum_{i in P} g_i) / |P| / norm * softmax_{N}(s / tau)_j

    Metrics: the separation metrics, ``gate_mean``, ``gate_sd`` and ``gate_frac_below_0.1`` over the positives of
    valid groups, ``neg_entropy`` (nats) and ``neg_entropy_ratio`` (H / log|N|, 1 = uniform credit), ``margin``.

    Args:
        scores:    (B,) sequence scores, e.g. from :func:`sequence_scores`.
        correct:   (B,) bool, the verifier's verdict.
        group_ids: (B,) integer id of each rollout's prompt group.
        tau:       temperature in [TAU_MIN, TAU_MAX] (default 10, the paper's; at typical within-group score
                   spreads of tenths of a nat the credits are then within about 1% of uniform).
        margin:    m >= 0 subtracted from each positive's score (see :func:`margin_at`).
        neg_reduce: "sum" (standard InfoNCE) or "mean".
        group_norm: "valid" or "all".
        normalizer: when this call sees only part of an optimizer-step batch (a micro-batch of whole
            groups), the number of groups that ``group_norm`` counts over the *whole* batch, so that the
            micro-batch losses add up to the full-batch loss. Default: count the groups of this call.
    """
    scores, correct, group_ids = check_group_inputs(scores, correct, group_ids)
    tau = check_tau(tau)
    check_normalizer(normalizer)
    checks.at_least("margin", margin, 0)
    checks.choice("neg_reduce", neg_reduce, NEG_REDUCES)
    checks.choice("group_norm", group_norm, GROUP_NORMS)

    dtype = float_dtype(scores)
    s = scores.to(dtype)
    groups = compact_groups(correct, group_ids)
    neg = ~correct
    lse, pi = _neg_logsumexp(s / tau, neg, groups)
    if neg_reduce == "mean":
        lse = lse - torch.log(groups.n_neg.clamp(min=1).to(dtype))

    z = lse[groups.index] - (s - margin) / tau  # (B,) only meaningful on positives of valid groups
    active = correct & groups.valid[groups.index]
    denom = _group_norm_denominator(groups, group_norm, dtype, normalizer)
    weight = torch.where(active, 1.0 / groups.n_pos.clamp(min=1).to(dtype)[groups.index] / denom, 0.0)
    z = torch.where(active, z, 0.0)  # keeps softplus and its gradient finite off the active set
    # threshold=40, not torch's default 20: above the threshold softplus returns z and its gradient 1,
    # which in float64 is off by e^-20 ~ 2e-9 (relative) from log(1+e^z) and sigmoid(z), the credit.
    loss = (weight * tau * torch.nn.functional.softplus(z, threshold=40.0)).sum()

    with torch.no_grad():
        gate = torch.sigmoid(z)  # g_i = 1 - q_i
        pos_credit = weight * gate
        push = group_sum(pos_credit, groups)  # per group: sum_i g_i / |P| / norm
        credit = torch.where(active, pos_credit, -push[groups.index] * pi)
        metrics = separation_metrics(s, correct, group_ids, _groups_cache=groups)
        metrics.update(gate_metrics(gate, active, dtype))
        metrics["neg_entropy"] = neg_entropy(pi, neg, groups, dtype)
        metrics["neg_entropy_ratio"] = neg_entropy_ratio(pi, neg, groups, dtype)
        metrics["margin"] = torch.full((), float(margin), dtype=dtype, device=s.device)
    return LossOutput(loss, credit.detach(), metrics)


def disco_loss(
    scores: Tensor,
    correct: Tensor,
    group_ids: Tensor,
    *,
    tau: float = 10.0,
    variant: str = "dro",
    group_norm: str = "valid",
    normalizer: float | Tensor | None = None,
) -> LossOutput:
    """DisCO's discriminative objective on sequence scores (docs/objectives.md, section 7; Li et al., arXiv 2505.12366).

    Per valid group the objective to maximise is::

        basic: mean_{i in P} s_i - mean_{j in N} s_j
        dro:   mean_{i in P} s_i - tau * LSE_{j in N}(s_j / tau)

    The returned loss is its negative averaged over valid groups (``group_norm="all"``: over all groups),
    the true objective value. Credit: ``+1/|P|/norm`` on positives; ``-1/|N|/norm`` (basic) or
    ``-softmax_N(s/tau)_j/norm`` (dro) on negatives. The KL trust region is :func:`kl_trust_region`.
    ``normalizer`` is as in :func:`conspo_loss`.
    """
    scores, correct, group_ids = check_group_inputs(scores, correct, group_ids)
    tau = check_tau(tau)
    check_normalizer(normalizer)
    checks.choice("variant", variant, DISCO_VARIANTS)
    checks.choice("group_norm", group_norm, GROUP_NORMS)

    dtype = float_dtype(scores)
    s = scores.to(dtype)
    groups = compact_groups(correct, group_ids)
    neg = ~correct
    valid_row = groups.valid[groups.index]
    denom = _group_norm_denominator(groups, group_norm, dtype, normalizer)
    pos_w = torch.where(correct & valid_row, 1.0 / groups.n_pos.clamp(min=1).to(dtype)[groups.index] / denom, 0.0)
    positive_term = (pos_w * s).sum()
    if variant == "basic":
        neg_w = torch.where(neg & valid_row, 1.0 / groups.n_neg.clamp(min=1).to(dtype)[groups.index] / denom, 0.0)
        loss = (neg_w * s).sum() - positive_term
        credit = pos_w - neg_w
    else:
        lse, pi = _neg_logsumexp(s / tau, neg, groups)
        lse_w = torch.where(groups.valid, 1.0 / denom, torch.zeros_like(denom))
        loss = (lse_w * tau * lse).sum() - positive_term
        credit = pos_w - torch.where(valid_row, pi / denom, 0.0)

    with torch.no_grad():
        metrics = separation_metrics(s, correct, group_ids, _groups_cache=groups)
        if variant == "dro":
            metrics["neg_entropy"] = neg_entropy(pi, neg, groups, dtype)
            metrics["neg_entropy_ratio"] = neg_entropy_ratio(pi, neg, groups, dtype)
    return LossOutput(loss, credit.detach(), metrics)


def margin_at(
    step: int,
    total_steps: int,
    *,
    schedule: str = "cosine",
    m0: float = 0.0,
    m_max: float = 0.01,
    ramp_frac: float = 0.3,
    step_at: int | None = None,
) -> float:
    """The curriculum margin m(t) at optimizer step ``step`` of ``total_steps`` (paper section 4.3).

    Defaults are the paper's: cosine from 0 to M = 0.01 over the first alpha = 30% of training, constant after.
    The trainer passes the step at which the current generation batch was generated, so that one generation
    batch uses one margin however many optimizer steps it feeds.

    With ``u = min(1, step / (ramp_frac * total_steps))``:

    * ``constant``: m_max
    * ``linear``:   m0 + (m_max - m0) * u
    * ``cosine``:   m0 + (m_max - m0) * (1 - cos(pi * u)) / 2
    * ``step``:     m0 before ``step_at``, m_max from ``step_at`` on (``step_at`` is required)
    """
    checks.choice("schedule", schedule, MARGIN_SCHEDULES)
    checks.integer("step", step, 0)
    checks.integer("total_steps", total_steps, 1)
    checks.at_least("m0", m0, 0)
    checks.at_least("m_max", m_max, 0)
    if isinstance(ramp_frac, bool) or not isinstance(ramp_frac, (int, float)) or not 0 < ramp_frac <= 1:
        raise ValueError(f"ramp_frac must be in (0, 1], got {ramp_frac!r}")
    if schedule == "constant":
        return float(m_max)
    if schedule == "step":
        if isinstance(step_at, bool) or not isinstance(step_at, int) or step_at < 0:
            raise ValueError(f"schedule='step' needs step_at, an integer >= 0 (the step t_1), got {step_at!r}")
        return float(m_max if step >= step_at else m0)
    u = min(1.0, step / (ramp_frac * total_steps))
    if schedule == "cosine":
        u = (1.0 - math.cos(math.pi * u)) / 2.0
    return float(m0 + (m_max - m0) * u)


def kl_trust_region(
    logps: Tensor, old_logps: Tensor, mask: Tensor, *, delta: float = 1e-4, beta: float = 1e3
) -> TrustRegion:
    """DisCO's squared-hinge trust region on KL(pi_old || pi_theta) (docs/objectives.md, section 6).

    ``KL`` is the token mean of ``old_logps - logps`` over all masked tokens of the batch, and::

        penalty = stopgrad( beta * max(KL - delta, 0) ) * KL

    so its gradient is ``beta * [KL - delta]_+ * grad KL``, zero while the policy stays inside ``delta``.

    Args:
        logps, old_logps: (B, T) token log-probabilities under pi_theta and pi_old.
        mask: (B, T) completion-token mask.
    """
    if not isinstance(logps, Tensor) or logps.dim() != 2 or not logps.is_floating_point():
        raise ValueError(f"logps must be a 2-D floating-point tensor of shape (B, T), got {describe(logps)}")
    for name, t in (("old_logps", old_logps), ("mask", mask)):
        if not isinstance(t, Tensor) or t.shape != logps.shape:
            raise ValueError(f"{name} must have the shape of logps {tuple(logps.shape)}, got {describe(t)}")
    delta = checks.positive("delta", delta)
    beta = checks.positive("beta", beta)
    dtype = float_dtype(logps)
    keep = mask if mask.dtype == torch.bool else mask != 0
    diff = torch.where(keep, old_logps.detach().to(dtype) - logps.to(dtype), 0.0)
    if not bool(torch.isfinite(diff).all()):
        raise ValueError("logps and old_logps must be finite on masked tokens; got NaN or infinity (check the "
                         "old log-probabilities the trust region compares with)")
    kl = diff.sum() / keep.sum().clamp(min=1).to(dtype)
    coef = (beta * torch.clamp(kl - delta, min=0.0)).detach()
    return TrustRegion(coef * kl, kl.detach())


def grpo_credit(correct: Tensor, group_ids: Tensor) -> Tensor:
    """GRPO's per-rollout coefficient in the discriminative view (docs/objectives.md, section 3), as float32 (B,).

    With binary rewards, population-std advantages and the per-sequence token mean, GRPO's per-group
    objective is ``sqrt(p(1-p)) * (mean_P s+ - mean_N s-)``, so each positive gets ``sqrt((1-p)/p)/G`` and
    each negative ``-sqrt(p/(1-p))/G`` whatever the scores are. Groups that are all correct or all wrong
    get 0.
    """
    if not isinstance(correct, Tensor) or correct.dim() != 1:
        raise ValueError(f"correct must be a 1-D tensor of shape (B,), got {describe(correct)}")
    placeholder = torch.zeros(correct.shape[0], device=correct.device)
    _, correct, group_ids = check_group_inputs(placeholder, correct, group_ids)
    groups = compact_groups(correct, group_ids)
    n_pos = groups.n_pos.to(torch.float32)
    size = (groups.n_pos + groups.n_neg).to(torch.float32)
    p = safe_div(n_pos, size)
    pos_coef = torch.sqrt(safe_div(1 - p, p)) / size.clamp(min=1)
    neg_coef = -torch.sqrt(safe_div(p, 1 - p)) / size.clamp(min=1)
    per_row = torch.where(correct, pos_coef[groups.index], neg_coef[groups.index])
    return torch.where(groups.valid[groups.index], per_row, 0.0)


# --------------------------------------------------------------------------------------------------
# GMPO (Zhao et al., arXiv 2507.20673) and GRPO's group-normalised advantages it is trained with.
# --------------------------------------------------------------------------------------------------

ADVANTAGE_SCALES = ("group", "batch", "none")


def group_advantages(rewards: Tensor, group_ids: Tensor, *, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """GRPO's advantages as TRL 1.16's ``GRPOTrainer`` computes them (``scale_rewards``), without loops over groups.

    ``A_i = (r_i - mean_{g(i)} r) / (sd + eps)``, where the mean is over the rollouts of i's group and ``sd`` is the
    unbiased (Bessel-corrected, like ``torch.std``) standard deviation of the rewards of i's group
    (``scale="group"``) or of the whole batch (``scale="batch"``); ``scale="none"`` only centres. A group of one
    rollout has sd 0 (so advantage 0: it is its own mean), and so does a batch of one row.

    Args:
        rewards:   (B,) finite scalar rewards.
        group_ids: (B,) integer id of each rollout's prompt group (arbitrary ids, members need not be contiguous).
        scale:     "group", "batch" or "none".
        eps:       > 0, added to the standard deviation (TRL's 1e-4).

    Returns:
        (B,) advantages, float32 (float64 when ``rewards`` is float64), detached.
    """
    if not isinstance(rewards, Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a 1-D floating-point tensor of shape (B,), got {describe(rewards)}")
    b = rewards.shape[0]
    if not isinstance(group_ids, Tensor) or group_ids.shape != (b,):
        raise ValueError(f"group_ids must be a tensor of shape ({b},) matching rewards, got {describe(group_ids)}")
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    checks.choice("scale", scale, ADVANTAGE_SCALES)
    eps = checks.positive("eps", eps)
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite; got NaN or infinity (score unscorable rollouts before this call)")

    dtype = float_dtype(rewards)
    r = rewards.detach().to(dtype)
    groups = compact_groups(torch.zeros(b, dtype=torch.bool, device=r.device), group_ids)
    count = (groups.n_pos + groups.n_neg).to(dtype)
    centred = r - safe_div(group_sum(r, groups), count)[groups.index]
    if scale == "none":
        return centred
    if scale == "group":
        var = safe_div(group_sum(centred * centred, groups), count - 1)  # 0 for a group of one
        sd = var.clamp(min=0).sqrt()[groups.index]
    else:
        dev = r - r.mean() if b > 0 else r
        sd = (dev * dev).sum().div(max(b - 1, 1)).sqrt().expand(b)
    return centred / (sd + eps)


def gmpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.4,
    eps_high: float = 0.4,
    normalizer: float | Tensor | None = None,
) -> LossOutput:
    """GMPO's policy loss: the geometric mean of the token ratios, clipped per token in log space.

    Geometric-Mean Policy Optimization (Zhao et al., arXiv 2507.20673, ICLR 2026). With the token log-ratio
    ``d_t = log rho_t = logp_t - old_logp_t`` and ``s = sgn(A_i)``, per sequence i over its ``n_i`` mask tokens::

        z_i = (1/n_i) * sum_t s * min( s * d_t, s * clip(d_t, -eps_low, eps_high) )
        r_i = exp(z_i)                                       (the clipped geometric mean of the rho_t)
        L   = -(1/N) * sum_i A_i * r_i                       (N = normalizer)

    The clip is one-sided, PPO's pessimistic bound in log space: with A > 0 a token's d is capped at eps_high,
    with A < 0 floored at -eps_low, and a capped token carries no gradient; the others keep theirs whatever
    their ratio. The ratio range is ``(exp(-eps_low), exp(eps_high))``; 0.4 each is the paper's and its
    training script's (``cliprange 0.4``). ``A = 0`` gives ``z = 0``, ``r = 1`` and no loss or gradient.

    Aggregation: a plain sum over sequences divided by ``N`` (each sequence weighs the same, whatever its
    length; the 1/n_i is inside the geometric mean). Default ``N`` = the number of rows with at least one mask
    token in this call, so the loss is the mean over sequences. When this call sees a micro-batch of an
    optimizer step, pass ``normalizer`` = that count over the *whole* step (all micro-batches and ranks); the
    micro-batch losses then add up to the full-batch loss and gradient. Rows with no mask token contribute
    nothing (their r is not formed), and padded positions never leak, even if they hold NaN.

    At ``logps == old_logps`` (the first step after generation) the gradient is that of
    ``-(1/N) * sum_i A_i * mean_t logp_{i,t}``, the on-policy policy gradient on length-normalised scores.

    Args:
        logps:      (B, T) token log-probabilities under pi_theta (differentiable).
        old_logps:  (B, T) token log-probabilities under pi_old, the sampler (detached here).
        advantages: (B,) per-sequence advantages, e.g. from :func:`group_advantages` (detached here).
        mask:       (B, T) 1 for completion tokens, 0 for padding (bool, integer or float).
        eps_low, eps_high: > 0, the clip bounds of ``d`` in log space (default 0.4 each).
        normalizer: the sequence count ``N`` above, a number >= 0 or a 1-element tensor (clamped to >= 1).

    Returns:
        :class:`LossOutput` with ``loss`` the 0-d value of L; ``credit`` (B,) ``-dL/dz_i = A_i * r_i / N``
        (0 on rows without tokens), so that ``-dL/dlogp_{i,t} = credit_i / n_i`` on unclipped tokens and 0 on
        clipped ones; with nothing clipped it is ``-dL/ds_i`` for the score ``s_i = mean_t logp_{i,t}``.
        ``metrics`` (detached 0-d, over this call's mask tokens or rows with tokens): ``clip_frac``,
        ``clip_frac_low`` (A < 0, d < -eps_low), ``clip_frac_high`` (A > 0, d > eps_high), ``log_ratio_mean``
        (token mean of d), ``log_ratio_abs_max``, ``seq_ratio_mean`` (mean of r_i) and ``seq_ratio_max``.
    """
    if not isinstance(logps, Tensor) or logps.dim() != 2 or not logps.is_floating_point():
        raise ValueError(f"logps must be a 2-D floating-point tensor of shape (B, T), got {describe(logps)}")
    shape = tuple(logps.shape)
    if not isinstance(old_logps, Tensor) or tuple(old_logps.shape) != shape or not old_logps.is_floating_point():
        raise ValueError(
            f"old_logps must be a floating-point tensor of the shape of logps {shape}, got {describe(old_logps)}"
        )
    if not isinstance(mask, Tensor) or tuple(mask.shape) != shape:
        raise ValueError(f"mask must have the shape of logps {shape}, got {describe(mask)}")
    if not isinstance(advantages, Tensor) or tuple(advantages.shape) != shape[:1] or not advantages.is_floating_point():
        raise ValueError(
            f"advantages must be a 1-D floating-point tensor of shape ({shape[0]},), one per row of logps, "
            f"got {describe(advantages)}"
        )
    eps_low = checks.positive("eps_low", eps_low)
    eps_high = checks.positive("eps_high", eps_high)
    check_row_normalizer(normalizer)

    dtype = float_dtype(logps)
    keep = mask if mask.dtype == torch.bool else mask != 0
    adv = advantages.detach().to(dtype)
    if not bool(torch.isfinite(adv).all()):
        raise ValueError("advantages must be finite; got NaN or infinity")
    d = torch.where(keep, logps.to(dtype) - old_logps.detach().to(dtype), 0.0)
    if not bool(torch.isfinite(d).all()):
        raise ValueError("logps and old_logps must be finite on mask tokens; got NaN or infinity (check the masks)")

    n = keep.sum(-1)
    has_tokens = n > 0
    a = adv[:, None]
    high = keep & (a > 0) & (d > eps_high)  # capped at eps_high: no gradient
    low = keep & (a < 0) & (d < -eps_low)  # floored at -eps_low: no gradient
    # s * min(s * d, s * clip(d)) is d except on the capped tokens, and 0 where A = 0.
    clipped = torch.where(high, eps_high, torch.where(low, -eps_low, d))
    clipped = torch.where(keep & (a != 0), clipped, 0.0)
    z = clipped.sum(-1) / n.clamp(min=1).to(dtype)
    r = torch.exp(torch.where(has_tokens, z, 0.0))

    if normalizer is not None:
        denom = torch.as_tensor(normalizer, dtype=dtype, device=logps.device).detach().clamp(min=1.0)
    else:
        denom = has_tokens.sum().to(dtype).clamp(min=1.0)
    weight = torch.where(has_tokens, adv, 0.0)
    loss = -(weight * r).sum() / denom

    with torch.no_grad():
        credit = weight * r / denom
        n_tok = keep.sum().clamp(min=1).to(dtype)
        n_rows = has_tokens.sum().clamp(min=1).to(dtype)
        r_rows = torch.where(has_tokens, r, 0.0)
        metrics = {
            "clip_frac": (high | low).sum().to(dtype) / n_tok,
            "clip_frac_low": low.sum().to(dtype) / n_tok,
            "clip_frac_high": high.sum().to(dtype) / n_tok,
            "log_ratio_mean": d.sum() / n_tok,
            "log_ratio_abs_max": d.abs().amax() if d.numel() else torch.zeros((), dtype=dtype, device=d.device),
            "seq_ratio_mean": r_rows.sum() / n_rows,
            "seq_ratio_max": r_rows.amax() if r.numel() else torch.zeros((), dtype=dtype, device=d.device),
        }
        metrics = {k: v.detach() for k, v in metrics.items()}
    return LossOutput(loss, credit.detach(), metrics)
