"""`conspo --help` answers without heavy imports; `conspo train` rejects bad input before any long work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conspo.run import RunError, check_output_dir, plan_run, prepare_output_dir, train


def test_help_imports_neither_torch_nor_transformers():
    code = (
        "import sys\n"
        "from conspo.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: conspo" in out
    assert "HEAVY []" in out


@pytest.mark.parametrize("argv, needle", [
    (["train", "--method", "ppo"], "invalid choice: 'ppo'"),
    (["train", "--max-steps", "ten"], "invalid int value: 'ten'"),
    (["compare", "--method", "grpo"], "conspo compare takes --methods"),
])
def test_a_mistyped_script_option_is_answered_before_torch_is_imported(argv, needle):
    code = (
        "import sys\n"
        "from conspo.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    print('EXIT', e.code)\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "EXIT 2" in proc.stdout and "HEAVY []" in proc.stdout
    assert needle in proc.stderr


@pytest.mark.parametrize("command", ["train", "eval", "compare"])
def test_subcommand_help_lists_options(command):
    out = subprocess.run([sys.executable, "-m", "conspo.cli", command, "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--model" in out


def test_unknown_method_is_rejected_by_the_parser():
    proc = subprocess.run([sys.executable, "-m", "conspo.cli", "train", "--method", "ppo"], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert "invalid choice: 'ppo'" in proc.stderr and "conspo" in proc.stderr


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(method="ppo"), "unknown method 'ppo'; accepted values: conspo, disco, grpo"),
        (dict(task="no_such_task"), "unknown task 'no_such_task'"),
        (dict(dataset="/nonexistent/data.jsonl"), "no such file"),
        (dict(model="/nonexistent/model"), "not a model directory"),
        (dict(max_steps=0), "--max-steps must be an integer >= 1, got 0"),
        (dict(template="fancy"), "template must be 'plain' or 'chat'"),
    ],
)
def test_bad_input_fails_fast(tmp_path, kwargs, needle):
    with pytest.raises((RunError, ValueError)) as err:
        train(output_dir=tmp_path / "run", **kwargs)
    assert needle in str(err.value)
    assert not (tmp_path / "run" / "final").exists()


def test_dataset_missing_its_fields_is_named(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "1+1", "label": "2"}) + "\n")
    with pytest.raises(ValueError) as err:
        train(dataset=str(data), output_dir=tmp_path / "run")
    assert "question" in str(err.value)


def test_yaml_config_with_unknown_field(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("learning_rate: 1.0e-4\nnot_a_field: 3\n")
    with pytest.raises(RunError, match=r"unknown fields \['not_a_field'\]"):
        train(config=str(cfg), output_dir=tmp_path / "run")


def test_output_dir_holding_another_run(tmp_path):
    out = tmp_path / "run"
    plan = plan_run(output_dir=out)
    assert check_output_dir(plan, resume=False, overwrite=False) == "new"
    prepare_output_dir(plan, "new")
    assert json.loads((out / "run.json").read_text())["config_hash"] == plan.config_hash
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunError, match="pass --resume to continue it, --overwrite to delete it and start again"):
        check_output_dir(plan, resume=False, overwrite=False)
    other = plan_run(output_dir=out, seed=1)
    with pytest.raises(RunError, match=r"holds a run with other settings: seed \(saved 0, now 1\)\. "):
        check_output_dir(other, resume=True, overwrite=False)
    assert check_output_dir(plan, resume=True, overwrite=False) == "resume"  # the same run resumes
    assert (out / "metrics.jsonl").exists()
    assert check_output_dir(other, resume=False, overwrite=True) == "replace"
    prepare_output_dir(other, "replace")
    assert not (out / "metrics.jsonl").exists() and json.loads((out / "run.json").read_text())["seed"] == 1


def test_a_run_recorded_before_its_settings_were_kept_resumes_on_its_identity(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"method": "conspo", "task": "arithmetic", "model": "embedded-tiny",
                                              "seed": 0}))
    assert check_output_dir(plan_run(output_dir=out), resume=True, overwrite=False) == "resume"
    with pytest.raises(RunError, match=r"method \(saved 'conspo', now 'grpo'\)"):
        check_output_dir(plan_run(method="grpo", output_dir=out), resume=True, overwrite=False)


def test_foreign_directory_is_not_overwritten(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(RunError, match="holds no conspo run") as err:
            check_output_dir(plan_run(output_dir=out), resume=False, overwrite=overwrite)
        assert "--overwrite" not in str(err.value)
    assert (out / "notes.txt").read_text() == "mine"


def test_eval_help_names_the_paper_protocol_and_that_flags_override_it():
    out = subprocess.run([sys.executable, "-m", "conspo.cli", "eval", "--help"], capture_output=True, text=True,
                         check=True).stdout
    text = " ".join(out.split())
    assert "--protocol {default,paper}" in text and "--top-p TOP_P" in text
    assert "temperature 0.6, top-p 0.95, 32 samples, k 1,32" in text
    assert "given explicitly override the preset's values" in text
