"""The task contract shared by training, evaluation and comparison.

A task is data plus the verifier that checks it: rewards live on the task. Problems are plain dicts
with at least ``"question"`` and ``"answer"`` (strings) and optionally ``"subset"`` (for per-subset
evaluation, e.g. a MATH subject or level). Train and test problems are disjoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from conspo.rewards.base import Verifier


@dataclass
class Task:
    """A verifiable task.

    name:        how the task is named on the command line (``arithmetic``, ``reasoning_gym:<name>``, a file).
    train:       training problems, each ``{"question": str, "answer": str, ...}``.
    test:        held-out problems, disjoint from ``train``.
    verifier:    ``(completion, answer) -> VerifyResult``; must never ``eval`` model output.
    instruction: text appended to each question in the prompt (e.g. "Put the final answer in \\boxed{}.").
    max_completion_length: a completion budget in tokens that suits the task.
    overlong_after: the longest a complete answer can be, in tokens with end-of-sequence, when the task knows it
                 (None otherwise); length penalties such as DAPO's start only past it.
    """

    name: str
    train: list[dict]
    test: list[dict]
    verifier: Verifier
    instruction: str = ""
    max_completion_length: int = 256
    metadata: dict = field(default_factory=dict)
    overlong_after: int | None = None
