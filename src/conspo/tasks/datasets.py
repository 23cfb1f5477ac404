"""Local datasets (JSONL, JSON or Parquet files) as tasks, and the prompt template.

Layouts recognised without configuration (explicit ``question_field`` / ``answer_field`` /
``subset_field`` override them):

- **question**: the first of ``question``, ``problem``, ``prompt``, ``input``, ``query`` present.
- **answer**: the first of ``answer``, ``final_answer``, ``solution``, ``target``, ``output`` present. The value
  is reduced to its final answer by ``extract_gold``: GSM8K's ``"...#### 72"`` gives ``72``, a MATH solution
  gives the content of its last ``\\boxed{}``, a plain answer is kept (normalised). MATH-500 rows, which have
  both ``answer`` and ``solution``, use ``answer``. A ``solution`` without a marked final answer (``\\boxed{}``,
  ``####``, ``Answer:``) counts as a missing answer.
- **subset** (optional, for per-subset evaluation): the first of ``subset``, ``subject``, ``type``, ``level``,
  ``category`` present (MATH: ``type``, the subject).

Bad input raises ``DatasetError`` (a ``ValueError``) naming the file, the problem and the accepted values:
unknown extension, missing or unreadable file, no rows, a missing field. Rows whose question or answer is
missing or empty are skipped with a logged count (an error if none remain); rows repeating an earlier
question are dropped with a logged count, so train and test can never share a prompt.

Free-form golds: a gold answer the math verifier cannot read as one whole answer (prose around an
expression, ``"n^2 if n is even, and n^2 - 1 otherwise"``; see ``conspo.rewards.gold``) is found when the
file is loaded (``check_gold``) and, by ``freeform_gold``: ``"drop"`` (default) skips those rows with a logged
count and three examples, ``"refuse"`` raises ``DatasetError`` with the same report, ``"exact"`` keeps them,
logged, and ``math_verify_match`` scores them only by an exact match of the whole gold. A completion is never
checked against a fragment of such a gold (a number inside it). Golds with equivalent forms (``"A, or
equivalently B"``), a stated value (``"The limit exists and is equal to 2"``) or a yes/no with a
justification are read whole and kept.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from conspo.prompts import TEMPLATES, render_prompt  # noqa: F401 (TEMPLATES: re-exported, as before)
from conspo.rewards.extract import extract_answer, extract_gold
from conspo.rewards.verifiers import check_gold, math_verify_match
from conspo.tasks.base import Task

logger = logging.getLogger("conspo.tasks")

QUESTION_FIELDS = ("question", "problem", "prompt", "input", "query")
ANSWER_FIELDS = ("answer", "final_answer", "solution", "target", "output")
SUBSET_FIELDS = ("subset", "subject", "type", "level", "category")
EXTENSIONS = (".jsonl", ".json", ".parquet")
MATH_INSTRUCTION = "Put your final answer within \\boxed{}."
"""The instruction of dataset tasks (training and ``conspo eval --dataset``)."""
PAPER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""The paper's evaluation prompt (Appendix E): ``conspo eval --protocol paper``."""
FREEFORM_GOLD = ("drop", "refuse", "exact")
"""What ``load_dataset_file`` does with rows whose gold the math verifier cannot read whole (module docstring)."""
FREEFORM_EXAMPLES = 3
MAX_QUESTION_CHARS = 100_000
"""A question longer than this is refused when the file is read: no model's positions hold it, and one such row
(a 50 MB question) would exhaust memory in tokenisation and generation instead of failing."""


class DatasetError(ValueError):
    """A dataset file that cannot be used as given; the message names the file and what to change."""


# ----------------------------------------------------------------------------------------------- reading


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a ``.jsonl``, ``.json`` (a list of objects, or ``{"data": [...]}``) or ``.parquet`` file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise DatasetError(f"{path}: unsupported file type {suffix or '(none)'!r}; accepted: {', '.join(EXTENSIONS)}")
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    if not path.is_file():
        raise DatasetError(f"{path}: not a regular file")
    try:
        if suffix == ".parquet":
            import pyarrow.parquet

            rows = pyarrow.parquet.read_table(path).to_pylist()
        else:
            data = path.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as error:
                line = data.count(b"\n", 0, error.start) + 1
                raise DatasetError(f"{path}: line {line} is not UTF-8 text (byte {data[error.start]:#04x}); save the "
                                   f"file as UTF-8") from None
            rows = _parse_jsonl(path, text) if suffix == ".jsonl" else _parse_json(path, text)
    except DatasetError:
        raise
    except Exception as error:  # OSError, UnicodeDecodeError, pyarrow's ArrowInvalid, ...
        raise DatasetError(f"{path}: cannot read the file as {suffix}: {type(error).__name__}: {error}") from error
    if not rows:
        raise DatasetError(f"{path}: the file has no rows")
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise DatasetError(f"{path}: row {bad + 1} is a {type(rows[bad]).__name__}, not an object with fields")
    return rows


def _parse_jsonl(path: Path, text: str) -> list:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DatasetError(f"{path}: line {number} is not valid JSON: {error}") from error
    return rows


def _parse_json(path: Path, text: str) -> list:
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: not valid JSON: {error}") from error
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DatasetError(f"{path}: a .json dataset must be a list of objects or {{\"data\": [...]}}")
    return data


def _pick_field(path: Path, columns: list[str], given: str | None, candidates: tuple[str, ...], role: str) -> str | None:
    if given is not None:
        if given not in columns:
            raise DatasetError(f"{path}: --{role}-field {given!r} is not a field of the rows; fields: {columns}")
        return given
    found = next((name for name in candidates if name in columns), None)
    if found is None and role != "subset":
        raise DatasetError(
            f"{path}: no {role} field found; looked for {list(candidates)}, the rows have {columns}. "
            f"Name it with --{role}-field (question_field= / answer_field= from Python)"
        )
    return found


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def load_dataset_file(
    path: str | Path,
    *,
    question_field: str | None = None,
    answer_field: str | None = None,
    subset_field: str | None = None,
    dedupe: bool = True,
    freeform_gold: str = "drop",
) -> list[dict]:
    """Problems ``{"question", "answer"[, "subset"]}`` read from a local file (see the module docstring).

    The fields are looked up in the union of all rows' keys; a row without a value is skipped (counted).
    ``dedupe`` drops rows whose question (whitespace-normalised) appeared before, keeping the first.
    ``freeform_gold`` (``"drop"``, ``"refuse"`` or ``"exact"``) says what happens to rows whose gold the math
    verifier cannot read as one whole answer (``free_form_rows``); each choice is logged or raised with the
    count and examples, so it is never silent.
    """
    if freeform_gold not in FREEFORM_GOLD:
        raise DatasetError(f"freeform_gold must be one of {', '.join(map(repr, FREEFORM_GOLD))}; got {freeform_gold!r}")
    path = Path(path)
    rows = read_rows(path)
    columns = sorted({key for row in rows for key in row})
    question_key = _pick_field(path, columns, question_field, QUESTION_FIELDS, "question")
    answer_key = _pick_field(path, columns, answer_field, ANSWER_FIELDS, "answer")
    subset_key = _pick_field(path, columns, subset_field, SUBSET_FIELDS, "subset")

    # A worked solution is only a usable gold if it marks its final answer (\boxed{}, ####, "Answer:").
    needs_marker = answer_key == "solution"
    problems, seen, row_numbers = [], set(), []
    skipped = duplicates = 0
    too_long = [(number, len(str(row.get(question_key) or ""))) for number, row in enumerate(rows, start=1)
                if len(str(row.get(question_key) or "")) > MAX_QUESTION_CHARS]
    if too_long:
        number, size = max(too_long, key=lambda item: item[1])
        raise DatasetError(f"{path}: {len(too_long)} rows have a {question_key!r} longer than {MAX_QUESTION_CHARS:,} "
                           f"characters (the longest: row {number}, {size:,} characters); shorten or remove them")
    for number, row in enumerate(rows, start=1):
        question = _text(row.get(question_key))
        raw = _text(row.get(answer_key))
        if needs_marker:
            answer = extract_answer(raw, fallback="none", max_chars=len(raw) + 1)[0] or ""
        else:
            answer = extract_gold(raw)
        if not question or not answer:
            skipped += 1
            continue
        key = " ".join(question.split())
        if dedupe and key in seen:
            duplicates += 1
            continue
        seen.add(key)
        problem = {"question": question, "answer": answer}
        if subset_key is not None and _text(row.get(subset_key)):
            problem["subset"] = _text(row.get(subset_key))
        problems.append(problem)
        row_numbers.append(number)
    if skipped:
        logger.warning("%s: skipped %d of %d rows with a missing or empty %r or %r%s", path, skipped, len(rows),
                       question_key, answer_key, " (or no marked final answer)" if needs_marker else "")
    if duplicates:
        logger.warning("%s: dropped %d rows repeating an earlier question", path, duplicates)
    if not problems:
        raise DatasetError(f"{path}: no usable rows: all {len(rows)} rows lack a {question_key!r} or {answer_key!r}")
    return _apply_freeform_policy(path, problems, row_numbers, freeform_gold)


def free_form_rows(problems: list[dict]) -> list[tuple[int, str]]:
    """``(index, why)`` for each problem whose gold ``math_verify_match`` cannot read as one whole answer
    (``conspo.rewards.verifiers.check_gold``): prose around an expression, several answers joined by *or*,
    an expression math-verify reads only in part."""
    return [(index, why) for index, problem in enumerate(problems) if (why := check_gold(problem["answer"]))]


def _apply_freeform_policy(path: Path, problems: list[dict], row_numbers: list[int], policy: str) -> list[dict]:
    """Drop, refuse or keep (``policy``) the free-form rows, saying how many and showing a few."""
    found = free_form_rows(problems)
    if not found:
        return problems
    examples = "; ".join(f"row {row_numbers[index]}: {problems[index]['answer'][:80]!r} ({why})"
                         for index, why in found[:FREEFORM_EXAMPLES])
    report = (f"{path}: {len(found)} of {len(problems)} rows have a gold answer the math verifier cannot read as "
              f"one whole answer (e.g. {examples})")
    if policy == "refuse":
        raise DatasetError(f"{report}. Write each as one expression (\"A, or equivalently B\" is fine), or pass "
                           "freeform_gold='drop' to skip those rows or 'exact' to keep them scored only by an exact "
                           "match of the whole gold")
    if policy == "exact":
        logger.warning("%s; kept (freeform_gold='exact'): a completion scores on them only when its answer is the "
                       "whole gold", report)
        return problems
    logger.warning("%s; dropped them (freeform_gold='drop'; 'refuse' makes this an error, 'exact' keeps them scored "
                   "by an exact match of the whole gold)", report)
    bad = {index for index, _ in found}
    kept = [problem for index, problem in enumerate(problems) if index not in bad]
    if not kept:
        raise DatasetError(f"{report}: no rows are left. Pass freeform_gold='exact' to keep them, scored only by an "
                           "exact match of the whole gold")
    return kept


# ----------------------------------------------------------------------------------------------- against a model


def question_report(problems: list[dict], tokenizer: Any, *, max_positions: int | None, completion_length: int,
                    render=None, source: str = "the task") -> list[str]:
    """Warnings about ``problems`` for one model, each a line naming how many questions and an example:

    - prompts that leave fewer than ``completion_length`` of the model's ``max_positions`` for the completion
      (the count and the longest prompt, in tokens);
    - questions with characters the tokenizer maps to its unknown token (two different such questions can encode
      to the same ids, so the model cannot tell them apart).

    ``render``: question -> the prompt text the model is given (default: the question)."""
    render = render or (lambda question: question)
    unk = getattr(tokenizer, "unk_token_id", None)
    long_prompts, unknown, longest = [], [], (0, "")
    for problem in problems:
        ids = tokenizer(render(problem["question"]), add_special_tokens=False)["input_ids"]
        if max_positions is not None and len(ids) + completion_length > max_positions:
            long_prompts.append(problem)
            if len(ids) > longest[0]:
                longest = (len(ids), problem["question"])
        if unk is not None and unk in ids:
            unknown.append(problem)
    lines = []
    if long_prompts:
        lines.append(f"{source}: {len(long_prompts)} of {len(problems)} prompts leave fewer than {completion_length} "
                     f"of the model's {max_positions} positions for the completion (the longest: {longest[0]} tokens, "
                     f"{longest[1][:60]!r}); its completions are cut short or run past the positions the model "
                     f"knows: shorten them, or use a model with more positions")
    if unknown:
        lines.append(f"{source}: {len(unknown)} of {len(problems)} questions have characters the tokenizer maps to "
                     f"{getattr(tokenizer, 'unk_token', '<unk>')} (e.g. {unknown[0]['question'][:60]!r}); different "
                     f"such questions can look the same to the model: use a model whose tokenizer covers them")
    return lines


# ----------------------------------------------------------------------------------------------- task


def split_problems(problems: list[dict], test_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A deterministic split: shuffle with ``random.Random(seed)``, the first ``round(n * test_fraction)``
    (at least one when the fraction is positive) are the test set. Disjoint if the questions are unique."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1); got {test_fraction}")
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    n_test = 0 if test_fraction == 0 else max(1, round(len(problems) * test_fraction))
    if n_test >= len(problems):
        raise ValueError(
            f"cannot hold out {n_test} of {len(problems)} problems for testing: lower test_fraction "
            f"(now {test_fraction}) or give more rows"
        )
    test = [problems[i] for i in sorted(order[:n_test])]
    train = [problems[i] for i in sorted(order[n_test:])]
    return train, test


def dataset_task(
    path: str | Path,
    *,
    question_field: str | None = None,
    answer_field: str | None = None,
    subset_field: str | None = None,
    test_fraction: float = 0.1,
    seed: int = 0,
    test_path: str | Path | None = None,
    instruction: str = MATH_INSTRUCTION,
    max_completion_length: int = 512,
    freeform_gold: str = "drop",
) -> Task:
    """A task from a local file, checked with ``math_verify_match``.

    Train and test are disjoint: questions are de-duplicated, then split by ``split_problems``. With
    ``test_path`` the test set is that file instead, and training rows whose question appears there are
    dropped (logged). ``freeform_gold`` applies to both files (``load_dataset_file``).
    """
    fields = {"question_field": question_field, "answer_field": answer_field, "subset_field": subset_field,
              "freeform_gold": freeform_gold}
    problems = load_dataset_file(path, **fields)
    if test_path is None:
        train, test = split_problems(problems, test_fraction, seed)
    else:
        test = load_dataset_file(test_path, **fields)
        held_out = {" ".join(p["question"].split()) for p in test}
        train = [p for p in problems if " ".join(p["question"].split()) not in held_out]
        if len(train) < len(problems):
            logger.warning("%s: dropped %d training rows that are also in %s", path, len(problems) - len(train),
                           test_path)
        if not train:
            raise DatasetError(f"{path}: every row is also in the test file {test_path}")
    return Task(
        name=str(path),
        train=train,
        test=test,
        verifier=math_verify_match,
        instruction=instruction,
        max_completion_length=max_completion_length,
        metadata={"path": str(path), "test_path": None if test_path is None else str(test_path),
                  "test_fraction": test_fraction, "seed": seed, "freeform_gold": freeform_gold},
    )


def format_prompt(question: str, instruction: str = "", template: str = "plain", tokenizer: Any = None):
    """The prompt for one question: ``template="plain"`` gives the string ``question + "\\n" + instruction``;
    ``"chat"`` gives TRL's conversational format ``[{"role": "user", "content": ...}]``, for which a given
    ``tokenizer`` must have a chat template. The same as :func:`conspo.prompts.render_prompt`, which every
    path (warm start, RL, held-out evaluation, ``conspo eval``) uses."""
    return render_prompt(question, instruction, template, tokenizer)
