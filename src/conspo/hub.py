"""A hub id given as ``--model``: answered in seconds when it cannot be fetched, before anything is written.

transformers, asked for a hub model with no network, retries for tens of seconds before failing with a traceback.
Here, before that: a model in the local Hugging Face cache is used as it is (with ``HF_HUB_OFFLINE`` set when the
hub cannot be reached, so transformers does not wait on it); a model not in the cache with ``HF_HUB_OFFLINE`` set,
or with the hub unreachable (no answer to one request within :data:`PROBE_TIMEOUT_S`), is refused in one line.
"""

from __future__ import annotations

import os
from pathlib import Path

PROBE_TIMEOUT_S = 3.0


class HubError(ValueError):
    """A hub model that cannot be had now; the message names ``--model`` and the way out."""


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cached(model: str, cache_dir: str | Path | None = None) -> bool:
    """Whether the local Hugging Face cache (``cache_dir``: another one) holds ``model``'s ``config.json``."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        found = try_to_load_from_cache(model, "config.json", cache_dir=cache_dir)
    except Exception:  # an id the hub library refuses (bad characters): transformers will say so
        return False
    return isinstance(found, str) and Path(found).is_file()


def reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub (``HF_ENDPOINT``, default huggingface.co) answers an HTTP request within ``timeout`` (any
    HTTP status counts: it answered)."""
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{endpoint}/api/whoami-v2", method="HEAD"),
                                    timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # URLError (no route, no name), a timeout, a malformed endpoint
        return False


def check_hub_model(model: str | None, *, probe=reachable, cache_dir: str | Path | None = None) -> None:
    """Raise :class:`HubError` for a hub id that cannot be fetched now (see the module docstring). Local paths and
    ``None`` (the embedded model) pass untouched."""
    if model is None or Path(model).expanduser().exists() or model.startswith((".", "/", "~")):
        return
    if cached(model, cache_dir):
        if not offline() and not probe():
            os.environ["HF_HUB_OFFLINE"] = "1"  # from the cache, without transformers' retries on the network
        return
    if offline():
        raise HubError(f"--model {model}: not in the local Hugging Face cache, and HF_HUB_OFFLINE is set; unset it "
                       f"to download the model, or pass a local model directory")
    if not probe():
        raise HubError(f"--model {model}: not in the local Hugging Face cache, and the hub cannot be reached (no "
                       f"answer within {PROBE_TIMEOUT_S:g} s); connect to the network, or pass a local model "
                       f"directory (a mistyped local path: start it with ./ or /)")
