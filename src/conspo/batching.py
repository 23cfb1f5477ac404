"""Cutting a generation batch into micro-batches whose optimizer steps hold whole groups: pure functions.

One job: the row bookkeeping behind ``ConSPOTrainer``'s exact group-coupled gradients (docs/objectives.md,
section 9), written as functions of a batch dict so that each is tested alone (tests/test_batching.py). Nothing
here talks to processes or models (``trl_split`` is TRL's own split, imported when called); the trainer gathers
the counts over processes and runs the forward passes.

A *batch* is TRL's dict of one generation batch on one process: per-row values are tensors whose first dimension
is the number of rows ``B`` (or lists of length ``B``), anything else (a scalar token count) is shared. TRL's
sampler lays a process's rows out as contiguous runs of ``G`` rollouts of one prompt, so local group ``k`` is rows
``k*G .. (k+1)*G - 1``. The trainer's own fields are ``conspo_correct`` (B,) bool, ``conspo_keep`` (B,) bool (the
row takes part in the loss) and ``conspo_group_ids`` (B,) long.

* ``whole_groups``: rows are shuffled at group granularity (:func:`shuffle_order` with ``by_groups``) and the
  batch is cut into equal micro-batches (:func:`split_steps`), so no group straddles a micro-batch; each
  micro-batch is normalised by the groups counted over its whole optimizer step (:func:`chunk_counts`,
  :func:`step_totals`).
* ``credit``: with one optimizer step per generation batch, rows are shuffled as TRL does and groups may straddle
  micro-batches; the trainer attaches the full-batch credits instead. With several optimizer steps per generation
  batch groups are shuffled whole here too, so every optimizer step still holds whole groups.
* Dynamic sampling keeps the *mixed* groups (a kept correct and a kept incorrect rollout: :func:`mixed_groups`),
  possibly from several generation rounds, and joins them into one batch (:func:`concat_groups`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

Batch = dict[str, Any]

__all__ = [
    "loss_mask", "take_rows", "slice_rows", "trl_split", "shuffle_order", "split_steps", "chunk_counts", "step_totals",
    "mixed_groups", "mixed_rows", "Selection", "collect_mixed_groups", "concat_groups", "pick_unused", "draw_prompts",
]

# Prompt tensors are left-padded, completions and per-token values right-padded. Keys padded on the left.
LEFT_PADDED = ("prompt_ids", "prompt_mask")


def loss_mask(batch: Batch) -> Tensor:
    """(B, T) the tokens in the loss: the completion mask, times the tool mask when tools masked some tokens."""
    mask = batch["completion_mask"]
    return mask if "tool_mask" not in batch else mask * batch["tool_mask"]


def _per_row(value: Any, n: int) -> bool:
    if isinstance(value, Tensor):
        return value.dim() >= 1 and value.shape[0] == n
    return isinstance(value, list) and len(value) == n


def take_rows(batch: Batch, order: Tensor, n: int) -> Batch:
    """The batch with every per-row value (first dimension ``n``) reordered by ``order``; other values as they are."""
    out = {}
    for key, value in batch.items():
        if not _per_row(value, n):
            out[key] = value
        elif isinstance(value, Tensor):
            out[key] = value[order.to(value.device)]
        else:
            out[key] = [value[i] for i in order.tolist()]
    return out


def slice_rows(batch: Batch, start: int, stop: int, n: int) -> Batch:
    """Rows ``start:stop`` of every per-row value (first dimension ``n``); other values as they are."""
    return {key: value[start:stop] if _per_row(value, n) else value for key, value in batch.items()}


def trl_split(batch: dict[str, Any], steps: int) -> list[dict[str, Any]]:
    """TRL's own shuffle and split of a generation batch (GRPOTrainer._prepare_inputs), for TRL's losses."""
    from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

    return split_tensor_dict(shuffle_sequence_dict(batch), steps)


def shuffle_order(group_ids: Tensor, g: int, *, by_groups: bool, generator: torch.Generator | None = None) -> Tensor:
    """(B,) a random order of the rows: whole groups of ``g`` contiguous rows moved together (``by_groups``), or
    single rows (TRL's own shuffle). Draws from ``generator``, by default torch's global one, as TRL does.

    With ``by_groups`` the rows must be runs of ``g`` equal ``group_ids``; otherwise a RuntimeError says so.
    """
    n = group_ids.shape[0]
    if not by_groups:
        return torch.randperm(n, generator=generator)
    runs = group_ids.view(-1, g) if n % g == 0 else None
    if runs is None or not torch.equal(runs, runs[:, :1].expand(-1, g)):
        raise RuntimeError(
            f"the local generation batch ({n} rollouts) does not hold whole groups of num_generations={g}; "
            f"set per_device_train_batch_size to a multiple of num_generations"
        )
    groups = torch.randperm(n // g, device=group_ids.device, generator=generator)
    return (groups[:, None] * g + torch.arange(g, device=group_ids.device)).flatten()


def split_steps(batch: Batch, order: Tensor, steps: int) -> list[Batch]:
    """The batch reordered by ``order`` and cut into ``steps`` micro-batches of equal size, in order."""
    n = batch["conspo_group_ids"].shape[0]
    batch = take_rows(batch, order, n)
    size = n // steps
    return [slice_rows(batch, i * size, (i + 1) * size, n) for i in range(steps)]


def chunk_counts(chunk: Batch, g: int, *, group_norm: str, whole_groups: bool) -> Tensor:
    """(3,) float: [groups counted by ``group_norm``, kept rollouts, loss tokens of kept rollouts] of a micro-batch.

    Groups are counted only when the micro-batch holds whole groups of ``g`` contiguous rows (``whole_groups``);
    ``group_norm="valid"`` counts the mixed groups, ``"all"`` every group with a kept row. Otherwise 0.
    """
    keep = chunk["conspo_keep"]
    groups = torch.zeros((), device=keep.device)
    if whole_groups:
        rows = keep.view(-1, g)
        correct = chunk["conspo_correct"].view(-1, g) & rows
        wrong = ~chunk["conspo_correct"].view(-1, g) & rows
        groups = (correct.any(1) & wrong.any(1)) if group_norm == "valid" else rows.any(1)
        groups = groups.sum().float()
    mask = loss_mask(chunk) * keep.unsqueeze(1)
    return torch.stack([groups, keep.sum().float(), mask.sum().float()])


def step_totals(counts: Tensor, accumulation: int) -> Tensor:
    """(steps // accumulation, 3): the counts of consecutive runs of ``accumulation`` micro-batches (one optimizer
    step each) added up. ``counts`` is (steps, 3), from :func:`chunk_counts`."""
    return counts.view(-1, accumulation, counts.shape[-1]).sum(1)


def _mixed(batch: Batch, g: int) -> Tensor:
    keep = batch["conspo_keep"].view(-1, g)
    correct = batch["conspo_correct"].view(-1, g)
    return (correct & keep).any(1) & (~correct & keep).any(1)


def mixed_groups(batch: Batch, g: int) -> list[int]:
    """Indices of the local groups (runs of ``g`` rows) that hold a kept correct and a kept incorrect rollout."""
    return _mixed(batch, g).nonzero().flatten().tolist()


def mixed_rows(batch: Batch, g: int) -> Tensor:
    """(B,) bool: the row belongs to a mixed group."""
    return _mixed(batch, g).repeat_interleave(g)


class Selection(NamedTuple):
    """The batches of one generation batch's rounds and the mixed groups found in them."""

    pieces: list[Batch]  # the generation batch, then one batch per extra round
    chosen: list[tuple[int, int]]  # (piece, local group index) of every mixed group, in the order generated
    rounds: int  # extra rounds generated


def collect_mixed_groups(batch: Batch, g: int, *, max_rounds: int, fewest: Callable[[int], int],
                         more: Callable[[int], Batch]) -> Selection:
    """DAPO's dynamic sampling: the mixed groups of ``batch``, then of extra rounds ``more(1)``, ``more(2)``, ...
    generated while ``fewest(found)`` (the smallest count found on any process; the identity on one process) is
    below the batch's number of groups, for at most ``max_rounds`` rounds (0: keep the batch's own mixed groups)."""
    target = batch["conspo_correct"].shape[0] // g
    pieces = [batch]
    chosen = [(0, k) for k in mixed_groups(batch, g)]
    rounds = 0
    while rounds < max_rounds and fewest(len(chosen)) < target:
        rounds += 1
        pieces.append(more(rounds))
        chosen += [(len(pieces) - 1, k) for k in mixed_groups(pieces[-1], g)]
    return Selection(pieces, chosen, rounds)


def concat_groups(parts: list[tuple[Batch, int]], g: int, pad_id: int) -> Batch:
    """The rows of the chosen groups, ``(batch, local group index)`` pairs from batches generated in different
    rounds, in that order, padded to common widths: prompts on the left, completions and per-token values on the
    right (ids with ``pad_id``, everything else with 0). Shared values are taken from the first batch."""
    first = parts[0][0]
    n = first["conspo_correct"].shape[0]
    out: Batch = {}
    for key, value in first.items():
        if not _per_row(value, n):
            out[key] = value
        elif isinstance(value, list):
            out[key] = [b[key][i] for b, k in parts for i in range(k * g, (k + 1) * g)]
        elif value.dim() == 1:
            out[key] = torch.cat([b[key][k * g : (k + 1) * g] for b, k in parts])
        else:
            rows = [b[key][k * g : (k + 1) * g] for b, k in parts]
            width = max(r.shape[1] for r in rows)
            fill = pad_id if ("_ids" in key and key != "conspo_group_ids") else 0
            padded = []
            for r in rows:
                pad = torch.full((r.shape[0], width - r.shape[1], *r.shape[2:]), fill, dtype=r.dtype, device=r.device)
                padded.append(torch.cat([pad, r] if key in LEFT_PADDED else [r, pad], dim=1))
            out[key] = torch.cat(padded)
    return out


def pick_unused(order: Iterable[int], key: Callable[[int], str], used: set[str], wanted: int) -> list[int]:
    """The first ``wanted`` indices of ``order`` whose ``key`` is not in ``used`` (each key taken once; ``used`` is
    updated). When ``order`` runs out first, the first pick (index 0 if none) fills the rest rather than stall."""
    picked: list[int] = []
    for i in order:
        if len(picked) == wanted:
            break
        k = key(i)
        if k not in used:
            used.add(k)
            picked.append(i)
    while len(picked) < wanted:
        picked.append(picked[len(picked) % max(1, len(picked))] if picked else 0)
    return picked


def draw_prompts(dataset: Sequence[dict], count: int, g: int, *, used: set[str], generator: torch.Generator,
                 world: int = 1, rank: int = 0) -> list[dict]:
    """``count`` rows of ``dataset`` for process ``rank`` of ``world``, each repeated ``g`` times as TRL's sampler
    lays them out. Every process walks one permutation drawn from ``generator`` (seeded alike on every process),
    skips the prompts in ``used`` (updated) and takes its consecutive slice, so no prompt appears twice in a
    generation batch while the dataset has enough of them, and the same seed draws the same prompts."""
    order = torch.randperm(len(dataset), generator=generator).tolist()
    picked = pick_unused(order, lambda i: repr(dataset[i]["prompt"]), used, count * world)
    rows = [dataset[i] for i in picked[rank * count : (rank + 1) * count]]
    return [row for row in rows for _ in range(g)]
