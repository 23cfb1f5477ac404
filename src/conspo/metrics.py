"""Evaluation metrics (docs/objectives.md, section 11) as pure functions of per-sample outcomes; standard library only.

Every metric at ``k`` is the expectation over a uniformly random k-subset of the ``n`` samples drawn for a
problem, computed exactly (no resampling, no dependence on sample order):

- ``avg@k``  = E[mean correctness of the k samples] = ``c / n`` for every ``k <= n``.
- ``pass@k`` = P(at least one of the k samples is correct) = ``1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021).
- ``maj@k``  = E[correctness of the most frequent extracted answer among the k samples].

maj@k conventions (tested against enumeration of all k-subsets):

- Answers are grouped by their extracted string, as the verifier normalised it. A sample with no extracted
  answer (``None``) does not vote; a subset in which no sample has an answer scores 0.
- A tie for most frequent is broken uniformly at random, in expectation: the subset scores the fraction of the
  tied answers that are correct.
- An answer's correctness is the fraction of its samples judged correct (0 or 1 whenever the verifier judges
  the same extracted answer the same way, which is the usual case).

A problem's per-sample outcomes are booleans: a sample is correct when its verifier score is >= 1 (full
credit); ``summarize`` also reports the mean raw score for verifiers that give partial credit.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from fractions import Fraction

CORRECT_SCORE = 1.0
"""A sample counts as correct (for avg@k, pass@k, maj@k) when its verifier score is at least this."""


def _check(n: int, k: int) -> None:
    if n < 1:
        raise ValueError(f"need at least one sample per problem; got n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}]; got k={k}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k: ``1 - C(n-c, k) / C(n, k)``, with exact integer binomials (correctly rounded)."""
    _check(n, k)
    if not 0 <= c <= n:
        raise ValueError(f"c (correct samples) must be in [0, n={n}]; got c={c}")
    if n - c < k:
        return 1.0
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def avg_at_k(correct: Sequence[bool], k: int) -> float:
    """avg@k: expected fraction correct among k of the samples; ``c / n`` whatever ``k <= n``."""
    _check(len(correct), k)
    return sum(map(bool, correct)) / len(correct)


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int) -> float:
    """maj@k: expected correctness of the majority answer of a random k-subset (module docstring: ties,
    samples without an answer).

    Exact: for each possible winning count ``M``, a dynamic programme over the answers that have at least
    ``M`` samples counts the subsets in which the top count is ``M``, weighted by how many top answers there are
    and how many of them are correct; answers with fewer than ``M`` samples (and unanswered samples) form a
    pool that never reaches the top, chosen freely.
    """
    n = len(answers)
    if len(correct) != n:
        raise ValueError(f"{n} answers but {len(correct)} correctness flags")
    _check(n, k)
    sizes: dict[str, int] = defaultdict(int)
    right: dict[str, int] = defaultdict(int)
    for answer, ok in zip(answers, correct):
        if answer is not None:
            sizes[answer] += 1
            right[answer] += bool(ok)
    total = Fraction(0)
    for top in range(1, min(k, max(sizes.values(), default=0)) + 1):
        contenders = [(sizes[a], right[a]) for a in sizes if sizes[a] >= top]
        pool = n - sum(size for size, _ in contenders)
        scale = math.lcm(*(size for size, _ in contenders))  # makes each answer's correctness an integer
        # (chosen so far, answers at the top) -> [subsets, sum over subsets of scale * correct answers at the top]
        states: dict[tuple[int, int], list[int]] = {(0, 0): [1, 0]}
        for size, good in contenders:
            value = good * scale // size
            nxt: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0])
            for (chosen, at_top), (ways, credit) in states.items():
                for x in range(min(top, size, k - chosen) + 1):
                    w = math.comb(size, x)
                    cell = nxt[(chosen + x, at_top + (x == top))]
                    cell[0] += w * ways
                    cell[1] += w * (credit + value * ways if x == top else credit)
            states = nxt
        for (chosen, at_top), (_, credit) in states.items():
            if at_top:
                total += Fraction(credit * math.comb(pool, k - chosen), at_top * scale)
    return float(total / math.comb(n, k))


def problem_metrics(answers: Sequence[str | None], correct: Sequence[bool], ks: Sequence[int]) -> dict[str, float]:
    """``{"avg@k", "pass@k", "maj@k"}`` for each k of one problem's samples."""
    n, c = len(correct), sum(map(bool, correct))
    out: dict[str, float] = {}
    for k in ks:
        out[f"avg@{k}"] = avg_at_k(correct, k)
        out[f"pass@{k}"] = pass_at_k(n, c, k)
        out[f"maj@{k}"] = maj_at_k(answers, correct, k)
    return out


def metric_names(ks: Sequence[int]) -> list[str]:
    """The metric keys in reporting order: every avg@k, then pass@k, then maj@k."""
    return [f"{name}@{k}" for name in ("avg", "pass", "maj") for k in ks]


def _aggregate(problems: list[list[dict]], ks: Sequence[int]) -> dict:
    per_problem = [
        problem_metrics([r["extracted"] for r in rs], [r["score"] >= CORRECT_SCORE for r in rs], ks) for rs in problems
    ]
    samples = [r for rs in problems for r in rs]
    out: dict = {"problems": len(problems), "samples": len(samples)}
    for name in metric_names(ks):
        out[name] = sum(m[name] for m in per_problem) / len(per_problem)
    out["mean_score"] = sum(r["score"] for r in samples) / len(samples)
    lengths = [r["length"] for r in samples]
    out["length"] = {
        "mean": sum(lengths) / len(lengths),
        "min": min(lengths),
        "max": max(lengths),
        "truncated": sum(bool(r["truncated"]) for r in samples) / len(samples),
    }
    return out


NO_SUBSET = "(none)"
"""The subset name of problems that have none, when some others do."""


def summarize(records: Sequence[dict], ks: Sequence[int]) -> dict:
    """Metrics over problems (each problem weighs the same), overall and per subset.

    ``records``: one per sample, with ``problem`` (index), ``subset`` (or None), ``extracted``, ``score``,
    ``length`` and ``truncated``. Every problem must have at least ``max(ks)`` samples.
    Returns ``{"ks", "overall": {...}, "subsets": {name: {...}}}``; each block holds ``problems``, ``samples``,
    the metrics of ``metric_names(ks)``, ``mean_score`` and ``length`` (mean/min/max tokens, fraction truncated).
    ``subsets`` is empty when no problem has a subset.
    """
    if not records:
        raise ValueError("no records to summarize")
    ks = sorted(set(ks))
    by_problem: dict[int, list[dict]] = defaultdict(list)
    for record in records:
        by_problem[record["problem"]].append(record)
    short = {p: len(rs) for p, rs in by_problem.items() if len(rs) < ks[-1]}
    if short:
        raise ValueError(f"k={ks[-1]} needs at least {ks[-1]} samples per problem; problems {sorted(short)[:5]} have fewer")
    problems = [by_problem[p] for p in sorted(by_problem)]
    subsets: dict[str, list[list[dict]]] = defaultdict(list)
    if any(rs[0]["subset"] is not None for rs in problems):
        for rs in problems:
            subsets[NO_SUBSET if rs[0]["subset"] is None else str(rs[0]["subset"])].append(rs)
    return {
        "ks": ks,
        "overall": _aggregate(problems, ks),
        "subsets": {name: _aggregate(subsets[name], ks) for name in sorted(subsets)},
    }
