"""`conspo train | eval | compare`: argument parsing and dispatch only.

``conspo --help`` and ``conspo eval`` import nothing heavy here. ``conspo train`` and ``conspo compare`` take every
``ConSPOConfig`` field (so every TRL ``GRPOConfig`` / ``TrainingArguments`` field) as a flag, through
``transformers.HfArgumentParser`` over the config dataclass as ``trl grpo`` does; building that parser imports
the config class (torch, transformers, TRL), so it is built only when one of those two commands is asked for.

Precedence of a setting, lowest first: conspo's defaults, the method's preset, the ``--config`` YAML, the flags
given on the command line. Only flags given explicitly override the YAML: the parser's defaults never do.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from conspo.presets import ALL_METHODS  # (names only: conspo.presets imports nothing heavy)

# command -> "module:function"; the function takes the parsed argparse namespace and returns an exit code.
_HANDLERS = {
    "train": "conspo.run:train_command",
    "eval": "conspo.evaluation:eval_command",
    "compare": "conspo.compare:compare_command",
}
_HELP = {
    "train": "train a causal LM with ConSPO or a baseline (no options: embedded default)",
    "eval": "evaluate a checkpoint: avg@k, unbiased pass@k, maj@k",
    "compare": "train and evaluate several methods on the same data, budget and seeds",
}
DESCRIPTION = ("ConSPO and its baselines (GRPO, Dr.GRPO, DAPO, GSPO, CISPO, SAPO, GMPO, DisCO) for RL with "
               "verifiable rewards.")
FIELDS_GROUP = ("ConSPOConfig fields (TRL GRPOConfig and transformers TrainingArguments included; also settable "
                "in the --config YAML, and a flag given here wins over the YAML)")
# Config fields that are script options of conspo train (the same flag, conspo's default and meaning).
JOB_FIELDS = ("output_dir", "seed", "max_steps", "report_to")


class _Refuse(argparse.Action):
    """A flag a command does not take, refused with the reason and what to use instead."""

    def __init__(self, option_strings, dest, reason: str = "", **kwargs):
        self.reason = reason
        kwargs.setdefault("nargs", "?")
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: {self.reason}")


def _add_source_options(p) -> None:
    p.add_argument("--model", default=None, help="Hugging Face id or local path (default: the embedded tiny model)")
    p.add_argument("--gguf-file", "--gguf_file", dest="gguf_file", default=None,
                   help="a GGUF file inside --model to load (unpacked to a plain float32 model; needs the gguf package)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", default=None,
                     help="built-in task: arithmetic (default) or arithmetic_worked; or reasoning_gym:<name>")
    src.add_argument("--dataset", default=None, help="local JSONL or Parquet file with question and answer fields")
    p.add_argument("--question-field", "--question_field", dest="question_field", default=None,
                   help="dataset field holding the question")
    p.add_argument("--answer-field", "--answer_field", dest="answer_field", default=None,
                   help="dataset field holding the answer or solution")
    p.add_argument("--difficulty", default=None,
                   help="arithmetic tasks: OPERANDSxDIGITS:OPERATORS, e.g. 3x2:+- (default: the task's own)")
    p.add_argument("--embedded-scale", "--embedded_scale", dest="embedded_scale", default=None,
                   choices=("tiny", "base", "large", "smoke"),
                   help="without --model: the embedded model's shape (tiny: the default 0.54M; base ~34M and large "
                        "~113M are for a GPU; smoke: a few seconds on CPU)")
    p.add_argument("--warm-start-seconds", "--warm_start_seconds", dest="warm_start_seconds", type=float,
                   default=None, help="without --model: a time box for the embedded model's supervised warm start")
    p.add_argument("--template", choices=("plain", "chat"), default=None, help="prompt template (default: plain)")
    p.add_argument("--config", default=None,
                   help="YAML file of ConSPOConfig / GRPOConfig fields (TRL style); flags given explicitly win over it")
    p.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, default=None,
                   help="optimizer steps (default: the YAML's max_steps, else the task's budget)")
    p.add_argument("--report-to", "--report_to", dest="report_to", default=None,
                   help="none (default), tensorboard, wandb or trackio (where installed)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters through peft")
    p.add_argument("--lora-r", "--lora_r", dest="lora_r", type=int, default=16, help="LoRA rank")
    p.add_argument("--eval-every", "--eval_every", dest="eval_every", type=int, default=None,
                   help="greedy held-out (and validation) accuracy every N optimizer steps; 0: only before and after "
                        "training (default: max_steps // 6)")
    p.add_argument("--eval-limit", "--eval_limit", dest="eval_limit", type=int, default=500,
                   help="held-out problems in each of those evaluations (the first N test problems)")
    p.add_argument("--val-size", "--val_size", dest="val_size", type=int, default=0,
                   help="set N train problems aside (a split drawn with a fixed seed, the same for every method "
                        "and seed) as a validation split, evaluated with the held-out problems; the checkpoint with "
                        "the best validation accuracy is kept in best/ and its test accuracy reported. 0: off")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something: not ``None``, and not the dataclass's where conspo has its own."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or getattr(action, "conspo_default", False):
            return action.help
        return super()._get_help_string(action)


def _conspo_defaults() -> dict[str, str]:
    """field -> conspo's default where it differs from the dataclass's (shown in the help of that flag)."""
    from conspo.presets import DEFAULT_RL
    from conspo.run import COMPUTED_DEFAULTS, FIXED_DEFAULTS, PRETRAINED_DEFAULTS

    notes: dict[str, list[str]] = {}
    for name, value in DEFAULT_RL.items():
        notes.setdefault(name, []).append(f"{value} with the embedded model")
    for name, value in PRETRAINED_DEFAULTS.items():
        notes.setdefault(name, []).append(f"{value} with --model")
    for name, value in FIXED_DEFAULTS.items():
        notes.setdefault(name, []).append(str(value))
    for name, text in COMPUTED_DEFAULTS.items():
        notes.setdefault(name, []).append(text)
    return {name: ", ".join(values) for name, values in notes.items()}


def _config_parser(prog: str, description: str, usage: str):
    """An ``HfArgumentParser`` over ``ConSPOConfig`` (every field a flag, with its help), in its own group."""
    from transformers import HfArgumentParser

    from conspo.trainer import ConSPOConfig

    class Fields(ConSPOConfig):  # the same dataclass fields; only the help group is named
        _argument_group_name = FIELDS_GROUP

    parser = HfArgumentParser(Fields, prog=prog, description=description, usage=usage, allow_abbrev=False,
                              conflict_handler="resolve", formatter_class=_Formatter)
    ours = _conspo_defaults()
    for action in parser._actions:  # the dataclass default is shown; say where conspo's differs
        if action.dest in ours and action.help is not None:
            action.help = f"{action.help} (conspo's default: {ours[action.dest]}; the method's preset may set it)"
            action.conspo_default = True
    return parser


TRAIN_USAGE = ("%(prog)s [--method METHOD] [--model MODEL] [--task TASK | --dataset FILE] [--config YAML] "
               "[--output-dir DIR] [--seed N] [--max-steps N] [--resume | --overwrite] [--val-size N] "
               "[--<ConSPOConfig field> VALUE ...]")
COMPARE_USAGE = ("%(prog)s [--methods A,B,...] [--seeds N] [--model MODEL] [--task TASK | --dataset FILE] "
                 "[--config YAML] [--output-dir DIR] [--max-steps N] [--eval-samples N] [--k K,...] "
                 "[--val-size N] [--<ConSPOConfig field> VALUE ...]")


def _add_train_script_options(p) -> None:
    p.add_argument("--method", choices=ALL_METHODS, default="conspo", help="objective or baseline preset")
    _add_source_options(p)
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None,
                   help="where checkpoints, metrics and plots go (default: the YAML's output_dir, else "
                        "runs/<method>-<task>-seed<seed>)")
    p.add_argument("--seed", type=int, default=None, help="run seed (default: the YAML's seed, else 0)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir from its newest complete checkpoint; refused when the "
                        "run was recorded with other settings")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the conspo run in --output-dir and start again (never a directory that holds no "
                        "conspo run, the working directory or one holding an input of the run)")
    p.add_argument("--resume_from_checkpoint", "--resume-from-checkpoint", action=_Refuse,
                   reason="not read by conspo; pass --resume to continue the run in --output-dir",
                   help=argparse.SUPPRESS)


def _add_compare_script_options(p) -> None:
    p.add_argument("--methods", default="conspo,disco,grpo,dapo,gspo", help="comma-separated methods")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds: runs with seeds 0..N-1")
    p.add_argument("--eval-samples", "--eval_samples", dest="eval_samples", type=int, default=4,
                   help="completions sampled per held-out problem from each final checkpoint (0: greedy only)")
    p.add_argument("--k", default="1,4", help="comma-separated k values of avg@k, pass@k and maj@k")
    _add_source_options(p)
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", default="runs/compare",
                   help="the comparison's directory: <method>/seed<k>/ runs, results.md, results.csv, figures")
    refused = {
        "--method": "conspo compare takes --methods (comma-separated), not --method",
        "--seed": "conspo compare runs seeds 0..N-1 with --seeds N, not --seed",
        "--resume": "conspo compare resumes unfinished runs by itself; rerun the same command",
        "--overwrite": "conspo compare trains again every run recorded with other settings by itself; for a "
                       "separate comparison choose another --output-dir",
    }
    for flag, reason in refused.items():
        p.add_argument(flag, action=_Refuse, reason=reason, help=argparse.SUPPRESS)
    p.add_argument("--resume_from_checkpoint", "--resume-from-checkpoint", action=_Refuse,
                   reason="conspo compare resumes unfinished runs by itself", help=argparse.SUPPRESS)


def build_train_parser() -> argparse.ArgumentParser:
    p = _config_parser("conspo train", _HELP["train"] + ". Precedence: conspo's defaults < the method's preset < "
                       "--config YAML < flags given on the command line.", TRAIN_USAGE)
    _add_train_script_options(p)
    return p


def build_compare_parser() -> argparse.ArgumentParser:
    p = _config_parser("conspo compare", _HELP["compare"] + ". Finished runs with the same settings are reused, "
                       "unfinished ones resumed, runs recorded with other settings trained again.", COMPARE_USAGE)
    _add_compare_script_options(p)
    return p


_SCRIPT_OPTIONS = {"train": (_add_train_script_options, TRAIN_USAGE),
                   "compare": (_add_compare_script_options, COMPARE_USAGE)}


def precheck(command: str, argv: list[str]) -> None:
    """The script options alone, on a light parser, before the full one imports torch: a mistyped method or a
    refused flag is answered at once (exit 2), not after the seconds the config class takes to import."""
    if any(a in ("-h", "--help") for a in argv):
        return
    add, usage = _SCRIPT_OPTIONS[command]
    light = argparse.ArgumentParser(prog=f"conspo {command}", usage=usage, add_help=False, allow_abbrev=False)
    add(light)
    light.parse_known_args(argv)


def build_eval_parser(ev: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    ev = ev or argparse.ArgumentParser(prog="conspo eval", description=_HELP["eval"], allow_abbrev=False)
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
    return ev


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``conspo --help`` and the list of commands (light; ``train`` and ``compare`` have
    their own parsers, built by :func:`build_train_parser` / :func:`build_compare_parser` when asked for)."""
    parser = argparse.ArgumentParser(prog="conspo", description=DESCRIPTION,
                                     epilog="conspo <command> --help lists a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,compare}")
    for name in ("train", "compare"):
        sub.add_parser(name, help=_HELP[name], add_help=False)
    build_eval_parser(sub.add_parser("eval", help=_HELP["eval"], allow_abbrev=False))
    return parser


_BUILDERS = {"train": build_train_parser, "compare": build_compare_parser}


def parse_explicit(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, set[str]]:
    """The namespace of ``argv`` (defaults filled in) and the destinations given explicitly on the command line.

    The second set comes from parsing again with every default suppressed: argparse then sets only what the
    command line names, so a flag equal to its default still counts as given and an absent one never does."""
    ns = parser.parse_args(argv)
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        given = set(vars(parser.parse_args(argv)))
    finally:
        for action, default in saved:
            action.default = default
    return ns, given


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _BUILDERS:
        command = argv[0]
        precheck(command, argv[1:])
        ns, explicit = parse_explicit(_BUILDERS[command](), argv[1:])
        ns.command, ns._explicit, ns._argv = command, explicit, argv
    else:
        parser = build_parser()
        ns = parser.parse_args(argv)
        if ns.command is None:
            parser.print_help()
            return 2
        command = ns.command
    module_name, func_name = _HANDLERS[command].split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    return int(handler(ns) or 0)


if __name__ == "__main__":
    sys.exit(main())
