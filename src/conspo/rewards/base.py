"""The verifier contract: a pure function ``(completion: str, answer: str) -> VerifyResult``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class VerifyResult:
    """What a verifier says about one completion.

    score:     1.0 correct, 0.0 incorrect (a verifier may return partial credit in [0, 1]).
    extracted: the answer found in the completion, or None when none was found.
    reason:    a short machine-readable word: "match", "mismatch", "no_answer", "timeout", "error", ...
    """

    score: float
    extracted: str | None
    reason: str


Verifier = Callable[[str, str], VerifyResult]
