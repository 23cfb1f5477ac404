"""`conspo eval` and its metrics: pass@k / maj@k against enumeration of all k-subsets, hand-computed cases,
aggregation, the markdown report, the sampling driver (scripted and tiny models) and the CLI end to end."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from fractions import Fraction
from types import SimpleNamespace

import pytest

from conspo.metrics import NO_SUBSET, avg_at_k, maj_at_k, metric_names, pass_at_k, summarize

# ----------------------------------------------------------------------------------------------- references


def brute_pass(n: int, c: int, k: int) -> Fraction:
    """Fraction of k-subsets of n samples (the first c correct) holding a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def brute_maj(answers, correct, k) -> Fraction:
    """Mean over all k-subsets of the majority answer's correctness; ties share the credit equally, samples
    without an answer do not vote, an answer's correctness is the fraction of its samples that are correct."""
    value = {}
    for a in set(answers) - {None}:
        flags = [ok for b, ok in zip(answers, correct) if b == a]
        value[a] = Fraction(sum(flags), len(flags))
    subsets = list(itertools.combinations(range(len(answers)), k))
    total = Fraction(0)
    for s in subsets:
        votes = Counter(answers[i] for i in s if answers[i] is not None)
        if votes:
            top = max(votes.values())
            winners = [a for a in votes if votes[a] == top]
            total += sum(value[a] for a in winners) / len(winners)
    return total / len(subsets)


# ----------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):  # c = 0 and c = n included
        for k in range(1, n + 1):  # k = n included
            assert pass_at_k(n, c, k) == float(brute_pass(n, c, k)), (n, c, k)


def test_pass_at_k_exact_for_large_n():
    assert pass_at_k(10_000, 1, 5_000) == 0.5  # one correct sample: k / n
    assert pass_at_k(100_000, 1, 3) == 3 / 100_000
    assert pass_at_k(4_000, 0, 2_000) == 0.0 and pass_at_k(4_000, 4_000, 1) == 1.0
    assert pass_at_k(3_000, 1_501, 1_500) == 1.0  # fewer wrong samples than k: some correct one is always drawn
    # C(3000, 1500) overflows a float, so a quotient of floats fails here; by hand, with 2 correct of 3000 and
    # k = 1500: P(no correct drawn) = (1500/3000) * (1499/2999), so pass@k = 1 - 1500*1499 / (3000*2999).
    assert pass_at_k(3_000, 2, 1_500) == pytest.approx(1 - 1500 * 1499 / (3000 * 2999), rel=1e-15)
    values = [pass_at_k(64, 5, k) for k in range(1, 65)]
    assert values == sorted(values) and values[0] == 5 / 64


def test_pass_at_k_rejects_bad_inputs():
    with pytest.raises(ValueError, match="k=5"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="k=0"):
        pass_at_k(4, 1, 0)
    with pytest.raises(ValueError, match="c=5"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="n=0"):
        pass_at_k(0, 0, 1)


def test_avg_at_k_is_the_fraction_correct_for_every_k():
    flags = [True, False, True, False, False]
    assert [avg_at_k(flags, k) for k in (1, 3, 5)] == [0.4, 0.4, 0.4]
    # the expectation over k-subsets of the subset mean, by enumeration
    for k in range(1, 6):
        subsets = list(itertools.combinations(flags, k))
        assert avg_at_k(flags, k) == pytest.approx(float(sum(Fraction(sum(s), k) for s in subsets) / len(subsets)))
    with pytest.raises(ValueError, match="k=6"):
        avg_at_k(flags, 6)


@pytest.mark.parametrize(
    "answers, correct, k, expected",
    [
        (["a", "b"], [True, False], 2, 0.5),  # a tie: half the credit
        (["a", "a", "b"], [True, True, False], 1, 2 / 3),
        (["a", "a", "b"], [True, True, False], 2, 2 / 3),  # {a,a}: 1, {a,b} twice: 1/2 each
        (["a", "a", "b"], [True, True, False], 3, 1.0),
        (["a", "b", "b"], [True, False, False], 3, 0.0),  # the wrong answer wins
        (["a", "b", "c", "d"], [True, False, False, False], 4, 0.25),  # a four-way tie
        ([None, None], [False, False], 2, 0.0),  # nobody votes
        ([None, "a"], [False, True], 1, 0.5),
        ([None, "a"], [False, True], 2, 1.0),  # an unanswered sample does not vote
        ([None, None, "b"], [False, False, True], 3, 1.0),  # a single vote beats two blanks
    ],
)
def test_maj_at_k_hand_computed(answers, correct, k, expected):
    assert maj_at_k(answers, correct, k) == pytest.approx(expected, abs=1e-15)


def test_maj_at_k_matches_enumeration_with_ties_and_blanks():
    rng = random.Random(0)
    for _ in range(150):
        n = rng.randint(1, 8)
        alphabet = rng.choice([["a"], ["a", "b"], ["a", "b", "c", None], list("abcdef") + [None]])
        answers = [rng.choice(alphabet) for _ in range(n)]
        good = {a: rng.random() < 0.5 for a in alphabet}
        # mostly consistent with the answer, sometimes not: the answer's value is then a fraction
        correct = [good[a] if rng.random() < 0.85 else not good[a] for a in answers]
        for k in range(1, n + 1):
            assert maj_at_k(answers, correct, k) == pytest.approx(float(brute_maj(answers, correct, k)), abs=1e-12)


def test_maj_at_k_rejects_bad_inputs():
    with pytest.raises(ValueError, match="k=3"):
        maj_at_k(["a", "b"], [True, False], 3)
    with pytest.raises(ValueError, match="2 answers but 1"):
        maj_at_k(["a", "b"], [True], 1)


# ----------------------------------------------------------------------------------------------- aggregation


def record(problem, sample, subset, extracted, score, length=3, truncated=False):
    return {"problem": problem, "sample": sample, "subset": subset, "extracted": extracted, "score": score,
            "length": length, "truncated": truncated}


FIXTURE = [
    record(0, 0, "x", "4", 1.0, length=2), record(0, 1, "x", "5", 0.0, length=6, truncated=True),
    record(1, 0, "x", "9", 1.0, length=3), record(1, 1, "x", "9", 1.0, length=3),
    record(2, 0, "y", None, 0.0, length=1), record(2, 1, "y", "7", 0.5, length=5),  # partial credit: not correct
]


def test_summarize_overall_and_per_subset():
    s = summarize(FIXTURE, [2, 1])
    assert s["ks"] == [1, 2]
    overall, x, y = s["overall"], s["subsets"]["x"], s["subsets"]["y"]
    assert (overall["problems"], overall["samples"], x["problems"], y["problems"]) == (3, 6, 2, 1)
    assert overall["avg@1"] == overall["avg@2"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert overall["pass@2"] == pytest.approx((1 + 1 + 0) / 3)
    assert overall["maj@2"] == pytest.approx((0.5 + 1 + 0) / 3)  # problem 0: a tie between 4 and 5
    assert x["avg@1"] == 0.75 and x["pass@2"] == 1.0 and x["maj@2"] == 0.75
    assert y["avg@1"] == 0.0 and y["mean_score"] == 0.25
    assert overall["mean_score"] == pytest.approx(3.5 / 6)
    assert overall["length"] == {"mean": 20 / 6, "min": 1, "max": 6, "truncated": 1 / 6}
    assert x["length"]["truncated"] == 0.25
    assert list(s["subsets"]) == ["x", "y"]


def test_summarize_without_subsets_and_with_some_missing():
    plain = [{**r, "subset": None} for r in FIXTURE]
    assert summarize(plain, [1])["subsets"] == {}
    mixed = [{**r, "subset": None} if r["problem"] == 2 else r for r in FIXTURE]
    assert list(summarize(mixed, [1])["subsets"]) == [NO_SUBSET, "x"]


def test_summarize_needs_max_k_samples_per_problem():
    with pytest.raises(ValueError, match="k=3 needs at least 3 samples"):
        summarize(FIXTURE, [1, 3])


EXPECTED_TABLE = """\
## conspo eval: fixture.jsonl

model `tiny`; 2 samples per problem, temperature 1.0, at most 6 new tokens, seed 0. Metrics in percent, each problem weighted equally.

| subset | problems | avg@1 | avg@2 | pass@1 | pass@2 | maj@1 | maj@2 | mean tokens | min | max | truncated % |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| all | 3 | 50.0 | 50.0 | 50.0 | 66.7 | 50.0 | 50.0 | 3.3 | 1 | 6 | 16.7 |
| x | 2 | 75.0 | 75.0 | 75.0 | 100.0 | 75.0 | 75.0 | 3.5 | 2 | 6 | 25.0 |
| y | 1 | 0.0 | 0.0 | 0.0 | 0.0 | 0.0 | 0.0 | 3.0 | 1 | 5 | 0.0 |
"""


def test_render_markdown_exact():
    from conspo.evaluation import render_markdown

    summary = summarize(FIXTURE, [1, 2])
    summary["settings"] = {"task": "fixture.jsonl", "model": "tiny", "samples": 2, "temperature": 1.0,
                           "max_new_tokens": 6, "seed": 0}
    assert render_markdown(summary) == EXPECTED_TABLE
    assert metric_names([1, 2]) == ["avg@1", "avg@2", "pass@1", "pass@2", "maj@1", "maj@2"]


# ----------------------------------------------------------------------------------------------- inputs


def test_parse_ks_and_settings_errors():
    from conspo.evaluation import EvalError, check_settings, parse_ks

    assert parse_ks("16, 1,4,4", 16) == [1, 4, 16]
    for text, samples, message in [("1,8", 4, "k=8"), ("0", 4, "k=0"), ("1,x", 4, "'x' is not an integer"),
                                   ("1", 0, "--samples must be >= 1")]:
        with pytest.raises(EvalError, match=message):
            parse_ks(text, samples)
    with pytest.raises(EvalError, match="--limit"):
        check_settings(2, [1], limit=0)
    with pytest.raises(EvalError, match="--temperature"):
        check_settings(2, [1], temperature=-1.0)


def write_dataset(path):
    rows = [{"problem": "1+1=", "answer": "2", "level": "L1"}, {"problem": "3-1=", "answer": "2", "level": "L2"},
            {"problem": "2+5=", "answer": "7", "level": "L1"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_task_dataset_and_subsets(tmp_path):
    from conspo.evaluation import EvalError, load_task

    data = write_dataset(tmp_path / "d.jsonl")
    task = load_task(dataset=str(data))
    assert [p["question"] for p in task.test] == ["1+1=", "3-1=", "2+5="] and not task.train  # every row
    assert [p["subset"] for p in task.test] == ["L1", "L2", "L1"]  # "level" is a recognised subset field
    task = load_task(dataset=str(data), subset_field="problem")
    assert task.test[1]["subset"] == "3-1="
    with pytest.raises(ValueError, match="unknown task 'arithmetc'.*arithmetic"):
        load_task("arithmetc")
    with pytest.raises(EvalError, match="--subset-field 'colour'"):
        load_task("arithmetic", subset_field="colour")


def test_choose_backend_without_vllm():
    pytest.importorskip("torch")
    import importlib.util

    from conspo.evaluation import EvalError, choose_backend

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    assert choose_backend("auto") == "transformers"
    with pytest.raises(EvalError, match="--backend vllm needs the vllm package"):
        choose_backend("vllm")


# ----------------------------------------------------------------------------------------------- sampling


class ScriptedModel:
    """Answers each prompt with a fixed continuation (token ids), like ``generate`` on a left-padded batch."""

    def __init__(self, tokenizer, replies):
        import torch

        self.tokenizer, self.replies, self.torch = tokenizer, replies, torch
        self.generation_config = SimpleNamespace(eos_token_id=tokenizer.eos_token_id)

    def parameters(self):
        yield self.torch.zeros(1)

    def generate(self, input_ids, attention_mask, generation_config):
        tok, limit = self.tokenizer, generation_config.max_new_tokens
        rows = []
        for ids in input_ids.tolist():
            prompt = tok.decode(ids, skip_special_tokens=True)
            rows.append(self.replies[prompt.split("\n")[0]][:limit])
        width = max(map(len, rows))
        tail = [r + [tok.pad_token_id] * (width - len(r)) for r in rows]
        return self.torch.cat([input_ids, self.torch.tensor(tail, dtype=input_ids.dtype)], dim=1)


def test_evaluate_records_lengths_and_truncation(tiny_dir):
    from conspo.embedded import build_tokenizer
    from conspo.evaluation import evaluate, load_task
    from conspo.tasks.datasets import MATH_INSTRUCTION

    tok = build_tokenizer()
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    replies = {"1+1=": enc("\\boxed{2}") + [tok.eos_token_id] + enc("junk"),  # stops at end-of-sequence
               "3-1=": enc("22222222222"),  # never ends: cut at the budget, truncated
               "2+5=": [tok.eos_token_id]}  # empty
    task = load_task(dataset=str(write_dataset(tiny_dir.parent / "scripted.jsonl")))
    assert task.instruction == MATH_INSTRUCTION
    records, summary = evaluate(ScriptedModel(tok, replies), tok, task, samples=2, ks=[1, 2], max_new_tokens=10,
                                batch_size=4, progress=False)
    assert [(r["problem"], r["sample"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    first, second, third = records[0], records[2], records[4]
    assert (first["completion"], first["extracted"], first["score"], first["correct"]) == ("\\boxed{2}", "2", 1.0, True)
    assert (first["length"], first["truncated"], first["subset"], first["answer"]) == (9, False, "L1", "2")
    assert (second["completion"], second["length"], second["truncated"], second["correct"]) == ("2" * 10, 10, True, False)
    assert (third["completion"], third["length"], third["truncated"], third["reason"]) == ("", 0, False, "no_answer")
    overall = summary["overall"]
    assert overall["pass@2"] == pytest.approx(1 / 3) and overall["maj@2"] == pytest.approx(1 / 3)
    assert overall["length"] == {"mean": 19 / 3, "min": 0, "max": 10, "truncated": 1 / 3}
    assert summary["subsets"]["L1"]["avg@1"] == 0.5
    assert summary["settings"]["max_new_tokens"] == 10 and summary["settings"]["samples"] == 2


def test_same_seed_same_samples(tiny_dir):
    from conspo.evaluation import evaluate, load_task
    from conspo.loading import load_model

    model, tok = load_model(str(tiny_dir))
    assert tok.decode(tok("1 + 2", add_special_tokens=False)["input_ids"]) == "1 + 2"  # spaces kept
    task = load_task(dataset=str(write_dataset(tiny_dir.parent / "det.jsonl")))
    run = lambda seed: evaluate(model, tok, task, samples=3, ks=[1, 3], max_new_tokens=6, seed=seed,  # noqa: E731
                                batch_size=4, progress=False)  # batches of 4 straddle problems
    (a, sa), (b, sb), (c, _) = run(0), run(0), run(1)
    assert a == b and sa == sb
    assert [r["completion"] for r in a] != [r["completion"] for r in c]
    assert len({r["completion"] for r in a}) > 3  # sampled, not greedy
    greedy, _ = evaluate(model, tok, task, samples=2, ks=[1], temperature=0.0, max_new_tokens=6, progress=False)
    assert greedy[0]["completion"] == greedy[1]["completion"]



def test_the_checkpoints_generation_config_does_not_reach_sampling(tiny_dir):
    from conspo.evaluation import evaluate, load_task
    from conspo.loading import load_model

    model, tok = load_model(str(tiny_dir))
    task = load_task(dataset=str(write_dataset(tiny_dir.parent / "genconf.jsonl")))
    run = lambda: [r["completion"] for r in evaluate(model, tok, task, samples=3, ks=[1], max_new_tokens=6,  # noqa: E731
                                                     seed=0, batch_size=4, progress=False)[0]]
    plain = run()
    own = model.generation_config
    own.repetition_penalty, own.no_repeat_ngram_size, own.min_p = 5.0, 1, 0.9  # each would change the samples
    assert run() == plain
    assert model.generation_config is own and own.repetition_penalty == 5.0  # restored afterwards
    own.repetition_penalty, own.no_repeat_ngram_size, own.min_p = 1.0, 0, None


def test_dataset_fields_with_a_built_in_task_are_refused():
    from conspo.evaluation import EvalError, load_task

    with pytest.raises(EvalError, match="apply only to --dataset or a --task file"):
        load_task("arithmetic", question_field="problem")


# ----------------------------------------------------------------------------------------------- the CLI


def run_cli(*args):
    from conspo.cli import main

    return main(["eval", *map(str, args)])


def test_cli_end_to_end(tiny_dir, tmp_path, capsys):
    from conspo.evaluation import SAMPLES_FILE, SUMMARY_FILE, TABLE_FILE, render_markdown

    data = write_dataset(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    rc = run_cli("--model", tiny_dir, "--dataset", data, "--samples", 4, "--k", "1,2,4", "--max-new-tokens", 5,
                 "--template", "chat", "--subset-field", "level", "--output-dir", out, "--batch-size", 5)
    assert rc == 0
    records = [json.loads(line) for line in (out / SAMPLES_FILE).read_text().splitlines()]
    assert len(records) == 12 and [r["sample"] for r in records[:4]] == [0, 1, 2, 3]
    assert set(records[0]) == {"problem", "subset", "sample", "answer", "completion", "extracted", "score",
                               "correct", "reason", "length", "truncated"}
    assert all(0 <= r["length"] <= 5 and (r["length"] == 5 or not r["truncated"]) for r in records)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    recomputed = summarize(records, [1, 2, 4])
    assert summary["overall"] == recomputed["overall"] and summary["subsets"] == recomputed["subsets"]
    assert list(summary["subsets"]) == ["L1", "L2"] and summary["subsets"]["L1"]["problems"] == 2
    settings = summary["settings"]
    assert (settings["model"], settings["backend"], settings["template"], settings["seed"]) == (
        str(tiny_dir), "transformers", "chat", 0)
    table = (out / TABLE_FILE).read_text()
    assert table == render_markdown(summary) and table in capsys.readouterr().out
    assert "| all | 3 |" in table and "| L2 | 1 |" in table


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{tmp}/nowhere", "--task", "arithmetic"], "no such directory"),
        (["--model", "{tmp}", "--task", "arithmetic"], "no config.json there"),
        (["--model", "{tiny}", "--gguf-file", "m.gguf"], "no m.gguf there"),
        (["--model", "{tiny}", "--task", "arithmetc"], "unknown task 'arithmetc'"),
        (["--model", "{tiny}", "--samples", "4", "--k", "1,8"], "k=8 is out of range"),
        (["--model", "{tiny}", "--samples", "0"], "--samples must be >= 1"),
        (["--model", "{tiny}", "--dataset", "{tmp}/missing.jsonl"], "missing.jsonl: no such file"),
    ],
)
def test_cli_bad_input(args, message, tiny_dir, tmp_path, capsys):
    rc = run_cli(*(a.format(tmp=tmp_path, tiny=tiny_dir) for a in args))
    assert rc == 2
    err = capsys.readouterr().err
    assert "conspo eval: error:" in err and message in err


# ----------------------------------------------------------------------------------------------- protocols, top-p


@pytest.fixture()
def recorded_generate(monkeypatch):
    """``generate`` replaced by a recorder: each call's generation config and prompt rows; every completion is
    one end-of-sequence token."""
    import torch
    import transformers

    calls = []

    def generate(self, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
        rows = [[t for t, m in zip(r, a) if m] for r, a in zip(input_ids.tolist(), attention_mask.tolist())]
        calls.append({"config": generation_config, "rows": rows})
        eos = torch.full((input_ids.shape[0], 1), self.config.eos_token_id, dtype=input_ids.dtype)
        return torch.cat([input_ids, eos], dim=1)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", generate)
    return calls


def test_protocol_paper_samples_as_the_paper_and_says_so(tiny_dir, tmp_path, recorded_generate):
    from conspo.embedded import build_tokenizer
    from conspo.evaluation import SUMMARY_FILE, TABLE_FILE
    from conspo.tasks.datasets import PAPER_INSTRUCTION

    data, out = write_dataset(tmp_path / "d.jsonl"), tmp_path / "out"
    assert run_cli("--model", tiny_dir, "--dataset", data, "--protocol", "paper", "--max-new-tokens", 3,
                   "--output-dir", out) == 0
    configs = [c["config"] for c in recorded_generate]
    assert {(c.do_sample, c.temperature, c.top_p, c.top_k, c.max_new_tokens) for c in configs} == {
        (True, 0.6, 0.95, 0, 3)}
    rows = [row for c in recorded_generate for row in c["rows"]]
    assert len(rows) == 3 * 32  # 32 samples of each of the 3 problems
    tok = build_tokenizer()
    assert tok.decode(rows[0]) == "1+1=\n" + PAPER_INSTRUCTION and tok.decode(rows[32]) == "3-1=\n" + PAPER_INSTRUCTION
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["protocol"] == {"name": "paper", "temperature": 0.6, "top_p": 0.95, "samples": 32, "ks": [1, 32],
                                   "max_new_tokens": 3, "instruction": PAPER_INSTRUCTION, "template": "plain",
                                   "overrides": ["max_new_tokens"]}
    assert summary["ks"] == [1, 32] and "pass@32" in summary["overall"]
    assert (summary["settings"]["top_p"], summary["settings"]["instruction"]) == (0.95, PAPER_INSTRUCTION)
    table = (out / TABLE_FILE).read_text()
    assert "temperature 0.6, top-p 0.95" in table
    assert ("Protocol `paper` (overridden: max_new_tokens): temperature 0.6, top-p 0.95, 32 samples, k in {1, 32}, "
            "at most 3 new tokens, template plain; instruction after each question: `" + PAPER_INSTRUCTION + "`.") in table


def test_explicit_settings_override_the_protocol(tiny_dir, tmp_path, recorded_generate):
    from conspo.embedded import build_tokenizer
    from conspo.evaluation import SUMMARY_FILE

    data, out = write_dataset(tmp_path / "d.jsonl"), tmp_path / "out"
    assert run_cli("--model", tiny_dir, "--dataset", data, "--protocol", "paper", "--samples", 4, "--k", "1,4",
                   "--temperature", 0.9, "--top-p", 0.5, "--instruction", "", "--max-new-tokens", 2,
                   "--output-dir", out) == 0
    assert {(c["config"].temperature, c["config"].top_p) for c in recorded_generate} == {(0.9, 0.5)}
    rows = [row for c in recorded_generate for row in c["rows"]]
    assert len(rows) == 12 and build_tokenizer().decode(rows[0]) == "1+1="  # no instruction at all
    protocol = json.loads((out / SUMMARY_FILE).read_text())["protocol"]
    assert (protocol["name"], protocol["samples"], protocol["ks"], protocol["instruction"]) == ("paper", 4, [1, 4], "")
    assert protocol["overrides"] == ["temperature", "top_p", "samples", "ks", "instruction", "max_new_tokens"]


@pytest.mark.parametrize("source, sampling", [(("--dataset", "{data}"), (0.6, 0.95)),
                                              (("--task", "arithmetic"), (1.0, 1.0))])
def test_default_sampling_is_the_papers_for_math_tasks_only(source, sampling, tiny_dir, tmp_path, recorded_generate):
    from conspo.evaluation import SUMMARY_FILE

    data, out = write_dataset(tmp_path / "d.jsonl"), tmp_path / "out"
    args = [a.format(data=data) for a in source]
    assert run_cli("--model", tiny_dir, *args, "--limit", 2, "--max-new-tokens", 2, "--output-dir", out) == 0
    assert {(c["config"].temperature, c["config"].top_p) for c in recorded_generate} == {sampling}
    protocol = json.loads((out / SUMMARY_FILE).read_text())["protocol"]
    assert (protocol["name"], protocol["samples"], protocol["ks"], protocol["overrides"]) == (
        "default", 4, [1], ["max_new_tokens"])
    assert (protocol["temperature"], protocol["top_p"]) == sampling


def test_top_p_near_zero_is_greedy_and_one_is_not(tiny_dir):
    from conspo.evaluation import evaluate, load_task
    from conspo.loading import load_model

    model, tok = load_model(str(tiny_dir))
    task = load_task(dataset=str(write_dataset(tiny_dir.parent / "topp.jsonl")))
    run = lambda **kw: [r["completion"] for r in evaluate(model, tok, task, samples=4, ks=[1], max_new_tokens=6,  # noqa: E731
                                                          seed=0, batch_size=4, progress=False, **kw)[0]]
    greedy = run(temperature=0.0)
    assert len(set(greedy[:4])) == 1 and greedy[0] != ""  # one completion per problem, repeated
    assert run(temperature=1.0, top_p=1e-6) == greedy  # only the most probable token survives the nucleus
    full = run(temperature=1.0, top_p=1.0)
    assert full != greedy and sum(a != b for a, b in zip(full, greedy)) >= 6  # a random model samples widely
    assert run(temperature=1.0, top_p=0.5) != full  # the nucleus changes the samples


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1", "nan"])
def test_bad_top_p_is_refused_before_anything_is_written(value, tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("--model", tiny_dir, "--task", "arithmetic", "--top-p", value, "--output-dir", out) == 2
    assert f"--top-p must be in (0, 1], got {float(value)}" in capsys.readouterr().err
    assert not out.exists()


def test_a_protocols_k_beyond_fewer_samples_says_to_give_k(tiny_dir, tmp_path, capsys):
    assert run_cli("--model", tiny_dir, "--task", "arithmetic", "--protocol", "paper", "--samples", 8,
                   "--output-dir", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "k=32 is out of range" in err and "--protocol paper's: give --k too" in err


def test_vllm_gets_top_p_and_the_same_prompt_ids(tiny_dir, monkeypatch, recorded_generate):
    import sys
    import types

    from conspo.evaluation import evaluate, load_task
    from conspo.loading import load_model

    made = []

    class SamplingParams:
        def __init__(self, **kwargs):
            made.append(kwargs)
            self.n = kwargs["n"]

    class LLM:
        requests = []

        def generate(self, requests, params):
            LLM.requests += [r["prompt_token_ids"] for r in requests]
            return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[1])] * p.n) for p in params]

    LLM.__module__ = "vllm.fake"
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=SamplingParams, LLM=LLM))
    model, tok = load_model(str(tiny_dir))
    task = load_task(dataset=str(write_dataset(tiny_dir.parent / "vllm.jsonl")))
    records, summary = evaluate(LLM(), tok, task, samples=2, ks=[1, 2], temperature=0.6, top_p=0.95,
                                max_new_tokens=4, progress=False)
    assert [(p["temperature"], p["top_p"], p["n"], p["max_tokens"]) for p in made] == [(0.6, 0.95, 2, 4)] * 3
    assert len(records) == 6 and summary["settings"]["device"] == "vllm"
    evaluate(model, tok, task, samples=1, ks=[1], max_new_tokens=4, progress=False)  # the transformers path
    assert LLM.requests == [row for c in recorded_generate for row in c["rows"]]


# ----------------------------------------------------------------------------------------------- resume, --limit, gold


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_interrupted_eval_continues_from_its_samples_and_equals_an_uninterrupted_one(tiny_dir, tmp_path,
                                                                                         monkeypatch, capsys):
    import transformers

    from conspo.evaluation import PROGRESS_FILE, SAMPLES_FILE, SUMMARY_FILE

    data = write_dataset(tmp_path / "d.jsonl")
    args = ["--model", tiny_dir, "--dataset", data, "--samples", 3, "--k", "1,3", "--max-new-tokens", 4,
            "--batch-size", 2, "--seed", 5]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_cli(*args, "--output-dir", whole) == 0
    expected = _read(whole / SAMPLES_FILE)
    assert len(expected) == 9 and (whole / PROGRESS_FILE).is_file()

    # Killed during the fourth batch: three whole batches (6 samples), then one sample of the next, then a torn line.
    assert run_cli(*args, "--output-dir", part) == 0
    lines = (part / SAMPLES_FILE).read_text().splitlines()
    (part / SAMPLES_FILE).write_text("\n".join(lines[:7]) + "\n" + lines[7][:20])
    (part / SUMMARY_FILE).unlink()
    batches = []
    real = transformers.GenerationMixin.generate

    def counting(self, *a, **kw):
        batches.append(kw["input_ids"].shape[0])
        return real(self, *a, **kw)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", counting)
    capsys.readouterr()
    assert run_cli(*args, "--output-dir", part) == 0
    err = capsys.readouterr().err
    assert "continuing" in err and "6 of 9 samples there" in err
    assert batches == [2, 1]  # only the batches not finished before: 4 (samples 7-8) and 5 (sample 9)
    assert _read(part / SAMPLES_FILE) == expected  # bit-identical samples (per-batch seeds)
    assert json.loads((part / SUMMARY_FILE).read_text())["overall"] == \
        json.loads((whole / SUMMARY_FILE).read_text())["overall"]

    # A finished evaluation rerun with the same settings generates nothing and reports the same numbers.
    batches.clear()
    assert run_cli(*args, "--output-dir", part) == 0 and batches == []
    assert _read(part / SAMPLES_FILE) == expected


def test_a_rerun_with_other_settings_is_refused_naming_them_and_touches_nothing(tiny_dir, tmp_path, capsys):
    from conspo.evaluation import SAMPLES_FILE

    data, out = write_dataset(tmp_path / "d.jsonl"), tmp_path / "out"
    base = ["--model", tiny_dir, "--dataset", data, "--max-new-tokens", 3, "--output-dir", out]
    assert run_cli(*base, "--samples", 2) == 0
    before = (out / SAMPLES_FILE).read_bytes()
    capsys.readouterr()
    assert run_cli(*base, "--samples", 4) == 2
    err = capsys.readouterr().err
    assert "is not continued: it was made with other settings: samples 2 -> 4" in err
    assert "give another --output-dir" in err and err.count("\n") == 1
    assert (out / SAMPLES_FILE).read_bytes() == before
    (out / "eval_progress.json").unlink()  # a samples file without its settings (an older conspo): not guessed at
    assert run_cli(*base, "--samples", 2) == 2
    assert "no eval_progress.json records the settings" in capsys.readouterr().err


def test_limit_takes_a_fixed_seeded_sample_not_the_first_problems(tiny_dir, tmp_path):
    from conspo.evaluation import LIMIT_SEED, SAMPLES_FILE, select_problems

    problems = [{"question": f"{i}+0=", "answer": str(i)} for i in range(200)]
    chosen = select_problems(problems, 20)
    assert chosen == sorted(random.Random(LIMIT_SEED).sample(range(200), 20))  # the reference, drawn here
    assert chosen != list(range(20)) and len(set(chosen)) == 20 and chosen == sorted(chosen)
    assert select_problems(problems, 20) == chosen and select_problems(problems, None) == list(range(200))
    assert select_problems(problems, 500) == list(range(200))
    out = tmp_path / "out"
    assert run_cli("--model", tiny_dir, "--task", "arithmetic", "--limit", 5, "--samples", 1, "--max-new-tokens", 2,
                   "--output-dir", out, "--seed", 3) == 0
    from conspo.evaluation import load_task

    test = load_task("arithmetic").test
    records = _read(out / SAMPLES_FILE)
    indices = select_problems(test, 5)
    assert [r["problem"] for r in records] == indices  # the problem's index in the task's held-out split
    assert [r["answer"] for r in records] == [test[i]["answer"] for i in indices]


def test_the_answer_of_a_reasoning_gym_sample_is_the_gold_not_the_encoded_entry(tiny_dir, tmp_path):
    from conspo.evaluation import SAMPLES_FILE
    from conspo.tasks.registry import get_task

    pytest.importorskip("reasoning_gym")
    out = tmp_path / "out"
    spec = "reasoning_gym:basic_arithmetic"
    assert run_cli("--model", tiny_dir, "--task", spec, "--limit", 3, "--samples", 1, "--max-new-tokens", 2,
                   "--output-dir", out) == 0
    test = get_task(spec).test
    records = _read(out / SAMPLES_FILE)
    assert len(records) == 3
    for r in records:
        problem = test[r["problem"]]
        assert r["answer"] == problem["reference"] and r["answer"] != problem["answer"]
        assert not r["answer"].startswith("{")


def test_progress_moves_by_one_finished_sample_at_a_time():
    import torch

    from conspo.evaluation import _finished_rows_counter

    class Bar:
        def __init__(self):
            self.updates = []

        def update(self, n):
            self.updates.append(n)

    bar = Bar()
    counter = _finished_rows_counter(2, [1], bar)  # prompts 2 tokens wide, end-of-sequence id 1
    steps = [[[5, 5, 7], [5, 5, 1], [5, 5, 7]],
             [[5, 5, 7, 7], [5, 5, 1, 0], [5, 5, 7, 1]],
             [[5, 5, 7, 7, 1], [5, 5, 1, 0, 0], [5, 5, 7, 1, 0]]]
    for ids in steps:
        stop = counter(torch.tensor(ids), None)
        assert stop.tolist() == [False, False, False]  # it never stops generation itself
    assert bar.updates == [1, 1, 1] and counter.counted == 3
    bar2 = Bar()
    counter = _finished_rows_counter(1, [1], bar2)
    counter(torch.tensor([[1, 0], [0, 3]]), None)  # an end-of-sequence in the prompt does not count
    assert bar2.updates == []


def test_the_eval_progress_bar_counts_every_sample_once(tiny_dir, monkeypatch):
    from conspo import evaluation
    from conspo.evaluation import evaluate, load_task
    from conspo.loading import load_model

    model, tok = load_model(str(tiny_dir))
    task = load_task(dataset=str(write_dataset(tiny_dir.parent / "bar.jsonl")))
    moved = []
    real = evaluation._progress

    def progress(total, desc, unit, enabled, initial=0):
        bar = real(total, desc, unit, True, initial)
        original = bar.update
        bar.update = lambda n=1: (moved.append(n), original(n))[1]
        return bar

    monkeypatch.setattr(evaluation, "_progress", progress)
    evaluate(model, tok, task, samples=3, ks=[1], max_new_tokens=6, batch_size=4, progress=True)
    assert sum(moved) == 9 and max(moved) <= 4


def test_training_held_out_checks_generate_to_the_runs_budget_sized_by_eval_limit(tiny_dir, tmp_path, monkeypatch):
    """Issue 14 item 16: conspo train's held-out check generates up to the configured max_completion_length (not
    the task's), on --eval-limit problems, with a progress bar."""
    import transformers

    from conspo import evaluation
    from conspo.run import train

    calls, bars = [], []

    class Stop(Exception):
        pass

    def generate(self, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
        calls.append((input_ids.shape[0], generation_config.max_new_tokens, generation_config.do_sample))
        raise Stop  # the first generation of the run is the held-out check before training

    real_progress = evaluation._progress
    monkeypatch.setattr(evaluation, "_progress", lambda total, desc, unit, enabled, initial=0: (
        bars.append((total, desc, enabled)), real_progress(total, desc, unit, False, initial))[1])
    monkeypatch.setattr(transformers.GenerationMixin, "generate", generate)
    with pytest.raises(Stop):
        train(model=str(tiny_dir), output_dir=tmp_path / "run", max_completion_length=3, eval_limit=7,
              max_steps=2, per_device_train_batch_size=8, num_generations=4)
    assert calls == [(7, 3, False)]  # the task's own budget is longer: arithmetic's is not 3
    assert evaluation.load_task("arithmetic").max_completion_length != 3
    assert bars == [(7, "held-out accuracy", True)]
