"""Correctness of fast generation (issue 9) on a GPU: what the CPU tests prove in fp32, checked in bf16 with inductor.

For a bf16 policy (it generates itself) and for an fp32 policy under bf16 mixed precision (a bf16 copy
generates), through ConSPOTrainer's real generation path with activation checkpointing on (TRL's default):

1. greedy: the fast path's completions against TRL's default path. In bf16 two correct implementations may part
   at a near tie, so each differing row reports the logit gap of the two tokens at the first difference;
2. logits: the compiled static-cache generator's logits for its own greedy tokens against an eager full
   forward of the same sequences (max and mean |difference| over valid tokens);
3. log-probabilities: for tokens sampled by the fast path, the trainer's per-token log-probabilities against
   the log-softmax of the logits the generator sampled from, next to the same gap for the default path;
4. weight update: 1-3 run after one optimizer step (the compile happens inside that step, as in training), and
   the step's own effect on the logits is printed beside the gap: a stale generator would show a gap as large
   as the effect, and its greedy output would not have moved;
5. compiles: the number of graphs compiled over all of it.

    python benchmarks/fast_generation_check.py            # CUDA: 4-layer Qwen2 of the 0.4B width, bf16, inductor
    python benchmarks/fast_generation_check.py --cpu      # dry run: tiny Qwen2 on CPU, aot_eager

Prints one PASS/FAIL line per check; the JSON report goes to --json-out (or stdout).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from trainer_overhead import _build, _reward  # noqa: E402

TIE = 0.125  # bf16 logit gap treated as a near tie (8 bf16 ulps at |logit| in [2, 4))
LOGIT_GAP = 0.1  # max |fast - eager| logit difference accepted in bf16


def _left_pad(rows, pad, device):
    import torch

    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def _completion_mask(completion, eos):
    done = (completion == eos).cumsum(1)
    return ((done == 0) | ((done == 1) & (completion == eos))).long()


def _generator_gap(model, eager_model, ids, mask, config, eos):
    """Generate greedily with ``config`` (output logits), then compare them with an eager full forward."""
    import torch

    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, output_logits=True,
                         return_dict_in_generate=True)
    completion = out.sequences[:, ids.shape[1]:]
    gen_logits = torch.stack(out.logits, 1).float()
    cmask = _completion_mask(completion, eos)
    with torch.no_grad():
        full = eager_model(input_ids=torch.cat([ids, completion], 1),
                           attention_mask=torch.cat([mask, cmask], 1)).logits.float()
    eager_logits = full[:, ids.shape[1] - 1: -1]
    valid = cmask.bool()
    diff = (gen_logits - eager_logits).abs()[valid]
    return {"max": diff.max().item(), "mean": diff.mean().item(), "tokens": int(valid.sum())}


@contextmanager
def _as_trl_generates(trainer):
    """The model state TRL generates in (activation checkpointing off, no stale hooks), for direct generate calls."""
    import torch
    from trl.models import unwrap_model_for_generation

    from conspo import fast_generation as fg

    fg.drop_stale_input_grad_hooks(trainer.model)
    with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                     gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs) as model, \
            torch.no_grad():
        yield model


def _probe_logits(model, ids, mask):
    import torch

    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def run(cpu: bool, layers: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from conspo import ConSPOConfig, ConSPOTrainer
    from conspo import fast_generation as fg

    device = "cpu" if cpu else "cuda"
    model_dir = Path(tempfile.mkdtemp()) / "model"
    _build(model_dir, gpu=not cpu, layers=layers)
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    rng = random.Random(0)
    prompts = ["".join(rng.choice("0123456789+-*= ") for _ in range(rng.randint(3, 24))) for _ in range(16)]
    prompt_ids = [tok(p)["input_ids"] for p in prompts]
    max_new = 8 if cpu else 64
    eos, pad = tok.eos_token_id, tok.pad_token_id
    compile_options = {"backend": "aot_eager", "mode": None} if cpu else None
    report: dict = {"device": "cpu" if cpu else torch.cuda.get_device_name(), "torch": torch.__version__,
                    "layers": layers, "max_new_tokens": max_new, "checks": {}}
    passed: dict[str, bool] = {}

    def trainer_for(dtype, name):
        dataset = Dataset.from_dict({"prompt": prompts * 8})
        config = ConSPOConfig(
            output_dir=tempfile.mkdtemp(), use_cpu=cpu, bf16=True, report_to="none", save_strategy="no",
            disable_tqdm=True, logging_steps=1, seed=0, max_steps=1, learning_rate=1e-3, lr_scheduler_type="constant",
            num_generations=4, per_device_train_batch_size=16, max_completion_length=max_new, beta=0.0,
            fast_generation="on" if cpu else "auto", fast_generation_compile=compile_options,
        )
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        trainer = ConSPOTrainer(model=model, reward_funcs=_reward, args=config, train_dataset=dataset,
                                processing_class=tok)
        print(f"[{name}] plan: {trainer.fast_generation.plan}", flush=True)
        return trainer

    def greedy(trainer):
        trainer.generation_config.do_sample = False
        try:
            return trainer._generate_single_turn(prompt_ids, None, {}, 1)[0]
        finally:
            trainer.generation_config.do_sample = True

    def greedy_config(trainer):
        config = fg.fast_generation_config(trainer.generation_config, cache_len=fg.prompt_bucket(ids.shape[1]) + max_new,
                                           compile_cfg=trainer.fast_generation.compile_cfg)
        config.do_sample = False
        return config

    def check(name, ok, **numbers):
        passed[name] = bool(ok)
        report["checks"][name] = {"pass": bool(ok), **numbers}
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())
        print(f"{'PASS' if ok else 'FAIL'} {name}: {shown}", flush=True)

    ids, mask = _left_pad(prompt_ids, pad, device)
    compiled_before = fg.graphs_compiled()
    started = time.perf_counter()

    # ------------------------------------------------------------------ a bf16 policy generates itself
    trainer = trainer_for(torch.bfloat16, "bf16 policy")
    fast_gen = trainer.fast_generation
    check("bf16-policy: plan", fast_gen.plan.enabled and fast_gen.plan.generator == "policy", reason=fast_gen.plan.reason)
    model = trainer.model
    with fast_gen.bypassed():
        before = greedy(trainer)
    probe_before = _probe_logits(model, ids, mask)
    trainer.train()  # one optimizer step; its rollouts compile the decoding step, as in a real run
    effect = (_probe_logits(model, ids, mask) - probe_before).abs().max().item()

    fast = greedy(trainer)
    with fast_gen.bypassed():
        default = greedy(trainer)
    margins = fg.divergence_margins(model, prompt_ids, fast, default)
    check("bf16-policy: after a step, greedy fast == default (up to near ties) and moved with the step",
          all(m < TIE for m in margins) and fast != before,
          rows=len(fast), identical_rows=sum(a == b for a, b in zip(fast, default)),
          max_tie_gap=max(margins, default=0.0), output_changed=fast != before)
    with _as_trl_generates(trainer) as m:
        gap = _generator_gap(m, m, ids, mask, greedy_config(trainer), eos)
    check("bf16-policy: compiled static-cache logits == eager forward on the updated weights",
          gap["max"] < LOGIT_GAP and gap["max"] < effect / 4, update_effect=effect, **gap)

    # sampled tokens: trainer log-probabilities vs the distribution each generation path sampled from
    logp_gaps = {}
    for path in ("fast", "default"):
        config = fg.fast_generation_config(trainer.generation_config, cache_len=fg.prompt_bucket(ids.shape[1]) + max_new,
                                           compile_cfg=fast_gen.compile_cfg) if path == "fast" else trainer.generation_config
        torch.manual_seed(0)
        with _as_trl_generates(trainer) as m:
            out = m.generate(input_ids=ids, attention_mask=mask, generation_config=config, output_logits=True,
                             return_dict_in_generate=True)
        completion = out.sequences[:, ids.shape[1]:]
        gen_logps = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, completion[..., None])[..., 0]
        cmask = _completion_mask(completion, eos)
        with torch.no_grad():
            logps, _, _ = trainer._get_per_token_logps_and_entropies(
                model, torch.cat([ids, completion], 1), torch.cat([mask, cmask], 1), completion.shape[1])
        diff = (logps.float() - gen_logps).abs()[cmask.bool()]
        logp_gaps[path] = {"max": diff.max().item(), "mean": diff.mean().item()}
    check("bf16-policy: trainer logps vs sampling logps, fast no worse than default",
          logp_gaps["fast"]["mean"] <= 2 * logp_gaps["default"]["mean"] + 1e-3,
          fast_mean=logp_gaps["fast"]["mean"], fast_max=logp_gaps["fast"]["max"],
          default_mean=logp_gaps["default"]["mean"], default_max=logp_gaps["default"]["max"])
    inputs = [{"prompt": p} for p in prompts]
    torch.manual_seed(1)
    batch_fast = trainer._generate_and_score_completions(inputs)
    torch.manual_seed(1)
    with fast_gen.bypassed():
        batch_default = trainer._generate_and_score_completions(inputs)
    same = [torch.equal(a, b) for a, b in zip(batch_fast["completion_ids"], batch_default["completion_ids"])]
    report["sampled_rows_identical"] = f"{sum(same)}/{len(same)}"
    print(f"info: same seed, sampled rows identical fast vs default: {sum(same)}/{len(same)}", flush=True)
    report["bf16_policy_stats"] = dict(fast_gen.stats)

    # ------------------------------------------------------------------ an fp32 policy: a bf16 copy generates
    trainer = trainer_for(torch.float32, "fp32 policy")
    fast_gen = trainer.fast_generation
    check("fp32-policy: plan", fast_gen.plan.enabled and fast_gen.plan.generator == "bf16_copy",
          reason=fast_gen.plan.reason)
    before = greedy(trainer)
    trainer.train()
    after = greedy(trainer)
    synced = all(torch.equal(g, p.detach().to(torch.bfloat16)) for g, p in
                 zip(fast_gen.generator.parameters(), trainer.model.parameters()))
    fresh = fg.bf16_copy(trainer.model)
    eager_config = greedy_config(trainer)
    eager_config.cache_implementation, eager_config.disable_compile, eager_config.max_cache_len = None, True, None
    out = fresh.generate(input_ids=ids, attention_mask=mask, generation_config=eager_config)[:, ids.shape[1]:].tolist()
    reference = [row[: row.index(eos) + 1] if eos in row else row for row in out]
    margins = fg.divergence_margins(fresh, prompt_ids, after, reference)
    gap = _generator_gap(fast_gen.generator, fresh, ids, mask, greedy_config(trainer), eos)
    check("fp32-policy: after a step, the bf16 copy holds the new weights and generates like a fresh eager copy",
          synced and all(m < TIE for m in margins) and gap["max"] < LOGIT_GAP and after != before,
          synced=synced, gap_max=gap["max"], identical_rows=sum(a == b for a, b in zip(after, reference)),
          max_tie_gap=max(margins, default=0.0), output_changed=after != before)
    report["fp32_policy_stats"] = dict(fast_gen.stats)

    report["graphs_compiled"] = fg.graphs_compiled() - compiled_before
    report["seconds"] = time.perf_counter() - started
    report["all_pass"] = all(passed.values())
    print(f"{'ALL PASS' if report['all_pass'] else 'SOME CHECKS FAILED'}: {sum(passed.values())}/{len(passed)}; "
          f"{report['graphs_compiled']} graph(s) compiled in {report['seconds']:.0f} s", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="dry run on CPU (tiny model, aot_eager)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the GPU model (width of the 0.4B)")
    parser.add_argument("--json-out", help="write the report to this JSON file")
    args = parser.parse_args()
    report = run(args.cpu, args.layers)
    text = json.dumps(report, indent=1, default=str)
    if args.json_out:
        Path(args.json_out).write_text(text)
    else:
        print(text)
    sys.exit(0 if report["all_pass"] else 1)


if __name__ == "__main__":
    main()
