"""The one place a problem becomes a prompt: the prompt object TRL gets, and the exact ids a model sees.

Every path goes through here: the embedded model's supervised warm start (``conspo.embedded``), the RL dataset
handed to TRL (``run.train``), greedy evaluation (``evaluation.greedy_accuracy``: held-out checks during training and
the warm start's stopping rule) and sampled evaluation (``evaluation.evaluate``: ``conspo eval``, ``conspo
compare``, both backends). ``tasks.datasets.format_prompt`` is a name for :func:`render_prompt`, not a second
renderer. Before this module each rendered prompts its own way,
and the warm start saw ``question + instruction`` while RL and evaluation saw ``question + "\\n" + instruction``
(issue 13, item 5).

- :func:`render_prompt` / :func:`problem_prompt`: the dataset ``"prompt"`` value. ``template="plain"`` gives the
  string ``question + "\\n" + instruction`` (the question alone when there is no instruction, as for the built-in
  arithmetic tasks); ``"chat"`` gives TRL's conversational form ``[{"role": "user", "content": <that string>}]``.
- :func:`prompt_ids`: the token ids of a batch of such prompts, computed the way TRL 1.16
  ``GRPOTrainer._tokenize_prompts`` computes them (no tools, no ``chat_template_kwargs``): a plain string goes
  through ``tokenizer(text=prompts)`` (the tokenizer's own special tokens, e.g. a BOS, included); a conversation
  through ``tokenizer.apply_chat_template(..., add_generation_prompt=True, tokenize=True)``, which applies the chat
  template once and adds no further special tokens.
- :func:`prompt_text`: the same prompt as the text the chat template produces (for display and logs; generation
  uses the ids, so text never goes through the tokenizer a second time).
- :func:`left_padded`: a left-padded batch ``{"input_ids", "attention_mask"}`` of such ids, for ``generate``.

This module imports nothing heavy (torch only inside :func:`left_padded`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

TEMPLATES = ("plain", "chat")
"""``plain``: the prompt is a string; ``chat``: one user message, rendered by the tokenizer's chat template."""


def prompt_content(question: str, instruction: str = "") -> str:
    """The user's text: ``question + "\\n" + instruction``, or the question alone without an instruction."""
    return f"{question}\n{instruction}" if instruction else question


def render_prompt(question: str, instruction: str = "", template: str = "plain", tokenizer: Any = None):
    """The prompt of one question as a TRL dataset holds it (see the module docstring).

    ``template="chat"`` with a given ``tokenizer`` checks that it has a chat template.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {list(TEMPLATES)}; got {template!r}")
    text = prompt_content(question, instruction)
    if template == "plain":
        return text
    if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "template='chat' needs a tokenizer with a chat template, and this one has none: "
            "use template='plain' or set tokenizer.chat_template"
        )
    return [{"role": "user", "content": text}]


def problem_prompt(problem: dict, instruction: str = "", template: str = "plain", tokenizer: Any = None):
    """:func:`render_prompt` of ``problem["question"]``."""
    return render_prompt(problem["question"], instruction, template, tokenizer)


def is_conversation(prompt: Any) -> bool:
    """True for a list of ``{"role", "content"}`` messages (TRL's conversational prompt), False for a string."""
    if isinstance(prompt, str):
        return False
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt):
        return True
    raise ValueError(f"a prompt is a string or a list of {{'role', 'content'}} messages; got {prompt!r}")


def prompt_ids(prompts: Sequence, tokenizer: Any) -> list[list[int]]:
    """The token ids of each prompt (all strings, or all conversations), as TRL 1.16 GRPOTrainer tokenises them."""
    prompts = list(prompts)
    if not prompts:
        return []
    kinds = {is_conversation(p) for p in prompts}
    if len(kinds) > 1:
        raise ValueError("prompts mix strings and conversations; render them all with the same template")
    if kinds.pop():
        encoded = tokenizer.apply_chat_template(
            conversation=prompts, add_generation_prompt=True, tokenize=True, return_dict=True
        )
    else:
        encoded = tokenizer(text=prompts)
    return [list(ids) for ids in encoded["input_ids"]]


def prompt_text(prompt: Any, tokenizer: Any = None) -> str:
    """The text of one prompt after the chat template (a plain string is its own text)."""
    if not is_conversation(prompt):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def left_padded(ids: Sequence[Sequence[int]], pad_token_id: int, device: Any = None) -> dict:
    """``{"input_ids", "attention_mask"}`` (B, T) long tensors, each row left-padded with ``pad_token_id``."""
    import torch

    if pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token (e.g. to its eos_token)")
    width = max((len(row) for row in ids), default=0)
    input_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            attention_mask[i, width - len(row):] = 1
    if device is not None:
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    return {"input_ids": input_ids, "attention_mask": attention_mask}
