"""benchmarks/gpu_study.py: a thin driver over conspo compare, end to end at CPU-smoke size."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_study():
    spec = importlib.util.spec_from_file_location("gpu_study", ROOT / "benchmarks" / "gpu_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_driver_is_thin():
    assert len((ROOT / "benchmarks" / "gpu_study.py").read_text().splitlines()) < 200


def test_cpu_smoke_runs_conspo_compare_end_to_end(gpu_study, tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    assert gpu_study.main(["--cpu-smoke", "--sft-seconds", "3", "--out", str(out), "--work-dir", str(work)]) == 0
    study = json.loads((out / "study.json").read_text())
    assert [r["method"] for r in study["rows"]] == ["conspo", "grpo"]
    for method in ("conspo", "grpo"):  # every run is an ordinary conspo run of the smoke settings
        summary = json.loads((out / method / "seed0" / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["rollouts_per_step"] == 16 and summary["num_generations"] == 4
        assert summary["model"] == "embedded-smoke" and summary["task"] == "arithmetic_worked"
        assert summary["heldout_problems"] == 48 and 0.0 <= summary["heldout_after"] <= 1.0
        record = json.loads((out / method / "seed0" / "run.json").read_text())["settings"]
        assert record["task_options"] == {"difficulty": "2x2:+-", "n_train": 2048, "n_test": 48}
        assert record["embedded"]["scale"] == "smoke" and record["embedded"]["warm_start"]["max_seconds"] == 3.0
        assert record["embedded"]["warm_start"]["teacher_slip"] == 0.6
        sampled = json.loads((out / method / "seed0" / "eval_summary.json").read_text())
        assert sampled["ks"] == [1, 8] and sampled["settings"]["samples"] == 8
        assert sampled["overall"]["pass@8"] >= sampled["overall"]["avg@1"]
        assert any("conspo/score_sd" in json.loads(line)  # the score spread tau is calibrated from
                   for line in (out / method / "seed0" / "metrics.jsonl").read_text().splitlines())
    table = (out / "results.md").read_text()
    assert "| conspo | 1 | 2 |" in table and "| grpo | 1 | 2 |" in table and "pass@8" in table
    assert "model: embedded-smoke" in table and capsys.readouterr().out.rstrip().endswith(table.rstrip())
    # Both runs start from the same cached warm start; a rerun reuses the finished runs.
    before = [json.loads((out / m / "seed0" / "summary.json").read_text())["heldout_before"] for m in ("conspo", "grpo")]
    assert before[0] == before[1] and len(list(work.glob("tiny-*"))) == 1
    assert gpu_study.main(["--cpu-smoke", "--sft-seconds", "3", "--out", str(out), "--work-dir", str(work)]) == 0
    assert "reusing" in capsys.readouterr().out


def test_bad_arguments_are_refused_with_the_accepted_values(gpu_study, tmp_path):
    from conspo.tasks.arithmetic import ArithmeticSpec, resolve_spec

    assert resolve_spec("3x2:+-*") == ArithmeticSpec(n_operands=3, digits=2, operators="+-*")
    out = ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="--teacher-slip 1.5: must be in"):
        gpu_study.main(["--cpu-smoke", "--teacher-slip", "1.5", *out])
    with pytest.raises(SystemExit, match="--sft-stop-at 0.0: must be in"):
        gpu_study.main(["--cpu-smoke", "--sft-stop-at", "0", *out])
    with pytest.raises(SystemExit, match="unknown \\['ppo'\\]; accepted values: conspo"):
        gpu_study.main(["--cpu-smoke", "--methods", "conspo,ppo", *out])
    with pytest.raises(SystemExit, match="per-method overrides"):
        gpu_study.main(["--cpu-smoke", "--methods", "conspo@tau=0.3", *out])
    with pytest.raises(SystemExit, match="expected OPERANDSxDIGITS:OPERATORS"):
        gpu_study.main(["--cpu-smoke", "--difficulty", "3:+-", *out])
    with pytest.raises(SystemExit, match="split holds only|has only|only .* problems"):  # 2x1:+ holds 100 problems
        gpu_study.main(["--cpu-smoke", "--difficulty", "2x1:+", *out])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option,value", [("--rl-steps", "0"), ("--num-generations", "1"), ("--lr", "-1e-4"),
                                          ("--eval-samples", "-1"), ("--temperature", "nan"), ("--seeds", "0")])
def test_out_of_range_numbers_are_refused_by_the_parser(gpu_study, option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_study.build_parser().parse_args([f"{option}={value}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and "must be" in err


def test_the_help_names_only_options_that_exist(gpu_study):
    from conspo.trainer import ConSPOConfig

    text = gpu_study.build_parser().format_help()
    assert "margin_type" not in text and "conspo@" not in text  # (the old help advertised a field that does not exist)
    fields = {f for f in ConSPOConfig.__dataclass_fields__}
    options = gpu_study.compare_options(gpu_study.build_parser().parse_args(["--cpu-smoke"]))
    script = {"methods", "seeds", "eval_samples", "ks", "sample_limit", "eval_temperature", "task", "task_options",
              "embedded_scale", "warm_start", "warm_start_seconds", "max_steps", "eval_limit", "eval_every"}
    assert set(options) - script <= fields  # every other option is a ConSPOConfig field
