"""Verifiers from reasoning-gym's own scorers (``dataset.score_answer(answer, entry)``).

Choices:

- **Gold encoding.** A scorer needs the whole generated entry (question, answer and metadata: several
  families score against metadata, e.g. all valid n-queens boards), but a conspo verifier only receives the
  problem's ``"answer"`` string. So the problem's ``"answer"`` *is* the entry, as JSON (``encode_entry``),
  and the plain gold answer is kept beside it as ``"reference"`` for display. Tuples and sets in metadata are
  tagged (``{"__tuple__": [...]}``, ``{"__set__": [...]}``) so that they come back as tuples and sets:
  ARC-style scorers compare boards as tuples and would score the gold answer 0.05 after a plain JSON trip.
- **Answer extraction.** The content of the last ``<answer>...</answer>`` (reasoning-gym's own convention),
  else the last non-empty line of the completion; unicode minus signs and spaces are normalised, nothing else
  (scorers compare exact strings, so a trailing full stop is kept).
- **No eval.** In reasoning-gym 0.1.25 the scorers of string_insertion, spiral_matrix, binary_matrix and
  n_queens call ``eval`` on the model's answer to accept a Python-list spelling. Before such a scorer is
  used, the ``eval`` name in its module is replaced by a literal-only parser (``ast.literal_eval``), so a
  list literal still earns its partial credit and nothing else is ever executed. The module is chosen by
  looking for ``eval(`` in the scorer's source.
- **Time bound.** Scoring runs under ``call_with_timeout`` like math-verify (``conspo.rewards.bounded``).
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import logging
import math
import re
import sys
from typing import Any

from conspo.rewards.base import Verifier, VerifyResult
from conspo.rewards.bounded import call_with_timeout
from conspo.rewards.extract import MAX_TAIL_CHARS, normalize_text

logger = logging.getLogger("conspo.rewards")

_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_KNOWN_EVAL_SCORERS = {"StringInsertionDataset", "SpiralMatrixDataset", "BinaryMatrixDataset", "NQueensDataset"}
MAX_LITERAL_CHARS = 10_000

INSTRUCTION = "Give only your final answer between <answer> and </answer>."


def require_reasoning_gym():
    """Import reasoning_gym, or raise an ImportError that says how to install it."""
    try:
        import reasoning_gym
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reasoning-gym tasks need the reasoning-gym package: pip install 'conspo[tasks]'"
        ) from error
    return reasoning_gym


# ----------------------------------------------------------------------------------------------- gold encoding


def _tag(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"__tuple__": [_tag(v) for v in value]}
    if isinstance(value, set | frozenset):
        return {"__set__": [_tag(v) for v in sorted(value, key=repr)]}
    if isinstance(value, list):
        return [_tag(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _tag(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def _untag(value: dict) -> Any:
    if len(value) == 1 and "__tuple__" in value:
        return tuple(value["__tuple__"])
    if len(value) == 1 and "__set__" in value:
        return set(value["__set__"])
    return value


def encode_entry(entry: dict) -> str:
    """A reasoning-gym entry as a JSON string, keeping tuples and sets (see the module docstring)."""
    return json.dumps(_tag(entry), sort_keys=True)


def decode_entry(text: str) -> dict:
    """The entry written by ``encode_entry``; a ``ValueError`` that says so when ``text`` is not one."""
    try:
        entry = json.loads(text, object_hook=_untag)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"a reasoning-gym verifier needs the problem's answer to be an encoded entry (encode_entry); "
            f"got {text[:80]!r}"
        ) from error
    if not isinstance(entry, dict) or "answer" not in entry:
        raise ValueError(f"an encoded reasoning-gym entry must be an object with an 'answer'; got {text[:80]!r}")
    return entry


# ----------------------------------------------------------------------------------------------- extraction


def extract_tagged_answer(completion: str) -> tuple[str | None, str]:
    """``(answer, how)``: the last ``<answer>...</answer>`` (``how="answer_tag"``), else the last non-empty
    line (``"last_line"``), else ``(None, "none")``. Only the last ``MAX_TAIL_CHARS`` characters are read."""
    if not completion:
        return None, "none"
    text = normalize_text(completion[-MAX_TAIL_CHARS:])
    last = None
    for last in _ANSWER_TAG_RE.finditer(text):  # noqa: B007 - we want the final match
        pass
    if last is not None:
        return last.group(1).strip(), "answer_tag"
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip(), "last_line"
    return None, "none"


# ----------------------------------------------------------------------------------------------- scoring


def _literal_only_eval(source: Any, *args: Any, **kwargs: Any) -> Any:
    """Stands in for ``eval`` in scorer modules: Python literals only, short inputs only."""
    if not isinstance(source, str) or len(source) > MAX_LITERAL_CHARS:
        raise ValueError("only short literal strings are accepted")
    return ast.literal_eval(source)


def make_scorer_safe(dataset_cls: type) -> bool:
    """Replace ``eval`` by a literal-only parser in the module of a scorer that calls it; True if patched."""
    try:
        calls_eval = "eval(" in inspect.getsource(dataset_cls.score_answer)
    except (OSError, TypeError):
        calls_eval = dataset_cls.__name__ in _KNOWN_EVAL_SCORERS
    if calls_eval:
        module = sys.modules[dataset_cls.__module__]
        if getattr(module, "eval", None) is not _literal_only_eval:
            module.eval = _literal_only_eval
            logger.debug("reasoning-gym %s: eval in its scorer now parses literals only", dataset_cls.__name__)
    return calls_eval


@functools.lru_cache(maxsize=64)
def _scorer(name: str, config_json: str):
    reasoning_gym = require_reasoning_gym()
    dataset = reasoning_gym.create_dataset(name, **json.loads(config_json, object_hook=_untag))
    make_scorer_safe(type(dataset))
    return dataset.score_answer


def _score(name: str, config_json: str, answer: str, entry_json: str) -> float:
    """Module-level with string arguments so that a worker process can run it (``call_with_timeout``)."""
    return float(_scorer(name, config_json)(answer, decode_entry(entry_json)))


def reasoning_gym_verifier(name: str, config: dict | None = None, *, timeout_s: float = 5.0) -> Verifier:
    """A verifier that scores with reasoning-gym's ``score_answer`` for the family ``name``.

    ``config``: the family's configuration fields (as given to ``reasoning_gym.create_dataset``), since some
    scorers read their configuration. The problem's answer must be ``encode_entry(entry)``. Scores in
    [0, 1] are passed through (several families give partial credit).
    """
    config_json = json.dumps(_tag(dict(config or {})), sort_keys=True)
    _scorer(name, config_json)  # fail now, not at the first reward, if the name or config is wrong

    def verify(completion: str, answer: str) -> VerifyResult:
        extracted, how = extract_tagged_answer(completion)
        if extracted is None:
            return VerifyResult(0.0, None, "no_answer")
        decode_entry(answer)  # a malformed gold raises here, in the caller's process
        try:
            score = call_with_timeout(_score, (name, config_json, extracted, answer), timeout_s,
                                      preload=("reasoning_gym", "conspo.rewards.reasoning_gym"))
        except TimeoutError:
            return VerifyResult(0.0, extracted, "timeout")
        if not math.isfinite(score):
            return VerifyResult(0.0, extracted, "error")
        score = min(max(score, 0.0), 1.0)
        reason = "match" if score == 1.0 else "partial" if score > 0 else "mismatch"
        return VerifyResult(score, extracted, reason)

    verify.__name__ = f"reasoning_gym_{name}"
    return verify
