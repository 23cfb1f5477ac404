"""Reliability (issue 8): crash and resume, cut-short checkpoints, disk full, degenerate batches, bad rewards.

Each test names the fault it injects; ``docs/reliability.md`` maps every fault to the test that shows what
happens. Faults already covered elsewhere (datasets, verifiers, objectives, config checks) are cited there,
not repeated here. The crash-and-resume tests compare against an uninterrupted run with the same seed and
require bit-identical weights and metrics on CPU.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("trl")
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny import build_tokenizer, odd_digit_parity, save_tiny  # noqa: E402

from conspo.checkpoints import (  # noqa: E402
    SaveError,
    align_save_steps,
    checkpoint_problem,
    last_complete_checkpoint,
    truncate_metrics,
    whole_run_loss,
)
from conspo.run import train  # noqa: E402

# Small settings of the main job: 4 groups of 4 rollouts per step, a checkpoint every 2 steps.
CONFIG = dict(per_device_train_batch_size=16, num_generations=4, save_steps=2, max_completion_length=6,
              learning_rate=1e-3, disable_tqdm=True)
TIMING = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def run_job(tiny_dir, out, *, max_steps=4, resume=False, **config):
    return train(model=str(tiny_dir), task="arithmetic", output_dir=out, max_steps=max_steps, seed=0,
                 config={**CONFIG, **config}, resume=resume, eval_limit=20)


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    """An uninterrupted 4-step run (checkpoints 2 and 4)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_job(tiny_dir, out)
    return out


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_run(run: Path, reference: Path) -> None:
    """Bit-identical final weights, and the same metrics records (timings aside), each (step, key) once."""
    want, got = load_file(reference / "final/model.safetensors"), load_file(run / "final/model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), f"{name} differs after resume"
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in records(run / "metrics.jsonl")]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in records(reference / "metrics.jsonl")]
    assert_consistent(strip)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == json.loads((reference / "summary.json").read_text())["steps"]


def assert_consistent(logged: list[dict]) -> None:
    """A step logged twice must not contradict itself (timings aside; the final record repeats "epoch")."""
    seen: dict[tuple, object] = {}
    for r in logged:
        for key, value in r.items():
            if key not in TIMING:
                assert seen.setdefault((r["step"], key), value) == value, f"step {r['step']}: two values of {key}"


def crashed_copy(reference: Path, dest: Path, *, keep_up_to: int) -> Path:
    """The reference run as a crash after checkpoint ``keep_up_to`` leaves it: later checkpoints, final/ and
    summary.json gone, metrics.jsonl holding the later steps and a line torn in the middle."""
    shutil.copytree(reference, dest)
    for path in dest.glob("checkpoint-*"):
        if int(path.name.split("-")[1]) > keep_up_to:
            shutil.rmtree(path)
    shutil.rmtree(dest / "final")
    (dest / "summary.json").unlink()
    with (dest / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 99, "loss": 0.12')
    return dest


def test_worked_task_runs_from_the_main_job_with_its_length_bound(tiny_dir, tmp_path, monkeypatch):
    """``--task arithmetic_worked``: the budget and DAPO's overlong bound come from the task."""
    import conspo.presets
    from conspo.tasks.registry import get_task

    seen = {}
    real = conspo.presets.preset_reward_funcs

    def spy(method, config, **kw):
        seen.update(kw, budget=config.max_completion_length)
        return real(method, config, **kw)

    monkeypatch.setattr(conspo.presets, "preset_reward_funcs", spy)
    config = {k: v for k, v in CONFIG.items() if k != "max_completion_length"}
    summary = train(model=str(tiny_dir), task="arithmetic_worked", method="dapo", output_dir=tmp_path / "run",
                    max_steps=2, seed=0, config=config, eval_limit=8)
    task = get_task("arithmetic_worked")
    assert task.name == "arithmetic_worked" and task.overlong_after == task.max_completion_length - 1
    assert seen == {"overlong_after": task.overlong_after, "budget": task.max_completion_length}
    assert summary["steps"] == 2 and (tmp_path / "run" / "final" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------- resume


def test_resume_skips_a_checkpoint_cut_short_and_reproduces_the_run(tiny_dir, reference, tmp_path, caplog):
    """Killed while writing checkpoint-4 (weights written, trainer_state.json not yet): the resume removes
    it, continues from checkpoint-2 and ends bit-identical to the uninterrupted run."""
    run = crashed_copy(reference, tmp_path / "run", keep_up_to=4)
    (run / "checkpoint-4" / "trainer_state.json").unlink()
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (run / "checkpoint-4" / name).unlink()
    with caplog.at_level(logging.WARNING, logger="conspo.run"):
        run_job(tiny_dir, run, resume=True)
    assert any("checkpoint-4 is incomplete" in r.getMessage() and "removed" in r.getMessage() for r in caplog.records)
    assert_same_run(run, reference)


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda c: (c / "trainer_state.json").unlink(), "no trainer_state.json"),
        (lambda c: (c / "trainer_state.json").write_text((c / "trainer_state.json").read_text()[:40]), "unreadable"),
        (lambda c: (c / "trainer_state.json").write_text('{"global_step": 2}'), "records step 2"),
        (lambda c: (c / "model.safetensors").unlink(), "no model weights"),
        (lambda c: (c / "optimizer.pt").unlink(), "missing optimizer.pt"),
        (lambda c: (c / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"w": "model-00002-of-00002.safetensors"}})), "weight shards missing"),
        (lambda c: [p.unlink() for p in c.iterdir()], "no trainer_state.json"),
    ],
    ids=["no-state", "torn-state", "wrong-step", "no-weights", "no-optimizer", "missing-shard", "empty"],
)
def test_an_incomplete_newest_checkpoint_is_never_loaded(reference, tmp_path, caplog, damage, problem):
    run = crashed_copy(reference, tmp_path / "run", keep_up_to=4)
    newest = run / "checkpoint-4"
    damage(newest)
    assert problem in checkpoint_problem(newest)
    with caplog.at_level(logging.WARNING, logger="conspo.run"):
        assert last_complete_checkpoint(run) == run / "checkpoint-2"
    assert not newest.exists()
    assert any(problem in r.getMessage() for r in caplog.records)
    assert checkpoint_problem(run / "checkpoint-2") is None
    assert checkpoint_problem(newest.parent / "checkpoint-2", expect_optimizer=False) is None


def test_metrics_are_cut_back_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "eval/heldout_accuracy": 0.1}, {"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4},
             {"step": 3, "loss": 0.3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')
    assert truncate_metrics(path, 2) == 2  # step 3 and the torn line
    assert records(path) == lines[:3]
    assert truncate_metrics(path, 2) == 0
    assert truncate_metrics(path, -1) == 3 and path.read_text() == ""  # no checkpoint: the run starts over
    assert truncate_metrics(tmp_path / "absent.jsonl", 0) == 0


def test_train_loss_covers_the_whole_run_after_a_resume():
    history = [{"step": 1, "loss": 1.0}, {"step": 1, "eval": 0.0}, {"step": 2, "loss": 3.0}, {"step": 4, "loss": 0.5}]
    assert whole_run_loss(history) == pytest.approx((1.0 + 3.0 + 2 * 0.5) / 4)  # logging every 1 then 2 steps
    assert whole_run_loss([]) is None


@pytest.mark.parametrize(
    "settings, want",
    [
        (dict(save_steps=3), 3),  # one optimizer step per generation batch: any step is a boundary
        (dict(save_steps=3, steps_per_generation=2), 4),
        (dict(save_steps=4, steps_per_generation=2), 4),
        (dict(save_steps=3, num_iterations=2), 4),
        (dict(save_steps=5, steps_per_generation=4, gradient_accumulation_steps=2), 6),
        (dict(save_steps=1, steps_per_generation=3, gradient_accumulation_steps=2), 3),  # TRL objectives only
        (dict(save_steps=0.25, steps_per_generation=2, max_steps=10), 4),  # a fraction of max_steps: 3 -> 4
        (dict(save_steps=3, steps_per_generation=2, save_strategy="no"), 3),
    ],
)
def test_checkpoints_fall_on_generation_batch_boundaries(settings, want):
    args = SimpleNamespace(**{"save_strategy": "steps", "steps_per_generation": 1, "num_iterations": 1,
                              "gradient_accumulation_steps": 1, "max_steps": 6, **settings})
    note = align_save_steps(args)
    assert args.save_steps == want
    assert (note is not None) == (want != settings["save_steps"])


@pytest.mark.slow
def test_resume_inside_a_multi_step_generation_batch_is_exact(tiny_dir, tmp_path):
    """steps_per_generation=2: TRL buffers one generation batch over two optimizer steps and does not save it;
    save_steps=3 would put checkpoint-3 inside a batch, so it is rounded to 4 and the resume is exact."""
    reference = tmp_path / "reference"
    run_job(tiny_dir, reference, max_steps=6, save_steps=3, steps_per_generation=2, save_total_limit=3)
    assert sorted(p.name for p in reference.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    run = crashed_copy(reference, tmp_path / "run", keep_up_to=4)
    run_job(tiny_dir, run, max_steps=6, resume=True, save_steps=3, steps_per_generation=2, save_total_limit=3)
    assert_same_run(run, reference)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["conspo", "dapo"])
def test_resume_with_dynamic_sampling_is_exact(tiny_dir, tmp_path, method):
    """Dynamic sampling draws its extra prompts from a generator seeded by (seed, step, round): a run cut after
    checkpoint-2 (as a SIGKILL leaves it) and resumed ends bit-identical to the uninterrupted run."""
    reference = tmp_path / "reference"
    extra = dict(dynamic_sampling=True, dynamic_sampling_max_rounds=2) if method == "conspo" else {}
    summary = train(model=str(tiny_dir), task="arithmetic", method=method, output_dir=reference, max_steps=4,
                    seed=0, config={**CONFIG, **extra}, eval_limit=20)
    rounds = [r["conspo/dynamic_rounds"] for r in records(reference / "metrics.jsonl") if "conspo/dynamic_rounds" in r]
    assert len(rounds) == 4 and summary["steps"] == 4
    run = crashed_copy(reference, tmp_path / "run", keep_up_to=2)
    train(model=str(tiny_dir), task="arithmetic", method=method, output_dir=run, max_steps=4, seed=0,
          config={**CONFIG, **extra}, eval_limit=20, resume=True)
    assert_same_run(run, reference)


def test_heldout_evaluation_consumes_no_random_numbers(tiny_dir):
    """The held-out callback runs greedy generation between training steps: it must not move the RNG that
    sampling uses, or the evaluation schedule would change the training run."""
    import numpy as np
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from conspo.evaluation import heldout_accuracy
    from conspo.tasks.registry import get_task

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_dir)
    torch.manual_seed(1)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    accuracy = heldout_accuracy(model, tokenizer, get_task("arithmetic"), limit=30)
    assert 0.0 <= accuracy <= 1.0
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1] and (np.random.get_state()[1] == before[2]).all()


# ----------------------------------------------------------------------------------------------- disk full


def test_disk_full_while_saving_a_checkpoint(tiny_dir, reference, tmp_path, monkeypatch):
    """ENOSPC while checkpoint-4 is written: a SaveError says the disk is full and that checkpoint-2 is intact;
    the half-written checkpoint-4 is gone; freeing space and resuming gives the uninterrupted run."""
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SaveError) as err:
        run_job(tiny_dir, run)
    message = str(err.value)
    assert "checkpoint-4 failed" in message and "the disk is full" in message and "GiB free" in message
    assert f"{run / 'checkpoint-2'} is intact" in message and "--resume" in message
    assert not (run / "checkpoint-4").exists() and checkpoint_problem(run / "checkpoint-2") is None
    assert not (run / "summary.json").exists()

    monkeypatch.setattr(torch, "save", real_save)  # space freed
    run_job(tiny_dir, run, resume=True)
    assert_same_run(run, reference)


def test_disk_full_while_saving_the_final_model(tiny_dir, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    real_save = PreTrainedModel.save_pretrained

    def full_disk(self, save_directory, *args, **kwargs):
        if Path(save_directory).name == "final":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, save_directory, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    run = tmp_path / "run"
    with pytest.raises(SaveError, match=r"final failed: OSError.*the disk is full.*checkpoint-2 is intact") as err:
        run_job(tiny_dir, run, max_steps=2)
    assert "--resume" in str(err.value) and not (run / "summary.json").exists()

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real_save)  # space freed: no step redone, final saved
    assert run_job(tiny_dir, run, max_steps=2, resume=True)["steps"] == 2
    final, last = load_file(run / "final/model.safetensors"), load_file(run / "checkpoint-2/model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert_consistent(records(run / "metrics.jsonl"))


def test_a_kill_while_final_is_written_leaves_no_duplicated_record(tiny_dir, reference, tmp_path):
    """Killed while final/ was written: the final evaluation's record is already in metrics.jsonl. The resume
    (from checkpoint-4, no step taken) evaluates again and replaces that record: the file equals the
    uninterrupted run's (issue 14, item 6)."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    run_job(tiny_dir, run, resume=True)
    assert_same_run(run, reference)
    finals = [r for r in records(run / "metrics.jsonl") if r["step"] == 4 and set(r) == {"step", "eval/heldout_accuracy"}]
    assert len(finals) == 1


def test_disk_full_at_the_final_save_with_model_only_checkpoints(tiny_dir, tmp_path, monkeypatch):
    """save_only_model checkpoints hold no optimizer state; the error must still name the last one as intact."""
    from transformers import PreTrainedModel

    real_save = PreTrainedModel.save_pretrained

    def full_disk(self, save_directory, *args, **kwargs):
        if Path(save_directory).name == "final":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, save_directory, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(SaveError, match=r"final failed: OSError.*checkpoint-2 is intact"):
        run_job(tiny_dir, tmp_path / "run", max_steps=2, save_only_model=True)


# ----------------------------------------------------------------------------------------------- compare


def test_interrupted_compare_resumes_without_redoing_finished_runs(tmp_path, monkeypatch):
    import conspo.compare as compare_module
    from conspo.run import check_output_dir, plan_run, prepare_output_dir

    calls = []

    def fake_train(*, method, seed, output_dir, resume, overwrite, **options):
        calls.append((method, resume))
        run = Path(output_dir)
        if not resume:  # run.json first, as the real train writes it
            plan = plan_run(method=method, seed=seed, output_dir=output_dir, **options)
            prepare_output_dir(plan, check_output_dir(plan, resume=resume, overwrite=overwrite))
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval/heldout_accuracy": 0.5}) + "\n")
        if method == "grpo" and len(calls) == 2:
            raise KeyboardInterrupt  # the kill, half-way through the second run
        summary = {"method": method, "seed": seed, "heldout_before": 0.1, "heldout_after": 0.5, "steps": 1,
                   "metrics": str(run / "metrics.jsonl"), "final_checkpoint": str(run / "final")}
        (run / "summary.json").write_text(json.dumps(summary))

    monkeypatch.setattr(compare_module, "train", fake_train)
    with pytest.raises(KeyboardInterrupt):
        compare_module.compare(["conspo", "grpo"], 1, tmp_path)
    assert calls == [("conspo", False), ("grpo", False)]
    result = compare_module.compare(["conspo", "grpo"], 1, tmp_path)
    assert calls[2:] == [("grpo", True)]  # the finished conspo run is reused, grpo resumes in its directory
    assert [row["method"] for row in result["rows"]] == ["conspo", "grpo"]


# ----------------------------------------------------------------------------------------------- rewards


def _hangs(completion, answer):
    time.sleep(60)


def test_a_hanging_verifier_is_bounded_in_the_reward_function(caplog):
    from conspo.rewards import make_reward_func

    reward = make_reward_func(_hangs, name="slow", timeout_s=0.2)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="conspo.rewards"):
        assert reward(prompts=["p", "q"], completions=["1", "2"], answer=["1", "2"]) == [0.0, 0.0]
    assert time.perf_counter() - start < 2.0
    assert sum("timed out" in r.getMessage() for r in caplog.records) == 2
    with pytest.raises(TimeoutError):
        make_reward_func(_hangs, strict=True, timeout_s=0.2)(prompts=["p"], completions=["1"], answer=["1"])


def test_the_main_job_bounds_its_verifier():
    import inspect

    from conspo import run

    assert run.REWARD_TIMEOUT_S > 0
    assert "timeout_s=REWARD_TIMEOUT_S" in inspect.getsource(run._run)  # (train's body, after its checks)


MEGABYTE = 1 << 20


@pytest.mark.parametrize(
    "completion, reason",
    [
        ("", "no_answer"), (" ", "no_answer"), ("\n\t  \n", "no_answer"),  # empty or whitespace-only
        ("9" * MEGABYTE, "mismatch"),  # a megabyte-long number: compared as digits, never converted
        ("-" + "0" * MEGABYTE + "7", "match"),
        ("7 " + "x" * MEGABYTE, "match"),  # megabyte-long tail after the answer
        ("\\frac{" * 10_000 + "7", "no_answer"),  # deeply nested LaTeX
        ("1e999999999", "no_answer"),
    ],
    ids=["empty", "space", "whitespace", "huge", "huge-zeros", "long-tail", "nested-latex", "exponent"],
)
def test_arithmetic_verifier_on_pathological_completions(completion, reason):
    from conspo.tasks.arithmetic import score_integer

    answer = "-7" if completion.startswith("-") else "7"
    start = time.perf_counter()
    result = score_integer(completion, answer)
    assert result.reason == reason and result.score == (1.0 if reason == "match" else 0.0)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("completion", ["", " ", "\n\t \n"])
def test_empty_and_whitespace_completions_score_zero_in_every_verifier(completion):
    from conspo.rewards import exact_match, math_verify_match, numeric_match

    for verifier in (exact_match, numeric_match, math_verify_match):
        result = verifier(completion, "7")
        assert (result.score, result.reason) == (0.0, "no_answer"), verifier.__name__


# ----------------------------------------------------------------------------------------------- trainer


def _trainer(tiny_dir, tmp_path, reward_funcs, prompts=None, **overrides):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from conspo import ConSPOConfig, ConSPOTrainer

    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                    max_completion_length=4, max_steps=2, logging_steps=1, use_cpu=True, bf16=False,
                    report_to="none", save_strategy="no", disable_tqdm=True, seed=0)
    settings.update(overrides)
    dataset = Dataset.from_dict({"prompt": prompts or [f"{i % 10}+{i // 10}=" for i in range(64)]})
    return ConSPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir), reward_funcs=reward_funcs,
                         args=ConSPOConfig(**settings), train_dataset=dataset, processing_class=build_tokenizer())


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_an_infinite_reward_is_a_clear_error(tiny_dir, tmp_path, value):
    def explodes(prompts, completions, **kwargs):
        return [value if i == 3 else 0.0 for i in range(len(completions))]

    trainer = _trainer(tiny_dir, tmp_path, explodes, max_steps=1)
    with pytest.raises(ValueError, match=r"reward function\(s\) explodes returned an infinite reward for 1 of 8"):
        trainer.train()


@pytest.mark.parametrize("missing", [None, float("nan")])
def test_unscored_completions_are_left_out_and_training_goes_on(tiny_dir, tmp_path, missing):
    """A reward function returning None or NaN for a completion: TRL logs a warning, and the ConSPO loss drops
    that completion from its group (it is neither a positive nor a negative)."""
    def partly(prompts, completions, **kwargs):
        return [missing if i % 4 == 0 else s for i, s in enumerate(odd_digit_parity(prompts, completions))]

    trainer = _trainer(tiny_dir, tmp_path, partly, dump_batch_step=1)
    trainer.train()
    batch = json.loads((tmp_path / "out" / "batch-step1.json").read_text())
    assert len(batch["scores"]) == 6  # 8 rollouts, 2 unscored
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(v == v and abs(v) < 1e3 for v in losses)


@pytest.mark.parametrize("outcome, why", [(0.0, "every rollout is wrong"), (1.0, "every rollout is correct")])
def test_steps_without_a_mixed_group_train_on_with_zero_loss_and_say_why(tiny_dir, tmp_path, monkeypatch, caplog,
                                                                         outcome, why):
    import conspo.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "NO_SIGNAL_WARN_STEPS", 2)

    def constant(prompts, completions, **kwargs):
        return [outcome] * len(completions)

    trainer = _trainer(tiny_dir, tmp_path, constant, max_steps=5)
    with caplog.at_level(logging.WARNING, logger="conspo.trainer"):
        trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["loss"] for h in logged] == [0.0] * 5 and [h["grad_norm"] for h in logged] == [0.0] * 5
    assert all(h["conspo/valid_frac"] == 0.0 for h in logged)
    warnings = [r.getMessage() for r in caplog.records if r.name == "conspo.trainer"]
    assert len(warnings) == 2 and all(why in w and "training continues" in w for w in warnings)
    assert warnings[0].startswith("2 optimizer steps in a row") and warnings[1].startswith("4 optimizer steps")


def test_a_raw_reward_function_that_raises_stops_training_with_its_error(tiny_dir, tmp_path):
    """TRL calls reward functions directly: an exception of an unwrapped function stops the run with that
    exception (make_reward_func instead logs it and scores 0.0; see test_rewards)."""
    def broken(prompts, completions, **kwargs):
        raise KeyError("no such column: solution")

    trainer = _trainer(tiny_dir, tmp_path, broken, max_steps=1)
    with pytest.raises(KeyError, match="no such column"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_duplicated_prompts_form_separate_groups(tiny_dir, tmp_path):
    """The same prompt twice in a batch gives two groups of G rollouts (groups come from positions, not from
    the prompt text), so no group is ever larger than num_generations."""
    trainer = _trainer(tiny_dir, tmp_path, odd_digit_parity, prompts=["1+1="] * 64, max_steps=1, dump_batch_step=1)
    trainer.train()
    batch = json.loads((tmp_path / "out" / "batch-step1.json").read_text())
    assert sorted(batch["group_ids"]) == [0, 0, 0, 0, 1, 1, 1, 1]


def test_a_batch_that_is_not_whole_groups_raises(tiny_dir, tmp_path):
    trainer = _trainer(tiny_dir, tmp_path, odd_digit_parity)
    batch = {"conspo_group_ids": torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])}
    with pytest.raises(RuntimeError, match="does not hold whole groups of num_generations=4"):
        trainer._split_generation_batch(batch)
    with pytest.raises(RuntimeError, match="does not hold whole groups"):
        trainer._split_generation_batch({"conspo_group_ids": torch.tensor([0, 0, 0, 0, 1, 1])})


def test_an_empty_dataset_fails_before_any_work(tmp_path):
    from conspo.tasks.datasets import DatasetError

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetError, match="has no rows"):
        train(dataset=str(empty), output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------- SIGKILL


def _command(tiny_dir, out, config, *extra):
    return [sys.executable, "-m", "conspo.cli", "train", "--model", str(tiny_dir), "--task", "arithmetic",
            "--output-dir", str(out), "--max-steps", "4", "--seed", "0", "--config", str(config), *extra]


def _logged_steps(path: Path) -> list[int]:
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


KILL_SEED_ENV = "CONSPO_KILL_SEED"


def _kill_point() -> tuple[int, float, str]:
    """Where the SIGKILL test kills: the step after which it waits, and how long past it, both drawn from a seed.

    The seed is fresh each run unless CONSPO_KILL_SEED gives it; it is printed and named in every assertion
    message, so a failing kill point can be drawn again with ``CONSPO_KILL_SEED=<seed>``. (The kill still lands
    where the run happens to be after that delay, so a rerun reproduces the point up to timing.)"""
    given = os.environ.get(KILL_SEED_ENV, "").strip()
    seed = int(given) if given else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    kill_after, delay = rng.choice([2, 3]), rng.uniform(0.0, 0.6)
    note = f"(killed after step {kill_after} + {delay:.2f} s; reproduce with {KILL_SEED_ENV}={seed})"
    print(f"SIGKILL test: {KILL_SEED_ENV}={seed} -> kill after step {kill_after} + {delay:.2f} s", flush=True)
    return kill_after, delay, note


def test_the_sigkill_point_is_drawn_from_its_seed(monkeypatch, capsys):
    monkeypatch.setenv(KILL_SEED_ENV, "12345")
    rng = random.Random(12345)
    want = (rng.choice([2, 3]), rng.uniform(0.0, 0.6))
    first, second = _kill_point(), _kill_point()
    assert first[:2] == second[:2] == want
    assert f"{KILL_SEED_ENV}=12345" in first[2] and f"{KILL_SEED_ENV}=12345" in capsys.readouterr().out
    draws = set()
    for seed in range(20):
        monkeypatch.setenv(KILL_SEED_ENV, str(seed))
        draws.add(_kill_point()[:2])
    assert {k for k, _ in draws} == {2, 3} and len(draws) == 20  # the seed moves the point


@pytest.mark.slow
def test_sigkill_at_a_random_point_then_resume_matches_an_uninterrupted_run(tiny_dir, tmp_path):
    """`conspo train` killed with SIGKILL at a random point after its first checkpoint; the same command with
    --resume continues from the last complete checkpoint and ends bit-identical to an uninterrupted run."""
    config = tmp_path / "config.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in CONFIG.items()))
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    kill_after, delay, note = _kill_point()

    reference = subprocess.Popen(_command(tiny_dir, tmp_path / "reference", config), env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "run"
    victim = subprocess.Popen(_command(tiny_dir, run, config), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while victim.poll() is None and time.monotonic() < deadline:
        if max(_logged_steps(run / "metrics.jsonl"), default=0) >= kill_after:
            time.sleep(delay)
            break
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, f"the run ended before it was killed {note}"
    assert not (run / "summary.json").exists(), note
    lost_from = max(_logged_steps(run / "metrics.jsonl"), default=0)

    resumed = subprocess.run(_command(tiny_dir, run, config, "--resume"), env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, f"{note}\n" + resumed.stdout[-2000:] + resumed.stderr[-2000:]
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, f"{note}\n" + err[-2000:]
    start = [line for line in resumed.stdout.splitlines() if "--resume: continuing from" in line]
    if start:
        from_step = int(start[0].split("checkpoint-")[1].split()[0])
    else:  # killed while checkpoint-2, the first one, was being written
        assert "no checkpoint in" in resumed.stdout, note
        from_step = 0
    assert lost_from - from_step <= CONFIG["save_steps"], note  # at most one checkpoint interval redone
    try:
        assert_same_run(run, tmp_path / "reference")
    except AssertionError as err:
        raise AssertionError(f"{err} {note}") from err


# ----------------------------------------------------------------------------------------------- SIGINT / SIGTERM


def _wait_for_step(run: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if max(_logged_steps(run / "metrics.jsonl"), default=0) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not log step {step} (exit {proc.poll()})")


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_step_saves_and_resume_matches_an_uninterrupted_run(tiny_dir, tmp_path, signum,
                                                                                     code):
    """`conspo train` sent SIGINT / SIGTERM after its first logged step: it finishes the step, saves a complete
    checkpoint there (save_steps 3 would not have saved one at steps 1-2), prints the --resume command and exits
    130 / 143; that command finishes the run bit-identical to an uninterrupted one, metrics.jsonl included."""
    config = tmp_path / "config.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in CONFIG.items()))
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    reference = subprocess.Popen(_command(tiny_dir, tmp_path / "reference", config, "--save-steps", "3"), env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "run"
    victim = subprocess.Popen(_command(tiny_dir, run, config, "--save-steps", "3"), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run, victim, 1)
    victim.send_signal(signum)
    out, err = victim.communicate(timeout=300)
    assert victim.returncode == code, out[-2000:] + err[-2000:]
    assert "Traceback" not in err
    stopped = [line for line in err.splitlines() if line.startswith(f"[conspo] stopped by {signum.name} after step")]
    assert len(stopped) == 1, err[-2000:]
    step = int(stopped[0].split("after step ")[1].split()[0])
    assert step in (1, 2, 3)
    assert checkpoint_problem(run / f"checkpoint-{step}") is None  # complete, optimizer included
    assert not (run / "summary.json").exists() and not (run / "final").exists()
    assert _logged_steps(run / "metrics.jsonl") == list(range(1, step + 1))
    command = stopped[0].split("continue with: ")[1]
    assert command.startswith("conspo train ") and command.endswith(" --resume") and str(run) in command

    resumed = subprocess.run([sys.executable, "-m", "conspo.cli", *shlex.split(command)[1:]], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"continuing from {run / f'checkpoint-{step}'}" in resumed.stdout
    _, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err[-2000:]
    assert_same_run(run, tmp_path / "reference")


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tiny_dir, tmp_path):
    """Two SIGINTs: the second stops at once (exit 130, one line, no traceback), before the step is saved; the run
    keeps what it had (no summary.json) and --resume is named."""
    config = tmp_path / "config.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in {**CONFIG, "save_steps": 100}.items()))
    run = tmp_path / "run"
    victim = subprocess.Popen(_command(tiny_dir, run, config, "--max-steps", "200"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    _wait_for_step(run, victim, 1)
    victim.send_signal(signal.SIGINT)
    time.sleep(0.05)
    victim.send_signal(signal.SIGINT)
    out, err = victim.communicate(timeout=120)
    assert victim.returncode == 130, out[-2000:] + err[-2000:]
    assert "Traceback" not in err
    assert "stopped at once by SIGINT" in err and "--resume" in err
    assert max(_logged_steps(run / "metrics.jsonl")) < 100 and not list(run.glob("checkpoint-*"))
    assert not (run / "summary.json").exists()
