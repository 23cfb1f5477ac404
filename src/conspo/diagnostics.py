"""The diagnostics every method logs: how well scores separate correct from incorrect rollouts, and how the
contrastive objectives spread their credit (docs/objectives.md, section 10).

One job: detached 0-d tensors computed from a batch's scores, verdicts and groups, with no ``.item()`` (the only
host synchronisation is in the input checks): ``separation_metrics`` (score gap, AUC, valid fraction, reward mean, score spread) for every method,
and the spread of the credit over negatives (``neg_entropy``, ``neg_entropy_ratio``) and over positives
(``gate_metrics``) that ``conspo_loss`` and ``disco_loss`` add. Imports only torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from conspo.groups import Groups, check_group_inputs, compact_groups, float_dtype, group_sum, safe_div

__all__ = ["separation_metrics", "neg_entropy", "neg_entropy_ratio", "gate_metrics", "median_group_sd"]


def neg_entropy(pi: Tensor, neg: Tensor, groups: Groups, dtype: torch.dtype) -> Tensor:
    """Mean over valid groups of the entropy of the softmax over negatives (nats)."""
    plogp = torch.where(neg & (pi > 0), pi * torch.log(pi.clamp(min=1e-38)), 0.0)
    entropy = -group_sum(plogp, groups)
    n_valid = groups.valid.sum().clamp(min=1).to(dtype)
    return torch.where(groups.valid, entropy, 0.0).sum() / n_valid


def neg_entropy_ratio(pi: Tensor, neg: Tensor, groups: Groups, dtype: torch.dtype) -> Tensor:
    """How far the credit over negatives is from uniform: the mean over valid groups with two negatives or more of
    ``H(pi) / log |N|`` (1 = uniform, the linear-gap limit; small = concentrated on the highest-scoring negative).
    1 when no group has two negatives."""
    plogp = torch.where(neg & (pi > 0), pi * torch.log(pi.clamp(min=1e-38)), 0.0)
    entropy = -group_sum(plogp, groups)
    several = groups.valid & (groups.n_neg > 1)
    ratio = entropy / torch.log(groups.n_neg.clamp(min=2).to(dtype))
    count = several.sum().to(dtype)
    mean = torch.where(several, ratio, 0.0).sum() / count.clamp(min=1)
    return torch.where(count > 0, mean, torch.ones_like(mean))


def separation_metrics(
    scores: Tensor, correct: Tensor, group_ids: Tensor, *, _groups_cache: Groups | None = None
) -> dict[str, Tensor]:
    """Diagnostics shared by every method (docs/objectives.md, section 10), detached 0-d tensors.

    * ``score_gap``: mean over valid groups of ``mean_P s - mean_N s``.
    * ``auc``: mean over valid groups of the group's separation AUC, the fraction of (positive, negative)
      pairs with ``s_pos > s_neg`` (ties count 1/2), computed from within-group mid-ranks (Mann-Whitney).
    * ``valid_frac``: fraction of groups with at least one positive and one negative.
    * ``reward_mean``: fraction of correct rollouts.
    * ``score_sd``: median over groups of two rows or more of the within-group standard deviation of the scores
      (population sd; the mean of the two middle values for an even count; 0 with no such group). Added here, not
      in the paper: ConSPO's tau is calibrated from it at the start of training (docs/results.md).

    With no valid group, ``score_gap`` is 0 and ``auc`` is 0.5 (no information).
    """
    if _groups_cache is None:
        scores, correct, group_ids = check_group_inputs(scores, correct, group_ids)
    dtype = float_dtype(scores)
    s = scores.detach().to(dtype)
    groups = _groups_cache if _groups_cache is not None else compact_groups(correct, group_ids)
    b = s.shape[0]
    device = s.device
    if b == 0:
        zero = torch.zeros((), dtype=dtype, device=device)
        return {"score_gap": zero, "auc": zero + 0.5, "valid_frac": zero, "reward_mean": zero, "score_sd": zero}
    n_pos = groups.n_pos.to(dtype)
    n_neg = groups.n_neg.to(dtype)
    pos_f = correct.to(dtype)
    mean_pos = safe_div(group_sum(s * pos_f, groups), n_pos)
    mean_neg = safe_div(group_sum(s * (1 - pos_f), groups), n_neg)
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
    rank_sum_pos = group_sum(rank * pos_f, groups)
    u = rank_sum_pos - n_pos * (n_pos + 1) / 2
    per_group_auc = torch.where(groups.valid, safe_div(u, n_pos * n_neg), 0.0)

    denom = n_valid.clamp(min=1)
    n_groups = groups.present.sum().to(dtype)
    return {
        "score_gap": per_group_gap.sum() / denom,
        "auc": torch.where(n_valid > 0, per_group_auc.sum() / denom, torch.full_like(denom, 0.5)),
        "valid_frac": n_valid / n_groups.clamp(min=1),
        "reward_mean": pos_f.mean(),
        "score_sd": median_group_sd(s, groups),
    }


def median_group_sd(s: Tensor, groups: Groups) -> Tensor:
    """Median over groups with >= 2 rows of the within-group population sd of ``s``; 0-d, no host sync."""
    count = (groups.n_pos + groups.n_neg).to(s.dtype)
    mean = safe_div(group_sum(s, groups), count)
    dev = s - mean[groups.index]
    sd = safe_div(group_sum(dev * dev, groups), count).clamp(min=0).sqrt()
    multi = count > 1
    ranked = torch.sort(torch.where(multi, sd, torch.full_like(sd, float("inf")))).values
    k = multi.sum()
    middle = torch.stack([(k - 1).clamp(min=0) // 2, k // 2]).clamp(max=ranked.shape[0] - 1)
    median = ranked.index_select(0, middle).mean()
    return torch.where(k > 0, median, torch.zeros_like(median))


def gate_metrics(gate: Tensor, active: Tensor, dtype: torch.dtype) -> dict[str, Tensor]:
    """ConSPO's gates ``g_i = 1 - q_i`` over the positives of valid groups (``active``): their mean, population sd
    and the fraction below 0.1 (positives already well separated, which get little credit)."""
    n_active = active.sum().clamp(min=1).to(dtype)
    gate_mean = torch.where(active, gate, 0.0).sum() / n_active
    return {
        "gate_mean": gate_mean,
        "gate_sd": (torch.where(active, (gate - gate_mean) ** 2, 0.0).sum() / n_active).sqrt(),
        "gate_frac_below_0.1": (active & (gate < 0.1)).sum().to(dtype) / n_active,
    }

