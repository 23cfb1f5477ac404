"""`conspo compare` on a tiny model: the files it promises, reuse of finished runs, and the table."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("trl")
from tiny import save_tiny  # noqa: E402

from conspo.compare import compare, parse_methods  # noqa: E402
from conspo.run import RunError  # noqa: E402

SMALL = dict(per_device_train_batch_size=16, num_generations=4, max_completion_length=6, learning_rate=1e-3,
             save_steps=100)


def test_parse_methods_rejects_unknown_and_duplicates():
    assert parse_methods("conspo, grpo") == ["conspo", "grpo"]
    with pytest.raises(RunError, match=r"unknown \['ppo'\]; accepted values: conspo"):
        parse_methods("conspo,ppo")
    with pytest.raises(RunError, match="names a method twice"):
        parse_methods("grpo,grpo")
    with pytest.raises(RunError, match=r"--methods ',' names no method; give comma-separated methods from: conspo"):
        parse_methods(",")


def test_k_larger_than_samples_is_refused(tmp_path):
    with pytest.raises(RunError, match="every k must be <= --eval-samples"):
        compare(["conspo"], 1, tmp_path, eval_samples=2, ks=[1, 4], task="arithmetic")


@pytest.mark.slow
def test_compare_writes_table_and_figures_and_reuses_runs(tmp_path, capsys):
    model = str(save_tiny(tmp_path / "model"))
    options = dict(task="arithmetic", model=model, max_steps=2, config=SMALL, eval_limit=20)
    out = tmp_path / "cmp"
    result = compare(["conspo", "grpo"], 2, out, eval_samples=2, ks=[1, 2], **options)

    for name in ("results.md", "results.csv", "heldout.png", "separation.png", "credit.png"):
        assert (out / name).is_file(), name
    for method in ("conspo", "grpo"):
        for seed in (0, 1):
            run = out / method / f"seed{seed}"
            summary = json.loads((run / "summary.json").read_text())
            assert (summary["method"], summary["seed"], summary["steps"]) == (method, seed, 2)
            assert summary["heldout_problems"] == 20  # train's own eval_limit reaches train
            assert (run / "eval_summary.json").is_file() and (run / "final" / "config.json").is_file()

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == ["conspo", "grpo"]
    assert len(result["rows"]) == 2
    for row in rows:
        seeds = [json.loads((out / row["method"] / f"seed{s}" / "summary.json").read_text()) for s in (0, 1)]
        mean_after = sum(s["heldout_after"] for s in seeds) / 2
        assert float(row["after_mean"]) == pytest.approx(mean_after)
        evals = [json.loads((out / row["method"] / f"seed{s}" / "eval_summary.json").read_text()) for s in (0, 1)]
        for name in ("avg@1", "pass@2", "maj@2"):
            assert float(row[f"{name}_mean"]) == pytest.approx(sum(e["overall"][name] for e in evals) / 2)
    table = (out / "results.md").read_text()
    assert table.startswith("Task: arithmetic (held-out accuracy on 20 test problems); model: ")
    assert "\n| method | seeds | steps | held-out before | held-out after | gain (points) | avg@1 |" in table

    # An interrupted comparison: one run lost its summary (as if killed), the others are reused.
    finished = out / "grpo" / "seed0" / "summary.json"
    stamp = finished.stat().st_mtime_ns
    (out / "conspo" / "seed1" / "summary.json").unlink()
    capsys.readouterr()
    compare(["conspo", "grpo"], 2, out, eval_samples=2, ks=[1, 2], **options)
    log = capsys.readouterr().out
    assert log.count("reusing") == 3
    assert "conspo seed 1 ->" in log
    assert finished.stat().st_mtime_ns == stamp

    # Other sampling settings: the cached evaluations are not reused, every run is evaluated again.
    capsys.readouterr()
    compare(["conspo", "grpo"], 2, out, eval_samples=1, ks=[1], **options)
    assert capsys.readouterr().out.count("other sampling settings") == 4
    assert json.loads((out / "conspo" / "seed0" / "eval_summary.json").read_text())["ks"] == [1]


def test_the_table_reports_the_validation_chosen_checkpoint_with_its_rule(tmp_path):
    from conspo.compare import write_report
    from conspo.run import SELECTION_RULE

    summaries = {}
    for method, tests in (("conspo", (0.30, 0.40)), ("grpo", (0.20, 0.22))):
        runs = []
        for seed, test in enumerate(tests):
            run = tmp_path / method / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/heldout_accuracy": 0.1}) + "\n")
            runs.append({"method": method, "seed": seed, "heldout_before": 0.1, "heldout_after": 0.5, "steps": 4,
                         "metrics": str(run / "metrics.jsonl"), "final_checkpoint": str(run / "final"),
                         "selection": {"rule": SELECTION_RULE.format(n=64), "best_step": 2 + seed,
                                       "heldout_accuracy": test}})
        summaries[method] = runs
    context = {"task": "arithmetic", "model": "m", "max_steps": 4, "rollouts_per_step": 16, "num_generations": 4,
               "max_completion_length": 6, "heldout_problems": 20, "seeds": [0, 1], "val_size": 64}
    result = write_report(tmp_path, summaries, context=context)
    table = (tmp_path / "results.md").read_text()
    assert "| best checkpoint (validation-chosen) | best steps |" in table
    assert "| conspo | 2 | 4 | 10.0 ± 0.0 | 50.0 ± 0.0 | +40.0 ± 0.0 | 35.0 ± 7.1 | 2 3 |" in table
    assert ("checkpoint chosen on a validation split of 64 train problems, never on the test problems; the ConSPO "
            "paper picked checkpoints on its test benchmarks") in table
    assert result["rows"][1]["best_mean"] == pytest.approx(0.21)
