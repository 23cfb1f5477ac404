"""The verl plug-in against the objectives core, through verl's own registries and config loading.

Runs only where verl is importable (``.venv-verl``, set up by ``bootstrap.py test``); elsewhere it is skipped.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("verl")
pytestmark = pytest.mark.verl

from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

from conspo import objectives as core  # noqa: E402
from conspo import verl_plugin as plugin  # noqa: E402

G = 4  # rollouts per prompt
T = 6  # response tokens


# --------------------------------------------------------------------------------------------------
# A fake verl batch: rewards, masks and uids as verl's driver holds them, log-probs as the actor sees them.
# --------------------------------------------------------------------------------------------------


def _batch(seed: int, n_groups: int = 6, drift: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    b = n_groups * G
    uids = [f"uid-{g}" for g in range(n_groups) for _ in range(G)]
    perm = torch.randperm(b, generator=gen)  # group members need not be contiguous
    uids = [uids[i] for i in perm.tolist()]
    lengths = torch.randint(1, T + 1, (b,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    correct = torch.rand(b, generator=gen) < 0.5
    by_group = {u: [i for i, v in enumerate(uids) if v == u] for u in dict.fromkeys(uids)}
    first, second, third = list(by_group.values())[:3]
    correct[first] = torch.tensor([True, False, False, True])  # at least one mixed group
    correct[second] = True  # all correct: contributes nothing
    correct[third] = False  # all wrong: contributes nothing
    rewards = torch.zeros(b, T)
    rewards[torch.arange(b), lengths - 1] = correct.float()
    old = -torch.rand(b, T, generator=gen, dtype=torch.float64) * 2
    new = old + drift * (torch.randn(b, T, generator=gen, dtype=torch.float64) - 0.5)  # KL(old || new) ~ drift / 2
    return uids, rewards, mask, old, new, correct


def _actor_config(method: str = "conspo", **options) -> ActorConfig:
    if method == "conspo":
        options.setdefault("margin_schedule", "constant")
    policy_loss = plugin.ConSPOPolicyLossConfig(loss_mode=method, **{method: options})
    return ActorConfig(strategy="fsdp", rollout_n=G, ppo_micro_batch_size_per_gpu=G, policy_loss=policy_loss)


def _codes(uids, rewards, mask, config=None, step=None):
    """The estimator's codes; ``step`` is what trainer mode conspo would pass (verl's global step minus one)."""
    estimator = get_adv_estimator_fn("conspo")
    plugin._StepSource.trainer_step = step
    try:
        advantages, _ = estimator(token_level_rewards=rewards, response_mask=mask, index=uids, config=config)
    finally:
        plugin._StepSource.trainer_step = None
    return advantages


def _trust_region_on(method, options):
    return options.get("trust_region", method == "disco")  # the defaults: off for conspo, on for disco


def _core_value_and_grad(method, old, new, mask, correct, uids, options, margin=0.0):
    logp = new.clone().requires_grad_(True)
    group = torch.tensor([int(u.split("-")[1]) for u in uids])
    scores = core.sequence_scores(logp, mask)
    if method == "conspo":
        out = core.conspo_loss(scores, correct, group, tau=options.get("tau", 10.0), margin=margin,
                               neg_reduce=options.get("neg_reduce", "sum"), group_norm="all")  # fmt: skip
    else:
        out = core.disco_loss(scores, correct, group, tau=options.get("tau", 10.0),
                              variant=options.get("disco_variant", "dro"), group_norm="all")  # fmt: skip
    total = out.loss
    if _trust_region_on(method, options):
        total = total + core.kl_trust_region(logp, old, mask).penalty
    total.backward()
    return total.detach(), logp.grad, out.loss.detach()


def _split_by_groups(uids, sizes_in_groups, seed=0):
    """Row-index lists of micro-batches holding whole groups, ``sizes_in_groups`` groups each."""
    order = list(dict.fromkeys(uids))
    gen = torch.Generator().manual_seed(seed)
    order = [order[i] for i in torch.randperm(len(order), generator=gen).tolist()]
    out, start = [], 0
    for n in sizes_in_groups:
        chosen = set(order[start : start + n])
        out.append([i for i, u in enumerate(uids) if u in chosen])
        start += n
    assert start == len(order)
    return out


def _run_plugin(method, config, old, new, mask, advantages, ranks, dp_size=1):
    """verl's view: each rank runs its micro-batches; DDP averages gradients over ranks."""
    logp = new.clone().requires_grad_(True)
    info = {"dp_size": dp_size, "global_batch_size": old.shape[0], "batch_num_tokens": int(mask.sum())}
    config.global_batch_info.clear()
    config.global_batch_info.update(info)
    loss_fn = get_policy_loss_fn(method)
    total = torch.zeros((), dtype=torch.float64)
    metrics = []
    for micro_batches in ranks:
        for rows in micro_batches:
            idx = torch.tensor(rows)
            loss, m = loss_fn(
                old_log_prob=old[idx], log_prob=logp[idx], advantages=advantages[idx], response_mask=mask[idx],
                loss_agg_mode="token-mean", config=config, rollout_is_weights=None,
            )  # fmt: skip
            total = total + loss / dp_size
            metrics.append(m)
    total.backward()
    return total.detach(), logp.grad, metrics


# Micro-batch splits of the 6 groups (in groups per micro-batch); "two ranks" also splits over data parallelism.
SPLITS = {"one micro-batch": [6], "one group each": [1] * 6, "uneven": [2, 3, 1], "two ranks": None}


def _rows_of(ranks):
    return [rows for micro_batches in ranks for rows in micro_batches]


def _ranks(uids, name):
    """(micro-batches of each rank, dp_size)."""
    if SPLITS[name] is not None:
        return [_split_by_groups(uids, SPLITS[name], seed=1)], 1
    order = list(dict.fromkeys(uids))
    halves = [order[:3], order[3:]]
    ranks = []
    for rank, half in enumerate(halves):
        rows = [i for i, u in enumerate(uids) if u in half]
        sub = [uids[i] for i in rows]
        parts = _split_by_groups(sub, [2, 1] if rank == 0 else [1, 2], seed=rank)
        ranks.append([[rows[j] for j in part] for part in parts])
    return ranks, 2


# --------------------------------------------------------------------------------------------------
# Exactness through verl's registry.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize(
    "method,options",
    [
        ("conspo", {}),
        ("conspo", {"tau": 0.05, "neg_reduce": "mean", "margin_schedule": "constant", "margin_max": 0.05}),
        ("conspo", {"tau": 0.1, "trust_region": True}),
        ("disco", {"disco_variant": "dro"}),
        ("disco", {"disco_variant": "basic", "trust_region": False}),
    ],
)
def test_value_and_gradient_equal_the_core_for_any_split(split, method, options):
    """First optimizer step after generation (log_prob == old_log_prob): objective (+ trust region), exact."""
    uids, rewards, mask, old, new, correct = _batch(seed=1)
    config = _actor_config(method, **options)
    ranks, dp = _ranks(uids, split)
    value, grad, metrics = _run_plugin(method, config, old, new, mask, _codes(uids, rewards, mask), ranks, dp)
    margin = options.get("margin_max", 0.01) if method == "conspo" else 0.0
    assert all((f"actor/{method}/trust_region" in m) == _trust_region_on(method, options) for m in metrics)
    ref_value, ref_grad, _ = _core_value_and_grad(method, old, new, mask, correct, uids, options, margin)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    assert bool((grad[~mask] == 0).all())
    assert float(grad.abs().sum()) > 0


@pytest.mark.parametrize("method", ["conspo", "disco"])
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("trust_region", [True, False])
def test_objective_exact_after_drift_and_trust_region_per_micro_batch(method, split, trust_region):
    """Later optimizer steps (log_prob != old_log_prob): the objective stays exact for any split; the hinge uses
    each micro-batch's KL weighted by its token share (docs/verl.md), exactly DisCO's for one micro-batch. Without
    the trust region (ConSPO's default) the whole loss is exact for any split."""
    uids, rewards, mask, old, new, correct = _batch(seed=2, drift=0.05)
    options = {"tau": 0.1, "trust_region": trust_region} if method == "conspo" else {"trust_region": trust_region}
    config = _actor_config(method, **options)
    ranks, dp = _ranks(uids, split)
    value, grad, metrics = _run_plugin(method, config, old, new, mask, _codes(uids, rewards, mask), ranks, dp)

    logp = new.clone().requires_grad_(True)
    group = torch.tensor([int(u.split("-")[1]) for u in uids])
    scores = core.sequence_scores(logp, mask)
    if method == "conspo":
        objective = core.conspo_loss(scores, correct, group, tau=0.1, margin=0.01, group_norm="all").loss
    else:
        objective = core.disco_loss(scores, correct, group, group_norm="all").loss
    n_tokens = mask.sum()
    trust = sum(
        core.kl_trust_region(logp[rows], old[rows], mask[rows]).penalty * mask[rows].sum() / n_tokens
        for micro_batches in ranks
        for rows in micro_batches
    ) if trust_region else 0.0  # fmt: skip
    (objective + trust).backward()
    torch.testing.assert_close(value, (objective + trust).detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, logp.grad, rtol=1e-10, atol=1e-14)
    reported = sum(float(m[f"actor/{method}/objective"]) for m in metrics) / dp
    assert reported == pytest.approx(float(objective.detach()), rel=1e-12)
    kl = sum(float(m[f"actor/{method}/kl"]) * float(mask[r].sum()) for m, r in zip(metrics, _rows_of(ranks)))
    assert kl / float(n_tokens) == pytest.approx(float(core.kl_trust_region(new, old, mask).kl), rel=1e-12)
    if not trust_region:
        assert not any(f"actor/{method}/trust_region" in m for m in metrics)
    elif split == "one micro-batch":
        single = core.kl_trust_region(new, old, mask)
        assert float(single.penalty) > 0  # the hinge is active here, and equals the spec's
        assert float(sum(m[f"actor/{method}/trust_region"] for m in metrics)) == pytest.approx(float(single.penalty))


# The paper's schedule over 10 training steps: cosine from 0 to 0.01 over the first 3, then 0.01.
PAPER_MARGINS = {0: 0.0, 1: 0.0025, 2: 0.0075, 3: 0.01, 9: 0.01}  # 0.01 * (1 - cos(pi * t / 3)) / 2


@pytest.mark.parametrize("step,margin", list(PAPER_MARGINS.items()))
def test_margin_is_the_papers_schedule_read_once_per_generation_batch(step, margin):
    """One generation batch (one verl training step) has one margin: every micro-batch of every mini-batch and
    PPO epoch reads m(step), the step the estimator wrote into the codes."""
    uids, rewards, mask, old, new, correct = _batch(seed=3, drift=0.05)  # drift: as in a later mini-batch
    config = _actor_config("conspo", margin_schedule="cosine", total_steps=10)
    assert config.policy_loss.conspo.margin(step) == pytest.approx(margin, abs=1e-15)
    assert core.margin_at(step, 10) == pytest.approx(margin, abs=1e-15)  # the core's (and TRL trainer's) default
    advantages = _codes(uids, rewards, mask, step=step)
    _codes(uids, rewards, mask, step=step + 1)  # the next generation batch does not change this one's margin
    for split in ([3, 3], [1, 2, 3], [6]):
        value, grad, metrics = _run_plugin("conspo", config, old, new, mask, advantages,
                                           [_split_by_groups(uids, split, seed=len(split))])  # fmt: skip
        assert [float(m["actor/conspo/margin"]) for m in metrics] == pytest.approx([margin] * len(split), abs=1e-15)
        ref_value, ref_grad, _ = _core_value_and_grad("conspo", old, new, mask, correct, uids, {}, margin=margin)
        torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)


def test_linear_margin_follows_the_training_step():
    uids, rewards, mask, old, new, correct = _batch(seed=3)
    config = _actor_config("conspo", margin_schedule="linear", margin_max=0.1, margin_ramp_frac=1.0, total_steps=10)
    advantages = _codes(uids, rewards, mask, step=4)  # what trainer mode conspo passes at verl's global step 5
    value, grad, metrics = _run_plugin("conspo", config, old, new, mask, advantages, [_split_by_groups(uids, [3, 3])])
    ref_value, ref_grad, _ = _core_value_and_grad("conspo", old, new, mask, correct, uids, {}, margin=0.04)
    assert float(metrics[0]["actor/conspo/margin"]) == pytest.approx(0.04)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)


def test_metrics_are_detached_tensors_under_actor_prefix():
    uids, rewards, mask, old, new, _ = _batch(seed=4)
    config = _actor_config("conspo")
    _, _, metrics = _run_plugin("conspo", config, old, new, mask, _codes(uids, rewards, mask), [[list(range(24))]])
    m = metrics[0]
    for key in ("score_gap", "auc", "score_sd", "valid_frac", "gate_mean", "neg_entropy", "margin", "kl", "objective"):
        value = m[f"actor/conspo/{key}"]
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
    assert 1 / 6 <= float(m["actor/conspo/valid_frac"]) <= 4 / 6


# --------------------------------------------------------------------------------------------------
# Rollouts without a token in the loss mask: the plug-in against the TRL trainer's path on the same rows.
# The TRL trainer drops such rows from their groups (conspo_keep) and computes the objective and every diagnostic
# on the rows it keeps; verl's loss must give the same loss, gradient and metrics.
# --------------------------------------------------------------------------------------------------

ZERO_TOKEN_GROUPS = [  # (the verdicts of a group's 4 rollouts, which of them have no token in the loss mask)
    ([1, 0, 0, 1], [1]),  # still mixed: 2 positives, 1 negative
    ([1, 0, 1, 1], [1]),  # its only negative leaves: all positive, no signal
    ([0, 0, 1, 0], [2]),  # its only positive leaves: all negative, no signal
    ([1, 0, 1, 0], [0, 3]),  # mixed, one of each left
    ([0, 1, 0, 0], []),
    ([1, 1, 0, 1], []),
]
ZERO_TOKEN_VALID_FRAC = 4 / 6  # 1.0 if the rows without tokens stayed in their groups


def _zero_token_batch(seed: int, drift: float = 0.05, empty_group: bool = False):
    """uids, rewards, the loss mask (no token on the rows listed above), a mask where those rows have tokens (what
    the estimator sees when only the loss mask drops them), old and new log-probs, verdicts and group ids."""
    gen = torch.Generator().manual_seed(seed)
    spec = [(c, list(range(G)) if empty_group and g == len(ZERO_TOKEN_GROUPS) - 1 else e)
            for g, (c, e) in enumerate(ZERO_TOKEN_GROUPS)]  # fmt: skip
    correct = torch.tensor([bool(v) for c, _ in spec for v in c])
    empty = torch.tensor([i in e for _, e in spec for i in range(G)])
    group = torch.arange(len(spec)).repeat_interleave(G)
    perm = torch.randperm(len(group), generator=gen)  # group members need not be contiguous
    correct, empty, group = correct[perm], empty[perm], group[perm]
    b = len(group)
    lengths = torch.randint(1, T + 1, (b,), generator=gen)
    with_tokens = torch.arange(T)[None, :] < lengths[:, None]
    loss_mask = with_tokens & ~empty[:, None]
    rewards = torch.zeros(b, T)
    rewards[torch.arange(b), lengths - 1] = correct.float()
    old = -torch.rand(b, T, generator=gen, dtype=torch.float64) * 2
    new = old + drift * (torch.randn(b, T, generator=gen, dtype=torch.float64) - 0.5)
    old[empty], new[empty] = float("nan"), float("nan")  # what a row without tokens holds must not matter
    uids = [f"uid-{int(g)}" for g in group]
    return uids, rewards, loss_mask, with_tokens, old, new, correct, group


def _trl_path(method, options, old, new, mask, correct, group, margin):
    """What the TRL trainer computes: the objective on the rows it keeps (a token in the loss mask), its KL trust
    region over the kept tokens, and the diagnostics of the kept rows."""
    keep = mask.any(1)
    logp = new.clone().requires_grad_(True)
    scores = core.sequence_scores(logp[keep], mask[keep])
    if method == "conspo":
        out = core.conspo_loss(scores, correct[keep], group[keep], tau=options.get("tau", 10.0), margin=margin,
                               neg_reduce=options.get("neg_reduce", "sum"), group_norm="all")  # fmt: skip
    else:
        out = core.disco_loss(scores, correct[keep], group[keep], tau=options.get("tau", 10.0),
                              variant=options.get("disco_variant", "dro"), group_norm="all")  # fmt: skip
    total = out.loss
    if _trust_region_on(method, options):
        total = total + core.kl_trust_region(logp, old, mask).penalty
    total.backward()
    return total.detach(), logp.grad, out.metrics, core.separation_metrics(scores.detach(), correct[keep], group[keep])


ZERO_TOKEN_CASES = [
    ("conspo", {"margin_schedule": "cosine", "total_steps": 10}),  # the paper's defaults, no trust region
    ("conspo", {"tau": 0.1, "margin_schedule": "constant", "margin_max": 0.05, "trust_region": True}),
    ("disco", {}),  # DRO with the trust region
    ("disco", {"disco_variant": "basic"}),
]


@pytest.mark.parametrize("where", ["estimator", "loss"])
@pytest.mark.parametrize("method,options", ZERO_TOKEN_CASES)
def test_zero_token_rows_leave_their_group_as_in_the_trl_trainer(method, options, where):
    """One micro-batch, after drift: loss, gradient and metrics equal the TRL path's on the rows with tokens, whether
    the estimator saw the rows without tokens (where="estimator") or only the loss mask drops them ("loss")."""
    uids, rewards, mask, with_tokens, old, new, correct, group = _zero_token_batch(seed=21)
    config = _actor_config(method, **options)
    step = 1
    margin = config.policy_loss.conspo.margin(step) if method == "conspo" else 0.0
    if options.get("margin_schedule") == "cosine":
        assert margin == pytest.approx(PAPER_MARGINS[step], abs=1e-15)
    advantages = _codes(uids, rewards, mask if where == "estimator" else with_tokens, step=step)
    state = plugin.decode_group_codes(advantages[:, 0])[0]
    assert int((state == plugin.EXCLUDED).sum()) == (5 if where == "estimator" else 0)

    value, grad, metrics = _run_plugin(method, config, old, new, mask, advantages, [[list(range(len(uids)))]])
    ref_value, ref_grad, ref_metrics, separation = _trl_path(method, options, old, new, mask, correct, group, margin)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    assert not bool(grad.isnan().any()) and bool((grad[~mask] == 0).all())

    m = {k.removeprefix(f"actor/{method}/"): float(v) for k, v in metrics[0].items()}
    assert set(ref_metrics) <= set(m)
    for name, ref in [*ref_metrics.items(), *separation.items()]:  # score_gap, auc, score_sd, valid_frac, ...
        assert m[name] == pytest.approx(float(ref), rel=1e-12, abs=1e-15), name
    expected = {"score_gap", "auc", "score_sd", "valid_frac", "reward_mean"}
    expected |= {"neg_entropy"} if method == "conspo" or options.get("disco_variant", "dro") == "dro" else set()
    assert expected <= set(ref_metrics)
    assert m["valid_frac"] == pytest.approx(ZERO_TOKEN_VALID_FRAC)
    kept = mask.any(1)
    assert m["reward_mean"] == pytest.approx(float(correct[kept].double().mean()))
    assert m["auc"] != 0.5 and m["score_sd"] > 0

    # Had the rows without tokens stayed (score 0), every group would be mixed and the loss another.
    everyone = core.sequence_scores(new, mask)
    if method == "conspo":
        stayed = core.conspo_loss(everyone, correct, group, tau=options.get("tau", 10.0), margin=margin,
                                  group_norm="all")  # fmt: skip
    else:
        stayed = core.disco_loss(everyone, correct, group, variant=options.get("disco_variant", "dro"),
                                 group_norm="all")  # fmt: skip
    assert float(stayed.metrics["valid_frac"]) == 1.0
    assert abs(float(stayed.loss) - float(metrics[0][f"actor/{method}/objective"])) > 1e-4


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize(
    "method,options", [("conspo", {"margin_schedule": "cosine", "total_steps": 10}), ("disco", {"trust_region": False})]
)
def test_zero_token_rows_any_split(method, options, split):
    """Any whole-group split over micro-batches and ranks, after drift: the summed loss and its gradient are the
    TRL path's on the rows with tokens."""
    uids, rewards, mask, _, old, new, correct, group = _zero_token_batch(seed=22)
    config = _actor_config(method, **options)
    margin = config.policy_loss.conspo.margin(2) if method == "conspo" else 0.0
    ranks, dp = _ranks(uids, split)
    value, grad, _ = _run_plugin(method, config, old, new, mask, _codes(uids, rewards, mask, step=2), ranks, dp)
    ref_value, ref_grad, _, _ = _trl_path(method, options, old, new, mask, correct, group, margin)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    assert float(ref_value) != 0.0


def test_a_group_without_any_token_still_counts_in_verls_group_count():
    """The documented departure: with verl's batch information the loss divides by global_batch_size / rollout.n
    groups, so a group none of whose rollouts has a token counts (the TRL trainer's group_norm 'all' does not count
    it); a call without that information (the whole batch) equals the TRL path."""
    uids, rewards, mask, _, old, new, correct, group = _zero_token_batch(seed=23, empty_group=True)
    config = _actor_config("conspo", margin_schedule="cosine", total_steps=10)
    advantages = _codes(uids, rewards, mask, step=0)
    value, grad, _ = _run_plugin("conspo", config, old, new, mask, advantages, [[list(range(len(uids)))]])
    ref_value, ref_grad, ref_metrics, _ = _trl_path("conspo", {}, old, new, mask, correct, group, 0.0)
    torch.testing.assert_close(value, ref_value * 5 / 6, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad * 5 / 6, rtol=1e-10, atol=1e-14)
    direct, metrics = _call("conspo", _actor_config("conspo", margin_schedule="cosine", total_steps=10), old, new,
                            mask, advantages, list(range(len(uids))))  # fmt: skip
    assert float(direct) == pytest.approx(float(ref_value), rel=1e-12)
    assert float(metrics["actor/conspo/valid_frac"]) == pytest.approx(float(ref_metrics["valid_frac"])) == 3 / 5


# --------------------------------------------------------------------------------------------------
# The estimator and its codes.
# --------------------------------------------------------------------------------------------------


def test_codes_round_trip_at_the_field_limits():
    state = torch.tensor([plugin.NEGATIVE, plugin.POSITIVE, plugin.EXCLUDED])
    group = torch.tensor([0, plugin.MAX_GROUPS - 1, 7])
    size = torch.tensor([1, plugin.MAX_GROUP_SIZE, 8])
    codes = plugin.encode_group_codes(state, group, size, plugin.MAX_STEP)
    assert codes.dtype == torch.float64 and float(codes.max()) < 2.0**53
    for got, want in zip(plugin.decode_group_codes(codes), (state, group, size, torch.full((3,), plugin.MAX_STEP))):
        assert torch.equal(got, want)


def test_estimator_groups_threshold_and_padding_rows():
    rewards = torch.tensor([[0.0, 0.7], [0.0, 0.3], [1.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 0], [0, 0]]).bool()
    uids = ["b", "a", "b", "pad"]
    config = {"conspo": {"correct_threshold": 0.5}}
    advantages = _codes(uids, rewards, mask, config)
    assert advantages.shape == (4, 2) and bool((advantages == advantages[:, :1]).all())
    state, group, size, _ = plugin.decode_group_codes(advantages[:, 0])
    assert state.tolist() == [plugin.POSITIVE, plugin.NEGATIVE, plugin.POSITIVE, plugin.EXCLUDED]
    assert group.tolist() == [0, 1, 0, 2] and size.tolist() == [2, 1, 2, 1]
    with pytest.raises(ValueError, match="algorithm.conspo has unknown option"):
        _codes(uids, rewards, mask, {"conspo": {"threshold": 0.5}})


# --------------------------------------------------------------------------------------------------
# Group integrity: split, mixed or foreign inputs raise and name the verl settings.
# --------------------------------------------------------------------------------------------------


def _call(method, config, old, new, mask, advantages, rows, weights=None):
    idx = torch.tensor(rows)
    return get_policy_loss_fn(method)(
        old_log_prob=old[idx], log_prob=new[idx], advantages=advantages[idx], response_mask=mask[idx],
        loss_agg_mode="token-mean", config=config, rollout_is_weights=weights,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["conspo", "disco"])
def test_incomplete_group_raises_naming_the_verl_settings(method):
    uids, rewards, mask, old, new, _ = _batch(seed=5)
    advantages = _codes(uids, rewards, mask)
    rows = _split_by_groups(uids, [1, 5])[0][:-1] + _split_by_groups(uids, [1, 5])[1][:2]
    with pytest.raises(ValueError, match="incomplete prompt group") as err:
        _call(method, _actor_config(method), old, new, mask, advantages, rows)
    for setting in ("ppo_micro_batch_size_per_gpu", "use_dynamic_bsz=False", "trainer.v1.trainer_mode=conspo",
                    "shuffle=False", "ppo_mini_batch_size"):  # fmt: skip
        assert setting in str(err.value)


def test_groups_from_two_generation_batches_raise():
    uids, rewards, mask, old, new, _ = _batch(seed=6)
    first = _codes(uids, rewards, mask)
    second = _codes(uids, rewards, mask)  # the next call counts as the next step
    advantages = torch.where(torch.tensor([u in ("uid-0",) for u in uids])[:, None], first, second)
    with pytest.raises(ValueError, match="mixes rollouts of training steps"):
        _call("conspo", _actor_config(), old, new, mask, advantages, list(range(len(uids))))


def test_foreign_advantages_and_settings_raise():
    uids, rewards, mask, old, new, _ = _batch(seed=7)
    rows = list(range(len(uids)))
    config = _actor_config()
    with pytest.raises(ValueError, match="adv_estimator=conspo"):
        _call("conspo", config, old, new, mask, torch.randn(len(uids), T), rows)  # GRPO's float32 advantages
    with pytest.raises(ValueError, match="do not hold conspo group codes"):
        _call("conspo", config, old, new, mask, torch.full((len(uids), T), 0.5, dtype=torch.float64), rows)
    advantages = _codes(uids, rewards, mask)
    with pytest.raises(ValueError, match="rollout_correction"):
        _call("conspo", config, old, new, mask, advantages, rows, weights=torch.ones(len(uids), T))
    odd = ActorConfig(strategy="fsdp", rollout_n=8, ppo_micro_batch_size_per_gpu=8, policy_loss=config.policy_loss)
    with pytest.raises(ValueError, match="rollout.n=8"):
        _call("conspo", odd, old, new, mask, advantages, rows)


@pytest.mark.parametrize("method", ["conspo", "disco"])
@pytest.mark.parametrize("where", ["estimator", "loss"])
def test_padding_only_micro_batch_contributes_nothing(method, where):
    """No row with a token in the loss mask (verl's padding rows, or rows the loss mask empties): zero loss and
    gradient, whatever the rows' log-probs hold."""
    rewards, mask = torch.tensor([[1.0] + [0.0] * (T - 1)] * 2), torch.zeros(2, T, dtype=torch.bool)
    advantages = _codes(["pad", "pad"], rewards, mask if where == "estimator" else ~mask)
    old = torch.full((2, T), float("nan"), dtype=torch.float64)
    new = old.clone().requires_grad_(True)
    loss, metrics = _call(method, _actor_config(method), old, new, mask, advantages, [0, 1])
    loss.backward()
    assert float(loss) == 0.0 and bool((new.grad == 0).all())
    assert float(metrics[f"actor/{method}/kl"]) == 0.0


# --------------------------------------------------------------------------------------------------
# verl's config loading, the plug-in discovery, the trainer mode.
# --------------------------------------------------------------------------------------------------

OVERRIDES = [
    "algorithm.adv_estimator=conspo",
    "+algorithm.conspo.correct_threshold=0.5",
    "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.actor.policy_loss._target_=conspo.verl_plugin.ConSPOPolicyLossConfig",
    "actor_rollout_ref.actor.policy_loss.loss_mode=conspo",
    "+actor_rollout_ref.actor.policy_loss.conspo.tau=0.05",
    "+actor_rollout_ref.actor.policy_loss.conspo.total_steps=100",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
    "actor_rollout_ref.actor.ppo_mini_batch_size=16",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8",
    "data.train_batch_size=32",
]


def _compose(overrides):
    import verl
    from hydra import compose, initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def test_verl_config_loading_accepts_the_options():
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    config = _compose(OVERRIDES)
    validate_config(config, use_reference_policy=False, use_critic=False)  # what verl's main_ppo runs first
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)  # what each actor worker builds
    assert isinstance(actor.policy_loss, plugin.ConSPOPolicyLossConfig)
    assert actor.policy_loss.conspo == plugin.ConSPOOptions(tau=0.05, total_steps=100)
    state, *_ = plugin.decode_group_codes(
        _codes(["a", "a"], torch.tensor([[0.5], [0.4]]), torch.ones(2, 1, dtype=torch.bool), config.algorithm)[:, 0]
    )
    assert state.tolist() == [plugin.POSITIVE, plugin.NEGATIVE]


def test_verl_config_loading_rejects_bad_options_at_load():
    from verl.utils.config import omega_conf_to_dataclass

    for bad, message in (("tau=-1", "tau must be"), ("group_norm=valid", "only 'all' is exact")):
        key = bad.split("=")[0]
        kept = [o for o in OVERRIDES if not o.endswith(f"conspo.{key}=0.05")]
        config = _compose([*kept, f"+actor_rollout_ref.actor.policy_loss.conspo.{bad}"])
        with pytest.raises(Exception, match=message):
            omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    config = _compose([o for o in OVERRIDES if "total_steps" not in o])
    with pytest.raises(Exception, match="total_steps must be an integer"):
        omega_conf_to_dataclass(config.actor_rollout_ref.actor)


# --------------------------------------------------------------------------------------------------
# Options: the TRL trainer's names and defaults, deprecated aliases, settings without effect refused.
# --------------------------------------------------------------------------------------------------

CONFIG_PY = os.path.join(os.path.dirname(__file__), "..", "src", "conspo", "config.py")


def _trainer_defaults() -> dict:
    """ConSPOConfig's own field defaults, read from src/conspo/config.py (this environment has no TRL)."""
    import ast

    tree = ast.parse(open(CONFIG_PY).read())
    config = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ConSPOConfig")
    out = {}
    for node in config.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Call):
            default = next(k.value for k in node.value.keywords if k.arg == "default")
            out[node.target.id] = ast.literal_eval(default)
    return out


def test_defaults_are_the_trl_trainers_and_the_papers():
    trl = _trainer_defaults()
    conspo, disco = plugin.ConSPOOptions(total_steps=10), plugin.DiscoOptions()
    shared = ["margin_schedule", "margin_start", "margin_max", "margin_ramp_frac", "margin_step_at", "neg_reduce",
              "trust_region_delta", "trust_region_beta"]  # fmt: skip
    for name in shared:
        assert getattr(conspo, name) == trl[name], name
    assert disco.disco_variant == trl["disco_variant"] == "dro"
    # The paper's values (arXiv 2605.12969v3, section 5.1) and the core's margin_at defaults.
    assert (conspo.tau, conspo.margin_schedule, conspo.margin_start, conspo.margin_max, conspo.margin_ramp_frac) == (
        10.0, "cosine", 0.0, 0.01, 0.3)  # fmt: skip
    margin_at = inspect.signature(core.margin_at).parameters
    assert [margin_at[k].default for k in ("schedule", "m0", "m_max", "ramp_frac", "step_at")] == [
        conspo.margin_schedule,
        conspo.margin_start,
        conspo.margin_max,
        conspo.margin_ramp_frac,
        conspo.margin_step_at,
    ]
    # tau: unset in the trainer means 10 for conspo and disco; the trust region: unset means off for conspo, on for disco
    assert trl["tau"] is None and conspo.tau == disco.tau == 10.0
    assert trl["trust_region"] is None and conspo.trust_region is False and disco.trust_region is True
    assert trl["group_norm"] == "valid" and conspo.group_norm == disco.group_norm == "all"  # documented departure
    # Every option the plug-in shares with the trainer has the trainer's name.
    for cls in (plugin.ConSPOOptions, plugin.DiscoOptions):
        own = {f.name for f in dataclasses.fields(cls)} - {"total_steps"}
        assert own <= set(trl), own - set(trl)


@pytest.mark.parametrize(
    "cls,old,new,value,extra",
    [
        (plugin.ConSPOOptions, "m0", "margin_start", 0.001, {"total_steps": 10}),
        (plugin.ConSPOOptions, "m_max", "margin_max", 0.05, {"total_steps": 10}),
        (plugin.ConSPOOptions, "ramp_frac", "margin_ramp_frac", 0.5, {"total_steps": 10}),
        (plugin.ConSPOOptions, "step_at", "margin_step_at", 7, {"margin_schedule": "step"}),
        (plugin.ConSPOOptions, "tr_delta", "trust_region_delta", 1e-3, {"trust_region": True, "total_steps": 10}),
        (plugin.ConSPOOptions, "tr_beta", "trust_region_beta", 10.0, {"trust_region": True, "total_steps": 10}),
        (plugin.DiscoOptions, "variant", "disco_variant", "basic", {}),
        (plugin.DiscoOptions, "tr_delta", "trust_region_delta", 1e-3, {}),
        (plugin.DiscoOptions, "tr_beta", "trust_region_beta", 10.0, {}),
    ],
)
def test_old_option_names_are_deprecated_aliases(cls, old, new, value, extra):
    with pytest.warns(FutureWarning, match=f"{old} is deprecated, use policy_loss.x.{new}"):
        got = plugin.parse_options(cls, {old: value, **extra}, "policy_loss.x")
    assert got == cls(**{new: value, **extra}) and getattr(got, new) == value
    with pytest.raises(ValueError, match=f"sets both {new} and its deprecated alias {old}"):
        plugin.parse_options(cls, {old: value, new: value, **extra}, "policy_loss.x")


def test_old_option_names_load_through_verl_with_a_warning():
    from verl.utils.config import omega_conf_to_dataclass

    config = _compose([*OVERRIDES, "+actor_rollout_ref.actor.policy_loss.conspo.m_max=0.05"])
    with pytest.warns(FutureWarning, match="m_max is deprecated"):
        actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    assert actor.policy_loss.conspo == plugin.ConSPOOptions(tau=0.05, total_steps=100, margin_max=0.05)


@pytest.mark.parametrize(
    "method,options,message",
    [
        ("conspo", {"margin_schedule": "constant", "margin_start": 0.01}, r"margin_start=0.01 \(margin_schedule const"),
        ("conspo", {"margin_schedule": "constant", "total_steps": 100}, r"total_steps=100 \(margin_schedule constant"),
        ("conspo", {"margin_schedule": "step", "margin_step_at": 3, "margin_ramp_frac": 0.5}, r"margin_ramp_frac=0.5"),
        ("conspo", {"total_steps": 10, "margin_step_at": 5}, r"margin_step_at=5 \(read only by margin_schedule step"),
        ("conspo", {"total_steps": 10, "trust_region_delta": 1e-3}, r"trust_region_delta=0.001 \(the trust region is"),
        ("conspo", {"total_steps": 10, "tr_beta": 10.0}, r"trust_region_beta=10.0 \(the trust region is off"),
        ("disco", {"trust_region": False, "trust_region_beta": 10.0}, r"trust_region_beta=10.0"),
        ("disco", {"disco_variant": "basic", "tau": 5.0}, r"tau=5.0 \(disco_variant basic has no temperature"),
        ("conspo", {"total_steps": 10, "disco_variant": "basic"}, r"disco_variant: read only by loss_mode disco"),
        ("disco", {"neg_reduce": "mean"}, r"neg_reduce: read only by loss_mode conspo"),
        ("disco", {"margin_max": 0.1}, r"margin_max: read only by loss_mode conspo"),
        ("conspo", {"total_steps": 10, "score": "clipped_ratio"}, r"score='clipped_ratio' .* TRL trainer only"),
        ("conspo", {"total_steps": 10, "tau": "auto"}, r"tau='auto' .* TRL trainer only"),
        ("conspo", {"total_steps": 10, "correct_threshold": 0.5}, r"algorithm.conspo.correct_threshold"),
        ("conspo", {"total_steps": 10, "gmpo_epsilon_low": 0.4}, r"loss_mode=geo_mean with .*clip_ratio_low"),
        ("conspo", {"total_steps": 10, "tau": 1e-4}, r"policy_loss.conspo.tau must be a number in \[0.001, 1000\]"),
        ("disco", {"tau": 2000}, r"policy_loss.disco.tau must be a number in \[0.001, 1000\]"),
        ("conspo", {"total_steps": 10, "trust_region": 1}, r"trust_region must be true, false or unset"),
        ("conspo", {"margin_schedule": "step"}, r"margin_step_at must be an integer >= 0"),
        ("conspo", {"total_steps": 10, "margin_ramp_frac": 0.0}, r"margin_ramp_frac must be in \(0, 1\]"),
        ("conspo", {"total_steps": 10, "margin_max": -0.1}, r"margin_max must be a finite number >= 0"),
    ],
)
@pytest.mark.filterwarnings("ignore:policy_loss.conspo.tr_beta is deprecated:FutureWarning")
def test_settings_without_effect_or_out_of_range_are_refused(method, options, message):
    cls = plugin.ConSPOOptions if method == "conspo" else plugin.DiscoOptions
    with pytest.raises(ValueError, match=message):
        plugin.parse_options(cls, options, f"policy_loss.{method}")


def test_tau_range_ends_and_explicit_defaults_are_accepted():
    for tau in (core.TAU_MIN, core.TAU_MAX):
        assert plugin.ConSPOOptions(tau=tau, total_steps=10).tau == tau
        assert plugin.DiscoOptions(tau=tau).tau == tau
    # An explicit default has no effect to refuse, and an explicit trust region resolves as given.
    assert plugin.DiscoOptions(disco_variant="basic", tau=10.0).disco_variant == "basic"
    assert plugin.ConSPOOptions(margin_schedule="constant", margin_start=0.0, trust_region=True).trust_region is True
    assert plugin.DiscoOptions(trust_region=False).trust_region is False


def test_settings_of_another_loss_or_of_verls_own_losses_are_refused():
    with pytest.raises(ValueError, match=r"policy_loss.disco options \['tau'\] would have no effect under loss_mode="):
        plugin.ConSPOPolicyLossConfig(loss_mode="conspo", conspo={"total_steps": 10}, disco={"tau": 5.0})
    with pytest.raises(ValueError, match=r"policy_loss.conspo options \['tau'\] .* loss_mode='geo_mean'"):
        plugin.ConSPOPolicyLossConfig(loss_mode="geo_mean", conspo={"tau": 5.0})
    assert plugin.ConSPOPolicyLossConfig(loss_mode="geo_mean").loss_mode == "geo_mean"
    with pytest.raises(ValueError, match=r"loss_mode disco never reads policy_loss.ppo_kl_coef=0.5"):
        plugin.ConSPOPolicyLossConfig(loss_mode="disco", ppo_kl_coef=0.5)
    # verl's clip range: read by its own policy losses only, refused at the loss call (and by the trainer mode).
    uids, rewards, mask, old, new, _ = _batch(seed=8)
    policy_loss = plugin.ConSPOPolicyLossConfig(loss_mode="conspo", conspo={"margin_schedule": "constant"})
    actor = ActorConfig(strategy="fsdp", rollout_n=G, ppo_micro_batch_size_per_gpu=G, policy_loss=policy_loss,
                        clip_ratio_high=0.28)  # fmt: skip
    with pytest.raises(ValueError, match=r"never reads actor_rollout_ref.actor.clip_ratio_high=0.28"):
        _call("conspo", actor, old, new, mask, _codes(uids, rewards, mask), list(range(len(uids))))


def test_verl_config_loading_refuses_settings_without_effect():
    from verl.utils.config import omega_conf_to_dataclass

    for extra, message in (
        ("+actor_rollout_ref.actor.policy_loss.disco.tau=5", r"policy_loss.disco options \['tau'\]"),
        ("+actor_rollout_ref.actor.policy_loss.conspo.trust_region_delta=0.001", "trust_region_delta=0.001"),
        ("+actor_rollout_ref.actor.policy_loss.conspo.tau=auto", "tau='auto'"),
    ):
        kept = [o for o in OVERRIDES if "conspo.tau" not in o or "tau=auto" not in extra]
        with pytest.raises(Exception, match=message):
            omega_conf_to_dataclass(_compose([*kept, extra]).actor_rollout_ref.actor)


def test_trainer_mode_checks_the_margin_horizon_and_clip_settings(caplog):
    config = _compose([*OVERRIDES, "trainer.total_training_steps=100"])
    with caplog.at_level("WARNING", logger=plugin.__name__):
        plugin.check_trainer_config(config, 100)
    # 32 prompts per step, 16 per mini-batch: the TRL trainer's warning about the second, uncorrected optimizer step
    assert "2 optimizer steps per generation batch" in caplog.text and "trust_region=True" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger=plugin.__name__):
        plugin.check_trainer_config(
            _compose([*OVERRIDES, "+actor_rollout_ref.actor.policy_loss.conspo.trust_region=True"]), 100
        )
        plugin.check_trainer_config(_compose([*OVERRIDES, "actor_rollout_ref.actor.ppo_mini_batch_size=32"]), 100)
    assert caplog.text == ""
    with pytest.raises(ValueError, match=r"total_steps=100 but verl trains for 99 steps.*conspo.total_steps=99"):
        plugin.check_trainer_config(config, 99)
    constant = _compose([o for o in OVERRIDES if "total_steps" not in o]
                        + ["+actor_rollout_ref.actor.policy_loss.conspo.margin_schedule=constant"])  # fmt: skip
    plugin.check_trainer_config(constant, 99)  # no ramp, no horizon
    clipped = _compose([*OVERRIDES, "actor_rollout_ref.actor.clip_ratio_low=0.4"])
    with pytest.raises(ValueError, match="never reads actor_rollout_ref.actor.clip_ratio_low=0.4"):
        plugin.check_trainer_config(clipped, 100)
    grpo = _compose(["actor_rollout_ref.actor.clip_ratio_low=0.4"])  # verl's own loss: nothing to check
    plugin.check_trainer_config(grpo, 7)


def _fresh_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, timeout=300
    )


CHECK_REGISTRY = """
    import verl
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, get_policy_loss_fn
    get_policy_loss_fn("conspo"), get_policy_loss_fn("disco")
    assert "conspo" in ADV_ESTIMATOR_REGISTRY and "disco" in ADV_ESTIMATOR_REGISTRY
    print("REGISTERED")
"""


def test_plain_import_verl_finds_the_plugin_by_entry_point():
    result = _fresh_python(CHECK_REGISTRY)
    assert "REGISTERED" in result.stdout, result.stderr[-3000:]


def test_external_modules_route_and_missing_plugin_report():
    result = _fresh_python(
        CHECK_REGISTRY, VERL_USE_EXTERNAL_PLUGINS="none", VERL_USE_EXTERNAL_MODULES="conspo.verl_plugin"
    )
    assert "REGISTERED" in result.stdout, result.stderr[-3000:]
    result = _fresh_python(CHECK_REGISTRY, VERL_USE_EXTERNAL_PLUGINS="none")
    assert result.returncode != 0 and "Unsupported loss mode: conspo" in result.stderr


def test_broken_plugin_is_reported_not_swallowed():
    code = "import sys; sys.modules['conspo.objectives'] = None\n" + textwrap.dedent(CHECK_REGISTRY)
    result = _fresh_python(code)
    assert "conspo's verl plug-in failed to load" in result.stderr
    assert result.returncode != 0 and "REGISTERED" not in result.stdout


def test_group_balanced_order_keeps_groups_whole_per_rank():
    uids = [f"g{i % 6}" for i in range(24)] + ["pad"] * 4
    seqlens = [10 + 7 * i for i in range(28)]
    padding = [False] * 24 + [True] * 4
    order = plugin.group_balanced_order(uids, seqlens, padding, dp_size=2)
    assert sorted(order) == list(range(28))
    for rank in (order[:14], order[14:]):
        real = [uids[i] for i in rank if not padding[i]]
        assert len(real) == 12 and all(real.count(u) == 4 for u in set(real))
        runs = [u for j, u in enumerate(real) if j == 0 or u != real[j - 1]]
        assert len(runs) == len(set(real))  # each group contiguous
        assert sum(padding[i] for i in rank) == 2
    with pytest.raises(ValueError, match="multiple of the actor's data-parallel size"):
        plugin.group_balanced_order(uids[:20], seqlens[:20], padding[:20], dp_size=3)


def test_trainer_mode_is_registered_and_balances_whole_groups():
    pytest.importorskip("transfer_queue")
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    cls = get_trainer_cls("conspo")
    assert issubclass(cls, PPOTrainerSync)

    class Batch:  # the parts of TransferQueue's KVBatchMeta that balancing uses
        def __init__(self, keys, tags):
            self.keys, self.tags = keys, tags

        def __len__(self):
            return len(self.keys)

        def reorder(self, order):
            self.keys = [self.keys[i] for i in order]
            self.tags = [self.tags[i] for i in order]

    trainer = object.__new__(cls)
    trainer.actor_rollout_wg = type("WG", (), {"_dispatch_info": {"actor": [0, 0, 1, 1]}})()
    trainer.tokenizer = type("Tokenizer", (), {"eos_token_id": 0})()
    trainer._get_required_batch_multiple = lambda dp: dp
    batch = Batch([f"u_{i % 4}_{i}_0" for i in range(16)], [{"seq_len": 5 + i} for i in range(16)])
    metrics: dict = {}
    trainer._balance_batch(batch, metrics)
    halves = [[k.split("_")[1] for k in batch.keys[:8]], [k.split("_")[1] for k in batch.keys[8:]]]
    assert all(h.count(u) == 4 for h in halves for u in set(h)) and metrics

    # The driver-side checks run once verl knows its number of training steps, before any worker starts.
    checked = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PPOTrainerSync, "_init_dataloader", lambda self: setattr(self, "total_training_steps", 99))
        patch.setattr(plugin, "check_trainer_config", lambda config, total: checked.append((config, total)))
        trainer.config = "the config"
        trainer._init_dataloader()
    assert checked == [("the config", 99)]

    seen = []
    original = PPOTrainerSync._compute_advantage
    PPOTrainerSync._compute_advantage = lambda self, b, m: seen.append(plugin._StepSource.trainer_step) or b
    try:
        trainer.global_steps = 7
        trainer._compute_advantage(batch, metrics)
    finally:
        PPOTrainerSync._compute_advantage = original
    assert seen == [6] and plugin._StepSource.trainer_step is None


@pytest.mark.parametrize("method", ["conspo", "disco"])
def test_example_launch_script_overrides_load_in_verl(method):
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    script = os.path.join(os.path.dirname(__file__), "..", "examples", "verl", "run_conspo_gsm8k.sh")
    env = {**os.environ, "CONSPO_PRINT_OVERRIDES": "1", "METHOD": method}
    printed = subprocess.run(["bash", script], capture_output=True, text=True, env=env, check=True).stdout
    config = _compose(printed.splitlines())
    validate_config(config, use_reference_policy=False, use_critic=False)
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    assert actor.policy_loss.loss_mode == method and config.trainer.v1.trainer_mode == "conspo"
    assert actor.ppo_micro_batch_size_per_gpu % config.actor_rollout_ref.rollout.n == 0
    assert not actor.use_dynamic_bsz and not actor.shuffle
    if method == "conspo":
        assert actor.policy_loss.conspo.total_steps == config.trainer.total_training_steps
        assert actor.policy_loss.conspo == plugin.ConSPOOptions(total_steps=config.trainer.total_training_steps)
        assert actor.policy_loss.conspo.trust_region is False
    else:
        assert actor.policy_loss.disco == plugin.DiscoOptions() and actor.policy_loss.disco.trust_region is True
    plugin.check_trainer_config(config, config.trainer.total_training_steps)  # what trainer mode conspo runs


# --------------------------------------------------------------------------------------------------
# GMPO: verl's own ``geo_mean`` policy loss against ``conspo.objectives.gmpo_loss``.
# verl's loss is the mean over the rows of the micro-batch it is given (empty rows included, loss_agg_mode
# and global_batch_info unused), so it is conspo's with normalizer = that row count. Its per-row denominators
# n_i + 1e-8 are formed in float32 from the bool mask verl passes (verl/workers/utils/losses.py), where they
# round to n_i exactly for n_i >= 1, so the two agree to float64 rounding.
# --------------------------------------------------------------------------------------------------

GMPO_RTOL = 1e-12


def _gmpo_batch(seed: int, b: int = 12):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, T, generator=gen, dtype=torch.float64) * 2
    new = old + 0.5 * torch.randn(b, T, generator=gen, dtype=torch.float64)  # many |log rho| > 0.4
    adv = torch.randn(b, generator=gen, dtype=torch.float64)
    adv[3] = 0.0
    lengths = torch.randint(1, T + 1, (b,), generator=gen)
    lengths[0] = 0  # a row without tokens: verl counts it in its mean
    lengths[1:3] = T
    adv[1], adv[2] = adv[1].abs() + 0.1, -adv[2].abs() - 0.1
    new[1, 0], new[2, 0] = old[1, 0] + 0.7, old[2, 0] - 0.7  # a capped token (A > 0) and a floored one (A < 0)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return old, new, adv, mask


def _verl_geo_mean(config, old, new, adv, mask, micro_batches):
    logp = new.clone().requires_grad_(True)
    loss_fn = get_policy_loss_fn("geo_mean")
    total = torch.zeros((), dtype=torch.float64)
    metrics = []
    for rows in micro_batches:
        idx = torch.tensor(rows)
        token_adv = adv[idx][:, None].expand(-1, T)  # verl's advantages are per token: a sequence's value repeated
        loss, m = loss_fn(
            old_log_prob=old[idx], log_prob=logp[idx], advantages=token_adv, response_mask=mask[idx],
            loss_agg_mode="token-mean", config=config, rollout_is_weights=None,
        )  # fmt: skip
        total = total + loss
        metrics.append(m)
    total.backward()
    return total.detach(), logp.grad, metrics


def _conspo_gmpo(old, new, adv, mask, micro_batches, **kwargs):
    logp = new.clone().requires_grad_(True)
    total = torch.zeros((), dtype=torch.float64)
    outs = []
    for rows in micro_batches:
        idx = torch.tensor(rows)
        out = core.gmpo_loss(logp[idx], old[idx], adv[idx], mask[idx], **kwargs)
        total = total + out.loss
        outs.append(out)
    total.backward()
    return total.detach(), logp.grad, outs


@pytest.mark.parametrize("low,high", [(0.4, 0.4), (0.2, 0.3)])
def test_gmpo_geo_mean_equals_conspo_gmpo_loss(low, high):
    """One micro-batch: verl's geo_mean with clip_ratio_low/high = conspo's eps_low/eps_high (both log space)."""
    old, new, adv, mask = _gmpo_batch(seed=11)
    b = old.shape[0]
    config = ActorConfig(strategy="fsdp", rollout_n=G, ppo_micro_batch_size_per_gpu=G, clip_ratio_low=low,
                         clip_ratio_high=high)  # fmt: skip
    value, grad, metrics = _verl_geo_mean(config, old, new, adv, mask, [list(range(b))])
    ref_value, ref_grad, outs = _conspo_gmpo(old, new, adv, mask, [list(range(b))], eps_low=low, eps_high=high,
                                             normalizer=b)  # fmt: skip
    torch.testing.assert_close(value, ref_value, rtol=GMPO_RTOL, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=GMPO_RTOL, atol=1e-12)
    out = outs[0]
    assert float(out.metrics["clip_frac_low"]) > 0 and float(out.metrics["clip_frac_high"]) > 0
    assert bool((grad[mask] == 0).any()) and bool((grad[mask] != 0).any())  # clipped and unclipped tokens
    # conspo's default normaliser counts rows with tokens (b - 1 here), verl's mean counts every row
    default = core.gmpo_loss(new, old, adv, mask, eps_low=low, eps_high=high).loss
    assert float(default) == pytest.approx(float(value) * b / (b - 1), rel=GMPO_RTOL)
    # verl's pg_clipfrac counts A > 0 tokens outside the clip range on either side; conspo's clip_frac_high
    # only those capped (d > eps_high), the others keep their gradient
    d, a = (new - old)[mask], adv[:, None].expand(-1, T)[mask]
    outside = (d > high) | (d < -low)
    assert metrics[0]["actor/pg_clipfrac"] == pytest.approx(float(((a > 0) & outside).double().mean()))
    assert float(out.metrics["clip_frac_high"]) == pytest.approx(float(((a > 0) & (d > high)).double().mean()))


def test_gmpo_geo_mean_sums_micro_batch_means():
    """Several micro-batches: verl 0.9.1 backpropagates each micro-batch mean as it is (geo_mean ignores
    global_batch_info), so a mini-batch of k equal micro-batches gets k times the gradient of the mean over its
    sequences; conspo's normalizer = the micro-batch's row count reproduces it, the full count gives the mean."""
    old, new, adv, mask = _gmpo_batch(seed=12)
    b = old.shape[0]
    parts = [list(range(i, i + G)) for i in range(0, b, G)]
    config = ActorConfig(strategy="fsdp", rollout_n=G, ppo_micro_batch_size_per_gpu=G, clip_ratio_low=0.4,
                         clip_ratio_high=0.4)  # fmt: skip
    value, grad, _ = _verl_geo_mean(config, old, new, adv, mask, parts)
    per_part, per_part_grad, _ = _conspo_gmpo(old, new, adv, mask, parts, normalizer=G)
    torch.testing.assert_close(value, per_part, rtol=GMPO_RTOL, atol=1e-12)
    torch.testing.assert_close(grad, per_part_grad, rtol=GMPO_RTOL, atol=1e-12)
    full, full_grad, _ = _conspo_gmpo(old, new, adv, mask, parts, normalizer=b)  # additive: the full-batch mean
    whole, whole_grad, _ = _conspo_gmpo(old, new, adv, mask, [list(range(b))], normalizer=b)
    torch.testing.assert_close(full, whole, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(full_grad, whole_grad, rtol=1e-13, atol=1e-15)
    k = len(parts)
    torch.testing.assert_close(value, k * full, rtol=GMPO_RTOL, atol=1e-12)
    torch.testing.assert_close(grad, k * full_grad, rtol=GMPO_RTOL, atol=1e-12)


def test_gmpo_geo_mean_default_clip_is_0_2_in_log_space():
    """verl's ActorConfig defaults (clip_ratio_low = clip_ratio_high = 0.2) give conspo's eps 0.2, not GMPO's 0.4."""
    old, new, adv, mask = _gmpo_batch(seed=13)
    b = old.shape[0]
    config = ActorConfig(strategy="fsdp", rollout_n=G, ppo_micro_batch_size_per_gpu=G)
    assert (config.clip_ratio_low, config.clip_ratio_high) == (0.2, 0.2)
    value, grad, _ = _verl_geo_mean(config, old, new, adv, mask, [list(range(b))])
    at_02, grad_02, _ = _conspo_gmpo(old, new, adv, mask, [list(range(b))], eps_low=0.2, eps_high=0.2, normalizer=b)
    at_04, grad_04, _ = _conspo_gmpo(old, new, adv, mask, [list(range(b))], normalizer=b)
    torch.testing.assert_close(value, at_02, rtol=GMPO_RTOL, atol=1e-12)
    torch.testing.assert_close(grad, grad_02, rtol=GMPO_RTOL, atol=1e-12)
    assert float((grad - grad_04).abs().max()) > 1e-3
