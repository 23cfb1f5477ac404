"""Group codes: what the verl estimator tells the verl loss, one exact integer per rollout carried in float64.

One job: verl hands a policy loss per-token tensors of one micro-batch, never rewards or prompt ids, so the
``conspo``/``disco`` advantage estimator (:func:`compute_group_codes`) writes into ``advantages`` a code per
rollout, its verdict, its group, the group's size and the training step (:func:`encode_group_codes`), and the
loss decodes them (:func:`decode_micro_batch`), refusing a micro-batch that splits a group or mixes generation
batches. Imports no verl; ``conspo.verl_plugin`` registers these with verl.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from conspo import checks
from conspo.verl_options import section

__all__ = ["NEGATIVE", "POSITIVE", "EXCLUDED", "MAX_GROUP_SIZE", "MAX_GROUPS", "MAX_STEP", "encode_group_codes",
           "decode_group_codes", "compute_group_codes", "MicroBatch", "decode_micro_batch", "GROUP_SETTINGS"]

_log = logging.getLogger("conspo.verl_plugin")  # the plug-in's name, which users filter on

# Settings a user changes when groups arrive split; every integrity error names them.
GROUP_SETTINGS = (
    "keep each prompt's rollouts together in every micro-batch: trainer.v1.trainer_mode=conspo (verl's own "
    "batch balancing splits groups across data-parallel ranks), actor_rollout_ref.actor.use_dynamic_bsz=False, "
    "actor_rollout_ref.actor.shuffle=False, actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu a multiple of "
    "actor_rollout_ref.rollout.n, and actor_rollout_ref.actor.ppo_mini_batch_size a multiple of the "
    "data-parallel size"
)

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
    options = section(config, "conspo") or {}
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


@dataclass(frozen=True)
class MicroBatch:
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


def decode_micro_batch(advantages: Tensor, response_mask: Tensor, rollout_n: int | None) -> MicroBatch:
    """The rows that take part in the loss of one micro-batch, their groups and verdicts, from the (b, T) codes.

    Refuses advantages that are not codes, a micro-batch that mixes training steps, a group with only some of its
    rollouts here (each error names the verl settings to change), and groups of another size than ``rollout_n``.
    """
    if advantages.dtype != torch.float64:
        raise ValueError(
            f"loss_mode conspo/disco needs the group codes of algorithm.adv_estimator=conspo (or disco), which are "
            f"float64; got advantages of dtype {advantages.dtype}. Set algorithm.adv_estimator=conspo, and check that "
            "nothing between the estimator and the actor casts advantages."
        )
    b = advantages.shape[0]
    if b == 0:
        empty = torch.zeros(0, dtype=torch.long, device=advantages.device)
        return MicroBatch(empty, empty, empty.bool(), 0, 0)
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
            f"generation batch (use trainer.v1.trainer_mode=conspo, not an asynchronous trainer); {GROUP_SETTINGS}"
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
            f"would train on a wrong objective. To fix: {GROUP_SETTINGS}."
        )
    if rollout_n is not None and bool((size[included] != rollout_n).any()):
        raise ValueError(
            f"prompt groups of {sorted(set(size[included].tolist()))} rollouts, but actor_rollout_ref.rollout.n="
            f"{rollout_n}: the loss normalises by global_batch_size / rollout.n groups, so every group must hold "
            "rollout.n rollouts"
        )
    rows = included.nonzero().squeeze(-1)
    packed = _to_device(torch.stack([rows, group[rows], (state[rows] == POSITIVE).long()]), advantages.device)
    return MicroBatch(packed[0], packed[1], packed[2].bool(), int(step[0]), int(in_play.sum()))
