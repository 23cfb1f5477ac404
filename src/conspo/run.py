"""The main job: train a causal LM with ConSPO or a baseline on a verifiable task, end to end.

``conspo train`` with no arguments runs the embedded default on a CPU: the procedural arithmetic task,
a tiny Qwen2 model warm-started on it (cached), ConSPO training, held-out accuracy before, during and
after, ``metrics.jsonl``, ``curves.png`` and a ``final/`` checkpoint that ``transformers`` loads.

From Python::

    from conspo.run import train
    summary = train(method="conspo", task="arithmetic", output_dir="runs/demo", max_steps=60)
    print(summary["heldout_before"], "->", summary["heldout_after"])
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from conspo.checkpoints import (
    SaveError,
    align_save_steps,
    checkpoint_step,
    guard_checkpoint_saves,
    last_complete_checkpoint,
    prepare_resume,
    restore_finished,
    save_error,
    whole_run_loss,
    write_atomic,
)

logger = logging.getLogger("conspo.run")

DEFAULT_TASK = "arithmetic"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"

REWARD_TIMEOUT_S = 10.0
"""Wall-clock bound on one verifier call inside the reward function (a hanging verifier scores 0, logged)."""

# Settings for a real pretrained model when neither the YAML config nor the command line says otherwise.
PRETRAINED_DEFAULTS = dict(
    learning_rate=1e-6, num_generations=8, per_device_train_batch_size=8, temperature=0.6, max_steps=100,
)


class RunError(ValueError):
    """A problem found before any long work started; the message names it and what is accepted."""


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
        raise RunError(f"--config {path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise RunError(f"--config {path}: expected a mapping of config fields to values, got {type(data).__name__}")
    from conspo.trainer import ConSPOConfig

    known = {f.name for f in fields(ConSPOConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RunError(f"--config {path}: unknown fields {unknown}; fields are those of ConSPOConfig / GRPOConfig")
    return data


def resolve_task(task: str | None, dataset: str | None, *, seed: int, question_field=None, answer_field=None):
    from conspo.tasks.registry import get_task

    if dataset is not None:
        if not Path(dataset).is_file():
            raise RunError(f"--dataset {dataset}: no such file (accepted: .jsonl, .json, .parquet)")
        return get_task(dataset, question_field=question_field, answer_field=answer_field, seed=seed)
    return get_task(task or DEFAULT_TASK)


def check_model(model: str | None) -> None:
    if model is None:
        return
    path = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or path.exists() or model.count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise RunError(f"--model {model}: not a model directory (no config.json there)")


def prepare_output_dir(output_dir: Path, identity: dict, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: a directory holding another run needs --resume (same run) or --overwrite."""
    record = output_dir / RUN_FILE
    occupied = output_dir.is_dir() and any(output_dir.iterdir())
    if occupied and overwrite:
        shutil.rmtree(output_dir)
        occupied = False
    if occupied:
        if not record.is_file():
            raise RunError(f"--output-dir {output_dir} is not empty and holds no conspo run; choose another "
                           f"directory or pass --overwrite to replace its contents")
        previous = json.loads(record.read_text())
        if not resume:
            raise RunError(f"--output-dir {output_dir} holds a run ({previous.get('method')} on "
                           f"{previous.get('task')}, seed {previous.get('seed')}); pass --resume to continue it "
                           f"or --overwrite to start again")
        differs = {k: (previous.get(k), v) for k, v in identity.items() if previous.get(k) != v}
        if differs:
            raise RunError(f"--resume: {output_dir} holds a different run; differences (saved, now): {differs}")
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(record, json.dumps(identity, indent=2))


# ----------------------------------------------------------------------------------------------- evaluation


def heldout_accuracy(model, tokenizer, task, *, template: str = "plain", limit: int | None = 500,
                     batch_size: int = 256) -> float:
    """Mean verifier score of greedy completions on the task's held-out problems, given the prompt ids RL gives
    the model (``conspo.prompts``: the same rendering and tokenisation as TRL's)."""
    import torch

    from conspo.prompts import left_padded, problem_prompt, prompt_ids

    problems = task.test[:limit] if limit else task.test
    if not problems:
        return float("nan")
    ids = prompt_ids([problem_prompt(p, task.instruction, template, tokenizer) for p in problems], tokenizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    completions: list[str] = []
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            enc = left_padded(ids[i : i + batch_size], tokenizer.pad_token_id, device)
            out = model.generate(**enc, do_sample=False, max_new_tokens=task.max_completion_length,
                                 pad_token_id=tokenizer.pad_token_id)
            completions += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    return sum(task.verifier(c, p["answer"]).score for c, p in zip(completions, problems)) / len(problems)


# ----------------------------------------------------------------------------------------------- callbacks


def _callbacks(metrics_path: Path, evaluate, eval_every: int):
    from transformers import TrainerCallback

    class MetricsFile(TrainerCallback):
        """Appends every log record, with its optimizer step, to metrics.jsonl (rank 0 only)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                if "train_loss" in logs:  # transformers averages only the steps since the last resume
                    logs = {**logs, "train_loss": whole_run_loss(state.log_history)}
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    class HeldOut(TrainerCallback):
        """Greedy held-out accuracy every ``eval_every`` optimizer steps, into metrics.jsonl."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if eval_every and state.global_step % eval_every == 0 and state.global_step < state.max_steps:
                accuracy = evaluate(model)
                if state.is_world_process_zero:
                    with metrics_path.open("a") as fh:
                        fh.write(json.dumps({"step": state.global_step, "eval/heldout_accuracy": accuracy}) + "\n")

    return [MetricsFile(), HeldOut()]


# ----------------------------------------------------------------------------------------------- the job


def train(
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
    seed: int = 0,
    max_steps: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    report_to: str = "none",
    lora: bool = False,
    lora_r: int = 16,
    eval_limit: int | None = 500,
    eval_every: int | None = None,
    strict_rewards: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Train, evaluate before and after, save; returns the summary also written to ``summary.json``.

    ``config`` is a YAML path or a dict of ConSPOConfig fields; ``overrides`` (config fields) win over it.
    Everything is checked before the warm start or the model load begins.
    """
    from conspo.presets import ALL_METHODS as METHODS

    if method not in METHODS:
        raise RunError(f"unknown method {method!r}; accepted values: {', '.join(METHODS)}")
    template = template or "plain"
    if template not in ("plain", "chat"):
        raise RunError(f"template must be 'plain' or 'chat', got {template!r}")
    if max_steps is not None and max_steps < 1:
        raise RunError(f"--max-steps must be >= 1, got {max_steps}")
    yaml_fields = dict(config) if isinstance(config, dict) else load_yaml_config(config)
    check_model(model)
    task_obj = resolve_task(task, dataset, seed=seed, question_field=question_field, answer_field=answer_field)
    if not task_obj.train:
        raise RunError(f"task {task_obj.name!r} has no training problems")
    task_label = dataset or task or DEFAULT_TASK
    output_dir = Path(output_dir or f"runs/{method}-{Path(task_label).stem.replace(':', '-')}-seed{seed}")
    identity = {"method": method, "task": task_label, "model": model or "embedded-tiny", "seed": seed}
    prepare_output_dir(output_dir, identity, resume=resume, overwrite=overwrite)

    import torch
    from datasets import Dataset

    from conspo.presets import preset_config, preset_reward_funcs
    from conspo.prompts import problem_prompt
    from conspo.rewards import make_reward_func
    from conspo.trainer import ConSPOTrainer

    started = time.time()
    embedded = model is None
    if embedded:
        from conspo.tasks import tiny_model

        print(f"[conspo] warm start of the embedded tiny model on {task_obj.name} (cached after the first run)")
        model_path = tiny_model.warm_start(task_obj, seed=0)
        policy, tokenizer = tiny_model.load_tiny(model_path)
        defaults = dict(tiny_model.DEFAULT_RL)
    else:
        from transformers import AutoModelForCausalLM

        from conspo.evaluation import load_tokenizer

        tokenizer = load_tokenizer(model)  # keeps conspo's character tokenizers intact (environment notes)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        defaults = dict(PRETRAINED_DEFAULTS)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        policy = policy.to("cuda")

    settings: dict[str, Any] = {
        **defaults,
        "max_completion_length": task_obj.max_completion_length,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_total_limit": 2,
        "use_cpu": not on_gpu,
        "bf16": bool(on_gpu and torch.cuda.is_bf16_supported()),
        "seed": seed,
        "report_to": report_to,
        "disable_tqdm": False,
        "dump_batch_step": 1,
    }
    settings.update(yaml_fields)
    settings.update(overrides)
    if max_steps is not None:
        settings["max_steps"] = max_steps
    settings.setdefault("save_steps", max(1, settings["max_steps"] // 4))
    settings["output_dir"] = str(output_dir)
    args = preset_config(method, **settings)
    note = align_save_steps(args)
    if note:
        print(f"[conspo] {note}")

    verifier = make_reward_func(task_obj.verifier, name="correct", strict=strict_rewards, timeout_s=REWARD_TIMEOUT_S)
    reward_funcs = [verifier, *preset_reward_funcs(method, args, overlong_after=task_obj.overlong_after)]
    if len(reward_funcs) > 1 and args.correctness_reward is None:
        args.correctness_reward = "correct"  # correctness comes from the verifier, not the length penalty
    # TRL tokenises this "prompt" itself; conspo.prompts reproduces how, for the warm start and evaluation.
    rows = [{"prompt": problem_prompt(p, task_obj.instruction, template, tokenizer), "answer": p["answer"]}
            for p in task_obj.train]
    train_set = Dataset.from_list(rows)

    def evaluate(m) -> float:
        return heldout_accuracy(m, tokenizer, task_obj, template=template, limit=eval_limit)

    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear", task_type="CAUSAL_LM")

    metrics_path = output_dir / METRICS_FILE
    # The newest *complete* checkpoint (a crash may cut a save short); metrics.jsonl is cut back to it.
    checkpoint = None
    if resume:
        checkpoint = prepare_resume(output_dir, metrics_path, expect_optimizer=not args.save_only_model)
    if resume and checkpoint is None:
        print(f"[conspo] --resume: no checkpoint in {output_dir} yet, starting from the beginning")
    elif checkpoint is not None:
        print(f"[conspo] --resume: continuing from {checkpoint} (of {args.max_steps} steps)")
        checkpoint = str(checkpoint)
    before = evaluate(policy)
    if checkpoint is None:
        with metrics_path.open("a") as fh:
            fh.write(json.dumps({"step": 0, "eval/heldout_accuracy": before}) + "\n")
    print(f"[conspo] held-out accuracy before training: {before:.1%} ({len(task_obj.test[:eval_limit])} problems)")

    every = eval_every if eval_every is not None else max(1, args.max_steps // 6)
    trainer = ConSPOTrainer(model=policy, reward_funcs=reward_funcs, args=args, train_dataset=train_set,
                            processing_class=tokenizer, peft_config=peft_config,
                            callbacks=_callbacks(metrics_path, evaluate, every))
    guard_checkpoint_saves(trainer)  # disk full while saving: a clear error, the previous checkpoint intact
    if checkpoint is not None and checkpoint_step(checkpoint) >= args.max_steps:
        restore_finished(trainer, checkpoint)  # killed after the last step: transformers would take one more
    else:
        trainer.train(resume_from_checkpoint=checkpoint)

    trained = trainer.model
    if lora:
        trained = trained.merge_and_unload()
    after = evaluate(trained)
    if trainer.is_world_process_zero():
        with metrics_path.open("a") as fh:
            fh.write(json.dumps({"step": trainer.state.global_step, "eval/heldout_accuracy": after}) + "\n")
    final_dir = output_dir / "final"
    try:
        trained.save_pretrained(final_dir)
        tokenizer.save_pretrained(final_dir)
    except Exception as err:
        last = last_complete_checkpoint(output_dir, expect_optimizer=not args.save_only_model,
                                        remove_incomplete=False)
        raise save_error(err, final_dir, intact=last, removed=False) from err

    from conspo.plots import plot_learning_curves, read_metrics

    curves = plot_learning_curves({method: read_metrics(metrics_path)}, output_dir / "curves.png",
                                  title=f"{method} on {task_obj.name}")
    summary = {
        **identity,
        "heldout_before": before,
        "heldout_after": after,
        "heldout_problems": len(task_obj.test[:eval_limit] if eval_limit else task_obj.test),
        "steps": trainer.state.global_step,
        "wall_seconds": round(time.time() - started, 1),
        "final_checkpoint": str(final_dir),
        "metrics": str(metrics_path),
        "curves": str(curves),
    }
    write_atomic(output_dir / "summary.json", json.dumps(summary, indent=2))  # marks the run finished
    print(f"[conspo] metrics: {metrics_path}\n[conspo] curves:  {curves}\n[conspo] model:   {final_dir} "
          f"(AutoModelForCausalLM.from_pretrained)")
    print(f"[conspo] {method} on {task_obj.name}: held-out accuracy {before:.1%} -> {after:.1%} "
          f"({(after - before) * 100:+.1f} points) in {summary['steps']} steps, {summary['wall_seconds']:.0f} s")
    return summary


def train_command(ns) -> int:
    """``conspo train``: the argparse namespace of ``conspo.cli``."""
    logging.basicConfig(level=os.environ.get("CONSPO_LOG_LEVEL", "WARNING"))
    from conspo.tasks.datasets import DatasetError

    try:
        train(method=ns.method, task=ns.task, dataset=ns.dataset, question_field=ns.question_field,
              answer_field=ns.answer_field, template=ns.template, model=ns.model, config=ns.config,
              output_dir=ns.output_dir, seed=ns.seed, max_steps=ns.max_steps, resume=ns.resume,
              overwrite=ns.overwrite, report_to=ns.report_to, lora=ns.lora, lora_r=ns.lora_r)
    except (RunError, DatasetError) as err:
        print(f"conspo train: error: {err}")
        return 2
    except SaveError as err:
        print(f"conspo train: error: {err}")
        return 1
    return 0
