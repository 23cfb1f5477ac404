"""Verifiers: pure ``(completion, answer) -> VerifyResult`` functions. None of them ever ``eval``s model output.

- ``math_verify_match``: final answer (see ``conspo.rewards.extract``) judged equivalent to the gold by
  math-verify (numbers, fractions, LaTeX, sets, simple expressions), within a wall-clock bound.
- ``numeric_match``: final answer and gold read as exact rationals and compared within tolerances.
- ``exact_match``: final answer equal to the gold after normalisation.

The gold may itself be a worked solution: a MATH solution with ``\\boxed{}`` or a GSM8K answer ending in
``#### x`` is reduced to its final answer first (``extract_gold``).

Reasons (``VerifyResult.reason``): ``match``, ``mismatch``, ``no_answer`` (nothing extracted), ``unbalanced``
and ``empty_boxed`` (the last box is broken or empty), ``not_a_number``, ``too_long``, ``timeout``,
``invalid_gold`` (the gold answer is empty or, for ``numeric_match``, not a number).
"""

from __future__ import annotations

import functools
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from conspo.rewards.base import VerifyResult
from conspo.rewards.bounded import call_with_timeout
from conspo.rewards.extract import NUMBER_PATTERN, extract_answer, extract_gold, normalize_answer

MAX_DIGITS = 10_000
"""Numbers with more digits (or a larger decimal exponent) than this are refused, not computed."""
MAX_ANSWER_CHARS = 1_000
"""Answers longer than this are not handed to math-verify (only compared as strings)."""

_NUMBER_RE = re.compile(NUMBER_PATTERN, re.ASCII)
_PLAIN_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?", re.ASCII)
_FRAC_RE = re.compile(r"(-?)\\[dt]?frac\s*(?:\{\s*(-?\d+)\s*\}|(\d))\s*(?:\{\s*(-?\d+)\s*\}|(\d))", re.ASCII)
_DECORATION_RE = re.compile(r"\\(?:text|mathrm|mbox|textbf)\s*\{[^{}]*\}|\\[,!;: ]|\\?%|\\?\$|~|\\left|\\right")
_INT_RE = re.compile(r"-?\d+", re.ASCII)


def _reason_for_missing(how: str) -> str:
    return how if how in ("unbalanced", "empty_boxed") else "no_answer"


def _canonical_int(s: str) -> str:
    """``-007`` -> ``-7``, ``-0`` -> ``0``: integers compared as digit strings, with no size limit."""
    digits = s.lstrip("-").lstrip("0")
    return ("-" + digits if s.startswith("-") else digits) if digits else "0"


def _collapse(s: str) -> str:
    return " ".join(s.split())


# ----------------------------------------------------------------------------------------------- numbers


def _to_fraction(token: str, max_digits: int) -> Fraction | str:
    """An exact rational from a plain number token (``-12``, ``3.50``, ``1e-5``, ``2/3``), or a reason."""
    token = token.replace(",", "")
    numerator, slash, denominator = token.partition("/")
    if sum(c.isdigit() for c in token) > max_digits:
        return "too_long"
    try:
        value = Decimal(numerator)
    except InvalidOperation:
        return "not_a_number"
    if not value.is_finite():
        return "not_a_number"
    if abs(value.adjusted()) > max_digits:  # 1e100000000 would allocate a 100M-digit integer
        return "too_long"
    result = Fraction(value)
    if slash:
        if not denominator.isascii() or not denominator.isdigit():
            return "not_a_number"
        divisor = int(Decimal(denominator))  # int(str) refuses more than 4300 digits; Decimal does not
        if divisor == 0:
            return "not_a_number"
        result /= divisor
    return result


def parse_number(text: str, *, max_digits: int = MAX_DIGITS) -> Fraction | str:
    """Read an answer as an exact rational, or return a reason (``not_a_number``, ``too_long``).

    Accepted: a plain number (thousands separators, ``$`` / ``\\$``, ``%``, ``\\text{units}`` and LaTeX
    spacing ignored: ``50\\%`` reads as 50), a fraction ``a/b`` or ``\\frac{a}{b}``, or text holding exactly one
    number and no other digit (``x = 5``, ``5 apples``). ``2^{10}`` has two numbers and is refused.
    """
    s = _DECORATION_RE.sub("", normalize_answer(text))
    s = normalize_answer(s).replace("{,}", ",")
    if len(s) > 4 * max_digits:  # before any regex: the digit cap below would refuse it anyway
        return "too_long"
    frac = _FRAC_RE.fullmatch(s.replace(" ", ""))
    if frac:
        sign, n1, n2, d1, d2 = frac.groups()
        numerator, denominator = _to_fraction(n1 or n2, max_digits), _to_fraction(d1 or d2, max_digits)
        if isinstance(numerator, str) or isinstance(denominator, str):
            return numerator if isinstance(numerator, str) else denominator
        if denominator == 0:
            return "not_a_number"
        return -numerator / denominator if sign else numerator / denominator
    compact = s.replace(" ", "")
    if _PLAIN_NUMBER_RE.fullmatch(compact.replace(",", "")) or re.fullmatch(r"-?\d+/\d+", compact, re.ASCII):
        return _to_fraction(compact.lstrip("+"), max_digits)
    tokens = _NUMBER_RE.findall(s)
    if len(tokens) == 1 and sum(c.isdigit() for c in s) == sum(c.isdigit() for c in tokens[0]):
        return _to_fraction(tokens[0], max_digits)
    return "not_a_number"


def numeric_match(
    completion: str,
    answer: str,
    *,
    rel_tol: float = 0.0,
    abs_tol: float = 1e-9,
    max_digits: int = MAX_DIGITS,
) -> VerifyResult:
    """1.0 when the final answer and the gold are the same number: ``|a - b| <= max(rel_tol * max(|a|, |b|),
    abs_tol)``, computed on exact rationals (so ``10**5000`` works, nothing overflows, and two integers are
    compared exactly). Numbers longer than ``max_digits`` digits are refused (``too_long``)."""
    extracted, how = extract_answer(completion)
    if extracted is None:
        return VerifyResult(0.0, None, _reason_for_missing(how))
    gold = parse_number(extract_gold(answer), max_digits=max_digits)
    if isinstance(gold, str):
        return VerifyResult(0.0, extracted, "invalid_gold")
    value = parse_number(extracted, max_digits=max_digits)
    if isinstance(value, str):
        return VerifyResult(0.0, extracted, value)
    if value == gold:
        return VerifyResult(1.0, extracted, "match")
    tolerance = max(Fraction(rel_tol) * max(abs(value), abs(gold)), Fraction(abs_tol))
    close = abs(value - gold) <= tolerance
    return VerifyResult(1.0 if close else 0.0, extracted, "match" if close else "mismatch")


# ----------------------------------------------------------------------------------------------- strings


def exact_match(completion: str, answer: str, *, ignore_case: bool = False) -> VerifyResult:
    """1.0 when the final answer equals the gold after normalisation (unicode, surrounding ``$``, trailing
    full stop, thousands separators, runs of whitespace). The final answer is found as in
    ``extract_answer`` with the last non-empty line (not the last number) as the fallback."""
    extracted, how = extract_answer(completion, fallback="line")
    if extracted is None:
        return VerifyResult(0.0, None, _reason_for_missing(how))
    gold = _collapse(extract_gold(answer))
    if not gold:
        return VerifyResult(0.0, extracted, "invalid_gold")
    got = _collapse(extracted)
    same = got.casefold() == gold.casefold() if ignore_case else got == gold
    return VerifyResult(1.0 if same else 0.0, extracted, "match" if same else "mismatch")


# ----------------------------------------------------------------------------------------------- math-verify


@functools.lru_cache(maxsize=1)
def _prepare_math_verify() -> None:
    """Import math-verify and build its parsers once, outside any time bound (an interrupted import leaves
    broken modules behind). It warns once that its own timeout is off; ours is on, so skip that warning."""
    import math_verify.grader
    import math_verify.parser

    for module in (math_verify.grader, math_verify.parser):
        if hasattr(module, "TIMEOUT_WARNING_SHOWN"):
            module.TIMEOUT_WARNING_SHOWN = True
    math_verify.parser.parse("$\\frac{1}{2}$", parsing_timeout=None)  # the first parse builds the grammar


@functools.lru_cache(maxsize=4096)
def _parse(expression: str) -> tuple:
    from math_verify import parse

    _prepare_math_verify()
    # Wrapping in \boxed{} makes math-verify's LaTeX extractor take the whole answer as one expression.
    return tuple(parse("$\\boxed{" + expression + "}$", parsing_timeout=None))


def _math_verify_equal(gold: str, predicted: str) -> str:
    """math-verify's verdict on two extracted answers: ``match``, ``mismatch``, or ``unparsed``.

    Runs under ``call_with_timeout``; module-level with string arguments so that a worker process can run it.
    """
    from math_verify import verify

    gold_parsed, predicted_parsed = _parse(gold), _parse(predicted)
    if not gold_parsed or not predicted_parsed:
        return "unparsed"
    return "match" if verify(list(gold_parsed), list(predicted_parsed), timeout_seconds=None) else "mismatch"


def math_verify_match(completion: str, answer: str, *, timeout_s: float = 2.0) -> VerifyResult:
    """1.0 when the final answer is mathematically equivalent to the gold, per math-verify.

    Steps: extract the final answer (``extract_answer``) and the gold (``extract_gold``); equal strings
    match at once; two integers are compared exactly without sympy (so huge ones are cheap); answers longer
    than ``MAX_ANSWER_CHARS`` are refused (``too_long``); otherwise math-verify parses and compares both
    within ``timeout_s`` seconds in total (``conspo.rewards.bounded``: a timer in the main thread, a worker
    process in other threads), and an overrun scores 0 with reason ``timeout``. When math-verify cannot
    parse one side, the normalised strings decide (they differ, so ``mismatch``).
    """
    extracted, how = extract_answer(completion)
    if extracted is None:
        return VerifyResult(0.0, None, _reason_for_missing(how))
    gold = _collapse(extract_gold(answer))
    if not gold:
        return VerifyResult(0.0, extracted, "invalid_gold")
    predicted = _collapse(extracted)
    if predicted == gold:
        return VerifyResult(1.0, extracted, "match")
    if _INT_RE.fullmatch(predicted) and _INT_RE.fullmatch(gold):
        same = _canonical_int(predicted) == _canonical_int(gold)
        return VerifyResult(1.0 if same else 0.0, extracted, "match" if same else "mismatch")
    if len(predicted) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return VerifyResult(0.0, extracted, "too_long")
    _prepare_math_verify()
    try:
        verdict = call_with_timeout(
            _math_verify_equal, (gold, predicted), timeout_s, preload=("conspo.rewards.verifiers:_prepare_math_verify",)
        )
    except TimeoutError:
        return VerifyResult(0.0, extracted, "timeout")
    if verdict == "match":
        return VerifyResult(1.0, extracted, "match")
    return VerifyResult(0.0, extracted, "mismatch")
