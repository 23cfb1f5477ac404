"""One function renders a prompt (issue 13, item 5): the warm start, the RL dataset TRL tokenises, held-out
evaluation and ``conspo eval`` give the model byte-identical prompt ids for the same problem.

The ids are captured where each path hands them to the model (the warm start's encoded examples, ``generate``)
and, for RL, by running TRL 1.16's own ``GRPOTrainer._tokenize_prompts`` on the dataset ``conspo train`` builds;
never by calling ``conspo.prompts`` on both sides.
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")


class _Stop(Exception):
    """Raised by the stand-in trainer: everything ``conspo train`` does before RL has happened."""


def _trl_prompt_ids(trainer_kwargs) -> list[list[int]]:
    """TRL 1.16 GRPOTrainer's prompt ids for the dataset it was given, computed by TRL's own code."""
    from trl import GRPOTrainer

    args, tokenizer = trainer_kwargs["args"], trainer_kwargs["processing_class"]
    trainer = SimpleNamespace(processing_class=tokenizer, _is_vlm=False, environment_factories=None, tools=None,
                              chat_template=None, chat_template_kwargs=args.chat_template_kwargs or {})
    prompts = [row["prompt"] for row in trainer_kwargs["train_dataset"]]
    ids, _, _ = GRPOTrainer._tokenize_prompts(trainer, prompts)
    return [list(map(int, row)) for row in ids]


def _unpadded(input_ids, attention_mask) -> list[list[int]]:
    return [[int(t) for t, m in zip(row, mask) if m] for row, mask in zip(input_ids.tolist(), attention_mask.tolist())]


def _write_fixture(path):
    rows = [{"question": f"What is {a} plus {b}?", "answer": str(a + b)} for a in range(1, 7) for b in (3, 8, 11, 20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("template", ["plain", "chat"])
@pytest.mark.parametrize("source", ["dataset", "reasoning_gym"])
def test_every_path_gives_the_embedded_model_the_same_prompt_ids(source, template, tmp_path, monkeypatch):
    import transformers

    import conspo.tasks.registry as registry
    import conspo.trainer
    from conspo import embedded as tiny_model
    from conspo import evaluation, run
    from conspo.cli import main

    spec = tiny_model.TinyModelSpec(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=512)
    config = tiny_model.WarmStartConfig(max_steps=2, batch_size=8, val_size=6, eval_every=1, warmup_steps=1)
    seen: list[tuple[str, list[int]]] = []  # (path, prompt ids) in the order the model got them
    phase = ["setup"]
    warm_dirs, trainer_kwargs = [], {}

    # Every held-out split also gets the first three training problems, so one problem goes through every path.
    real_get_task = registry.get_task

    def get_task(spec_, **options):
        task = real_get_task(spec_, **options)
        task.test = task.test + task.train[:3]
        return task

    real_warm_start, real_encode = tiny_model.warm_start, tiny_model._encode_examples

    def warm_start(task, **_):
        phase[0] = "warm start validation (greedy_accuracy)"
        path = real_warm_start(task, seed=0, cache_dir=tmp_path / "cache", spec=spec, config=config)
        warm_dirs.append(path)
        phase[0] = "setup"
        return path

    def encode(*args, **kwargs):
        ids, labels = real_encode(*args, **kwargs)
        for row, row_labels in zip(ids.tolist(), labels.tolist()):
            start = next(i for i, label in enumerate(row_labels) if label != -100)  # the first target token
            seen.append(("warm start training", row[:start]))
        return ids, labels

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        seen.extend((phase[0], row) for row in _unpadded(input_ids, attention_mask))
        eos = torch.full((input_ids.shape[0], 1), self.config.eos_token_id, dtype=input_ids.dtype)
        return torch.cat([input_ids, eos.to(input_ids.device)], dim=1)

    real_heldout, real_evaluate = evaluation.heldout_accuracy, evaluation.evaluate

    def heldout(*args, **kwargs):
        phase[0] = "held-out (evaluation.heldout_accuracy)"
        try:
            return real_heldout(*args, **kwargs)
        finally:
            phase[0] = "setup"

    def evaluate(*args, **kwargs):
        phase[0] = "conspo eval"
        return real_evaluate(*args, **kwargs)

    class Trainer:  # built as run.train builds it; stops where training would start (after the held-out check)
        log_completions = False

        def __init__(self, **kwargs):
            trainer_kwargs.update(kwargs)
            self.model = kwargs["model"]

        def train(self, **kwargs):
            raise _Stop

    monkeypatch.setattr(registry, "get_task", get_task)
    monkeypatch.setattr(tiny_model, "warm_start", warm_start)
    monkeypatch.setattr(tiny_model, "_encode_examples", encode)
    monkeypatch.setattr(transformers.GenerationMixin, "generate", generate)
    monkeypatch.setattr(evaluation, "heldout_accuracy", heldout)
    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    monkeypatch.setattr(conspo.trainer, "ConSPOTrainer", Trainer)
    monkeypatch.setattr(run, "guard_checkpoint_saves", lambda trainer: None)
    monkeypatch.setattr(run, "install_console", lambda trainer, console: None)

    if source == "dataset":
        data = str(_write_fixture(tmp_path / "problems.jsonl"))
        train_source, eval_source = {"dataset": data}, ["--dataset", data]
    else:
        name = "reasoning_gym:basic_arithmetic"
        train_source, eval_source = {"task": name}, ["--task", name]
    with pytest.raises(_Stop):
        run.train(template=template, output_dir=tmp_path / "run", warm_start=dataclasses.asdict(config), **train_source)
    seen.extend(("RL (TRL GRPOTrainer._tokenize_prompts)", ids) for ids in _trl_prompt_ids(trainer_kwargs))
    rc = main(["eval", "--model", str(warm_dirs[0]), *eval_source, "--template", template, "--samples", "1",
               "--k", "1", "--max-new-tokens", "2", "--backend", "transformers", "--output-dir",
               str(tmp_path / "eval")])
    assert rc == 0

    # Which problem each captured prompt is: the one whose question's ids start it (longest match).
    task = get_task(data) if source == "dataset" else get_task(name)
    tokenizer = trainer_kwargs["processing_class"]
    by_question = {}
    for p in task.train + task.test:
        by_question.setdefault(tuple(tokenizer(p["question"], add_special_tokens=False)["input_ids"]), p["question"])
    ids_of: dict[str, dict[str, set]] = {}
    for path, ids in seen:
        question = next(by_question[tuple(ids[:n])] for n in range(len(ids), 0, -1) if tuple(ids[:n]) in by_question)
        ids_of.setdefault(question, {}).setdefault(path, set()).add(tuple(ids))

    every_path = {"warm start training", "warm start validation (greedy_accuracy)",
                  "RL (TRL GRPOTrainer._tokenize_prompts)", "held-out (evaluation.heldout_accuracy)", "conspo eval"}
    assert {path for paths in ids_of.values() for path in paths} == every_path
    shared = task.train[0]["question"]
    assert {"warm start training", "RL (TRL GRPOTrainer._tokenize_prompts)", "held-out (evaluation.heldout_accuracy)",
            "conspo eval"} <= set(ids_of[shared])
    for question, paths in ids_of.items():
        distinct = set().union(*paths.values())
        assert len(distinct) == 1, (question, {path: [tokenizer.decode(list(i)) for i in s] for path, s in paths.items()})
    # ... and it is the question, a newline and the task's instruction, as RL has always seen it.
    (ids,) = set().union(*ids_of[shared].values())
    assert tokenizer.decode(list(ids)) == shared + "\n" + task.instruction and task.instruction


# ----------------------------------------------------------------------------------------------- a real tokenizer


def _bos_tokenizer():
    """A character tokenizer that adds a BOS token when encoding (as Llama's does) and has a chat template with
    role markers: plain prompts then carry the BOS, chat prompts only the template's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for ch in "0123456789+-*=? \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,:<>|{}\\":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", chat_template=template)


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_held_out_evaluation_matches_trl_with_a_tokenizer_that_adds_bos(template, monkeypatch):
    import transformers
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig

    from conspo.evaluation import heldout_accuracy
    from conspo.rewards.verifiers import math_verify_match
    from conspo.tasks.base import Task
    from conspo.tasks.datasets import MATH_INSTRUCTION, format_prompt

    tok = _bos_tokenizer()
    problems = [{"question": "What is 2+2?", "answer": "4"}, {"question": "Is 7 odd?", "answer": "yes"}]
    task = Task(name="t", train=problems, test=problems, verifier=math_verify_match, instruction=MATH_INSTRUCTION,
                max_completion_length=2)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = Qwen2ForCausalLM(config)
    captured = []

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        captured.extend(_unpadded(input_ids, attention_mask))
        return torch.cat([input_ids, torch.ones((input_ids.shape[0], 1), dtype=input_ids.dtype)], dim=1)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", generate)
    heldout_accuracy(model, tok, task, template=template)
    rows = {"train_dataset": [{"prompt": format_prompt(p["question"], task.instruction, template, tok)}
                              for p in problems],
            "processing_class": tok,
            "args": GRPOConfig(output_dir="unused", report_to="none", use_cpu=True, bf16=False)}
    expected = _trl_prompt_ids(rows)
    assert captured == expected
    bos = tok.bos_token_id
    assert [row.count(bos) for row in captured] == [1, 1]  # once: TRL's encoding or the template, never both
    assert tok.decode(captured[0]) == ("<bos>What is 2+2?\n" if template == "plain" else
                                       "<bos><|user|>What is 2+2?\n") + MATH_INSTRUCTION + (
                                           "<|assistant|>" if template == "chat" else "")


# ----------------------------------------------------------------------------------------------- the module


def test_render_prompt_forms_and_errors():
    from conspo.prompts import is_conversation, prompt_text, render_prompt

    assert render_prompt("12+7=") == "12+7="  # no instruction: the question alone (the arithmetic tasks)
    assert render_prompt("Q?", "Answer.") == "Q?\nAnswer."
    assert render_prompt("Q?", "Answer.", "chat") == [{"role": "user", "content": "Q?\nAnswer."}]
    with pytest.raises(ValueError, match=r"template must be one of \['plain', 'chat'\]; got 'jinja'"):
        render_prompt("Q", template="jinja")
    with pytest.raises(ValueError, match="has none: use template='plain'"):
        render_prompt("Q", template="chat", tokenizer=SimpleNamespace(chat_template=None))
    with pytest.raises(ValueError, match="a prompt is a string or a list of"):
        is_conversation(3)
    tok = _bos_tokenizer()
    assert prompt_text("Q?\nA.", tok) == "Q?\nA."
    assert prompt_text(render_prompt("Q?", "A.", "chat"), tok) == "<bos><|user|>Q?\nA.<|assistant|>"


def test_prompt_ids_refuse_mixed_prompts_and_left_padding_is_exact():
    from conspo.prompts import left_padded, prompt_ids

    tok = _bos_tokenizer()
    with pytest.raises(ValueError, match="mix strings and conversations"):
        prompt_ids(["a", [{"role": "user", "content": "b"}]], tok)
    assert prompt_ids([], tok) == []
    batch = left_padded([[5, 6, 7], [8]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="no pad token"):
        left_padded([[1]], pad_token_id=None)
