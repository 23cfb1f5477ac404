"""The verifiers' public names, and ``make_reward_func``, which turns a verifier into a TRL reward function.

The verifiers themselves (pure ``(completion, answer) -> VerifyResult`` functions) live in ``verifiers``
(math, numeric, exact) and ``reasoning_gym``; ``extract`` finds a completion's final answer, ``gold`` reads a
gold answer whole, ``bounded`` puts a time bound on a call, ``base`` holds the contract.

``make_reward_func(verifier)`` turns any verifier into a TRL reward function
``f(prompts, completions, answer, **kwargs) -> list[float]``: TRL passes each dataset column as a keyword
list, and completions as strings or, in conversational format, as lists of message dicts.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import Any

from conspo.rewards.base import Verifier, VerifyResult
from conspo.rewards.bounded import call_with_timeout
from conspo.rewards.extract import extract_answer, extract_gold, normalize_answer
from conspo.rewards.gold import Gold, read_gold, word_key
from conspo.rewards.verifiers import check_gold, exact_match, math_verify_match, numeric_match, parse_number

logger = logging.getLogger("conspo.rewards")

__all__ = [
    "Gold",
    "Verifier",
    "VerifyResult",
    "check_gold",
    "completion_text",
    "exact_match",
    "extract_answer",
    "extract_gold",
    "make_reward_func",
    "math_verify_match",
    "normalize_answer",
    "numeric_match",
    "parse_number",
    "read_gold",
    "word_key",
]


def completion_text(completion: Any) -> str:
    """The text of one completion: a string as is; in conversational format (a list of message dicts) the
    content of the last message, with the text parts joined when the content is a list of parts."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, list | tuple):
        if not completion:
            return ""
        content = completion[-1].get("content", "") if isinstance(completion[-1], dict) else completion[-1]
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return "" if content is None else str(content)
    raise TypeError(f"a completion must be a string or a list of message dicts; got {type(completion).__name__}")


def make_reward_func(
    verifier: Verifier, name: str | None = None, strict: bool = False, timeout_s: float | None = None
) -> Callable[..., list[float | None]]:
    """A TRL reward function that scores each completion with ``verifier(completion, answer)``.

    - A verifier that raises on a sample is logged (logger ``conspo.rewards``) and that sample scores 0.0;
      ``strict=True`` re-raises instead.
    - A NaN, infinite or None score becomes 0.0, with a logged warning.
    - ``timeout_s``: each verifier call is bounded by ``conspo.rewards.bounded.call_with_timeout`` when the
      reward function runs in the main thread (where TRL calls synchronous reward functions); a call that
      runs over scores 0.0 (reason ``timeout``) with a logged warning, or raises ``TimeoutError`` when
      ``strict``. In other threads the call runs unbounded (conspo's own verifiers bound themselves there).
      A verifier stuck in one C call that never returns to Python is not interrupted (see ``bounded``).
    - When TRL passes ``log_extra``, the extracted answers and reasons are logged as completion-table columns
      ``<name>/extracted`` and ``<name>/reason``.
    - ``f.__name__`` is ``name`` (default: the verifier's name), so TRL logs it as ``rewards/<name>``.
    """
    reward_name = name or getattr(verifier, "__name__", None) or "verifier"

    def reward(prompts=None, completions=None, answer=None, **kwargs) -> list[float | None]:
        if completions is None:
            raise ValueError(f"reward function {reward_name!r} needs the 'completions' keyword")
        if answer is None:
            raise ValueError(
                f"reward function {reward_name!r} needs the dataset column 'answer' (got columns: "
                f"{sorted(k for k in kwargs if k not in ('trainer_state', 'log_extra', 'log_metric'))})"
            )
        if len(answer) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(answer)} answers for {reward_name!r}")
        scores: list[float | None] = []
        extracted: list[str | None] = []
        reasons: list[str] = []
        for index, (completion, gold) in enumerate(zip(completions, answer)):
            call = (completion_text(completion), "" if gold is None else str(gold))
            try:
                if timeout_s and threading.current_thread() is threading.main_thread():
                    result = call_with_timeout(verifier, call, timeout_s)
                else:
                    result = verifier(*call)
            except TimeoutError:
                if strict:
                    raise
                logger.warning("verifier %s timed out on sample %d (bound: %s s); scored 0.0", reward_name, index, timeout_s)
                result = VerifyResult(0.0, None, "timeout")
            except Exception:
                if strict:
                    raise
                logger.warning("verifier %s raised on sample %d; scored 0.0", reward_name, index, exc_info=True)
                result = VerifyResult(0.0, None, "error")
            raw = getattr(result, "score", result)
            try:
                score = float(raw)
            except (TypeError, ValueError):
                score = math.nan
            if not math.isfinite(score):
                logger.warning("verifier %s returned score %r on sample %d; scored 0.0", reward_name, raw, index)
                score = 0.0
            scores.append(score)
            extracted.append(getattr(result, "extracted", None))
            reasons.append(getattr(result, "reason", ""))
        log_extra = kwargs.get("log_extra")
        if callable(log_extra):
            log_extra(f"{reward_name}/extracted", extracted)
            log_extra(f"{reward_name}/reason", reasons)
        return scores

    reward.__name__ = reward.__qualname__ = reward_name
    return reward
