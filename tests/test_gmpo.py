"""GMPO's loss (``conspo.objectives.gmpo_loss``) and GRPO's advantages (``group_advantages``) against loop references.

The references (``tests/reference.py``) are written from the formula, one row and one token at a time, in float64.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch

from conspo.objectives import gmpo_loss, group_advantages, sequence_scores

F64 = torch.float64


def make_batch(seed: int, b: int = 10, t: int = 7, *, spread: float = 0.5, dtype=F64):
    """(logps, old_logps, advantages, mask): ragged masks with empty rows, log-ratios of either sign beyond +-0.4,
    advantages of both signs and some exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=gen, dtype=F64) * 3
    new = old + spread * torch.randn(b, t, generator=gen, dtype=F64)
    adv = torch.randn(b, generator=gen, dtype=F64)
    adv[torch.rand(b, generator=gen) < 0.15] = 0.0
    lengths = torch.randint(0, t + 1, (b,), generator=gen)
    lengths[0] = 0  # at least one row without tokens
    lengths[1:3] = t
    # rows 1 (A > 0) and 2 (A < 0) hold a token beyond the bound on their side and one well inside
    adv[1], adv[2] = adv[1].abs() + 0.1, -adv[2].abs() - 0.1
    new[1, :2] = old[1, :2] + torch.tensor([0.7, 0.05], dtype=F64)
    new[2, :2] = old[2, :2] + torch.tensor([-0.7, -0.05], dtype=F64)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return new.to(dtype), old.to(dtype), adv.to(dtype), mask


def value_and_grad(fn, logps, *args, **kwargs):
    x = logps.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kwargs)
    loss = out.loss if hasattr(out, "loss") else out
    loss.backward()
    return loss.detach(), x.grad, out


# --------------------------------------------------------------------------------------------------
# Value and gradient against the loop reference.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("eps", [(0.4, 0.4), (0.2, 0.3), (0.6, 0.1)])
@pytest.mark.parametrize("normalizer", [None, 17, 3.5])
def test_value_and_gradient_equal_the_reference(seed, eps, normalizer):
    logps, old, adv, mask = make_batch(seed)
    kw = {"eps_low": eps[0], "eps_high": eps[1], "normalizer": normalizer}
    value, grad, out = value_and_grad(gmpo_loss, logps, old, adv, mask, **kw)
    ref_value, ref_grad, _ = value_and_grad(ref.gmpo_loss, logps, old, adv, mask, **kw)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)
    assert value.dtype == F64 and value.dim() == 0

    # the batch covers what the test is meant to: clipped and unclipped tokens, both signs of A, an empty row
    d = (logps - old)[mask]
    a = adv[:, None].expand_as(mask)[mask]
    assert bool(((a > 0) & (d > eps[1])).any()) and bool(((a < 0) & (d < -eps[0])).any())
    assert bool(((a > 0) & (d.abs() < min(eps))).any()) and bool(((a < 0) & (d.abs() < min(eps))).any())
    assert bool((mask.sum(-1) == 0).any())
    assert float(grad.abs().sum()) > 0

    # credit = -dL/dz_i and -dL/dlogp_{i,t} = credit_i / n_i on unclipped tokens
    n = mask.sum(-1).clamp(min=1).to(F64)
    clipped = ((adv[:, None] > 0) & (logps - old > eps[1])) | ((adv[:, None] < 0) & (logps - old < -eps[0]))
    from_credit = torch.where(mask & ~clipped, -(out.credit / n)[:, None], 0.0)
    torch.testing.assert_close(grad, from_credit, rtol=1e-12, atol=1e-14)
    assert not out.credit.requires_grad


def test_clipped_token_has_no_gradient_and_unclipped_ones_do():
    """By hand: A = 1.5 with d = (0.5, 0.1, -0.6), A = -0.5 with d = (-0.5, 0.1, 0.6), eps 0.4.

    Row 0: 0.5 is capped at 0.4 (A > 0 and d > eps_high); -0.6 stays (pessimistic side), z = (0.4 + 0.1 - 0.6)/3.
    Row 1: -0.5 is floored at -0.4 (A < 0 and d < -eps_low); 0.6 stays, z = (-0.4 + 0.1 + 0.6)/3 = 0.1.
    """
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -2.5]], dtype=F64)
    d = torch.tensor([[0.5, 0.1, -0.6], [-0.5, 0.1, 0.6]], dtype=F64)
    adv = torch.tensor([1.5, -0.5], dtype=F64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    value, grad, out = value_and_grad(gmpo_loss, old + d, old, adv, mask)
    r0, r1 = math.exp(-0.1 / 3), math.exp(0.1)
    assert float(value) == pytest.approx(-(1.5 * r0 - 0.5 * r1) / 2, rel=1e-13)
    g0, g1 = -1.5 * r0 / 6, 0.5 * r1 / 6
    expected = torch.tensor([[0.0, g0, g0], [0.0, g1, g1]], dtype=F64)
    torch.testing.assert_close(grad, expected, rtol=1e-13, atol=0.0)
    assert float(grad[0, 0]) == 0.0 and float(grad[1, 0]) == 0.0
    torch.testing.assert_close(out.credit, torch.tensor([1.5 * r0 / 2, -0.5 * r1 / 2], dtype=F64), rtol=1e-13, atol=0)
    assert float(out.metrics["clip_frac"]) == pytest.approx(2 / 6)
    assert float(out.metrics["clip_frac_high"]) == pytest.approx(1 / 6)
    assert float(out.metrics["clip_frac_low"]) == pytest.approx(1 / 6)
    assert float(out.metrics["seq_ratio_mean"]) == pytest.approx((r0 + r1) / 2)
    assert float(out.metrics["log_ratio_mean"]) == pytest.approx(0.2 / 6)
    assert float(out.metrics["log_ratio_abs_max"]) == pytest.approx(0.6)

    # a whole row beyond the bound on its advantage's side has no gradient at all; the other side is not bounded
    far = torch.tensor([[0.9, 1.3, 0.45], [-0.9, -1.3, -0.45]], dtype=F64)
    _, grad, _ = value_and_grad(gmpo_loss, old + far, old, adv, mask)
    assert bool((grad == 0).all())
    _, grad, _ = value_and_grad(gmpo_loss, old - far, old, adv, mask)
    assert bool((grad != 0).all())


def test_zero_advantage_rows_give_ratio_one_and_no_gradient():
    logps, old, _, mask = make_batch(3)
    adv = torch.zeros(logps.shape[0], dtype=F64)
    value, grad, out = value_and_grad(gmpo_loss, logps, old, adv, mask)
    assert float(value) == 0.0 and bool((grad == 0).all()) and bool((out.credit == 0).all())
    assert float(out.metrics["seq_ratio_mean"]) == 1.0 and float(out.metrics["clip_frac"]) == 0.0


# --------------------------------------------------------------------------------------------------
# Empty rows, padding, dtypes.
# --------------------------------------------------------------------------------------------------


def test_rows_without_tokens_contribute_nothing_even_holding_nan():
    logps, old, adv, mask = make_batch(4)
    empty = mask.sum(-1) == 0
    assert 0 < int(empty.sum()) < mask.shape[0]
    dirty_logps = torch.where(empty[:, None], math.nan, logps)
    dirty_old = torch.where(empty[:, None], math.inf, old)
    value, grad, out = value_and_grad(gmpo_loss, dirty_logps, dirty_old, adv, mask)
    kept = ~empty
    sub_value, sub_grad, _ = value_and_grad(gmpo_loss, logps[kept], old[kept], adv[kept], mask[kept])
    torch.testing.assert_close(value, sub_value, rtol=1e-14, atol=0)  # the default normaliser skips empty rows
    torch.testing.assert_close(grad[kept], sub_grad, rtol=1e-14, atol=0)
    assert bool((grad[empty] == 0).all()) and bool(torch.isfinite(grad).all())
    assert bool((out.credit[empty] == 0).all())

    nothing = torch.zeros_like(mask)
    value, grad, out = value_and_grad(gmpo_loss, dirty_logps, dirty_old, adv, nothing)
    assert float(value) == 0.0 and bool((grad == 0).all())
    assert all(bool(torch.isfinite(v)) for v in out.metrics.values())
    value, grad, _ = value_and_grad(gmpo_loss, logps[:0], old[:0], adv[:0], mask[:0])
    assert float(value) == 0.0 and grad.shape == (0, logps.shape[1])


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long, torch.float32])
def test_padded_columns_holding_garbage_change_nothing(mask_dtype):
    logps, old, adv, mask = make_batch(5)
    value, grad, out = value_and_grad(gmpo_loss, logps, old, adv, mask)
    extra = 4
    pad_logps = torch.cat([logps, torch.full((logps.shape[0], extra), math.nan, dtype=F64)], 1)
    pad_old = torch.cat([old, torch.tensor([[math.inf, -math.inf, 1e30, math.nan]], dtype=F64).expand(len(old), -1)], 1)
    pad_mask = torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=torch.bool)], 1).to(mask_dtype)
    # masked-out positions inside the ragged rows hold garbage too
    pad_logps = torch.where(pad_mask != 0, pad_logps, 7.0e3)
    pad_value, pad_grad, pad_out = value_and_grad(gmpo_loss, pad_logps, pad_old, adv, pad_mask)
    assert float(pad_value) == float(value)
    assert torch.equal(pad_grad[:, : logps.shape[1]], grad) and bool((pad_grad[:, logps.shape[1] :] == 0).all())
    assert torch.equal(pad_out.credit, out.credit)
    for key, metric in out.metrics.items():
        assert float(pad_out.metrics[key]) == pytest.approx(float(metric), rel=1e-14, abs=1e-16), key  # sum order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_and_single_precision_compute_in_float32(dtype):
    logps, old, adv, mask = make_batch(6)
    value, _, out = value_and_grad(gmpo_loss, logps.to(dtype), old.to(dtype), adv.to(dtype), mask)
    assert value.dtype == torch.float32 and out.credit.dtype == torch.float32
    # against the reference on the same rounded inputs
    ref_value = ref.gmpo_loss(logps.to(dtype).to(F64), old.to(dtype).to(F64), adv.to(dtype).to(F64), mask)
    assert float(value) == pytest.approx(float(ref_value), rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# gradcheck, micro-batching, the on-policy limit.
# --------------------------------------------------------------------------------------------------


def test_gradcheck_in_float64():
    logps, old, adv, mask = make_batch(7, b=6, t=5)
    d = logps - old
    # keep every log-ratio at least 1e-3 away from the kinks at -eps_low and eps_high (gradcheck steps 1e-6)
    for bound in (-0.4, 0.4):
        near = (d - bound).abs() < 1e-3
        d = torch.where(near, d + 3e-3, d)
    logps = (old + d).requires_grad_(True)
    d = logps.detach() - old
    assert bool(((d > 0.4) | (d < -0.4))[mask].any()) and bool((d.abs() < 0.4)[mask].any())
    assert torch.autograd.gradcheck(lambda x: gmpo_loss(x, old, adv, mask).loss, (logps,), eps=1e-6, atol=1e-10)
    assert torch.autograd.gradcheck(
        lambda x: gmpo_loss(x, old, adv, mask, eps_low=0.25, eps_high=0.55, normalizer=9).loss, (logps,),
        eps=1e-6, atol=1e-10,
    )  # fmt: skip


@pytest.mark.parametrize("as_tensor", [False, True])
def test_micro_batches_with_the_full_normaliser_add_up(as_tensor):
    logps, old, adv, mask = make_batch(8, b=12)
    value, grad, out = value_and_grad(gmpo_loss, logps, old, adv, mask, eps_low=0.3, eps_high=0.5)
    n_rows = int((mask.sum(-1) > 0).sum())
    assert n_rows < logps.shape[0]  # one row is empty: the normaliser counts rows with tokens
    normalizer = torch.tensor(n_rows) if as_tensor else n_rows
    x = logps.detach().clone().requires_grad_(True)
    parts = [torch.arange(0, 5), torch.arange(5, 12)]
    total = 0
    credits = torch.empty_like(adv)
    for rows in parts:
        part = gmpo_loss(x[rows], old[rows], adv[rows], mask[rows], eps_low=0.3, eps_high=0.5, normalizer=normalizer)
        total = total + part.loss
        credits[rows] = part.credit
    total.backward()
    torch.testing.assert_close(total.detach(), value, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(x.grad, grad, rtol=1e-14, atol=1e-16)
    torch.testing.assert_close(credits, out.credit, rtol=1e-14, atol=0)
    # without the full normaliser each half is its own mean: the sum is then not the full loss
    alone = sum(float(gmpo_loss(logps[r], old[r], adv[r], mask[r], eps_low=0.3, eps_high=0.5).loss) for r in parts)
    assert abs(alone - float(value)) > 1e-3


@pytest.mark.parametrize("seed", range(3))
def test_on_policy_gradient_is_the_length_normalised_policy_gradient(seed):
    """At rho = 1 everywhere: grad L = grad of -mean_i(A_i * mean_t logp_{i,t}), and L = -mean_i A_i."""
    logps, _, adv, mask = make_batch(seed)
    old = logps.detach().clone()
    value, grad, out = value_and_grad(gmpo_loss, logps, old, adv, mask)
    has = mask.sum(-1) > 0

    def policy_gradient_loss(x):
        return -(torch.where(has, adv * sequence_scores(x, mask), 0.0)).sum() / has.sum()

    pg_value, pg_grad, _ = value_and_grad(policy_gradient_loss, logps)
    torch.testing.assert_close(grad, pg_grad, rtol=1e-13, atol=1e-15)
    assert float(value) == pytest.approx(-float(adv[has].mean()), rel=1e-13)
    assert float(out.metrics["clip_frac"]) == 0.0 and float(out.metrics["seq_ratio_mean"]) == 1.0
    # the credit is then -dL/ds for the length-normalised score s = sequence_scores(logps, mask)
    s = sequence_scores(logps, mask).detach().requires_grad_(True)
    (-(torch.where(has, adv * s, 0.0)).sum() / has.sum()).backward()
    torch.testing.assert_close(out.credit, -s.grad, rtol=1e-14, atol=0)


# --------------------------------------------------------------------------------------------------
# Metrics and bad inputs.
# --------------------------------------------------------------------------------------------------


def test_metrics_equal_loop_counts():
    logps, old, adv, mask = make_batch(9, b=14)
    _, _, out = value_and_grad(gmpo_loss, logps, old, adv, mask, eps_low=0.35, eps_high=0.45)
    low = high = tokens = 0
    log_ratios, ratios = [], []
    for i in range(mask.shape[0]):
        row = []
        for t in range(mask.shape[1]):
            if mask[i, t]:
                d = float(logps[i, t] - old[i, t])
                tokens += 1
                low += float(adv[i]) < 0 and d < -0.35
                high += float(adv[i]) > 0 and d > 0.45
                log_ratios.append(d)
                s = math.copysign(1.0, float(adv[i])) if float(adv[i]) != 0 else 0.0
                row.append(s * min(s * d, s * min(max(d, -0.35), 0.45)))
        if row:
            ratios.append(math.exp(sum(row) / len(row)))
    assert low > 0 and high > 0
    m = {k: float(v) for k, v in out.metrics.items()}
    assert m["clip_frac"] == pytest.approx((low + high) / tokens)
    assert m["clip_frac_low"] == pytest.approx(low / tokens) and m["clip_frac_high"] == pytest.approx(high / tokens)
    assert m["log_ratio_mean"] == pytest.approx(sum(log_ratios) / tokens, rel=1e-12)
    assert m["log_ratio_abs_max"] == pytest.approx(max(abs(v) for v in log_ratios))
    assert m["seq_ratio_mean"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-12)
    assert m["seq_ratio_max"] == pytest.approx(max(ratios), rel=1e-12)
    assert all(not v.requires_grad and v.dim() == 0 for v in out.metrics.values())


def _bad_calls():
    logps, old, adv, mask = make_batch(10, b=4, t=3)
    nan_adv = adv.clone()
    nan_adv[1] = math.nan
    nan_logps = logps.clone()
    nan_logps[1, 0] = math.nan  # row 1 is full, so this is a mask token
    return [
        ((logps[0], old, adv, mask), {}, "logps must be a 2-D floating-point tensor"),
        ((logps.long(), old, adv, mask), {}, "logps must be a 2-D floating-point tensor"),
        ((logps, old[:, :2], adv, mask), {}, r"old_logps must be a floating-point tensor of the shape of logps \(4, 3\)"),
        ((logps, old, adv, mask[:3]), {}, r"mask must have the shape of logps \(4, 3\)"),
        ((logps, old, adv[:3], mask), {}, r"advantages must be a 1-D floating-point tensor of shape \(4,\)"),
        ((logps, old, adv[:, None], mask), {}, r"advantages must be a 1-D floating-point tensor of shape \(4,\)"),
        ((logps, old, adv.long(), mask), {}, "advantages must be a 1-D floating-point tensor"),
        ((logps, old, nan_adv, mask), {}, "advantages must be finite"),
        ((nan_logps, old, adv, mask), {}, "logps and old_logps must be finite on mask tokens"),
        ((logps, old, adv, mask), {"eps_low": 0.0}, "eps_low must be a positive finite number, got 0.0"),
        ((logps, old, adv, mask), {"eps_high": math.inf}, "eps_high must be a positive finite number, got inf"),
        ((logps, old, adv, mask), {"eps_high": "0.4"}, "eps_high must be a positive finite number"),
        ((logps, old, adv, mask), {"normalizer": -1}, r"normalizer must be None or a finite number >= 0 \(a sequence"),
        ((logps, old, adv, mask), {"normalizer": True}, "normalizer must be None or a finite number"),
        ((logps, old, adv, mask), {"normalizer": torch.ones(2)}, "normalizer must be a number or a 1-element tensor"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_inputs_raise_naming_the_argument(case):
    args, kwargs, message = _bad_calls()[case]
    with pytest.raises(ValueError, match=message):
        gmpo_loss(*args, **kwargs)


# --------------------------------------------------------------------------------------------------
# group_advantages: GRPO's (TRL's) advantage.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("seed", range(4))
def test_group_advantages_equal_the_reference(scale, seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = [4, 1, 3, 6, 2, 4]
    ids = torch.tensor([10**12, -3, 7, 0, 2**40, 5])
    group_ids = torch.cat([ids[k].repeat(n) for k, n in enumerate(sizes)])
    rewards = (torch.rand(group_ids.shape[0], generator=gen) < 0.5).to(F64) + 0.1 * torch.rand(len(group_ids), generator=gen, dtype=F64)
    rewards[:4] = 1.0  # a uniform group: advantage 0
    perm = torch.randperm(len(group_ids), generator=gen)
    rewards, group_ids = rewards[perm], group_ids[perm]
    got = group_advantages(rewards, group_ids, scale=scale)
    want = torch.tensor(ref.group_advantages(rewards.tolist(), group_ids.tolist(), scale=scale), dtype=F64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    singleton = group_ids == -3
    assert float(got[singleton].abs().max()) == 0.0
    assert float(got[group_ids == 10**12].abs().max()) == 0.0
    assert float(got.abs().max()) > 0.1


def test_group_advantages_match_trl_on_contiguous_groups():
    """TRL 1.16 (scale_rewards="group"): (r - mean_g) / (std_g + 1e-4), std unbiased, groups of num_generations rows."""
    gen = torch.Generator().manual_seed(0)
    g = 8
    rewards = (torch.rand(5 * g, generator=gen) < 0.4).float()
    grouped = rewards.view(-1, g)
    trl = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
    got = group_advantages(rewards, torch.arange(5).repeat_interleave(g))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, trl.flatten(), rtol=1e-6, atol=1e-6)
    trl_batch = (grouped - grouped.mean(1, keepdim=True)) / (rewards.std() + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, torch.arange(5).repeat_interleave(g), scale="batch"),
                               trl_batch.flatten(), rtol=1e-6, atol=1e-6)  # fmt: skip


def test_group_advantages_bad_inputs_raise():
    r, ids = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
    for args, kwargs, message in [
        ((r[None], ids), {}, "rewards must be a 1-D floating-point tensor"),
        ((r.long(), ids), {}, "rewards must be a 1-D floating-point tensor"),
        ((r, ids[:1]), {}, r"group_ids must be a tensor of shape \(2,\)"),
        ((r, ids.float()), {}, "group_ids must be an integer tensor"),
        ((r, ids), {"scale": "std"}, "scale='std' is not supported; accepted values: 'group', 'batch', 'none'"),
        ((r, ids), {"eps": 0}, "eps must be a positive finite number"),
        ((torch.tensor([1.0, math.nan]), ids), {}, "rewards must be finite"),
    ]:
        with pytest.raises(ValueError, match=message):
            group_advantages(*args, **kwargs)
