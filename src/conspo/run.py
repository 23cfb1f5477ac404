"""The main job: train a causal LM with ConSPO or a baseline on a verifiable task, end to end.

``conspo train`` with no arguments runs the embedded default on a CPU: the procedural arithmetic task,
a tiny Qwen2 model warm-started on it (cached), ConSPO training, held-out accuracy before, during and
after, ``metrics.jsonl``, ``curves.png`` and a ``final/`` checkpoint that ``transformers`` loads.

From Python::

    from conspo.run import train
    summary = train(method="conspo", task="arithmetic", output_dir="runs/demo", max_steps=60)
    print(summary["heldout_before"], "->", summary["heldout_after"])

Settings are resolved in one place (:func:`plan_run`) before anything is written or loaded: conspo's defaults <
the method's preset < the ``config`` YAML < the arguments given (on the command line: the flags given explicitly).
A preset's defining fields (``conspo.presets.DEFINING_FIELDS``) cannot be changed under its name. Everything that
decides the run is recorded in ``run.json`` with a hash; ``--resume`` refuses a run recorded with other settings.

Why this file is long: it still holds four jobs that belong apart: the plan (config values, precedence, the run
record), the output directory (lock, refusals, ``--overwrite``), the validation-chosen ``best/`` with the callbacks,
and the job itself with ``conspo train``'s entry point. Signals (:mod:`conspo.stopping`), processes
(:mod:`conspo.ranks`), the console (:mod:`conspo.console`), hub checks (:mod:`conspo.hub`) and checkpoints
(:mod:`conspo.checkpoints`) already live apart; the output directory is the next to move.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import os
import random
import shutil
import signal
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conspo import ranks
from conspo.checkpoints import (
    SaveError,
    align_save_steps,
    checkpoint_step,
    drop_evaluation_records,
    generation_period,
    guard_checkpoint_saves,
    last_complete_checkpoint,
    prepare_resume,
    restore_finished,
    save_error,
    whole_run_loss,
    write_atomic,
)
from conspo.console import console_callback, quiet_internal_warnings
from conspo.console import install as install_console
from conspo.presets import DEFAULT_TASK
from conspo.ranks import say
from conspo.stopping import EXIT_CODES, GracefulStop, Interrupted, StopNow, resume_command, stop_callback

logger = logging.getLogger("conspo.run")

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
BEST_DIR = "best"
BEST_RECORD = "best.json"
LOCK_FILE = ".conspo.lock"
RUN_FORMAT = "conspo-run/2"

REWARD_TIMEOUT_S = 10.0
"""Wall-clock bound on one verifier call inside the reward function (a hanging verifier scores 0, logged)."""

# Settings for a real pretrained model when neither the YAML config nor the command line says otherwise.
PRETRAINED_DEFAULTS = dict(
    learning_rate=1e-6, num_generations=8, per_device_train_batch_size=8, temperature=0.6, max_steps=100,
)
PRETRAINED_LORA_LEARNING_RATE = 1e-5
"""The learning rate of a pretrained model trained with ``--lora`` (adapters start at zero and need a larger one)."""
SHOWN_PRETRAINED = ("learning_rate", "temperature", "max_steps", "num_generations", "per_device_train_batch_size",
                    "max_completion_length", "save_steps")
"""The settings of a pretrained-model run said at its start, with where each came from."""

# Settings conspo gives every run unless the YAML or the command line says otherwise (with these, computed per run:
# max_completion_length from the task, save_steps from max_steps (default_save_steps), use_cpu and bf16 from the
# hardware).
FIXED_DEFAULTS = dict(logging_steps=1, save_strategy="steps", save_total_limit=2, report_to="none",
                      disable_tqdm=False, dump_batch_step=1)
COMPUTED_DEFAULTS = {
    "max_completion_length": "the task's completion budget",
    "save_steps": "max_steps // 10, at least 10 and at most max_steps, rounded up to whole generation batches",
    "use_cpu": "true without a GPU",
    "bf16": "true on a GPU that supports it",
}

# Config fields that do not change what a run computes (logging, checkpoint cadence, where reports go, the hub):
# they are left out of the run's hash, so a --resume may change them. Everything else must match.
NEUTRAL_FIELDS = frozenset({
    "output_dir", "run_name", "project", "report_to", "disable_tqdm", "logging_strategy", "logging_steps",
    "logging_first_step", "logging_nan_inf_filter", "log_level", "log_level_replica", "log_on_each_node",
    "include_num_input_tokens_seen", "skip_memory_metrics", "save_strategy", "save_steps", "save_total_limit",
    "save_on_each_node", "enable_jit_checkpoint", "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id",
    "hub_strategy", "hub_always_push", "hub_revision", "trackio_space_id", "trackio_bucket_id",
    "trackio_static_space_id", "resume_from_checkpoint", "dump_batch_step", "log_completions", "log_multimodal",
    "num_completions_to_print", "log_unique_prompts", "log_completions_hub_repo", "local_rank",
    "dataloader_num_workers", "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_pin_memory",
})
# Config fields that must be positive integers (None allowed for OPTIONAL_FIELDS), checked before the config is
# built: 0 there divides by zero inside transformers or TRL instead of naming the field.
POSITIVE_INT_FIELDS = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_generations",
                       "num_iterations", "logging_steps", "max_completion_length", "steps_per_generation",
                       "generation_batch_size")
OPTIONAL_FIELDS = ("steps_per_generation", "generation_batch_size")
# Config fields that are also options of the job (given as arguments of train / flags of conspo train).
JOB_FIELDS = ("output_dir", "seed", "max_steps", "report_to")

VAL_SPLIT_SEED = 0
"""The validation split (``val_size``) is drawn with this seed, whatever the run's seed: every method and seed
of a comparison is chosen on the same validation problems."""
SELECTION_RULE = ("checkpoint chosen on a validation split of {n} train problems, never on the test problems; "
                  "the ConSPO paper picked checkpoints on its test benchmarks")


SAVE_STEPS_FLOOR = 10


def default_save_steps(max_steps: int) -> int:
    """Optimizer steps between checkpoints when nothing says otherwise: about ten checkpoints a run, never more
    often than every :data:`SAVE_STEPS_FLOOR` steps (a full fine-tuning checkpoint of a 1B model is several GB),
    and at least one, at the end (a Ctrl-C or SIGTERM saves one where it stops, whatever this says)."""
    return max(1, min(max_steps, max(SAVE_STEPS_FLOOR, max_steps // 10)))


def _warm_start_val_size() -> int:
    try:
        from conspo.embedded import WarmStartConfig
    except ImportError:  # (before the embedded model had its own module)
        from conspo.tasks.tiny_model import WarmStartConfig
    return WarmStartConfig().val_size


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class RunError(ValueError):
    """A problem found before any long work started; the message names it and what is accepted."""


# ----------------------------------------------------------------------------------------------- config values


def _config_types() -> dict[str, Any]:
    from conspo.trainer import ConSPOConfig

    return typing.get_type_hints(ConSPOConfig)


def _members(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def coerce_field(name: str, value: Any, hint: Any, source: str) -> Any:
    """``value`` of config field ``name`` as its declared type: YAML 1.1 reads ``1e-5`` as a string and the
    command-line parser reads a ``float | str`` field (``tau``) as a string; a number written as text becomes the
    number, anything else that the field's type cannot hold is refused here, naming the field."""
    members = _members(hint)
    if not isinstance(value, str) or value.strip() == "":
        return value
    if float in members or int in members:
        try:
            number = float(value)
        except ValueError:
            if str in members:
                return value  # tau: 'auto'
            kind = "a number" if float in members else "an integer"
            raise RunError(f"{source}: {name} must be {kind}, got {value!r}") from None
        if float in members:
            return number
        if number != int(number):
            raise RunError(f"{source}: {name} must be an integer, got {value!r}")
        return int(number)
    if bool in members and str not in members:
        lowered = value.strip().lower()
        if lowered in ("true", "yes", "1"):
            return True
        if lowered in ("false", "no", "0"):
            return False
        raise RunError(f"{source}: {name} must be true or false, got {value!r}")
    return value


def check_fields(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Known ConSPOConfig / GRPOConfig fields only, each coerced to its declared type."""
    hints = _config_types()
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise RunError(f"{source}: unknown fields {unknown}; fields are those of ConSPOConfig / GRPOConfig "
                       f"(conspo train --help lists them)")
    if "resume_from_checkpoint" in values and values["resume_from_checkpoint"] not in (None, False):
        raise RunError(f"{source}: resume_from_checkpoint is not read by conspo; pass --resume (resume=True) to "
                       f"continue the run in --output-dir from its newest complete checkpoint")
    return {k: coerce_field(k, v, hints[k], source) for k, v in values.items()}


# ----------------------------------------------------------------------------------------------- inputs


def load_yaml_config(path: str | Path | None) -> dict[str, Any]:
    """TRL-style YAML: a flat mapping of ConSPOConfig / GRPOConfig field names to values."""
    if path is None:
        return {}
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RunError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RunError(f"--config {path}: not valid YAML ({' '.join(str(err).split())})") from err
    except UnicodeDecodeError as err:
        raise RunError(f"--config {path}: not UTF-8 text ({err.reason})") from err
    if not isinstance(data, dict):
        raise RunError(f"--config {path}: expected a mapping of config fields to values, got {type(data).__name__}")
    return check_fields(data, f"--config {path}")


def resolve_task(task: str | None, dataset: str | None, *, seed: int, question_field=None, answer_field=None,
                 options: dict | None = None):
    """The task of a run; ``options`` go to a built-in task's factory (``difficulty``, ``n_train``, ``n_test``)."""
    from conspo.tasks.registry import get_task

    if dataset is not None:
        if not Path(dataset).is_file():
            raise RunError(f"--dataset {dataset}: no such file (accepted: .jsonl, .json, .parquet)")
        return get_task(dataset, question_field=question_field, answer_field=answer_field, seed=seed)
    return get_task(task or DEFAULT_TASK, **(options or {}))


def embedded_settings(model: str | None, scale: str | None, warm_start: dict | None,
                      warm_start_seconds: float | None) -> dict:
    """The embedded model's shape and warm start when they differ from the default (``{}``: the default):
    ``{"scale": name, "warm_start": {WarmStartConfig fields}}``, checked; refused with ``--model``."""
    given = {k: v for k, v in (("scale", scale), ("warm_start", warm_start)) if v}
    if warm_start_seconds is not None:
        given["warm_start"] = {**given.get("warm_start", {}), "max_seconds": warm_start_seconds}
    if not given:
        return {}
    if model is not None:
        raise RunError("--embedded-scale / --warm-start-seconds set up the embedded model; with --model there is none")
    from conspo.embedded import SCALES, WarmStartConfig

    if "scale" in given and given["scale"] not in SCALES:
        raise RunError(f"--embedded-scale must be one of {list(SCALES)}, got {given['scale']!r}")
    try:
        WarmStartConfig(**given.get("warm_start", {}))
    except (TypeError, ValueError) as err:
        raise RunError(f"warm start: {err}") from None
    return given


def check_model(model: str | None, gguf_file: str | None = None) -> None:
    """:func:`conspo.loading.check_model`, its error as a :class:`RunError`."""
    from conspo.loading import LoadError
    from conspo.loading import check_model as check

    try:
        check(model, gguf_file)
    except LoadError as err:
        raise RunError(str(err)) from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """A JSON value for the run record (enums by value, anything else JSON cannot hold as text)."""
    return json.loads(json.dumps(value, default=lambda v: getattr(v, "value", str(v))))


def validation_split(problems: list[dict], size: int, *, test: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(train, val)``: ``size`` train problems drawn with :data:`VAL_SPLIT_SEED` for validation, the rest for
    training. A problem whose question is also a test question never enters the validation split."""
    test_questions = {p["question"] for p in test}
    candidates = [i for i, p in enumerate(problems) if p["question"] not in test_questions]
    if size > len(candidates) - 1:
        raise RunError(f"--val-size {size}: the task has {len(problems)} train problems, so at most "
                       f"{len(candidates) - 1} can be set aside for validation (0: no validation split)")
    chosen = set(random.Random(VAL_SPLIT_SEED).sample(candidates, size))
    return ([p for i, p in enumerate(problems) if i not in chosen], [p for i, p in enumerate(problems) if i in chosen])


# ----------------------------------------------------------------------------------------------- the plan


@dataclass
class RunPlan:
    """Everything a run is, resolved and checked before anything is written or loaded."""

    method: str
    task: Any  # conspo.tasks.base.Task (train problems without the validation split)
    task_label: str
    template: str
    model: str | None
    seed: int
    output_dir: Path
    args: Any  # ConSPOConfig
    settings: dict  # what decides the run; hashed into run.json
    inputs: dict[str, Path]  # role -> path of every file or directory the run reads
    lora: bool = False
    lora_r: int = 16
    eval_limit: int | None = 500
    eval_every: int = 1
    val: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    warm_task: Any = None  # the task before the validation split: the embedded model's warm start is made on it
    gguf_file: str | None = None  # with model: the GGUF file in it (conspo.loading)
    embedded: dict = field(default_factory=dict)  # without model: the embedded model's scale and warm start

    @property
    def config_hash(self) -> str:
        return settings_hash(self.settings)

    @property
    def max_steps(self) -> int:
        return self.args.max_steps

    def record(self) -> dict:
        """The content of ``run.json``."""
        return {"written_by": "conspo", "format": RUN_FORMAT, "method": self.method, "task": self.task_label,
                "model": self.settings["model"], "seed": self.seed, "max_steps": self.max_steps,
                "config_hash": self.config_hash, "settings": self.settings}


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def plan_run(
    *,
    method: str = "conspo",
    task: str | None = None,
    dataset: str | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
    template: str | None = None,
    model: str | None = None,
    config: str | Path | dict | None = None,
    output_dir: str | Path | None = None,
    seed: int | None = None,
    max_steps: int | None = None,
    report_to: str | None = None,
    lora: bool = False,
    lora_r: int = 16,
    eval_limit: int | None = 500,
    eval_every: int | None = None,
    val_size: int = 0,
    gguf_file: str | None = None,
    difficulty: str | None = None,
    task_options: dict | None = None,
    embedded_scale: str | None = None,
    warm_start: dict | None = None,
    warm_start_seconds: float | None = None,
    **overrides: Any,
) -> RunPlan:
    """Resolve and check every setting of a run; writes nothing and loads no model.

    Precedence, lowest first: conspo's defaults (the embedded model's or a pretrained model's), the method's
    preset, ``config`` (YAML path or dict of ConSPOConfig fields), then the arguments given here (``seed``,
    ``max_steps``, ``report_to``, ``output_dir`` and ``overrides``, config fields). ``None`` means not given.
    """
    from conspo.presets import ALL_METHODS, PRESETS

    if method not in ALL_METHODS:
        raise RunError(f"unknown method {method!r}; accepted values: {', '.join(ALL_METHODS)}")
    template = template or "plain"
    if template not in ("plain", "chat"):
        raise RunError(f"template must be 'plain' or 'chat', got {template!r}")
    for name, value, low in (("--max-steps", max_steps, 1), ("--eval-limit", eval_limit, 1),
                             ("--eval-every", eval_every, 0), ("--val-size", val_size, 0), ("--lora-r", lora_r, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise RunError(f"{name} must be an integer >= {low}, got {value!r}")
    if config is None or isinstance(config, dict):
        yaml_fields = check_fields(dict(config or {}), "config")
        yaml_path = None
    else:
        yaml_fields, yaml_path = load_yaml_config(config), Path(config)
    given = check_fields(overrides, "config field")
    job = {"seed": seed, "max_steps": max_steps, "report_to": report_to, "output_dir": output_dir}
    for name in JOB_FIELDS:  # the command line (an argument given) wins over the YAML, the YAML over the default
        if job[name] is None and name in yaml_fields:
            job[name] = yaml_fields[name]
    seed = 0 if job["seed"] is None else job["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise RunError(f"seed must be an integer, got {seed!r}")
    if job["max_steps"] is not None and (not isinstance(job["max_steps"], int) or job["max_steps"] < 1):
        raise RunError(f"max_steps must be an integer >= 1, got {job['max_steps']!r}")

    check_model(model, gguf_file)
    if gguf_file is None:
        from conspo.hub import HubError, check_hub_model

        try:
            check_hub_model(model)  # a hub id that cannot be fetched: one line now, not a traceback after 25-71 s
        except HubError as err:
            raise RunError(str(err)) from None
    embedded = embedded_settings(model, embedded_scale, warm_start, warm_start_seconds)
    task_options = {**(task_options or {}), **({"difficulty": difficulty} if difficulty else {})}
    if task_options and dataset is not None:
        raise RunError("--difficulty and task options apply to a built-in task (--task), not to --dataset")
    from conspo.tasks.datasets import DatasetError

    try:
        task_obj = resolve_task(task, dataset, seed=seed, question_field=question_field, answer_field=answer_field,
                                options=task_options)
    except (RunError, DatasetError):
        raise
    except ValueError as err:  # get_task: an unknown task, a bad option
        raise RunError(" ".join(str(err).split())) from err
    warm_task = task_obj
    if not task_obj.train:
        raise RunError(f"task {task_obj.name!r} has no training problems")
    val: list[dict] = []
    if val_size:
        train_problems, val = validation_split(task_obj.train, val_size, test=task_obj.test)
        import dataclasses

        task_obj = dataclasses.replace(task_obj, train=train_problems)
    task_label = dataset or task or DEFAULT_TASK
    out = Path(job["output_dir"] or f"runs/{method}-{Path(task_label).stem.replace(':', '-')}-seed{seed}")

    import torch

    on_gpu = torch.cuda.is_available()
    if model is None:
        from conspo.presets import DEFAULT_RL

        defaults = dict(DEFAULT_RL)
    else:
        defaults = dict(PRETRAINED_DEFAULTS)
        if lora:
            defaults["learning_rate"] = PRETRAINED_LORA_LEARNING_RATE
    preset = PRESETS[method]
    settings: dict[str, Any] = {k: v for k, v in defaults.items() if k not in preset}  # the preset wins over these
    settings.update(FIXED_DEFAULTS)
    settings.update({
        "max_completion_length": task_obj.max_completion_length,
        "use_cpu": not on_gpu,
        "bf16": bool(on_gpu and torch.cuda.is_bf16_supported()),
    })
    settings.update(yaml_fields)
    settings.update(given)
    settings.update({k: v for k, v in job.items() if v is not None})
    settings["seed"] = seed
    settings["output_dir"] = str(out)
    settings.setdefault("save_steps", default_save_steps(settings["max_steps"]))

    def source(name: str) -> str:
        if name in given or job.get(name) is not None and name not in yaml_fields:
            return "the command line"
        if name in yaml_fields:
            return f"--config {yaml_path}" if yaml_path is not None else "config"
        return "conspo's default"

    for name in POSITIVE_INT_FIELDS:
        if name not in settings:  # the dataclass's default
            continue
        value = settings[name]
        if value is None and name in OPTIONAL_FIELDS:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RunError(f"{name} must be an integer >= 1, got {value!r} (from {source(name)})")
    save_steps = settings["save_steps"]
    if str(settings.get("save_strategy")) == "steps" and (
            isinstance(save_steps, bool) or not isinstance(save_steps, (int, float)) or save_steps <= 0
            or (not float(save_steps).is_integer() and save_steps >= 1)):
        raise RunError(f"save_steps must be an integer >= 1 (optimizer steps) or a fraction of max_steps in (0, 1), "
                       f"got {save_steps!r} (from {source('save_steps')})")
    from conspo.presets import preset_config

    try:
        args = preset_config(method, **settings)
    except (ValueError, TypeError) as err:  # a defining field changed, a value out of range, a wrong type
        raise RunError(" ".join(str(err).split())) from err
    notes = []
    note = align_save_steps(args)
    if note:
        notes.append(note)
    every = eval_every if eval_every is not None else max(1, args.max_steps // 6)
    if model is not None:
        shown = ", ".join(f"{name} {getattr(args, name)} ({source(name)})" for name in SHOWN_PRETRAINED)
        notes.append(f"settings for a pretrained model: {shown}; LoRA "
                     f"{f'r={lora_r}' if lora else 'off (full fine-tuning; --lora trains adapters)'}")

    inputs: dict[str, Path] = {}
    if dataset is not None:
        inputs["--dataset"] = Path(dataset)
    elif task is not None and Path(task).is_file():
        inputs["--task"] = Path(task)
    if yaml_path is not None:
        inputs["--config"] = yaml_path
    if model is not None and Path(model).expanduser().exists():
        inputs["--model"] = Path(model).expanduser()
    resolved = {k: v for k, v in _plain(args.to_dict()).items() if k not in NEUTRAL_FIELDS and k not in JOB_FIELDS}
    record = {
        "method": method,
        "task": task_label,
        "data": {role: {"path": str(p.resolve()), "sha256": _sha256(p)} for role, p in inputs.items()
                 if role in ("--dataset", "--task")},
        "question_field": question_field,
        "answer_field": answer_field,
        "template": template,
        "model": (f"embedded-{embedded.get('scale', 'tiny')}" if model is None
                  else str(inputs["--model"].resolve()) if "--model" in inputs else model),
        **({"gguf_file": gguf_file} if gguf_file else {}),  # (absent otherwise: older runs keep their hash)
        **({"task_options": task_options} if task_options else {}),
        **({"embedded": embedded} if embedded else {}),
        "lora_r": lora_r if lora else None,
        "seed": seed,
        "max_steps": args.max_steps,
        "eval_limit": eval_limit,
        "eval_every": every,
        "val_size": val_size,
        "config": resolved,
    }
    return RunPlan(method=method, task=task_obj, task_label=task_label, template=template, model=model, seed=seed,
                   output_dir=out, args=args, settings=record, inputs=inputs, lora=lora, lora_r=lora_r,
                   eval_limit=eval_limit, eval_every=every, val=val, notes=notes, warm_task=warm_task,
                   gguf_file=gguf_file, embedded=embedded)


# ----------------------------------------------------------------------------------------------- the output dir


class RunLock:
    """An exclusive lock on ``<output_dir>/.conspo.lock`` held for a run's lifetime (``fcntl.flock``): a second
    process writing the same directory is refused with the holder's PID. The kernel releases the lock when its
    holder dies, however it dies, so a lock is never stale. Under torchrun / accelerate only the main process
    (``RANK`` 0) takes it."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self.handle = None

    def acquire(self) -> None:
        if int(os.environ.get("RANK", "0")) != 0:
            return
        import fcntl

        self.output_dir.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunError(f"--output-dir {self.output_dir} is being written by another conspo process (PID "
                           f"{holder}); wait for it to end or stop it, or choose another --output-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            import fcntl

            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def _entries(output_dir: Path) -> list[Path]:
    """What a directory holds, its conspo lock file aside."""
    return [p for p in output_dir.iterdir() if p.name != LOCK_FILE] if output_dir.is_dir() else []


def read_run_record(output_dir: Path) -> dict | None:
    """The ``run.json`` conspo wrote in ``output_dir``, or None when there is none (or it is not conspo's)."""
    path = Path(output_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    if record.get("written_by") == "conspo" or {"method", "task", "model", "seed"} <= set(record):
        return record  # (the second: run.json of conspo before it recorded its settings)
    return None


def _flat(settings: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and key in ("config", "data"):
            flat.update(_flat(value, "" if key == "config" else f"{key}."))
        else:
            flat[prefix + key] = value
    return flat


def settings_diff(previous: dict, plan: RunPlan) -> dict[str, tuple]:
    """``{field: (saved, now)}`` for every setting that differs between a recorded run and ``plan``."""
    if "settings" not in previous:  # recorded before conspo kept its settings: compare what it kept
        now = {"method": plan.method, "task": plan.task_label, "model": plan.model or "embedded-tiny",
               "seed": plan.seed}
        return {k: (previous.get(k), v) for k, v in now.items() if previous.get(k) != v}
    saved, now = _flat(previous["settings"]), _flat(plan.settings)
    return {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}


def _describe(differs: dict[str, tuple], limit: int = 8) -> str:
    items = [f"{k} (saved {a!r}, now {b!r})" for k, (a, b) in list(differs.items())[:limit]]
    more = f" and {len(differs) - limit} more" if len(differs) > limit else ""
    return "; ".join(items) + more


def overwrite_problem(plan: RunPlan) -> str | None:
    """Why ``--overwrite`` may not delete the plan's output directory (None when it may)."""
    out = plan.output_dir.resolve()
    cwd = Path.cwd().resolve()
    if out == cwd:
        return "it is the working directory"
    if out in cwd.parents:
        return f"it holds the working directory {cwd}"
    if out == Path(out.anchor) or out == Path.home().resolve():
        return "it is the root or home directory"
    for role, path in plan.inputs.items():
        resolved = path.resolve()
        if resolved == out or out in resolved.parents:
            return f"it holds {role} {path}, an input of this run"
    return None


def _status(record: dict, output_dir: Path) -> str:
    if (output_dir / SUMMARY_FILE).is_file():
        return "finished"
    return "unfinished"


def check_output_dir(plan: RunPlan, *, resume: bool, overwrite: bool) -> str:
    """What to do with the plan's output directory: ``"new"``, ``"resume"``, ``"finished"`` (a ``--resume`` of a
    run that already ended) or ``"replace"`` (``--overwrite`` of a conspo run). Raises :class:`RunError` for
    everything else; touches nothing."""
    out = plan.output_dir
    if resume and overwrite:
        raise RunError("--resume and --overwrite together: --resume continues the run in --output-dir, --overwrite "
                       "deletes it and starts again; pass one of them")
    if out.exists() and not out.is_dir():
        raise RunError(f"--output-dir {out} is a file; name a directory (new, empty, or one of conspo's runs)")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunError(f"--output-dir {out}: {existing} is a file, so the directory cannot be made there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunError(f"--output-dir {out}: {existing} is not writable; choose a directory you can write to")
    occupied = bool(_entries(out))
    previous = read_run_record(out) if occupied else None
    if occupied and previous is None:
        raise RunError(f"--output-dir {out} is not empty and holds no conspo run (no {RUN_FILE} written by conspo); "
                       f"conspo writes only into a new or empty directory or one of its own runs, and never deletes "
                       f"other files: choose another --output-dir")
    if overwrite:
        problem = overwrite_problem(plan)
        if problem is not None:
            raise RunError(f"--overwrite would delete --output-dir {out}, but {problem}; conspo never deletes that: "
                           f"choose another --output-dir")
        return "replace" if occupied else "new"
    if not occupied:
        return "new"
    if not resume:
        ways = "pass --resume to continue it" + (", --overwrite to delete it and start again"
                                                  if overwrite_problem(plan) is None else "")
        raise RunError(f"--output-dir {out} holds a run ({previous.get('method')} on {previous.get('task')}, seed "
                       f"{previous.get('seed')}, {_status(previous, out)}); {ways}, or choose another --output-dir")
    differs = settings_diff(previous, plan)
    if differs:
        steps = ""
        if "max_steps" in differs:
            saved, now = differs["max_steps"]
            steps = (f" A resume continues the same run and never changes its length (the learning-rate and margin "
                     f"schedules depend on it): the run in {out} is a {saved}-step run, so --max-steps {now} is "
                     f"refused, not applied.")
        raise RunError(f"--resume: {out} holds a run with other settings: {_describe(differs)}.{steps} Resume with "
                       f"the recorded settings, or train these settings into another --output-dir")
    if "settings" not in previous:
        logger.warning("%s was recorded by an older conspo without its settings; only method, task, model and "
                       "seed were checked for --resume", out / RUN_FILE)
    return "finished" if (out / SUMMARY_FILE).is_file() else "resume"


def prepare_output_dir(plan: RunPlan, action: str) -> None:
    """Carry out :func:`check_output_dir`'s decision and record the run in ``run.json``."""
    out = plan.output_dir
    if action == "replace":
        print(f"[conspo] --overwrite: deleting the run in {out}")
        for entry in _entries(out):  # the lock file stays: this process holds it
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / RUN_FILE, json.dumps(plan.record(), indent=2))


# ----------------------------------------------------------------------------------------------- evaluation


class BestCheckpoint:
    """The checkpoint with the best validation accuracy so far, in ``<output_dir>/best/`` (a model directory
    ``AutoModelForCausalLM.from_pretrained`` loads, with ``best.json``: its step and validation accuracy).

    A new best replaces ``best/`` through a temporary directory and two renames, so a kill leaves the old or the
    new one. On a resume from checkpoint-N, a ``best/`` saved after step N (by the run that was killed) is removed:
    the resumed run decides again from step N on."""

    def __init__(self, output_dir: Path, evaluate_val, tokenizer, *, main: bool = True):
        self.output_dir = Path(output_dir)
        self.dir = self.output_dir / BEST_DIR
        self.evaluate_val = evaluate_val
        self.tokenizer = tokenizer
        self.main = main
        self.best: tuple[float, int] | None = None  # (validation accuracy, step)

    def restore(self, from_step: int | None) -> None:
        """Start from the best of the steps up to ``from_step`` (None: a run starting from step 0)."""
        if not self.main:
            return
        for leftover in self.output_dir.glob(".best-tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        old = sorted(self.output_dir.glob(".best-old-*"))
        if old and not self.dir.exists():
            os.replace(old[-1], self.dir)  # killed between the two renames: the previous best is the best
        for leftover in self.output_dir.glob(".best-old-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        record = self.dir / BEST_RECORD
        saved = json.loads(record.read_text()) if record.is_file() else None
        if saved is not None and from_step is not None and saved["step"] <= from_step:
            self.best = (saved["val_accuracy"], saved["step"])
        elif self.dir.exists():
            print(f"[conspo] {self.dir} was chosen after the step resumed from; removed (chosen again from there)")
            shutil.rmtree(self.dir)

    def observe(self, model, step: int) -> float:
        """Validation accuracy of ``model`` at ``step``; saved as the best when strictly better than so far."""
        score = self.evaluate_val(model)
        if self.best is None or score > self.best[0]:
            self.best = (score, step)
            if self.main:
                self._save(model, step, score)
        return score

    def _save(self, model, step: int, score: float) -> None:
        tmp = self.output_dir / f".best-tmp-{os.getpid()}"
        old = self.output_dir / f".best-old-{os.getpid()}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            to_save = model
            if hasattr(model, "merge_and_unload"):  # LoRA: a merged copy, the training model keeps its adapters
                to_save = copy.deepcopy(model).merge_and_unload()
            to_save.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (tmp / BEST_RECORD).write_text(json.dumps({"step": step, "val_accuracy": score}) + "\n")
            if self.dir.exists():
                os.replace(self.dir, old)
            os.replace(tmp, self.dir)
            shutil.rmtree(old, ignore_errors=True)
        except Exception as err:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = self.dir if self.dir.exists() else None
            raise save_error(err, self.dir, intact=kept, removed=False) from err


# ----------------------------------------------------------------------------------------------- callbacks


def _callbacks(metrics_path: Path, evaluate, eval_every: int, best: BestCheckpoint | None = None, stop=None,
               console=None):
    from transformers import TrainerCallback

    class MetricsFile(TrainerCallback):
        """Appends every log record, with its optimizer step, to metrics.jsonl (rank 0 only)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                if "train_runtime" in logs and stop is not None and stop.step is not None:
                    return  # stopped on a signal: the resumed run logs the end of training, once
                if "train_loss" in logs:  # transformers averages only the steps since the last resume
                    logs = {**logs, "train_loss": whole_run_loss(state.log_history)}
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    class HeldOut(TrainerCallback):
        """Greedy held-out accuracy every ``eval_every`` optimizer steps, into metrics.jsonl; with a validation
        split, its accuracy too, which alone decides the best checkpoint."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if (eval_every and state.global_step % eval_every == 0 and state.global_step < state.max_steps
                    and state.is_world_process_zero):  # the others go on to the next step's collectives and wait
                record = {"step": state.global_step, "eval/heldout_accuracy": evaluate(model)}
                if console is not None:
                    console.heldout = record["eval/heldout_accuracy"]
                if best is not None:
                    record["eval/val_accuracy"] = best.observe(model, state.global_step)
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")

    return [MetricsFile(), HeldOut()]


# ----------------------------------------------------------------------------------------------- the job


def train(*, resume: bool = False, overwrite: bool = False, strict_rewards: bool = False,
          **options: Any) -> dict[str, Any]:
    """Train, evaluate before and after, save; returns the summary also written to ``summary.json``.

    ``options`` are :func:`plan_run`'s parameters (``method``, ``task``, ``model``, ``config``, ``output_dir``,
    ``seed``, ``max_steps`` ... and config fields); ``inspect.signature(train)`` lists them all. ``config`` is a
    YAML path or a dict of ConSPOConfig fields; ``seed``, ``max_steps``, ``report_to``, ``output_dir`` and config
    fields given here win over it (None: not given). ``val_size`` > 0 sets that many train problems aside as a
    validation split, evaluated with the held-out problems; the checkpoint with the best validation accuracy is
    kept in ``best/`` and its test accuracy reported. ``resume`` continues the run recorded in ``output_dir``,
    ``overwrite`` replaces it, ``strict_rewards`` makes a reward function's failure stop the run.
    Everything is checked (:func:`plan_run`, :func:`check_output_dir`) before anything is written, the warm start
    or the model load begins.
    """
    plan = plan_run(**options)
    main = ranks.is_main()
    made = [p for p in (plan.output_dir, *plan.output_dir.parents) if not p.exists()]  # deepest first
    lock = RunLock(plan.output_dir)
    locked = False
    try:
        decision: str | RunError = "follow"
        if main:  # under torchrun / accelerate the main process decides and holds the lock; the others follow
            try:
                decision = check_output_dir(plan, resume=resume, overwrite=overwrite)
                if decision != "finished":
                    lock.acquire()  # one writer per output directory, for the run's lifetime
                    locked = True
                    # decided again under the lock: another process may have written meanwhile
                    decision = check_output_dir(plan, resume=resume, overwrite=overwrite)
            except RunError as err:
                decision = err
        decision = ranks.from_main(decision)
        if isinstance(decision, RunError):
            raise decision
        action = decision
        if action == "finished":
            summary = json.loads((plan.output_dir / SUMMARY_FILE).read_text())
            say(f"--resume: {plan.output_dir} holds this run, finished ({summary.get('steps')} of "
                f"{plan.max_steps} steps; {SUMMARY_FILE}); nothing to train, nothing rewritten")
            return summary
        return _run(plan, action, resume=resume, strict_rewards=strict_rewards)
    finally:
        lock.release()
        if locked and made and not _entries(plan.output_dir):  # failed before writing anything: leave no directory either
            (plan.output_dir / LOCK_FILE).unlink(missing_ok=True)
            for path in made:
                try:
                    path.rmdir()
                except OSError:
                    break


def _train_signature() -> inspect.Signature:
    """plan_run's keyword parameters (its ``**overrides`` last), with train's own before them."""
    planned = list(inspect.signature(plan_run).parameters.values())
    own = [p for name, p in inspect.signature(train).parameters.items() if name != "options"]
    return inspect.Signature([*planned[:-1], *own, planned[-1]], return_annotation=dict[str, Any])


train.__signature__ = _train_signature()  # one list of settings (plan_run's), shown by help() and IDEs


def _run(plan: RunPlan, action: str, *, resume: bool, strict_rewards: bool) -> dict[str, Any]:
    """The run itself (:func:`train`): the model is loaded before the output directory is prepared, so a model
    that cannot be loaded leaves nothing behind."""
    output_dir, args, task_obj, template = plan.output_dir, plan.args, plan.task, plan.template
    method, model, lora, lora_r = plan.method, plan.model, plan.lora, plan.lora_r

    import torch
    from datasets import Dataset

    from conspo.presets import preset_reward_funcs
    from conspo.prompts import problem_prompt
    from conspo.rewards import make_reward_func
    from conspo.tasks.datasets import question_report
    from conspo.trainer import ConSPOTrainer

    started = time.time()
    from conspo import evaluation, loading

    main = ranks.is_main()
    if model is None:
        held_back = getattr(plan, "embedded", {}).get("warm_start", {}).get("val_size", _warm_start_val_size())
        if len(plan.warm_task.train) <= held_back:
            raise RunError(f"{plan.task_label}: {len(plan.warm_task.train)} train problems, but the embedded tiny "
                           f"model's warm start holds {held_back} of them back to decide when to stop, so it needs "
                           f"more than {held_back}: give a larger file, or pass --model <a pretrained model> (no warm "
                           f"start)")
        say(f"warm start of the embedded tiny model on {task_obj.name} (cached after the first run)")
        if not main:
            ranks.barrier()  # the main process trains (or finds) the cached warm start first
        from conspo.embedded import SCALES, WarmStartConfig

        shape = {"spec": SCALES[plan.embedded["scale"]]} if "scale" in plan.embedded else {}
        if "warm_start" in plan.embedded:
            shape["config"] = WarmStartConfig(**plan.embedded["warm_start"])
        # (the whole train split: its cache key)
        policy, tokenizer = loading.load_embedded(plan.warm_task, seed=0, log=say, **shape)
        if main:
            ranks.barrier()
    else:
        try:
            policy, tokenizer = loading.load_model(model, plan.gguf_file, for_training=True)
        except (OSError, ValueError) as err:
            raise RunError(f"--model {model}: cannot be loaded: {' '.join(str(err).split())}") from err
    # (left where it was loaded: the trainer, through accelerate, places it on each process's device)
    if "--dataset" in plan.inputs and main:
        for line in question_report([*task_obj.train, *task_obj.test], tokenizer,
                                    max_positions=getattr(policy.config, "max_position_embeddings", None),
                                    completion_length=args.max_completion_length, source=plan.task_label,
                                    render=lambda q: problem_prompt({"question": q}, task_obj.instruction, "plain",
                                                                    tokenizer)):
            say(f"warning: {line}")
    if main:
        prepare_output_dir(plan, action)
    ranks.barrier()  # the others wait for run.json and the directory
    for note in plan.notes:
        say(note)

    verifier = make_reward_func(task_obj.verifier, name="correct", strict=strict_rewards, timeout_s=REWARD_TIMEOUT_S)
    reward_funcs = [verifier, *preset_reward_funcs(method, args, overlong_after=task_obj.overlong_after)]
    if len(reward_funcs) > 1 and args.correctness_reward is None:
        args.correctness_reward = "correct"  # correctness comes from the verifier, not the length penalty
    # TRL tokenises this "prompt" itself; conspo.prompts reproduces how, for the warm start and evaluation.
    rows = [{"prompt": problem_prompt(p, task_obj.instruction, template, tokenizer), "answer": p["answer"]}
            for p in task_obj.train]
    train_set = Dataset.from_list(rows)

    # Greedy, up to the run's completion budget (not the task's), with a progress bar on the main process.
    shown = int(os.environ.get("RANK", "0")) == 0

    def evaluate(m) -> float:
        return evaluation.heldout_accuracy(m, tokenizer, task_obj, template=template, limit=plan.eval_limit,
                                           max_new_tokens=args.max_completion_length, progress=shown)

    def evaluate_val(m) -> float:
        return evaluation.heldout_accuracy(m, tokenizer, task_obj, template=template, problems=plan.val,
                                           max_new_tokens=args.max_completion_length, progress=shown,
                                           desc="validation accuracy")

    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear", task_type="CAUSAL_LM")

    metrics_path = output_dir / METRICS_FILE
    # The newest *complete* checkpoint (a crash may cut a save short); metrics.jsonl is cut back to it.
    checkpoint = None
    if resume:  # the main process picks (and cleans up); every process loads the one it picked
        checkpoint = prepare_resume(output_dir, metrics_path, expect_optimizer=not args.save_only_model) if main \
            else None
        checkpoint = ranks.from_main(checkpoint)
    if resume and checkpoint is None:
        say(f"--resume: no checkpoint in {output_dir} yet, starting from the beginning")
    elif checkpoint is not None:
        say(f"--resume: continuing from {checkpoint} (of {args.max_steps} steps)")

    stop = GracefulStop(main=main)
    console = console_callback(num_generations=args.num_generations, main=main)
    best = None
    if plan.val:
        best = BestCheckpoint(output_dir, evaluate_val, tokenizer, main=main)
        best.restore(None if checkpoint is None else checkpoint_step(checkpoint))
    callbacks = _callbacks(metrics_path, evaluate, plan.eval_every, best, stop, console)
    trainer = ConSPOTrainer(model=policy, reward_funcs=reward_funcs, args=args, train_dataset=train_set,
                            processing_class=tokenizer, peft_config=peft_config,
                            callbacks=[*callbacks, stop_callback(stop, generation_period(args))])
    guard_checkpoint_saves(trainer)  # disk full while saving: a clear error, the previous checkpoint intact
    install_console(trainer, console)  # one progress bar; TRL's per-step dict stays in metrics.jsonl
    if args.log_completions and args.report_to in ([], ["none"], "none", None) \
            and args.log_completions_hub_repo is None:
        trainer.log_completions = False  # conspo prints them as lines; TRL's table has no other reader here
    policy = trainer.model  # placed by the trainer (accelerate) on this process's device
    before = None
    if main:  # held-out evaluations run on the main process; the others wait for it in the next collective
        before = evaluate(policy)
        console.heldout = before
        if checkpoint is None:
            record = {"step": 0, "eval/heldout_accuracy": before}
            if best is not None:
                record["eval/val_accuracy"] = best.observe(policy, 0)
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
        say(f"held-out accuracy before training: {before:.1%} ({len(task_obj.test[:plan.eval_limit])} problems)")
    if checkpoint is not None and checkpoint_step(checkpoint) >= args.max_steps:
        restore_finished(trainer, checkpoint)  # killed after the last step: transformers would take one more
    else:
        with stop:  # SIGINT / SIGTERM: finish the step, save a checkpoint, stop (conspo.stopping)
            trainer.train(resume_from_checkpoint=None if checkpoint is None else str(checkpoint))
    if stop.step is not None:
        name = signal_name(stop.signum or stop.agreed())
        raise Interrupted(f"stopped by {name} after step {stop.step} of {args.max_steps}: "
                          f"{output_dir / f'checkpoint-{stop.step}'} saved (complete); continue with: "
                          f"{resume_command(COMMAND_ARGV)}", stop.agreed())

    trained = trainer.model
    if lora:
        trained = trained.merge_and_unload()
    if not main:  # the main process evaluates and writes final/, the plots and summary.json
        ranks.barrier()
        return json.loads((output_dir / SUMMARY_FILE).read_text())
    after = evaluate(trained)
    final_record = {"step": trainer.state.global_step, "eval/heldout_accuracy": after}
    if best is not None:
        final_record["eval/val_accuracy"] = best.observe(trained, trainer.state.global_step)
    if main:
        if checkpoint is not None:  # killed after the final evaluation: its record is there once already
            drop_evaluation_records(metrics_path, trainer.state.global_step)
        with metrics_path.open("a") as fh:
            fh.write(json.dumps(final_record) + "\n")
    final_dir = output_dir / "final"
    try:
        trained.save_pretrained(final_dir)
        tokenizer.save_pretrained(final_dir)
        torch.save(args, final_dir / "training_args.bin")  # the effective config, as Trainer.save_model writes it
    except Exception as err:
        last = last_complete_checkpoint(output_dir, expect_optimizer=not args.save_only_model,
                                        remove_incomplete=False)
        raise save_error(err, final_dir, intact=last, removed=False) from err

    selection = None
    if best is not None:
        val_best, best_step = best.best
        if best_step == trainer.state.global_step:
            test_best = after
        else:
            from transformers import AutoModelForCausalLM

            chosen = AutoModelForCausalLM.from_pretrained(output_dir / BEST_DIR, dtype=torch.float32)
            test_best = evaluate(chosen.to(next(trained.parameters()).device))
            del chosen
        selection = {"rule": SELECTION_RULE.format(n=len(plan.val)), "val_problems": len(plan.val),
                     "best_step": best_step, "val_accuracy": val_best, "heldout_accuracy": test_best,
                     "checkpoint": str(output_dir / BEST_DIR)}

    from conspo.plots import plot_learning_curves, read_metrics

    curves = plot_learning_curves({method: read_metrics(metrics_path)}, output_dir / "curves.png",
                                  title=f"{method} on {task_obj.name}")
    summary = {
        "method": method, "task": plan.task_label, "model": plan.settings["model"], "seed": plan.seed,
        "config_hash": plan.config_hash,
        "max_steps": args.max_steps,
        "rollouts_per_step": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "world_size": args.world_size,
        "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length,
        "heldout_before": before,
        "heldout_after": after,
        "heldout_problems": len(task_obj.test[:plan.eval_limit] if plan.eval_limit else task_obj.test),
        "steps": trainer.state.global_step,
        "wall_seconds": round(time.time() - started, 1),
        "final_checkpoint": str(final_dir),
        "metrics": str(metrics_path),
        "curves": str(curves),
    }
    if selection is not None:
        summary["selection"] = selection
    write_atomic(output_dir / SUMMARY_FILE, json.dumps(summary, indent=2))  # marks the run finished
    ranks.barrier()  # the others return now
    say(f"metrics: {metrics_path}\n[conspo] curves:  {curves}\n[conspo] model:   {final_dir} "
        f"(AutoModelForCausalLM.from_pretrained)")
    say(f"{method} on {task_obj.name}: held-out accuracy {before:.1%} -> {after:.1%} "
        f"({(after - before) * 100:+.1f} points) in {summary['steps']} steps, {summary['wall_seconds']:.0f} s")
    if selection is not None:
        say(f"best checkpoint: step {selection['best_step']} (validation {selection['val_accuracy']:.1%}), "
              f"held-out accuracy {selection['heldout_accuracy']:.1%}, in {output_dir / BEST_DIR}; "
              f"{selection['rule']}")
    return summary


# ----------------------------------------------------------------------------------------------- command line

# conspo train's options that are not config fields, with the train() argument each becomes.
SCRIPT_OPTIONS = ("method", "task", "dataset", "question_field", "answer_field", "template", "model", "config",
                  "output_dir", "seed", "max_steps", "resume", "overwrite", "report_to", "lora", "lora_r",
                  "eval_limit", "eval_every", "val_size", "gguf_file", "difficulty", "embedded_scale",
                  "warm_start_seconds")


def split_namespace(ns, explicit: set[str], own: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """``(script options, config fields)`` of a parsed ``conspo train`` / ``compare`` namespace: every script
    option with its value, and only the config fields given explicitly on the command line (so that a flag
    wins over the YAML and an absent flag leaves the YAML's value). ``own``: the command's other options."""
    values = vars(ns)
    script = {k: values[k] for k in SCRIPT_OPTIONS if k in values}
    config_fields = {k: values[k] for k in explicit if k not in SCRIPT_OPTIONS and k not in own
                     and not k.startswith("_") and k in values}
    return script, config_fields


def report_error(command: str, err: BaseException) -> None:
    """One line on stderr; the traceback too with ``CONSPO_DEBUG=1``."""
    if os.environ.get("CONSPO_DEBUG"):
        import traceback

        traceback.print_exception(err)
    print(f"conspo {command}: error: {' '.join(str(err).split())}", file=sys.stderr)


COMMAND_ARGV: list[str] | None = None
"""The arguments after ``conspo`` of the running ``conspo train`` (None from Python): the ``--resume`` command
printed after a signal repeats them."""


def _stop_now(signum, frame):
    raise StopNow(signum)


def train_command(ns) -> int:
    """``conspo train``: the argparse namespace of ``conspo.cli`` (``ns._explicit``: the flags given)."""
    global COMMAND_ARGV
    logging.basicConfig(level=os.environ.get("CONSPO_LOG_LEVEL", "WARNING"))
    from conspo.tasks.datasets import DatasetError

    COMMAND_ARGV = getattr(ns, "_argv", None)
    main = ranks.is_main()
    quiet_internal_warnings(getattr(ns, "_explicit", set()))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" at each checkpoint
    script, config_fields = split_namespace(ns, getattr(ns, "_explicit", set()))
    previous = signal.signal(signal.SIGTERM, _stop_now)  # outside training a SIGTERM stops at once, one line
    try:
        train(**script, **config_fields)
    except Interrupted as err:
        if main:
            print(f"[conspo] {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except StopNow as err:
        if main:
            print(f"conspo train: stopped at once by {signal_name(err.signum)}; the run keeps its last complete "
                  f"checkpoint, continue with: {resume_command(COMMAND_ARGV)}", file=sys.stderr, flush=True)
        return EXIT_CODES[err.signum]
    except KeyboardInterrupt:
        if main:
            print(f"conspo train: stopped at once by SIGINT; the run keeps its last complete checkpoint, continue "
                  f"with: {resume_command(COMMAND_ARGV)}", file=sys.stderr, flush=True)
        return EXIT_CODES[signal.SIGINT]
    except (RunError, DatasetError) as err:
        if main:
            report_error("train", err)
        return 2
    except SaveError as err:
        if main:
            report_error("train", err)
        return 1
    except Exception as err:  # anything else: a runtime failure, one line (CONSPO_DEBUG=1: the traceback too)
        if main:
            if os.environ.get("CONSPO_DEBUG"):
                import traceback

                traceback.print_exception(err)
            print(f"conspo train: error: {type(err).__name__}: {' '.join(str(err).split())} (CONSPO_DEBUG=1 shows "
                  f"the traceback)", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
