"""Helpers of tests/test_vllm.py: a tiny Qwen2 whose head size vLLM's CPU attention accepts, and vLLM's view of it.

vLLM's CPU attention takes head sizes 32, 64, 80 and more; tests/tiny.py's model (hidden 32, 4 heads: head size 8)
is refused, so this one has hidden 128 and 4 heads (head size 32). vLLM loads weights from the model's directory
(``name_or_path``), so the model is saved before the trainer is built.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny import build_tokenizer

HIDDEN = 128
HEADS = 4


def save_vllm_tiny(path: Path, seed: int = 0) -> Path:
    """A float32 tiny Qwen2 (head size 32) and the character tokenizer of tests/tiny.py, saved under ``path``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    model = Qwen2ForCausalLM(config)
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = 0, 1, 2
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def vllm_next_token_logprobs(llm, prompt_ids: list[int], vocab_size: int) -> torch.Tensor:
    """(vocab_size,) vLLM's log-probabilities of the token after ``prompt_ids`` (one greedy step, all tokens)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=1.0, logprobs=vocab_size, seed=0)
    out = llm.generate([{"prompt_token_ids": list(prompt_ids)}], params, use_tqdm=False)
    ranked = out[0].outputs[0].logprobs[0]  # {token id: Logprob} at the first generated position
    logprobs = torch.full((vocab_size,), float("nan"), dtype=torch.float64)
    for token, entry in ranked.items():
        if token < vocab_size:
            logprobs[token] = entry.logprob
    return logprobs


@torch.no_grad()
def trainer_next_token_logprobs(model, prompt_ids: list[int], vocab_size: int) -> torch.Tensor:
    """(vocab_size,) the trainer model's log-softmax at the last prompt position."""
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([prompt_ids], device=device)).logits[0, -1].double()
    return torch.log_softmax(logits[:vocab_size], dim=-1).cpu()
