"""Final-answer extraction from model output: pure string functions, linear time, never ``eval``.

``extract_answer(text)`` looks for the final answer in this order, and the first kind present wins:

1. ``\\boxed{...}`` or ``\\fbox{...}`` (also ``\\boxed 5``): the **last** one, brace-balanced. Braces escaped
   as ``\\{`` / ``\\}`` do not count. If the last one is unbalanced (e.g. a truncated completion) the result
   is *not found* (``how="unbalanced"``) and no later rule is tried: the model chose the boxed format and
   its final box is broken, so an earlier box or a stray number is not taken in its place.
2. ``#### x`` (GSM8K): the last ``####``; ``x`` is the rest of its line (or the next line when the marker
   ends its line). If that is empty, the rule finds nothing.
3. ``Answer: x`` (case-insensitive, also ``Final answer: x`` and markdown ``**Answer:** x``): the last label;
   ``x`` as for ``####``.
4. The final number (``fallback="number"``): a number (``-12``, ``1,234``, ``3.5``, ``2/3``, ``1e-5``) that
   ends the text, followed by nothing but spaces, ``.``, ``!``, ``?``, ``;``, ``:``, ``%``, ``$``, ``**`` or a
   closing ``\\)`` / ``\\]``, and not an operand: the text before it does not end in an operator, a comma,
   an opening bracket, a digit or a LaTeX command (``= 7`` and ``is 7`` qualify; ``2^(n-1).``, ``x + 1``,
   ``1,2,3`` and ``5 apples`` give nothing). Why: an unboxed or truncated completion used to be graded by
   whatever number came last, so ``so the answer is 2^(n-1).`` read as ``1`` and truncated rambles voted
   in majority votes with a number from mid-sentence. An unboxed completion earns credit only when it ends
   with its answer. Or the last non-empty line (``fallback="line"``), or nothing (``fallback="none"``).

Only the last ``MAX_TAIL_CHARS`` characters are examined, so a megabyte completion costs what 10k do; when
the text is cut, a number split by the cut is dropped rather than read as a smaller number.

Normalisation (``normalize_text`` on the text, ``normalize_answer`` on the answer): unicode minus signs
become ``-``; a thin space between digit groups is dropped (``1\\u202f234``), other unicode spaces (no-break,
thin, ...) become a space and zero-width characters are removed;
surrounding ``$``, whitespace and a trailing full stop are stripped; a number written with thousands
separators (``1,234,567``, ``1{,}234``, ``1\\,234``, ``1 234``) loses them.
"""

from __future__ import annotations

import re
from typing import Literal

MAX_TAIL_CHARS = 10_000
"""How many trailing characters of a completion are examined."""

_BOX_COMMANDS = ("\\boxed", "\\fbox")

_UNICODE_MINUS = dict.fromkeys(map(ord, "\u2212\ufe63\uff0d\u2796"), "-")
_UNICODE_SPACES = dict.fromkeys(map(ord, "\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
                                         "\u2008\u2009\u200a\u202f\u205f\u3000"), " ")
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"), None)
_TRANSLATION = {**_UNICODE_MINUS, **_UNICODE_SPACES, **_ZERO_WIDTH}

# A number token, as found in prose (ASCII digits only: compiled with re.ASCII). Alternatives are tried left
# to right at each position; none can backtrack more than a constant amount, so a scan is linear in the text.
NUMBER_PATTERN = (
    r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:/\d+)?(?!,?\d)"
    r"|-?\.\d+"
)
_NUMBER_RE = re.compile(r"(?<![\w.])(?:" + NUMBER_PATTERN + r")", re.ASCII)
_HASH_RE = re.compile(r"####")
_LABEL_RE = re.compile(r"(?:final[ \t]+)?answer[ \t]*(?:\*\*)?[ \t]*[:：]", re.IGNORECASE)
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:(?:,|\{,\}|\\,| )\d{3})+(?:\.\d+)?", re.ASCII)
_LEADING_NUMBER_CHARS = re.compile(r"[\d.,]*", re.ASCII)
_DIGIT_GROUP_SPACE_RE = re.compile(r"(?<=\d)[\u2009\u202f](?=\d{3}(?!\d))", re.ASCII)

Fallback = Literal["number", "line", "none"]


def normalize_text(text: str) -> str:
    """Map unicode minus signs to ``-``, drop a thin or narrow no-break space used as a digit-group
    separator (``1\\u202f234`` -> ``1234``), map other unicode spaces to a space, drop zero-width characters."""
    if "\u2009" in text or "\u202f" in text:
        text = _DIGIT_GROUP_SPACE_RE.sub("", text)
    return text.translate(_TRANSLATION)


def normalize_answer(answer: str) -> str:
    """Normalise an extracted answer: unicode, surrounding ``$`` / ``**`` / spaces, a trailing ``.``, and
    thousands separators when the whole answer is one number (``1,234`` -> ``1234``; ``(1, 234)`` is kept)."""
    s = normalize_text(answer).strip()
    for _ in range(3):  # peel a few layers such as "**$5$**." without a loop that depends on the input
        s = s.strip().strip("*").strip()
        if s.endswith(".") and not s.endswith(".."):
            s = s[:-1].rstrip()
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$")
    s = s.strip()
    if _THOUSANDS_RE.fullmatch(s):
        s = re.sub(r"\{,\}|\\,|[, ]", "", s)
    return s


def last_box_command(text: str) -> tuple[int, str]:
    """Where the last ``\\boxed`` / ``\\fbox`` command of ``text`` starts, and which it is; ``(-1, "")`` if none.
    A command name followed by a letter is another command (``\\boxedsymbol``) and is skipped."""
    start, command = -1, ""
    for cmd in _BOX_COMMANDS:
        pos = len(text)
        while True:
            pos = text.rfind(cmd, 0, pos)
            after = pos + len(cmd)
            if pos < 0 or after >= len(text) or not text[after].isalpha():
                break
        if pos > start:
            start, command = pos, cmd
    return start, command


def find_last_boxed(text: str) -> tuple[str | None, str]:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``.

    Returns ``(content, status)`` with status ``"ok"``, ``"absent"`` (no box command), ``"unbalanced"`` or
    ``"empty"`` (content None for the last three). Linear time: one reverse search for each command, then
    one forward scan over the braces.
    """
    start, command = last_box_command(text)
    if start < 0:
        return None, "absent"
    i = start + len(command)
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i >= n:
        return None, "empty"
    if text[i] != "{":  # "\boxed 5": the argument is the next token
        token = re.match(r"[^\s$]+", text[i:i + 200])
        return (token.group(0), "ok") if token else (None, "empty")
    depth, i, begin = 0, i, i + 1
    while i < n:
        ch = text[i]
        if ch == "\\":  # an escaped character (\{, \}, \\) never opens or closes a group
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                content = text[begin:i].strip()
                return (content, "ok") if content else (None, "empty")
        i += 1
    return None, "unbalanced"


def examined_text(text: str, max_chars: int = MAX_TAIL_CHARS) -> str:
    """The part of a completion that is read for its answer: the last ``max_chars`` characters, normalised
    (``normalize_text``). When the text is cut, a number split by the cut is dropped rather than read as a
    smaller number. ``extract_answer`` reads this, and so does math-verify in ``math_verify_match``."""
    if len(text) > max_chars:
        text = text[-max_chars:]
        text = text[_LEADING_NUMBER_CHARS.match(text).end():]
    return normalize_text(text)


def _after_label(text: str, end: int) -> str:
    """The rest of the line after a label, or the next line when the label ends its line."""
    line_end = text.find("\n", end)
    rest = text[end:] if line_end < 0 else text[end:line_end]
    if line_end >= 0 and not rest.strip(" \t*"):
        next_end = text.find("\n", line_end + 1)
        rest = text[line_end + 1:] if next_end < 0 else text[line_end + 1:next_end]
    return rest


def last_number(text: str) -> str | None:
    """The last number token in ``text`` (thousands separators kept; see ``normalize_answer``)."""
    last = None
    for last in _NUMBER_RE.finditer(text):  # noqa: B007 - we want the final match
        pass
    return last.group(0) if last else None


_TRAILING = ("\\)", "\\]", "\\%", "**", " ", "\t", "\n", "\r", ".", "!", "?", ";", ":", "%", "$")
_OPENERS = ("\\(", "\\[", "**", "$")
# A number after one of these is an operand or list item, not the answer: ``x + 1``, ``2^(n-1``, ``1,2,3``, ``1 234``.
_OPERAND_CHARS = frozenset("+-*/^_([{,<>|&\\~\u00d7\u00b7\u00f7\u2264\u2265\u2260\u2248\u22c5" "0123456789")
_COMMAND_END_RE = re.compile(r"\\[A-Za-z]+\Z")


def final_number(text: str) -> str | None:
    """The number that ends ``text`` (see rule 4 of the module docstring), or None.

    Linear time: one scan for the last number token, then constant work at its two ends."""
    end = len(text)
    while end:
        token = next((t for t in _TRAILING if text.endswith(t, 0, end)), None)
        if token is None:
            break
        end -= len(token)
    last = None
    for last in _NUMBER_RE.finditer(text, 0, end):  # noqa: B007 - we want the final match
        pass
    if last is None or last.end() != end:
        return None
    start = last.start()
    for _ in range(3):  # "$5", "**5", "\\(5": an opening delimiter is not an operator
        while start and text[start - 1].isspace():
            start -= 1
        opener = next((o for o in _OPENERS if text.endswith(o, 0, start)), None)
        if opener is None:
            break
        start -= len(opener)
    while start and text[start - 1].isspace():
        start -= 1
    if start and (text[start - 1] in _OPERAND_CHARS or _COMMAND_END_RE.search(text, max(0, start - 40), start)):
        return None
    return last.group(0)


def extract_answer(
    text: str | None,
    *,
    fallback: Fallback = "number",
    max_chars: int = MAX_TAIL_CHARS,
) -> tuple[str | None, str]:
    """Extract the final answer from a completion.

    Returns ``(answer, how)``: ``answer`` is normalised (see ``normalize_answer``) or None, and ``how`` is one
    of ``"boxed"``, ``"hash"``, ``"answer_label"``, ``"last_number"`` (the final number, rule 4),
    ``"last_line"`` when found, else
    ``"unbalanced"`` (the last box is broken), ``"empty_boxed"`` (``\\boxed{}``) or ``"none"``.
    """
    if fallback not in ("number", "line", "none"):
        raise ValueError(f"fallback must be one of 'number', 'line', 'none'; got {fallback!r}")
    if not text:
        return None, "none"
    text = examined_text(text, max_chars)

    content, status = find_last_boxed(text)
    if status != "absent":
        answer = normalize_answer(content) if content is not None else None
        if answer:
            return answer, "boxed"
        return None, ("unbalanced" if status == "unbalanced" else "empty_boxed")

    for regex, how in ((_HASH_RE, "hash"), (_LABEL_RE, "answer_label")):
        last = None
        for last in regex.finditer(text):  # noqa: B007 - we want the final match
            pass
        if last is not None:
            answer = normalize_answer(_after_label(text, last.end()))
            if answer:
                return answer, how

    if fallback == "number":
        number = final_number(text)
        if number is not None:
            return normalize_answer(number), "last_number"
    elif fallback == "line":
        for line in reversed(text.splitlines()):
            answer = normalize_answer(line)
            if answer:
                return answer, "last_line"
    return None, "none"


def extract_gold(answer: str) -> str:
    """The reference answer of a dataset row: the boxed content or the ``#### x`` value when the gold is a
    worked solution (MATH, GSM8K), otherwise the whole string, normalised."""
    text = normalize_text(answer)
    if "\\boxed" in text or "\\fbox" in text or "####" in text:
        found, _ = extract_answer(text, fallback="none", max_chars=len(text) + 1)
        if found is not None:
            return found
    return normalize_answer(text)
