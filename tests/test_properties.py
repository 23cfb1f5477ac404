"""Property tests (hypothesis) of the ConSPO and DisCO objectives: finiteness, zero-sum credits, invariances.

Batches are drawn as lists of groups (each a list of (score, correct) rows) with arbitrary integer ids;
rows are then shuffled so that group members are not contiguous.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conspo.objectives import conspo_loss, disco_loss, sequence_scores

F64 = torch.float64
SETTINGS = settings(max_examples=60, deadline=None)

score = st.floats(min_value=-30.0, max_value=5.0, allow_nan=False, allow_infinity=False)
row = st.tuples(score, st.booleans())
group = st.lists(row, min_size=1, max_size=6)
groups = st.lists(group, min_size=1, max_size=5)
tau = st.sampled_from([0.01, 0.1, 0.5, 3.0, 10.0])
margin = st.sampled_from([0.0, 0.05, 0.3, 2.0])
objective = st.one_of(
    st.builds(lambda n, g, t, m: ("conspo", dict(neg_reduce=n, group_norm=g, tau=t, margin=m)),
              st.sampled_from(["sum", "mean"]), st.sampled_from(["valid", "all"]), tau, margin),
    st.builds(lambda v, g, t: ("disco", dict(variant=v, group_norm=g, tau=t)),
              st.sampled_from(["dro", "basic"]), st.sampled_from(["valid", "all"]), tau),
)
FUNCTIONS = {"conspo": conspo_loss, "disco": disco_loss}


def build(gs, ids, perm_seed):
    """(scores, correct, group_ids) tensors from drawn groups, rows shuffled by ``perm_seed``."""
    scores = [s for g in gs for s, _ in g]
    correct = [c for g in gs for _, c in g]
    group_ids = [gid for g, gid in zip(gs, ids) for _ in g]
    perm = torch.randperm(len(scores), generator=torch.Generator().manual_seed(perm_seed))
    return (torch.tensor(scores, dtype=F64)[perm], torch.tensor(correct)[perm],
            torch.tensor(group_ids, dtype=torch.long)[perm])


@st.composite
def batches(draw):
    gs = draw(groups)
    ids = draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=len(gs), max_size=len(gs), unique=True))
    return build(gs, ids, draw(st.integers(0, 2**31 - 1)))


def evaluate(name, kw, scores, correct, ids):
    s = scores.clone().requires_grad_(True)
    out = FUNCTIONS[name](s, correct, ids, **kw)
    (grad,) = torch.autograd.grad(out.loss, s, allow_unused=True)
    return out, torch.zeros_like(s) if grad is None else grad


@SETTINGS
@given(batches(), objective)
def test_finite_inputs_give_finite_loss_credit_and_metrics(batch, obj):
    name, kw = obj
    out, grad = evaluate(name, kw, *batch)
    assert torch.isfinite(out.loss)
    assert torch.isfinite(out.credit).all() and torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for v in out.metrics.values())
    torch.testing.assert_close(out.credit, -grad, rtol=1e-9, atol=1e-12)


@SETTINGS
@given(batches(), objective)
def test_credits_of_each_group_sum_to_zero(batch, obj):
    name, kw = obj
    scores, correct, ids = batch
    out, _ = evaluate(name, kw, *batch)
    for gid in torch.unique(ids):
        rows = ids == gid
        total = out.credit[rows].sum()
        assert abs(float(total)) <= 1e-12 * max(1.0, float(out.credit[rows].abs().sum())) + 1e-15
        if correct[rows].all() or not correct[rows].any():
            assert torch.equal(out.credit[rows], torch.zeros(int(rows.sum()), dtype=F64))


@SETTINGS
@given(batches(), objective, st.integers(0, 2**31 - 1))
def test_row_permutation_invariance(batch, obj, seed):
    name, kw = obj
    scores, correct, ids = batch
    base, base_grad = evaluate(name, kw, scores, correct, ids)
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    out, grad = evaluate(name, kw, scores[perm], correct[perm], ids[perm])
    torch.testing.assert_close(out.loss, base.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.credit, base.credit[perm], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, base_grad[perm], rtol=1e-12, atol=1e-14)
    for key, value in base.metrics.items():
        torch.testing.assert_close(out.metrics[key], value, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(
    st.lists(st.lists(st.floats(-5.0, 0.0), min_size=0, max_size=6), min_size=1, max_size=12),
    st.integers(0, 4),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30, 0.0]),
    st.data(),
)
def test_padding_invariance(rows, extra, junk, data):
    """Scores, losses and gradients ignore padded positions, whatever they hold and however many there are."""
    width = max(len(r) for r in rows)
    logps = torch.full((len(rows), width), 0.0, dtype=F64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        logps[i, : len(r)] = torch.tensor(r, dtype=F64)
        mask[i, : len(r)] = True
    correct = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(rows), max_size=len(rows))))
    ids = torch.tensor(data.draw(st.lists(st.integers(-3, 3), min_size=len(rows), max_size=len(rows))))
    name, kw = data.draw(objective)
    dirty = torch.cat([torch.where(mask, logps, junk), torch.full((len(rows), extra), junk, dtype=F64)], dim=1)
    dirty_mask = torch.cat([mask, torch.zeros(len(rows), extra, dtype=torch.bool)], dim=1)

    def run(x0, m):
        x = x0.clone().requires_grad_(True)
        out = FUNCTIONS[name](sequence_scores(x, m), correct, ids, **kw)
        (grad,) = torch.autograd.grad(out.loss, x, allow_unused=True)
        return out, torch.zeros_like(x) if grad is None else grad

    base, base_grad = run(logps, mask)
    out, grad = run(dirty, dirty_mask)
    torch.testing.assert_close(out.loss, base.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.credit, base.credit, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad[:, :width], base_grad, rtol=1e-12, atol=1e-14)
    assert torch.equal(grad[~dirty_mask], torch.zeros(int((~dirty_mask).sum()), dtype=F64))


@SETTINGS
@given(batches(), objective, st.lists(score, min_size=1, max_size=6), st.booleans(), st.integers(0, 2**31 - 1))
def test_degenerate_group_contributes_nothing(batch, obj, extra_scores, extra_correct, seed):
    """An all-correct or all-wrong group changes neither the loss (group_norm="valid") nor other rows' credits."""
    name, kw = obj
    kw = {**kw, "group_norm": "valid"}
    scores, correct, ids = batch
    base, base_grad = evaluate(name, kw, scores, correct, ids)
    taken = set(ids.tolist())
    new_id = next(k for k in range(-1, len(taken) + 1) if k not in taken)
    n = len(extra_scores)
    all_scores = torch.cat([scores, torch.tensor(extra_scores, dtype=F64)])
    all_correct = torch.cat([correct, torch.full((n,), extra_correct)])
    all_ids = torch.cat([ids, torch.full((n,), new_id, dtype=torch.long)])
    perm = torch.randperm(len(all_ids), generator=torch.Generator().manual_seed(seed))
    inverse = torch.argsort(perm)
    out, grad = evaluate(name, kw, all_scores[perm], all_correct[perm], all_ids[perm])
    credit, grad = out.credit[inverse], grad[inverse]
    torch.testing.assert_close(out.loss, base.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(credit[: len(ids)], base.credit, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad[: len(ids)], base_grad, rtol=1e-12, atol=1e-14)
    assert torch.equal(credit[len(ids):], torch.zeros(n, dtype=F64))
    assert torch.equal(grad[len(ids):], torch.zeros(n, dtype=F64))
    for key in ("score_gap", "auc"):
        torch.testing.assert_close(out.metrics[key], base.metrics[key], rtol=1e-12, atol=1e-12)
