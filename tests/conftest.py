import sys
from pathlib import Path

import pytest

# tests import their shared helpers (tiny fixtures, reference code) by module name
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny causal LM of tests/tiny.py (seed 0), saved once per test module that asks for it."""
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module: the tiny models run many times faster so on a shared machine. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A one-layer model of the embedded model's shape family and its character tokenizer, saved once per module
    (conspo.embedded's factory, so loaders and evaluation see what `conspo train` builds)."""
    from conspo.embedded import TinyModelSpec, build_model, build_tokenizer

    tokenizer = build_tokenizer()
    spec = TinyModelSpec(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny")
    build_model(tokenizer, spec, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
