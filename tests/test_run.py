"""The command line users can trust (issue 14): `conspo train` / `conspo compare` run in-process through
``conspo.cli.main``; each test checks the exit status, the message and the directories before and after.

Refusals run on the embedded default (nothing is loaded before the refusal); the runs that train use the tiny
model of ``tests/tiny.py`` for one or two optimizer steps of 16 rollouts.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

pytest.importorskip("trl")
import torch  # noqa: E402
from tiny import save_tiny  # noqa: E402

from conspo.cli import build_compare_parser, build_train_parser, main, parse_explicit  # noqa: E402
from conspo.run import (  # noqa: E402
    BEST_DIR,
    RUN_FILE,
    SELECTION_RULE,
    BestCheckpoint,
    RunError,
    plan_run,
    split_namespace,
    validation_split,
)

SMALL_YAML = ("per_device_train_batch_size: 16\nnum_generations: 4\nmax_completion_length: 6\nsave_steps: 100\n"
              "disable_tqdm: true\n")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "model"))


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` with a hash of its bytes (directories: 'dir')."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def fake_run(path: Path, **record) -> Path:
    """A directory holding a conspo run record (its settings do not matter to the refusals tested with it)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / RUN_FILE).write_text(json.dumps({"written_by": "conspo", "method": "conspo", "task": "arithmetic",
                                             "model": "embedded-tiny", "seed": 0, "settings": {}, **record}))
    (path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def refused(capsys, root: Path, *argv) -> str:
    """Run a command that must be refused: exit 2, one line on stderr, no byte under ``root`` changed."""
    before = snapshot(root)
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("conspo "), err
    assert snapshot(root) == before
    return lines[0]


# ----------------------------------------------------------------------------------------------- item 1: --overwrite


def test_overwrite_refuses_the_working_directory_and_its_ancestors(tmp_path, monkeypatch, capsys):
    run = fake_run(tmp_path / "proj")
    (run / "notes.txt").write_text("mine")
    monkeypatch.chdir(run)
    message = refused(capsys, tmp_path, "train", "--output-dir", ".", "--overwrite")
    assert "it is the working directory" in message and "choose another --output-dir" in message
    (run / "sub").mkdir()
    monkeypatch.chdir(run / "sub")
    message = refused(capsys, tmp_path, "train", "--output-dir", str(run), "--overwrite")
    assert f"it holds the working directory {run / 'sub'}" in message


@pytest.mark.parametrize("role", ["--dataset", "--config", "--model"])
def test_overwrite_refuses_a_directory_holding_an_input_of_the_run(tmp_path, monkeypatch, capsys, role):
    monkeypatch.chdir(tmp_path)
    run = fake_run(tmp_path / "proj")
    if role == "--dataset":
        data = run / "train.jsonl"
        data.write_text("".join(json.dumps({"question": f"{i}+1", "answer": str(i + 1)}) + "\n" for i in range(40)))
        argv = ["--dataset", str(data)]
    elif role == "--config":
        data = run / "cfg.yaml"
        data.write_text("learning_rate: 1.0e-4\n")
        argv = ["--config", str(data)]
    else:
        data = run / "model"
        data.mkdir()
        (data / "config.json").write_text("{}")
        argv = ["--model", str(data)]
    message = refused(capsys, tmp_path, "train", *argv, "--output-dir", str(run), "--overwrite")
    assert f"it holds {role} {data}, an input of this run" in message


def test_a_foreign_directory_is_refused_with_no_way_round_but_another_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"], ["--resume"]):
        message = refused(capsys, tmp_path, "train", "--output-dir", str(foreign), *extra)
        assert "holds no conspo run" in message and "choose another --output-dir" in message
        assert "--overwrite" not in message  # no way round it but another path
    # a run.json that conspo did not write does not make a directory a conspo run
    (foreign / RUN_FILE).write_text(json.dumps({"name": "someone else's"}))
    message = refused(capsys, tmp_path, "train", "--output-dir", str(foreign), "--overwrite")
    assert "holds no conspo run" in message


def test_output_dir_that_is_a_file_or_below_a_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    assert "is a file; name a directory" in refused(capsys, tmp_path, "train", "--output-dir", "afile")
    assert "afile is a file" in refused(capsys, tmp_path, "train", "--output-dir", "afile/run")


# ----------------------------------------------------------------------------------------------- item 2


def test_resume_and_overwrite_together_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = fake_run(tmp_path / "run")
    message = refused(capsys, tmp_path, "train", "--output-dir", str(run), "--resume", "--overwrite")
    assert "--resume and --overwrite together" in message and "pass one of them" in message
    assert (run / "metrics.jsonl").is_file()


# ----------------------------------------------------------------------------------------------- item 3


def test_a_preset_defining_field_in_the_yaml_is_refused_before_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "conspo.yaml"
    cfg.write_text("objective: conspo\n")
    message = refused(capsys, tmp_path, "train", "--method", "grpo", "--config", str(cfg), "--output-dir", "run")
    assert "method 'grpo' is defined by objective='trl'" in message and "objective='conspo'" in message
    assert not (tmp_path / "run").exists()
    # and in a comparison, before its first run starts
    message = refused(capsys, tmp_path, "compare", "--methods", "conspo,grpo", "--config", str(cfg), "--output-dir",
                      "cmp")
    assert "method 'grpo' is defined by" in message and not (tmp_path / "cmp").exists()


def test_command_line_wins_over_the_yaml_and_everything_agrees(tiny, tmp_path, monkeypatch, capsys):
    """YAML seed 3 and learning_rate 1e-3; --seed 1 and --learning-rate 1e-6 (the dataclass's own default, so only
    knowing that the flag was given can make it win). Then --resume with other settings (items 4, 7), a --resume of
    the finished run, and --overwrite of the run (item 1): nothing outside the run is touched."""
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "seed3.yaml"
    cfg.write_text(SMALL_YAML + "seed: 3\nlearning_rate: 1.0e-3\ntemperature: 0.7\n")
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "run"
    base = ["train", "--model", tiny, "--task", "arithmetic", "--eval-limit", "8", "--config", str(cfg),
            "--output-dir", str(out)]
    rc, stdout, err = run_cli(capsys, *base, "--max-steps", "1", "--seed", "1", "--learning-rate", "1e-6")
    assert rc == 0, err
    args = torch.load(out / "final" / "training_args.bin", weights_only=False)
    assert (args.seed, args.learning_rate, args.temperature, args.num_generations) == (1, 1e-6, 0.7, 4)
    record = json.loads((out / RUN_FILE).read_text())
    assert record["seed"] == 1 and record["settings"]["config"]["learning_rate"] == 1e-6
    assert record["settings"]["config"]["temperature"] == 0.7
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["seed"], summary["steps"], summary["config_hash"]) == (1, 1, record["config_hash"])
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["learning_rate"] for r in logged if "loss" in r] == [1e-6]  # what the optimizer used

    outside = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("run")}
    # item 7: a finished 1-step run resumed with --max-steps 3 is refused, and says so
    message = refused(capsys, tmp_path, *base, "--max-steps", "3", "--seed", "1", "--learning-rate", "1e-6",
                      "--resume")
    assert "max_steps (saved 1, now 3)" in message and "--max-steps 3 is refused, not applied" in message
    # item 4: the YAML's seed and learning rate now decide: both named
    message = refused(capsys, tmp_path, *base, "--max-steps", "1", "--resume")
    assert "learning_rate (saved 1e-06, now 0.001)" in message and "seed (saved 1, now 3)" in message
    # the same settings: finished, nothing redone or rewritten
    before = snapshot(out)
    rc, stdout, err = run_cli(capsys, *base, "--max-steps", "1", "--seed", "1", "--learning-rate", "1e-6", "--resume")
    assert rc == 0 and "finished (1 of 1 steps" in stdout and "nothing to train" in stdout
    assert snapshot(out) == before
    # item 1: --overwrite replaces the conspo run, and only it
    rc, stdout, err = run_cli(capsys, *base, "--max-steps", "1", "--seed", "2", "--overwrite")
    assert rc == 0, err
    assert f"--overwrite: deleting the run in {out}" in stdout
    assert json.loads((out / RUN_FILE).read_text())["seed"] == 2
    assert torch.load(out / "final" / "training_args.bin", weights_only=False).seed == 2
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("run")} == outside


def test_compare_seeds_win_over_the_yaml_seed_reuse_and_rerun(tiny, tmp_path, monkeypatch, capsys):
    """`conspo compare --seeds 2 --config seed3.yaml` trains seeds 0 and 1 (items 3, 4): the effective configs,
    run.json and the table agree; the same command reuses both runs; another budget trains a run again."""
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "seed3.yaml"
    cfg.write_text(SMALL_YAML + "seed: 3\nlearning_rate: 1.0e-3\n")
    root = tmp_path / "cmp"
    base = ["compare", "--methods", "conspo", "--model", tiny, "--task", "arithmetic", "--eval-limit", "8",
            "--eval-samples", "0", "--config", str(cfg), "--output-dir", str(root)]
    rc, stdout, err = run_cli(capsys, *base, "--seeds", "2", "--max-steps", "1")
    assert rc == 0, err
    assert f"the seed in {cfg} is not used: the runs have seeds 0..1" in stdout
    hashes = set()
    for seed in (0, 1):
        run = root / "conspo" / f"seed{seed}"
        assert torch.load(run / "final" / "training_args.bin", weights_only=False).seed == seed
        record = json.loads((run / RUN_FILE).read_text())
        assert record["seed"] == seed and json.loads((run / "summary.json").read_text())["seed"] == seed
        hashes.add(record["config_hash"])
    assert len(hashes) == 2
    table = (root / "results.md").read_text()
    assert table.startswith(f"Task: arithmetic (held-out accuracy on 8 test problems); model: {tiny}; budget: 1 "
                            f"optimizer steps of 16 rollouts (4 per prompt, completions up to 6 tokens); seeds 0, 1.")
    row = next(csv.DictReader((root / "results.csv").open()))
    assert (row["method"], row["seeds"], row["steps"]) == ("conspo", "2", "1")

    stamps = {s: (root / "conspo" / f"seed{s}" / "summary.json").stat().st_mtime_ns for s in (0, 1)}
    rc, stdout, err = run_cli(capsys, *base, "--seeds", "2", "--max-steps", "1")
    assert rc == 0 and stdout.count("reusing") == 2
    assert all((root / "conspo" / f"seed{s}" / "summary.json").stat().st_mtime_ns == stamps[s] for s in (0, 1))

    rc, stdout, err = run_cli(capsys, *base, "--seeds", "1", "--max-steps", "2")
    assert rc == 0, err
    assert re.search(r"seed0 holds a run with other settings \(.*max_steps.*\); training it again", stdout)
    assert json.loads((root / "conspo" / "seed0" / "summary.json").read_text())["steps"] == 2
    assert "budget: 2 optimizer steps" in (root / "results.md").read_text()
    assert (root / "conspo" / "seed1" / "summary.json").stat().st_mtime_ns == stamps[1]  # not asked for: untouched


def test_compare_refuses_a_foreign_output_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "results.txt").write_text("x")
    message = refused(capsys, tmp_path, "compare", "--methods", "conspo", "--output-dir", "mine")
    assert "holds no comparison" in message


# ----------------------------------------------------------------------------------------------- item 11: flags


def test_every_config_field_is_a_flag_and_only_given_flags_count():
    parser = build_train_parser()
    ns, explicit = parse_explicit(parser, ["--tau", "0.3", "--learning-rate", "1e-5", "--num-generations", "8",
                                           "--use-vllm", "--seed", "2"])
    script, fields = split_namespace(ns, explicit)
    assert fields == {"tau": "0.3", "learning_rate": 1e-5, "num_generations": 8, "use_vllm": True}
    assert script["seed"] == 2 and script["max_steps"] is None and script["method"] == "conspo"
    fields.pop("use_vllm")  # (vLLM itself is not needed to parse it)
    script = {k: v for k, v in script.items() if k not in ("resume", "overwrite", "output_dir")}
    plan = plan_run(output_dir="unused", **script, **fields)
    assert (plan.args.tau, plan.args.learning_rate, plan.args.num_generations, plan.args.seed) == (0.3, 1e-5, 8, 2)
    ns, explicit = parse_explicit(parser, ["--learning_rate", "1e-6"])  # TRL's spelling, and a default value
    assert split_namespace(ns, explicit)[1] == {"learning_rate": 1e-6}
    with pytest.raises(SystemExit):
        parse_explicit(parser, ["--learning", "1e-5"])  # no abbreviations: --seed never means --seeds
    text = " ".join(parser.format_help().split())
    assert "--tau TAU Temperature of the contrast" in text and "--use_vllm" in text
    assert "conspo's default: 0.0001 with the embedded model, 1e-06 with --model" in text


def test_train_takes_plan_runs_settings_and_refuses_unknown_ones_before_writing(tmp_path):
    import inspect

    from conspo.run import train

    shown = inspect.signature(train).parameters
    planned = inspect.signature(plan_run).parameters
    assert list(shown)[: len(planned) - 1] == list(planned)[:-1]  # every setting, in plan_run's order
    assert [shown[n].default for n in ("resume", "overwrite", "strict_rewards")] == [False, False, False]
    assert shown["eval_limit"].default == 500 and list(shown)[-1] == "overrides"
    with pytest.raises(RunError, match="no_such_field"):
        train(output_dir=tmp_path / "run", no_such_field=1)
    with pytest.raises(RunError, match="unknown method 'nope'"):
        train(method="nope", output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_bad_field_value_is_one_line_before_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: fast\n")
    assert "learning_rate must be a number, got 'fast'" in refused(capsys, tmp_path, "train", "--config", str(cfg))
    cfg.write_text("learning_rate: 1e-5\n")  # PyYAML reads this as a string; it is the number 1e-5
    assert plan_run(config=str(cfg), output_dir="x").args.learning_rate == 1e-5
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--resume_from_checkpoint", "x"])
    assert exit_.value.code == 2 and "not read by conspo; pass --resume" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- item 12


@pytest.mark.parametrize("flag, value, reason", [
    ("--method", "grpo", "takes --methods"), ("--seed", "1", "runs seeds 0..N-1 with --seeds N"),
    ("--resume", None, "resumes unfinished runs by itself"), ("--overwrite", None, "trains again every run"),
])
def test_compare_has_no_train_only_flags(tmp_path, monkeypatch, capsys, flag, value, reason):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["compare", flag, *([value] if value else []), "--output-dir", "cmp"])
    assert exit_.value.code == 2
    assert reason in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()
    text = build_compare_parser().format_help()
    assert not re.search(rf"\s{flag}\b(?![-_s])", text)


# ----------------------------------------------------------------------------------------------- validation split


def test_the_validation_split_is_seeded_and_disjoint_from_test():
    problems = [{"question": f"q{i}", "answer": str(i)} for i in range(50)]
    test = [{"question": "q3", "answer": "3"}]
    train, val = validation_split(problems, 10, test=test)
    assert len(val) == 10 and len(train) == 40 and "q3" not in {p["question"] for p in val}
    assert {p["question"] for p in train} | {p["question"] for p in val} == {p["question"] for p in problems}
    assert validation_split(problems, 10, test=test) == (train, val)  # whatever the run's seed


def test_the_checkpoint_is_chosen_on_validation_never_on_test(tiny, tmp_path, monkeypatch, capsys):
    """Scripted accuracies: the test curve peaks at step 0, validation at step 1; best/ holds step 1's weights,
    and its test accuracy is measured once, after training."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from conspo import evaluation

    val_scores, test_scores, calls = [0.1, 0.5, 0.2], [0.9, 0.1, 0.3, 0.42], {"val": 0, "test": 0}

    def scripted(model, tokenizer, task, *, problems=None, **kwargs):
        kind = "test" if problems is None else "val"
        if kind == "val":
            assert len(problems) == 8 and not {p["question"] for p in problems} & {p["question"] for p in task.test}
        calls[kind] += 1
        return (test_scores if kind == "test" else val_scores)[calls[kind] - 1]

    monkeypatch.setattr(evaluation, "heldout_accuracy", scripted)
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(SMALL_YAML.replace("save_steps: 100", "save_steps: 1"))
    out = tmp_path / "run"
    rc, stdout, err = run_cli(capsys, "train", "--model", tiny, "--task", "arithmetic", "--config", str(cfg),
                              "--max-steps", "2", "--eval-every", "1", "--val-size", "8", "--output-dir", str(out))
    assert rc == 0, err
    selection = json.loads((out / "summary.json").read_text())["selection"]
    assert selection == {"rule": SELECTION_RULE.format(n=8), "val_problems": 8, "best_step": 1, "val_accuracy": 0.5,
                         "heldout_accuracy": 0.42, "checkpoint": str(out / BEST_DIR)}
    assert "never on the test problems; the ConSPO paper picked checkpoints on its test benchmarks" in selection["rule"]
    assert calls == {"val": 3, "test": 4}
    best, step1 = load_file(out / BEST_DIR / "model.safetensors"), load_file(out / "checkpoint-1/model.safetensors")
    assert best.keys() == step1.keys() and all(torch.equal(best[k], step1[k]) for k in best)
    AutoModelForCausalLM.from_pretrained(out / BEST_DIR)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["eval/val_accuracy"]) for r in logged if "eval/val_accuracy" in r] == [(0, 0.1), (1, 0.5),
                                                                                                 (2, 0.2)]


def test_a_best_checkpoint_newer_than_the_resume_point_is_dropped(tmp_path, capsys):
    best = tmp_path / BEST_DIR
    best.mkdir()
    (best / "best.json").write_text(json.dumps({"step": 6, "val_accuracy": 0.7}))
    keeper = BestCheckpoint(tmp_path, evaluate_val=None, tokenizer=None)
    keeper.restore(6)
    assert keeper.best == (0.7, 6) and best.is_dir()
    keeper = BestCheckpoint(tmp_path, evaluate_val=None, tokenizer=None)
    keeper.restore(4)  # the killed run chose step 6 after checkpoint-4: the resumed run decides again
    assert keeper.best is None and not best.exists()
    (tmp_path / ".best-old-123").mkdir()  # killed between the two renames of a save
    (tmp_path / ".best-old-123" / "best.json").write_text(json.dumps({"step": 2, "val_accuracy": 0.4}))
    keeper.restore(4)
    assert keeper.best == (0.4, 2) and best.is_dir() and not (tmp_path / ".best-old-123").exists()


# ----------------------------------------------------------------------------------------------- item 5: one writer


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_blocks_nothing(tmp_path, monkeypatch,
                                                                                       capsys):
    import signal
    import subprocess
    import sys

    from conspo.run import LOCK_FILE, RunLock, check_output_dir, prepare_output_dir

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    plan = plan_run(output_dir=out)
    prepare_output_dir(plan, check_output_dir(plan, resume=False, overwrite=False))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"f = open({str(out / LOCK_FILE)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
         "f.seek(0); f.truncate(); f.write(str(os.getpid())); f.flush(); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        message = refused(capsys, tmp_path, "train", "--output-dir", str(out), "--resume")
        assert f"is being written by another conspo process (PID {holder.pid})" in message
        assert "wait for it to end or stop it" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(out)  # the holder died: its PID is still in the file, and the lock is free
    lock.acquire()
    assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
    lock.release()
    assert check_output_dir(plan, resume=True, overwrite=False) == "resume"  # the lock file is no foreign content


# ----------------------------------------------------------------------------------------------- item 8: bad values


@pytest.mark.parametrize("yaml_text, needle", [
    ("num_iterations: 0", "num_iterations must be an integer >= 1, got 0 (from --config"),
    ("per_device_train_batch_size: 0", "per_device_train_batch_size must be an integer >= 1, got 0"),
    ("gradient_accumulation_steps: 0", "gradient_accumulation_steps must be an integer >= 1, got 0"),
    ("save_steps: 0", "save_steps must be an integer >= 1 (optimizer steps) or a fraction of max_steps in (0, 1)"),
    ("max_completion_length: 0", "max_completion_length must be an integer >= 1"),
    ("temperature: 0", "temperature must be a finite number in (0, inf), got 0"),
    ("num_generations: 512", "must be divisible by num_generations (512)"),
    ("learning_rate: fast", "learning_rate must be a number, got 'fast'"),
    ("not_a_field: 1", "unknown fields ['not_a_field']"),
])
def test_a_bad_config_value_is_one_line_and_nothing_is_written(tmp_path, monkeypatch, capsys, yaml_text, needle):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text + "\n")
    assert needle in refused(capsys, tmp_path, "train", "--config", str(cfg), "--output-dir", "run")
    assert not (tmp_path / "run").exists()


def test_a_bad_flag_value_names_the_command_line_and_a_lora_adapter_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    message = refused(capsys, tmp_path, "train", "--per-device-train-batch-size", "0", "--output-dir", "run")
    assert "per_device_train_batch_size must be an integer >= 1, got 0 (from the command line)" in message
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    message = refused(capsys, tmp_path, "train", "--model", str(adapter), "--output-dir", "run")
    assert "is a LoRA adapter, not a model" in message and "merge it into its base model org/base" in message
    assert not (tmp_path / "run").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # a model directory transformers cannot load
    message = refused(capsys, tmp_path, "train", "--model", str(broken), "--output-dir", "runs/run")
    assert f"--model {broken}: cannot be loaded" in message
    assert not (tmp_path / "runs").exists()  # the load failed before the output directory was made


# ----------------------------------------------------------------------------------------------- item 9: messages


def test_a_permission_error_at_a_save_says_so_and_removes_nothing_it_did_not_make(tmp_path):
    from types import SimpleNamespace

    from conspo.checkpoints import SaveError, guard_checkpoint_saves

    (tmp_path / "checkpoint-5").mkdir()

    def denied(model, trial):
        raise PermissionError(13, "Permission denied", str(tmp_path / "checkpoint-10"))

    trainer = SimpleNamespace(args=SimpleNamespace(output_dir=str(tmp_path), save_only_model=False, should_save=True),
                              state=SimpleNamespace(global_step=10), _save_checkpoint=denied)
    guard_checkpoint_saves(trainer)
    with pytest.raises(SaveError) as err:
        trainer._save_checkpoint(None, None)
    message = str(err.value)
    assert f"permission denied: {tmp_path} is not writable" in message and f"make {tmp_path} writable" in message
    assert "GiB" not in message and "free space" not in message and "was removed" not in message
    assert (tmp_path / "checkpoint-5").is_dir()
