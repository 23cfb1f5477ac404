"""Reading a gold answer whole: which answers a completion may be compared to, and golds that cannot be read so.

Why: math-verify reads the first expression it can find in a string. A free-form gold such as
``"sum_(i=1)^n i^3, or equivalently (n(n+1)/2)^2"`` is read as ``1``, so any completion ending in 1 would
"verify" and the right answer would not; in RL that is a reward the policy can learn to game. ``read_gold``
therefore never hands math-verify a gold it cannot read as one whole expression. Pure string code, no
sympy, linear in the gold's length.

1. The gold is reduced to its final answer (``extract_gold``) and normalised.
2. **Yes/no**: ``"No"``, ``"Yes, because 7 is prime"`` (yes or no, then nothing, or a justification after a
   punctuation mark or *because* / *since*) is the word ``yes`` / ``no``. Words are compared as words, so
   ``on`` is not ``No`` (math-verify reads both as the product of the symbols n and o).
3. **Equivalent forms**: ``"A, or equivalently B"`` (also *equivalently*, *i.e.*, and after a comma *that
   is*, *in other words*) gives the alternatives A and B; a completion is correct when it matches any
   alternative that can be read whole. A plain *or* is not split: ``"x = 2 or x = 3"`` asks for both.
4. Each alternative is read as
   - an **expression** when no prose word remains: LaTeX commands, function names (``sin``, ``gcd``,
     ``lim``, ...), one- and two-letter symbols (``x``, ``ab``) and a unit in ``\\text{}`` after a number
     (``16 \\text{ inches}``) are not prose; ``sum_(i=1)^n`` written without a backslash is;
   - a **stated value**, ``"The limit exists and is equal to 2"``: words, then *is*, *equals*, *is equal
     to* or ``=``, then one whole expression (or word answer). The words before carry no digit and no
     negation or qualifier (*not*, *if*, *only*, *approximately*, ...), so ``"It is not true that the sum is
     2"`` is not read as 2;
   - a **word answer** of at most three words (``Monday``, ``\\text{Evelyn}``, ``DNE``, ``\\text{June 20}``),
     compared as words (case, punctuation and ``\\text{}`` ignored), never symbolically;
   - otherwise unreadable.
5. A gold with no readable alternative is **free-form**: ``Gold.checkable`` is False and ``Gold.problem``
   says why (the first prose word found). ``math_verify_match`` scores such a gold only by exact match of
   the whole answer; the dataset loader reports, drops or refuses such rows (``freeform_gold``).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from conspo.rewards.extract import extract_gold, normalize_answer

MATH_NAMES = frozenset(
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln lg exp sqrt lim max min gcd lcm det "
    "mod deg inf sup arg ker dim pi oo infty".split()
)
"""Letter runs that are function or constant names when written without a backslash, not prose."""
TWO_LETTER_WORDS = frozenset("is or of to in at as be it if an by on no so we do".split())
"""Two-letter runs read as English words; any other two-letter run (``ab``, ``xy``) is a product of symbols."""
QUALIFIERS = frozenset(
    "not no never neither nor none cannot can't isn't doesn't don't unless if only except but or than least most "
    "approximately about roughly nearly almost around false wrong incorrect impossible undefined".split()
)
"""Words that, before a stated value, make it something other than the answer (``"... is not 2"``)."""
CONNECTIVES = frozenset("or and if is not for when with but then else otherwise except only unless where all any "
                        "each every some none no yes to of in at as by".split())
"""Words that are never a unit, so ``2 \\text{ or } 3`` is prose, not 2 with a unit."""
MAX_WORD_ANSWER_WORDS = 3
"""A word answer longer than this (a sentence) is not compared as words: it is prose, or a stated value."""
MAX_GOLD_CHARS = 2_000
"""Golds longer than this are not read (free-form): no checkable final answer is that long."""
ALIASES = {"infinity": "\\infty", "pi": "\\pi"}
"""Word golds that name an expression, read as that expression."""

_TEXT_GROUP_RE = re.compile(r"\\(?:text|textbf|textit|textrm|textsf|mathrm|mathit|mbox|operatorname)\s*\{([^{}]*)\}")
_UNIT_RE = re.compile(r"([\d}])\s*\\(?:text|mathrm|mbox)\s*\{\s*([^\W\d_]+(?:\s+[^\W\d_]+)?)\s*\}")
_ENVIRONMENT_RE = re.compile(r"\\(?:begin|end)\s*\{[^{}]*\}")
_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
_CONSTANT_GROUP_RE = re.compile(r"\\(?:mathbb|mathcal|mathfrak|mathscr|operatorname)\s*\{[^{}]*\}")
_VARIABLE_RE = re.compile(r"(?<![^\W\d_])[^\W\d_](?![^\W\d_]|\s*\()")
CONSTANT_LETTERS = frozenset("eiEI")
"""Single letters read as the constants e and i (``6 - 5i``), not as variables."""
_LETTERS_RE = re.compile(r"[^\W\d_]+")
_WORD_ANSWER_RE = re.compile(r"[^\W\d_]+(?:['\-][^\W\d_]+)*(?:\s+[^\W\d_]+(?:['\-][^\W\d_]+)*)*")
_INTEGER_RE = re.compile(r"-?\d+", re.ASCII)
_NON_WORD_RE = re.compile(r"[\W_]+")
_ALTERNATIVE_RE = re.compile(  # "that is" only after a comma: "the n that is prime" is one phrase
    r"\s*,?\s*(?:\bor\s+equivalently\b|\bequivalently\b|\bi\.\s?e\.)[\s,:]*"
    r"|\s*,\s*(?:that\s+is|in\s+other\s+words)\b[\s,:]*",
    re.IGNORECASE,
)
_YES_NO_RE = re.compile(
    r"(?:\\text(?:bf)?\s*\{\s*)?(yes|no)\b\s*\}?\s*(?:(?:[,.;:!\u2014\u2013]|-+)\s*(.*)|\s(?:because|since)\b\s*(.*))?",
    re.IGNORECASE | re.DOTALL,
)
_STATED_RE = re.compile(r"\bis\s+equal\s+to\b|\bequals\b|\bis\b|(?<![<>!=\\])=(?!=)", re.IGNORECASE)
_PROSE_PREFIX_RE = re.compile(r"[^\W\d_]+(?:['\-][^\W\d_]+)*(?:[\s,]+[^\W\d_]+(?:['\-][^\W\d_]+)*)*")


@dataclass(frozen=True)
class Gold:
    """A gold answer as the math verifier reads it.

    text:        the normalised gold (``extract_gold``), compared verbatim first.
    expressions: alternatives math-verify may compare, each a whole expression.
    words:       alternatives compared as words (``word_key``), e.g. ``("no",)``.
    problem:     why no alternative could be read (empty when one could), e.g. ``"prose word 'limit'"``.
    """

    text: str
    expressions: tuple[str, ...] = ()
    words: tuple[str, ...] = ()
    problem: str = ""

    @property
    def checkable(self) -> bool:
        """True when some alternative can be read whole, so a completion can be judged against it."""
        return bool(self.expressions or self.words)


def _collapse(s: str) -> str:
    return " ".join(s.split())


def _unwrap_text(s: str) -> str:
    """``\\text{Evelyn}`` -> ``Evelyn`` (one level of text-like groups, which hold words, not math)."""
    return _TEXT_GROUP_RE.sub(lambda m: " " + m.group(1) + " ", s)


def word_key(answer: str) -> str:
    """How a word answer is compared: ``yes`` / ``no`` for a yes/no answer (with or without a justification),
    otherwise the words, case-folded, with ``\\text{}`` and punctuation dropped (``\\text{(C)}`` -> ``c``).
    Letters are never reordered or read as symbols: ``on`` stays ``on``."""
    yes_no = _yes_no(answer)
    if yes_no is not None:
        return yes_no
    return _collapse(_NON_WORD_RE.sub(" ", _unwrap_text(normalize_answer(answer)).casefold()))


def _yes_no(answer: str) -> str | None:
    """``yes`` / ``no`` when the answer is that word, alone or followed by a justification in prose; None
    otherwise (``"No such x exists"`` is not a yes/no answer; nor is ``"Yes, 2"``, which also gives a value)."""
    match = _YES_NO_RE.fullmatch(_collapse(normalize_answer(answer)))
    if match is None:
        return None
    justification = match.group(2) if match.group(2) is not None else match.group(3)
    if justification and not prose_words(justification):
        return None
    return match.group(1).casefold()


def prose_words(expression: str) -> list[str]:
    """The words in ``expression`` that are prose, not mathematics (see the module docstring), in order.

    An empty list means the expression can be handed whole to math-verify as far as words go."""
    s = _UNIT_RE.sub(lambda m: m.group(1) if not (set(m.group(2).casefold().split()) & CONNECTIVES) else m.group(0),
                     expression)
    s = _ENVIRONMENT_RE.sub(" ", s)
    s = _unwrap_text(s)
    s = _COMMAND_RE.sub(" ", s)
    found = []
    for run in _LETTERS_RE.findall(s):
        word = run.casefold()
        if (len(word) >= 3 and word not in MATH_NAMES) or (len(word) == 2 and word in TWO_LETTER_WORDS):
            found.append(run)
    return found


def free_letters(expression: str) -> set[str]:
    """The single letters of an expression that stand for variables (``n`` in ``(n(n+1)/2)^2``): outside
    LaTeX commands, text and ``\\mathbb{}`` groups, not a function applied to arguments (``C`` in
    ``C(10, 5)``), not the constants e and i. Used to tell a whole reading of a gold from a fragment."""
    s = _ENVIRONMENT_RE.sub(" ", expression)
    s = _CONSTANT_GROUP_RE.sub(" ", s)
    s = _TEXT_GROUP_RE.sub(" ", s)
    s = _COMMAND_RE.sub(" ", s)
    return {letter for letter in _VARIABLE_RE.findall(s) if letter not in CONSTANT_LETTERS}


def _word_answer(text: str) -> str | None:
    """The words of a short word answer (``Monday``, ``\\text{June 20}``, ``DNE``), or None.

    Plain text qualifies when it is only words with a run of three or more letters (``xy`` stays a product of
    symbols); a whole ``\\text{...}`` group may also hold numbers."""
    whole_text = _TEXT_GROUP_RE.fullmatch(text)
    if whole_text:
        inner = _collapse(whole_text.group(1))
        if inner and len(inner.split()) <= MAX_WORD_ANSWER_WORDS and _LETTERS_RE.search(inner):
            return word_key(inner)
        return None
    if (_WORD_ANSWER_RE.fullmatch(text) and len(text.split()) <= MAX_WORD_ANSWER_WORDS
            and any(len(run) >= 3 for run in _LETTERS_RE.findall(text))):
        return word_key(text)
    return None


def _stated_value(text: str) -> tuple[str, str] | None:
    """``("expression", x)`` or ``("word", w)`` when ``text`` is a sentence stating one value (*words* is / equals /
    is equal to / = *value*), else None. The words before carry no digit, symbol or qualifier word."""
    for match in _STATED_RE.finditer(text):
        prefix, value = text[:match.start()].strip(" ,"), text[match.end():].strip()
        if not value or not _PROSE_PREFIX_RE.fullmatch(prefix):
            continue
        if {word.casefold() for word in re.split(r"[\s,]+", prefix)} & QUALIFIERS:
            continue
        read = _read_alternative(value, stated=False)
        if read[0] != "freeform":
            return read
    return None


def _read_alternative(text: str, *, stated: bool = True) -> tuple[str, str]:
    """``("expression", x)``, ``("word", key)`` or ``("freeform", why)`` for one alternative of a gold."""
    text = _collapse(normalize_answer(text))
    if not text:
        return "freeform", "empty alternative"
    if text.casefold() in ALIASES:
        return "expression", ALIASES[text.casefold()]
    yes_no = _yes_no(text)
    if yes_no is not None:
        return "word", yes_no
    word = _word_answer(text)
    if word is not None and " " not in word:
        return "word", word
    prose = prose_words(text)
    if not prose:
        return "expression", text
    value = _stated_value(text) if stated else None  # before a phrase: "It is odd" states "odd"
    if value is not None:
        return value
    if word is not None:
        return "word", word
    return "freeform", f"prose word {prose[0]!r}"


@functools.lru_cache(maxsize=4096)
def read_gold(answer: str) -> Gold:
    """Read a dataset's gold answer (see the module docstring): its whole alternatives, or why there is none."""
    text = _collapse(extract_gold(answer))
    if not text:
        return Gold(text, problem="empty gold")
    if _INTEGER_RE.fullmatch(text):  # the common case, of any length (10**5000 is compared as digits)
        return Gold(text, expressions=(text,))
    if len(text) > MAX_GOLD_CHARS:
        return Gold(text, problem=f"longer than {MAX_GOLD_CHARS} characters")
    yes_no = _yes_no(text)
    if yes_no is not None:
        return Gold(text, words=(yes_no,))
    expressions, words, problems = [], [], []
    for part in _ALTERNATIVE_RE.split(text):
        kind, value = _read_alternative(part)
        if kind == "expression":
            expressions.append(value)
        elif kind == "word":
            words.append(value)
        else:
            problems.append(value)
    if expressions or words:
        return Gold(text, tuple(dict.fromkeys(expressions)), tuple(dict.fromkeys(words)))
    return Gold(text, problem=problems[0] if len(problems) == 1 else "; ".join(dict.fromkeys(problems)))
