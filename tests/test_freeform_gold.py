"""Free-form gold answers (issue 13, item 8): the math verifier never checks a completion against a fragment of
a gold it cannot read as one whole answer, and the dataset loader reports such golds when the file is loaded.

Each table row was taken from, or modelled on, a real trial (``conspo eval`` on competition problems whose
answers are written in words): the gold ``"sum_(i=1)^n i^3, or equivalently (n(n+1)/2)^2"`` was read as
``1``, so ``\\boxed{1}`` verified and the right answer did not. Nothing here is eval-ed."""

from __future__ import annotations

import json
import logging
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conspo.rewards import check_gold, extract_answer, math_verify_match, read_gold
from conspo.tasks.datasets import DatasetError, dataset_task, load_dataset_file


def boxed(answer: str) -> str:
    return f"Some reasoning.\nSo the final answer is $\\boxed{{{answer}}}$."


# (gold, whole answers that must verify, fragments of the gold that must not)
READABLE = [
    # several equivalent forms: each whole alternative verifies, a number inside the gold does not
    ("sum_(i=1)^n i^3, or equivalently (n(n+1)/2)^2", ["(n(n+1)/2)^2", "\\frac{n^2(n+1)^2}{4}"], ["1", "2", "3"]),
    ("C(10, 5), or equivalently 252", ["252", "\\binom{10}{5}", "C(10, 5)"], ["10", "5"]),
    ("\\frac{\\sqrt{2}}{2}, i.e. \\frac{1}{\\sqrt{2}}", ["\\frac{1}{\\sqrt2}", "\\sqrt{2}/2"], ["2", "1"]),
    # prose around one stated value
    ("The limit exists and is equal to 2", ["2"], ["1", "0"]),
    ("The limit exists and is equal to 1/2", ["\\frac{1}{2}", "0.5"], ["1", "2"]),
    # interval and set answers
    ("The set of solutions is [2, 5)", ["[2, 5)", "x \\in [2,5)"], ["2", "5", "(2, 5)"]),
    ("x \\in [2, 5), i.e. 2 \\le x < 5", ["[2,5)", "2 \\le x < 5"], ["2", "5", "2 \\le x"]),
    ("All real x with x > 3, that is (3, \\infty)", ["(3, \\infty)"], ["3"]),
    ("(-\\infty, 3) \\cup (5, \\infty)", ["(-\\infty,3)\\cup(5,\\infty)"], ["3", "5"]),
    ("\\{1, 2, 3\\}", ["\\{3, 2, 1\\}"], ["3", "1"]),
    # yes/no with a justification: compared as a word, never symbolically
    ("Yes, because 7 is prime", ["Yes", "\\text{yes}", "yes, 7 is prime"], ["7", "sey", "no"]),
    ("No, since the series diverges", ["No", "\\text{No}"], ["on", "yes", "n o"]),
    ("No", ["no", "NO."], ["on", "n \\cdot o", "yes"]),
    ("Monday", ["monday", "\\text{Monday}"], ["dynamo", "mondays"]),
]

# (gold, fragments that must not verify): no alternative reads whole, so the loader reports these rows
FREEFORM = [
    ("The maximum is 2, attained at x = 1", ["2", "1"]),
    ("n^2 if n is even, and n^2 - 1 otherwise", ["1", "n^2", "n^2 - 1"]),
    ("The answer is 2^(n-1) for every n \\ge 1", ["1", "2"]),
    ("sum_(i=1)^n i^3", ["1", "3"]),
    ("x = 2 or x = 3", ["2", "3"]),  # a plain "or" asks for both values: never split into alternatives
    ("It is not true that the sum is 2", ["2"]),  # a negated statement is not a stated value
    ("(-\\infty, 3) \\cup (5, \\infty), the set where x^2 - 8x + 15 > 0", ["3", "5", "15"]),
    ("s_(i=1)^n i^3", ["1"]),  # no prose, but math-verify reads it as the 1 of i=1: a fragment
    ("The limit does not exist", ["0"]),
]


@pytest.mark.parametrize("gold,wholes,fragments", READABLE, ids=[row[0][:40] for row in READABLE])
def test_readable_gold_verifies_whole_answers_only(gold, wholes, fragments):
    assert check_gold(gold) == ""
    for answer in wholes:
        result = math_verify_match(boxed(answer), gold)
        assert result.score == 1.0, (answer, result)
    for fragment in fragments:
        result = math_verify_match(boxed(fragment), gold)
        assert result.score == 0.0, (fragment, result)


@pytest.mark.parametrize("gold,fragments", FREEFORM, ids=[row[0][:40] for row in FREEFORM])
def test_freeform_gold_never_matches_a_fragment(gold, fragments):
    assert check_gold(gold) != ""
    assert not read_gold(gold).checkable or gold.startswith("s_")
    for fragment in fragments:
        result = math_verify_match(boxed(fragment), gold)
        assert result == math_verify_match(boxed(fragment), gold)  # pure: the same verdict each time
        assert result.score == 0.0 and result.reason == "freeform_gold", (fragment, result)
    # the whole gold, written out, is still an exact match (what freeform_gold="exact" relies on)
    assert math_verify_match(boxed(gold), gold).score == 1.0


def test_reported_defects():
    """The four leaks found by the trial, one assertion each."""
    assert math_verify_match("\\boxed{on}", "No").score == 0.0  # letters are not multiplied symbols
    assert extract_answer("so the answer is 2^(n-1).")[0] != "1"  # unboxed, mid-sentence
    assert math_verify_match("so the answer is 2^(n-1).", "1").score == 0.0
    assert math_verify_match("\\boxed{252}", "C(10, 5), or equivalently 252").score == 1.0
    assert math_verify_match("\\boxed{2}", "The limit exists and is equal to 2").score == 1.0
    assert math_verify_match("\\boxed{1}", "sum_(i=1)^n i^3, or equivalently (n(n+1)/2)^2").score == 0.0
    assert math_verify_match("\\boxed{(n(n+1)/2)^2}", "sum_(i=1)^n i^3, or equivalently (n(n+1)/2)^2").score == 1.0


TRUNCATED_RAMBLES = [
    "Let me compute 3 + 4 = 7, then multiply by",
    "so we have x^2 + 2x + 1 where x = 3 and then",
    "The sum over i from 1 to n of i^3 is (n(n+1)/2)^2, so for n = 2 we",
    "Thus the answer is 2^(n-1).",
    "We get \\frac{1}{2} + \\frac{1}{3}",
    "Counting the 5 apples and 3 pears gives 8 fruits in",
    "So the number of ways is \\binom{10}{5",
    "and finally 3 \\cdot",
]


@pytest.mark.parametrize("completion", TRUNCATED_RAMBLES)
def test_truncated_or_unboxed_ramble_earns_no_answer(completion):
    """An unboxed completion earns credit only when it ends with its answer: no number from mid-sentence
    is taken as the answer (nor can it vote in a majority vote)."""
    assert extract_answer(completion) == (None, "none")
    assert math_verify_match(completion, "7").reason == "no_answer"


def test_a_completion_cut_right_after_a_final_number_is_read_as_it():
    """The documented limit of the rule: a text that ends with ``= 2`` ends with an answer, truncated or not
    (the verifier sees text only; evaluation records flag truncated samples)."""
    assert extract_answer("The sum is (n(n+1)/2)^2, so for n = 2") == ("2", "last_number")


def test_hedged_answer_joined_by_logic_is_not_one_of_its_parts():
    assert math_verify_match("\\boxed{1 \\lor 2}", "2").score == 0.0
    assert math_verify_match("\\boxed{1 \\vee 2 \\vee 3}", "3").score == 0.0


# ------------------------------------------------------------------------------------------------ loader


def _write(tmp_path, golds):
    path = tmp_path / "freeform.jsonl"
    path.write_text("".join(json.dumps({"question": f"Problem {i}?", "answer": g}) + "\n" for i, g in enumerate(golds)))
    return path


def test_loader_reports_and_drops_freeform_rows_by_default(tmp_path, caplog):
    golds = [row[0] for row in READABLE] + [row[0] for row in FREEFORM]
    path = _write(tmp_path, golds)
    with caplog.at_level(logging.WARNING, logger="conspo.tasks"):
        problems = load_dataset_file(path)
    assert [p["answer"] for p in problems] == [row[0] for row in READABLE]
    report = [r.getMessage() for r in caplog.records if "cannot read as one whole answer" in r.getMessage()]
    assert len(report) == 1
    assert f"{len(FREEFORM)} of {len(golds)} rows" in report[0]
    assert "dropped" in report[0] and "freeform_gold='drop'" in report[0]
    first = len(READABLE) + 1
    for row in (first, first + 1, first + 2):  # three examples, by row number in the file
        assert f"row {row}:" in report[0]
    assert f"row {first + 3}:" not in report[0]


def test_loader_refuses_freeform_rows_when_asked(tmp_path):
    path = _write(tmp_path, ["42", "The maximum is 2, attained at x = 1"])
    with pytest.raises(DatasetError, match=r"1 of 2 rows .*row 2: 'The maximum is 2.*freeform_gold='drop'"):
        load_dataset_file(path, freeform_gold="refuse")


def test_loader_keeps_freeform_rows_for_exact_matching(tmp_path, caplog):
    path = _write(tmp_path, ["42", "The maximum is 2, attained at x = 1"])
    with caplog.at_level(logging.WARNING, logger="conspo.tasks"):
        problems = load_dataset_file(path, freeform_gold="exact")
    assert len(problems) == 2 and any("kept (freeform_gold='exact')" in r.getMessage() for r in caplog.records)
    gold = problems[1]["answer"]
    assert math_verify_match(boxed("2"), gold).score == 0.0
    assert math_verify_match(boxed("the maximum is 2, attained at x = 1"), gold).score == 1.0


def test_loader_validates_the_policy_and_says_when_nothing_is_left(tmp_path):
    path = _write(tmp_path, ["x = 2 or x = 3"])
    with pytest.raises(DatasetError, match=r"freeform_gold must be one of 'drop', 'refuse', 'exact'; got 'skip'"):
        load_dataset_file(path, freeform_gold="skip")
    with pytest.raises(DatasetError, match=r"no rows are left.*freeform_gold='exact'"):
        load_dataset_file(path)


def test_dataset_task_passes_the_policy_on(tmp_path):
    path = _write(tmp_path, [str(i) for i in range(9)] + ["n^2 if n is even, and n^2 - 1 otherwise"])
    assert len(dataset_task(path, test_fraction=0.2).train + dataset_task(path, test_fraction=0.2).test) == 9
    task = dataset_task(path, test_fraction=0.2, freeform_gold="exact")
    assert len(task.train + task.test) == 10 and task.metadata["freeform_gold"] == "exact"
    with pytest.raises(DatasetError, match="1 of 10 rows"):
        dataset_task(path, freeform_gold="refuse")


ADVERSARIAL_GOLDS = [
    "is " * 300_000 + "2",
    "The limit is " * 100_000 + "2",
    "a" * 1_000_000,
    "(" * 1_000_000,
    "\\text{" * 200_000,
    "yes, " * 200_000,
    ", or equivalently " * 100_000,
    "x" + "=" * 1_000_000,
    "1" * 100_000,
]


@pytest.mark.parametrize("gold", ADVERSARIAL_GOLDS, ids=[f"adversarial{i}" for i in range(len(ADVERSARIAL_GOLDS))])
def test_reading_adversarial_golds_is_fast(gold):
    start = time.perf_counter()
    reason = check_gold(gold)
    result = math_verify_match("\\boxed{2}", gold)
    assert result.score == 0.0 and isinstance(reason, str)
    assert time.perf_counter() - start < 2.0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["is ", "equal to ", "or ", ", or equivalently ", "i.e. ", "yes", "No", ", because ",
                                 "\\text{", "}", "x", "n", "2", "=", "(", ")", "^", "the ", "limit ", "\\in ", "[",
                                 "\\lor ", "sum_", " "]), max_size=30).map("".join))
def test_read_gold_never_raises(gold):
    read = read_gold(gold)
    assert read.checkable == (not read.problem)
    assert all(read.expressions) and all(read.words)
