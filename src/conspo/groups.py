"""Group bookkeeping for the math core: input checks, compact group indices and per-group sums, without loops.

One job: turn a batch's ``(B,)`` scores, verdicts and arbitrary group ids into the per-group counts and sums that
``conspo.objectives`` and ``conspo.diagnostics`` are written in. Groups are compacted to ``0..K-1`` by a sort, and
per-group sums use ``index_add`` into buffers of length ``B`` (``K <= B``), so the cost stays flat in the number of
groups and nothing forces a device synchronisation apart from the input checks. Imports only torch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Groups", "compact_groups", "group_sum", "safe_div", "float_dtype", "check_group_inputs", "describe",
           "check_normalizer", "check_row_normalizer"]


def float_dtype(t: Tensor) -> torch.dtype:
    """float32 or wider: half-precision inputs are promoted, float64 stays float64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_group_inputs(scores: Tensor, correct: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The three per-rollout inputs of every group objective, checked; ``correct`` as a bool tensor."""
    if not isinstance(scores, Tensor) or scores.dim() != 1 or not scores.is_floating_point():
        raise ValueError(f"scores must be a 1-D floating-point tensor of shape (B,), got {describe(scores)}")
    b = scores.shape[0]
    if not isinstance(correct, Tensor) or correct.shape != (b,):
        raise ValueError(f"correct must be a tensor of shape ({b},) matching scores, got {describe(correct)}")
    if not isinstance(group_ids, Tensor) or group_ids.shape != (b,):
        raise ValueError(f"group_ids must be a tensor of shape ({b},) matching scores, got {describe(group_ids)}")
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    if correct.dtype != torch.bool:
        if not bool(((correct == 0) | (correct == 1)).all()):
            raise ValueError("correct must be a bool tensor or hold only 0 and 1; threshold rewards before the loss")
        correct = correct != 0
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be finite; got NaN or infinity (check the log-probabilities and masks)")
    return scores, correct, group_ids


def describe(x: object) -> str:
    """A value as an error message shows it: a tensor by its shape and dtype, anything else by its type."""
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


class Groups(NamedTuple):
    index: Tensor  # (B,) compact group index in 0..K-1
    size: int  # B: length of the per-group buffers (only the first K are used)
    present: Tensor  # (B,) bool, slot k holds a group
    n_pos: Tensor  # (B,) positives per group slot
    n_neg: Tensor  # (B,) negatives per group slot
    valid: Tensor  # (B,) bool, the group has >= 1 positive and >= 1 negative


def compact_groups(correct: Tensor, group_ids: Tensor) -> Groups:
    """Arbitrary group ids compacted to ``0..K-1`` by a stable sort, with each group's positive and negative counts."""
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
    return Groups(index, b, n_all > 0, n_pos, n_neg, (n_pos > 0) & (n_neg > 0))


def group_sum(values: Tensor, groups: Groups) -> Tensor:
    """(B,) per-group sums of the (B,) ``values`` (slot k holds group k)."""
    return torch.zeros(groups.size, dtype=values.dtype, device=values.device).index_add_(0, groups.index, values)


def check_normalizer(normalizer: float | Tensor | None) -> None:
    """A group count given by the caller (micro-batching): None, a number >= 0 or a 1-element tensor."""
    if normalizer is None:
        return
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1 or normalizer.dtype == torch.bool:
            raise ValueError(f"normalizer must be a number or a 1-element tensor, got {describe(normalizer)}")
        # One scalar read back: the input checks already synchronise once, and a NaN count would make the loss NaN.
        value = float(normalizer)
        if not 0 <= value < math.inf:
            raise ValueError(f"normalizer must be a finite count >= 0, got {value!r}")
        return
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)) or not 0 <= normalizer < math.inf:
        raise ValueError(f"normalizer must be None or a finite number >= 0 (a group count), got {normalizer!r}")


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where ``den`` is 0 (``num`` is 0 there too: empty groups)."""
    return num / torch.where(den > 0, den, torch.ones_like(den))


def check_row_normalizer(normalizer: float | Tensor | None) -> None:
    """A sequence count given by the caller; a device tensor is not read back (no synchronisation)."""
    if normalizer is None:
        return
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1 or normalizer.dtype == torch.bool:
            raise ValueError(f"normalizer must be a number or a 1-element tensor, got {describe(normalizer)}")
        return  # a device tensor is not read back here: that would force a synchronisation
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)) or not 0 <= normalizer < math.inf:
        raise ValueError(f"normalizer must be None or a finite number >= 0 (a sequence count), got {normalizer!r}")
