"""benchmarks/gpu_study.py: the warm start's targets and the whole script end to end at CPU-smoke size."""

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


def test_cpu_smoke_runs_end_to_end_and_writes_the_table(gpu_study, tmp_path, capsys):
    out = tmp_path / "out"
    rc = gpu_study.main(["--cpu-smoke", "--sft-seconds", "3", "--no-warmup-run", "--out", str(out),
                         "--work-dir", str(tmp_path / "work")])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    meta, runs = data["meta"], data["runs"]
    assert [r["method"] for r in runs] == ["conspo", "grpo"]
    assert all(r["rl_steps"] == 2 and 0.0 <= r["heldout_after"] <= 1.0 for r in runs)
    for r in runs:  # the first batch's within-group spread, from the trainer's dump
        spread = r["score_spread_step1"]
        assert spread["groups"] == 4 and spread["median_group_sd"] >= 0.0
    assert "first-batch score spread within groups" in (out / "results.md").read_text()
    for r in runs:  # the sampled evaluation: 8 completions per held-out problem
        m = r["sampled"]
        assert set(m) == {"avg@1", "pass@8", "maj@8"} and all(0.0 <= v <= 1.0 for v in m.values())
        assert m["pass@8"] >= m["avg@1"] and m["pass@8"] >= m["maj@8"]
    # Both runs start from the same saved warm start.
    assert runs[0]["heldout_before"] == runs[1]["heldout_before"]
    assert meta["answer_only"] is False and meta["teacher_slip"] == 0.6
    assert meta["max_completion_length"] > 6  # worked solutions, longer than the bare answers
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].startswith("| grpo | 0 |")  # the table is printed last
    assert "worked solutions, teacher slip 0.6" in (out / "results.md").read_text()

    # A rerun in the same --work-dir with the same warm-start settings reuses the saved warm start.
    again = tmp_path / "again"
    assert gpu_study.main(["--cpu-smoke", "--sft-seconds", "3", "--no-warmup-run", "--out", str(again),
                           "--work-dir", str(tmp_path / "work"), "--methods", "grpo"]) == 0
    rerun = json.loads((again / "results.json").read_text())
    assert "warm start reused" in capsys.readouterr().out
    assert rerun["meta"]["sft"]["reused"] is True and rerun["meta"]["sft"]["steps"] == meta["sft"]["steps"]
    assert rerun["runs"][0]["heldout_before"] == runs[0]["heldout_before"]
    # Other warm-start settings train a new one.
    assert gpu_study.main(["--cpu-smoke", "--sft-seconds", "3", "--no-warmup-run", "--out", str(again),
                           "--work-dir", str(tmp_path / "work"), "--methods", "grpo", "--teacher-slip", "0"]) == 0
    assert "reused" not in json.loads((again / "results.json").read_text())["meta"]["sft"]


def test_bad_arguments_are_refused_with_the_accepted_values(gpu_study):
    with pytest.raises(SystemExit, match="--teacher-slip 1.5: must be in"):
        gpu_study.main(["--cpu-smoke", "--teacher-slip", "1.5"])
    with pytest.raises(SystemExit, match="unknown 'ppo' in 'ppo'; accepted: .*conspo"):
        gpu_study.main(["--cpu-smoke", "--methods", "conspo,ppo"])
    with pytest.raises(SystemExit, match="conspo@taux=0.3"):
        gpu_study.main(["--cpu-smoke", "--methods", "conspo@taux=0.3"])
    with pytest.raises(SystemExit, match="tau"):
        gpu_study.main(["--cpu-smoke", "--methods", "conspo@tau=-1"])
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        gpu_study.main(["--cpu-smoke", "--methods", "conspo@tau"])
    with pytest.raises(SystemExit, match="expected OPERANDSxDIGITS:OPERATORS"):
        gpu_study.main(["--cpu-smoke", "--difficulty", "3:+-"])
    with pytest.raises(SystemExit, match="--sft-stop-at 0.0: must be in"):
        gpu_study.main(["--cpu-smoke", "--sft-stop-at", "0"])
    with pytest.raises(SystemExit, match="give a count >= 1"):
        gpu_study.main(["--cpu-smoke", "--seeds", "0"])
    with pytest.raises(SystemExit, match="give a count >= 1"):
        gpu_study.main(["--cpu-smoke", "--seeds", "a,b"])
    with pytest.raises(SystemExit, match="has only .* problems"):  # 2x1:+ holds 100 problems; the smoke asks 2048
        gpu_study.main(["--cpu-smoke", "--difficulty", "2x1:+"])


@pytest.mark.parametrize("option,value", [("--rl-steps", "0"), ("--num-generations", "1"), ("--lr", "-1e-4"),
                                          ("--eval-samples", "-1"), ("--temperature", "nan")])
def test_out_of_range_numbers_are_refused_by_the_parser(gpu_study, option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_study.build_parser().parse_args([f"{option}={value}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and ("must be" in err)


def test_method_overrides_are_parsed_with_their_types(gpu_study):
    assert gpu_study.parse_method("grpo") == ("grpo", {})
    assert gpu_study.parse_method("conspo@tau=0.3@neg_reduce=mean@trust_region=true") == (
        "conspo", {"tau": 0.3, "neg_reduce": "mean", "trust_region": True})
    gpu_study.check_methods(["conspo@tau=0.3", "disco", "dapo"])  # accepted: no exception


def test_score_spread_against_a_hand_computed_batch(gpu_study, tmp_path):
    # group 0: scores -1, -2 (one right, one wrong): sd 0.5, gap +1; group 1: -1, -1, -4 all wrong: sd sqrt(2);
    # group 2: one sample: no sd. Median of [0.5, 1.414...] = 0.957...
    path = tmp_path / "batch-step1.json"
    path.write_text(json.dumps({"scores": [-1.0, -2.0, -1.0, -1.0, -4.0, -3.0], "correct": [1, 0, 0, 0, 0, 1],
                                "group_ids": [0, 0, 1, 1, 1, 2]}))
    spread = gpu_study.score_spread(path)
    assert spread["median_group_sd"] == pytest.approx((0.5 + 2 ** 0.5) / 2, abs=1e-4)
    assert spread["mean_gap"] == pytest.approx(1.0) and spread["mixed_groups"] == 1 and spread["groups"] == 3
    assert gpu_study.score_spread(tmp_path / "missing.json") is None
