"""The arithmetic task family: split by construction, determinism, difficulty knobs, the strict verifier."""

from __future__ import annotations

import ast
import itertools
import random

import pytest

from conspo.rewards.base import VerifyResult
from conspo.tasks import arithmetic
from conspo.tasks.arithmetic import (
    DIFFICULTIES,
    ArithmeticSpec,
    evaluate,
    expression,
    is_test_expression,
    make_task,
    score_integer,
    split_capacity,
)
from conspo.tasks.base import Task


def _questions(problems):
    return [p["question"] for p in problems]


def test_make_task_fulfils_the_task_contract():
    task = make_task(difficulty=3, n_train=50, n_test=20)
    assert isinstance(task, Task) and task.name == "arithmetic"
    assert len(task.train) == 50 and len(task.test) == 20
    assert task.verifier is score_integer
    for p in task.train + task.test:
        assert isinstance(p["question"], str) and p["question"].endswith("=")
        assert isinstance(p["answer"], str)
        assert score_integer(p["answer"], p["answer"]).score == 1.0
    assert 4 <= task.max_completion_length <= 8


def test_split_is_exhaustively_disjoint_on_a_small_space():
    spec = DIFFICULTIES[1]  # 2 one-digit operands, + and -: 200 problems in all
    everything = {
        expression(a, o)
        for a in itertools.product(range(10), repeat=2)
        for o in itertools.product(spec.operators, repeat=1)
    }
    test_side = {e for e in everything if is_test_expression(e)}
    assert 0 < len(test_side) < len(everything)
    assert split_capacity(spec, test=True) == len(test_side)
    assert split_capacity(spec, test=False) == len(everything) - len(test_side)
    for seed in range(5):
        task = make_task(difficulty=1, n_train=None, n_test=None, seed=seed)  # all of both splits
        train, test = {q[:-1] for q in _questions(task.train)}, {q[:-1] for q in _questions(task.test)}
        assert test == test_side and train == everything - test_side


@pytest.mark.parametrize("difficulty", [2, 3, 6])
def test_split_decided_by_the_expression_alone_whatever_seed_or_size(difficulty):
    seen_train, seen_test = set(), set()
    for seed, n in [(0, 300), (1, 50), (7, 500)]:
        task = make_task(difficulty=difficulty, n_train=n, n_test=n // 2, seed=seed)
        assert all(not is_test_expression(q[:-1]) for q in _questions(task.train))
        assert all(is_test_expression(q[:-1]) for q in _questions(task.test))
        seen_train |= set(_questions(task.train))
        seen_test |= set(_questions(task.test))
    assert not seen_train & seen_test


def test_problems_are_distinct_and_answers_correct():
    task = make_task(difficulty=6, n_train=400, n_test=100, seed=3)
    for problems in (task.train, task.test):
        assert len(set(_questions(problems))) == len(problems)
    rng = random.Random(0)
    for p in rng.sample(task.train, 50):
        # an independent check of precedence: Python's own arithmetic on our own (digits and operators) text
        assert int(p["answer"]) == eval(p["question"][:-1], {"__builtins__": {}})  # noqa: S307 (trusted text)


def test_evaluate_precedence_by_hand():
    assert evaluate((12, 7, 3), ("+", "*")) == 33
    assert evaluate((2, 3, 4), ("*", "-")) == 2
    assert evaluate((2, 3, 4, 5), ("-", "*", "*")) == -58
    assert evaluate((9, 9), ("-",)) == 0
    assert expression((12, 7, 3), ("+", "*")) == "12+7*3"


def test_same_arguments_same_problems_and_seed_changes_them():
    a = make_task(difficulty=3, n_train=200, n_test=50, seed=0)
    b = make_task(difficulty=3, n_train=200, n_test=50, seed=0)
    c = make_task(difficulty=3, n_train=200, n_test=50, seed=1)
    assert a.train == b.train and a.test == b.test
    assert a.train != c.train and a.test != c.test


def test_held_out_set_is_independent_of_n_train_and_prefix_stable():
    small = make_task(difficulty=5, n_train=10, n_test=40)
    large = make_task(difficulty=5, n_train=300, n_test=80)
    assert large.test[:40] == small.test
    assert large.train[:10] == small.train


def test_difficulty_knobs_change_the_problems():
    def shape(task):
        ops = {c for q in _questions(task.train) for c in q if c in "+-*"}
        widths = {len(t) for q in _questions(task.train) for t in q[:-1].replace("*", "+").replace("-", "+").split("+")}
        n_operands = {q.count("+") + q.count("-") + q.count("*") + 1 for q in _questions(task.train)}
        return ops, max(widths), n_operands

    assert shape(make_task(difficulty=ArithmeticSpec(2, 1, "+"), n_train=60, n_test=5)) == ({"+"}, 1, {2})
    assert shape(make_task(difficulty=ArithmeticSpec(2, 3, "+"), n_train=60, n_test=5))[1] == 3
    assert shape(make_task(difficulty=ArithmeticSpec(4, 2, "+-*"), n_train=200, n_test=5)) == ({"+", "-", "*"}, 2, {4})
    assert make_task(difficulty=ArithmeticSpec(3, 2, "*")).max_completion_length == len("970299") + 3


def test_invalid_settings_name_the_field():
    with pytest.raises(ValueError, match="n_operands"):
        ArithmeticSpec(n_operands=1)
    with pytest.raises(ValueError, match="digits"):
        ArithmeticSpec(digits=0)
    with pytest.raises(ValueError, match="operators"):
        ArithmeticSpec(operators="+/")
    with pytest.raises(ValueError, match="difficulty"):
        make_task(difficulty=99)
    with pytest.raises(ValueError, match="only .* train problems"):
        make_task(difficulty=1, n_train=1000)
    with pytest.raises(ValueError, match="at most half"):
        make_task(difficulty=ArithmeticSpec(3, 2, "+"), n_train=10**7)


def test_module_stays_light():
    tree = ast.parse(open(arithmetic.__file__).read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "functools", "hashlib", "itertools", "random", "re", "dataclasses", "conspo"}


VERIFIER_CASES = [
    # completion, answer, score, extracted, reason
    ("33", "33", 1.0, "33", "match"),
    ("   33", "33", 1.0, "33", "match"),
    ("\n\t33 \n", "33", 1.0, "33", "match"),
    ("33 is the answer", "33", 1.0, "33", "match"),
    ("033", "33", 1.0, "33", "match"),
    ("-5", "-5", 1.0, "-5", "match"),
    ("\u22125", "-5", 1.0, "-5", "match"),  # Unicode minus
    ("-0", "0", 1.0, "0", "match"),
    ("34", "33", 0.0, "34", "mismatch"),
    ("5", "-5", 0.0, "5", "mismatch"),
    ("-33", "33", 0.0, "-33", "mismatch"),
    ("33 33", "34", 0.0, "33", "mismatch"),  # only the first run counts
    ("33abc", "33", 0.0, None, "no_answer"),  # trailing garbage attached to the number
    ("33.", "33", 0.0, None, "no_answer"),
    ("33.0", "33", 0.0, None, "no_answer"),
    ("+33", "33", 0.0, None, "no_answer"),
    ("--5", "-5", 0.0, None, "no_answer"),
    ("- 5", "-5", 0.0, None, "no_answer"),
    ("x 33", "33", 0.0, None, "no_answer"),
    ("", "33", 0.0, None, "no_answer"),
    ("   \n", "33", 0.0, None, "no_answer"),
    ("\u0663\u0663", "33", 0.0, None, "no_answer"),  # Arabic-Indic digits are not ASCII digits
    ("\uff13\uff13", "33", 0.0, None, "no_answer"),  # full-width digits
    ("__import__('os')", "0", 0.0, None, "no_answer"),
    ("1" * 10_000, "1" * 10_000, 1.0, "1" * 10_000, "match"),  # no int() size limit
]


@pytest.mark.parametrize("completion,answer,score,extracted,reason", VERIFIER_CASES)
def test_score_integer_table(completion, answer, score, extracted, reason):
    assert score_integer(completion, answer) == VerifyResult(score=score, extracted=extracted, reason=reason)


def test_score_integer_never_matches_a_malformed_answer():
    assert score_integer("33", "thirty-three").reason == "mismatch"
    assert score_integer("33", " 33 ").reason == "match"


# ---------------------------------------------------------------------------------------------- worked solutions


@pytest.mark.parametrize(
    "operands,ops,solution",
    [
        ((12, 34, 56), ("+", "-"), "12+34=46;46-56=-10"),
        ((80, 64, 88), ("-", "*"), "64*88=5632;80-5632=-5552"),
        ((2, 3, 4), ("*", "*"), "2*3=6;6*4=24"),
        ((5, 2, 3, 4, 5, 2), ("-", "*", "+", "*", "*"), "2*3=6;4*5=20;20*2=40;5-6=-1;-1+40=39"),
        ((0, 45, 85), ("-", "-"), "0-45=-45;-45-85=-130"),
        ((7, 0), ("*",), "7*0=0"),
        ((9,), (), ""),
    ],
)
def test_worked_solution_by_hand(operands, ops, solution):
    assert arithmetic.worked_solution(operands, ops) == solution


_STEP = r"(-?\d+)([+\-*])(\d+|-\d+)=(-?\d+)"


def _check_steps(solution: str, question: str, answer: str) -> None:
    """Every step is one correct binary operation, there is one step per operator, the last result is the answer."""
    import re

    steps = solution.split(";")
    operators = sum(question.count(op) for op in "+-*")
    assert len(steps) == operators
    for step in steps:
        m = re.fullmatch(_STEP, step)
        assert m is not None, step
        x, op, y, z = int(m[1]), m[2], int(m[3]), int(m[4])
        assert {"+": x + y, "-": x - y, "*": x * y}[op] == z, step
    assert steps[-1].rsplit("=", 1)[1] == answer


@pytest.mark.parametrize("spec", [ArithmeticSpec(3, 2, "+-"), ArithmeticSpec(4, 2, "+-*"), ArithmeticSpec(5, 1, "*-")])
def test_worked_tasks_have_correct_steps_and_the_same_problems(spec):
    worked = make_task(difficulty=spec, n_train=300, n_test=100, seed=3, worked=True)
    plain = make_task(difficulty=spec, n_train=300, n_test=100, seed=3)
    assert _questions(worked.train) == _questions(plain.train) and _questions(worked.test) == _questions(plain.test)
    assert [p["answer"] for p in worked.train] == [p["answer"] for p in plain.train]
    assert worked.verifier is arithmetic.score_worked and plain.verifier is score_integer
    longest = max(len(p["solution"]) for p in worked.train + worked.test)
    assert worked.max_completion_length == longest + 2
    assert worked.metadata["worked"] is True and plain.metadata["worked"] is False
    for p in worked.train + worked.test:
        _check_steps(p["solution"], p["question"], p["answer"])
        assert worked.verifier(p["solution"], p["answer"]).score == 1.0
        assert "solution" not in plain.train[0]


def test_worked_flag_must_be_a_bool():
    with pytest.raises(ValueError, match="worked must be True or False"):
        make_task(difficulty=1, worked="yes")


@pytest.mark.parametrize(
    "completion,answer,score,extracted,reason",
    [
        ("12+34=46;46-56=-10", "-10", 1.0, "-10", "match"),
        ("12+34=46;46-56=-10 done", "-10", 1.0, "-10", "match"),
        ("12+34=47;47-56=-10", "-10", 1.0, "-10", "match"),  # only the final answer is checked
        ("12+34=46;46-56=-9", "-10", 0.0, "-9", "mismatch"),
        ("12+34=46;46-56=", "-10", 0.0, None, "no_answer"),
        ("12+34=46;46-56=-10x", "-10", 0.0, None, "no_answer"),
        ("-10", "-10", 0.0, None, "no_answer"),  # no '=': not a worked solution
        ("", "-10", 0.0, None, "no_answer"),
        ("=-10", "-10", 1.0, "-10", "match"),
    ],
)
def test_score_worked_table(completion, answer, score, extracted, reason):
    assert arithmetic.score_worked(completion, answer) == VerifyResult(score=score, extracted=extracted, reason=reason)
