"""Tests of the math core ``conspo.objectives`` against the loop reference ``tests/reference.py`` (spec-derived).

Every loss is compared on its value, its closed-form credit, its autograd gradient (through
``sequence_scores``, down to the token log-probabilities) and every metric it reports, over seeded random
batches with ragged masks, groups of mixed sizes, arbitrary non-contiguous group ids and degenerate groups.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch

from conspo.objectives import (
    conspo_loss,
    disco_loss,
    grpo_credit,
    kl_trust_region,
    margin_at,
    separation_metrics,
    sequence_scores,
)

F64 = torch.float64

# Group-size layouts: equal groups of several G, mixed sizes in one batch, singletons.
SEEDS = range(8)
LAYOUTS = [[4] * 5, [8] * 3, [2, 3, 5, 8, 1], [1, 1, 6, 2], [16, 3], [2] * 6]


# --------------------------------------------------------------------------------------------------
# Batch construction
# --------------------------------------------------------------------------------------------------


def make_batch(seed: int, sizes: list[int], *, tokens: int = 6, degenerate: bool = True, dtype=F64):
    """Random (logps, mask, correct, group_ids) with ragged masks, shuffled rows and arbitrary ids.

    Ids mix negative, small and huge int64 values. With ``degenerate`` the first group (if it has one
    row or more) is forced all correct and the second all wrong. Rows may have zero completion tokens.
    """
    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor([-(2**62), -7, -1, 0, 3, 11, 10**9, 2**62 - 5, 2**40 + 1, -(10**12), 42, 999], dtype=torch.long)
    ids = pool[torch.randperm(len(pool), generator=gen)[: len(sizes)]]
    group_ids = torch.cat([ids[k].repeat(n) for k, n in enumerate(sizes)])
    correct = torch.rand(group_ids.shape[0], generator=gen) < 0.5
    start = 0
    for k, n in enumerate(sizes):
        if degenerate and k < 2:
            correct[start : start + n] = k == 0
        elif n >= 2:  # keep the other groups mixed so that most groups are valid
            correct[start] = True
            correct[start + 1] = False
        start += n
    b = group_ids.shape[0]
    perm = torch.randperm(b, generator=gen)
    group_ids, correct = group_ids[perm], correct[perm]
    lengths = torch.randint(1, tokens + 1, (b,), generator=gen)
    lengths[torch.rand(b, generator=gen) < 0.1] = 0  # a few empty completions (denominator 1, score 0)
    mask = torch.arange(tokens)[None, :] < lengths[:, None]
    logps = (-torch.rand(b, tokens, generator=gen, dtype=F64) * 2.0).to(dtype)
    return logps, mask, correct, group_ids


def test_random_batches_cover_the_cases():
    """The batches used below do hold empty completions, interleaved groups, valid and degenerate groups."""
    empty = interleaved = valid = degenerate = 0
    for seed in SEEDS:
        _, mask, correct, ids = make_batch(seed, LAYOUTS[seed % len(LAYOUTS)], degenerate=seed % 2 == 0)
        empty += int((mask.sum(-1) == 0).sum())
        interleaved += int((ids[1:] != ids[:-1]).sum()) >= len(ref.groups_of(ids))
        n_valid = len(ref.valid_groups(correct, ids))
        valid += n_valid
        degenerate += len(ref.groups_of(ids)) - n_valid
    assert empty > 0 and interleaved > 0 and valid > 10 and degenerate > 5


def close(a, b, *, rtol=1e-10, atol=1e-12, msg=""):
    a = torch.as_tensor(a, dtype=F64)
    b = torch.as_tensor(b, dtype=F64).expand_as(a)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=msg or None)


def check_metrics(got: dict, want: dict, *, rtol=1e-10, atol=1e-12):
    assert set(got) == set(want), f"metric keys differ: {sorted(got)} vs {sorted(want)}"
    for key, value in want.items():
        assert got[key].dim() == 0 and not got[key].requires_grad, key
        close(got[key], value, rtol=rtol, atol=atol, msg=f"metric {key}: {float(got[key])} vs {value}")


def group_rows(group_ids):
    return list(ref.groups_of(group_ids).values())


# --------------------------------------------------------------------------------------------------
# Spec section 4: the reference values table
# --------------------------------------------------------------------------------------------------

TABLE_SCORES = [-0.30, -0.25, -0.40, -0.20]
TABLE_CORRECT = [True, False, False, True]
TABLE = [  # (tau, margin, loss, dL/ds); tau = 10 with margin 0.01 is the paper's setting
    (0.1, 0.0, 0.082954, [-0.334251, +0.447378, +0.099824, -0.212952]),
    (0.1, 0.05, 0.113164, [-0.384388, +0.539174, +0.120306, -0.275092]),
    (10.0, 0.0, 10.936400, [-0.333059, +0.334995, +0.330008, -0.331945]),
    (10.0, 0.01, 10.943051, [-0.333170, +0.335108, +0.330118, -0.332056]),
]


@pytest.mark.parametrize(("tau", "margin", "loss", "grad"), TABLE)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_spec_reference_table(tau, margin, loss, grad, dtype):
    scores = torch.tensor(TABLE_SCORES, dtype=dtype, requires_grad=True)
    correct = torch.tensor(TABLE_CORRECT)
    ids = torch.zeros(4, dtype=torch.long)
    out = conspo_loss(scores, correct, ids, tau=tau, margin=margin, neg_reduce="sum")
    out.loss.backward()
    close(out.loss, loss, rtol=2e-7, atol=1e-6)  # the table has 6 decimals; float32 near 10.94 has ~1e-6 spacing
    close(scores.grad, grad, rtol=0, atol=1e-6)
    close(out.credit, [-g for g in grad], rtol=0, atol=1e-6)
    # The reference reproduces the table too (so the table checks the reference as well).
    s64 = torch.tensor(TABLE_SCORES, dtype=F64, requires_grad=True)
    ref_loss = ref.conspo_loss(s64, correct, ids, tau=tau, margin=margin)
    ref_loss.backward()
    close(ref_loss, loss, rtol=0, atol=1e-6)
    close(s64.grad, grad, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# ConSPO and DisCO against the reference
# --------------------------------------------------------------------------------------------------

def conspo_case(seed):
    taus = [0.05, 0.1, 0.1, 1.0, 10.0, 0.3, 0.02, 2.0]
    margins = [0.0, 0.05, 0.1, 0.3, 0.0, 0.2, 0.01, 1.0]
    return taus[seed % 8], margins[(seed * 3) % 8], LAYOUTS[seed % len(LAYOUTS)]


def run_both(loss_fn, ref_loss_fn, ref_credit_fn, batch, dtype, **kw):
    """(objectives output, its logps.grad, its scores-grad), (reference loss, logps.grad, credit, scores-grad)."""
    logps, mask, correct, ids = batch
    x = logps.to(dtype).clone().requires_grad_(True)
    scores = sequence_scores(x, mask)
    scores.retain_grad()
    out = loss_fn(scores, correct, ids, **kw)
    out.loss.backward()

    x_ref = logps.to(F64).clone().requires_grad_(True)
    s_ref = ref.sequence_scores(x_ref, mask)
    s_ref.retain_grad()
    loss_ref = ref_loss_fn(s_ref, correct, ids, **kw)
    if loss_ref.requires_grad:
        loss_ref.backward()
        ref_scores_grad, ref_logps_grad = s_ref.grad, x_ref.grad
    else:  # no valid group: the reference loss is the constant 0
        ref_scores_grad, ref_logps_grad = torch.zeros_like(s_ref), torch.zeros_like(x_ref)
    ref_credit = ref_credit_fn(s_ref.detach(), correct, ids, **kw)
    # The reference's closed form and its autograd agree (checks the reference against itself).
    close(ref_credit, -ref_scores_grad, atol=1e-12)
    close(scores.detach(), s_ref.detach(), rtol=1e-6 if dtype != F64 else 1e-12, atol=1e-7 if dtype != F64 else 0)
    return (out, x.grad, scores.grad), (loss_ref, ref_logps_grad, ref_credit, s_ref.detach())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("neg_reduce", ["sum", "mean"])
@pytest.mark.parametrize("group_norm", ["valid", "all"])
def test_conspo_matches_reference_float64(seed, neg_reduce, group_norm):
    tau, margin, sizes = conspo_case(seed)
    batch = make_batch(seed, sizes, degenerate=seed % 2 == 0)
    kw = dict(tau=tau, margin=margin, neg_reduce=neg_reduce, group_norm=group_norm)
    (out, grad, sgrad), (loss_ref, grad_ref, credit_ref, s_ref) = run_both(
        conspo_loss, ref.conspo_loss, ref.conspo_credit, batch, F64, **kw)
    assert out.loss.dtype == F64 and out.credit.dtype == F64
    assert not out.credit.requires_grad
    close(out.loss, loss_ref)
    close(out.credit, credit_ref)
    close(out.credit, -sgrad, atol=1e-13)
    close(grad, grad_ref)
    _, _, correct, ids = batch
    check_metrics(out.metrics, ref.conspo_metrics(s_ref, correct, ids, tau=tau, margin=margin, neg_reduce=neg_reduce))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("neg_reduce", ["sum", "mean"])
def test_conspo_float32_close_to_reference(seed, neg_reduce):
    tau, margin, sizes = conspo_case(seed)
    batch = make_batch(seed + 100, sizes)
    (out, grad, sgrad), (loss_ref, grad_ref, credit_ref, s_ref) = run_both(
        conspo_loss, ref.conspo_loss, ref.conspo_credit, batch, torch.float32, tau=tau, margin=margin,
        neg_reduce=neg_reduce)
    assert out.loss.dtype == torch.float32 and out.credit.dtype == torch.float32
    close(out.loss, loss_ref, rtol=2e-5, atol=1e-6)
    close(out.credit, credit_ref, rtol=2e-5, atol=1e-6)
    close(out.credit, -sgrad, rtol=1e-6, atol=1e-7)
    close(grad, grad_ref, rtol=2e-5, atol=1e-6)
    _, _, correct, ids = batch
    want = ref.conspo_metrics(s_ref, correct, ids, tau=tau, margin=margin, neg_reduce=neg_reduce)
    # AUC and the gate fraction are discontinuous in the scores: float32 rounding may flip a near-tie.
    check_metrics({k: v for k, v in out.metrics.items() if k not in ("auc", "gate_frac_below_0.1")},
                  {k: v for k, v in want.items() if k not in ("auc", "gate_frac_below_0.1")}, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("variant", ["dro", "basic"])
@pytest.mark.parametrize("group_norm", ["valid", "all"])
def test_disco_matches_reference_float64(seed, variant, group_norm):
    taus = [10.0, 1.0, 0.1, 0.5, 10.0, 3.0, 0.05, 10.0]
    tau = taus[seed]
    batch = make_batch(seed + 200, LAYOUTS[(seed + 1) % len(LAYOUTS)], degenerate=seed % 2 == 1)
    kw = dict(tau=tau, variant=variant, group_norm=group_norm)
    (out, grad, sgrad), (loss_ref, grad_ref, credit_ref, s_ref) = run_both(
        disco_loss, ref.disco_loss, ref.disco_credit, batch, F64, **kw)
    close(out.loss, loss_ref)
    close(out.credit, credit_ref)
    close(out.credit, -sgrad, atol=1e-13)
    close(grad, grad_ref)
    _, _, correct, ids = batch
    want = ref.separation_metrics(s_ref, correct, ids)
    if variant == "dro":
        want["neg_entropy"] = ref.neg_entropy(s_ref, correct, ids, tau=tau)
        want["neg_entropy_ratio"] = ref.neg_entropy_ratio(s_ref, correct, ids, tau=tau)
    check_metrics(out.metrics, want)


@pytest.mark.parametrize("variant", ["dro", "basic"])
def test_disco_float32_close_to_reference(variant):
    batch = make_batch(7, [4, 4, 8, 2, 5])
    (out, grad, sgrad), (loss_ref, grad_ref, credit_ref, _) = run_both(
        disco_loss, ref.disco_loss, ref.disco_credit, batch, torch.float32, tau=1.0, variant=variant)
    assert out.loss.dtype == torch.float32
    close(out.loss, loss_ref, rtol=2e-5, atol=1e-6)
    close(out.credit, credit_ref, rtol=2e-5, atol=1e-6)
    close(grad, grad_ref, rtol=2e-5, atol=1e-6)


def test_disco_reports_the_true_objective():
    # One group, P = {0}, N = {1, 2}: J = s_0 - tau * log(exp(s_1/tau) + exp(s_2/tau)) by hand.
    s = torch.tensor([-0.5, -0.7, -1.0], dtype=F64)
    c, ids = torch.tensor([1, 0, 0]), torch.tensor([5, 5, 5])
    tau = 0.5
    want = -(-0.5 - tau * math.log(math.exp(-0.7 / tau) + math.exp(-1.0 / tau)))
    close(disco_loss(s, c, ids, tau=tau).loss, want)
    close(disco_loss(s, c, ids, variant="basic").loss, -(-0.5 - (-0.85)))


def test_token_gradient_is_credit_over_length():
    """Each token of rollout i receives -c_i / |o_i| (spec section 4): REINFORCE with score-dependent advantages."""
    logps, mask, correct, ids = make_batch(3, [4, 4, 3])
    x = logps.clone().requires_grad_(True)
    out = conspo_loss(sequence_scores(x, mask), correct, ids, margin=0.05)
    out.loss.backward()
    lengths = mask.sum(-1).clamp(min=1).to(F64)
    want = torch.where(mask, -out.credit[:, None] / lengths[:, None], 0.0)
    close(x.grad, want, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_separation_metrics_with_ties_match_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = [5, 6, 3, 7, 1, 4]
    ids = torch.cat([torch.full((n,), 1000 - 37 * k) for k, n in enumerate(sizes)])
    perm = torch.randperm(len(ids), generator=gen)
    ids = ids[perm]
    correct = torch.rand(len(ids), generator=gen) < 0.5
    scores = torch.randint(-3, 2, (len(ids),), generator=gen).to(F64) * 0.25  # a coarse grid: many ties
    got = separation_metrics(scores, correct, ids)
    check_metrics(got, ref.separation_metrics(scores, correct, ids))
    got32 = separation_metrics(scores.float(), correct, ids)  # grid values are exact in float32
    check_metrics(got32, ref.separation_metrics(scores, correct, ids), rtol=1e-6, atol=1e-7)


def test_auc_hand_values():
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    correct = torch.tensor([1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    # group 0: pos {-0.2, -0.4}, neg {-0.3, -0.4}: pairs (-0.2,-0.3)=1, (-0.2,-0.4)=1, (-0.4,-0.3)=0,
    # (-0.4,-0.4)=1/2 (tie) -> 2.5/4. group 1: pos -1 vs neg {-2, 0} -> 1/2.
    scores = torch.tensor([-0.2, -0.3, -0.4, -0.4, -1.0, -2.0, 0.0])
    got = separation_metrics(scores, correct, ids)
    close(got["auc"], (2.5 / 4 + 0.5) / 2, rtol=1e-6)
    close(got["score_gap"], ((-0.3 - -0.35) + (-1.0 - -1.0)) / 2, rtol=1e-6, atol=1e-7)
    # -0.0 and +0.0 are a tie; a group with one positive below every negative has AUC 0.
    ids2 = torch.tensor([1, 1, 2, 2, 2])
    correct2 = torch.tensor([1, 0, 1, 0, 0], dtype=torch.bool)
    got2 = separation_metrics(torch.tensor([0.0, -0.0, -5.0, -1.0, -2.0]), correct2, ids2)
    close(got2["auc"], (0.5 + 0.0) / 2, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# Degenerate and empty batches
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_norm", ["valid", "all"])
def test_no_valid_group_gives_zero_loss_and_gradient(group_norm):
    ids = torch.tensor([3, 3, 3, -9, -9, 7])
    correct = torch.tensor([1, 1, 1, 0, 0, 1], dtype=torch.bool)
    logps = torch.tensor([[-1.0, -2.0], [-0.5, float("nan")], [-3.0, -1.0], [-0.1, -0.2], [-4.0, -4.0], [-1.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [1, 1], [1, 1]])
    for fn, kw in [(conspo_loss, dict(margin=0.1)), (conspo_loss, dict(neg_reduce="mean")),
                   (disco_loss, dict(variant="dro")), (disco_loss, dict(variant="basic"))]:
        x = logps.clone().requires_grad_(True)
        out = fn(sequence_scores(x, mask), correct, ids, group_norm=group_norm, **kw)
        out.loss.backward()
        assert float(out.loss.detach()) == 0.0
        assert torch.equal(x.grad, torch.zeros_like(x))
        assert torch.equal(out.credit, torch.zeros(6))
        for key, value in out.metrics.items():
            assert torch.isfinite(value), key
        assert float(out.metrics["auc"]) == 0.5 and float(out.metrics["valid_frac"]) == 0.0


@pytest.mark.parametrize("fn", [conspo_loss, disco_loss])
def test_empty_batch(fn):
    scores = torch.zeros(0, requires_grad=True)
    out = fn(scores, torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and out.credit.shape == (0,)
    assert scores.grad is not None and scores.grad.shape == (0,)
    for key, value in out.metrics.items():
        assert torch.isfinite(value), key
    assert sequence_scores(torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool)).shape == (0,)


def test_extreme_scores_stay_finite_and_match_reference():
    # Scores far apart with a tiny tau: exp(s/tau) over- and underflows unless the log-sum-exp is shifted.
    s = torch.tensor([500.0, -800.0, 3.0, -2.0, 1e4, -1e4], dtype=F64, requires_grad=True)
    correct = torch.tensor([1, 0, 0, 1, 1, 0], dtype=torch.bool)
    ids = torch.tensor([0, 0, 0, 0, 1, 1])
    for tau in (1e-3, 0.1, 1e3):
        for fn, rfn, rc, kw in [(conspo_loss, ref.conspo_loss, ref.conspo_credit, dict(margin=0.5)),
                                (disco_loss, ref.disco_loss, ref.disco_credit, dict(variant="dro"))]:
            out = fn(s, correct, ids, tau=tau, **kw)
            (grad,) = torch.autograd.grad(out.loss, s)
            assert torch.isfinite(out.loss) and torch.isfinite(grad).all() and torch.isfinite(out.credit).all()
            close(out.loss, rfn(s, correct, ids, tau=tau, **kw), rtol=1e-9, atol=1e-9)
            close(out.credit, rc(s, correct, ids, tau=tau, **kw), rtol=1e-9, atol=1e-12)
            close(out.credit, -grad, atol=1e-12)
            assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("z", [15.0, 21.0, 25.0, 30.0, 38.0, 45.0, 1e4])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_badly_separated_positive_loss_and_gradient_are_exact(z, dtype):
    """A positive far below its negative (softplus argument z = (s_neg - s_pos)/tau above 20).

    Regression test: with torch's default softplus threshold (20) the loss was z instead of log(1+e^z) and
    its autograd gradient 1 instead of sigmoid(z), an error of e^-20 ~ 2e-9 in float64.
    """
    tau = 0.1
    s = torch.tensor([-z * tau, 0.0, -0.3, -0.1], dtype=dtype, requires_grad=True)
    correct = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    ids = torch.tensor([0, 0, 1, 1])
    out = conspo_loss(s, correct, ids, tau=tau)
    (grad,) = torch.autograd.grad(out.loss, s)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    tol = dict(rtol=1e-13, atol=1e-15) if dtype == F64 else dict(rtol=1e-6, atol=1e-7)
    close(out.credit, -grad, **tol)
    s64 = s.detach().to(F64)
    close(out.loss, ref.conspo_loss(s64, correct, ids, tau=tau), **tol)
    close(out.credit, ref.conspo_credit(s64, correct, ids, tau=tau), **tol)


# --------------------------------------------------------------------------------------------------
# Gradient checks in float64
# --------------------------------------------------------------------------------------------------


def _small_group_batch():
    gen = torch.Generator().manual_seed(11)
    ids = torch.tensor([4, -2, 4, 4, -2, 9, -2, 4, 9, 9, 30, 30])
    correct = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)  # group 30 all correct
    scores = (-torch.rand(len(ids), generator=gen, dtype=F64)).requires_grad_(True)
    return scores, correct, ids


@pytest.mark.parametrize("neg_reduce", ["sum", "mean"])
@pytest.mark.parametrize("group_norm", ["valid", "all"])
def test_gradcheck_conspo(neg_reduce, group_norm):
    s, c, ids = _small_group_batch()
    for tau, margin in [(0.1, 0.0), (0.3, 0.05), (2.0, 0.5)]:
        def fn(x, tau=tau, margin=margin):
            return conspo_loss(x, c, ids, tau=tau, margin=margin, neg_reduce=neg_reduce, group_norm=group_norm).loss
        assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", ["dro", "basic"])
@pytest.mark.parametrize("group_norm", ["valid", "all"])
def test_gradcheck_disco(variant, group_norm):
    s, c, ids = _small_group_batch()
    for tau in (0.1, 10.0):
        def fn(x, tau=tau):
            return disco_loss(x, c, ids, tau=tau, variant=variant, group_norm=group_norm).loss
        assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-7)


def test_gradcheck_through_sequence_scores():
    logps, mask, correct, ids = make_batch(5, [3, 4, 2], tokens=4)
    x = logps.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: conspo_loss(sequence_scores(t, mask), correct, ids, margin=0.05).loss, (x,), eps=1e-6, atol=1e-7)


def test_gradcheck_trust_region():
    """The penalty's gradient is that of the squared hinge beta/2 * [KL - delta]_+^2 (spec section 6).

    The penalty's *value* is stopgrad(beta [KL-delta]_+) * KL, whose finite-difference derivative is not
    its gradient by design. So gradcheck runs on a function whose value is the squared hinge (KL from the
    loop reference) and whose backward is the penalty's: ``penalty + (hinge - penalty).detach()``.
    """
    gen = torch.Generator().manual_seed(2)
    old = -torch.rand(3, 5, generator=gen, dtype=F64) * 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    delta, beta = 1e-4, 1e3

    def hinge(x):
        return 0.5 * beta * torch.clamp(ref.token_mean_kl(x, old, mask) - delta, min=0.0) ** 2

    def penalty_grad_hinge_value(x):
        penalty = kl_trust_region(x, old, mask, delta=delta, beta=beta).penalty
        return penalty + (hinge(x) - penalty).detach()

    for shift in (0.05, 0.3):  # outside delta: a non-zero gradient
        x = (old - shift * torch.rand(3, 5, generator=gen, dtype=F64)).requires_grad_(True)
        (analytic,) = torch.autograd.grad(kl_trust_region(x, old, mask, delta=delta, beta=beta).penalty, x)
        (want,) = torch.autograd.grad(hinge(x), x)
        assert analytic.abs().sum() > 0
        close(analytic, want, atol=1e-12)
        assert torch.autograd.gradcheck(penalty_grad_hinge_value, (x,), eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Invariances
# --------------------------------------------------------------------------------------------------


def _outputs(fn, logps, mask, correct, ids, **kw):
    x = logps.clone().requires_grad_(True)
    out = fn(sequence_scores(x, mask), correct, ids, **kw)
    out.loss.backward()
    return out, x.grad


LOSSES = [
    (conspo_loss, dict(tau=0.1, margin=0.05)),
    (conspo_loss, dict(tau=0.5, neg_reduce="mean", group_norm="all")),
    (disco_loss, dict(tau=1.0, variant="dro")),
    (disco_loss, dict(variant="basic", group_norm="all")),
]


@pytest.mark.parametrize(("fn", "kw"), LOSSES)
def test_padding_is_invisible(fn, kw):
    logps, mask, correct, ids = make_batch(21, [4, 3, 5, 2])
    base, base_grad = _outputs(fn, logps, mask, correct, ids, **kw)
    # Garbage (NaN, inf, huge) at masked positions and 3 extra padding columns.
    junk = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30])
    idx = torch.arange(logps.numel()).reshape(logps.shape) % 4
    dirty = torch.where(mask, logps, junk[idx].to(F64))
    padded = torch.cat([dirty, torch.full((logps.shape[0], 3), float("nan"), dtype=F64)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(mask.shape[0], 3, dtype=torch.bool)], dim=1)
    for m in (padded_mask, padded_mask.to(torch.int64), padded_mask.to(F64)):
        out, grad = _outputs(fn, padded, m, correct, ids, **kw)
        close(out.loss, base.loss, atol=1e-14)
        close(out.credit, base.credit, atol=1e-14)
        close(grad[:, : logps.shape[1]], base_grad, atol=1e-14)
        assert torch.equal(grad[~padded_mask.bool()], torch.zeros(int((~padded_mask.bool()).sum()), dtype=F64))
        for key in base.metrics:
            close(out.metrics[key], base.metrics[key], atol=1e-14)


@pytest.mark.parametrize(("fn", "kw"), LOSSES)
@pytest.mark.parametrize("seed", range(3))
def test_row_permutation_invariance(fn, kw, seed):
    logps, mask, correct, ids = make_batch(30 + seed, LAYOUTS[seed])
    base, base_grad = _outputs(fn, logps, mask, correct, ids, **kw)
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    out, grad = _outputs(fn, logps[perm], mask[perm], correct[perm], ids[perm], **kw)
    close(out.loss, base.loss, atol=1e-14)
    close(out.credit, base.credit[perm], atol=1e-14)
    close(grad, base_grad[perm], atol=1e-14)
    for key in base.metrics:
        close(out.metrics[key], base.metrics[key], atol=1e-14)
    # Strided (non-contiguous) views of the same rows give the same result.
    wide = torch.stack([logps, torch.full_like(logps, float("nan"))], dim=-1)[..., 0]
    strided_ids = torch.stack([ids, ids * 0], dim=-1)[:, 0]
    assert not wide.is_contiguous() and not strided_ids.is_contiguous()
    out2, grad2 = _outputs(fn, wide, mask.t().contiguous().t(), correct, strided_ids, **kw)
    close(out2.loss, base.loss, atol=1e-14)
    close(out2.credit, base.credit, atol=1e-14)
    close(grad2, base_grad, atol=1e-14)


@pytest.mark.parametrize(("fn", "kw"), LOSSES)
def test_relabelling_groups_changes_nothing(fn, kw):
    logps, mask, correct, ids = make_batch(40, [3, 5, 4, 2])
    s = sequence_scores(logps, mask)
    base = fn(s, correct, ids, **kw)
    uniq = torch.unique(ids)
    extremes = torch.tensor([2**63 - 1, -(2**63), 0, 17], dtype=torch.int64)
    assert len(uniq) <= len(extremes)
    relabel = {int(g): int(v) for g, v in zip(uniq, extremes)}
    out = fn(s, correct, torch.tensor([relabel[int(g)] for g in ids], dtype=torch.int64), **kw)
    close(out.loss, base.loss, atol=1e-14)
    close(out.credit, base.credit, atol=1e-14)
    # small ids fit int32 and int16
    compact = torch.unique(ids, return_inverse=True)[1]
    for id_dtype in (torch.int32, torch.int16, torch.uint8):
        out = fn(s, correct, compact.to(id_dtype), **kw)
        close(out.loss, base.loss, atol=1e-14)
        close(out.credit, base.credit, atol=1e-14)


@pytest.mark.parametrize(("fn", "kw"), LOSSES)
def test_group_shift_leaves_credit_unchanged_and_credits_sum_to_zero(fn, kw):
    logps, mask, correct, ids = make_batch(50, [4, 6, 3, 5, 2, 1])
    s = sequence_scores(logps, mask)
    base = fn(s, correct, ids, **kw)
    gen = torch.Generator().manual_seed(0)
    shifted = s.clone()
    for rows in group_rows(ids):
        shifted[rows] += (torch.rand((), generator=gen, dtype=F64) - 0.5) * 10
    out = fn(shifted, correct, ids, **kw)
    close(out.credit, base.credit, atol=1e-12)
    close(out.loss, base.loss, atol=1e-12)
    for rows in group_rows(ids):
        close(base.credit[rows].sum(), 0.0, atol=1e-15)
        pos, neg = ref.split(rows, correct)
        if not (pos and neg):
            assert torch.equal(base.credit[rows], torch.zeros(len(rows), dtype=F64))
        else:  # positives are pushed up, negatives down
            assert (base.credit[pos] > 0).all() and (base.credit[neg] <= 0).all()


def test_conspo_positive_credit_is_bounded_by_one_over_p():
    """The factor tau keeps each positive's credit in (0, 1/|P|] (spec section 4), for any tau."""
    logps, mask, correct, ids = make_batch(60, [8, 8, 8], degenerate=False)
    s = sequence_scores(logps, mask)
    for tau in (0.01, 0.1, 10.0, 1e3):
        out = conspo_loss(s, correct, ids, tau=tau, group_norm="all")
        for rows in group_rows(ids):
            pos, _ = ref.split(rows, correct)
            assert (out.credit[pos] > 0).all() and (out.credit[pos] <= 1 / len(pos) / 3 + 1e-15).all()


@pytest.mark.parametrize(("fn", "kw"), LOSSES)
@pytest.mark.parametrize("group_norm", ["valid", "all"])
def test_normalizer_makes_micro_batches_add_up(fn, kw, group_norm):
    """Whole-group micro-batches with ``normalizer`` = the full batch's group count reproduce the full loss."""
    logps, mask, correct, ids = make_batch(45, [4, 3, 5, 2, 6, 1])
    s = sequence_scores(logps, mask)
    kw = {**kw, "group_norm": group_norm}
    full = fn(s, correct, ids, **kw)
    count = len(ref.valid_groups(correct, ids)) if group_norm == "valid" else len(ref.groups_of(ids))
    rows = group_rows(ids)
    total, credit = 0.0, torch.zeros_like(s)
    for part in (rows[:2], rows[2:3], rows[3:]):
        idx = torch.tensor([r for g in part for r in g])
        out = fn(s[idx], correct[idx], ids[idx], normalizer=count, **kw)
        total = total + out.loss
        credit[idx] = out.credit
    close(total, full.loss, atol=1e-14)
    close(credit, full.credit, atol=1e-14)
    close(fn(s, correct, ids, normalizer=torch.tensor(float(count)), **kw).loss, full.loss, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# Limits (spec section 4)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("margin", [0.0, 0.05, 0.3])
def test_small_tau_approaches_hinge(margin):
    logps, mask, correct, ids = make_batch(70, [4, 5, 8, 3])
    s = sequence_scores(logps, mask)
    hinge = ref.hinge_limit(s, correct, ids, margin=margin)
    assert hinge > 0
    errors = []
    for tau in (1e-1, 1e-2, 1e-3):  # 1e-3: the smallest tau accepted (objectives.TAU_MIN)
        loss = float(conspo_loss(s, correct, ids, tau=tau, margin=margin).loss)
        # 0 <= tau*softplus(x/tau) - max(0, x) <= tau*log 2, and the LSE over <= G negatives adds <= tau*log G.
        assert -1e-12 <= loss - hinge <= tau * math.log(2 * 8) + 1e-12
        errors.append(loss - hinge)
    assert errors[-1] < 1e-3 * math.log(2 * 8) + 1e-12


@pytest.mark.parametrize("tau", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("group_norm", ["valid", "all"])
def test_large_margin_gives_disco_dro_gradient(tau, group_norm):
    logps, mask, correct, ids = make_batch(80, [4, 3, 6, 2])
    s = sequence_scores(logps, mask)
    disco = disco_loss(s, correct, ids, tau=tau, variant="dro", group_norm=group_norm)
    out = conspo_loss(s, correct, ids, tau=tau, margin=1e3 * tau, group_norm=group_norm)
    close(out.credit, disco.credit, rtol=1e-9, atol=1e-12)
    sg = s.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(conspo_loss(sg, correct, ids, tau=tau, margin=1e3 * tau, group_norm=group_norm).loss, sg)
    (g2,) = torch.autograd.grad(disco_loss(sg, correct, ids, tau=tau, group_norm=group_norm).loss, sg)
    close(g1, g2, rtol=1e-9, atol=1e-12)
    assert float(out.metrics["gate_mean"]) == pytest.approx(1.0)


def test_disco_dro_with_large_tau_approaches_basic():
    logps, mask, correct, ids = make_batch(81, [4, 3, 6])
    s = sequence_scores(logps, mask)
    basic = disco_loss(s, correct, ids, variant="basic").credit
    gaps = [float((disco_loss(s, correct, ids, tau=tau).credit - basic).abs().max()) for tau in (10.0, 1e3)]
    # at the largest accepted tau the softmax over negatives is uniform to O(spread / tau)
    assert gaps[1] < 1e-3 and gaps[1] < gaps[0] / 50


# --------------------------------------------------------------------------------------------------
# GRPO (spec section 3)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("eps", [0.2, 0.05])
def test_grpo_identity_on_random_token_ratios(seed, eps):
    logps, mask, correct, ids = make_batch(90 + seed, LAYOUTS[seed + 1], tokens=5, degenerate=seed < 2)
    gen = torch.Generator().manual_seed(seed)
    old = logps + (torch.rand(logps.shape, generator=gen, dtype=F64) - 0.5) * 0.8  # ratios in ~[0.67, 1.5]
    direct = ref.grpo_group_objectives(logps, old, mask, correct, ids, eps=eps)
    s_tilde = torch.tensor(ref.grpo_scores(logps, old, mask, correct, eps=eps), dtype=F64)
    credit = grpo_credit(correct, ids)
    assert credit.dtype == torch.float32 and credit.shape == correct.shape
    seen_clipping = False
    for gid, rows in ref.groups_of(ids).items():
        pos, neg = ref.split(rows, correct)
        if not (pos and neg):
            assert gid not in direct
            assert torch.equal(credit[rows], torch.zeros(len(rows)))
            continue
        p = len(pos) / len(rows)
        identity = math.sqrt(p * (1 - p)) * (float(s_tilde[pos].mean()) - float(s_tilde[neg].mean()))
        assert direct[gid] == pytest.approx(identity, rel=1e-12, abs=1e-12)
        assert direct[gid] == pytest.approx(float((credit[rows].to(F64) * s_tilde[rows]).sum()), rel=1e-6, abs=1e-7)
        close(credit[pos], math.sqrt((1 - p) / p) / len(rows), rtol=1e-6)
        close(credit[neg], -math.sqrt(p / (1 - p)) / len(rows), rtol=1e-6)
        close(credit[rows].sum(), 0.0, atol=1e-6)
        seen_clipping |= bool((s_tilde[rows] != 1).any())
    assert direct and seen_clipping


def test_grpo_credit_hand_values():
    ids = torch.tensor([7, 7, 7, 7, -1, -1, 2, 2, 2, 5, 5])
    correct = torch.tensor([1, 0, 0, 0, 1, 0, 1, 1, 1, 0, 0], dtype=torch.bool)
    want = [math.sqrt(3) / 4, -1 / math.sqrt(3) / 4, -1 / math.sqrt(3) / 4, -1 / math.sqrt(3) / 4,
            0.5, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    close(grpo_credit(correct, ids), want, rtol=1e-6, atol=1e-7)
    close(grpo_credit(correct.to(torch.int64), ids), want, rtol=1e-6, atol=1e-7)
    perm = torch.tensor([10, 3, 5, 0, 8, 1, 9, 2, 4, 7, 6])
    close(grpo_credit(correct[perm], ids[perm]), torch.tensor(want)[perm], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# Margin curriculum (spec section 5)
# --------------------------------------------------------------------------------------------------

MARGIN_CASES = [
    # (step, total, kwargs, expected)
    (0, 100, dict(schedule="constant", m_max=0.2), 0.2),
    (73, 100, dict(schedule="constant", m_max=0.2, m0=0.05), 0.2),
    # the paper's defaults: cosine from 0 to 0.01 over the first 30% of training
    (0, 1000, dict(), 0.0),
    (150, 1000, dict(), 0.005),
    (300, 1000, dict(), 0.01),
    (1000, 1000, dict(), 0.01),
    (0, 100, dict(schedule="linear", m_max=0.1, ramp_frac=1.0), 0.0),
    (25, 100, dict(schedule="linear", m_max=0.1, ramp_frac=1.0), 0.025),
    (100, 100, dict(schedule="linear", m_max=0.1, ramp_frac=1.0), 0.1),
    (150, 100, dict(schedule="linear", m_max=0.1, ramp_frac=1.0), 0.1),
    (25, 100, dict(schedule="linear", m0=0.02, m_max=0.1, ramp_frac=0.5), 0.06),
    (50, 100, dict(schedule="linear", m0=0.02, m_max=0.1, ramp_frac=0.5), 0.1),
    (80, 100, dict(schedule="linear", m0=0.02, m_max=0.1, ramp_frac=0.5), 0.1),
    (0, 100, dict(schedule="cosine", m_max=0.1, ramp_frac=1.0), 0.0),
    (25, 100, dict(schedule="cosine", m_max=0.1, ramp_frac=1.0), 0.1 * (1 - math.sqrt(0.5)) / 2),
    (50, 100, dict(schedule="cosine", m_max=0.1, ramp_frac=1.0), 0.05),
    (100, 100, dict(schedule="cosine", m_max=0.1, ramp_frac=1.0), 0.1),
    (25, 100, dict(schedule="cosine", m_max=0.1, ramp_frac=0.5), 0.05),
    (10, 40, dict(schedule="cosine", m0=0.1, m_max=0.3, ramp_frac=0.25), 0.3),
    (5, 40, dict(schedule="cosine", m0=0.1, m_max=0.3, ramp_frac=0.25), 0.2),
    (29, 100, dict(schedule="step", step_at=30, m0=0.01, m_max=0.2), 0.01),
    (30, 100, dict(schedule="step", step_at=30, m0=0.01, m_max=0.2), 0.2),
    (99, 100, dict(schedule="step", step_at=30, m0=0.01, m_max=0.2), 0.2),
    (0, 100, dict(schedule="step", step_at=0, m_max=0.1), 0.1),
]


@pytest.mark.parametrize(("step", "total", "kw", "want"), MARGIN_CASES)
def test_margin_at_hand_values(step, total, kw, want):
    got = margin_at(step, total, **kw)
    assert isinstance(got, float)
    assert got == pytest.approx(want, abs=1e-15)


def test_margin_schedules_are_monotone_and_bounded():
    for schedule in ("linear", "cosine", "step"):
        values = [margin_at(t, 50, schedule=schedule, m0=0.01, m_max=0.2, ramp_frac=0.6, step_at=20) for t in range(60)]
        assert all(a <= b + 1e-15 for a, b in zip(values, values[1:])), schedule
        assert values[0] == pytest.approx(0.01) and values[-1] == pytest.approx(0.2)


# --------------------------------------------------------------------------------------------------
# KL trust region (spec section 6)
# --------------------------------------------------------------------------------------------------


def test_trust_region_hand_values():
    nan = float("nan")
    old = torch.tensor([[-1.0, -2.0, 9.0], [-0.5, 7.0, 7.0]], dtype=F64)
    new = torch.tensor([[-1.1, -2.3, nan], [-0.4, nan, 3.0]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    tr = kl_trust_region(new, old, mask)  # delta 1e-4, beta 1e3
    kl = (0.1 + 0.3 - 0.1) / 3
    close(tr.kl, kl, atol=1e-15)
    assert not tr.kl.requires_grad
    close(tr.penalty, 1e3 * (kl - 1e-4) * kl, rtol=1e-12)
    tr.penalty.backward()
    want = torch.where(mask.bool(), torch.tensor(-1e3 * (kl - 1e-4) / 3, dtype=F64), 0.0)
    close(new.grad, want, rtol=1e-12)


def test_trust_region_gradient_is_zero_inside_delta():
    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(4, 6, generator=gen, dtype=F64)
    mask = torch.rand(4, 6, generator=gen) < 0.7
    for x0 in (old.clone(), old - 5e-5, old + 0.3):  # KL = 0, KL = delta/2, KL < 0
        x = x0.clone().requires_grad_(True)
        tr = kl_trust_region(x, old, mask, delta=1e-4, beta=1e3)
        tr.penalty.backward()
        assert float(tr.penalty.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("seed", range(3))
def test_trust_region_matches_reference_kl_and_gradient(seed):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(5, 7, generator=gen, dtype=F64) * 3
    mask = torch.rand(5, 7, generator=gen) < 0.6
    x = (old - torch.rand(5, 7, generator=gen, dtype=F64) * 0.2).requires_grad_(True)
    beta, delta = 50.0, 1e-3
    tr = kl_trust_region(x, old, mask, delta=delta, beta=beta)
    tr.penalty.backward()
    x_ref = x.detach().clone().requires_grad_(True)
    kl_ref = ref.token_mean_kl(x_ref, old, mask)
    kl_ref.backward()
    close(tr.kl, kl_ref.detach())
    assert float(kl_ref.detach()) > delta
    close(x.grad, beta * (float(kl_ref.detach()) - delta) * x_ref.grad)
    # old_logps never receives a gradient (it is detached inside)
    assert not kl_trust_region(x.detach(), old.clone().requires_grad_(True), mask).penalty.requires_grad


# --------------------------------------------------------------------------------------------------
# Half precision
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_give_float32(half):
    logps, mask, correct, ids = make_batch(95, [4, 4, 6, 2], dtype=torch.float32)
    x = logps.to(half).requires_grad_(True)
    s = sequence_scores(x, mask)
    assert s.dtype == torch.float32
    close(s, sequence_scores(x.detach().float(), mask), rtol=1e-6, atol=1e-6)  # promoted before summing
    close(s, sequence_scores(logps, mask), rtol=0, atol=1e-2)  # only the input rounding differs
    for fn, kw in [(conspo_loss, dict(margin=0.05)), (disco_loss, dict(tau=1.0)), (disco_loss, dict(variant="basic"))]:
        out = fn(sequence_scores(x, mask), correct, ids, **kw)
        assert out.loss.dtype == torch.float32 and out.credit.dtype == torch.float32
        want = fn(s.detach(), correct, ids, **kw)
        close(out.loss, want.loss, rtol=1e-6, atol=1e-7)
        exact = fn(sequence_scores(logps, mask), correct, ids, **kw)
        close(out.loss, exact.loss, rtol=0.05, atol=0.02)
        close(out.credit, exact.credit, rtol=0.05, atol=0.02)
        x.grad = None
        out.loss.backward()
        assert x.grad.dtype == half and torch.isfinite(x.grad.float()).all()
        # scores passed directly in half precision
        out_half = fn(s.detach().to(half), correct, ids, **kw)
        assert out_half.loss.dtype == torch.float32 and out_half.credit.dtype == torch.float32
        close(out_half.loss, fn(s.detach().to(half).float(), correct, ids, **kw).loss, rtol=1e-6, atol=1e-7)
    old = (logps + 0.05).to(half)  # KL = mean(old - new) = 0.05
    tr = kl_trust_region(x, old, mask)
    assert tr.penalty.dtype == torch.float32 and tr.kl.dtype == torch.float32
    close(tr.kl, kl_trust_region(x.detach().float(), old.float(), mask).kl, rtol=1e-6, atol=1e-7)
    close(tr.kl, 0.05, atol=5e-3)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

S = torch.tensor([-0.3, -0.2, -0.5, -0.1])
C = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
I = torch.tensor([0, 0, 1, 1])  # noqa: E741
L = torch.zeros(4, 3)
M = torch.ones(4, 3, dtype=torch.bool)

BAD_CALLS = [
    ("scores", lambda: conspo_loss(S[:, None], C, I)),
    ("scores", lambda: conspo_loss(torch.tensor([1, 2, 3, 4]), C, I)),
    ("correct", lambda: conspo_loss(S, C[:3], I)),
    ("group_ids", lambda: conspo_loss(S, C, I[:3])),
    ("group_ids", lambda: conspo_loss(S, C, I.float())),
    ("group_ids", lambda: disco_loss(S, C, I.to(torch.float64))),
    ("group_ids", lambda: conspo_loss(S, C, I.bool())),
    ("correct", lambda: conspo_loss(S, torch.tensor([1, 0, 2, 0]), I)),
    ("correct", lambda: conspo_loss(S, torch.tensor([1.0, 0.5, 0.0, 1.0]), I)),
    ("correct", lambda: disco_loss(S, torch.tensor([1, -1, 0, 0]), I)),
    ("correct", lambda: grpo_credit(torch.tensor([0.2, 1.0, 0.0, 1.0]), I)),
    ("group_ids", lambda: grpo_credit(C, I.float())),
    ("scores", lambda: conspo_loss(torch.tensor([0.0, float("nan"), 0.0, 0.0]), C, I)),
    ("scores", lambda: conspo_loss(torch.tensor([0.0, float("inf"), 0.0, 0.0]), C, I)),
    ("scores", lambda: disco_loss(torch.tensor([0.0, -float("inf"), 0.0, 0.0]), C, I)),
    ("scores", lambda: separation_metrics(torch.tensor([0.0, float("nan"), 0.0, 0.0]), C, I)),
    ("tau", lambda: conspo_loss(S, C, I, tau=0.0)),
    ("tau", lambda: conspo_loss(S, C, I, tau=-0.1)),
    ("tau", lambda: conspo_loss(S, C, I, tau=float("nan"))),
    ("tau", lambda: conspo_loss(S, C, I, tau=float("inf"))),
    ("tau", lambda: conspo_loss(S, C, I, tau=True)),
    ("tau", lambda: disco_loss(S, C, I, tau=0)),
    ("tau", lambda: disco_loss(S, C, I, tau=float("nan"))),
    ("margin", lambda: conspo_loss(S, C, I, margin=-0.01)),
    ("margin", lambda: conspo_loss(S, C, I, margin=float("nan"))),
    ("margin", lambda: conspo_loss(S, C, I, margin=float("inf"))),
    ("normalizer", lambda: conspo_loss(S, C, I, normalizer=-1.0)),
    ("normalizer", lambda: conspo_loss(S, C, I, normalizer=float("nan"))),
    ("normalizer", lambda: disco_loss(S, C, I, normalizer="2")),
    ("neg_reduce", lambda: conspo_loss(S, C, I, neg_reduce="max")),
    ("group_norm", lambda: conspo_loss(S, C, I, group_norm="batch")),
    ("group_norm", lambda: disco_loss(S, C, I, group_norm="none")),
    ("variant", lambda: disco_loss(S, C, I, variant="DRO")),
    ("logps", lambda: sequence_scores(torch.zeros(4), torch.ones(4))),
    ("logps", lambda: sequence_scores(torch.zeros(4, 3, dtype=torch.long), M)),
    ("mask", lambda: sequence_scores(L, M[:, :2])),
    ("logps", lambda: kl_trust_region(torch.zeros(4), torch.zeros(4), torch.ones(4))),
    ("old_logps", lambda: kl_trust_region(L, L[:2], M)),
    ("mask", lambda: kl_trust_region(L, L, M[:3])),
    ("delta", lambda: kl_trust_region(L, L, M, delta=0.0)),
    ("delta", lambda: kl_trust_region(L, L, M, delta=float("nan"))),
    ("beta", lambda: kl_trust_region(L, L, M, beta=-1.0)),
    ("beta", lambda: kl_trust_region(L, L, M, beta=float("inf"))),
    ("schedule", lambda: margin_at(1, 10, schedule="exp")),
    ("step_at", lambda: margin_at(1, 10, schedule="step")),
    ("step_at", lambda: margin_at(1, 10, schedule="step", step_at=-1)),
    ("step", lambda: margin_at(-1, 10)),
    ("step", lambda: margin_at(1.5, 10)),
    ("total_steps", lambda: margin_at(1, 0)),
    ("ramp_frac", lambda: margin_at(1, 10, ramp_frac=0.0)),
    ("ramp_frac", lambda: margin_at(1, 10, ramp_frac=1.5)),
    ("m_max", lambda: margin_at(1, 10, m_max=-0.1)),
    ("m0", lambda: margin_at(1, 10, m0=float("nan"))),
]


@pytest.mark.parametrize(("name", "call"), BAD_CALLS, ids=[f"{i}-{n}" for i, (n, _) in enumerate(BAD_CALLS)])
def test_bad_input_raises_value_error_naming_the_argument(name, call):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        call()


def test_score_sd_by_hand():
    # group 7: (-1, -3) sd 1; group 2: (0, 0, -3) sd sqrt(2); group 5: one row (ignored); group 9: (-2, -2) sd 0.
    scores = torch.tensor([-1.0, 0.0, -3.0, -4.0, 0.0, -2.0, -3.0, -2.0], dtype=torch.float64)
    ids = torch.tensor([7, 2, 7, 5, 2, 9, 2, 9])
    correct = torch.tensor([1, 0, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    got = separation_metrics(scores, correct, ids)["score_sd"]
    assert float(got) == pytest.approx(1.0)  # median of (0, 1, sqrt 2)
    # An even count of groups: the mean of the two middle values, (1 + sqrt 2) / 2 once group 9 is gone.
    keep = ids != 9
    got = separation_metrics(scores[keep], correct[keep], ids[keep])["score_sd"]
    assert float(got) == pytest.approx((1 + 2**0.5) / 2)
    # Only single-row groups: no spread to measure, 0.
    got = separation_metrics(scores[:2], correct[:2], torch.tensor([1, 2]))["score_sd"]
    assert float(got) == 0.0


# --------------------------------------------------------------------------------------------------
# Clipped-ratio scores (the paper's Eq. 6, its Table 6 ablation)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_clipped_ratio_scores_equal_the_loop_reference(seed):
    from conspo.objectives import clipped_ratio_scores

    g = torch.Generator().manual_seed(seed)
    b, t = 6, 5
    old = -torch.rand(b, t, generator=g, dtype=F64) * 2
    logps = (old + torch.randn(b, t, generator=g, dtype=F64) * 0.4).requires_grad_(True)  # ratios on both sides
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[0] = False  # a row without tokens scores 0
    correct = torch.tensor([True, False, True, False, True, False])
    got = clipped_ratio_scores(logps, old, mask, correct, eps_low=0.2, eps_high=0.28)
    want = ref.clipped_ratio_scores(logps, old, mask, correct, eps_low=0.2, eps_high=0.28)
    close(got, want, rtol=1e-12, atol=1e-14)
    weights = torch.randn(b, generator=g, dtype=F64)
    (g_got,) = torch.autograd.grad((got * weights).sum(), logps)
    (g_want,) = torch.autograd.grad((want * weights).sum(), logps)
    close(g_got, g_want, rtol=1e-12, atol=1e-14)
    ratio = torch.exp(logps.detach() - old)
    clipped = mask & torch.where(correct[:, None], ratio > 1.28, ratio < 0.8)
    assert clipped.any() and (mask & ~clipped).any(), "the case must hold clipped and unclipped tokens"
    assert bool((g_got[clipped] == 0).all())  # a clipped token carries no gradient
    assert float(got[0]) == 0.0


def test_clipped_ratio_scores_on_policy_have_the_logprob_gradient():
    from conspo.objectives import clipped_ratio_scores

    g = torch.Generator().manual_seed(7)
    logps = (-torch.rand(4, 6, generator=g, dtype=F64)).requires_grad_(True)
    mask = torch.rand(4, 6, generator=g) > 0.3
    correct = torch.tensor([True, False, False, True])
    got = clipped_ratio_scores(logps, logps.detach(), mask, correct)
    close(got, torch.ones(4, dtype=F64) * mask.any(1), rtol=0, atol=1e-15)  # every ratio is 1
    w = torch.tensor([0.3, -1.2, 0.7, 2.0], dtype=F64)
    (g_clip,) = torch.autograd.grad((got * w).sum(), logps)
    (g_logp,) = torch.autograd.grad((sequence_scores(logps, mask) * w).sum(), logps)
    close(g_clip, g_logp, rtol=1e-12, atol=1e-15)


def test_clipped_ratio_scores_bad_inputs():
    from conspo.objectives import clipped_ratio_scores

    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="old_logps must have the shape of logps"):
        clipped_ratio_scores(x, torch.zeros(2, 2), torch.ones(2, 3), torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"eps_low must be in \(0, 1\)"):
        clipped_ratio_scores(x, x, torch.ones(2, 3), torch.tensor([True, False]), eps_low=1.0)
    with pytest.raises(ValueError, match="correct must be a tensor of shape"):
        clipped_ratio_scores(x, x, torch.ones(2, 3), torch.tensor([True]))
