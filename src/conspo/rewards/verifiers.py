"""Verifiers: pure ``(completion, answer) -> VerifyResult`` functions. None of them ever ``eval``s model output.

- ``math_verify_match``: math-verify's verdict, ``verify(parse(gold), parse(completion))``, on the answer
  math-verify's own extraction finds in the completion (numbers, fractions, LaTeX, sets, simple expressions),
  within a wall-clock bound, for completions that end with a final answer (``conspo.rewards.extract``).
- ``numeric_match``: final answer and gold read as exact rationals and compared within tolerances.
- ``exact_match``: final answer equal to the gold after normalisation.

The gold may itself be a worked solution: a MATH solution with ``\\boxed{}`` or a GSM8K answer ending in
``#### x`` is reduced to its final answer first (``extract_gold``). ``math_verify_match`` then reads the gold
whole (``conspo.rewards.gold.read_gold``): it never checks a completion against a fragment of a free-form
gold, and ``check_gold`` says, when a dataset is loaded, which golds it cannot check.

Reasons (``VerifyResult.reason``): ``match``, ``mismatch``, ``no_answer`` (nothing extracted), ``unbalanced``
and ``empty_boxed`` (the last box is broken or empty), ``not_a_number``, ``too_long``, ``timeout``,
``invalid_gold`` (the gold answer is empty or, for ``numeric_match``, not a number), ``freeform_gold``
(``math_verify_match``: the gold cannot be read as one whole expression and the answer is not the whole gold).
"""

from __future__ import annotations

import functools
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from conspo.rewards.base import VerifyResult
from conspo.rewards.bounded import call_with_timeout
from conspo.rewards.extract import (
    NUMBER_PATTERN,
    examined_text,
    extract_answer,
    extract_gold,
    last_box_command,
    normalize_answer,
)
from conspo.rewards.gold import free_letters, read_gold, word_key

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
    math_verify.parser.parse("The answer is 3, so $\\boxed{x = 2}$.", parsing_timeout=None)  # extraction regexes
    # The first symbolic comparison of each kind imports parts of sympy (over a second on a loaded machine):
    # do that here, so that it is not counted against the first completions' time bound as a timeout.
    for gold, predicted in (("(x+1)^2", "x^2+2x+1"), ("[2, 5)", "x \\in [2, 5)"), ("\\{1, 2\\}", "\\{2, 1\\}")):
        math_verify.grader.verify(math_verify.parser.parse(f"$\\boxed{{{gold}}}$", parsing_timeout=None),
                                  math_verify.parser.parse(f"$\\boxed{{{predicted}}}$", parsing_timeout=None),
                                  timeout_seconds=None)


@functools.lru_cache(maxsize=4096)
def _parse_gold(expression: str) -> tuple:
    """math-verify's reading of one gold alternative. ``read_gold`` has already cut the gold down to one whole
    expression, so it is handed over boxed: math-verify then reads all of it, as it reads a boxed gold
    solution, and a gold written as bare LaTeX (``\\sqrt{8}``, which ``parse`` alone finds nothing in) is read
    too. Completions are never wrapped: math-verify extracts their answer itself (``_parse_completion``)."""
    from math_verify import parse

    _prepare_math_verify()
    return tuple(parse("$\\boxed{" + expression + "}$", parsing_timeout=None))


def _parse_completion(text: str) -> list:
    """math-verify's own extraction from a completion, ``math_verify.parse(text)`` with its default extraction
    configs (LaTeX and plain expressions; a ``final answer is`` phrase or a box first, then an ``answer``
    label, then the last expression)."""
    from math_verify import parse

    _prepare_math_verify()
    return parse(text, parsing_timeout=None)


_BINDING_RE = re.compile(r"\\(?:sum|prod|int|iint|iiint|oint|lim|to|mapsto|forall|exists|bigcup|bigcap)(?![A-Za-z])")
_RELATION_RE = re.compile(r"[=<>]|\\(?:le|ge|leq|geq|neq|ne|lt|gt|approx|equiv|sim)(?![A-Za-z])")
_CONNECTIVE_RE = re.compile(r"\\(?:lor|vee|land|wedge|lnot|neg)(?![A-Za-z])")


def _covers(expression: str, parsed: tuple) -> bool:
    """Whether math-verify's reading of a gold can be the whole gold: a gold with variables (``n``) read as a
    constant (``1``) is a fragment, such as the ``i=1`` of a sum written without LaTeX. Golds that bind
    their variables (``\\sum_{i=1}^n``, ``\\lim_{x \\to 0}``, integrals) may rightly read as constants."""
    if _BINDING_RE.search(expression):
        return True
    if not free_letters(expression):
        return True
    return any(getattr(candidate, "free_symbols", None) for candidate in parsed if not isinstance(candidate, str))


def _covered_golds(golds: list[str]) -> list[str]:
    """The gold alternatives math-verify reads whole (``_covers``). Runs under ``call_with_timeout``."""
    return [gold for gold in golds if _INT_RE.fullmatch(gold) or ((parsed := _parse_gold(gold)) and _covers(gold, parsed))]


def _text_for_math_verify(completion: str, how: str) -> str:
    """The text math-verify extracts the answer from: what ``extract_answer`` examined (``examined_text``),
    from its last box on when the final answer is boxed (``how``), with ``\\fbox`` written ``\\boxed``.
    Why: math-verify reads every box of a completion together, as one set (``\\boxed{1} no wait \\boxed{2}``
    reads as {1, 2}), where conspo's answer is the last box, the model's final word; and it does not know
    ``\\fbox`` as a box."""
    text = examined_text(completion)
    if how == "boxed":
        start, command = last_box_command(text)
        text = "\\boxed" + text[start + len(command):]
    return text


def _math_verify_equal(golds: list[str], completion: str) -> str:
    """math-verify's verdict on a completion against whole gold alternatives, ``verify(parse(gold),
    parse(completion))`` for each: ``match``, ``mismatch``, ``unparsed`` (math-verify extracts nothing from the
    completion) or ``freeform_gold`` (no alternative reads whole).

    Runs under ``call_with_timeout``; module-level with JSON arguments so that a worker process can run it.
    """
    from math_verify import verify

    if isinstance(golds, str):
        golds = [golds]
    readable = _covered_golds(list(golds))
    if not readable:
        return "freeform_gold"
    predicted = _parse_completion(completion)
    if not predicted:
        return "unparsed"
    for gold in readable:
        if verify(list(_parse_gold(gold)), list(predicted), timeout_seconds=None):
            return "match"
    return "mismatch"


def _may_read_as_fragment(expression: str) -> bool:
    """Whether math-verify could read a lexically whole expression as a fragment, which ``check_gold`` then
    parses to find out: it has variables and a relation (``s_(i=1)^n i^3`` reads as the ``1`` of ``i=1``).
    A cheap filter, because parsing costs 5-30 ms a gold; ``math_verify_match`` checks every gold anyway."""
    if _BINDING_RE.search(expression) or not _RELATION_RE.search(expression):
        return False
    return bool(free_letters(expression))


def check_gold(answer: str, *, timeout_s: float = 2.0) -> str:
    """Why ``math_verify_match`` cannot check completions against this gold, or ``""`` when it can.

    The gold must have an alternative that reads whole (``conspo.rewards.gold.read_gold``) and, where an
    expression could be read in part (``_may_read_as_fragment``), that math-verify parses without losing its
    variables (``_covers``), within ``timeout_s``.
    The dataset loader calls this on every row, so a free-form gold is reported when the data is loaded,
    not discovered as a silent zero (or a false positive) during training."""
    gold = read_gold(answer)
    if not gold.checkable:
        return gold.problem or "no whole answer"
    if gold.words or not all(_may_read_as_fragment(expression) for expression in gold.expressions):
        return ""
    if any(len(expression) > MAX_ANSWER_CHARS for expression in gold.expressions):
        return f"longer than {MAX_ANSWER_CHARS} characters"
    _prepare_math_verify()
    try:
        readable = call_with_timeout(_covered_golds, (list(gold.expressions),), timeout_s,
                                     preload=("conspo.rewards.verifiers:_prepare_math_verify",))
    except TimeoutError:
        return f"math-verify did not read it within {timeout_s} s"
    return "" if readable else "math-verify reads only a fragment of it"


def _plain(text: str) -> str:
    """A whole answer as compared for a free-form gold: spacing and case ignored, nothing else."""
    return _collapse(text).casefold()


def math_verify_match(completion: str, answer: str, *, timeout_s: float = 2.0) -> VerifyResult:
    """1.0 when math-verify judges the completion's answer equivalent to the gold: ``verify(parse(gold),
    parse(completion))``, with math-verify's own (default) extraction of the answer from the completion; TRL's
    ``accuracy_reward`` and lighteval make the same two calls. ``tests/test_math_verify_agreement.py`` checks
    that equality on a table of completions, and lists where conspo departs from it on purpose:

    - **A final answer is required** (``extract_answer``): a completion that does not end with one (a
      truncated ramble such as ``3 + 4 = 7, then multiply by``) scores 0 with reason ``no_answer``, and so does
      one whose last box is broken or empty (``unbalanced``, ``empty_boxed``), where math-verify would take a
      number from mid-sentence or an earlier box.
    - **The gold is read whole** (``read_gold``): its alternatives such as ``"A, or equivalently B"``; a yes/no
      or word gold (``No``, ``Monday``) is compared as words, never symbolically (``on`` is not ``No``); a
      free-form gold, which cannot be read as one whole expression, is matched only by the whole gold (case and
      spacing aside), else 0 with reason ``freeform_gold``, never on a fragment such as a number inside it. An
      expression alternative is handed to math-verify boxed (``_parse_gold``), and one that math-verify reads
      only in part (its variables lost) is not used.
    - **The last box is the answer**: when the final answer is boxed, math-verify reads the completion from
      its last box on (``_text_for_math_verify``), where it would read all the boxes as one set; ``\\fbox``
      counts as a box.
    - **Exact cases first, without sympy**: a final answer written exactly as a gold alternative matches; two
      integers are compared as digit strings (so ``10**5000`` is exact and cheap); answers longer than
      ``MAX_ANSWER_CHARS`` are refused (``too_long``); an answer joined by logical connectives (``1 \\lor 2``),
      which math-verify reads as one of its parts, is a ``mismatch``.
    - **A time bound**: math-verify parses and compares within ``timeout_s`` seconds in total
      (``conspo.rewards.bounded``: a timer in the main thread, a worker process in other threads); an overrun
      scores 0 with reason ``timeout``.

    math-verify reads what ``extract_answer`` reads: the completion's last ``MAX_TAIL_CHARS`` characters,
    normalised (``examined_text``). ``extracted`` is conspo's final answer, the key maj@k votes on.
    """
    extracted, how = extract_answer(completion)
    if extracted is None:
        return VerifyResult(0.0, None, _reason_for_missing(how))
    gold = read_gold(answer)
    if not gold.text:
        return VerifyResult(0.0, extracted, "invalid_gold")
    predicted = _collapse(extracted)
    if predicted == gold.text:
        return VerifyResult(1.0, extracted, "match")
    if not gold.checkable:
        same = _plain(predicted) == _plain(gold.text)
        return VerifyResult(1.0 if same else 0.0, extracted, "match" if same else "freeform_gold")
    if gold.words and word_key(predicted) in gold.words:
        return VerifyResult(1.0, extracted, "match")
    if not gold.expressions:
        return VerifyResult(0.0, extracted, "mismatch")
    if predicted in gold.expressions:
        return VerifyResult(1.0, extracted, "match")
    others = list(gold.expressions)
    if _INT_RE.fullmatch(predicted):
        integers = [expression for expression in others if _INT_RE.fullmatch(expression)]
        if any(_canonical_int(predicted) == _canonical_int(expression) for expression in integers):
            return VerifyResult(1.0, extracted, "match")
        others = [expression for expression in others if expression not in integers]
        if not others:
            return VerifyResult(0.0, extracted, "mismatch")
    if len(predicted) > MAX_ANSWER_CHARS or all(len(expression) > MAX_ANSWER_CHARS for expression in others):
        return VerifyResult(0.0, extracted, "too_long")
    others = [expression for expression in others if len(expression) <= MAX_ANSWER_CHARS]
    if _CONNECTIVE_RE.search(predicted) and not any(_CONNECTIVE_RE.search(expression) for expression in others):
        return VerifyResult(0.0, extracted, "mismatch")
    _prepare_math_verify()
    try:
        verdict = call_with_timeout(
            _math_verify_equal, (others, _text_for_math_verify(completion, how)), timeout_s,
            preload=("conspo.rewards.verifiers:_prepare_math_verify",),
        )
    except TimeoutError:
        return VerifyResult(0.0, extracted, "timeout")
    if verdict == "match":
        return VerifyResult(1.0, extracted, "match")
    return VerifyResult(0.0, extracted, "freeform_gold" if verdict == "freeform_gold" else "mismatch")
