"""``get_task(spec)``: a task from its command-line name.

Accepted specs, tried in this order:

1. ``reasoning_gym:<name>``: a reasoning-gym family (options ``size``, ``test_size``, ``seed``, and the
   family's own configuration fields). reasoning-gym draws item ``i`` of a dataset seeded ``s`` from
   ``Random(s + i)``, so consecutive seeds give nearly the same items: here train is generated with
   reasoning-gym seed ``seed * SEED_STRIDE`` and test with ``seed * SEED_STRIDE + size``, so their item seeds
   never overlap and conspo seeds 0, 1, 2 give different problems. The test set then drops any question
   also in train, and each side drops repeats, so they are disjoint (counts logged). Scored by
   reasoning-gym's own scorer (``conspo.rewards.reasoning_gym``).
2. A path ending in ``.jsonl`` / ``.json`` / ``.parquet`` (options of ``dataset_task``).
3. A built-in name from ``BUILTIN_TASKS``: a factory, or ``"module:function"`` imported on first use, so
   that listing the names stays cheap.
4. Any other existing file (rejected by ``dataset_task`` with the accepted extensions).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import logging
from collections.abc import Callable
from pathlib import Path

from conspo.rewards.reasoning_gym import INSTRUCTION, encode_entry, reasoning_gym_verifier, require_reasoning_gym
from conspo.tasks.base import Task
from conspo.tasks.datasets import EXTENSIONS, dataset_task

logger = logging.getLogger("conspo.tasks")

BUILTIN_TASKS: dict[str, Callable[..., Task] | str] = {
    "arithmetic": "conspo.tasks.arithmetic:make_task",
    "arithmetic_worked": "conspo.tasks.arithmetic:make_worked_task",
}
"""Built-in procedural tasks: name -> factory ``(**options) -> Task``, or ``"module:function"``."""

REASONING_GYM_PREFIX = "reasoning_gym:"
SEED_STRIDE = 10_000_000
"""reasoning-gym seed of conspo seed ``s``: ``s * SEED_STRIDE`` (see the module docstring)."""
_LIST_NAMES_HINT = (
    "see the names with: python -c \"from reasoning_gym.factory import DATASETS; print(sorted(DATASETS))\""
)


def _accepted(builtins: list[str]) -> str:
    return f"a built-in name {builtins}, '{REASONING_GYM_PREFIX}<name>', or a path to a {'/'.join(EXTENSIONS)} file"


def _resolve_builtin(name: str) -> Callable[..., Task]:
    factory = BUILTIN_TASKS[name]
    if callable(factory):
        return factory
    module_name, _, attribute = factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:  # the module exists but one of its own imports is missing
            raise
        raise ValueError(f"built-in task {name!r} is not available in this install ({factory} is missing)") from error
    return getattr(module, attribute)


def _call_checked(factory: Callable[..., Task], what: str, *args, **options) -> Task:
    """``factory(*args, **options)``, with a ValueError listing the accepted options for an unknown one."""
    parameters = list(inspect.signature(factory).parameters.values())[len(args):]
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        accepted = [p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(f"{what} has no option {unknown}; accepted: {accepted}")
    return factory(*args, **options)


def _unique_by_question(entries: list[dict], exclude: set[str]) -> tuple[list[dict], int]:
    kept, seen = [], set(exclude)
    for entry in entries:
        key = " ".join(str(entry["question"]).split())
        if key not in seen:
            seen.add(key)
            kept.append(entry)
    return kept, len(entries) - len(kept)


def reasoning_gym_task(name: str, *, size: int = 1000, test_size: int = 100, seed: int = 0, **config) -> Task:
    """A reasoning-gym family as a task (see the module docstring). ``config``: the family's fields."""
    require_reasoning_gym()
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        close = difflib.get_close_matches(name, list(DATASETS), n=3)
        hint = f"did you mean {close}? " if close else ""
        raise ValueError(f"unknown reasoning-gym task {name!r}: {hint}{_LIST_NAMES_HINT}")
    if size < 1 or test_size < 0:
        raise ValueError(f"size must be >= 1 and test_size >= 0; got size={size}, test_size={test_size}")
    _, config_cls = DATASETS[name]
    fields = {f.name for f in dataclasses.fields(config_cls)} - {"size", "seed"}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"reasoning-gym task {name!r} has no option {unknown}; accepted: "
                         f"['size', 'test_size', 'seed'] + {sorted(fields)}")

    import reasoning_gym

    def generate(count: int, generation_seed: int) -> list[dict]:
        return list(reasoning_gym.create_dataset(name, size=count, seed=generation_seed, **config)) if count else []

    base = seed * SEED_STRIDE
    train_entries, train_repeats = _unique_by_question(generate(size, base), set())
    train_questions = {" ".join(str(e["question"]).split()) for e in train_entries}
    test_entries, test_repeats = _unique_by_question(generate(test_size, base + size), train_questions)
    if train_repeats or test_repeats:
        logger.warning("reasoning_gym:%s: dropped %d repeated training questions and %d test questions "
                       "repeating a training or earlier test question", name, train_repeats, test_repeats)
    if test_size and not test_entries:
        raise ValueError(f"reasoning_gym:{name}: every generated test question is also in train; "
                         "this configuration has too few distinct problems")

    def problems(entries: list[dict]) -> list[dict]:
        return [{"question": e["question"], "answer": encode_entry(e), "reference": str(e["answer"])}
                for e in entries]

    return Task(
        name=f"{REASONING_GYM_PREFIX}{name}",
        train=problems(train_entries),
        test=problems(test_entries),
        verifier=reasoning_gym_verifier(name, {"size": size, "seed": base, **config}),
        instruction=INSTRUCTION,
        metadata={"reasoning_gym": name, "size": size, "test_size": test_size, "seed": seed, "config": config},
    )


def get_task(spec: str, **options) -> Task:
    """The task named by ``spec`` (see the module docstring); ``options`` go to its factory."""
    if spec.startswith(REASONING_GYM_PREFIX):
        name = spec[len(REASONING_GYM_PREFIX):]
        if not name:
            raise ValueError(f"{spec!r} names no reasoning-gym task: use {REASONING_GYM_PREFIX}<name>; "
                             f"{_LIST_NAMES_HINT}")
        return reasoning_gym_task(name, **options)
    if Path(spec).suffix.lower() in EXTENSIONS or (spec not in BUILTIN_TASKS and Path(spec).is_file()):
        # (a file with another extension: dataset_task says which extensions are accepted)
        return _call_checked(dataset_task, f"dataset task {spec!r}", spec, **options)
    if spec in BUILTIN_TASKS:
        return _call_checked(_resolve_builtin(spec), f"built-in task {spec!r}", **options)
    close = difflib.get_close_matches(spec, list(BUILTIN_TASKS), n=3)
    hint = f" Did you mean {close}?" if close else ""
    raise ValueError(f"unknown task {spec!r}; accepted: {_accepted(sorted(BUILTIN_TASKS))}.{hint}")
