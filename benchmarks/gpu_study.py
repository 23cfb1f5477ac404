"""The method comparison of issue 7 at a larger scale, on one GPU, in one call (about 10 minutes, nothing downloaded).

What it does, in order:

1. builds conspo's character tokenizer and a Qwen2 model from a config (``--scale base``: hidden 512, 8 layers,
   about 34M parameters; ``--scale large``: hidden 768, 12 layers, about 113M; ``--scale tiny``: the CPU testbed's
   0.54M, for a rehearsal with ``--device cpu``), fp32 weights;
2. draws the arithmetic task with worked solutions (default ``3x2:+-``: ``"58-4-44="`` is answered
   ``"58-4=54;54-44=10"``, completions of up to 23 tokens against 6 on the CPU testbed; scored on the number after
   the last ``=``; ``--answer-only`` for bare answers);
3. warm-starts the model with a short supervised phase (bf16 autocast on CUDA, completion tokens only) on the
   targets of the CPU testbed's imperfect teacher (``--teacher-slip``: the final number of some odd answers is
   written one too high, a habit for RL to unlearn), until greedy accuracy on a validation slice of the *training*
   problems reaches ``--sft-stop-at`` or ``--sft-seconds`` run out; the weights are saved once;
4. for each seed (``--seeds``) and method (``--methods``, presets with optional overrides such as
   ``conspo@tau=0.3``): reloads those weights, measures held-out greedy accuracy, trains ``--rl-steps`` steps of
   ConSPOTrainer with ``preset_config(method, ...)`` (bf16 mixed precision on CUDA), measures held-out greedy
   accuracy again. Every run has the same rollout budget: the same steps, prompts per step, ``num_generations``,
   completion length, temperature and learning rate;
5. writes ``results.json`` and ``results.md`` to ``--out`` after every run (so a run cut short keeps what finished)
   and prints the results table last.

    python benchmarks/gpu_study.py                                      # on the GPU machine: the full comparison
    python benchmarks/gpu_study.py --scale large --sft-seconds 120 --rl-steps 60 --methods conspo,grpo
    python benchmarks/gpu_study.py --device cpu --scale tiny --rl-steps 40 --prompts 32 --lr 1e-4 \
        --n-train 20000 --n-test 500 --no-warmup-run --seeds 3 \
        --methods conspo,disco,grpo,dr_grpo,dapo,gspo,cispo              # the CPU rehearsal (docs/benchmarks.md)
    python benchmarks/gpu_study.py --cpu-smoke                          # tiny sizes on CPU, 2 RL steps, 2 methods

On the lent GPU machine, ``bash benchmarks/gpu_study.sh [ARGS]`` installs the carried wheels, records the card and
date, and runs this script (docs/benchmarks.md, "GPU study (issue 7)").
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()

# GSPO is left out by default: with one optimizer step per generation batch every importance ratio is 1 and it
# equals GRPO exactly (docs/results.md); CISPO was the strongest baseline of the CPU rehearsal.
METHODS_DEFAULT = "conspo,disco,grpo,dapo,cispo"
DIFFICULTY_DEFAULT = "3x2:+-"

# Model shapes (TinyModelSpec fields) and the settings that go with them. On an H100 a warm-start step of the base
# model is bound by kernel launches, not arithmetic (batch 256: 54 ms a step, 742 steps in 40 s), so a batch of
# 1024 costs about the same time per step and sees 4x the problems.
SCALES = {
    "base": dict(spec=dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=2048,
                           max_position_embeddings=64),
                 sft_lr=1e-3, sft_batch=1024, sft_seconds=90.0),
    "large": dict(spec=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                            max_position_embeddings=64),
                  sft_lr=5e-4, sft_batch=1024, sft_seconds=150.0),
    # The CPU testbed's shape (0.54M): a rehearsal of the whole procedure on a CPU (--device cpu), minutes a phase.
    "tiny": dict(spec=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                           max_position_embeddings=64),
                 sft_lr=1e-3, sft_batch=128, sft_seconds=600.0),
    # --cpu-smoke only: a few seconds per phase on 2 CPU cores.
    "smoke": dict(spec=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            max_position_embeddings=32),
                  sft_lr=3e-3, sft_batch=64, sft_seconds=8.0),
}


def log(msg: str) -> None:
    print(f"[gpu_study {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def parse_difficulty(text: str):
    """``"3x2:+-*"`` -> ``ArithmeticSpec(n_operands=3, digits=2, operators="+-*")``."""
    from conspo.tasks.arithmetic import ArithmeticSpec

    try:
        shape, ops = text.split(":", 1)
        n, d = (int(x) for x in shape.lower().split("x"))
    except ValueError as err:
        raise SystemExit(f"--difficulty {text!r}: expected OPERANDSxDIGITS:OPERATORS, e.g. 3x2:+-*") from err
    try:
        return ArithmeticSpec(n_operands=n, digits=d, operators=ops)
    except ValueError as err:
        raise SystemExit(f"--difficulty {text!r}: {err}") from err


def _at_least(low: int):
    """An argparse type: an integer >= ``low`` (argparse names the option in its error)."""
    def check(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    check.__name__ = f"integer >= {low}"
    return check


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=("base", "large", "tiny"), default="base",
                   help="base: hidden 512 x 8 layers (~34M); large: hidden 768 x 12 layers (~113M); tiny: the CPU "
                   "testbed's hidden 128 x 2 layers (0.54M), for a rehearsal with --device cpu")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default), or cpu for a rehearsal of the procedure at --scale tiny")
    p.add_argument("--methods", default=METHODS_DEFAULT,
                   help=f"comma-separated presets (default {METHODS_DEFAULT}); a preset may carry ConSPOConfig "
                   "overrides after '@', e.g. conspo@tau=0.3 or conspo@tau=0.3@margin_type=none")
    p.add_argument("--seeds", default="1",
                   help="a count N (seeds 0..N-1) or a comma-separated list of seeds, e.g. 0,1,2 (default 1)")
    p.add_argument("--difficulty", default=DIFFICULTY_DEFAULT,
                   help=f"arithmetic OPERANDSxDIGITS:OPERATORS (default {DIFFICULTY_DEFAULT})")
    p.add_argument("--answer-only", action="store_true",
                   help="completions are the bare answer (as on CPU) instead of worked solutions, one step per "
                   "operator (\"12+34=46;46-56=-10\", scored on the number after the last '=')")
    p.add_argument("--teacher-slip", type=float, default=0.6,
                   help="fraction of odd answers the warm start's teacher writes as the next integer (the CPU "
                   "testbed's habit for RL to unlearn; 0: true answers only)")
    p.add_argument("--n-train", type=_at_least(1), default=100_000, help="training problems (SFT and RL prompts)")
    p.add_argument("--n-test", type=_at_least(1), default=1000, help="held-out problems for greedy accuracy")
    p.add_argument("--sft-seconds", type=_positive_float, default=None,
                   help="time budget of the warm start (default: by scale, 90 s base, 150 s large)")
    p.add_argument("--sft-max-steps", type=_at_least(1), default=20_000, help="step cap of the warm start")
    p.add_argument("--sft-stop-at", type=float, default=0.45,
                   help="stop the warm start once validation greedy accuracy reaches this (leaves RL headroom)")
    p.add_argument("--sft-eval-every", type=_at_least(1), default=50, help="warm-start steps between validation evaluations")
    p.add_argument("--sft-lr", type=_positive_float, default=None, help="warm-start AdamW learning rate (default: by scale)")
    p.add_argument("--sft-batch", type=_at_least(1), default=None, help="warm-start batch size (default: by scale)")
    p.add_argument("--val-size", type=_at_least(1), default=512, help="training problems held back to decide when SFT stops")
    p.add_argument("--rl-steps", type=_at_least(1), default=100, help="optimizer steps per RL run (the per-run budget)")
    p.add_argument("--prompts", type=_at_least(1), default=64, help="prompts per RL step")
    p.add_argument("--num-generations", type=_at_least(2), default=8, help="rollouts per prompt")
    p.add_argument("--completion-length", type=_at_least(1), default=None,
                   help="max_completion_length (default: the task's, answer characters + 2)")
    p.add_argument("--eval-samples", type=_at_least(0), default=8,
                   help="completions sampled per held-out problem after training for avg@1, pass@k and maj@k "
                   "(k = this number; 0 skips the sampled evaluation)")
    p.add_argument("--eval-problems", type=_at_least(1), default=200, help="held-out problems in the sampled evaluation")
    p.add_argument("--lr", type=_positive_float, default=2e-5, help="RL learning rate (constant), same for every method")
    p.add_argument("--temperature", type=_positive_float, default=1.0, help="rollout temperature")
    p.add_argument("--fast-generation", choices=("auto", "on", "off"), default="off",
                   help="ConSPOConfig.fast_generation (default off: with completions this short, compiling the "
                   "decoding step, about 34 s per run on an H100, costs more than it saves in a 100-step run; "
                   "auto: compiled static-cache decoding on CUDA)")
    p.add_argument("--no-warmup-run", action="store_true",
                   help="skip the untimed 1-step RL run before the timed ones (it takes the one-time CUDA, cuBLAS and "
                   "compile start-up costs off the first method's wall time)")
    p.add_argument("--out", default=None, help="results folder (default: $OUT when set, else runs/gpu_study)")
    p.add_argument("--work-dir", default=None, help="where the warm-started weights and trainer folders go "
                   "(default: a temporary folder, removed at the end)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny model and task on CPU, 2 RL steps, methods conspo,grpo: checks the script end to end")
    return p


def apply_smoke(args: argparse.Namespace) -> None:
    args.scale_name = "smoke"
    if args.difficulty == DIFFICULTY_DEFAULT:
        args.difficulty = "2x2:+-"
    args.n_train, args.n_test, args.val_size = 2000, 48, 48
    args.sft_seconds = args.sft_seconds or SCALES["smoke"]["sft_seconds"]
    args.sft_max_steps = min(args.sft_max_steps, 300)
    args.sft_eval_every = 50
    args.rl_steps = 2
    args.prompts, args.num_generations = 4, 4
    if args.methods == METHODS_DEFAULT:
        args.methods = "conspo,grpo"


def parse_method(text: str) -> tuple[str, dict]:
    """``"conspo@tau=0.3@neg_reduce=mean"`` -> ``("conspo", {"tau": 0.3, "neg_reduce": "mean"})``.

    Values are read as YAML scalars (``0.3``, ``true``, ``null``), so numbers and booleans keep their types; the
    preset and the keys are checked by building the config (:func:`check_methods`). An override wins over the
    study's own settings, so one that changes the budget (``learning_rate``, ``max_steps``) makes that run unequal.
    """
    import yaml

    preset, *pairs = text.split("@")
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--methods {text!r}: an override must read KEY=VALUE after '@', got {pair!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return preset.strip(), overrides


def check_methods(methods: list[str]) -> None:
    """Refuses an unknown preset or override before any long work, naming the accepted values."""
    from conspo.presets import METHODS, preset_config

    for text in methods:
        preset, overrides = parse_method(text)
        if preset not in METHODS:
            raise SystemExit(f"--methods: unknown {preset!r} in {text!r}; accepted: {', '.join(METHODS)}")
        try:
            preset_config(preset, output_dir=tempfile.gettempdir(), report_to="none", use_cpu=True, **overrides)
        except (TypeError, ValueError) as err:
            raise SystemExit(f"--methods {text!r}: {err}") from err


def parse_seeds(text: str) -> list[int]:
    """``"3"`` -> ``[0, 1, 2]``; ``"0,4"`` -> ``[0, 4]``."""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()] if "," in text else list(range(int(text)))
    except ValueError:
        seeds = []
    if not seeds or any(x < 0 for x in seeds):
        raise SystemExit(f"--seeds {text!r}: give a count >= 1 or a comma-separated list of seeds >= 0")
    return seeds


# ------------------------------------------------------------------------------------------ model and data


def encode_sft(tokenizer, problems, device):
    """Right-padded ``input_ids`` and ``labels`` (-100 on prompt and padding): completion = ``answer`` + EOS.

    ``answer`` here is the supervised target (``embedded.teacher_target``), not necessarily the true answer.
    """
    import torch

    # The tokenizer is one token per character: a vocabulary lookup gives its ids many times faster than
    # calling it on 100k strings (checked against the tokenizer on the first problems).
    vocab, unk = tokenizer.get_vocab(), tokenizer.unk_token_id
    prompts = [[vocab.get(ch, unk) for ch in p["question"]] for p in problems]
    answers = [[vocab.get(ch, unk) for ch in p["answer"]] for p in problems]
    head = problems[:64]
    if (tokenizer([p["question"] for p in head], add_special_tokens=False)["input_ids"] != prompts[: len(head)]
            or tokenizer([p["answer"] for p in head], add_special_tokens=False)["input_ids"] != answers[: len(head)]):
        raise RuntimeError("encode_sft: the tokenizer is not one token per character")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    width = max(len(q) + len(a) + 1 for q, a in zip(prompts, answers))
    rows, masks = [], []
    for q, a in zip(prompts, answers):
        fill = width - len(q) - len(a) - 1
        rows.append(q + a + [eos] + [pad] * fill)
        masks.append([-100] * len(q) + a + [eos] + [-100] * fill)
    return torch.tensor(rows, device=device), torch.tensor(masks, device=device)


def greedy_accuracy(model, tokenizer, problems, verifier, *, max_new_tokens: int) -> float:
    """``evaluation.greedy_accuracy`` in batches of 1024 (the held-out set in one batch on a GPU)."""
    from conspo.evaluation import greedy_accuracy as tiny_greedy_accuracy

    return tiny_greedy_accuracy(model, tokenizer, problems, verifier, max_new_tokens=max_new_tokens, batch_size=1024)


def sampled_metrics(model, tokenizer, problems, verifier, *, samples: int, max_new_tokens: int, temperature: float,
                    seed: int) -> dict:
    """avg@1, pass@k and maj@k (k = ``samples``) over ``problems``, ``samples`` completions each, at ``temperature``.

    pass@k and maj@k with k = n are the plain "any correct" and "majority answer correct" rates (conspo.metrics,
    ties counted fractionally); the sampling is seeded, so a run's numbers are reproducible on the same machine.
    """
    import torch

    from conspo.metrics import problem_metrics

    device = next(model.parameters()).device
    model.eval()
    torch.manual_seed(seed)
    per_problem = []
    with torch.no_grad():
        for i in range(0, len(problems), 128):
            chunk = problems[i : i + 128]
            enc = tokenizer([p["question"] for p in chunk], add_special_tokens=False, padding=True,
                            padding_side="left", return_tensors="pt").to(device)
            out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=1.0,
                                 num_return_sequences=samples, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for j, p in enumerate(chunk):
                results = [verifier(t, p["answer"]) for t in texts[j * samples : (j + 1) * samples]]
                per_problem.append(problem_metrics([r.extracted for r in results], [r.score == 1.0 for r in results],
                                                   (1, samples)))
    keys = ["avg@1", f"pass@{samples}", f"maj@{samples}"]
    return {k: sum(m[k] for m in per_problem) / max(1, len(per_problem)) for k in keys}


def warm_start(model, tokenizer, train, val, verifier, *, device, seconds, max_steps, batch, lr, stop_at,
               eval_every, max_new_tokens, seed) -> dict:
    """Supervised warm start on ``train`` (completion tokens only) until ``val`` accuracy >= stop_at or time is up."""
    import torch

    cuda = device.type == "cuda"
    ids, labels = encode_sft(tokenizer, train, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0, fused=cuda)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    history, val_acc, step, reason = [], 0.0, 0, "max_steps"
    model.train()
    start = time.perf_counter()
    for step in range(1, max_steps + 1):
        idx = torch.randint(len(train), (batch,), generator=gen, device=device)
        b_ids, b_labels = ids[idx], labels[idx]
        mask = (b_ids != tokenizer.pad_token_id) | (b_labels != -100)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(input_ids=b_ids, attention_mask=mask.long()).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                                 b_labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        out_of_time = time.perf_counter() - start >= seconds
        if step % eval_every == 0 or out_of_time or step == max_steps:
            val_acc = greedy_accuracy(model, tokenizer, val, verifier, max_new_tokens=max_new_tokens)
            model.train()
            elapsed = time.perf_counter() - start
            history.append([step, round(loss.item(), 4), round(val_acc, 4), round(elapsed, 1)])
            log(f"warm start step {step}: loss {loss.item():.3f}, validation greedy accuracy {val_acc:.3f} "
                f"({elapsed:.0f}s)")
            if val_acc >= stop_at:
                reason = f"validation accuracy >= {stop_at}"
                break
            if out_of_time:
                reason = f"time budget {seconds:g}s"
                break
    model.eval()
    return {"steps": step, "val_accuracy": val_acc, "seconds": round(time.perf_counter() - start, 1),
            "stopped_by": reason, "history": history}


def save_warm_start(model, warm_dir: Path, key: dict, summary: dict) -> None:
    """Saves the weights, then ``warm_start.json`` (settings and summary) last: its presence marks a complete save."""
    shutil.rmtree(warm_dir, ignore_errors=True)
    model.save_pretrained(warm_dir)
    (warm_dir / "warm_start.json").write_text(json.dumps({"key": key, "summary": summary}, indent=2))


def load_warm_start(warm_dir: Path, key: dict) -> dict | None:
    """The saved summary when ``warm_dir`` holds a complete warm start made with ``key``'s settings, else None."""
    try:
        saved = json.loads((warm_dir / "warm_start.json").read_text())
    except (OSError, ValueError):
        return None
    return saved["summary"] if saved.get("key") == json.loads(json.dumps(key)) else None


# ------------------------------------------------------------------------------------------------- RL runs


def score_spread(path: Path) -> dict | None:
    """From a ``batch-step<N>.json`` dump: the median within-group standard deviation of the scores (population sd,
    nats/token) and the mean positive-minus-negative score gap over mixed groups; None when there is no dump.

    docs/results.md calibrates ConSPO's tau from the first of these (tau about the median within-group sd).
    """
    try:
        batch = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    groups: dict[int, list[tuple[float, bool]]] = {}
    for score, ok, gid in zip(batch["scores"], batch["correct"], batch["group_ids"]):
        groups.setdefault(gid, []).append((score, bool(ok)))
    sds = [statistics.pstdev(x for x, _ in g) for g in groups.values() if len(g) > 1]
    gaps = [statistics.mean(x for x, ok in g if ok) - statistics.mean(x for x, ok in g if not ok)
            for g in groups.values() if any(ok for _, ok in g) and not all(ok for _, ok in g)]
    return {"median_group_sd": round(statistics.median(sds), 4) if sds else None,
            "mean_gap": round(statistics.mean(gaps), 4) if gaps else None,
            "groups": len(groups), "mixed_groups": len(gaps)}


def _progress_callback_class():
    from transformers import TrainerCallback

    class ProgressLine(TrainerCallback):
        """Logs step, reward and elapsed time every ``every`` optimizer steps."""

        def __init__(self, every: int, t0: float) -> None:
            self.every, self.t0 = every, t0

        def on_log(self, args, state, control, logs=None, **kwargs):
            step = state.global_step
            if logs and "reward" in logs and (step % self.every == 0 or step == state.max_steps):
                log(f"  step {step}/{state.max_steps}: reward {logs['reward']:.3f}, "
                    f"length {logs.get('completions/mean_length', float('nan')):.2f}, "
                    f"{time.perf_counter() - self.t0:.1f}s into the run")

    return ProgressLine


def _ProgressLine(every: int, t0: float):
    return _progress_callback_class()(every, t0)


def rl_run(method: str, seed: int, *, args, task, tokenizer, warm_dir: Path, work: Path, device, max_new: int,
           train_set, steps: int | None = None) -> dict:
    import torch
    from transformers import PrinterCallback, Qwen2ForCausalLM

    from conspo.presets import preset_config, preset_reward_funcs
    from conspo.rewards import make_reward_func
    from conspo.trainer import ConSPOTrainer

    cuda = device.type == "cuda"
    t_run = time.perf_counter()
    model = Qwen2ForCausalLM.from_pretrained(warm_dir, dtype=torch.float32).to(device)
    before = greedy_accuracy(model, tokenizer, task.test, task.verifier, max_new_tokens=max_new)
    preset, overrides = parse_method(method)
    out_dir = work / (re.sub(r"[^A-Za-z0-9_.-]", "_", method) + f"-seed{seed}")
    settings = dict(
        output_dir=str(out_dir),
        max_steps=steps or args.rl_steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        num_generations=args.num_generations,
        per_device_train_batch_size=args.prompts * args.num_generations,
        max_completion_length=max_new,
        temperature=args.temperature,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        use_cpu=not cuda,
        bf16=bool(cuda and torch.cuda.is_bf16_supported()),
        fast_generation=args.fast_generation,
        dump_batch_step=1,  # the first batch's scores: the within-group spread that tau is calibrated from
    )
    config = preset_config(preset, **{**settings, **overrides})
    extra = preset_reward_funcs(preset, config, overlong_after=task.overlong_after)  # DAPO: past the longest answer
    rewards = [make_reward_func(task.verifier, name="correct"), *extra]
    if len(rewards) > 1 and config.correctness_reward is None:
        config.correctness_reward = "correct"  # DAPO's length penalty must not decide correctness
    trainer = ConSPOTrainer(model=model, reward_funcs=rewards, args=config, train_dataset=train_set,
                            processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # one dict per step is too much; a short line every few steps instead
    trainer.add_callback(_ProgressLine(max(1, (steps or args.rl_steps) // 5), t_run))
    if cuda:
        torch.cuda.synchronize()
    t_rl = time.perf_counter()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    rl_s = time.perf_counter() - t_rl
    after = greedy_accuracy(trainer.model, tokenizer, task.test, task.verifier, max_new_tokens=max_new)
    sampled = {}
    if args.eval_samples > 0:
        sampled = sampled_metrics(trainer.model, tokenizer, task.test[: args.eval_problems], task.verifier,
                                  samples=args.eval_samples, max_new_tokens=max_new, temperature=args.temperature,
                                  seed=1000 + seed)
    spread = score_spread(out_dir / "batch-step1.json")
    logs = [r for r in trainer.state.log_history if "reward" in r]
    curve = [[r.get("step"), round(r["reward"], 4), round(r.get("completions/mean_length", float("nan")), 2)]
             for r in logs]
    fast = getattr(trainer, "fast_generation", None)
    result = {
        "method": method,
        "seed": seed,
        "heldout_before": before,
        "heldout_after": after,
        "gain_points": 100 * (after - before),
        "sampled": sampled,
        "score_spread_step1": spread,
        "rl_steps": trainer.state.global_step,
        "rl_seconds": round(rl_s, 1),
        "run_seconds": round(time.perf_counter() - t_run, 1),
        "fast_generation": bool(fast is not None and fast.enabled),
        "reward_first": curve[0][1] if curve else None,
        "reward_last": curve[-1][1] if curve else None,
        "curve_step_reward_length": curve,
    }
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
        torch._dynamo.reset()  # each run compiles its own decoding step; do not pile up guards across runs
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------------- report


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _sampled_keys(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in runs for k in r.get("sampled", {})))


def _mean_sd(values: list[float]) -> str:
    """``"62.2 ± 1.1"`` in points (values are fractions); the sd only with two values or more."""
    mean = 100 * statistics.mean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def results_table(runs: list[dict]) -> str:
    """One row per run, then (with several seeds of a method) mean ± sd over seeds per method, printed last."""
    keys = _sampled_keys(runs)
    lines = ["| method | seed | held-out before | held-out after | gain (points) | "
             + "".join(f"{k} | " for k in keys) + "RL steps | RL wall (s) | run wall (s) | reward first -> last step |",
             "|---" * (9 + len(keys)) + "|"]
    for r in runs:
        rw = "-" if r["reward_first"] is None else f"{r['reward_first']:.3f} -> {r['reward_last']:.3f}"
        cells = "".join(f"{fmt_pct(r.get('sampled', {}).get(k))} | " for k in keys)
        lines.append(f"| {r['method']} | {r['seed']} | {fmt_pct(r['heldout_before'])} | {fmt_pct(r['heldout_after'])} "
                     f"| {r['gain_points']:+.1f} | {cells}{r['rl_steps']} | {r['rl_seconds']:.1f} | "
                     f"{r['run_seconds']:.1f} | {rw} |")
    methods = list(dict.fromkeys(r["method"] for r in runs))
    if any(sum(r["method"] == m for r in runs) > 1 for m in methods):
        lines += ["", "Mean ± sd over seeds, points:", "",
                  ("| method | seeds | held-out greedy after | gain | " + "".join(f"{k} | " for k in keys)).rstrip(),
                  "|---" * (4 + len(keys)) + "|"]
        for m in methods:
            rs = [r for r in runs if r["method"] == m]
            gains = [r["gain_points"] / 100 for r in rs]
            sampled = "".join(
                f"{_mean_sd([r['sampled'][k] for r in rs]) if all(k in r.get('sampled', {}) for r in rs) else '-'} | "
                for k in keys)
            lines.append(f"| {m} | {','.join(str(r['seed']) for r in rs)} | "
                         f"{_mean_sd([r['heldout_after'] for r in rs])} | {'+' if statistics.mean(gains) >= 0 else ''}{_mean_sd(gains)} | "
                         f"{sampled}".rstrip())
    return "\n".join(lines)


def header(meta: dict) -> str:
    s = meta["sft"]
    return "\n".join([
        f"GPU study (issue 7), {meta['date']}, device: {meta['device']}",
        f"command: {meta['command']}",
        f"model: Qwen2 {meta['model_shape']}, {meta['params_m']:.1f}M parameters; task: arithmetic "
        f"{meta['difficulty']} ({'bare answers' if meta.get('answer_only') else 'worked solutions'}, teacher slip "
        f"{meta.get('teacher_slip', 0):g}; {meta['n_train']} train, {meta['n_test']} held-out), completions <= "
        f"{meta['max_completion_length']} tokens",
        f"warm start: {s['steps']} steps in {s['seconds']}s, validation greedy accuracy {fmt_pct(s['val_accuracy'])} "
        f"(stopped by {s['stopped_by']}{'; reused from an earlier run' if s.get('reused') else ''})",
        f"RL per run: {meta['rl']['steps']} steps x {meta['rl']['prompts']} prompts x "
        f"{meta['rl']['num_generations']} rollouts, lr {meta['rl']['lr']:g}, temperature {meta['rl']['temperature']:g}, "
        f"fast_generation={meta['rl']['fast_generation']}",
    ])


def spread_line(runs: list[dict]) -> str | None:
    """The first batch's within-group score spread, median over runs, and the tau it suggests (docs/results.md)."""
    sds = [r["score_spread_step1"]["median_group_sd"] for r in runs
           if (r.get("score_spread_step1") or {}).get("median_group_sd") is not None]
    if not sds:
        return None
    sd = statistics.median(sds)
    return (f"first-batch score spread within groups: median sd {sd:.3f} nats/token (median over {len(sds)} runs); "
            f"the calibration rule of docs/results.md suggests ConSPO tau of about {sd:.2g}")


def write_results(out: Path, meta: dict, runs: list[dict]) -> str:
    spread = spread_line(runs)
    text = header(meta) + ("\n" + spread if spread else "") + "\n\n" + results_table(runs)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(text + "\n")
    return text


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.scale_name = args.scale
    if args.cpu_smoke:
        apply_smoke(args)
    scale = SCALES[args.scale_name]
    args.sft_seconds = args.sft_seconds if args.sft_seconds is not None else scale["sft_seconds"]
    args.sft_lr = args.sft_lr or scale["sft_lr"]
    args.sft_batch = args.sft_batch or scale["sft_batch"]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = parse_seeds(args.seeds)
    out = Path(args.out or os.environ.get("OUT") or "runs/gpu_study")

    import torch

    check_methods(methods)
    if not 0.0 <= args.teacher_slip <= 1.0:
        raise SystemExit(f"--teacher-slip {args.teacher_slip}: must be in [0, 1]")
    if not 0.0 < args.sft_stop_at <= 1.0:
        raise SystemExit(f"--sft-stop-at {args.sft_stop_at}: must be in (0, 1]")
    spec_ar = parse_difficulty(args.difficulty)
    if args.cpu_smoke or args.device == "cpu":
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        raise SystemExit("no CUDA device: this study is for a GPU; use --device cpu --scale tiny for a rehearsal "
                         "on CPU, or --cpu-smoke to check the script")

    from datasets import Dataset

    from conspo.embedded import TinyModelSpec, build_model, build_tokenizer, teacher_target
    from conspo.tasks.arithmetic import make_task

    try:
        task = make_task(difficulty=spec_ar, n_train=args.n_train + args.val_size, n_test=args.n_test, seed=0,
                         worked=not args.answer_only)
    except ValueError as err:  # more problems asked for than the difficulty holds
        raise SystemExit(f"--difficulty {args.difficulty} with --n-train + --val-size and --n-test: {err}") from err
    train, val = task.train[: -args.val_size], task.train[-args.val_size :]
    sft_train = [{"question": p["question"], "answer": teacher_target(p, args.teacher_slip)} for p in train]
    max_new = args.completion_length or task.max_completion_length
    tokenizer = build_tokenizer()
    spec = TinyModelSpec(**scale["spec"])
    longest = max(len(p["question"]) for p in task.train + task.test) + max_new
    if longest > spec.max_position_embeddings:
        raise SystemExit(f"prompt + completion up to {longest} tokens > max_position_embeddings "
                         f"{spec.max_position_embeddings}; use an easier --difficulty or a shorter --completion-length")
    model = build_model(tokenizer, spec, seed=0).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}, " \
        f"{os.cpu_count()} cores)"
    log(f"device {device_name}; torch {torch.__version__}; model {n_params / 1e6:.1f}M parameters; task "
        f"{args.difficulty}: {len(train)} train, {len(val)} validation, {len(task.test)} held-out; "
        f"completions <= {max_new} tokens")

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="conspo-gpu-study-"))
    warm_dir = work / "warm_start"
    # Everything that decides the warm-started weights: a --work-dir that holds a warm start made with the same
    # settings is reused (a rerun with other methods or seeds skips the supervised phase).
    warm_key = {"scale": args.scale_name, "spec": scale["spec"], "difficulty": args.difficulty,
                "answer_only": args.answer_only, "teacher_slip": args.teacher_slip, "n_train": args.n_train,
                "val_size": args.val_size, "sft_seconds": args.sft_seconds, "sft_max_steps": args.sft_max_steps,
                "sft_stop_at": args.sft_stop_at, "sft_eval_every": args.sft_eval_every, "sft_lr": args.sft_lr,
                "sft_batch": args.sft_batch, "max_new": max_new, "device": device.type}
    sft = load_warm_start(warm_dir, warm_key)
    if sft is not None:
        sft["reused"] = True
        log(f"warm start reused from {warm_dir} (same settings)")
    else:
        sft = warm_start(model, tokenizer, sft_train, val, task.verifier, device=device, seconds=args.sft_seconds,
                         max_steps=args.sft_max_steps, batch=args.sft_batch, lr=args.sft_lr,
                         stop_at=args.sft_stop_at, eval_every=args.sft_eval_every, max_new_tokens=max_new, seed=0)
        sft["heldout_accuracy"] = greedy_accuracy(model, tokenizer, task.test, task.verifier, max_new_tokens=max_new)
        save_warm_start(model, warm_dir, warm_key, sft)
    log(f"warm start: {sft['steps']} steps, {sft['seconds']}s, validation {sft['val_accuracy']:.3f}, "
        f"held-out {sft['heldout_accuracy']:.3f} ({sft['stopped_by']})")
    if not 0.2 <= sft["heldout_accuracy"] <= 0.6:
        log(f"note: held-out accuracy after the warm start is {sft['heldout_accuracy']:.3f}, outside the 20-60% "
            "aimed at; adjust --sft-seconds / --sft-stop-at")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    import transformers
    import trl

    meta = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "trl": trl.__version__},
        "scale": args.scale_name,
        "model_shape": ", ".join(f"{k}={v}" for k, v in scale["spec"].items()),
        "params_m": n_params / 1e6,
        "difficulty": args.difficulty,
        "answer_only": args.answer_only,
        "teacher_slip": args.teacher_slip,
        "n_train": len(train),
        "n_test": len(task.test),
        "max_completion_length": max_new,
        "sft": {k: v for k, v in sft.items()},
        "rl": {"steps": args.rl_steps, "prompts": args.prompts, "num_generations": args.num_generations,
               "lr": args.lr, "temperature": args.temperature, "fast_generation": args.fast_generation,
               "methods": methods, "seeds": seeds},
    }
    train_set = Dataset.from_list([{"prompt": p["question"], "answer": p["answer"]} for p in train])
    runs: list[dict] = []
    write_results(out, meta, runs)
    if not args.no_warmup_run:
        log(f"untimed warm-up: 1 RL step of {methods[0]} (not reported)")
        w = rl_run(methods[0], seeds[0], args=args, task=task, tokenizer=tokenizer, warm_dir=warm_dir, work=work,
                   device=device, max_new=max_new, train_set=train_set, steps=1)
        meta["warmup_run_seconds"] = w["run_seconds"]
        log(f"warm-up done in {w['run_seconds']}s")
    for seed in seeds:
        for method in methods:
            log(f"RL run {method} seed {seed}: {args.rl_steps} steps")
            r = rl_run(method, seed, args=args, task=task, tokenizer=tokenizer, warm_dir=warm_dir, work=work,
                       device=device, max_new=max_new, train_set=train_set)
            runs.append(r)
            log(f"RL run {method} seed {seed}: held-out {r['heldout_before']:.3f} -> {r['heldout_after']:.3f} "
                f"({r['gain_points']:+.1f} points), RL {r['rl_seconds']}s, run {r['run_seconds']}s, "
                f"fast generation {'on' if r['fast_generation'] else 'off'}")
            meta["total_seconds"] = round(time.perf_counter() - T0, 1)
            write_results(out, meta, runs)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    meta["total_seconds"] = round(time.perf_counter() - T0, 1)
    text = write_results(out, meta, runs)
    print(f"\nresults in {out}/results.json and {out}/results.md; total {meta['total_seconds']}s\n", flush=True)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
