"""ConSPOTrainer against TRL's GRPOTrainer: step time, generation share and peak memory on the same model,
data and seeds.

Each variant runs in its own process (so peak memory is its own), and the variants alternate for
``--rounds`` rounds (so machine noise hits all alike). Every process trains ``--warmup`` steps that are
not timed, then ``--steps`` timed optimizer steps (wall time from step begin to step end, generation
included; generation is the time inside the trainer's ``_generate``). The script prints the median step time,
generation share and peak memory of each variant and their ratios.

Variants: ``grpo`` (TRL's GRPOTrainer, default generation), ``conspo`` (ConSPOTrainer, fast_generation='off':
TRL's default generation), ``conspo_fast`` (ConSPOTrainer, fast_generation='auto': static cache + compiled
decoding on CUDA, see conspo.fast_generation; its compile time is reported apart) and ``conspo_vllm``
(use_vllm=True, colocated; GPU only, when vLLM is installed).

    python benchmarks/trainer_overhead.py                 # CPU: tiny Qwen2, 8 prompts x 8 rollouts; grpo, conspo
    python benchmarks/trainer_overhead.py --gpu           # GPU: a 0.4B Qwen2 (Qwen2.5-0.5B shape), 64 rollouts
                                                          # of up to 256 tokens, bf16, built from a config;
                                                          # grpo, conspo, conspo_fast (+ conspo_vllm)

Targets: conspo/grpo step-time and peak-memory ratios <= 1.05 (issue 3); conspo_fast at least 4x faster steps
than the default path on an H100-class GPU (issue 9).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("grpo", "conspo", "conspo_fast", "conspo_vllm")


def _reward(prompts, completions, **kwargs):
    # about half of random completions earn it: groups are mixed, so both losses have work to do
    return [float(sum(ch in "13579" for ch in c) % 2 == 1) for c in completions]


def _build(model_dir: Path, gpu: bool, layers: int | None = None) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {"<pad>": 0, "<eos>": 1}
    for ch in "0123456789+-*= ":
        vocab[ch] = len(vocab)
    size = 32000 if gpu else len(vocab)
    for i in range(len(vocab), size):
        vocab[f"<t{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    if gpu:  # the Qwen2.5-0.5B shape with a 32k vocabulary: about 0.4B parameters
        config = Qwen2Config(vocab_size=size, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers or 24,
                             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=2048,
                             tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    else:
        config = Qwen2Config(vocab_size=size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def worker(variant: str, model_dir: Path, gpu: bool, warmup: int, steps: int, fast_compile: dict | None) -> dict:
    import resource

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from conspo import ConSPOConfig, ConSPOTrainer

    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    dtype = torch.bfloat16 if gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    prompts = [f"{a}+{b}=" for a in range(10) for b in range(10)] * 10
    dataset = Dataset.from_dict({"prompt": prompts})
    common = dict(
        output_dir=tempfile.mkdtemp(), use_cpu=not gpu, bf16=gpu, report_to="none", save_strategy="no",
        disable_tqdm=True, logging_steps=1000, seed=0, max_steps=warmup + steps, learning_rate=1e-5,
        num_generations=8, per_device_train_batch_size=64 if gpu else 64,
        max_completion_length=256 if gpu else 8, temperature=1.0, loss_type="grpo", beta=0.0,
    )
    if variant == "grpo":
        trainer_cls, config = GRPOTrainer, GRPOConfig(**common)
    elif variant == "conspo":
        trainer_cls, config = ConSPOTrainer, ConSPOConfig(objective="conspo", fast_generation="off", **common)
    elif variant == "conspo_fast":
        trainer_cls = ConSPOTrainer
        config = ConSPOConfig(objective="conspo", fast_generation="auto" if gpu else "on",
                              fast_generation_compile=fast_compile, **common)
    else:
        trainer_cls = ConSPOTrainer
        config = ConSPOConfig(objective="conspo", use_vllm=True, vllm_mode="colocate",
                              vllm_gpu_memory_utilization=0.3, **common)

    times: list[float] = []
    gen_times: list[float] = []
    generating = [0.0]  # seconds inside _generate so far

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if gpu:
                torch.cuda.synchronize()
            self.start = time.perf_counter()
            self.generating = generating[0]

        def on_step_end(self, args, state, control, **kwargs):
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)
            gen_times.append(generating[0] - self.generating)
            if gpu and state.global_step == warmup:
                torch.cuda.reset_peak_memory_stats()

    trainer = trainer_cls(model=model, reward_funcs=_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Timer()])
    generate = trainer._generate

    def timed_generate(prompts):
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = generate(prompts)
        if gpu:
            torch.cuda.synchronize()
        generating[0] += time.perf_counter() - start
        return result

    trainer._generate = timed_generate
    trainer.train()
    peak = (torch.cuda.max_memory_allocated() if gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {"variant": variant, "times": times[warmup:], "gen_times": gen_times[warmup:],
              "warmup_times": times[:warmup], "peak_bytes": peak}
    fast = getattr(trainer, "fast_generation", None)
    if fast is not None:
        result["fast_generation"] = {"enabled": fast.plan.enabled, "reason": fast.plan.reason, **fast.stats}
    return result


def _compile_seconds(fast: dict) -> float:
    """Time of the generate calls that compiled, minus what those calls take once compiled."""
    steady = statistics.median(fast["steady_call_seconds"]) if fast["steady_call_seconds"] else 0.0
    return fast["compiling_call_seconds"] - fast["compiling_calls"] * steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="GPU mode (CUDA, bf16, 0.4B model)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both variants")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each process")
    parser.add_argument("--variants", help="comma-separated subset of " + ",".join(VARIANTS) + " (default: grpo,conspo "
                        "on CPU; grpo,conspo,conspo_fast on GPU, plus conspo_vllm when vLLM is installed)")
    parser.add_argument("--fast-compile", help="JSON fast_generation_compile for conspo_fast (default: transformers' "
                        "inductor/reduce-overhead; conspo_fast on CPU runs with fast_generation='on', for dry runs)")
    parser.add_argument("--json-out", help="also write every measurement to this JSON file")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    fast_compile = json.loads(args.fast_compile) if args.fast_compile else None

    if args.worker:
        res = worker(args.worker, Path(args.model_dir), args.gpu, args.warmup, args.steps, fast_compile)
        print("RESULT " + json.dumps(res))
        return

    if args.variants:
        variants = tuple(args.variants.split(","))
        unknown = set(variants) - set(VARIANTS)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    elif args.gpu:
        has_vllm = importlib.util.find_spec("vllm") is not None
        variants = VARIANTS if has_vllm else VARIANTS[:3]
        if not has_vllm:
            print("vLLM is not installed: conspo_vllm skipped", flush=True)
    else:
        variants = VARIANTS[:2]

    model_dir = Path(tempfile.mkdtemp()) / "model"
    _build(model_dir, args.gpu)
    results: dict[str, dict] = {v: {"times": [], "gen_times": [], "peaks": [], "runs": []} for v in variants}
    for r in range(args.rounds):
        for variant in variants if r % 2 == 0 else variants[::-1]:
            cmd = [sys.executable, __file__, "--worker", variant, "--model-dir", str(model_dir),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--gpu"] if args.gpu else [])
            if args.fast_compile:
                cmd += ["--fast-compile", args.fast_compile]
            started = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if out.returncode != 0 or line is None:
                sys.exit(f"{variant} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            res = json.loads(line[len("RESULT "):])
            res["process_seconds"] = time.perf_counter() - started
            results[variant]["times"] += res["times"]
            results[variant]["gen_times"] += res["gen_times"]
            results[variant]["peaks"].append(res["peak_bytes"])
            results[variant]["runs"].append(res)
            extra = ""
            if "fast_generation" in res:
                fast = res["fast_generation"]
                extra = (f"  fast_generation {'on' if fast['enabled'] else 'OFF (' + fast['reason'] + ')'}: "
                         f"{fast['graphs_compiled']} graph(s) compiled in {fast['compiling_calls']} call(s), "
                         f"compile ~{_compile_seconds(fast):.1f} s")
            print(f"round {r + 1} {variant:11s} median {statistics.median(res['times']) * 1e3:8.1f} ms/step "
                  f"warm-up steps {' '.join(f'{t:.1f}' for t in res['warmup_times'])} s "
                  f"peak {res['peak_bytes'] / 2**20:8.1f} MiB{extra}", flush=True)

    import torch

    device = torch.cuda.get_device_name() if args.gpu else f"CPU x{os.cpu_count()}"
    print(f"\ndevice={device} torch={torch.__version__} rounds={args.rounds} steps/round={args.steps} "
          f"warmup={args.warmup} memory={'torch.cuda.max_memory_allocated' if args.gpu else 'process max RSS'}")
    med = {v: statistics.median(results[v]["times"]) for v in variants}
    share = {v: sum(results[v]["gen_times"]) / sum(results[v]["times"]) for v in variants}
    peak = {v: max(results[v]["peaks"]) for v in variants}
    for v in variants:
        print(f"{v:11s} median step {med[v] * 1e3:8.1f} ms  (n={len(results[v]['times'])})  "
              f"generation {share[v] * 100:5.1f}%  peak {peak[v] / 2**20:8.1f} MiB")
    if "conspo" in variants and "grpo" in variants:
        print(f"ratio conspo/grpo: step time {med['conspo'] / med['grpo']:.3f} (target <= 1.05), "
              f"peak memory {peak['conspo'] / peak['grpo']:.3f} (target <= 1.05)")
    for fast_variant in ("conspo_fast", "conspo_vllm"):
        if fast_variant not in variants:
            continue
        for base in ("grpo", "conspo"):
            if base in variants:
                print(f"speed-up {base}/{fast_variant}: {med[base] / med[fast_variant]:.2f}x step time"
                      + (" (target >= 4 on an H100-class GPU)" if fast_variant == "conspo_fast" else ""))
    if "conspo_fast" in variants:
        for run in results["conspo_fast"]["runs"]:
            fast = run["fast_generation"]
            print(f"conspo_fast compile: {fast['graphs_compiled']} graph(s) in {fast['compiling_calls']} generate "
                  f"call(s) of {fast['generate_calls']}, ~{_compile_seconds(fast):.1f} s of compilation "
                  f"(static cache sizes {fast['cache_lens']}); process wall time {run['process_seconds']:.0f} s")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"device": device, "torch": torch.__version__, "variants": variants,
                                                   "args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
