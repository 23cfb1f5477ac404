"""conspo.batching against written-out references: every optimizer step holds whole groups, the steps together are
the batch, counts equal counts made row by row, and the same seed gives the same cut."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from conspo import batching


def _batch(groups: int, g: int, *, seed: int = 0, width: int = 5) -> dict:
    """A generation batch as TRL lays it out on one process: runs of g rows per prompt, per-row tensors and lists,
    a shared scalar. ``row`` numbers the rows so that every test can follow them."""
    rng = random.Random(seed)
    n = groups * g
    lengths = [rng.randint(0, width) for _ in range(n)]
    mask = torch.tensor([[1] * k + [0] * (width - k) for k in lengths])
    return {
        "row": torch.arange(n),
        "prompt": [f"p{i // g}" for i in range(n)],
        "conspo_group_ids": torch.arange(n) // g,
        "conspo_correct": torch.tensor([rng.random() < 0.5 for _ in range(n)]),
        "conspo_keep": torch.tensor([rng.random() < 0.8 for _ in range(n)]),
        "completion_mask": mask,
        "completion_ids": torch.randint(3, 50, (n, width), generator=torch.Generator().manual_seed(seed)) * mask,
        "num_items_in_batch": torch.tensor(123),
    }


@pytest.mark.parametrize("groups, g, steps", [(6, 4, 1), (6, 4, 2), (6, 4, 3), (8, 2, 4), (4, 3, 2), (12, 4, 6)])
def test_group_shuffle_cuts_steps_of_whole_groups_whose_union_is_the_batch(groups, g, steps):
    batch = _batch(groups, g)
    order = batching.shuffle_order(batch["conspo_group_ids"], g, by_groups=True)
    chunks = batching.split_steps(batch, order, steps)
    assert len(chunks) == steps
    seen = []
    for chunk in chunks:
        rows = chunk["row"].tolist()
        assert len(rows) == groups * g // steps
        # Whole groups: the prompts of a step are exactly the prompts of its rows, each with all g of its rows.
        for prompt in set(chunk["prompt"]):
            assert sorted(r for r in rows if batch["prompt"][r] == prompt) == [
                r for r in range(groups * g) if batch["prompt"][r] == prompt]
        # Every per-row value moved with its row; the shared value stayed as it was.
        assert chunk["prompt"] == [batch["prompt"][r] for r in rows]
        assert torch.equal(chunk["completion_ids"], batch["completion_ids"][rows])
        assert chunk["num_items_in_batch"] is batch["num_items_in_batch"]
        seen += rows
    assert sorted(seen) == list(range(groups * g))


def test_row_shuffle_is_trls_permutation_of_the_rows():
    batch = _batch(5, 4)
    torch.manual_seed(7)
    expected = torch.randperm(20)
    torch.manual_seed(7)
    order = batching.shuffle_order(batch["conspo_group_ids"], 4, by_groups=False)
    assert torch.equal(order, expected)
    chunks = batching.split_steps(batch, order, 2)
    assert torch.cat([c["row"] for c in chunks]).tolist() == expected.tolist()


def test_the_same_seed_gives_the_same_cut_and_another_seed_another():
    batch = _batch(16, 4)

    def cut(seed):
        order = batching.shuffle_order(batch["conspo_group_ids"], 4, by_groups=True,
                                       generator=torch.Generator().manual_seed(seed))
        return [c["row"].tolist() for c in batching.split_steps(batch, order, 4)]

    assert cut(3) == cut(3)
    assert cut(3) != cut(4)
    torch.manual_seed(3)  # no generator: torch's global one, as the trainer draws it
    a = batching.shuffle_order(batch["conspo_group_ids"], 4, by_groups=True)
    torch.manual_seed(3)
    assert torch.equal(a, batching.shuffle_order(batch["conspo_group_ids"], 4, by_groups=True))


@pytest.mark.parametrize("ids, g", [([0, 0, 0, 0, 1, 1, 1, 2], 4), ([0, 0, 0, 0, 1, 1], 4), ([0, 1, 0, 1], 2)])
def test_a_batch_that_is_not_runs_of_whole_groups_is_refused(ids, g):
    with pytest.raises(RuntimeError, match=f"does not hold whole groups of num_generations={g}"):
        batching.shuffle_order(torch.tensor(ids), g, by_groups=True)
    assert sorted(batching.shuffle_order(torch.tensor(ids), g, by_groups=False).tolist()) == list(range(len(ids)))


def _reference_counts(chunk, g, group_norm, whole_groups):
    """Counted row by row with Python loops."""
    correct, keep, mask = chunk["conspo_correct"].tolist(), chunk["conspo_keep"].tolist(), chunk["completion_mask"]
    n = len(keep)
    groups = 0
    if whole_groups:
        for start in range(0, n, g):
            members = [i for i in range(start, start + g) if keep[i]]
            has_right = any(correct[i] for i in members)
            has_wrong = any(not correct[i] for i in members)
            groups += (has_right and has_wrong) if group_norm == "valid" else bool(members)
    rollouts = sum(keep)
    tokens = sum(int(mask[i].sum()) for i in range(n) if keep[i])
    return [float(groups), float(rollouts), float(tokens)]


@pytest.mark.parametrize("seed, group_norm, whole_groups", list(itertools.product(range(4), ["valid", "all"], [True, False])))
def test_chunk_counts_equal_counts_made_row_by_row(seed, group_norm, whole_groups):
    chunk = _batch(6, 4, seed=seed)
    if seed == 3:
        chunk["tool_mask"] = (torch.rand(chunk["completion_mask"].shape, generator=torch.Generator().manual_seed(1))
                              < 0.5).long()
        expected = _reference_counts({**chunk, "completion_mask": chunk["completion_mask"] * chunk["tool_mask"]},
                                     4, group_norm, whole_groups)
    else:
        expected = _reference_counts(chunk, 4, group_norm, whole_groups)
    got = batching.chunk_counts(chunk, 4, group_norm=group_norm, whole_groups=whole_groups)
    assert got.tolist() == expected


def test_step_totals_add_consecutive_micro_batches():
    counts = torch.arange(18.0).view(6, 3)
    assert batching.step_totals(counts, 2).tolist() == [[3, 5, 7], [15, 17, 19], [27, 29, 31]]
    assert torch.equal(batching.step_totals(counts, 1), counts)
    assert batching.step_totals(counts, 6).tolist() == [counts.sum(0).tolist()]


def test_mixed_groups_and_rows_by_hand():
    batch = {
        "conspo_correct": torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 0], dtype=torch.bool),
        "conspo_keep": torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool),
    }
    # groups of 3: [1 0 1] mixed; [1 0 0] mixed; [1 (0 dropped) 1] not; [0 0 0] not
    assert batching.mixed_groups(batch, 3) == [0, 1]
    assert batching.mixed_rows(batch, 3).tolist() == [True] * 6 + [False] * 6
    assert batching.mixed_groups(batch, 2) == [0, 4]  # [1 0] [1 1] [0 0] [1 -] [1 0] [0 0]


def test_collect_mixed_groups_generates_rounds_until_every_process_has_enough():
    g = 2
    first = {"conspo_correct": torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool),
             "conspo_keep": torch.ones(8, dtype=torch.bool)}  # mixed: groups 0 and 3 of 4
    rounds = {1: torch.tensor([1, 1, 0, 1, 0, 0, 0, 0]), 2: torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])}
    generated = []

    def more(round_):
        generated.append(round_)
        return {"conspo_correct": rounds[round_].bool(), "conspo_keep": torch.ones(8, dtype=torch.bool)}

    out = batching.collect_mixed_groups(first, g, max_rounds=4, fewest=lambda found: found, more=more)
    assert generated == [1, 2] and out.rounds == 2
    assert out.chosen == [(0, 0), (0, 3), (1, 1), (2, 0), (2, 1), (2, 2), (2, 3)]
    assert out.pieces[0] is first and len(out.pieces) == 3
    # Another process still short: one more round would be drawn, but max_rounds stops it.
    generated.clear()
    out = batching.collect_mixed_groups(first, g, max_rounds=1, fewest=lambda found: 0, more=more)
    assert generated == [1] and out.rounds == 1 and out.chosen == [(0, 0), (0, 3), (1, 1)]
    out = batching.collect_mixed_groups(first, g, max_rounds=0, fewest=lambda found: 0, more=more)
    assert out.rounds == 0 and out.chosen == [(0, 0), (0, 3)]


def test_concat_groups_pads_prompts_left_and_completions_right():
    a = {"prompt_ids": torch.tensor([[5, 6], [5, 6], [7, 8], [7, 8]]), "prompt_mask": torch.ones(4, 2, dtype=torch.long),
         "completion_ids": torch.tensor([[1], [2], [3], [4]]), "completion_mask": torch.ones(4, 1, dtype=torch.long),
         "conspo_correct": torch.tensor([True, False, True, True]), "prompt": ["a", "a", "b", "b"],
         "num_items_in_batch": torch.tensor(4)}
    b = {"prompt_ids": torch.tensor([[9, 9, 9], [9, 9, 9], [4, 4, 4], [4, 4, 4]]),
         "prompt_mask": torch.ones(4, 3, dtype=torch.long),
         "completion_ids": torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]]),
         "completion_mask": torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]),
         "conspo_correct": torch.tensor([False, True, True, False]), "prompt": ["c", "c", "d", "d"],
         "num_items_in_batch": torch.tensor(9)}
    out = batching.concat_groups([(a, 1), (b, 0), (b, 1)], 2, pad_id=-1)
    assert out["prompt_ids"].tolist() == [[-1, 7, 8], [-1, 7, 8], [9, 9, 9], [9, 9, 9], [4, 4, 4], [4, 4, 4]]
    assert out["prompt_mask"].tolist() == [[0, 1, 1]] * 2 + [[1, 1, 1]] * 4
    assert out["completion_ids"].tolist() == [[3, -1, -1], [4, -1, -1], [1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]]
    assert out["completion_mask"].tolist() == [[1, 0, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert out["conspo_correct"].tolist() == [True, True, False, True, True, False]
    assert out["prompt"] == ["b", "b", "c", "c", "d", "d"]
    assert out["num_items_in_batch"] is a["num_items_in_batch"]


def test_pick_unused_skips_used_keys_and_repeats_when_short():
    keys = ["a", "b", "a", "c", "d", "b"]
    used = {"c"}
    assert batching.pick_unused(range(6), keys.__getitem__, used, 2) == [0, 1]
    assert used == {"a", "b", "c"}
    assert batching.pick_unused(range(6), keys.__getitem__, used, 1) == [4]
    assert batching.pick_unused(range(6), keys.__getitem__, used, 3) == [0, 0, 0]  # nothing unused left
    assert batching.pick_unused([5, 4, 3], keys.__getitem__, {"x"}, 5) == [5, 4, 3, 5, 5]


def test_draw_prompts_gives_each_process_its_own_slice_of_one_permutation():
    dataset = [{"prompt": f"q{i}"} for i in range(20)]
    used = {repr("q0"), repr("q1")}  # prompts are compared by repr, as the trainer collects them
    per_rank = [batching.draw_prompts(dataset, 3, 2, used=set(used), generator=torch.Generator().manual_seed(5),
                                      world=2, rank=r) for r in range(2)]
    expected = [i for i in torch.randperm(20, generator=torch.Generator().manual_seed(5)).tolist() if i > 1][:6]
    for rank, rows in enumerate(per_rank):
        assert [row["prompt"] for row in rows] == [f"q{i}" for i in expected[rank * 3:(rank + 1) * 3] for _ in range(2)]
    drawn = {row["prompt"] for rows in per_rank for row in rows}
    assert len(drawn) == 6 and not {repr(p) for p in drawn} & used
