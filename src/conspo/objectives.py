"""The math core of conspo: sequence scores, the ConSPO and DisCO objectives, credits, margins.

Everything here is a pure function of torch tensors and imports nothing but torch. The contract is
``shared/spec/objectives.md``; section numbers below refer to it.

Shapes are named once:

* ``B`` rollouts in a batch (completions of several prompts, each prompt a *group*),
* ``T`` completion tokens (right-padded, with a 0/1 mask),
* ``G`` rollouts per group (groups may differ in size here).

Groups are given by an integer id per rollout. Ids are arbitrary and members need not be contiguous.
No function loops over groups in Python: groups are compacted to ``0..K-1`` by a sort, and per-group
sums use ``index_add``/``scatter_reduce`` into buffers of length ``B`` (``K <= B``), so the cost stays
flat in the number of groups and nothing forces a device synchronisation apart from the input checks.

ConSPO (Zhang et al., arXiv 2605.12969) is reconstructed from its abstract; see ``README.md`` and
spec section 4 for which choices are ours. DisCO is Li et al., arXiv 2505.12366.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "LossOutput",
    "TrustRegion",
    "sequence_scores",
    "conspo_loss",
    "disco_loss",
    "margin_at",
    "kl_trust_region",
    "grpo_credit",
    "separation_metrics",
    "MARGIN_SCHEDULES",
    "NEG_REDUCES",
    "GROUP_NORMS",
    "DISCO_VARIANTS",
]

MARGIN_SCHEDULES = ("constant", "linear", "cosine", "step")
NEG_REDUCES = ("sum", "mean")
GROUP_NORMS = ("valid", "all")
DISCO_VARIANTS = ("dro", "basic")


@dataclass(frozen=True)
class LossOutput:
    """What an objective returns.

    loss:    0-d tensor, the true value of the objective (to minimise), differentiable in ``scores``.
    credit:  (B,) ``-dloss/dscores`` in closed form, detached. Positive credit raises a rollout's score.
    metrics: detached 0-d tensors (spec section 10), keyed by plain names such as ``"score_gap"``.
    """

    loss: Tensor
    credit: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class TrustRegion(NamedTuple):
    """``penalty`` carries the gradient of spec section 6; ``kl`` is the detached KL(pi_old || pi) estimate."""

    penalty: Tensor
    kl: Tensor


# --------------------------------------------------------------------------------------------------
# Input checks. Every error names the argument and what is accepted.
# --------------------------------------------------------------------------------------------------


def _choice(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; accepted values: {', '.join(map(repr, accepted))}")


def _positive_finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _float_dtype(t: Tensor) -> torch.dtype:
    """float32 or wider: half-precision inputs are promoted, float64 stays float64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_group_inputs(scores: Tensor, correct: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if not isinstance(scores, Tensor) or scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError(f"scores must be a 1-D floating-point tensor of shape (B,), got {_describe(scores)}")
    b = scores.shape[0]
    if not isinstance(correct, Tensor) or correct.shape != (b,):
        raise ValueError(f"correct must be a tensor of shape ({b},) matching scores, got {_describe(correct)}")
    if not isinstance(group_ids, Tensor) or group_ids.shape != (b,):
        raise ValueError(f"group_ids must be a tensor of shape ({b},) matching scores, got {_describe(group_ids)}")
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    if correct.dtype != torch.bool:
        if not bool(((correct == 0) | (correct == 1)).all()):
            raise ValueError("correct must be a bool tensor or hold only 0 and 1; threshold rewards before the loss")
        correct = correct != 0
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite; got NaN or infinity (check the log-probabilities and masks)")
    return scores, correct, group_ids


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


# --------------------------------------------------------------------------------------------------
# Group bookkeeping without Python loops.
# --------------------------------------------------------------------------------------------------


class _Groups(NamedTuple):
    index: Tensor  # (B,) compact group index in 0..K-1
    size: int  # B: length of the per-group buffers (only the first K are used)
    present: Tensor  # (B,) bool, slot k holds a group
    n_pos: Tensor  # (B,) positives per group slot
    n_neg: Tensor  # (B,) negatives per group slot
    valid: Tensor  # (B,) bool, the group has >= 1 positive and >= 1 negative


def _groups(correct: Tensor, group_ids: Tensor) -> _Groups:
    b = group_ids.shape[0]
    sorted_ids, order = torch.sort(group_ids, stable=True)
    starts = torch.ones(b, dtype=torch.bool, device=group_ids.device)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    index = torch.empty_like(order)
    index[order] = torch.cumsum(starts, 0) - 1
    pos = correct.to(torch.long)
    n_pos = torch.zeros(b, dtype=torch.long, device=group_ids.device).index_add_(0, index, pos)
    n_all = torch.zeros(b, dtype=torch.long, device=group_ids.device).index_add_(0, index, torch.ones_like(pos))
    n_neg = n_all - n_pos
    return _Groups(index, b, n_all > 0, n_pos, n_neg, (n_pos > 0) & (n_neg > 0))


def _group_sum(values: Tensor, groups: _Groups) -> Tensor:
    return torch.zeros(groups.size, dtype=values.dtype, device=values.device).index_add_(0, groups.index, values)


def _neg_logsumexp(x: Tensor, neg: Tensor, groups: _Groups) -> tuple[Tensor, Tensor]:
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
    total = _group_sum(shifted, groups)
    safe_total = torch.where(groups.n_neg > 0, total, torch.ones_like(total))
    lse = torch.log(safe_total) + peak
    pi = shifted / safe_total[groups.index]
    return lse, pi


def _group_norm_denominator(
    groups: _Groups, group_norm: str, dtype: torch.dtype, normalizer: float | Tensor | None
) -> Tensor:
    if normalizer is not None:
        # The caller counted the groups over the whole optimizer-step batch (micro-batching, several ranks).
        value = torch.as_tensor(normalizer, dtype=dtype, device=groups.index.device)
        return value.detach().clamp(min=1.0)
    count = groups.valid if group_norm == "valid" else groups.present
    return count.sum().to(dtype).clamp(min=1.0)


def _check_normalizer(normalizer: float | Tensor | None) -> None:
    if normalizer is None:
        return
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1 or normalizer.dtype == torch.bool:
            raise ValueError(f"normalizer must be a number or a 1-element tensor, got {_describe(normalizer)}")
        return  # a device tensor is not read back here: that would force a synchronisation
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)) or not 0 <= normalizer < math.inf:
        raise ValueError(f"normalizer must be None or a finite number >= 0 (a group count), got {normalizer!r}")


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    return num / torch.where(den > 0, den, torch.ones_like(den))


# --------------------------------------------------------------------------------------------------
# Public functions.
# --------------------------------------------------------------------------------------------------


def sequence_scores(logps: Tensor, mask: Tensor) -> Tensor:
    """Length-normalised sequence log-probability (spec section 4).

    ``s_i = (1/|o_i|) * sum_t logp_{i,t}``, computed in float32 (float64 stays float64).

    Args:
        logps: (B, T) token log-probabilities of the sampled tokens.
        mask:  (B, T) 1 for completion tokens, 0 for padding (bool, integer or float).

    Returns:
        (B,) scores. A row with no token scores 0; padded positions never leak, even if they hold NaN.
    """
    if not isinstance(logps, Tensor) or logps.dim() != 2 or not logps.is_floating_point():
        raise ValueError(f"logps must be a 2-D floating-point tensor of shape (B, T), got {_describe(logps)}")
    if not isinstance(mask, Tensor) or mask.shape != logps.shape:
        raise ValueError(f"mask must have the shape of logps {tuple(logps.shape)}, got {_describe(mask)}")
    dtype = _float_dtype(logps)
    keep = mask if mask.dtype == torch.bool else mask != 0
    total = torch.where(keep, logps.to(dtype), 0.0).sum(-1)
    length = keep.sum(-1).clamp(min=1).to(dtype)
    return total / length


def conspo_loss(
    scores: Tensor,
    correct: Tensor,
    group_ids: Tensor,
    *,
    tau: float = 0.1,
    margin: float = 0.0,
    neg_reduce: str = "sum",
    group_norm: str = "valid",
    normalizer: float | Tensor | None = None,
) -> LossOutput:
    """ConSPO's group-wise InfoNCE objective on sequence scores (spec section 4).

    For a group with positives P and negatives N, each positive i is contrasted with N only::

        l_i     = tau * softplus( LSE_{j in N}(s_j / tau) - (s_i - m) / tau ) = -tau * log q_i
        L_group = mean_{i in P} l_i
        L       = sum over valid groups of L_group / |V|       (group_norm="valid"; "all": / #groups)

    ``neg_reduce="mean"`` subtracts ``log |N|`` inside the softplus. Groups with no positive or no
    negative contribute exactly zero loss and gradient. The credit is ``-dL/ds``::

        positive i:  g_i / |P| / norm        with g_i = 1 - q_i (the gate)
        negative j: -(sum_{i in P} g_i) / |P| / norm * softmax_{N}(s / tau)_j

    Args:
        scores:    (B,) sequence scores, e.g. from :func:`sequence_scores`.
        correct:   (B,) bool, the verifier's verdict.
        group_ids: (B,) integer id of each rollout's prompt group.
        tau:       temperature, > 0 (default 0.1, the order of the within-group score spread).
        margin:    m >= 0 subtracted from each positive's score (see :func:`margin_at`).
        neg_reduce: "sum" (standard InfoNCE) or "mean".
        group_norm: "valid" or "all".
        normalizer: when this call sees only part of an optimizer-step batch (a micro-batch of whole
            groups), the number of groups that ``group_norm`` counts over the *whole* batch, so that the
            micro-batch losses add up to the full-batch loss. Default: count the groups of this call.
    """
    scores, correct, group_ids = _check_group_inputs(scores, correct, group_ids)
    tau = _positive_finite("tau", tau)
    _check_normalizer(normalizer)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    _choice("neg_reduce", neg_reduce, NEG_REDUCES)
    _choice("group_norm", group_norm, GROUP_NORMS)

    dtype = _float_dtype(scores)
    s = scores.to(dtype)
    groups = _groups(correct, group_ids)
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
        push = _group_sum(pos_credit, groups)  # per group: sum_i g_i / |P| / norm
        credit = torch.where(active, pos_credit, -push[groups.index] * pi)
        metrics = separation_metrics(s, correct, group_ids, _groups_cache=groups)
        n_active = active.sum().clamp(min=1).to(dtype)
        metrics["gate_mean"] = torch.where(active, gate, 0.0).sum() / n_active
        metrics["gate_frac_below_0.1"] = (active & (gate < 0.1)).sum().to(dtype) / n_active
        metrics["neg_entropy"] = _neg_entropy(pi, neg, groups, dtype)
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
    """DisCO's discriminative objective on sequence scores (spec section 7; Li et al., arXiv 2505.12366).

    Per valid group the objective to maximise is::

        basic: mean_{i in P} s_i - mean_{j in N} s_j
        dro:   mean_{i in P} s_i - tau * LSE_{j in N}(s_j / tau)

    The returned loss is its negative averaged over valid groups (``group_norm="all"``: over all groups),
    the true objective value. Credit: ``+1/|P|/norm`` on positives; ``-1/|N|/norm`` (basic) or
    ``-softmax_N(s/tau)_j/norm`` (dro) on negatives. The KL trust region is :func:`kl_trust_region`.
    ``normalizer`` is as in :func:`conspo_loss`.
    """
    scores, correct, group_ids = _check_group_inputs(scores, correct, group_ids)
    tau = _positive_finite("tau", tau)
    _check_normalizer(normalizer)
    _choice("variant", variant, DISCO_VARIANTS)
    _choice("group_norm", group_norm, GROUP_NORMS)

    dtype = _float_dtype(scores)
    s = scores.to(dtype)
    groups = _groups(correct, group_ids)
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
            metrics["neg_entropy"] = _neg_entropy(pi, neg, groups, dtype)
    return LossOutput(loss, credit.detach(), metrics)


def _neg_entropy(pi: Tensor, neg: Tensor, groups: _Groups, dtype: torch.dtype) -> Tensor:
    """Mean over valid groups of the entropy of the softmax over negatives (nats)."""
    plogp = torch.where(neg & (pi > 0), pi * torch.log(pi.clamp(min=1e-38)), 0.0)
    entropy = -_group_sum(plogp, groups)
    n_valid = groups.valid.sum().clamp(min=1).to(dtype)
    return torch.where(groups.valid, entropy, 0.0).sum() / n_valid


def separation_metrics(
    scores: Tensor, correct: Tensor, group_ids: Tensor, *, _groups_cache: _Groups | None = None
) -> dict[str, Tensor]:
    """Diagnostics shared by every method (spec section 10), detached 0-d tensors.

    * ``score_gap``: mean over valid groups of ``mean_P s - mean_N s``.
    * ``auc``: mean over valid groups of the group's separation AUC, the fraction of (positive, negative)
      pairs with ``s_pos > s_neg`` (ties count 1/2), computed from within-group mid-ranks (Mann-Whitney).
    * ``valid_frac``: fraction of groups with at least one positive and one negative.
    * ``reward_mean``: fraction of correct rollouts.
    * ``score_sd``: median over groups of two rows or more of the within-group standard deviation of the scores
      (population sd; the mean of the two middle values for an even count; 0 with no such group). Added here, not
      in the spec: ConSPO's tau is calibrated from it at the start of training (docs/results.md).

    With no valid group, ``score_gap`` is 0 and ``auc`` is 0.5 (no information).
    """
    if _groups_cache is None:
        scores, correct, group_ids = _check_group_inputs(scores, correct, group_ids)
    dtype = _float_dtype(scores)
    s = scores.detach().to(dtype)
    groups = _groups_cache if _groups_cache is not None else _groups(correct, group_ids)
    b = s.shape[0]
    device = s.device
    if b == 0:
        zero = torch.zeros((), dtype=dtype, device=device)
        return {"score_gap": zero, "auc": zero + 0.5, "valid_frac": zero, "reward_mean": zero, "score_sd": zero}
    n_pos = groups.n_pos.to(dtype)
    n_neg = groups.n_neg.to(dtype)
    pos_f = correct.to(dtype)
    mean_pos = _safe_div(_group_sum(s * pos_f, groups), n_pos)
    mean_neg = _safe_div(_group_sum(s * (1 - pos_f), groups), n_neg)
    n_valid = groups.valid.sum().to(dtype)
    per_group_gap = torch.where(groups.valid, mean_pos - mean_neg, 0.0)

    # Mid-ranks inside each group: sort by (group, score), then give tied runs their average position.
    by_score = torch.argsort(s, stable=True)
    order = by_score[torch.argsort(groups.index[by_score], stable=True)]
    g_sorted = groups.index[order]
    s_sorted = s[order]
    new_run = torch.ones(b, dtype=torch.bool, device=device)
    new_run[1:] = (g_sorted[1:] != g_sorted[:-1]) | (s_sorted[1:] != s_sorted[:-1])
    run = torch.cumsum(new_run, 0) - 1
    position = torch.arange(b, device=device)
    big = torch.full((b,), b, dtype=torch.long, device=device)
    run_start = big.scatter_reduce(0, run, position, reduce="amin", include_self=True)
    run_len = torch.zeros(b, dtype=torch.long, device=device).index_add_(0, run, torch.ones_like(run))
    group_start = big.scatter_reduce(0, g_sorted, position, reduce="amin", include_self=True)
    rank_sorted = (run_start[run] - group_start[g_sorted]).to(dtype) + (run_len[run].to(dtype) + 1) / 2
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    rank_sum_pos = _group_sum(rank * pos_f, groups)
    u = rank_sum_pos - n_pos * (n_pos + 1) / 2
    per_group_auc = torch.where(groups.valid, _safe_div(u, n_pos * n_neg), 0.0)

    denom = n_valid.clamp(min=1)
    n_groups = groups.present.sum().to(dtype)
    return {
        "score_gap": per_group_gap.sum() / denom,
        "auc": torch.where(n_valid > 0, per_group_auc.sum() / denom, torch.full_like(denom, 0.5)),
        "valid_frac": n_valid / n_groups.clamp(min=1),
        "reward_mean": pos_f.mean(),
        "score_sd": _median_group_sd(s, groups),
    }


def _median_group_sd(s: Tensor, groups: _Groups) -> Tensor:
    """Median over groups with >= 2 rows of the within-group population sd of ``s``; 0-d, no host sync."""
    count = (groups.n_pos + groups.n_neg).to(s.dtype)
    mean = _safe_div(_group_sum(s, groups), count)
    dev = s - mean[groups.index]
    sd = _safe_div(_group_sum(dev * dev, groups), count).clamp(min=0).sqrt()
    multi = count > 1
    ranked = torch.sort(torch.where(multi, sd, torch.full_like(sd, float("inf")))).values
    k = multi.sum()
    middle = torch.stack([(k - 1).clamp(min=0) // 2, k // 2]).clamp(max=ranked.shape[0] - 1)
    median = ranked.index_select(0, middle).mean()
    return torch.where(k > 0, median, torch.zeros_like(median))


def margin_at(
    step: int,
    total_steps: int,
    *,
    schedule: str = "linear",
    m0: float = 0.0,
    m_max: float = 0.1,
    ramp_frac: float = 1.0,
    step_at: int | None = None,
) -> float:
    """The curriculum margin m(t) of spec section 5, at optimizer step ``step`` of ``total_steps``.

    With ``u = min(1, step / (ramp_frac * total_steps))``:

    * ``constant``: m_max
    * ``linear``:   m0 + (m_max - m0) * u
    * ``cosine``:   m0 + (m_max - m0) * (1 - cos(pi * u)) / 2
    * ``step``:     m0 before ``step_at``, m_max from ``step_at`` on (``step_at`` is required)
    """
    _choice("schedule", schedule, MARGIN_SCHEDULES)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    for name, value in (("m0", m0), ("m_max", m_max)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
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
    """DisCO's squared-hinge trust region on KL(pi_old || pi_theta) (spec section 6).

    ``KL`` is the token mean of ``old_logps - logps`` over all masked tokens of the batch, and::

        penalty = stopgrad( beta * max(KL - delta, 0) ) * KL

    so its gradient is ``beta * [KL - delta]_+ * grad KL``, zero while the policy stays inside ``delta``.

    Args:
        logps, old_logps: (B, T) token log-probabilities under pi_theta and pi_old.
        mask: (B, T) completion-token mask.
    """
    if not isinstance(logps, Tensor) or logps.dim() != 2 or not logps.is_floating_point():
        raise ValueError(f"logps must be a 2-D floating-point tensor of shape (B, T), got {_describe(logps)}")
    for name, t in (("old_logps", old_logps), ("mask", mask)):
        if not isinstance(t, Tensor) or t.shape != logps.shape:
            raise ValueError(f"{name} must have the shape of logps {tuple(logps.shape)}, got {_describe(t)}")
    delta = _positive_finite("delta", delta)
    beta = _positive_finite("beta", beta)
    dtype = _float_dtype(logps)
    keep = mask if mask.dtype == torch.bool else mask != 0
    diff = torch.where(keep, old_logps.detach().to(dtype) - logps.to(dtype), 0.0)
    kl = diff.sum() / keep.sum().clamp(min=1).to(dtype)
    coef = (beta * torch.clamp(kl - delta, min=0.0)).detach()
    return TrustRegion(coef * kl, kl.detach())


def grpo_credit(correct: Tensor, group_ids: Tensor) -> Tensor:
    """GRPO's per-rollout coefficient in the discriminative view (spec section 3), as float32 (B,).

    With binary rewards, population-std advantages and the per-sequence token mean, GRPO's per-group
    objective is ``sqrt(p(1-p)) * (mean_P s+ - mean_N s-)``, so each positive gets ``sqrt((1-p)/p)/G`` and
    each negative ``-sqrt(p/(1-p))/G`` whatever the scores are. Groups that are all correct or all wrong
    get 0.
    """
    if not isinstance(correct, Tensor) or correct.dim() != 1:
        raise ValueError(f"correct must be a 1-D tensor of shape (B,), got {_describe(correct)}")
    placeholder = torch.zeros(correct.shape[0], device=correct.device)
    _, correct, group_ids = _check_group_inputs(placeholder, correct, group_ids)
    groups = _groups(correct, group_ids)
    n_pos = groups.n_pos.to(torch.float32)
    size = (groups.n_pos + groups.n_neg).to(torch.float32)
    p = _safe_div(n_pos, size)
    pos_coef = torch.sqrt(_safe_div(1 - p, p)) / size.clamp(min=1)
    neg_coef = -torch.sqrt(_safe_div(p, 1 - p)) / size.clamp(min=1)
    per_row = torch.where(correct, pos_coef[groups.index], neg_coef[groups.index])
    return torch.where(groups.valid[groups.index], per_row, 0.0)
