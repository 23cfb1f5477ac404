"""conspo's math score is math-verify's own (issue 18): on a table of completions, ``math_verify_match`` scores
exactly ``float(verify(parse(gold), parse(completion)))``, the library's verdict with its default extraction
(TRL's ``accuracy_reward`` and lighteval call the same two functions, each with extraction settings of its own).
The reference calls math-verify directly, with its default extraction and timeouts.

The rows where conspo departs from it on purpose are listed apart, each with its reason and conspo's verdict,
and each is checked to differ from math-verify's, so that a row which stops differing is noticed. The time
bound is the other deliberate departure; it is tested in ``test_rewards.py`` (a pathological answer scores 0
with reason ``timeout`` within the bound, where math-verify's own timeout needs the main thread)."""

from __future__ import annotations

import math_verify
import pytest

from conspo.rewards import math_verify_match

BIG = "1" + "0" * 5000  # 10**5000, beyond Python's default 4300-digit int-from-string limit


def reference(gold: str, completion: str) -> float:
    return float(math_verify.verify(math_verify.parse(gold), math_verify.parse(completion)))


# (completion, gold): conspo's score must equal math-verify's on each
AGREE = [
    # boxed, equivalent forms
    ("\\boxed{42}", "42"),
    ("The answer is $\\boxed{\\frac{1}{2}}$.", "0.5"),
    ("\\boxed{0.5}", "$\\frac{1}{2}$"),
    ("\\boxed{\\dfrac{\\sqrt{2}}{2}}", "$\\frac{1}{\\sqrt{2}}$"),
    ("\\boxed{2\\sqrt{2}}", "$\\sqrt{8}$"),
    ("\\boxed{\\sqrt{3}/3}", "$\\frac{\\sqrt3}{3}$"),
    ("\\boxed{x^2+2x+1}", "$(x+1)^2$"),
    ("\\boxed{6 - 5i}", "$6-5i$"),
    ("\\boxed{\\infty}", "$\\infty$"),
    ("\\boxed{\\{2,1\\}}", "$\\{1,2\\}$"),
    ("\\boxed{[2, 5)}", "$[2, 5)$"),
    ("so \\boxed{x=2, y=3}", "$x=2, y=3$"),
    ("\\boxed{\\frac{3}{4}}", "So we get $\\boxed{0.75}$."),  # a worked solution as the gold
    ("The final answer is $\\boxed{-\\frac{3}{4}}$", "-0.75"),
    ("Thus $x = \\boxed{7}$.", "7"),
    ("\\boxed{\\boxed{3}}", "3"),
    ("\\boxed{\u22123}", "-3"),
    # units, percent, separators, equations
    ("\\boxed{1,234}", "1234"),
    ("\\boxed{\\$1,000}", "1000"),
    ("\\boxed{50\\%}", "50"),
    ("\\boxed{5\\text{ cm}}", "5"),
    ("\\boxed{12 \\text{ inches}}", "12"),
    ("\\boxed{x = 5}", "5"),
    # several answers
    ("\\boxed{2, 3}", "$\\{2,3\\}$"),
    ("\\boxed{\\frac{1}{2}, \\frac{1}{3}}", "$\\frac12, \\frac13$"),
    ("\\boxed{1} no wait \\boxed{2}", "1"),
    ("\\boxed{7} since 3 + 4 = 7", "7"),
    ("\\boxed{7}. Check: 2 + 3 = 5", "7"),
    ("Answer: 2 and 3", "$\\{2, 3\\}$"),  # math-verify reads the first: 0, as conspo now scores it
    # wrong answers
    ("\\boxed{41}", "42"),
    ("\\boxed{\\frac{1}{3}}", "0.5"),
    ("\\boxed{\\pi}", "3.14159"),
    ("\\boxed{(1, 2)}", "$(2, 1)$"),
    ("#### 71", "72"),
    ("Answer: x = 6", "5"),
    ("Answer: x = 6 and y = 5", "6"),
    ("Answer: 2^{10}", "1024"),  # math-verify reads the 2 after the label: 0, as conspo now scores it
    ("\\boxed{__import__('os').system('echo pwned')}", "0"),
    ("\\boxed{" + "x+" * 600 + "1}", "1"),  # too long for conspo, no match for math-verify
    ("\\boxed{on}", "No"),
    # unboxed: GSM8K markers, labels, a final number
    ("#### 72", "72"),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("#### 18 dollars", "18"),
    ("#### $18", "18"),
    ("#### 0.50", "1/2"),
    ("#### 2^10", "1024"),
    ("Answer: 5 apples", "5"),
    ("Answer: 3 hours", "3"),
    ("Answer: The number is 12.", "12"),
    ("Answer: 12 cm^2", "12"),
    ("Answer: about 7", "7"),
    ("Answer: 1/2 cup", "0.5"),
    ("Answer: \\frac{3}{4} of the cake", "0.75"),
    ("Answer: $\\frac{1}{2}$ dollars per apple", "0.5"),
    ("Answer: $x = 7$", "7"),
    ("Answer: 3^2", "9"),
    ("Answer: 10 percent", "10"),
    ("Answer: 1,000,000", "1000000"),
    ("Final answer: $\\frac{2}{3}$", "$\\frac{2}{3}$"),
    ("Final answer: 2/3", "2/3"),
    ("The answer is **12**.", "12"),
    ("The answer is 0042", "42"),
    ("so it is \\(5\\).", "5"),
    ("3 + 4 = 7", "7"),
    ("It is 50%.", "50"),
    # empty, truncated, no answer
    ("\\boxed{}", "3"),
    ("\\boxed{3", "3"),
    ("no idea", "3"),
    ("", "3"),
]

# (completion, gold, conspo's score, conspo's reason, why conspo departs from math-verify here)
DIFFER = [
    ("Let me compute 3 + 4 = 7, then multiply by", "7", 0.0, "no_answer",
     "a truncated ramble: an unboxed completion earns credit only when it ends with its answer"),
    ("The answer is 5 apples", "5", 0.0, "no_answer",
     "no box, label or final number: the text goes on after the number (extract_answer's rule 4)"),
    ("The answer is $\\frac{1}{2}$.", "$\\frac12$", 0.0, "no_answer",
     "no box, label or final number (rule 4 reads numbers, not LaTeX); a box or 'Answer:' would be read"),
    ("\\boxed{3} then \\boxed{4", "3", 0.0, "unbalanced",
     "the final box is cut off: an earlier box is not taken in its place"),
    ("\\boxed{1} no wait \\boxed{2}", "2", 1.0, "match",
     "several boxes: the last is the answer; math-verify reads all boxes as one set {1, 2}"),
    ("\\boxed{\\frac{1}{2}} no wait \\boxed{\\frac{1}{3}}", "1/3", 1.0, "match",
     "several boxes, not integers: the same rule, from the last box on"),
    ("\\fbox{7}", "7", 1.0, "match", "\\fbox is a box; math-verify does not read it"),
    ("\\fbox{\\sqrt{8}}", "$2\\sqrt{2}$", 1.0, "match", "\\fbox is a box, also where math-verify compares"),
    ("\\boxed{1 \\lor 2}", "2", 0.0, "mismatch", "a hedge joined by 'or' is not one of its parts"),
    ("Answer: 3, 4", "$3, 4$", 1.0, "match",
     "the final answer written exactly as the gold; math-verify reads only the 3 after the label"),
    ("Answer: 3\nAnswer: 4 #### 9", "9", 1.0, "match",
     "the final answer is the last '####', compared as an integer; math-verify ranks the label first and reads 4"),
    (f"\\boxed{{{BIG}}}", BIG, 1.0, "match",
     "integers compared as digits; math-verify cannot read 5001 digits"),
    ("\\boxed{\\text{Monday}}", "Monday", 1.0, "match",
     "a word gold compared as words; math-verify reads nothing in the gold 'Monday'"),
    ("\\boxed{\\text{C}}", "C", 1.0, "match", "a one-letter word gold, compared as words"),
    ("\\boxed{(1, 234)}", "(1, 234)", 1.0, "match",
     "a gold without $ is read whole; math-verify's parse finds nothing in it (TRL skips such rows)"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0, "match",
     "bare LaTeX gold, read whole; math-verify's parse finds nothing in it"),
    ("\\boxed{1}", "sum_(i=1)^n i^3, or equivalently (n(n+1)/2)^2", 0.0, "mismatch",
     "a gold is read whole, never as a fragment: math-verify reads this gold as the 1 of i=1"),
]


def test_the_tables_are_varied():
    assert len(AGREE) >= 40 and len({gold for _, gold in AGREE}) >= 25
    scores = [reference(gold, completion) for completion, gold in AGREE]
    assert 15 <= scores.count(1.0) and 15 <= scores.count(0.0)


@pytest.mark.parametrize("completion,gold", AGREE, ids=[f"{i}:{c[:30]}" for i, (c, _) in enumerate(AGREE)])
def test_math_score_equals_math_verify(completion, gold):
    result = math_verify_match(completion, gold)
    assert result.score == reference(gold, completion), result


@pytest.mark.parametrize("completion,gold,score,reason,why", DIFFER, ids=[row[4][:40] for row in DIFFER])
def test_deliberate_departures_from_math_verify(completion, gold, score, reason, why):
    result = math_verify_match(completion, gold)
    assert (result.score, result.reason) == (score, reason), why
    assert reference(gold, completion) != score, f"math-verify now agrees; the row belongs in AGREE ({why})"
