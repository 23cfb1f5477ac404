"""ConSPOTrainer against TRL's GRPOTrainer: step time and peak memory on the same model, data and seeds.

Each variant runs in its own process (so peak memory is its own), and the variants alternate for
``--rounds`` rounds (so machine noise hits both alike). Every process trains ``--warmup`` steps that are
not timed, then ``--steps`` timed optimizer steps (wall time from step begin to step end, generation
included). The script prints the median step time and peak memory of each variant and their ratios.

    python benchmarks/trainer_overhead.py                 # CPU: tiny Qwen2, 8 prompts x 8 rollouts
    python benchmarks/trainer_overhead.py --gpu           # GPU: a 0.4B Qwen2 (Qwen2.5-0.5B shape), 64 rollouts
                                                          # of up to 256 tokens, bf16, built from a config

Targets (issue 3): median step-time ratio <= 1.05 and peak-memory ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("grpo", "conspo")


def _reward(prompts, completions, **kwargs):
    # about half of random completions earn it: groups are mixed, so both losses have work to do
    return [float(sum(ch in "13579" for ch in c) % 2 == 1) for c in completions]


def _build(model_dir: Path, gpu: bool) -> None:
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
        config = Qwen2Config(vocab_size=size, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=2048,
                             tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    else:
        config = Qwen2Config(vocab_size=size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    Qwen2ForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def worker(variant: str, model_dir: Path, gpu: bool, warmup: int, steps: int) -> dict:
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
    else:
        trainer_cls, config = ConSPOTrainer, ConSPOConfig(objective="conspo", **common)

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if gpu:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)
            if gpu and state.global_step == warmup:
                torch.cuda.reset_peak_memory_stats()

    trainer = trainer_cls(model=model, reward_funcs=_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
    peak = (torch.cuda.max_memory_allocated() if gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": variant, "times": times[warmup:], "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="GPU mode (CUDA, bf16, 0.4B model)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both variants")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each process")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, Path(args.model_dir), args.gpu, args.warmup, args.steps)))
        return

    model_dir = Path(tempfile.mkdtemp()) / "model"
    _build(model_dir, args.gpu)
    results: dict[str, dict] = {v: {"times": [], "peaks": []} for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            cmd = [sys.executable, __file__, "--worker", variant, "--model-dir", str(model_dir),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--gpu"] if args.gpu else [])
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if out.returncode != 0 or line is None:
                sys.exit(f"{variant} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            res = json.loads(line[len("RESULT "):])
            results[variant]["times"] += res["times"]
            results[variant]["peaks"].append(res["peak_bytes"])
            print(f"round {r + 1} {variant:6s} median {statistics.median(res['times']) * 1e3:8.1f} ms/step "
                  f"peak {res['peak_bytes'] / 2**20:8.1f} MiB", flush=True)

    import torch

    device = torch.cuda.get_device_name() if args.gpu else f"CPU x{os.cpu_count()}"
    print(f"\ndevice={device} torch={torch.__version__} rounds={args.rounds} steps/round={args.steps} "
          f"warmup={args.warmup} memory={'torch.cuda.max_memory_allocated' if args.gpu else 'process max RSS'}")
    med = {v: statistics.median(results[v]["times"]) for v in VARIANTS}
    peak = {v: max(results[v]["peaks"]) for v in VARIANTS}
    for v in VARIANTS:
        print(f"{v:6s} median step {med[v] * 1e3:8.1f} ms  (n={len(results[v]['times'])})  peak {peak[v] / 2**20:8.1f} MiB")
    print(f"ratio conspo/grpo: step time {med['conspo'] / med['grpo']:.3f} (target <= 1.05), "
          f"peak memory {peak['conspo'] / peak['grpo']:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
