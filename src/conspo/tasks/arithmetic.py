"""A procedural arithmetic task family: ``"12+7*3="`` -> ``"33"``.

This is the built-in task of the embedded default (``conspo train`` with no arguments). Its difficulty is
tunable (number of operands, digits per operand, operators); problems are generated, never downloaded.

Train and held-out problems are disjoint by construction: a hash of the problem text (``"12+7*3"``) puts each
possible problem in exactly one split, whatever the seed or the sizes asked for. The seed only picks which
problems of each split are drawn, and the two splits are drawn from separate random streams, so the held-out
set does not change when ``n_train`` does (and a smaller ``n_test`` gives a prefix of a larger one).

The verifier :func:`score_integer` is a pure string function: it never evaluates model output.

This module imports only the standard library and conspo's contracts, so it is cheap to import.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
import re
from dataclasses import asdict, dataclass

from conspo.rewards.base import VerifyResult
from conspo.tasks.base import Task

_OPERATORS = "+-*"
_SPLIT_SALT = b"conspo-arithmetic-split-v1:"
# Fraction of the problem space that belongs to the held-out split (decided by the hash of each problem).
TEST_FRACTION = 0.2
# Problem spaces up to this size are enumerated (exact, and never stuck on rejection); larger ones are sampled.
_ENUMERATE_LIMIT = 200_000


@dataclass(frozen=True)
class ArithmeticSpec:
    """One difficulty setting of the arithmetic family.

    n_operands: operands per expression, 2 to 6 (``"a+b"`` has 2).
    digits:     each operand is drawn uniformly from ``0 .. 10**digits - 1``; 1 to 6.
    operators:  the binary operators to draw from, a non-empty subset of ``"+-*"``; usual precedence
                (``*`` before ``+`` and ``-``), no parentheses.
    """

    n_operands: int = 2
    digits: int = 2
    operators: str = "+-"

    def __post_init__(self) -> None:
        if not 2 <= self.n_operands <= 6:
            raise ValueError(f"ArithmeticSpec.n_operands must be in [2, 6], got {self.n_operands}")
        if not 1 <= self.digits <= 6:
            raise ValueError(f"ArithmeticSpec.digits must be in [1, 6], got {self.digits}")
        if (
            not self.operators
            or any(c not in _OPERATORS for c in self.operators)
            or len(set(self.operators)) != len(self.operators)
        ):
            raise ValueError(
                f"ArithmeticSpec.operators must be distinct characters from {_OPERATORS!r}, got {self.operators!r}"
            )

    @property
    def space_size(self) -> int:
        """How many distinct expressions this spec can produce (both splits together)."""
        return (10**self.digits) ** self.n_operands * len(self.operators) ** (self.n_operands - 1)

    @property
    def max_answer_chars(self) -> int:
        """An upper bound on the characters of any answer (sign included)."""
        top = 10**self.digits - 1
        if "*" in self.operators:
            bound = top**self.n_operands
        else:
            bound = top * self.n_operands
        return len(str(bound)) + 1


# Named difficulty levels, roughly easiest first. Level 3 (two-digit + and -) is the embedded default: the tiny
# model needs about 800 supervised steps (about a minute on 2 CPU cores) to reach 40% on it
# (docs/embedded_default.md). Level 1 is small enough to enumerate in tests.
DIFFICULTIES: dict[int, ArithmeticSpec] = {
    1: ArithmeticSpec(n_operands=2, digits=1, operators="+-"),
    2: ArithmeticSpec(n_operands=2, digits=2, operators="+"),
    3: ArithmeticSpec(n_operands=2, digits=2, operators="+-"),
    4: ArithmeticSpec(n_operands=3, digits=1, operators="+-*"),
    5: ArithmeticSpec(n_operands=3, digits=2, operators="+-"),
    6: ArithmeticSpec(n_operands=3, digits=2, operators="+-*"),
    7: ArithmeticSpec(n_operands=4, digits=2, operators="+-*"),
}
DEFAULT_DIFFICULTY = 3
# The worked-solution task's default (``arithmetic_worked``): level 5, three two-digit operands with + and -.
WORKED_DEFAULT = 5
# Default split sizes; capped at what a small problem space holds when left to their defaults.
DEFAULT_N_TRAIN = 12_000
DEFAULT_N_TEST = 1_000


def resolve_spec(difficulty: int | str | ArithmeticSpec) -> ArithmeticSpec:
    """A named level (``DIFFICULTIES``), an explicit :class:`ArithmeticSpec`, or its text
    ``"OPERANDSxDIGITS:OPERATORS"`` (``"3x2:+-"``: three 2-digit operands, ``+`` and ``-``)."""
    if isinstance(difficulty, ArithmeticSpec):
        return difficulty
    if isinstance(difficulty, int) and not isinstance(difficulty, bool) and difficulty in DIFFICULTIES:
        return DIFFICULTIES[difficulty]
    if isinstance(difficulty, str):
        try:
            shape, operators = difficulty.split(":", 1)
            n_operands, digits = (int(x) for x in shape.lower().split("x"))
        except ValueError:
            raise ValueError(f"difficulty {difficulty!r}: expected OPERANDSxDIGITS:OPERATORS, e.g. 3x2:+-*") from None
        try:
            return ArithmeticSpec(n_operands=n_operands, digits=digits, operators=operators)
        except ValueError as err:
            raise ValueError(f"difficulty {difficulty!r}: {err}") from None
    raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, OPERANDSxDIGITS:OPERATORS (e.g. 3x2:+-) or "
                     f"an ArithmeticSpec, got {difficulty!r}")


def evaluate(operands: tuple[int, ...], ops: tuple[str, ...]) -> int:
    """The value of ``operands[0] ops[0] operands[1] ...`` with ``*`` binding tighter than ``+`` and ``-``."""
    if len(ops) != len(operands) - 1:
        raise ValueError("need exactly one operator between each pair of operands")
    terms: list[int] = [operands[0]]  # signed products, summed at the end
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            terms[-1] *= x
        elif op == "+":
            terms.append(x)
        elif op == "-":
            terms.append(-x)
        else:
            raise ValueError(f"unknown operator {op!r}")
    return sum(terms)


def expression(operands: tuple[int, ...], ops: tuple[str, ...]) -> str:
    """``(12, 7, 3), ("+", "*")`` -> ``"12+7*3"``."""
    parts = [str(operands[0])]
    for op, x in zip(ops, operands[1:]):
        parts += [op, str(x)]
    return "".join(parts)


def is_test_expression(expr: str) -> bool:
    """Whether the problem ``expr`` (e.g. ``"12+7*3"``) belongs to the held-out split. Depends on nothing else."""
    digest = hashlib.sha256(_SPLIT_SALT + expr.encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") < TEST_FRACTION * 2**64


def worked_solution(operands: tuple[int, ...], ops: tuple[str, ...]) -> str:
    """The step-by-step solution: one binary step per operator, products first, then sums left to right.

    ``(12, 34, 56), ("+", "-")`` -> ``"12+34=46;46-56=-10"``; ``(80, 64, 88), ("-", "*")`` ->
    ``"64*88=5632;80-5632=-5552"``. The result of the last step is the answer (:func:`evaluate`); a single
    operand has no step and gives ``""``.
    """
    if len(ops) != len(operands) - 1:
        raise ValueError("need exactly one operator between each pair of operands")
    steps: list[str] = []
    terms: list[int] = [operands[0]]  # values joined by + and -, once every product is done
    signs: list[str] = []
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            product = terms[-1] * x
            steps.append(f"{terms[-1]}*{x}={product}")
            terms[-1] = product
        elif op in "+-":
            signs.append(op)
            terms.append(x)
        else:
            raise ValueError(f"unknown operator {op!r}")
    total = terms[0]
    for op, x in zip(signs, terms[1:]):
        value = total + x if op == "+" else total - x
        steps.append(f"{total}{op}{x}={value}")
        total = value
    return ";".join(steps)


def _problem(operands: tuple[int, ...], ops: tuple[str, ...], worked: bool = False) -> dict:
    expr = expression(operands, ops)
    problem = {"question": expr + "=", "answer": str(evaluate(operands, ops))}
    if worked:
        problem["solution"] = worked_solution(operands, ops)
    return problem


def split_capacity(spec: ArithmeticSpec, *, test: bool) -> int:
    """How many problems ``make_task`` can draw from one split of ``spec`` (exact when the space is enumerated)."""
    if spec.space_size <= _ENUMERATE_LIMIT:
        return len(_split_pool(spec, test))
    return int(spec.space_size * (TEST_FRACTION if test else 1 - TEST_FRACTION)) // 2


@functools.lru_cache(maxsize=8)
def _split_pool(spec: ArithmeticSpec, test: bool) -> tuple[tuple[tuple[int, ...], tuple[str, ...]], ...]:
    """Every (operands, operators) of one split, in a fixed order (small spaces only)."""
    values = range(10**spec.digits)
    return tuple(
        (a, o)
        for a in itertools.product(values, repeat=spec.n_operands)
        for o in itertools.product(spec.operators, repeat=spec.n_operands - 1)
        if is_test_expression(expression(a, o)) == test
    )


def _draw(spec: ArithmeticSpec, n: int, *, test: bool, seed: int, worked: bool = False) -> list[dict]:
    """``n`` distinct problems of one split, in a seed-determined order (prefix-stable in ``n``)."""
    if n < 0:
        raise ValueError(f"the number of problems must be >= 0, got {n}")
    rng = random.Random(f"conspo-arithmetic:{seed}:{'test' if test else 'train'}")
    split = "held-out" if test else "train"
    if spec.space_size <= _ENUMERATE_LIMIT:
        pool = list(_split_pool(spec, test))
        if n > len(pool):
            raise ValueError(f"{spec} has only {len(pool)} {split} problems, {n} were asked for")
        rng.shuffle(pool)
        return [_problem(a, o, worked) for a, o in pool[:n]]
    # Large space: rejection sampling without replacement. The split holds about TEST_FRACTION of the space,
    # and n is at most half of it, so this ends quickly.
    cap = split_capacity(spec, test=test)
    if n > cap:
        raise ValueError(f"{spec} has about {2 * cap} {split} problems; ask for at most half of them ({cap}), not {n}")
    seen: set[str] = set()
    out: list[dict] = []
    top = 10**spec.digits - 1
    while len(out) < n:
        a = tuple(rng.randint(0, top) for _ in range(spec.n_operands))
        o = tuple(rng.choice(spec.operators) for _ in range(spec.n_operands - 1))
        expr = expression(a, o)
        if expr in seen or is_test_expression(expr) != test:
            continue
        seen.add(expr)
        out.append(_problem(a, o, worked))
    return out


_INT_RUN = re.compile(r"[-\u2212]?[0-9]+")  # ASCII digits only: \d would accept other scripts' digits


def _canonical_int(text: str) -> str:
    """``"-007"`` -> ``"-7"``, ``"-0"`` -> ``"0"``; ``text`` must match ``_INT_RUN``. No int(): no size limit."""
    negative = text[0] in "-\u2212"
    digits = text.lstrip("-\u2212").lstrip("0") or "0"
    return "-" + digits if negative and digits != "0" else digits


def score_integer(completion: str, answer: str) -> VerifyResult:
    """The strict verifier of the arithmetic task.

    After stripping surrounding whitespace, the completion's first whitespace-separated run must be an
    integer: an optional ``-`` (or the Unicode minus U+2212) and ASCII digits, nothing else attached
    (``"33abc"`` and ``"33."`` are ``no_answer``). Text after the first run is ignored (``"33 is it"``
    matches 33). Leading zeros are allowed (``"033"`` is 33). Scores 1.0 (``match``) or 0.0 (``mismatch``,
    ``no_answer``); ``extracted`` is the integer in canonical form. Pure; never evaluates the completion.
    """
    head = completion.strip().split(maxsplit=1)
    if not head or _INT_RUN.fullmatch(head[0]) is None:
        return VerifyResult(score=0.0, extracted=None, reason="no_answer")
    got = _canonical_int(head[0])
    want = answer.strip()
    if _INT_RUN.fullmatch(want) is not None and got == _canonical_int(want):
        return VerifyResult(score=1.0, extracted=got, reason="match")
    return VerifyResult(score=0.0, extracted=got, reason="mismatch")


def score_worked(completion: str, answer: str) -> VerifyResult:
    """The verifier of worked solutions (``make_task(worked=True)``): the integer after the completion's last ``=``.

    ``"12+34=46;46-56=-10"`` answers -10. Only the final answer is checked, as in any verifiable-reward task;
    the steps before it are not. The text after the last ``=`` is scored by :func:`score_integer`, so it must
    start with an integer (``"...=-10 done"`` matches, ``"...=-10x"`` does not). A completion without ``=`` is
    ``no_answer``.
    """
    cut = completion.rfind("=")
    if cut < 0:
        return VerifyResult(score=0.0, extracted=None, reason="no_answer")
    return score_integer(completion[cut + 1 :], answer)


def make_worked_task(
    *,
    difficulty: int | ArithmeticSpec = WORKED_DEFAULT,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
) -> Task:
    """The ``arithmetic_worked`` task: :func:`make_task` with ``worked=True``, by default on three two-digit
    operands with ``+ -`` (``WORKED_DEFAULT``; docs/results.md, "Second testbed")."""
    return make_task(difficulty=difficulty, n_train=n_train, n_test=n_test, seed=seed, worked=True)


def make_task(
    *,
    difficulty: int | str | ArithmeticSpec = DEFAULT_DIFFICULTY,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    worked: bool = False,
) -> Task:
    """The arithmetic task at ``difficulty`` (a level of ``DIFFICULTIES`` or an :class:`ArithmeticSpec`).

    Problems are ``{"question": "12+7*3=", "answer": "33"}``. ``train`` and ``test`` are disjoint whatever the
    arguments (see the module docstring); the same arguments always give the same problems in the same order.
    ``n_train`` / ``n_test`` default to ``DEFAULT_N_TRAIN`` / ``DEFAULT_N_TEST``, or to all the problems of the
    split when it holds fewer; an explicit size larger than the split is an error.

    ``worked=True``: completions are worked solutions, one step per operator (``"12+34=46;46-56=-10"``,
    :func:`worked_solution`, in each problem's ``"solution"``), scored on the number after the last ``=``
    (:func:`score_worked`). The problems drawn are the same as without it.
    """
    spec = resolve_spec(difficulty)
    if not isinstance(worked, bool):
        raise ValueError(f"worked must be True or False, got {worked!r}")
    if n_train is None:
        n_train = min(DEFAULT_N_TRAIN, split_capacity(spec, test=False))
    if n_test is None:
        n_test = min(DEFAULT_N_TEST, split_capacity(spec, test=True))
    train = _draw(spec, n_train, test=False, seed=seed, worked=worked)
    test = _draw(spec, n_test, test=True, seed=seed, worked=worked)
    if worked:
        # The longest solution drawn, + end-of-sequence, + one token of slack (a wrong last step may be longer).
        longest = max((len(p["solution"]) for p in train + test), default=0)
        max_completion_length = longest + 2
    else:
        # answer characters + end-of-sequence, with one token of slack: a wrong answer may be a digit longer.
        max_completion_length = spec.max_answer_chars + 2
    return Task(
        name="arithmetic_worked" if worked else "arithmetic",
        train=train,
        test=test,
        verifier=score_worked if worked else score_integer,
        instruction="",
        max_completion_length=max_completion_length,
        # Every correct completion fits in max_completion_length - 1 tokens (the slack token is for wrong ones).
        overlong_after=max_completion_length - 1,
        metadata={
            "spec": asdict(spec),
            "difficulty": difficulty if isinstance(difficulty, (int, str)) else None,
            "seed": seed,
            "n_train": n_train,
            "n_test": n_test,
            "worked": worked,
            "split": f"sha256 of the expression, {TEST_FRACTION:.0%} held out",
        },
    )
