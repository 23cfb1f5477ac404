"""Every method of the paper by name (issue 15): its seven baselines and its Table 6 ablations train through
`conspo train --method ...` and run side by side in `conspo compare`, each with the configuration its name says."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")
import torch  # noqa: E402
from tiny import save_tiny  # noqa: E402

from conspo import cli  # noqa: E402
from conspo.compare import compare  # noqa: E402
from conspo.presets import ABLATIONS, METHODS  # noqa: E402

SMALL = dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=6, learning_rate=1e-3,
             save_steps=100)


def test_the_paper_methods_are_named():
    assert set(METHODS) == {"conspo", "grpo", "dapo", "dr_grpo", "disco", "gmpo", "cispo", "sapo", "gspo"}
    assert set(ABLATIONS) == {"conspo_linear_gap", "conspo_clipped_ratio", "conspo_no_margin", "conspo_fixed_margin"}


@pytest.mark.parametrize(("method", "field", "want"), [
    ("sapo", "loss_type", "sapo"),
    ("gmpo", "objective", "gmpo"),
])
def test_train_command_runs_sapo_and_gmpo(tmp_path, method, field, want):
    model = save_tiny(tmp_path / "model")
    config = tmp_path / "small.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in SMALL.items()))
    out = tmp_path / "run"
    rc = cli.main(["train", "--method", method, "--model", str(model), "--task", "arithmetic", "--max-steps", "2",
                   "--config", str(config), "--output-dir", str(out), "--eval-limit", "10"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["method"], summary["steps"]) == (method, 2)
    args = torch.load(out / "final" / "training_args.bin", weights_only=False) if (
        out / "final" / "training_args.bin").exists() else None
    if args is None:
        args = torch.load(sorted(out.glob("checkpoint-*"))[-1] / "training_args.bin", weights_only=False)
    assert getattr(args, field) == want
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("conspo/auc" in r for r in logged)  # the shared diagnostics, for the new baselines too


@pytest.mark.slow
def test_compare_runs_the_table_6_ablations(tmp_path):
    model = str(save_tiny(tmp_path / "model"))
    methods = ["conspo", *ABLATIONS]
    out = tmp_path / "cmp"
    compare(methods, 1, out, eval_samples=2, ks=[1, 2], task="arithmetic", model=model, max_steps=1, config=SMALL,
            eval_limit=10)
    table = (out / "results.md").read_text()
    for method in methods:
        assert f"| {method} " in table or f"| {method}|" in table, method
        args = torch.load(sorted((out / method / "seed0").glob("checkpoint-*"))[-1] / "training_args.bin",
                          weights_only=False)
        if method == "conspo_linear_gap":
            assert (args.objective, args.disco_variant, args.trust_region) == ("disco", "basic", False)
        elif method == "conspo_clipped_ratio":
            assert (args.objective, args.score) == ("conspo", "clipped_ratio")
        elif method == "conspo_no_margin":
            assert args.margin_max == 0.0
        elif method == "conspo_fixed_margin":
            assert (args.margin_schedule, args.margin_max) == ("constant", 0.01)
        else:
            assert (args.objective, args.tau, args.margin_schedule) == ("conspo", 10.0, "cosine")
