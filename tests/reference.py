"""A slow, obviously-correct reference for ``conspo.objectives``, written from ``shared/spec/objectives.md``.

Nothing here imports ``conspo``. Every function loops over groups (and over pairs, rows or tokens) in
Python and works in float64, so each line can be checked against the spec by eye. Losses are built from
torch ops on float64 tensors so that autograd gives the reference gradient; credits are also given in the
closed form of spec section 4 so that the two can be compared with each other.

Conventions the spec leaves open and the reference fixes (they match ``objectives.py``'s docstrings):
with no valid group the loss is 0, ``score_gap`` 0, ``auc`` 0.5, and the gate and entropy statistics 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

F64 = torch.float64


# ------------------------------------------------------------------------------------------------
# Bookkeeping
# ------------------------------------------------------------------------------------------------


def groups_of(group_ids: Tensor) -> dict[int, list[int]]:
    """Group id -> the rows of that group, in row order (ids are arbitrary integers, rows may interleave)."""
    groups: dict[int, list[int]] = {}
    for row, gid in enumerate(group_ids.tolist()):
        groups.setdefault(int(gid), []).append(row)
    return groups


def split(rows: list[int], correct: Tensor) -> tuple[list[int], list[int]]:
    """The positives P and negatives N among ``rows``."""
    pos = [i for i in rows if bool(correct[i])]
    neg = [j for j in rows if not bool(correct[j])]
    return pos, neg


def valid_groups(correct: Tensor, group_ids: Tensor) -> list[tuple[list[int], list[int]]]:
    """(P, N) of each group with |P| >= 1 and |N| >= 1 (the set V of spec section 4)."""
    out = []
    for rows in groups_of(group_ids).values():
        pos, neg = split(rows, correct)
        if pos and neg:
            out.append((pos, neg))
    return out


def lse(values: list[Tensor]) -> Tensor:
    """log(sum(exp(v))) over a non-empty list of 0-d tensors, shifted by the (detached) maximum."""
    assert values, "log-sum-exp over an empty set"
    peak = max(float(v.detach()) for v in values)
    return peak + torch.log(sum(torch.exp(v - peak) for v in values))


# ------------------------------------------------------------------------------------------------
# Scores (section 4)
# ------------------------------------------------------------------------------------------------


def sequence_scores(logps: Tensor, mask: Tensor) -> Tensor:
    """s_i = (1/|o_i|) sum_t logp_{i,t} over the masked tokens; a row without tokens scores 0."""
    rows = []
    for i in range(logps.shape[0]):
        tokens = [logps[i, t].to(F64) for t in range(logps.shape[1]) if bool(mask[i, t] != 0)]
        total = sum(tokens) if tokens else torch.zeros((), dtype=F64)
        rows.append(total / max(1, len(tokens)))
    return torch.stack(rows) if rows else torch.zeros(0, dtype=F64)


# ------------------------------------------------------------------------------------------------
# ConSPO (section 4)
# ------------------------------------------------------------------------------------------------


def _conspo_log_q(s: Tensor, i: int, neg: list[int], tau: float, margin: float, neg_reduce: str) -> Tensor:
    """log q_i, q_i = exp((s_i-m)/tau) / (exp((s_i-m)/tau) + sum_{j in N} exp(s_j/tau)) ("sum").

    "mean" replaces the sum over negatives by the mean (subtracts log|N| inside the softplus).
    """
    shift = math.log(len(neg)) if neg_reduce == "mean" else 0.0
    own = (s[i] - margin) / tau
    candidates = [own] + [s[j] / tau - shift for j in neg]
    return own - lse(candidates)


def _norm(correct: Tensor, group_ids: Tensor, group_norm: str) -> float:
    count = len(valid_groups(correct, group_ids)) if group_norm == "valid" else len(groups_of(group_ids))
    return float(max(count, 1))


def conspo_loss(
    scores: Tensor,
    correct: Tensor,
    group_ids: Tensor,
    *,
    tau: float = 0.1,
    margin: float = 0.0,
    neg_reduce: str = "sum",
    group_norm: str = "valid",
) -> Tensor:
    """L = (1/norm) sum_{g in V} mean_{i in P} (-tau log q_i); differentiable in ``scores`` (float64)."""
    s = scores.to(F64)
    total = torch.zeros((), dtype=F64)
    for pos, neg in valid_groups(correct, group_ids):
        l_group = sum(-tau * _conspo_log_q(s, i, neg, tau, margin, neg_reduce) for i in pos) / len(pos)
        total = total + l_group
    return total / _norm(correct, group_ids, group_norm)


def conspo_gates(scores: Tensor, correct: Tensor, group_ids: Tensor, *, tau: float, margin: float,
                 neg_reduce: str = "sum") -> list[float]:
    """g_i = 1 - q_i for every positive of every valid group."""
    s = scores.detach().to(F64)
    gates = []
    for pos, neg in valid_groups(correct, group_ids):
        for i in pos:
            gates.append(1.0 - math.exp(float(_conspo_log_q(s, i, neg, tau, margin, neg_reduce))))
    return gates


def softmax_over(s: Tensor, rows: list[int], tau: float) -> dict[int, float]:
    """pi_j = softmax_{j in rows}(s_j / tau), by the textbook formula with a max shift."""
    peak = max(float(s[j]) / tau for j in rows)
    weights = {j: math.exp(float(s[j]) / tau - peak) for j in rows}
    total = sum(weights.values())
    return {j: w / total for j, w in weights.items()}


def conspo_credit(scores: Tensor, correct: Tensor, group_ids: Tensor, *, tau: float = 0.1, margin: float = 0.0,
                  neg_reduce: str = "sum", group_norm: str = "valid") -> Tensor:
    """Closed-form c = -dL/ds of spec section 4 (divided by the group normaliser)."""
    s = scores.detach().to(F64)
    norm = _norm(correct, group_ids, group_norm)
    credit = torch.zeros(s.shape[0], dtype=F64)
    for pos, neg in valid_groups(correct, group_ids):
        gate = {i: 1.0 - math.exp(float(_conspo_log_q(s, i, neg, tau, margin, neg_reduce))) for i in pos}
        for i in pos:
            credit[i] = gate[i] / len(pos) / norm
        push = sum(gate.values()) / len(pos)
        for j, pi_j in softmax_over(s, neg, tau).items():
            credit[j] = -push * pi_j / norm
    return credit


def hinge_limit(scores: Tensor, correct: Tensor, group_ids: Tensor, *, margin: float = 0.0) -> float:
    """The tau -> 0 limit of ConSPO ("sum"): mean over valid groups of mean_{i in P} max(0, max_N s_j - s_i + m)."""
    s = scores.detach().to(F64)
    per_group = []
    for pos, neg in valid_groups(correct, group_ids):
        top = max(float(s[j]) for j in neg)
        per_group.append(sum(max(0.0, top - float(s[i]) + margin) for i in pos) / len(pos))
    return sum(per_group) / max(1, len(per_group))


# ------------------------------------------------------------------------------------------------
# DisCO (section 7)
# ------------------------------------------------------------------------------------------------


def disco_loss(scores: Tensor, correct: Tensor, group_ids: Tensor, *, tau: float = 10.0, variant: str = "dro",
               group_norm: str = "valid") -> Tensor:
    """-(1/norm) sum_{g in V} J_g with J_g = mean_P s - mean_N s (basic) or mean_P s - tau LSE_N(s/tau) (dro)."""
    s = scores.to(F64)
    total = torch.zeros((), dtype=F64)
    for pos, neg in valid_groups(correct, group_ids):
        positive = sum(s[i] for i in pos) / len(pos)
        if variant == "basic":
            negative = sum(s[j] for j in neg) / len(neg)
        else:
            negative = tau * lse([s[j] / tau for j in neg])
        total = total + (positive - negative)
    return -total / _norm(correct, group_ids, group_norm)


def disco_credit(scores: Tensor, correct: Tensor, group_ids: Tensor, *, tau: float = 10.0, variant: str = "dro",
                 group_norm: str = "valid") -> Tensor:
    """Closed-form -dL/ds: +1/|P| on positives, -1/|N| (basic) or -softmax_N(s/tau) (dro) on negatives, / norm."""
    s = scores.detach().to(F64)
    norm = _norm(correct, group_ids, group_norm)
    credit = torch.zeros(s.shape[0], dtype=F64)
    for pos, neg in valid_groups(correct, group_ids):
        for i in pos:
            credit[i] = 1.0 / len(pos) / norm
        share = {j: 1.0 / len(neg) for j in neg} if variant == "basic" else softmax_over(s, neg, tau)
        for j in neg:
            credit[j] = -share[j] / norm
    return credit


# ------------------------------------------------------------------------------------------------
# Diagnostics (section 10)
# ------------------------------------------------------------------------------------------------


def separation_metrics(scores: Tensor, correct: Tensor, group_ids: Tensor) -> dict[str, float]:
    """score_gap, auc (brute force over pairs, ties 1/2), valid_frac, reward_mean, score_sd."""
    s = scores.detach().to(F64).tolist()
    vgroups = valid_groups(correct, group_ids)
    gaps, aucs = [], []
    for pos, neg in vgroups:
        gaps.append(sum(s[i] for i in pos) / len(pos) - sum(s[j] for j in neg) / len(neg))
        wins = 0.0
        for i in pos:
            for j in neg:
                wins += 1.0 if s[i] > s[j] else (0.5 if s[i] == s[j] else 0.0)
        aucs.append(wins / (len(pos) * len(neg)))
    n_rows = len(s)
    n_groups = len(groups_of(group_ids))
    return {
        "score_gap": sum(gaps) / len(gaps) if gaps else 0.0,
        "auc": sum(aucs) / len(aucs) if aucs else 0.5,
        "valid_frac": len(vgroups) / n_groups if n_groups else 0.0,
        "reward_mean": sum(bool(c) for c in correct.tolist()) / n_rows if n_rows else 0.0,
        "score_sd": _median_group_sd(s, group_ids),
    }


def _median_group_sd(s: list[float], group_ids: Tensor) -> float:
    """Median over groups of two rows or more of the population sd of their scores (statistics module)."""
    import statistics

    sds = [statistics.pstdev([s[i] for i in rows]) for rows in groups_of(group_ids).values() if len(rows) > 1]
    return statistics.median(sds) if sds else 0.0


def neg_entropy(scores: Tensor, correct: Tensor, group_ids: Tensor, *, tau: float) -> float:
    """Mean over valid groups of the entropy (nats) of softmax_{j in N}(s_j / tau)."""
    s = scores.detach().to(F64)
    entropies = []
    for _, neg in valid_groups(correct, group_ids):
        pi = softmax_over(s, neg, tau)
        entropies.append(-sum(p * math.log(p) for p in pi.values() if p > 0))
    return sum(entropies) / len(entropies) if entropies else 0.0


def neg_entropy_ratio(scores: Tensor, correct: Tensor, group_ids: Tensor, *, tau: float) -> float:
    """Mean over valid groups with at least two negatives of H(softmax_N(s / tau)) / log|N|; 1 without such."""
    s = scores.detach().to(F64)
    ratios = []
    for _, neg in valid_groups(correct, group_ids):
        if len(neg) < 2:
            continue
        pi = softmax_over(s, neg, tau)
        ratios.append(-sum(p * math.log(p) for p in pi.values() if p > 0) / math.log(len(neg)))
    return sum(ratios) / len(ratios) if ratios else 1.0


def conspo_metrics(scores: Tensor, correct: Tensor, group_ids: Tensor, *, tau: float, margin: float,
                   neg_reduce: str = "sum") -> dict[str, float]:
    """Every metric ``conspo_loss`` reports: separation metrics, gate statistics, negatives' entropy, margin."""
    gates = conspo_gates(scores, correct, group_ids, tau=tau, margin=margin, neg_reduce=neg_reduce)
    out = separation_metrics(scores, correct, group_ids)
    out["gate_mean"] = sum(gates) / len(gates) if gates else 0.0
    out["gate_sd"] = math.sqrt(sum((g - out["gate_mean"]) ** 2 for g in gates) / len(gates)) if gates else 0.0
    out["gate_frac_below_0.1"] = sum(g < 0.1 for g in gates) / len(gates) if gates else 0.0
    out["neg_entropy"] = neg_entropy(scores, correct, group_ids, tau=tau)
    out["neg_entropy_ratio"] = neg_entropy_ratio(scores, correct, group_ids, tau=tau)
    out["margin"] = float(margin)
    return out


# ------------------------------------------------------------------------------------------------
# GRPO (section 3)
# ------------------------------------------------------------------------------------------------


def grpo_group_objectives(logps: Tensor, old_logps: Tensor, mask: Tensor, correct: Tensor, group_ids: Tensor,
                          *, eps: float = 0.2) -> dict[int, float]:
    """GRPO's clipped per-group objective, straight from the token ratios.

    A_i = (r_i - p) / std(r) (population std, no epsilon); per rollout the token mean of
    min(rho A, clip(rho, 1-eps, 1+eps) A); per group the mean over its rollouts. Groups whose rewards
    are all equal have std 0 and are left out (every advantage is 0 there).
    """
    out = {}
    for gid, rows in groups_of(group_ids).items():
        rewards = [1.0 if bool(correct[i]) else 0.0 for i in rows]
        mean_r = sum(rewards) / len(rows)
        std_r = math.sqrt(sum((r - mean_r) ** 2 for r in rewards) / len(rows))
        if std_r == 0.0:
            continue
        per_rollout = []
        for i, r in zip(rows, rewards):
            adv = (r - mean_r) / std_r
            terms = []
            for t in range(logps.shape[1]):
                if bool(mask[i, t] != 0):
                    rho = math.exp(float(logps[i, t]) - float(old_logps[i, t]))
                    clipped = min(max(rho, 1.0 - eps), 1.0 + eps)
                    terms.append(min(rho * adv, clipped * adv))
            per_rollout.append(sum(terms) / max(1, len(terms)))
        out[gid] = sum(per_rollout) / len(rows)
    return out


def grpo_scores(logps: Tensor, old_logps: Tensor, mask: Tensor, correct: Tensor, *, eps: float = 0.2) -> list[float]:
    """s+_i = mean_t min(rho, 1+eps) for positives, s-_j = mean_t max(rho, 1-eps) for negatives."""
    out = []
    for i in range(logps.shape[0]):
        terms = []
        for t in range(logps.shape[1]):
            if bool(mask[i, t] != 0):
                rho = math.exp(float(logps[i, t]) - float(old_logps[i, t]))
                terms.append(min(rho, 1.0 + eps) if bool(correct[i]) else max(rho, 1.0 - eps))
        out.append(sum(terms) / max(1, len(terms)))
    return out


# ------------------------------------------------------------------------------------------------
# Trust region (section 6)
# ------------------------------------------------------------------------------------------------


def token_mean_kl(logps: Tensor, old_logps: Tensor, mask: Tensor) -> Tensor:
    """KL(pi_old || pi) estimated as the token mean of (logp_old - logp) over every masked token of the batch."""
    terms = [
        old_logps[i, t].to(F64) - logps[i, t].to(F64)
        for i in range(logps.shape[0])
        for t in range(logps.shape[1])
        if bool(mask[i, t] != 0)
    ]
    return sum(terms) / len(terms) if terms else torch.zeros((), dtype=F64)


# ------------------------------------------------------------------------------------------------
# GMPO (Zhao et al., arXiv 2507.20673) and GRPO's group-normalised advantages
# ------------------------------------------------------------------------------------------------


def gmpo_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, eps_low: float = 0.4,
              eps_high: float = 0.4, normalizer: float | None = None) -> Tensor:
    """GMPO's loss straight from the formula, one row and one token at a time.

    Per row i with tokens: z_i = mean over its mask tokens of s * min(s * d_t, s * clip(d_t, -eps_low, eps_high)),
    s = sgn(A_i), d_t = logp_t - old_logp_t; loss = -sum_i A_i * exp(z_i) / N, N = normalizer or the number of
    rows with a token. Rows without tokens are skipped. Built from float64 torch ops so autograd differentiates it.
    """
    total = torch.zeros((), dtype=F64)
    rows_with_tokens = 0
    for i in range(logps.shape[0]):
        a = float(advantages[i])
        s = 1.0 if a > 0 else (-1.0 if a < 0 else 0.0)
        terms = []
        for t in range(logps.shape[1]):
            if bool(mask[i, t] != 0):
                d = logps[i, t].to(F64) - float(old_logps[i, t])
                clipped = torch.clamp(d, -eps_low, eps_high)
                terms.append(s * min(s * d, s * clipped))
        if not terms:
            continue
        rows_with_tokens += 1
        z = sum(terms) / len(terms)
        total = total - a * torch.exp(z)
    n = normalizer if normalizer is not None else rows_with_tokens
    return total / max(float(n), 1.0)


def group_advantages(rewards: list[float], group_ids: list[int], *, scale: str = "group",
                     eps: float = 1e-4) -> list[float]:
    """(r_i - group mean) / (unbiased sd of the group, or of the batch for scale="batch", + eps); sd of one value 0."""

    def unbiased_sd(values: list[float]) -> float:
        if len(values) < 2:
            return 0.0
        mean = sum(values) / len(values)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))

    members: dict[int, list[int]] = {}
    for row, gid in enumerate(group_ids):
        members.setdefault(gid, []).append(row)
    out = [0.0] * len(rewards)
    batch_sd = unbiased_sd(list(rewards))
    for rows in members.values():
        values = [rewards[i] for i in rows]
        mean = sum(values) / len(values)
        sd = unbiased_sd(values) if scale == "group" else batch_sd
        for i in rows:
            out[i] = rewards[i] - mean if scale == "none" else (rewards[i] - mean) / (sd + eps)
    return out


# ------------------------------------------------------------------------------------------------
# The paper's Eq. 6 scores (Table 6 ablation), written as loops
# ------------------------------------------------------------------------------------------------


def clipped_ratio_scores(logps: Tensor, old_logps: Tensor, mask: Tensor, correct: Tensor, *, eps_low: float,
                         eps_high: float) -> Tensor:
    """Per rollout the token mean of min(rho, 1 + eps_high) (positives) or max(rho, 1 - eps_low) (negatives),
    rho = exp(logp - logp_old); 0 for a rollout without tokens. Differentiable in ``logps``."""
    rows = []
    for i in range(logps.shape[0]):
        terms = []
        for t in range(logps.shape[1]):
            if bool(mask[i, t] != 0):
                rho = torch.exp(logps[i, t].to(F64) - old_logps[i, t].detach().to(F64))
                if bool(correct[i]):
                    terms.append(torch.minimum(rho, torch.tensor(1.0 + eps_high, dtype=F64)))
                else:
                    terms.append(torch.maximum(rho, torch.tensor(1.0 - eps_low, dtype=F64)))
        rows.append(sum(terms) / len(terms) if terms else torch.zeros((), dtype=F64))
    return torch.stack(rows)
