"""Dataset and task loading: local JSONL / JSON / Parquet files in the common layouts (fixtures written here),
bad input with clear errors, de-duplication, disjoint splits, prompts, and ``get_task`` by name."""

from __future__ import annotations

import json
import logging

import pytest

from conspo.rewards import math_verify_match
from conspo.tasks import registry
from conspo.tasks.datasets import (
    MATH_INSTRUCTION,
    DatasetError,
    dataset_task,
    format_prompt,
    load_dataset_file,
    split_problems,
)
from conspo.tasks.registry import get_task

GSM8K_ROWS = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72.\n#### 72"},
    {"question": "Weng earns $12 an hour. How much for 50 minutes?", "answer": "12/60*50 = 10\n#### 10"},
    {"question": "A shop sells 1,200 pens a day. How many in 10 days?", "answer": "1200*10\n#### 12,000"},
]
MATH_ROWS = [
    {"problem": "Compute $\\frac{1}{4}+\\frac{1}{4}$.", "solution": "We add: $\\boxed{\\frac{1}{2}}$.",
     "level": "Level 1", "type": "Prealgebra"},
    {"problem": "Solve $x^2=4$, $x>0$.", "solution": "So $x = \\boxed{2}$.", "level": "Level 2", "type": "Algebra"},
    {"problem": "What is $\\{1,2\\}\\cup\\{3\\}$?", "solution": "It is $\\boxed{\\{1,2,3\\}}$.",
     "level": "Level 1", "type": "Algebra"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path, rows):
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


# ------------------------------------------------------------------------------------------------ layouts


def test_gsm8k_layout_jsonl(tmp_path):
    problems = load_dataset_file(write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS))
    assert [p["answer"] for p in problems] == ["72", "10", "12000"]
    assert problems[0]["question"] == GSM8K_ROWS[0]["question"]
    assert "subset" not in problems[0]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".json"])
def test_math_layout(tmp_path, suffix):
    path = tmp_path / f"math{suffix}"
    if suffix == ".parquet":
        write_parquet(path, MATH_ROWS)
    elif suffix == ".jsonl":
        write_jsonl(path, MATH_ROWS)
    else:
        path.write_text(json.dumps({"data": MATH_ROWS}))
    problems = load_dataset_file(path)
    assert [p["answer"] for p in problems] == ["\\frac{1}{2}", "2", "\\{1,2,3\\}"]
    assert [p["subset"] for p in problems] == ["Prealgebra", "Algebra", "Algebra"]  # type before level
    assert load_dataset_file(path, subset_field="level")[0]["subset"] == "Level 1"


def test_math500_layout_prefers_the_answer_field(tmp_path):
    rows = [{"problem": "p", "solution": "long work \\boxed{3}", "answer": "3", "subject": "Algebra", "level": 2}]
    (problem,) = load_dataset_file(write_jsonl(tmp_path / "m500.jsonl", rows))
    assert problem == {"question": "p", "answer": "3", "subset": "Algebra"}


def test_custom_fields_and_non_string_values(tmp_path):
    rows = [{"q": "one plus one", "a": 2, "cat": "easy"}, {"q": "half of one", "a": 0.5, "cat": "hard"}]
    path = write_parquet(tmp_path / "custom.parquet", rows)
    problems = load_dataset_file(path, question_field="q", answer_field="a", subset_field="cat")
    assert problems == [{"question": "one plus one", "answer": "2", "subset": "easy"},
                        {"question": "half of one", "answer": "0.5", "subset": "hard"}]


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "rows,options,message",
    [
        ([{"q": "x", "answer": "1"}], {}, r"no question field found; looked for \['question', 'problem'.*Name it with --question-field"),
        ([{"question": "x", "a": "1"}], {}, r"no answer field found; .*the rows have \['a', 'question'\]"),
        ([{"question": "x", "answer": "1"}], {"answer_field": "gold"}, "--answer-field 'gold' is not a field"),
        ([{"question": "x", "answer": "1"}], {"subset_field": "level"}, "--subset-field 'level' is not a field"),
        ([{"question": "x", "answer": ""}, {"question": "y"}], {}, "no usable rows: all 2 rows lack"),
        ([{"problem": "x", "solution": "no marked answer"}], {}, "no usable rows"),
        (["just a string"], {}, "row 1 is a str, not an object"),
    ],
)
def test_bad_rows_raise_clear_errors(tmp_path, rows, options, message):
    with pytest.raises(DatasetError, match=message):
        load_dataset_file(write_jsonl(tmp_path / "bad.jsonl", rows), **options)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.jsonl", "", "has no rows"),
        ("blank.jsonl", "\n  \n\n", "has no rows"),
        ("empty.json", "[]", "has no rows"),
        ("broken.jsonl", '{"question": "x", "answer": "1"}\n{"question": \n', "line 2 is not valid JSON"),
        ("broken.json", "{", "not valid JSON"),
        ("scalar.json", "42", "must be a list of objects"),
        ("latin1.jsonl", b'{"question": "caf\xe9", "answer": "1"}\n', r"line 1 is not UTF-8 text \(byte 0xe9\)"),
        ("garbage.parquet", b"not a parquet file", "cannot read the file as .parquet"),
        ("data.csv", "question,answer\nx,1\n", r"unsupported file type '.csv'; accepted: .jsonl, .json, .parquet"),
    ],
)
def test_unreadable_or_empty_files(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(DatasetError, match=message) as error:
        load_dataset_file(path)
    assert str(path) in str(error.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset_file(tmp_path / "missing.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DatasetError, match="not a regular file"):
        load_dataset_file(tmp_path / "dir.jsonl")


def test_rows_without_answers_are_skipped_and_counted(tmp_path, caplog):
    rows = GSM8K_ROWS + [{"question": "no answer"}, {"question": "empty", "answer": "  "},
                         {"question": "", "answer": "1"}, {"question": None, "answer": "1"}]
    with caplog.at_level(logging.WARNING, logger="conspo.tasks"):
        problems = load_dataset_file(write_jsonl(tmp_path / "gaps.jsonl", rows))
    assert len(problems) == 3
    assert any("skipped 4 of 7 rows" in r.getMessage() for r in caplog.records)


def test_duplicate_questions_are_dropped_and_counted(tmp_path, caplog):
    rows = GSM8K_ROWS + [{"question": "  " + GSM8K_ROWS[0]["question"].replace(" ", "  "), "answer": "#### 73"},
                         dict(GSM8K_ROWS[1])]
    path = write_jsonl(tmp_path / "dupes.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="conspo.tasks"):
        problems = load_dataset_file(path)
    assert [p["answer"] for p in problems] == ["72", "10", "12000"]  # the first occurrence is kept
    assert any("dropped 2 rows repeating an earlier question" in r.getMessage() for r in caplog.records)
    assert len(load_dataset_file(path, dedupe=False)) == 5


# ------------------------------------------------------------------------------------------------ splits and tasks


def numbered_rows(n, duplicate_every=0):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"} for i in range(n)]
    if duplicate_every:
        rows += [dict(rows[i]) for i in range(0, n, duplicate_every)]
    return rows


def test_dataset_task_split_is_disjoint_and_deterministic(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", numbered_rows(50, duplicate_every=5))
    task = dataset_task(path, test_fraction=0.2, seed=3)
    train_q = [p["question"] for p in task.train]
    test_q = [p["question"] for p in task.test]
    assert (len(train_q), len(test_q)) == (40, 10)
    assert not set(train_q) & set(test_q) and len(set(train_q)) == 40
    again = dataset_task(path, test_fraction=0.2, seed=3)
    assert again.train == task.train and again.test == task.test
    assert dataset_task(path, test_fraction=0.2, seed=4).test != task.test
    assert task.verifier is math_verify_match and task.instruction == MATH_INSTRUCTION
    problem = task.test[0]
    assert task.verifier(f"so \\boxed{{{problem['answer']}}}", problem["answer"]).score == 1.0


def test_dataset_task_with_a_test_file(tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", numbered_rows(10))
    test_path = write_jsonl(tmp_path / "test.jsonl", numbered_rows(3))
    task = dataset_task(train_path, test_path=test_path)
    assert len(task.test) == 3 and len(task.train) == 7
    assert not {p["question"] for p in task.train} & {p["question"] for p in task.test}


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_rejects_bad_fractions(fraction):
    with pytest.raises(ValueError, match=r"test_fraction must be in \[0, 1\)"):
        split_problems([{"question": "a", "answer": "1"}] * 3, fraction, 0)


def test_split_needs_enough_rows():
    one = [{"question": "a", "answer": "1"}]
    assert split_problems(one, 0.0, 0) == (one, [])
    with pytest.raises(ValueError, match="cannot hold out 1 of 1 problems"):
        split_problems(one, 0.1, 0)


class _Tokenizer:
    def __init__(self, chat_template):
        self.chat_template = chat_template


def test_format_prompt():
    assert format_prompt("What is 2+2?", MATH_INSTRUCTION) == "What is 2+2?\n" + MATH_INSTRUCTION
    assert format_prompt("What is 2+2?") == "What is 2+2?"
    chat = format_prompt("Q", "I", template="chat", tokenizer=_Tokenizer("{{ messages }}"))
    assert chat == [{"role": "user", "content": "Q\nI"}]
    assert format_prompt("Q", template="chat") == [{"role": "user", "content": "Q"}]
    with pytest.raises(ValueError, match="has none: use template='plain'"):
        format_prompt("Q", template="chat", tokenizer=_Tokenizer(None))
    with pytest.raises(ValueError, match=r"template must be one of \['plain', 'chat'\]"):
        format_prompt("Q", template="jinja")


# ------------------------------------------------------------------------------------------------ get_task


def test_get_task_from_a_path(tmp_path):
    path = write_parquet(tmp_path / "math.parquet", MATH_ROWS + [
        {"problem": f"p{i}", "solution": f"\\boxed{{{i}}}", "level": "Level 3", "type": "Geometry"} for i in range(7)
    ])
    task = get_task(str(path), test_fraction=0.2, seed=1)
    assert (len(task.train), len(task.test)) == (8, 2)
    with pytest.raises(DatasetError, match="no such file"):
        get_task(str(tmp_path / "absent.jsonl"))
    with pytest.raises(ValueError, match=r"has no option \['size'\]; accepted: \['question_field'"):
        get_task(str(path), size=5)


def test_get_task_builtin_lookup(monkeypatch):
    made = []
    monkeypatch.setitem(registry.BUILTIN_TASKS, "fake", lambda **options: made.append(options) or "task")
    monkeypatch.setitem(registry.BUILTIN_TASKS, "missing", "conspo.tasks.no_such_module:make_task")
    monkeypatch.setitem(registry.BUILTIN_TASKS, "strict", lambda *, size=1: size)
    assert get_task("fake", size=3) == "task" and made == [{"size": 3}]
    assert get_task("strict", size=2) == 2
    with pytest.raises(ValueError, match=r"built-in task 'strict' has no option \['n'\]; accepted: \['size'\]"):
        get_task("strict", n=2)
    with pytest.raises(ValueError, match="built-in task 'missing' is not available"):
        get_task("missing")
    with pytest.raises(ValueError, match=r"unknown task 'fak'; accepted: a built-in name \[.*'fake'.*\].*"
                                         r"'reasoning_gym:<name>', or a path .*Did you mean \['fake'\]"):
        get_task("fak")


def test_get_task_reasoning_gym_by_name():
    pytest.importorskip("reasoning_gym")
    task = get_task("reasoning_gym:basic_arithmetic", size=12, test_size=4, seed=0)
    assert task.name == "reasoning_gym:basic_arithmetic"
    assert (len(task.train), len(task.test)) == (12, 4)
    assert not {p["question"] for p in task.train} & {p["question"] for p in task.test}
    assert get_task("reasoning_gym:basic_arithmetic", size=12, test_size=4, seed=0).test == task.test
    other = get_task("reasoning_gym:basic_arithmetic", size=12, test_size=4, seed=1)
    assert {p["question"] for p in other.train} != {p["question"] for p in task.train}
    problem = task.test[0]
    assert task.verifier(f"work...\n<answer>{problem['reference']}</answer>", problem["answer"]).score == 1.0
    assert task.verifier("<answer>not a number</answer>", problem["answer"]).score == 0.0


@pytest.mark.parametrize(
    "spec,options,message",
    [
        ("reasoning_gym:basic_arithmetc", {}, r"did you mean \['basic_arithmetic'.*from reasoning_gym.factory"),
        ("reasoning_gym:", {}, "names no reasoning-gym task"),
        ("reasoning_gym:basic_arithmetic", {"size": 4, "colour": 1}, r"has no option \['colour'\]; accepted"),
        ("reasoning_gym:basic_arithmetic", {"size": 0}, "size must be >= 1"),
    ],
)
def test_get_task_reasoning_gym_errors(spec, options, message):
    pytest.importorskip("reasoning_gym")
    with pytest.raises(ValueError, match=message):
        get_task(spec, **options)


def test_a_non_utf8_file_names_its_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"question": "a", "answer": "1"}\n{"question": "b", "answer": "2"}\n'
                     b'{"question": "caf\xe9", "answer": "3"}\n')
    with pytest.raises(DatasetError, match=r"line 3 is not UTF-8 text \(byte 0xe9\); save the file as UTF-8"):
        load_dataset_file(path)


def test_a_huge_question_is_refused_naming_its_row(tmp_path):
    from conspo.tasks.datasets import MAX_QUESTION_CHARS

    rows = [{"question": "x", "answer": "1"}, {"question": "y" * (MAX_QUESTION_CHARS + 1), "answer": "2"},
            {"question": "z" * (3 * MAX_QUESTION_CHARS), "answer": "3"}]
    with pytest.raises(DatasetError, match=rf"2 rows have a 'question' longer than {MAX_QUESTION_CHARS:,} characters "
                                           rf"\(the longest: row 3, {3 * MAX_QUESTION_CHARS:,} characters\)"):
        load_dataset_file(write_jsonl(tmp_path / "huge.jsonl", rows))
    rows[1]["question"] = "y" * MAX_QUESTION_CHARS  # at the limit: accepted
    rows.pop()
    assert len(load_dataset_file(write_jsonl(tmp_path / "ok.jsonl", rows))) == 2


def test_question_report_counts_long_prompts_and_unknown_characters():
    from conspo.tasks.datasets import question_report

    try:
        from conspo.embedded import build_tokenizer
    except ImportError:  # (before the embedded model had its own module)
        from conspo.tasks.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()  # one token per printable ASCII character, <unk> for the rest
    problems = [{"question": "1+1"}, {"question": "x" * 31}, {"question": "y" * 40}, {"question": "w" * 30},
                {"question": "北京"}, {"question": "上海"}]
    assert tokenizer("北京", add_special_tokens=False)["input_ids"] == tokenizer("上海", add_special_tokens=False)[
        "input_ids"]  # the fault: two questions, one encoding
    lines = question_report(problems, tokenizer, max_positions=40, completion_length=10, source="data.jsonl")
    assert len(lines) == 2
    assert lines[0].startswith("data.jsonl: 2 of 6 prompts leave fewer than 10 of the model's 40 positions")
    assert "the longest: 40 tokens" in lines[0]
    assert lines[1].startswith("data.jsonl: 2 of 6 questions have characters the tokenizer maps to <unk>")
    assert question_report(problems[:1], tokenizer, max_positions=40, completion_length=10) == []
    fits = [problems[0], problems[3]]  # 30 + 10 positions: fits exactly
    assert question_report(fits, tokenizer, max_positions=40, completion_length=10) == []
    assert question_report(problems[:3], tokenizer, max_positions=None, completion_length=10) == []
