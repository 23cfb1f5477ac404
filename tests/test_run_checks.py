"""`conspo train` refusals and failures as one line (issue 14 items 8 and 9): a dataset too small for the embedded
model's warm start, and an unexpected runtime error (exit 1, no traceback unless CONSPO_DEBUG=1)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")

from conspo.cli import main  # noqa: E402


def test_a_small_dataset_with_the_embedded_model_is_refused(tmp_path, capsys):
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(100)))
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(data), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith(f"conspo train: error: {data}: 90 train problems, but the embedded tiny model's warm "
                             f"start holds 512 of them back")
    assert "pass --model" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("debug", [False, True])
def test_a_runtime_failure_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch, debug):
    from conspo import run

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(run, "_run", broken)
    if debug:
        monkeypatch.setenv("CONSPO_DEBUG", "1")
    else:
        monkeypatch.delenv("CONSPO_DEBUG", raising=False)
    assert main(["train", "--output-dir", str(tmp_path / "run"), "--max-steps", "1"]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last == ("conspo train: error: RuntimeError: something inside broke (CONSPO_DEBUG=1 shows the "
                    "traceback)")
    assert ("Traceback" in err) == debug
