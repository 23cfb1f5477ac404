"""Tiny offline fixtures for trainer tests: a character tokenizer and a Qwen2 model built from a config."""

from __future__ import annotations

from pathlib import Path

CHARS = list("0123456789+-*= ")


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def build_model(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return Qwen2ForCausalLM(config)


def save_tiny(path: Path, seed: int = 0) -> Path:
    tok = build_tokenizer()
    model = build_model(len(tok), seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def odd_digit_parity(prompts, completions, **kwargs):
    """1 when a completion holds an odd number of odd digits: a random policy earns it about half the
    time, so groups are mixed without any training."""
    return [float(sum(ch in "13579" for ch in c) % 2 == 1) for c in completions]
