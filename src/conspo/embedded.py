"""The embedded default model: a character-level tokenizer, a tiny Qwen2 and its supervised warm start.

Why this file is long: the tokenizer, the model shapes, the imperfect teacher, the supervised loop and the cache
that keys all of them are one unit; a change to any of them changes the cached model.

Not a task (it lives outside ``tasks/``): the model ``conspo train`` uses without ``--model``. Its RL settings are
``conspo.presets.DEFAULT_RL``; its validation accuracy is ``conspo.evaluation.greedy_accuracy``.

A random-init model earns no reward, so RL has nothing to work with. :func:`warm_start` trains a tiny
model briefly on a task's training problems (prompt tokens masked out of the loss, completion = answer +
end-of-sequence) and stops early, when greedy accuracy on a validation slice of the *training* problems
reaches ``WarmStartConfig.stop_at``. The held-out split is never looked at here. Prompts are rendered and
tokenised by ``conspo.prompts``, so the warm start, RL and evaluation give the model the same prompt ids.

The supervised targets come from an imperfect teacher with a habit: when the answer is odd it writes the
next integer instead (``37`` -> ``38``) on a fixed fraction ``teacher_slip`` of those problems (chosen by a
hash of the question; :func:`teacher_answer`). Validation uses the true answers. Why: a model that is merely
undertrained leaves RL little to do that a few more supervised steps would not do better (measured: +8 to +12
points of held-out greedy accuracy after 60 GRPO steps, whatever the learning rate), while a warm start that has
learnt a systematic, predictable mistake, as pretrained models carry habits from imperfect data, keeps the
right answer as a sampled minority that RL with a verifier promotes: on the default task the warm-started model
answers 78% of the even-answer and 8% of the odd-answer held-out problems, and 60 GRPO steps lift the odd ones to
53% (+27 points overall; docs/embedded_default.md).

The result is saved with ``save_pretrained`` under a cache directory keyed by a hash of everything that
decides it (the problems, the model and training settings, the seed, ``CACHE_VERSION``), written to a
temporary directory first and renamed into place, so an interrupted warm start never leaves a half-written
cache. Later calls with the same settings load it instead of training again.

Everything here was tuned on 2 CPU cores; the measurements are in ``docs/embedded_default.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from conspo import evaluation
from conspo.prompts import problem_prompt, prompt_content, prompt_ids
from conspo.tasks.base import Task

# Bump when the tokenizer, the model construction or the training loop changes meaning: old caches are ignored.
CACHE_VERSION = "tiny-v3"

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Every printable ASCII character, plus newline and tab: digits, operators, '=' and space among them.
CHARACTERS = tuple(chr(c) for c in range(32, 127)) + ("\n", "\t")

# A user turn renders as its content alone (so a chat prompt is the plain prompt, character for character); an
# assistant turn is its content followed by end-of-sequence.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character, ``<unk>`` for characters outside ``CHARACTERS``.

    No token is added on encoding (no BOS/EOS post-processor), so a prompt encodes to exactly its characters,
    the same way in the warm start, in TRL's plain-prompt path and through the chat template.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
        chat_template=CHAT_TEMPLATE,
    )


@dataclass(frozen=True)
class TinyModelSpec:
    """The shape of the tiny Qwen2 policy.

    hidden_size:         width of the residual stream; a multiple of ``num_attention_heads``.
    num_hidden_layers:   transformer blocks.
    num_attention_heads: query heads (key/value heads are the same number).
    intermediate_size:   width of the MLP.
    max_position_embeddings: longest prompt + completion, in characters.
    """

    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 128

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TinyModelSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"TinyModelSpec.hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.max_position_embeddings < 8:
            raise ValueError(f"TinyModelSpec.max_position_embeddings must be >= 8, got {self.max_position_embeddings}")


def model_config(tokenizer: PreTrainedTokenizerFast, spec: TinyModelSpec | None = None) -> Qwen2Config:
    """The ``Qwen2Config`` of ``spec`` for ``tokenizer``'s vocabulary (tied input/output embeddings)."""
    spec = spec or TinyModelSpec()
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast, spec: TinyModelSpec | None = None, *, seed: int = 0
) -> Qwen2ForCausalLM:
    """A randomly initialised tiny Qwen2 (float32), its generation config set for ``tokenizer``."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(model_config(tokenizer, spec))
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    return model


@dataclass(frozen=True)
class WarmStartConfig:
    """The supervised warm start.

    max_steps:    optimizer steps at most (each of ``batch_size`` problems).
    batch_size:   problems per step.
    learning_rate: peak AdamW learning rate (linear warmup, then constant).
    warmup_steps: steps of linear warmup.
    weight_decay: AdamW weight decay.
    val_size:     problems held back from the end of ``task.train`` to decide when to stop (never ``task.test``).
    eval_every:   steps between greedy evaluations on the validation slice.
    stop_at:      stop once validation greedy accuracy reaches this; leaves RL headroom. 1.0 never stops early.
    teacher_slip: fraction of the training problems with an odd answer whose supervised target is the next
                  integer (see the module docstring); 0 trains on the true answers only.
    max_seconds:  a time box: stop at the first validation evaluation after this many seconds (None: no box).
                  A time-boxed warm start depends on the machine's speed; its cache key records the box.
    """

    max_steps: int = 2000
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    val_size: int = 512
    eval_every: int = 25
    stop_at: float = 0.4
    teacher_slip: float = 0.6
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "val_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"WarmStartConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"WarmStartConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"WarmStartConfig.learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 < self.stop_at <= 1.0:
            raise ValueError(f"WarmStartConfig.stop_at must be in (0, 1], got {self.stop_at}")
        if not 0.0 <= self.teacher_slip <= 1.0:
            raise ValueError(f"WarmStartConfig.teacher_slip must be in [0, 1], got {self.teacher_slip}")
        if self.max_seconds is not None and not (isinstance(self.max_seconds, (int, float)) and self.max_seconds > 0):
            raise ValueError(f"WarmStartConfig.max_seconds must be a number of seconds > 0 or None, got "
                             f"{self.max_seconds!r}")


SCALES: dict[str, TinyModelSpec] = {
    "tiny": TinyModelSpec(),  # the embedded default, 0.54M parameters (2 CPU cores: minutes)
    "base": TinyModelSpec(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048),  # ~34M
    "large": TinyModelSpec(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072),  # ~113M
    "smoke": TinyModelSpec(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
}
"""Named model shapes of the embedded model (``--embedded-scale``); ``base`` and ``large`` are for a GPU."""


def default_cache_dir() -> Path:
    """``$CONSPO_CACHE`` when set, else ``~/.cache/conspo``."""
    env = os.environ.get("CONSPO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "conspo"


# The warm-start prompt before conspo.prompts (cache keys made then imply it): ``question + instruction``.
_OLD_PROMPT_SHAPE = "<question>{instruction}"


def warm_start_prompt_shape(instruction: str) -> str:
    """The warm start's prompt with a placeholder question (what :func:`cache_key` records of the prompt)."""
    return prompt_content("<question>", instruction)


def _config_fields(config: WarmStartConfig) -> dict:
    """``asdict(config)`` without ``max_seconds`` when it is None (keys made before the field existed stay valid)."""
    fields = asdict(config)
    if fields["max_seconds"] is None:
        del fields["max_seconds"]
    return fields


def cache_key(task: Task, spec: TinyModelSpec, config: WarmStartConfig, seed: int) -> str:
    """A hash of everything that decides the warm-started weights.

    The prompt format enters the key only where it differs from the one old keys were made with
    (``question + instruction``): a task without an instruction (the built-in arithmetic tasks) keeps its key and
    its cache, and a task with one (datasets, reasoning-gym), whose warm start now sees
    ``question + "\\n" + instruction`` like RL and evaluation, gets a new key, so no cache trained on the old
    prompt is reused.
    """
    problems = hashlib.sha256()
    for p in task.train:
        # A worked solution is a target too; problems without one hash as before (existing caches stay valid).
        fields = [p["question"], p["answer"]] + ([p["solution"]] if "solution" in p else [])
        problems.update(json.dumps(fields).encode())
        problems.update(b"\n")
    fields = {
        "version": CACHE_VERSION,
        "task": task.name,
        "instruction": task.instruction,
        "max_completion_length": task.max_completion_length,
        "train": problems.hexdigest(),
        "model": asdict(spec),
        "warm_start": _config_fields(config),
        "seed": seed,
    }
    shape = warm_start_prompt_shape(task.instruction)
    if shape != _OLD_PROMPT_SHAPE.format(instruction=task.instruction):
        fields["prompt"] = shape
    blob = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _encode_examples(tokenizer: PreTrainedTokenizerFast, problems: Sequence[dict], instruction: str):
    """Right-padded ``input_ids`` (N, T) and ``labels`` (N, T), labels -100 on prompt and padding.

    The prompt ids are those RL and evaluation give the model (``conspo.prompts``)."""
    prompts = prompt_ids([problem_prompt(p, instruction) for p in problems], tokenizer)
    answers = tokenizer([p["answer"] for p in problems], add_special_tokens=False)["input_ids"]
    rows = [(q, a + [tokenizer.eos_token_id]) for q, a in zip(prompts, answers)]
    width = max(len(q) + len(c) for q, c in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (q, c) in enumerate(rows):
        ids[i, : len(q) + len(c)] = torch.tensor(q + c)
        labels[i, len(q) : len(q) + len(c)] = torch.tensor(c)
    return ids, labels


def _completion_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over completion tokens; ids/labels (B, T)."""
    mask = (ids != model.config.pad_token_id) | (labels != -100)
    logits = model(input_ids=ids, attention_mask=mask.long()).logits  # (B, T, V)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
    )


_SLIP_SALT = b"conspo-teacher-slip-v1:"


def teacher_answer(question: str, answer: str, slip: float) -> str:
    """The imperfect teacher's target for one problem (see the module docstring).

    An odd integer answer becomes the next integer (``"37"`` -> ``"38"``, ``"-7"`` -> ``"-6"``) when a hash of
    ``question`` falls in the first ``slip`` fraction; any other answer (even, not an integer) is kept.
    """
    text = answer.strip()
    body = text[1:] if text[:1] == "-" else text
    if not (body.isascii() and body.isdigit() and len(body) <= 30) or int(body[-1]) % 2 == 0:
        return answer
    digest = hashlib.sha256(_SLIP_SALT + question.encode("utf-8")).digest()
    if int.from_bytes(digest[:8], "big") >= slip * 2**64:
        return answer
    return str(int(text) + 1)


def teacher_target(problem: dict, slip: float) -> str:
    """The supervised target of one problem: its worked solution when it has one, else its answer, with the
    teacher's habit (:func:`teacher_answer`) on the final number only.

    ``{"question": "58-4-43=", "answer": "11", "solution": "58-4=54;54-43=11"}`` may become
    ``"58-4=54;54-43=12"``: the steps before the last ``=`` are kept as they are.
    """
    final = teacher_answer(problem["question"], problem["answer"], slip)
    solution = problem.get("solution")
    if solution is None:
        return final
    return solution[: solution.rfind("=") + 1] + final


def supervised_train(
    model, tokenizer: PreTrainedTokenizerFast, task: Task, config: WarmStartConfig, *, seed: int = 0, log=None
) -> dict:
    """Train ``model`` in place on ``task.train`` minus its last ``val_size`` problems; returns a summary.

    Targets are the teacher's (:func:`teacher_target`: the worked solution when the problems have one, else the
    answer); stopping is decided on the true answers of the validation slice.
    """
    if len(task.train) <= config.val_size:
        raise ValueError(f"task.train has {len(task.train)} problems; need more than val_size={config.val_size}")
    train, val = task.train[: -config.val_size], task.train[-config.val_size :]
    train = [{**p, "answer": teacher_target(p, config.teacher_slip)} for p in train]
    ids, labels = _encode_examples(tokenizer, train, task.instruction)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)))
    start, val_acc, step, history = time.perf_counter(), 0.0, 0, []
    model.train()
    for step in range(1, config.max_steps + 1):
        idx = torch.randint(len(train), (config.batch_size,), generator=gen)
        batch_ids, batch_labels = ids[idx], labels[idx]
        width = int((batch_ids != tokenizer.pad_token_id).sum(1).max())  # drop all-padding columns
        device = next(model.parameters()).device
        loss = _completion_loss(model, batch_ids[:, :width].to(device), batch_labels[:, :width].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        out_of_time = config.max_seconds is not None and time.perf_counter() - start >= config.max_seconds
        if step % config.eval_every == 0 or step == config.max_steps or out_of_time:
            val_acc = evaluation.greedy_accuracy(
                model, tokenizer, val, task.verifier, instruction=task.instruction,
                max_new_tokens=task.max_completion_length,
            )
            model.train()
            history.append((step, round(loss.item(), 4), val_acc))
            if log is not None:
                log(f"warm start step {step}: loss {loss.item():.3f}, validation greedy accuracy {val_acc:.3f}")
            if val_acc >= config.stop_at or out_of_time:
                break
    model.eval()
    return {
        "steps": step,
        "val_accuracy": val_acc,
        "seconds": round(time.perf_counter() - start, 2),
        "history": history,
    }


def warm_start(
    task: Task,
    *,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    steps: int | None = None,
    force: bool = False,
    spec: TinyModelSpec | None = None,
    config: WarmStartConfig | None = None,
    log=None,
) -> Path:
    """The directory of a tiny model warm-started on ``task`` (trained now, or found in the cache).

    steps:  overrides ``config.max_steps`` (a tiny budget for tests).
    force:  train again even when the cache holds this model (the new one replaces it).
    The directory holds the model and tokenizer (``save_pretrained``) and ``warm_start.json`` (settings and
    the validation accuracy reached). Load it with :func:`load_tiny`.
    """
    spec = spec or TinyModelSpec()
    config = config or WarmStartConfig()
    if steps is not None:
        config = WarmStartConfig(**{**asdict(config), "max_steps": steps})
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(task, spec, config, seed)
    final = root / f"tiny-{key}"
    if final.is_dir() and not force:
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-tiny-{key}-", dir=root))
    try:
        tokenizer = build_tokenizer()
        model = build_model(tokenizer, spec, seed=seed)
        if torch.cuda.is_available():  # (a larger --embedded-scale trains in minutes on a GPU, hours on a CPU)
            model = model.to("cuda")
        summary = supervised_train(model, tokenizer, task, config, seed=seed, log=log)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {"key": key, "version": CACHE_VERSION, "seed": seed, "model": asdict(spec), "warm_start": _config_fields(config)}
        (tmp / "warm_start.json").write_text(json.dumps({**meta, **summary}, indent=2))
        if final.exists():  # force=True, or another process finished first: replace it
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_tiny(path: str | os.PathLike):
    """``(model, tokenizer)`` from a :func:`warm_start` directory, the model in eval mode.

    The tokenizer is loaded with ``PreTrainedTokenizerFast`` on purpose: ``AutoTokenizer`` on a ``qwen2``
    checkpoint swaps in Qwen's byte-level pre-tokenizer and drops spaces (transformers 5).
    """
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, tokenizer
