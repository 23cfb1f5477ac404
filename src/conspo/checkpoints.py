"""Crash safety of the main job: which checkpoint a resume may load, what the logs keep, and save failures.

transformers (5.24) writes ``checkpoint-N/`` in place, with no temporary directory and no completion marker:
weights and config, then optimizer, scheduler and RNG states, then ``trainer_state.json`` last, then it
deletes checkpoints beyond ``save_total_limit``. A process killed during a save leaves a half-written newest
directory, and ``transformers.trainer_utils.get_last_checkpoint`` would pick it by name alone (loading it
then fails, or silently starts from step 0 without its state). So a resume here takes the newest
*complete* checkpoint and removes the incomplete ones above it, saying so.

Also here: ``metrics.jsonl`` is cut back to the checkpoint a resume starts from (no duplicated or
contradicting steps), checkpoints are kept on generation-batch boundaries so a resume replays the run
exactly, and a failed save (disk full) becomes one clear error while the previous checkpoint stays intact.

Standard library only (transformers is imported inside ``restore_finished``).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("conspo.run")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")  # the name transformers gives checkpoint directories
TRAINER_STATE = "trainer_state.json"  # written last by Trainer._save_checkpoint
WEIGHTS = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class SaveError(RuntimeError):
    """Saving a checkpoint or the final model failed; the message names what is still intact."""


# ----------------------------------------------------------------------------------------------- checkpoints


def checkpoint_problem(path: str | Path, *, expect_optimizer: bool = True) -> str | None:
    """Why ``path`` (a ``checkpoint-N`` directory) cannot be resumed from, or None when it is complete.

    Complete means: ``trainer_state.json`` parses and records step N (it is written after everything else),
    model weights are there (all shards of a sharded index), and, unless ``expect_optimizer`` is False
    (``save_only_model``), the optimizer and scheduler states. DeepSpeed / FSDP layouts are trusted on
    ``trainer_state.json`` alone.
    """
    path = Path(path)
    match = CHECKPOINT_RE.match(path.name)
    if match is None or not path.is_dir():
        return "not a checkpoint-N directory"
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except FileNotFoundError:
        return f"no {TRAINER_STATE} (the save did not finish)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{TRAINER_STATE} is unreadable ({type(err).__name__}: {err})"
    if not isinstance(state, dict) or state.get("global_step") != int(match.group(1)):
        return f"{TRAINER_STATE} records step {state.get('global_step') if isinstance(state, dict) else None}"
    names = set(os.listdir(path))
    if any(n.startswith(("global_step", "pytorch_model_fsdp")) for n in names):
        return None  # DeepSpeed / FSDP sharded layouts: their own files, saved before trainer_state.json
    shards = None
    for index in WEIGHT_INDEXES:
        if index in names:
            try:
                shards = set(json.loads((path / index).read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError):
                return f"{index} is unreadable"
            break
    if shards is None and not any(n in names for n in WEIGHTS):
        return "no model weights"
    if shards and not shards <= names:
        return f"weight shards missing: {sorted(shards - names)}"
    if expect_optimizer:
        missing = [n for n in ("optimizer.pt", "scheduler.pt") if n not in names]
        if missing:
            return f"missing {', '.join(missing)}"
    return None


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), output_dir / n) for n in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(n))]
    return sorted(found, reverse=True)


def last_complete_checkpoint(output_dir: str | Path, *, expect_optimizer: bool = True,
                             remove_incomplete: bool = True) -> Path | None:
    """The newest complete checkpoint of ``output_dir`` (None if there is none).

    Incomplete checkpoints newer than it are logged (logger ``conspo.run``) and, with
    ``remove_incomplete``, deleted: a later save of the same step must not mix with their files, and
    nothing else should load them. Older incomplete ones (a rotation cut short) are left to rotation.
    """
    for _, path in _checkpoints(Path(output_dir)):
        problem = checkpoint_problem(path, expect_optimizer=expect_optimizer)
        if problem is None:
            return path
        action = "removed" if remove_incomplete else "skipped"
        logger.warning("checkpoint %s is incomplete (%s), probably cut short by a crash: %s", path, problem, action)
        if remove_incomplete:
            shutil.rmtree(path, ignore_errors=True)
    return None


# ----------------------------------------------------------------------------------------------- metrics log


def truncate_metrics(path: str | Path, last_step: int) -> int:
    """Keep the records of ``path`` (JSON lines with a ``step``) up to ``last_step``; return how many were
    dropped. A resume from checkpoint-N redoes the steps after N, so their old records (and a line torn by
    the crash) go, and the file never holds two versions of a step. ``last_step=-1`` empties the file."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and record.get("step", math.inf) <= last_step
        except (json.JSONDecodeError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_atomic(path, "".join(f"{line}\n" for line in kept))
    return dropped


EVALUATION_KEYS = frozenset({"step", "eval/heldout_accuracy", "eval/val_accuracy"})


def drop_evaluation_records(path: str | Path, step: int) -> int:
    """Remove the evaluation-only records of ``step`` (the final evaluation's) from ``path``; return how many.

    A run killed after its final evaluation was logged (while ``final/`` was written) resumes from the checkpoint
    at ``max_steps`` and evaluates again; its record then replaces the earlier one instead of repeating it."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and record.get("step") == step and set(record) <= EVALUATION_KEYS:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        write_atomic(path, "".join(f"{line}\n" for line in kept))
    return dropped


def whole_run_loss(log_history: Sequence[dict[str, Any]]) -> float | None:
    """Mean training loss per optimizer step over the whole run, from the logged ``loss`` records.

    transformers' final ``train_loss`` only averages the steps since the last resume; this one is the
    same after a resume as in an uninterrupted run (each logged loss weighted by the steps it covers)."""
    total, previous = 0.0, 0
    for record in log_history:
        if "loss" in record and "step" in record:
            total += float(record["loss"]) * (record["step"] - previous)
            previous = record["step"]
    return total / previous if previous else None


# ----------------------------------------------------------------------------------------------- schedule


def generation_period(args: Any) -> int:
    """Optimizer steps that one generation batch feeds (``steps_per_generation x num_iterations`` micro-steps over
    ``gradient_accumulation_steps``, to a whole number): a run can stop and resume exactly only on its multiples."""
    accumulation = args.gradient_accumulation_steps
    micro = args.steps_per_generation * args.num_iterations
    return math.lcm(micro, accumulation) // accumulation


def align_save_steps(args: Any) -> str | None:
    """Round ``args.save_steps`` up to a whole number of generation batches; return a note when changed.

    TRL keeps the rollouts of one generation batch in memory for ``steps_per_generation * num_iterations``
    micro-steps and does not checkpoint them: a resume from inside a generation batch generates new rollouts
    (with other random numbers) and shifts the generation schedule, so the run is no longer the same run.
    A checkpoint on a boundary resumes exactly (bit-identical on CPU).
    """
    if str(getattr(args.save_strategy, "value", args.save_strategy)) != "steps" or not args.save_steps:
        return None
    period = generation_period(args)
    steps = args.save_steps if args.save_steps >= 1 else math.ceil(args.max_steps * args.save_steps)
    steps = int(math.ceil(steps))
    if steps % period == 0:
        return None
    aligned = -(-steps // period) * period
    args.save_steps = aligned
    return (f"save_steps {steps} -> {aligned}: a multiple of the {period} optimizer steps that one generation batch "
            f"feeds (steps_per_generation x num_iterations / gradient_accumulation_steps), so a resume is exact")


# ----------------------------------------------------------------------------------------------- writing


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader sees the old or the new
    content, never a torn file (``summary.json`` marks a finished run for ``conspo compare``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per process: ranks may write the same file
    tmp.write_text(text)
    os.replace(tmp, path)


def _chain(err: BaseException) -> list[BaseException]:
    chain, e = [], err
    while e is not None and len(chain) < 5:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def _cause(err: BaseException, directory: Path) -> tuple[str, str]:
    """``(what happened, what to do before --resume)`` for a failed save: a full disk says how much is free, a
    permission error names the directory; anything else is reported as it is."""
    chain = _chain(err)
    if any(getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) for e in chain):
        try:
            free = f"{shutil.disk_usage(directory).free / 2**30:.2f} GiB free on {directory}"
        except OSError:
            free = f"free space on {directory} unknown"
        return f"the disk is full ({free})", "free space"
    if any(isinstance(e, PermissionError) or getattr(e, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS)
           for e in chain):
        return f"permission denied: {directory} is not writable", f"make {directory} writable"
    return "", "fix the cause"


def save_error(err: BaseException, target: str | Path, *, intact: str | Path | None, removed: bool) -> SaveError:
    """The error to raise when writing ``target`` failed: what happened, why when known (a full disk with the free
    space, a permission), whether an incomplete ``target`` was removed, and what is intact."""
    target = Path(target)
    parent = target.parent if target.parent.exists() else Path(".")
    why, fix = _cause(err, parent)
    if intact is None:
        keep = f"there is no earlier checkpoint to resume from: {fix}, then run again"
    else:
        keep = f"the checkpoint {intact} is intact; {fix}, then rerun with --resume to continue from it"
    fate = f"the incomplete {target.name} was removed; " if removed else ""
    return SaveError(f"saving {target} failed: {type(err).__name__}: {err}. {why + '; ' if why else ''}"
                     f"{fate}{keep}")


def guard_checkpoint_saves(trainer: Any) -> None:
    """Wrap ``trainer._save_checkpoint`` (transformers' save of one checkpoint): a failure (disk full, ...)
    removes the incomplete checkpoint and raises a :class:`SaveError` naming the newest complete one."""
    save = trainer._save_checkpoint

    def guarded(model, trial):
        output_dir = Path(trainer.args.output_dir)
        target = output_dir / f"checkpoint-{trainer.state.global_step}"
        expect = not trainer.args.save_only_model
        try:
            return save(model, trial)
        except Exception as err:
            removed = False
            if (target.exists() and checkpoint_problem(target, expect_optimizer=expect) is not None
                    and trainer.args.should_save):
                shutil.rmtree(target, ignore_errors=True)
                removed = not target.exists()  # (said only of a directory that was there and is gone)
            intact = next((p for _, p in _checkpoints(output_dir)
                           if checkpoint_problem(p, expect_optimizer=expect) is None), None)
            raise save_error(err, target, intact=intact, removed=removed) from err

    trainer._save_checkpoint = guarded


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a complete checkpoint was saved at."""
    return int(json.loads((Path(path) / TRAINER_STATE).read_text())["global_step"])


def restore_finished(trainer: Any, checkpoint: str | Path) -> None:
    """Load a checkpoint saved at the last step (the run was killed during the final evaluation or save).

    ``Trainer.train(resume_from_checkpoint=...)`` checks ``max_steps`` only after taking a step, so resumed at
    ``max_steps`` it would train one step more than the uninterrupted run; load weights and state instead."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE))


def prepare_resume(output_dir: str | Path, metrics_path: str | Path, *, expect_optimizer: bool = True) -> Path | None:
    """For ``--resume``: the checkpoint to load (newest complete one, or None to start over) after cutting
    ``metrics.jsonl`` back to it. Under torchrun / accelerate every process picks the same checkpoint; only
    the main one (``RANK`` 0) removes incomplete checkpoints and rewrites the metrics file."""
    main = int(os.environ.get("RANK", "0")) == 0
    checkpoint = last_complete_checkpoint(output_dir, expect_optimizer=expect_optimizer, remove_incomplete=main)
    step = -1 if checkpoint is None else checkpoint_step(checkpoint)
    dropped = truncate_metrics(metrics_path, step) if main else 0
    if dropped:
        print(f"[conspo] {Path(metrics_path).name}: dropped {dropped} records written after "
              f"{checkpoint.name if checkpoint else 'the start'} (they are redone now)")
    return checkpoint


__all__ = [
    "SaveError", "align_save_steps", "checkpoint_problem", "checkpoint_step", "drop_evaluation_records",
    "generation_period", "guard_checkpoint_saves",
    "last_complete_checkpoint", "prepare_resume", "restore_finished", "save_error", "truncate_metrics",
    "whole_run_loss", "write_atomic",
]
