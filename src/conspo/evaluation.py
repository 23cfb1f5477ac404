"""``conspo eval``: sample N completions per problem, verify them, report avg@k, pass@k and maj@k.

The metrics are pure functions in :mod:`conspo.metrics`; this module loads the model, samples and writes
the results. Sampling is temperature sampling with optional nucleus (top-p) sampling, nothing else (no top-k,
min-p or repetition penalty, whatever the checkpoint's generation config says); ``temperature=0`` is greedy.
The (problem, sample) pairs are laid out problem-major and cut into batches of ``batch_size``; torch is seeded
before each batch from ``(seed, batch index)``, so the same seed, batch size and inputs give the same
completions and numbers.

Protocols (``--protocol``, :data:`PROTOCOLS`): ``default`` (4 samples, k=1; temperature 0.6 and top-p 0.95 for
math tasks, temperature 1.0 without top-p for the others) and ``paper`` (the paper's evaluation: temperature 0.6,
top-p 0.95, 32 samples, k in {1, 32}, the prompt ``PAPER_INSTRUCTION``). Explicit settings override the
protocol's; the summary records the protocol used. Prompts are rendered and tokenised by ``conspo.prompts``,
exactly as for RL.

Backends: ``transformers`` (``model.generate``), or ``vllm`` when it is installed and a GPU is present
(``--backend auto``, the default, picks it then). The vLLM path is small on purpose: prompts go in as token
ids from conspo's tokenizer and completions are decoded by it, so both backends share tokenisation,
length counting and verification; each problem's request is seeded from ``(seed, problem index)``.
A completion's length counts generated tokens before the first end-of-sequence token; it is truncated when
it has no end-of-sequence token within ``max_new_tokens``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path

from conspo.metrics import CORRECT_SCORE, metric_names, summarize
from conspo.prompts import problem_prompt, prompt_ids
from conspo.tasks.base import Task
from conspo.tasks.datasets import PAPER_INSTRUCTION

logger = logging.getLogger("conspo.evaluation")

DEFAULT_TASK = "arithmetic"
SAMPLES_FILE, SUMMARY_FILE, TABLE_FILE = "eval_samples.jsonl", "eval_summary.json", "eval_summary.md"
BACKENDS = ("auto", "transformers", "vllm")
# Tokenizer classes saved by conspo's tiny model (``PreTrainedTokenizerFast``; transformers 5 writes its
# alias ``TokenizersBackend``): load them as such, since AutoTokenizer on a qwen2 checkpoint drops spaces.
_FAST_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


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
        if not has_vllm or not torch.cuda.is_available():
            raise EvalError("--backend vllm needs the vllm package and a CUDA GPU; use --backend transformers")
        if gguf_file is not None:
            raise EvalError("--backend vllm does not load --gguf-file checkpoints here; use --backend transformers")
        return "vllm"
    if backend == "auto" and has_vllm and torch.cuda.is_available() and gguf_file is None:
        return "vllm"
    return "transformers"


def _check_model_path(model: str, gguf_file: str | None) -> None:
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise EvalError(f"--model {model}: not a directory")
        if not (path / (gguf_file or "config.json")).is_file():
            what = f"no {gguf_file} there (--gguf-file)" if gguf_file else "no config.json there"
            raise EvalError(f"--model {model}: not a model directory ({what})")
    elif model.startswith((".", "/", "~")) or model.count("/") > 1:  # a path, not a Hugging Face id
        raise EvalError(f"--model {model}: no such directory")


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


def load_tokenizer(model: str, gguf_file: str | None = None):
    """The checkpoint's tokenizer (see ``_FAST_CLASSES``); its pad token defaults to end-of-sequence."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = Path(model).expanduser() / "tokenizer_config.json"
    saved_class = None
    if gguf_file is None and config.is_file():
        try:
            saved_class = json.loads(config.read_text()).get("tokenizer_class")
        except (OSError, ValueError):
            saved_class = None
    if saved_class in _FAST_CLASSES:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(model)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model, gguf_file=gguf_file)
        except (OSError, ValueError, KeyError) as error:
            if gguf_file is not None or not (Path(model) / "tokenizer.json").is_file():
                raise EvalError(f"--model {model}: cannot load its tokenizer: {error}") from error
            tokenizer = PreTrainedTokenizerFast.from_pretrained(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str, gguf_file: str | None = None, *, backend: str = "transformers", seed: int = 0):
    """``(model, tokenizer)``: a transformers causal LM in eval mode (float32 on CPU, bfloat16 on a GPU that
    supports it; a GGUF file is dequantised to float32 first), or a ``vllm.LLM`` for ``backend="vllm"``."""
    import torch
    from transformers import AutoModelForCausalLM

    _check_model_path(model, gguf_file)
    tokenizer = load_tokenizer(model, gguf_file)
    if backend == "vllm":
        from vllm import LLM

        return LLM(model=str(Path(model).expanduser()), seed=seed), tokenizer
    try:
        policy = AutoModelForCausalLM.from_pretrained(model, gguf_file=gguf_file, dtype=torch.float32)
    except OSError as error:
        raise EvalError(f"--model {model}: cannot load the model: {error}") from error
    if torch.cuda.is_available():
        policy = policy.to("cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    return policy.eval(), tokenizer


# ----------------------------------------------------------------------------------------------- sampling


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


def _sample_transformers(model, tokenizer, prompts, samples, *, temperature, top_p, max_new_tokens, seed,
                         batch_size, eos_ids, progress) -> list[list[list[int]]]:
    """``prompts``: token ids per problem (``conspo.prompts.prompt_ids``)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    from conspo.prompts import left_padded

    sampled = temperature > 0
    config = GenerationConfig(
        do_sample=sampled, temperature=temperature if sampled else None, top_k=0, top_p=top_p if sampled else 1.0,
        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids,
    )
    pairs = [(i, j) for i in range(len(prompts)) for j in range(samples)]
    out: list[list[list[int]]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    # generate() fills every field left unset in ``config`` from the model's own generation config (a checkpoint's
    # repetition_penalty, min_p, ...): a blank one stands in while sampling, so only ``config`` applies.
    own = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        with torch.no_grad(), tqdm(total=len(pairs), desc="conspo eval", unit="sample", disable=not progress) as bar:
            for b, start in enumerate(range(0, len(pairs), batch_size)):
                chunk = pairs[start:start + batch_size]
                enc = left_padded([prompts[i] for i, _ in chunk], tokenizer.pad_token_id, device)
                torch.manual_seed(batch_seed(seed, b))
                generated = model.generate(**enc, generation_config=config)[:, enc["input_ids"].shape[1]:]
                for (i, _), row in zip(chunk, generated.tolist()):
                    out[i].append(row)
                bar.update(len(chunk))
    finally:
        model.generation_config = own
    return out


def _sample_vllm(llm, tokenizer, prompts, samples, *, temperature, top_p, max_new_tokens, seed, eos_ids):
    """``prompts``: token ids per problem (``conspo.prompts.prompt_ids``), passed to vLLM as they are."""
    from vllm import SamplingParams

    requests = [{"prompt_token_ids": list(ids)} for ids in prompts]
    params = [SamplingParams(n=samples, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                             max_tokens=max_new_tokens, seed=batch_seed(seed, i), stop_token_ids=eos_ids)
              for i in range(len(prompts))]
    return [[list(o.token_ids) for o in result.outputs] for result in llm.generate(requests, params)]


def _verify(verifier, completion: str, answer: str) -> tuple[float, str | None, str]:
    try:
        result = verifier(completion, answer)
        score = float(result.score)
    except Exception:  # a verifier bug scores the sample 0 instead of losing the whole evaluation
        logger.warning("the verifier raised on a completion; scored 0.0", exc_info=True)
        return 0.0, None, "error"
    return (score if math.isfinite(score) else 0.0), result.extracted, result.reason


def evaluate(model, tokenizer, task: Task, *, samples: int = 4, ks=(1,), temperature: float = 1.0,
             top_p: float = 1.0, max_new_tokens: int | None = None, seed: int = 0, limit: int | None = None,
             template: str = "plain", batch_size: int = 32, progress: bool = True,
             protocol: str = "custom") -> tuple[list[dict], dict]:
    """Sample ``samples`` completions for each of ``task.test[:limit]``, verify them, summarise.

    ``model`` is a transformers causal LM or a ``vllm.LLM``. Prompts: ``task.instruction`` and ``template``,
    rendered and tokenised by ``conspo.prompts`` as for RL. ``top_p`` in (0, 1]: nucleus sampling (1: off).
    Returns ``(records, summary)``: one record per sample (``problem``, ``subset``, ``sample``, ``answer``,
    ``completion``, ``extracted``, ``score``, ``correct``, ``reason``, ``length`` in tokens, ``truncated``) and
    ``metrics.summarize``'s dict with the sampling settings under ``"settings"`` and the protocol (``protocol``
    names it: temperature, top_p, samples, ks, max_new_tokens, instruction, template) under ``"protocol"``.
    """
    ks = sorted(set(ks))
    check_settings(samples, ks, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_p=top_p)
    max_new_tokens = max_new_tokens or task.max_completion_length
    problems = task.test[:limit] if limit else task.test
    prompts = prompt_ids([problem_prompt(p, task.instruction, template, tokenizer) for p in problems], tokenizer)
    eos_ids = _eos_ids(model, tokenizer)
    options = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, eos_ids=eos_ids)
    if type(model).__module__.startswith("vllm"):
        generated = _sample_vllm(model, tokenizer, prompts, samples, **options)
        device = dtype = "vllm"
    else:
        weight = next(model.parameters())
        device, dtype = str(weight.device), str(weight.dtype).removeprefix("torch.")
        generated = _sample_transformers(model, tokenizer, prompts, samples, batch_size=batch_size,
                                         progress=progress, **options)
    records = []
    for i, (problem, rows) in enumerate(zip(problems, generated)):
        for j, row in enumerate(rows):
            ids, truncated = split_completion(row, eos_ids, max_new_tokens)
            completion = tokenizer.decode(ids, skip_special_tokens=True)
            score, extracted, reason = _verify(task.verifier, completion, problem["answer"])
            records.append({"problem": i, "subset": problem.get("subset"), "sample": j, "answer": problem["answer"],
                            "completion": completion, "extracted": extracted, "score": score,
                            "correct": score >= CORRECT_SCORE, "reason": reason, "length": len(ids),
                            "truncated": truncated})
    summary = summarize(records, ks)
    summary["settings"] = {"task": task.name, "samples": samples, "temperature": temperature, "top_p": top_p,
                           "max_new_tokens": max_new_tokens, "seed": seed, "limit": limit, "template": template,
                           "instruction": task.instruction, "batch_size": batch_size, "device": device,
                           "dtype": dtype}
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
    try:
        protocol = resolve_protocol(name, **given)  # every explicit setting checked before anything is loaded
        check_settings(protocol["samples"], protocol["ks"], limit=ns.limit, batch_size=batch_size)
        _check_model_path(ns.model, gguf_file)
        task = load_task(ns.task, ns.dataset, question_field=ns.question_field, answer_field=ns.answer_field,
                         subset_field=ns.subset_field)
        protocol = resolve_protocol(name, task, **given)
        if protocol["instruction"] != task.instruction:
            task = dataclasses.replace(task, instruction=protocol["instruction"])
        backend = choose_backend(getattr(ns, "backend", "auto"), gguf_file)
        print(f"[conspo] loading {ns.model}" + (f" ({gguf_file})" if gguf_file else "") + f" for {backend}",
              file=sys.stderr)
        model, tokenizer = load_model(ns.model, gguf_file, backend=backend, seed=ns.seed)
        records, summary = evaluate(model, tokenizer, task, samples=protocol["samples"], ks=protocol["ks"],
                                    temperature=protocol["temperature"], top_p=protocol["top_p"],
                                    max_new_tokens=protocol["max_new_tokens"], seed=ns.seed, limit=ns.limit,
                                    template=ns.template or "plain", batch_size=batch_size, protocol=name)
    except ValueError as error:  # EvalError, DatasetError, get_task's unknown-task error, template errors
        print(f"conspo eval: error: {error}", file=sys.stderr)
        return 2
    summary["protocol"]["overrides"] = protocol["overrides"]
    summary["settings"].update(model=ns.model, gguf_file=gguf_file, backend=backend,
                               wall_seconds=round(time.time() - started, 1))
    label = ns.dataset or ns.task or DEFAULT_TASK
    out = Path(ns.output_dir or f"runs/eval/{_slug(ns.model + '-' + (gguf_file or ''))}/{_slug(label)}-seed{ns.seed}")
    out.mkdir(parents=True, exist_ok=True)
    with (out / SAMPLES_FILE).open("w") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    table = render_markdown(summary)
    (out / TABLE_FILE).write_text(table)
    print(table)
    print(f"[conspo] samples: {out / SAMPLES_FILE}\n[conspo] summary: {out / SUMMARY_FILE}, {out / TABLE_FILE}")
    return 0
