"""Every group lies wholly inside one optimizer step (spec section 9), checked from prompts and completions (issue 13).

When one generation batch feeds several optimizer steps (``steps_per_generation`` > ``gradient_accumulation_steps``)
it must be divided among them by whole groups, in both batching strategies. Nothing here trusts the trainer's
group ids or the rows it chose: a group is the set of rollouts of one prompt text in one generation batch (the
dataset's prompts are distinct), an optimizer step is counted from the micro-batches, correctness is the reward
recomputed on the decoded completion, and the reference update is a float64 forward pass of our own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
import grouping  # noqa: E402
from tiny import build_tokenizer, odd_digit_parity  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from conspo import objectives as obj  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: the tiny models run faster so

HERE = Path(__file__).parent
G = 4  # num_generations
GENERATION_BATCHES = 2  # each run trains on two generation batches

# name: (group_batching expected, settings). whole_groups needs per_device_train_batch_size % G == 0; credit is
# forced, or chosen by a batch of 6 rollouts (6 * steps_per_generation rollouts must make whole groups of 4, and
# with several optimizer steps per generation batch each step's 6 * gradient_accumulation_steps rollouts too).
# conspo accepts only steps_per_generation multiples of gradient_accumulation_steps.
CASES = {
    "whole-spg1-ga1": ("whole_groups", dict(per_device_train_batch_size=8, steps_per_generation=1,
                                            gradient_accumulation_steps=1)),
    "whole-spg2-ga1": ("whole_groups", dict(per_device_train_batch_size=8, steps_per_generation=2,
                                            gradient_accumulation_steps=1)),
    "whole-spg2-ga2": ("whole_groups", dict(per_device_train_batch_size=8, steps_per_generation=2,
                                            gradient_accumulation_steps=2)),
    "whole-spg4-ga1": ("whole_groups", dict(per_device_train_batch_size=8, steps_per_generation=4,
                                            gradient_accumulation_steps=1)),
    "whole-spg4-ga2": ("whole_groups", dict(per_device_train_batch_size=8, steps_per_generation=4,
                                            gradient_accumulation_steps=2)),
    "credit-forced-spg1-ga1": ("credit", dict(group_batching="credit", per_device_train_batch_size=8,
                                              steps_per_generation=1, gradient_accumulation_steps=1)),
    "credit-forced-spg2-ga1": ("credit", dict(group_batching="credit", per_device_train_batch_size=8,
                                              steps_per_generation=2, gradient_accumulation_steps=1)),
    "credit-b6-spg2-ga2": ("credit", dict(per_device_train_batch_size=6, steps_per_generation=2,
                                          gradient_accumulation_steps=2)),
    "credit-forced-spg4-ga1": ("credit", dict(group_batching="credit", per_device_train_batch_size=8,
                                              steps_per_generation=4, gradient_accumulation_steps=1)),
    "credit-b6-spg4-ga2": ("credit", dict(per_device_train_batch_size=6, steps_per_generation=4,
                                          gradient_accumulation_steps=2)),
}


@pytest.fixture(scope="module")
def known_prompts():
    return grouping.prompt_texts(build_tokenizer(), grouping.distinct_prompts())


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """One recorded training run per case, made on first use and shared by the tests of this module."""
    cache: dict[str, dict] = {}

    def run(name: str) -> dict:
        if name not in cache:
            mode, settings = CASES[name]
            steps = GENERATION_BATCHES * settings["steps_per_generation"] // settings["gradient_accumulation_steps"]
            trainer = grouping.make_trainer(model_dir, tmp_path_factory.mktemp(name), build_tokenizer(),
                                            grouping.distinct_prompts(), odd_digit_parity, max_steps=steps,
                                            **settings)
            assert trainer.args.group_batching == mode
            trainer.train()
            record = trainer.record()
            assert len(record["generations"]) == GENERATION_BATCHES
            assert len(record["weights"]) == steps + 1 and record["step_ends"] == list(range(1, steps + 1))
            cache[name] = record
        return cache[name]

    return run


# ------------------------------------------------------------------------------------------ (a) whole groups


@pytest.mark.parametrize("name", list(CASES))
def test_each_optimizer_step_holds_every_rollout_of_its_prompts(name, runs, known_prompts):
    grouping.check_whole_groups_per_step([runs(name)], set(known_prompts), G)


@pytest.mark.parametrize("settings", [
    dict(per_device_train_batch_size=6, steps_per_generation=2, gradient_accumulation_steps=1),
    dict(per_device_train_batch_size=6, steps_per_generation=4, gradient_accumulation_steps=1),
], ids=["b6-spg2-ga1", "b6-spg4-ga1"])
def test_steps_that_cannot_hold_whole_groups_are_refused_or_still_whole(settings, model_dir, tmp_path, known_prompts):
    """6 rollouts per optimizer step cannot be whole groups of 4 in every step. Such a set-up must be refused when
    it is configured, or train with every group inside one step (never with groups cut between steps)."""
    steps = GENERATION_BATCHES * settings["steps_per_generation"]
    try:
        trainer = grouping.make_trainer(model_dir, tmp_path, build_tokenizer(), grouping.distinct_prompts(),
                                        odd_digit_parity, max_steps=steps, **settings)
    except ValueError as err:
        assert "num_generations" in str(err), f"refused, without naming what to change: {err}"
        return
    assert trainer.args.group_batching == "credit"
    trainer.train()
    grouping.check_whole_groups_per_step([trainer.record()], set(known_prompts), G)


# ------------------------------------------------------------------------------------------ (b) group ids


@pytest.mark.parametrize("name", list(CASES))
def test_group_ids_match_prompts(name, runs):
    record = runs(name)
    grouping.check_group_ids_follow_prompts([record])
    # the check has something to check: several groups per generation batch, each id on G rollouts
    for gen in record["generations"]:
        assert len(set(gen["group_ids"])) >= 2
        assert set(Counter(gen["group_ids"]).values()) == {G}


# ------------------------------------------------------------------------------------------ (c) the update itself


def _own_completion(raw: list[int], eos: int) -> list[int]:
    """The sampled completion: its tokens up to and including the first end-of-sequence, else all of them."""
    return raw[: raw.index(eos) + 1] if eos in raw else list(raw)


def _step_groups(record: dict, known: dict[str, str]) -> list[tuple[int, list[str]]]:
    """For each optimizer step in order: its generation batch and the prompts (groups) it trained on. A prompt
    whose rollouts the trainer spread over several steps is given to the step holding most of them (the first on
    a tie): the reference is then defined, and differs from what the trainer did."""
    steps = sorted(grouping.steps_of([record]).items())
    held: dict[tuple[int, str], list[tuple[int, int]]] = {}  # (generation, prompt) -> [(-rollouts, step)]
    for t, micro in steps:
        for p, c in grouping.group_split(micro).items():
            assert p in known, f"optimizer step {t}: a prompt that is not in the dataset: {p!r}"
            held.setdefault((micro[0]["generation"], p), []).append((-c, t))
    owner = {key: min(where)[1] for key, where in held.items()}
    return [(micro[0]["generation"], sorted(p for (_, p), at in owner.items() if at == t)) for t, micro in steps]


def _reference_scores(model, rows: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Length-normalised log-probability of each completion given its prompt, one right-padded forward."""
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention[i, : len(p) + len(c)] = 1
    logits = model(input_ids=ids, attention_mask=attention).logits.double()  # temperature 1
    scores = []
    for i, (p, c) in enumerate(rows):
        logps = torch.log_softmax(logits[i, len(p) - 1 : len(p) + len(c) - 1], dim=-1)
        token = logps.gather(-1, torch.tensor(c).unsqueeze(-1)).squeeze(-1)
        scores.append(obj.sequence_scores(token.unsqueeze(0), torch.ones(1, len(c), dtype=torch.bool))[0])
    return torch.stack(scores)


def _reference_weights(model_dir: Path, record: dict, known: dict[str, str]) -> tuple[list[dict], list[float]]:
    """Weights after each optimizer step of a float64 SGD that, for each step, takes the full-batch conspo_loss
    gradient over that step's groups: all rollouts of the generation batch whose prompt the step trained on."""
    tok = build_tokenizer()
    eos = tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir).double()
    model.train()  # no dropout in the tiny model; as the trainer runs it
    lr = record["learning_rate"]
    params = dict(model.named_parameters())
    after, moved = [], []
    for k, prompts in _step_groups(record, known):
        gen = record["generations"][k]
        rows, texts, completions, group = [], [], [], []
        for index, prompt in enumerate(sorted(prompts)):
            members = [i for i, p in enumerate(gen["prompts"]) if p == prompt]
            assert len(members) == G, f"generation batch {k}: {len(members)} rollouts of {prompt!r}"
            for i in members:
                completion = _own_completion(gen["raw_completion_ids"][i], eos)
                rows.append((tok(known[prompt], add_special_tokens=False)["input_ids"], completion))
                texts.append(known[prompt])
                completions.append(tok.decode(completion, skip_special_tokens=True))
                group.append(index)
        model.zero_grad(set_to_none=True)
        if not rows:  # the trainer cut every group of this step short: its reference step moves nothing
            moved.append(0.0)
            after.append({n: p.detach().clone() for n, p in params.items()})
            continue
        correct = torch.tensor(odd_digit_parity(texts, completions)) >= 0.5
        scores = _reference_scores(model, rows)
        loss = obj.conspo_loss(scores, correct, torch.tensor(group), tau=0.1, margin=0.0, neg_reduce="sum",
                               group_norm="valid").loss
        if loss.requires_grad:
            loss.backward()
        with torch.no_grad():
            step = 0.0
            for p in params.values():
                if p.grad is not None:
                    p -= lr * p.grad
                    step = max(step, float((lr * p.grad).abs().max()))
        moved.append(step)
        after.append({n: p.detach().clone() for n, p in params.items()})
    return after, moved


@pytest.mark.parametrize("name", list(CASES))
def test_weights_follow_full_batch_sgd_on_each_steps_groups(name, runs, model_dir, known_prompts):
    record = runs(name)
    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    for n, w in record["weights"][0].items():
        assert torch.equal(w, initial[n]), f"{n}: the trainer did not start from the saved weights"
    expected, moved = _reference_weights(model_dir, record, known_prompts)
    assert len(expected) == len(record["weights"]) - 1
    assert max(moved) > 1e-3, f"the reference never moved a weight by more than {max(moved):.2e}: no signal"
    for t, want in enumerate(expected):
        got = record["weights"][t + 1]
        assert set(got) == set(want)
        for n, w in want.items():
            torch.testing.assert_close(got[n].double(), w, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=n, t=t: f"after optimizer step {t}, {n}: {m}")
    last = record["weights"][-1]
    assert any((last[n] - record["weights"][0][n]).abs().max() > 1e-3 for n in last), "the trainer did not train"


# ------------------------------------------------------------------------------------------ (d) two processes

DIST_CASES = ("whole", "credit-forced", "credit-b5")


@pytest.fixture(scope="module")
def two_ranks(model_dir, tmp_path_factory):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", str(HERE / "dist_groups.py"), str(model_dir), str(out),
           *DIST_CASES]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {case: [torch.load(out / case / f"rank{r}.pt", weights_only=False) for r in range(2)]
            for case in DIST_CASES}


@pytest.mark.multiproc
@pytest.mark.parametrize("case", DIST_CASES)
def test_two_processes_each_step_holds_whole_groups(case, two_ranks, known_prompts):
    ranks = two_ranks[case]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["steps_per_generation"] == 2
    assert ranks[0]["gradient_accumulation_steps"] == (2 if case == "credit-b5" else 1)
    assert ranks[0]["group_batching"] == ("whole_groups" if case == "whole" else "credit")
    if case == "credit-b5":  # the set-up puts a group on both ranks
        shared = {p for p in ranks[0]["generations"][0]["prompts"]} & {p for p in ranks[1]["generations"][0]["prompts"]}
        assert shared, "the set-up was meant to split a group across processes"
    grouping.check_whole_groups_per_step(ranks, set(known_prompts), G)


@pytest.mark.multiproc
@pytest.mark.parametrize("case", DIST_CASES)
def test_two_processes_group_ids_match_prompts(case, two_ranks):
    ranks = two_ranks[case]
    assert [r["world_size"] for r in ranks] == [2, 2]
    grouping.check_group_ids_follow_prompts(ranks)
