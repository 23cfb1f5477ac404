"""Table-driven tests of the verifiers: answer extraction, math-verify, numeric and exact match, the time bound,
the reasoning-gym adapter and the TRL reward-function wrapper. Adversarial strings included; nothing is eval-ed."""

from __future__ import annotations

import logging
import math
import signal
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import conspo.rewards.verifiers as verifiers
from conspo.rewards import (
    VerifyResult,
    exact_match,
    extract_answer,
    extract_gold,
    make_reward_func,
    math_verify_match,
    numeric_match,
)
from conspo.rewards.bounded import call_with_timeout

BIG = "1" + "0" * 5000  # 10**5000 written out (str(10**5000) exceeds Python's default int-to-str limit)
MEGABYTE = 1_000_000
HOWS = {"boxed", "hash", "answer_label", "last_number", "last_line", "unbalanced", "empty_boxed", "none"}

# ------------------------------------------------------------------------------------------------ extraction

EXTRACT_CASES = [
    # (text, answer, how)
    ("so \\boxed{42}.", "42", "boxed"),
    ("\\boxed{1} no wait \\boxed{2}", "2", "boxed"),  # several boxed: the last wins
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "boxed"),  # nested braces
    ("\\boxed{\\boxed{3}}", "3", "boxed"),  # nested boxes
    ("\\boxed{a{b{c}d}e}", "a{b{c}d}e", "boxed"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}", "boxed"),  # escaped braces do not count
    ("\\boxed{\\}}", "\\}", "boxed"),
    ("\\fbox{7}", "7", "boxed"),
    ("\\boxed {8}", "8", "boxed"),
    ("$\\boxed 5$", "5", "boxed"),
    ("\\boxed{1,234}", "1234", "boxed"),  # thousands separators
    ("\\boxed{(1, 234)}", "(1, 234)", "boxed"),  # a tuple is not a number with separators
    ("\\boxed{\u22123}", "-3", "boxed"),  # unicode minus
    ("\\boxed{3} then \\boxed{4", None, "unbalanced"),  # truncated final box: not found, no fallback
    ("\\boxed{{{{", None, "unbalanced"),
    ("\\boxed{}}}}} 12", None, "empty_boxed"),
    ("\\boxed{}", None, "empty_boxed"),
    ("\\boxed{  }", None, "empty_boxed"),
    ("\\boxed", None, "empty_boxed"),
    ("\\boxedsymbol{3} and 9", "9", "last_number"),  # another command, not a box
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72", "hash"),
    ("#### 1,234\n", "1234", "hash"),
    ("#### 5\n#### 6", "6", "hash"),
    ("#### 5 \\boxed{6}", "6", "boxed"),  # boxed comes first in the order
    ("Answer: 42", "42", "answer_label"),
    ("answer:\u00a0-7", "-7", "answer_label"),  # no-break space
    ("ANSWER : 5 apples", "5 apples", "answer_label"),
    ("**Final Answer:** $1{,}000$.", "1000", "answer_label"),
    ("Answer:\n  17\n", "17", "answer_label"),
    ("Answer: 3\nAnswer: 4 #### 9", "9", "hash"),
    ("#### 5 #### 6", "6", "hash"),
    ("Answer: the answer: 5", "5", "answer_label"),
    ("####\n12", "12", "hash"),
    ("#### \n", None, "none"),
    ("so 3 - 5 = \u22122", "-2", "last_number"),
    ("It costs 1\u202f234\u202f567", "1234567", "last_number"),  # narrow no-break digit groups
    ("it is 4\u200b2", "42", "last_number"),  # zero-width space dropped
    ("we get 1,234,567", "1234567", "last_number"),
    # The number fallback reads only a number that ends the text and is no operand (issue 13, item 8):
    ("the list 1,2,3", None, "none"),  # the last item of a list is not the answer
    ("It costs 1\u202f234\u202f567 dollars", None, "none"),  # the text goes on after the number
    ("so the answer is 2^(n-1).", None, "none"),  # not the 1 inside the expression
    ("so the answer is 2^{n-1}", None, "none"),
    ("we get x + 1", None, "none"),
    ("so 2 \\cdot 3", None, "none"),
    ("hence 3 -5", None, "none"),
    ("Let me compute 3 + 4 = 7, then multiply by", None, "none"),  # a truncated ramble
    ("The answer is **12**.", "12", "last_number"),
    ("The answer is $\\frac{1}{2}$.", None, "none"),
    ("so it is \\(5\\).", "5", "last_number"),
    ("It is 50%.", "50", "last_number"),
    ("3 + 4 = 7", "7", "last_number"),
    ("ratio 2/3", "2/3", "last_number"),
    ("tiny 1e-5", "1e-5", "last_number"),
    ("pi is 3.14.", "3.14", "last_number"),
    ("x2 and y3", None, "none"),  # digits glued to names are not numbers
    ("no digits here", None, "none"),
    ("", None, "none"),
    ("   \n\t ", None, "none"),
    (None, None, "none"),
]


@pytest.mark.parametrize("text,answer,how", EXTRACT_CASES)
def test_extract_answer_table(text, answer, how):
    assert extract_answer(text) == (answer, how)


def test_extract_answer_line_and_none_fallbacks():
    assert extract_answer("thinking...\nMonday\n\n", fallback="line") == ("Monday", "last_line")
    assert extract_answer("the value is 12", fallback="none") == (None, "none")
    with pytest.raises(ValueError, match="fallback must be one of"):
        extract_answer("1", fallback="first")


@pytest.mark.parametrize(
    "gold,expected",
    [
        ("Natalia sold 48 clips.\n#### 72", "72"),
        ("We have $x = \\frac{1}{2}$, so the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("  1,000 ", "1000"),
        ("Monday", "Monday"),
        ("\\boxed{unbalanced", "\\boxed{unbalanced"),  # no final answer found: the whole gold is kept
    ],
)
def test_extract_gold(gold, expected):
    assert extract_gold(gold) == expected


ADVERSARIAL = [
    ("a" * MEGABYTE + "\\boxed{5}", ("5", "boxed")),
    ("\\boxed{5}" + "a" * MEGABYTE, (None, "none")),  # documented: only the last 10k characters are read
    ("7" + "9" * 20_000, (None, "none")),  # a number cut by the window is not read as a smaller one
    ("1," * MEGABYTE, (None, "none")),
    ("{" * MEGABYTE, (None, "none")),
    ("}" * MEGABYTE, (None, "none")),
    ("\\boxed{" * 200_000, (None, "unbalanced")),
    ("\\boxed{" + "{" * 4_000 + "}" * 4_000 + "}", ("{" * 4_000 + "}" * 4_000, "boxed")),
    ("\\frac{" * 1_000 + "1" + "}{2}" * 1_000, (None, "none")),  # deeply nested LaTeX: no final number
    ("-" * MEGABYTE, (None, "none")),
    ("1." * MEGABYTE, (None, "none")),
    ("answer:" * 100_000 + " 3", ("3", "answer_label")),
    ("####" * 200_000, (None, "none")),
    ("\\" * MEGABYTE, (None, "none")),
    ("\u2212" * MEGABYTE + "1", (None, "none")),  # "--1": an operand, not a final number
    (" " * MEGABYTE + "1" + " " * MEGABYTE, (None, "none")),  # only the last 10k characters (spaces) are read
    ("1" + ". " * MEGABYTE, (None, "none")),
]


@pytest.mark.parametrize("text,expected", ADVERSARIAL, ids=[f"adversarial{i}" for i in range(len(ADVERSARIAL))])
def test_extract_answer_adversarial_is_fast(text, expected):
    start = time.perf_counter()
    assert extract_answer(text) == expected
    assert time.perf_counter() - start < 0.5


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("\\boxed{}#Answer:0123456789 -,.\n/$\u2212\u202f")), max_size=200))
def test_extract_answer_never_raises(text):
    answer, how = extract_answer(text)
    assert how in HOWS
    assert (answer is None) == (how in {"unbalanced", "empty_boxed", "none"})


# ------------------------------------------------------------------------------------------------ numeric


NUMERIC_CASES = [
    # (completion, gold, options, score, reason)
    ("\\boxed{42}", "42", {}, 1.0, "match"),
    ("\\boxed{41}", "42", {}, 0.0, "mismatch"),
    ("#### 1,234", "1234", {}, 1.0, "match"),
    ("\\boxed{\u22127}", "-7", {}, 1.0, "match"),
    ("\\boxed{-0}", "0", {}, 1.0, "match"),
    ("\\boxed{0042}", "42", {}, 1.0, "match"),
    ("\\boxed{\\frac{1}{2}}", "0.5", {}, 1.0, "match"),
    ("\\boxed{-\\frac{3}{4}}", "-0.75", {}, 1.0, "match"),
    ("\\boxed{\\dfrac12}", "1/2", {}, 1.0, "match"),
    ("\\boxed{\\$1,000}", "1000", {}, 1.0, "match"),
    ("\\boxed{50\\%}", "50", {}, 1.0, "match"),
    ("\\boxed{5\\text{ cm}}", "5", {}, 1.0, "match"),
    ("Answer: x = 5", "5", {}, 1.0, "match"),
    ("Answer: 5 apples", "5", {}, 1.0, "match"),
    ("Answer: 2^{10}", "1024", {}, 0.0, "not_a_number"),  # two numbers: refused, never evaluated
    ("Answer: 0.1+0.2", "0.3", {}, 0.0, "not_a_number"),
    ("\\boxed{0.333}", "1/3", {}, 0.0, "mismatch"),
    ("\\boxed{0.333}", "1/3", {"rel_tol": 0.01}, 1.0, "match"),
    ("\\boxed{100.5}", "100", {"rel_tol": 0.01}, 1.0, "match"),
    ("\\boxed{100.5}", "100", {"abs_tol": 1.0}, 1.0, "match"),
    ("\\boxed{1.0000000001}", "1", {}, 1.0, "match"),  # within the default abs_tol
    (f"\\boxed{{{BIG}}}", BIG, {}, 1.0, "match"),  # 10**5000, exact
    (f"\\boxed{{{BIG[:-1]}1}}", BIG, {}, 0.0, "mismatch"),  # 10**5000 + 1
    (f"\\boxed{{1/{BIG}}}", f"1/{BIG}", {}, 1.0, "match"),  # a 5001-digit denominator
    (f"\\boxed{{1/{BIG}}}", "0", {}, 1.0, "match"),  # 10**-5000 is within the default abs_tol of 0
    (f"\\boxed{{1/{BIG}}}", "0", {"abs_tol": 0.0}, 0.0, "mismatch"),
    ("\\boxed{1e400}", "1e400", {}, 1.0, "match"),  # beyond float range: no overflow
    ("\\boxed{1e400}", "1e401", {}, 0.0, "mismatch"),
    ("\\boxed{1e999999999}", "1", {}, 0.0, "too_long"),  # would be a billion-digit integer
    ("\\boxed{" + "9" * 101 + "}", "9", {"max_digits": 100}, 0.0, "too_long"),
    ("\\boxed{1/0}", "1", {}, 0.0, "not_a_number"),
    ("\\boxed{inf}", "1", {}, 0.0, "not_a_number"),
    ("\\boxed{NaN}", "1", {}, 0.0, "not_a_number"),
    ("\\boxed{__import__('os').getcwd()}", "1", {}, 0.0, "not_a_number"),
    ("\\boxed{42}", "Monday", {}, 0.0, "invalid_gold"),
    ("\\boxed{42}", "Solution... \\boxed{42}", {}, 1.0, "match"),
    ("\\boxed{4", "4", {}, 0.0, "unbalanced"),
    ("", "4", {}, 0.0, "no_answer"),
]


@pytest.mark.parametrize("completion,gold,options,score,reason", NUMERIC_CASES)
def test_numeric_match_table(completion, gold, options, score, reason):
    result = numeric_match(completion, gold, **options)
    assert (result.score, result.reason) == (score, reason)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(10**60), max_value=10**60), st.integers(min_value=-5, max_value=5))
def test_numeric_match_integers_exact(value, offset):
    result = numeric_match(f"The answer is {value + offset}", str(value))
    assert result.score == (1.0 if offset == 0 else 0.0)


EXACT_CASES = [
    ("thinking\nMonday", "Monday", {}, 1.0, "match"),
    ("Answer: Monday.", "Monday", {}, 1.0, "match"),
    ("Answer: monday", "Monday", {}, 0.0, "mismatch"),
    ("Answer: monday", "Monday", {"ignore_case": True}, 1.0, "match"),
    ("\\boxed{a  b}", "a b", {}, 1.0, "match"),
    ("#### 1,000", "1000", {}, 1.0, "match"),
    ("\\boxed{7}", "blah\n#### 7", {}, 1.0, "match"),
    ("\\boxed{\u22127}", "-7", {}, 1.0, "match"),
    ("7", "  ", {}, 0.0, "invalid_gold"),
    ("   ", "7", {}, 0.0, "no_answer"),
]


@pytest.mark.parametrize("completion,gold,options,score,reason", EXACT_CASES)
def test_exact_match_table(completion, gold, options, score, reason):
    result = exact_match(completion, gold, **options)
    assert (result.score, result.reason) == (score, reason)


# ------------------------------------------------------------------------------------------------ math-verify


MATH_CASES = [
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0, "match"),
    ("\\boxed{0.5}", "\\frac12", 1.0, "match"),
    ("\\boxed{\\dfrac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0, "match"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0, "match"),
    ("\\boxed{\\{2,1\\}}", "\\{1,2\\}", 1.0, "match"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0, "match"),
    ("\\boxed{\\pi}", "3.14159", 0.0, "mismatch"),
    ("\\boxed{1} no wait \\boxed{2}", "2", 1.0, "match"),
    ("\\boxed{1} no wait \\boxed{2}", "1", 0.0, "mismatch"),
    ("The answer is \\boxed{\\frac{3}{4}}.", "So we get $\\boxed{0.75}$.", 1.0, "match"),  # boxed gold
    ("#### 72", "Natalia sold...\n#### 72", 1.0, "match"),  # GSM8K gold
    ("\\boxed{\u22123}", "-3", 1.0, "match"),
    (f"\\boxed{{{BIG}}}", BIG, 1.0, "match"),  # integers: exact, no sympy
    (f"\\boxed{{{BIG[:-1]}1}}", BIG, 0.0, "mismatch"),
    ("\\boxed{" + "x+" * 600 + "1}", "1", 0.0, "too_long"),
    ("\\boxed{__import__('os').system('echo pwned')}", "0", 0.0, "mismatch"),
    ("\\boxed{3", "3", 0.0, "unbalanced"),
    ("\\boxed{}", "3", 0.0, "empty_boxed"),
    ("", "3", 0.0, "no_answer"),
    ("no idea", "3", 0.0, "no_answer"),
    ("\\boxed{3}", "", 0.0, "invalid_gold"),
]


@pytest.mark.parametrize("completion,gold,score,reason", MATH_CASES)
def test_math_verify_match_table(completion, gold, score, reason):
    result = math_verify_match(completion, gold)
    assert (result.score, result.reason) == (score, reason)


@pytest.mark.parametrize(
    "completion",
    ["\\boxed{10^{10^{10}}}", "\\boxed{(10^{100})!}", "\\boxed{" + "\\frac{" * 60 + "1" + "}{2}" * 60 + "}"],
)
def test_math_verify_pathological_is_bounded(completion):
    start = time.perf_counter()
    result = math_verify_match(completion, "5", timeout_s=0.5)
    assert result.score == 0.0 and result.reason in {"timeout", "mismatch"}
    assert time.perf_counter() - start < 1.5


def test_math_verify_timeout_with_slow_verifier(monkeypatch):
    def slow(gold, predicted):
        time.sleep(30)
        return "match"

    monkeypatch.setattr(verifiers, "_math_verify_equal", slow)
    start = time.perf_counter()
    result = math_verify_match("\\boxed{\\frac{1}{2}}", "0.5", timeout_s=0.3)
    assert result == VerifyResult(0.0, "\\frac{1}{2}", "timeout")
    assert time.perf_counter() - start < 1.0


def test_timeout_holds_when_the_code_swallows_the_interrupt():
    def stubborn():
        for _ in range(3):
            try:
                time.sleep(30)
            except BaseException:  # noqa: B036 - what badly behaved library code does
                pass
        time.sleep(30)

    start = time.perf_counter()
    with pytest.raises(TimeoutError):
        call_with_timeout(stubborn, (), 0.2)
    assert time.perf_counter() - start < 1.0


def test_timer_restores_an_outer_alarm():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *args: fired.append(1))
    signal.setitimer(signal.ITIMER_REAL, 30.0)
    try:
        assert call_with_timeout(math.sqrt, (4.0,), 1.0) == 2.0
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < remaining <= 30.0
        assert signal.getsignal(signal.SIGALRM) is not previous and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _sleep_ignoring_alarms(seconds: float) -> None:
    """Runs in the worker process: blocks SIGALRM, as a long C call would ignore it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(seconds)


def _in_thread(fn, *args, **kwargs):
    box = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as error:  # handed back to the test thread
            box["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_timeout_in_worker_threads_uses_a_process():
    assert _in_thread(call_with_timeout, abs, (-3,), 5.0) == 3  # start a worker; its start-up is not timed
    start = time.perf_counter()
    with pytest.raises(TimeoutError):
        _in_thread(call_with_timeout, time.sleep, (30,), 0.3)  # interrupted by the worker's own timer
    assert time.perf_counter() - start < 1.5
    start = time.perf_counter()
    with pytest.raises(TimeoutError):  # the worker ignores the alarm: it is killed after the grace period
        _in_thread(call_with_timeout, _sleep_ignoring_alarms, (30,), 0.3)
    assert time.perf_counter() - start < 1.5


def test_math_verify_match_in_a_worker_thread():
    assert _in_thread(math_verify_match, "\\boxed{\\frac{1}{2}}", "0.5") == VerifyResult(1.0, "\\frac{1}{2}", "match")
    result = _in_thread(math_verify_match, "\\boxed{10^{10^{10}}}", "5", timeout_s=0.5)
    assert result.reason in {"timeout", "mismatch"}


# ------------------------------------------------------------------------------------------------ reward func


def test_reward_func_string_and_conversational_completions():
    reward = make_reward_func(math_verify_match, name="math")
    assert reward.__name__ == "math"
    completions = [
        "\\boxed{4}",
        "5",
        [{"role": "assistant", "content": "so \\boxed{4}"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "#### "}, {"type": "text", "text": "4"}]}],
        [],
    ]
    scores = reward(prompts=["p"] * 5, completions=completions, answer=["4"] * 5, completion_ids=[[1]] * 5,
                    trainer_state=None, log_metric=lambda *a: None)
    assert scores == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert make_reward_func(numeric_match).__name__ == "numeric_match"


def test_reward_func_logs_extracted_answers():
    logged = {}
    reward = make_reward_func(numeric_match, name="num")
    reward(prompts=["p", "q"], completions=["\\boxed{4}", "?"], answer=["4", "4"],
           log_extra=lambda column, values: logged.setdefault(column, values))
    assert logged == {"num/extracted": ["4", None], "num/reason": ["match", "no_answer"]}


def test_reward_func_exceptions_and_bad_scores(caplog):
    def flaky(completion, answer):
        if completion == "boom":
            raise RuntimeError("verifier bug")
        return VerifyResult({"nan": math.nan, "inf": math.inf, "none": None}.get(completion, 1.0), None, "x")

    reward = make_reward_func(flaky, name="flaky")
    with caplog.at_level(logging.WARNING, logger="conspo.rewards"):
        scores = reward(prompts=[""] * 5, completions=["ok", "boom", "nan", "inf", "none"], answer=["a"] * 5)
    assert scores == [1.0, 0.0, 0.0, 0.0, 0.0]
    messages = [r.getMessage() for r in caplog.records if r.name == "conspo.rewards"]
    assert any("raised on sample 1" in m for m in messages)
    assert sum("returned score" in m for m in messages) == 3
    with pytest.raises(RuntimeError, match="verifier bug"):
        make_reward_func(flaky, strict=True)(prompts=[""], completions=["boom"], answer=["a"])


def test_reward_func_needs_the_answer_column():
    reward = make_reward_func(exact_match)
    with pytest.raises(ValueError, match="dataset column 'answer'"):
        reward(prompts=["p"], completions=["x"], solution=["x"])
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        reward(prompts=["p", "p"], completions=["x", "y"], answer=["x"])


# ------------------------------------------------------------------------------------------------ reasoning-gym


def test_entry_encoding_keeps_tuples_and_sets():
    from conspo.rewards.reasoning_gym import decode_entry, encode_entry

    entry = {"question": "q", "answer": "a", "metadata": {"board": ((1, 2), (3, 4)), "ids": {3, 1}, "n": None}}
    assert decode_entry(encode_entry(entry)) == entry
    assert isinstance(decode_entry(encode_entry(entry))["metadata"]["board"][0], tuple)
    for bad in ["not json", "[1, 2]", '{"question": "q"}']:
        with pytest.raises(ValueError, match="reasoning-gym"):
            decode_entry(bad)


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("think <answer> 42 </answer>", ("42", "answer_tag")),
        ("<answer>1</answer> then <answer>2</answer>", ("2", "answer_tag")),
        ("<answer>\na\nb\n</answer>", ("a\nb", "answer_tag")),
        ("<answer>unclosed\nlast line.\n\n", ("last line.", "last_line")),
        ("<answer>\u22124</answer>", ("-4", "answer_tag")),
        ("", (None, "none")),
        (" \n ", (None, "none")),
    ],
)
def test_extract_tagged_answer(completion, expected):
    from conspo.rewards.reasoning_gym import extract_tagged_answer

    assert extract_tagged_answer(completion) == expected


def test_reasoning_gym_verifier_scores_and_never_evals():
    pytest.importorskip("reasoning_gym")
    import reasoning_gym

    from conspo.rewards.reasoning_gym import encode_entry, reasoning_gym_verifier

    dataset = reasoning_gym.create_dataset("n_queens", size=2, seed=1)
    entry = dataset[0]
    verify = reasoning_gym_verifier("n_queens", {"size": 2, "seed": 1})
    gold = encode_entry(entry)
    assert verify(f"<answer>{entry['answer']}</answer>", gold).score == 1.0
    # The family's scorer evals answers that are not exact; here only literals are parsed.
    attack = "<answer>__import__('sys').exit(3)</answer>"
    assert verify(attack, gold) == VerifyResult(0.0, "__import__('sys').exit(3)", "mismatch")
    assert verify("", gold).reason == "no_answer"
    with pytest.raises(ValueError, match="encoded entry"):
        verify("<answer>1</answer>", entry["answer"])


ADVERSARIAL_ALPHABET = list("\\boxed{}#Answer:0123456789 -,./$^_()[]e\n\u2212\u202f\u00a0") + ["\\frac", "\\sqrt", "10^{"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(ADVERSARIAL_ALPHABET), max_size=60).map("".join),
       st.lists(st.sampled_from(ADVERSARIAL_ALPHABET), max_size=20).map("".join))
def test_string_verifiers_never_raise(completion, gold):
    for verifier in (numeric_match, exact_match):
        result = verifier(completion, gold)
        assert result.score in (0.0, 1.0) and isinstance(result.reason, str)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(ADVERSARIAL_ALPHABET), max_size=40).map("".join))
def test_math_verify_never_raises_and_stays_bounded(completion):
    start = time.perf_counter()
    result = math_verify_match(completion, "\\frac{1}{2}", timeout_s=0.5)
    assert result.score in (0.0, 1.0)
    assert time.perf_counter() - start < 1.5
