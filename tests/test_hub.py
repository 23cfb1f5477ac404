"""A hub id as --model when it cannot be fetched (issue 14 item 8): one line in seconds, not a traceback after
25-71 s; a cached model is used offline without waiting on the network."""

from __future__ import annotations

import time

import pytest

from conspo.hub import HubError, check_hub_model


def fake_cache(root, repo="org/name"):
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    (folder / "snapshots" / "abc123" / "config.json").write_text("{}")
    return root


def unreachable():
    return False


def test_a_model_not_cached_with_no_network_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(HubError, match=r"--model org/other: not in the local Hugging Face cache, and the hub cannot be "
                                       r"reached \(no answer within 3 s\)"):
        check_hub_model("org/other", probe=unreachable, cache_dir=fake_cache(tmp_path))


def test_offline_and_not_cached_is_refused_without_a_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def probe():
        raise AssertionError("no probe when HF_HUB_OFFLINE is set")

    with pytest.raises(HubError, match="not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"):
        check_hub_model("org/other", probe=probe, cache_dir=fake_cache(tmp_path))


def test_a_cached_model_passes_and_goes_offline_when_the_hub_is_down(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cache = fake_cache(tmp_path)
    check_hub_model("org/name", probe=lambda: True, cache_dir=cache)
    import os

    assert "HF_HUB_OFFLINE" not in os.environ
    check_hub_model("org/name", probe=unreachable, cache_dir=cache)
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # transformers reads the cache without waiting on the network


def test_local_paths_and_the_embedded_model_are_not_probed(tmp_path):
    def probe():
        raise AssertionError("probed")

    for model in (None, str(tmp_path), "./typo-dir", "/no/such/dir"):
        check_hub_model(model, probe=probe, cache_dir=tmp_path)


def test_the_real_probe_fails_fast_without_a_route(monkeypatch):
    from conspo import hub

    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # a name that never resolves (RFC 6761)
    start = time.monotonic()
    assert hub.reachable(timeout=1.0) is False
    assert time.monotonic() - start < 5
