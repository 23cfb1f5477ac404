"""`conspo train` under torchrun on two CPU processes (gloo), issue 14 item 14: the trainer sees a world of two,
rank 0 alone writes run.json, metrics.jsonl, curves.png, summary.json and final/ and runs the held-out
evaluations (each once), and a SIGKILL of one rank leaves a run that `torchrun ... --resume` finishes.

The run uses the tiny model of ``tests/tiny.py`` (the embedded default's warm start takes minutes on a fresh
machine); the code path is the same as the embedded default's after the model is loaded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("trl")
from tiny import save_tiny  # noqa: E402

from conspo.checkpoints import checkpoint_problem  # noqa: E402

SETTINGS = ["--per-device-train-batch-size", "8", "--num-generations", "4", "--max-completion-length", "6",
            "--save-steps", "1", "--eval-limit", "20", "--eval-every", "1", "--learning-rate", "1e-3"]


def torchrun(tiny: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "conspo.cli", "train", "--model", str(tiny), "--task", "arithmetic", "--max-steps", "3",
            "--seed", "0", "--output-dir", str(out), *SETTINGS, *extra]


def workers(parent: int) -> dict[int, int]:
    """rank -> PID of the worker processes torchrun started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        rank = next((int(v.split(b"=")[1]) for v in environ if v.startswith(b"RANK=")), None)
        if ppid == parent and rank is not None:
            found[rank] = int(entry.name)
    return found


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_steps(path: Path) -> list[int]:
    try:
        return [r["step"] for r in records(path) if "loss" in r]
    except (OSError, json.JSONDecodeError):
        return []


@pytest.mark.slow
def test_torchrun_two_processes_write_once_and_resume_after_a_rank_is_killed(tmp_path):
    tiny = save_tiny(tmp_path / "tiny", seed=0)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    first = subprocess.Popen(torchrun(tiny, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    deadline = time.monotonic() + 120
    while first.poll() is None and time.monotonic() < deadline and max(loss_steps(out / "metrics.jsonl"),
                                                                       default=0) < 2:
        time.sleep(0.05)
    ranks = workers(first.pid)
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGKILL)  # one rank dies; torchrun stops the other
    log, _ = first.communicate(timeout=120)
    assert first.returncode != 0, log[-3000:]
    assert not (out / "summary.json").exists() and not (out / "final").exists()
    assert (out / "run.json").is_file() and checkpoint_problem(out / "checkpoint-1") is None

    resumed = subprocess.run(torchrun(tiny, out, "--resume"), env=env, capture_output=True, text=True, timeout=180)
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert summary["rollouts_per_step"] == 2 * 8  # each process's batch, twice
    # Written once: one record per (step, key), one before-training and one final evaluation, one summary line.
    logged = records(out / "metrics.jsonl")
    keys = [(r["step"], k) for r in logged for k in r if k not in ("step", "epoch")]  # (the end repeats epoch)
    assert len(keys) == len(set(keys)), logged
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in logged if "eval/heldout_accuracy" in r] == [0, 1, 2, 3]
    assert log.count("held-out accuracy before training") <= 1  # (the resumed run does not evaluate step 0 again)
    assert resumed.stdout.count("--resume: continuing from") == 1
    assert resumed.stdout.count(" -> ") == 1 and resumed.stdout.count("[conspo] metrics:") == 1
    assert (out / "curves.png").is_file() and (out / "final" / "model.safetensors").is_file()
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".best-*"))


@pytest.mark.slow
def test_a_sigterm_to_one_rank_stops_both_at_the_same_step_with_a_checkpoint(tmp_path):
    """SIGTERM reaches rank 1 only: the ranks agree on it at the step's end (all-reduce), both stop after the same
    step, rank 0 saves a complete checkpoint there and names the launcher's --resume; nobody waits forever."""
    tiny = save_tiny(tmp_path / "tiny", seed=0)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*torchrun(tiny, out, "--save-steps", "100", "--eval-every", "0")]
    command[command.index("--max-steps") + 1] = "50"
    run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while run.poll() is None and time.monotonic() < deadline and not loss_steps(out / "metrics.jsonl"):
        time.sleep(0.05)
    ranks = workers(run.pid)
    os.kill(ranks[1], signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    stopped = [line for line in err.splitlines() if line.startswith("[conspo] stopped by SIGTERM after step ")]
    assert len(stopped) == 1, err[-3000:]  # said once, by rank 0 (which never received the signal)
    step = int(stopped[0].split("after step ")[1].split()[0])
    assert step < 50 and checkpoint_problem(out / f"checkpoint-{step}") is None
    assert loss_steps(out / "metrics.jsonl") == list(range(1, step + 1))
    assert "the same launch command (torchrun / accelerate launch) with: -m conspo.cli train" in stopped[0]
    assert not (out / "summary.json").exists()
