"""What `conspo train` shows (issue 14 items 13 and 15): one progress bar with a short postfix, no per-step dict,
no deprecation warnings about transformers' internals, a no-signal warning at the first step without one, the
effective settings of a pretrained-model run, --log-completions as lines; and the default save_steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from conspo.console import completion_lines, no_signal_message, postfix, quiet_internal_warnings

pytest.importorskip("trl")
from tiny import save_tiny  # noqa: E402


def test_postfix_shows_the_few_values_one_watches():
    logs = {"reward": 0.34567, "conspo/auc": 0.6761, "step_time": 4.754, "loss": 16.2, "entropy": 0.4}
    assert postfix(logs, 0.438) == {"reward": "0.346", "held-out": "43.8%", "auc": "0.676", "s/step": "4.8"}
    assert postfix({"loss": 1.0}, None) == {}


def test_the_no_signal_message_fires_only_when_every_group_is_degenerate():
    assert no_signal_message({"frac_reward_zero_std": 0.9, "reward": 0.0}, 1, 8) is None
    assert no_signal_message({}, 1, 8) is None
    text = no_signal_message({"frac_reward_zero_std": 1.0, "reward": 0.0}, 1, 8)
    assert text.startswith("step 1: every group of 8 completions scored the same (mean reward 0.000)")
    assert "--log-completions" in text


def test_completion_lines_are_short_and_carry_the_rewards():
    trainer = SimpleNamespace(_logs={"prompt": ["1+1=", "2+2="], "completion": ["2", "x" * 400],
                                     "rewards": {"correct": [1.0, 0.0]}})
    lines = completion_lines(trainer, 4)
    assert lines[0] == "  '1+1=' -> '2' [correct 1.00]"
    assert len(lines[1]) < 200 and lines[1].endswith("...' [correct 0.00]")
    assert completion_lines(trainer, 1) == [lines[1]]  # the newest
    assert completion_lines(SimpleNamespace(), 4) == []


def test_internal_deprecations_are_hidden_and_others_are_not():
    def from_transformers(message, category=FutureWarning):
        exec(compile("import warnings\nwarnings.warn(m, c)", "transformers/x.py", "exec"),
             {"__name__": "transformers.modeling_utils", "m": message, "c": category})

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_internal_warnings()
        from_transformers("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `x` instead.")
        from_transformers("`gradient_checkpointing` is deprecated and will be removed in v6. Use `y` instead.")
        from_transformers("`torch_dtype` is deprecated! Use `dtype` instead!")  # one a user can act on
        from_transformers("`is_gradient_checkpointing` is deprecated and will be removed in v6.", UserWarning)
        # not transformers':
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                      stacklevel=1)
    assert [str(w.message)[:12] for w in caught] == ["`torch_dtype", "`is_gradient", "`is_gradient"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_internal_warnings({"gradient_checkpointing"})  # the user set it: the new name is worth saying
        from_transformers("`gradient_checkpointing` is deprecated and will be removed in v6. Use `y` instead.")
    assert len(caught) == 1


def test_default_save_steps():
    from conspo.run import default_save_steps

    assert [default_save_steps(n) for n in (1, 3, 4, 10, 30, 60, 100, 250, 1000)] == [1, 3, 4, 10, 10, 10, 10, 25,
                                                                                       100]


@pytest.mark.slow
def test_the_console_of_a_short_pretrained_model_run(tmp_path):
    """Two steps on the tiny model given as --model, with the progress bar on and --log-completions."""
    tiny = save_tiny(tmp_path / "tiny", seed=0)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "conspo.cli", "train", "--model", str(tiny), "--task", "arithmetic",
               "--output-dir", str(out), "--max-steps", "2", "--per-device-train-batch-size", "16",
               "--num-generations", "4", "--max-completion-length", "6", "--eval-limit", "20",
               "--log-completions", "true", "--num-completions-to-print", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    both = done.stdout + done.stderr
    assert "{'loss'" not in both and "'frac_reward_zero_std'" not in both  # TRL's dict is not printed
    assert "is deprecated and will be removed in v6" not in both
    assert "Writing model shards" not in both
    assert "training: 100%" in done.stderr and "reward=" in done.stderr and "s/step=" in done.stderr
    assert "held-out=" in done.stderr
    settings = [line for line in done.stdout.splitlines() if "settings for a pretrained model" in line]
    assert len(settings) == 1
    assert "learning_rate 1e-06 (conspo's default)" in settings[0]
    assert "num_generations 4 (the command line)" in settings[0] and "max_steps 2 (the command line)" in settings[0]
    assert "save_steps 2 (conspo's default)" in settings[0] and "LoRA off" in settings[0]
    assert done.stderr.count("[conspo] step 1 completions:") == 1 and " -> " in done.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # still every value in metrics.jsonl
    assert all("frac_reward_zero_std" in r for r in records if "loss" in r)
    degenerate = [r["step"] for r in records if r.get("frac_reward_zero_std") == 1.0]
    warned = [line for line in done.stderr.splitlines() if "no group has a learning signal" in line]
    assert len(warned) == (1 if degenerate else 0)  # said once, at the first step without a mixed group
    if degenerate:
        assert f"step {degenerate[0]}: every group of 4 completions" in warned[0]
    assert (Path(out) / "final").is_dir()


def test_the_resume_command_repeats_the_arguments(monkeypatch):
    from conspo.stopping import resume_command

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["train", "--output-dir", "runs/a b", "--overwrite", "--seed", "1"]
    assert resume_command(argv) == "conspo train --output-dir 'runs/a b' --seed 1 --resume"
    assert resume_command(["train", "--resume"]) == "conspo train --resume"
    assert resume_command(None) == "the same train(...) call with resume=True"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resume_command(argv) == ("the same launch command (torchrun / accelerate launch) with: -m conspo.cli "
                                    "train --output-dir 'runs/a b' --seed 1 --resume")
