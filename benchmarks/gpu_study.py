"""The method comparison of issue 7 at a larger scale, on one GPU: a thin driver over ``conspo compare``.

Everything it runs is ``conspo compare`` (``conspo.compare.compare``): the embedded model at ``--scale`` (``base``:
hidden 512 x 8 layers, about 34M parameters; ``large``: hidden 768 x 12, about 113M; ``tiny``: the CPU testbed's
0.54M, for a rehearsal with ``--device cpu``), warm-started on the arithmetic task at ``--difficulty`` (worked
solutions unless ``--answer-only``) with the imperfect teacher (``--teacher-slip``) until validation greedy accuracy
reaches ``--sft-stop-at`` or ``--sft-seconds`` run out (cached, so a rerun skips it), then every method of
``--methods`` for every seed at the same rollout budget, greedy held-out accuracy before and after and sampled
avg@1 / pass@k / maj@k on ``--eval-problems`` held-out problems. This script only turns its flags into those
options and records the machine; the table (``results.md``, ``results.csv``), the figures and every run
(``<out>/<method>/seed<k>/``, resumable) are compare's. The first batch's within-group score spread, from which
docs/results.md calibrates tau, is each run's ``conspo/score_sd`` in ``metrics.jsonl``.

    python benchmarks/gpu_study.py                                      # on the GPU machine: the full comparison
    python benchmarks/gpu_study.py --scale large --sft-seconds 120 --rl-steps 60 --methods conspo,grpo
    python benchmarks/gpu_study.py --device cpu --scale tiny --rl-steps 40 --prompts 32 --lr 1e-4 \\
        --n-train 20000 --n-test 500 --seeds 3 --methods conspo,disco,grpo,dr_grpo,dapo,gspo,cispo
    python benchmarks/gpu_study.py --cpu-smoke                          # tiny sizes on CPU, 2 RL steps, 2 methods

On the lent GPU machine, ``bash benchmarks/gpu_study.sh [ARGS]`` installs the carried wheels and runs this script.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
from pathlib import Path

METHODS_DEFAULT = "conspo,disco,grpo,dapo,cispo"  # GSPO equals GRPO at one step per batch (docs/results.md)
DIFFICULTY_DEFAULT = "3x2:+-"
# Warm-start settings per scale: learning rate, batch, time box (seconds).
SCALE_SFT = {"base": (1e-3, 1024, 90.0), "large": (5e-4, 1024, 150.0), "tiny": (1e-3, 128, 600.0),
             "smoke": (3e-3, 64, 8.0)}


def _number(kind, low, strict: bool):
    def check(text: str):
        value = kind(text)
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {low}, got {text}")
        return value
    return check


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--scale", choices=("base", "large", "tiny"), default="base", help="the embedded model's shape")
    a("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a rehearsal (with --scale tiny)")
    a("--methods", default=METHODS_DEFAULT, help="comma-separated methods of conspo compare")
    a("--seeds", type=_number(int, 1, False), default=1, help="runs with seeds 0..N-1")
    a("--difficulty", default=DIFFICULTY_DEFAULT, help="arithmetic OPERANDSxDIGITS:OPERATORS")
    a("--answer-only", action="store_true", help="bare answers instead of worked solutions")
    a("--teacher-slip", type=float, default=0.6, help="fraction of odd answers the warm start's teacher gets wrong")
    a("--n-train", type=_number(int, 1, False), default=100_000, help="training problems")
    a("--n-test", type=_number(int, 1, False), default=1000, help="held-out problems (greedy accuracy)")
    a("--sft-seconds", type=_number(float, 0, True), default=None, help="warm-start time box (default: by scale)")
    a("--sft-max-steps", type=_number(int, 1, False), default=20_000, help="warm-start step cap")
    a("--sft-stop-at", type=float, default=0.45, help="stop the warm start at this validation greedy accuracy")
    a("--sft-eval-every", type=_number(int, 1, False), default=50, help="warm-start steps between validations")
    a("--sft-lr", type=_number(float, 0, True), default=None, help="warm-start learning rate (default: by scale)")
    a("--sft-batch", type=_number(int, 1, False), default=None, help="warm-start batch (default: by scale)")
    a("--val-size", type=_number(int, 1, False), default=512, help="training problems that decide when SFT stops")
    a("--rl-steps", type=_number(int, 1, False), default=100, help="optimizer steps per run (the budget)")
    a("--prompts", type=_number(int, 1, False), default=64, help="prompts per RL step")
    a("--num-generations", type=_number(int, 2, False), default=8, help="rollouts per prompt")
    a("--completion-length", type=_number(int, 1, False), default=None, help="max_completion_length (default: task's)")
    a("--eval-samples", type=_number(int, 0, False), default=8, help="samples per problem for avg@1, pass@k, maj@k")
    a("--eval-problems", type=_number(int, 1, False), default=200, help="held-out problems of the sampled evaluation")
    a("--lr", type=_number(float, 0, True), default=2e-5, help="RL learning rate (constant), same for every method")
    a("--temperature", type=_number(float, 0, True), default=1.0, help="rollout and sampled-evaluation temperature")
    a("--fast-generation", choices=("auto", "on", "off"), default="off", help="ConSPOConfig.fast_generation")
    a("--out", default=None, help="the comparison's directory (default: $OUT when set, else runs/gpu_study)")
    a("--work-dir", default=None, help="the warm-start cache (default: $CONSPO_CACHE or ~/.cache/conspo)")
    a("--cpu-smoke", action="store_true", help="tiny model and task on CPU, 2 RL steps of conspo,grpo")
    return p


def compare_options(args: argparse.Namespace) -> dict:
    """The ``conspo.compare.compare`` arguments these flags stand for."""
    scale = "smoke" if args.cpu_smoke else args.scale
    lr, batch, seconds = SCALE_SFT[scale]
    if args.cpu_smoke:
        args.difficulty = "2x2:+-" if args.difficulty == DIFFICULTY_DEFAULT else args.difficulty
        args.n_train, args.n_test, args.val_size, args.rl_steps = 2000, 48, 48, 2
        args.prompts, args.num_generations, args.sft_max_steps = 4, 4, min(args.sft_max_steps, 300)
        args.methods = "conspo,grpo" if args.methods == METHODS_DEFAULT else args.methods
    if "@" in args.methods:
        raise SystemExit(f"--methods {args.methods!r}: per-method overrides (name@key=value) are gone; run a "
                         f"separate comparison with --config for a variant")
    for name, value, low, high in (("--teacher-slip", args.teacher_slip, 0.0, 1.0),
                                   ("--sft-stop-at", args.sft_stop_at, 1e-12, 1.0)):
        if not low <= value <= high:
            raise SystemExit(f"{name} {value}: must be in {'[0, 1]' if low == 0 else '(0, 1]'}")
    warm = {"max_steps": args.sft_max_steps, "batch_size": args.sft_batch or batch, "learning_rate": args.sft_lr or lr,
            "val_size": args.val_size, "eval_every": args.sft_eval_every, "stop_at": args.sft_stop_at,
            "teacher_slip": args.teacher_slip, "warmup_steps": 100 if scale in ("base", "large") else 50}
    options = dict(
        methods=args.methods, seeds=args.seeds, eval_samples=args.eval_samples,
        ks=sorted({1, args.eval_samples}) if args.eval_samples else [1], sample_limit=args.eval_problems,
        eval_temperature=args.temperature, task="arithmetic" if args.answer_only else "arithmetic_worked",
        task_options={"difficulty": args.difficulty, "n_train": args.n_train + args.val_size, "n_test": args.n_test},
        embedded_scale=scale, warm_start=warm, warm_start_seconds=args.sft_seconds or seconds,
        max_steps=args.rl_steps, eval_limit=args.n_test, eval_every=0, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, num_generations=args.num_generations,
        per_device_train_batch_size=args.prompts * args.num_generations, temperature=args.temperature,
        fast_generation=args.fast_generation, gradient_checkpointing=False, dump_batch_step=1)
    if args.completion_length:
        options["max_completion_length"] = args.completion_length
    if args.device == "cpu" or args.cpu_smoke:
        options.update(use_cpu=True, bf16=False)
    return options


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or "runs/gpu_study")
    options = compare_options(args)
    import torch

    if not (options.get("use_cpu") or torch.cuda.is_available()):
        raise SystemExit("no CUDA device: this study is for a GPU; use --device cpu --scale tiny for a rehearsal "
                         "on CPU, or --cpu-smoke to check the script")
    if args.work_dir:
        os.environ["CONSPO_CACHE"] = str(Path(args.work_dir).resolve())
    from conspo.compare import compare, parse_methods
    from conspo.run import RunError

    device = torch.cuda.get_device_name() if not options.get("use_cpu") else f"CPU ({platform.machine()}, " \
        f"{os.cpu_count()} cores)"
    meta = {"date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "device": device,
            "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
            "torch": torch.__version__, "compare": {k: v for k, v in options.items() if k != "methods"}}
    try:
        methods = parse_methods(options.pop("methods"))
        result = compare(methods, options.pop("seeds"), out, **options)
    except RunError as err:
        raise SystemExit(f"gpu_study: {err}") from None
    (out / "study.json").write_text(json.dumps({**meta, "rows": result["rows"]}, indent=2, default=str))
    print(f"\n[gpu_study] {device}; table: {out / 'results.md'}; settings: {out / 'study.json'}", flush=True)
    print((out / "results.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
