"""`conspo train | eval | compare`: argument parsing and dispatch only.

Nothing heavy is imported at module level, so ``conspo --help`` answers without loading torch or
transformers; each command imports its implementation when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Kept in step with conspo.presets.ALL_METHODS (tests/test_cli.py checks it) so that --help imports nothing heavy.
METHODS = ("conspo", "disco", "grpo", "dr_grpo", "dapo", "gspo", "cispo", "sapo", "gmpo",
           "conspo_linear_gap", "conspo_clipped_ratio", "conspo_no_margin", "conspo_fixed_margin")

# command -> "module:function"; the function takes the parsed argparse namespace and returns an exit code.
_HANDLERS = {
    "train": "conspo.run:train_command",
    "eval": "conspo.evaluation:eval_command",
    "compare": "conspo.compare:compare_command",
}


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face id or local path (default: the embedded tiny model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", default=None, help="built-in task: arithmetic (default) or arithmetic_worked; or reasoning_gym:<name>")
    src.add_argument("--dataset", default=None, help="local JSONL or Parquet file with question and answer fields")
    p.add_argument("--question-field", default=None, help="dataset field holding the question")
    p.add_argument("--answer-field", default=None, help="dataset field holding the answer or solution")
    p.add_argument("--template", choices=("plain", "chat"), default=None, help="prompt template")
    p.add_argument("--method", choices=METHODS, default="conspo", help="objective or baseline preset")
    p.add_argument("--config", default=None, help="YAML file of ConSPOConfig / GRPOConfig fields (TRL style)")
    p.add_argument("--output-dir", default=None, help="where checkpoints, metrics and plots go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the task's budget)")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    p.add_argument("--overwrite", action="store_true", help="allow an --output-dir that holds another run")
    p.add_argument("--report-to", default="none", help="none, tensorboard, wandb or trackio (where installed)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters through peft")
    p.add_argument("--lora-r", type=int, default=16)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conspo",
        description="ConSPO and its baselines (GRPO, Dr.GRPO, DAPO, GSPO, CISPO, SAPO, GMPO, DisCO) for RL with "
                    "verifiable rewards.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,compare}")
    train = sub.add_parser("train", help="train a causal LM with ConSPO or a baseline (no options: embedded default)")
    _add_train_options(train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint: avg@k, unbiased pass@k, maj@k")
    ev.add_argument("--model", required=True, help="checkpoint directory or Hugging Face id")
    evsrc = ev.add_mutually_exclusive_group()
    evsrc.add_argument("--task", default=None)
    evsrc.add_argument("--dataset", default=None)
    ev.add_argument("--question-field", default=None)
    ev.add_argument("--answer-field", default=None)
    ev.add_argument("--subset-field", default=None, help="report metrics per value of this field too")
    ev.add_argument("--template", choices=("plain", "chat"), default=None)
    ev.add_argument("--protocol", choices=("default", "paper"), default="default",
                    help="evaluation preset. default: 4 samples, k 1, temperature 0.6 and top-p 0.95 for math tasks "
                         "(--dataset, dataset files), temperature 1.0 without top-p for the others (arithmetic, "
                         "reasoning-gym), the task's instruction. paper: the paper's protocol, temperature 0.6, "
                         "top-p 0.95, 32 samples, k 1,32, the instruction 'Please reason step by step, and put your "
                         "final answer within \\boxed{}.'. --samples, --k, --temperature, --top-p, --instruction "
                         "and --max-new-tokens given explicitly override the preset's values")
    ev.add_argument("--samples", type=int, default=None, help="completions sampled per problem (N; default: the protocol's)")
    ev.add_argument("--k", default=None, help="comma-separated k values, each <= --samples (default: the protocol's)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate at most this many problems")
    ev.add_argument("--temperature", type=float, default=None, help="0: greedy (default: the protocol's)")
    ev.add_argument("--top-p", type=float, default=None,
                    help="nucleus sampling, in (0, 1]; 1: off (default: the protocol's)")
    ev.add_argument("--instruction", default=None,
                    help="text after each question in the prompt, '' for none (default: the protocol's, else the task's)")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's max_completion_length")
    ev.add_argument("--output-dir", default=None)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--gguf-file", default=None,
                    help="a GGUF file inside --model to load (dequantised to float32; needs the gguf package)")
    ev.add_argument("--batch-size", type=int, default=32, help="completions generated together")
    ev.add_argument("--backend", choices=("auto", "transformers", "vllm"), default="auto",
                    help="generation backend; auto: vLLM when installed and a GPU is present, else transformers")

    cmp_ = sub.add_parser("compare", help="train and evaluate several methods on the same data, budget and seeds")
    cmp_.add_argument("--methods", default="conspo,disco,grpo,dapo,gspo", help="comma-separated methods")
    cmp_.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    cmp_.add_argument("--eval-samples", type=int, default=4)
    cmp_.add_argument("--k", default="1,4")
    _add_train_options(cmp_)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module_name, func_name = _HANDLERS[args.command].split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
