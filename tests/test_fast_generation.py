"""Fast generation (static cache + compiled decoding): applicability rules, buckets, and on CPU the numbers:
greedy output equal to TRL's default path, the trainer's log-probabilities independent of the generation mode,
optimizer updates reaching the compiled generator, and a bounded number of compiles.

Compiling with inductor takes minutes on these CPUs, so the compiled path is exercised with ``backend='aot_eager'``
(dynamo capture and AOT autograd's functionalisation of the static-cache writes, without inductor's code
generation); the GPU check (``benchmarks/fast_generation_check.py``) runs inductor.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from tiny import build_model, build_tokenizer, odd_digit_parity  # noqa: E402
from transformers import AutoModelForCausalLM, GenerationConfig  # noqa: E402

from conspo import ConSPOConfig, ConSPOTrainer  # noqa: E402
from conspo import fast_generation as fg  # noqa: E402

BASE = dict(use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True)
CPU_COMPILE = {"backend": "aot_eager", "mode": None}
# 8 prompts of 2 to 6 tokens: one batch shape, one prompt bucket
BF16_TIE = 0.05  # logit gap under which two bf16 implementations may pick either token (bf16 spacing near 1: 2^-7)
PROMPTS = ["1+2=", "7+", "13+29=", "5", "4*4=", "90-1=", "3 +", "62="]


# ------------------------------------------------------------------------------------- applicability rules

def _facts(**kw):
    settings = dict(device_type="cuda", bf16=True, fp16=False, policy_dtypes=frozenset({torch.bfloat16}))
    settings.update(kw)
    return fg.Facts(**settings)


FP32 = frozenset({torch.float32})


@pytest.mark.parametrize(
    "mode, facts, enabled, generator, reason",
    [
        ("auto", _facts(), True, "policy", "the policy (bfloat16) generates"),
        ("auto", _facts(policy_dtypes=FP32), True, "bf16_copy", "bf16 copy of the fp32 policy"),
        ("auto", _facts(bf16=False, policy_dtypes=FP32), False, "none", "fp32 requested"),
        ("auto", _facts(bf16=False), True, "policy", "the policy (bfloat16) generates"),
        ("auto", _facts(device_type="cpu"), False, "none", "not on a CUDA device"),
        ("on", _facts(device_type="cpu", bf16=False, policy_dtypes=FP32), True, "policy", "(float32) generates"),
        ("off", _facts(), False, "none", "fast_generation='off'"),
    ],
)
def test_decide(mode, facts, enabled, generator, reason):
    plan = fg.decide(mode, facts)
    assert (plan.enabled, plan.generator) == (enabled, generator)
    assert reason in plan.reason
    assert plan.compile_all_devices == (enabled and facts.device_type != "cuda")


@pytest.mark.parametrize(
    "fact, reason",
    [
        (dict(use_vllm=True), "vLLM"),
        (dict(continuous_batching=True), "continuous_batching"),
        (dict(peft=True), "PEFT"),
        (dict(sharded=True), "DeepSpeed/FSDP"),
        (dict(fp16=True, bf16=False), "fp16"),
        (dict(multimodal=True), "multimodal"),
        (dict(tools=True), "tool calling"),
        (dict(quantized=True), "quantization"),
        (dict(cast_lm_head_to_fp32=True), "cast_lm_head_to_fp32"),
        (dict(static_cache_compiles=False, model_class="GPT2LMHeadModel"), "GPT2LMHeadModel does not declare"),
    ],
)
def test_unsupported_falls_back_under_auto_and_raises_under_on(fact, reason):
    plan = fg.decide("auto", _facts(**fact))
    assert not plan.enabled and reason in plan.reason
    with pytest.raises(ValueError, match="fast_generation='on' cannot apply"):
        fg.decide("on", _facts(**fact))


def test_prompt_bucket_bounds_cache_lengths():
    assert [fg.prompt_bucket(n) for n in (0, 1, 32, 33, 64, 65, 1000)] == [32, 32, 32, 64, 64, 128, 1024]
    assert all(fg.prompt_bucket(n) >= n for n in range(5000))
    assert len({fg.prompt_bucket(n) for n in range(1, 4097)}) == 8  # 32, 64, ..., 4096


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (dict(fast_generation="fast"), "fast_generation='fast' is not supported; accepted values: 'auto', 'on', 'off'"),
        (dict(fast_generation_compile={"backend": "eager", "speed": 9}), "fast_generation_compile must be a dict"),
    ],
)
def test_config_validation(tmp_path, overrides, needle):
    with pytest.raises(ValueError) as err:
        ConSPOConfig(output_dir=str(tmp_path), bf16=False, per_device_train_batch_size=8, num_generations=4,
                     **BASE, **overrides)
    assert needle in str(err.value)


def test_compile_options_accept_json(tmp_path):
    config = ConSPOConfig(output_dir=str(tmp_path), bf16=False, per_device_train_batch_size=8, num_generations=4,
                          fast_generation_compile='{"backend": "aot_eager", "mode": null}', **BASE)
    assert config.fast_generation_compile == CPU_COMPILE
    assert config.fast_generation == "auto"


# ------------------------------------------------------------------------------------- the model-level path

def _left_pad(rows: list[list[int]], pad: int = 0):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    return ids, (torch.arange(width)[None, :] >= torch.tensor([width - len(r) for r in rows])[:, None]).long()


def test_static_compiled_greedy_equals_eager_and_compiles_once():
    tok = build_tokenizer()
    model = build_model(len(tok), seed=1).eval()
    base = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=1, disable_compile=True)
    compile_cfg = fg.compile_config(CPU_COMPILE, all_devices=True)
    before = fg.graphs_compiled()
    for shift in range(3):  # three prompt widths (6, 5, 4 tokens): one bucket, so one cache shape
        ids, mask = _left_pad([tok(p)["input_ids"][shift:] or [3] for p in PROMPTS])
        reference = model.generate(input_ids=ids, attention_mask=mask, generation_config=base)
        config = fg.fast_generation_config(base, cache_len=fg.prompt_bucket(ids.shape[1]) + 10, compile_cfg=compile_cfg)
        fast = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        assert torch.equal(fast, reference)
    assert fg.graphs_compiled() - before == 1


# ------------------------------------------------------------------------------------- the trainer

def _trainer(model_dir, tmp_path, **kw):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                    max_completion_length=8, max_steps=1, logging_steps=1, bf16=False, fast_generation="on",
                    fast_generation_compile=CPU_COMPILE, **BASE)
    settings.update(kw)
    tok = build_tokenizer()
    dataset = Dataset.from_dict({"prompt": [f"{i % 10}+{i // 10}=" for i in range(64)]})
    return ConSPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=odd_digit_parity,
                         args=ConSPOConfig(**settings), train_dataset=dataset, processing_class=tok)


def _until_eos(tokens: list[int], eos: int = 1) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def _greedy(trainer, prompts=PROMPTS):
    ids = [trainer.processing_class(p)["input_ids"] for p in prompts]
    trainer.generation_config.do_sample = False
    try:
        return trainer._generate_single_turn(ids, None, {}, 1)[0]
    finally:
        trainer.generation_config.do_sample = True


def test_auto_falls_back_on_cpu_with_a_logged_reason(model_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="conspo.fast_generation"):
        trainer = _trainer(model_dir, tmp_path, fast_generation="auto")
    assert not trainer.fast_generation.enabled
    assert "fast generation off, TRL's default generate is used: not on a CUDA device" in caplog.text
    assert trainer.generation_config.disable_compile and trainer.generation_config.cache_implementation is None
    _greedy(trainer)
    assert trainer.fast_generation.stats["generate_calls"] == 0


def test_greedy_and_logps_do_not_depend_on_the_generation_mode(model_dir, tmp_path):
    trainer = _trainer(model_dir, tmp_path)
    assert trainer.fast_generation.plan.generator == "policy"
    fast = _greedy(trainer)
    with trainer.fast_generation.bypassed():
        default = _greedy(trainer)
    assert fast == default and any(len(c) > 1 for c in fast)

    # Sampled rollouts: same seed, same tokens, same tensors handed to the loss.
    inputs = [{"prompt": p} for p in PROMPTS]
    torch.manual_seed(0)
    out_fast = trainer._generate_and_score_completions(inputs)
    torch.manual_seed(0)
    with trainer.fast_generation.bypassed():
        out_default = trainer._generate_and_score_completions(inputs)
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
        assert torch.equal(out_fast[key], out_default[key]), key

    # The compiled generator's own distribution is the one the trainer scores: log-softmax of the logits it
    # sampled from equals the trainer's per-token log-probabilities of the same tokens.
    model = trainer.model
    ids, mask = _left_pad([trainer.processing_class(p)["input_ids"] for p in PROMPTS])
    config = fg.fast_generation_config(trainer.generation_config, cache_len=fg.prompt_bucket(ids.shape[1]) + 8,
                                       compile_cfg=trainer.fast_generation.compile_cfg)
    torch.manual_seed(1)
    gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, output_logits=True,
                         return_dict_in_generate=True)
    completion = gen.sequences[:, ids.shape[1]:]
    gen_logps = torch.stack(gen.logits, 1).log_softmax(-1).gather(-1, completion[..., None])[..., 0]
    done = (completion == 1).cumsum(1)
    completion_mask = ((done == 0) | ((done == 1) & (completion == 1))).long()
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            model, torch.cat([ids, completion], 1), torch.cat([mask, completion_mask], 1), completion.shape[1])
    valid = completion_mask.bool()
    torch.testing.assert_close(logps[valid], gen_logps[valid], atol=1e-5, rtol=1e-5)
    assert 1 <= trainer.fast_generation.stats["graphs_compiled"] <= 2  # the compiled path was taken


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32-policy-generates", "bf16-copy-generates"])
def test_weight_update_reaches_the_compiled_generator(model_dir, tmp_path, bf16):
    trainer = _trainer(model_dir, tmp_path, bf16=bf16, learning_rate=0.05, lr_scheduler_type="constant")
    fast_gen = trainer.fast_generation
    assert fast_gen.plan.generator == ("bf16_copy" if bf16 else "policy")
    before = _greedy(trainer)
    trainer.train()  # one optimizer step; its rollouts come from the compiled path
    if bf16:
        # A second train() restarts global_step at 0, the step the copy was last synced at, with moved weights:
        # its first rollouts must copy the policy again, not reuse the copy.
        synced = []
        real_sync = fast_gen.sync
        fast_gen.sync = lambda policy, step: synced.append(real_sync(policy, step)) or synced[-1]
        trainer.train()
        fast_gen.sync = real_sync
        assert synced[:1] == [True]
    after = _greedy(trainer)
    if bf16:
        # The copy holds the updated weights, and generates what a fresh bf16 model of them generates eagerly.
        for (name, gen_p), (_, p) in zip(fast_gen.generator.named_parameters(), trainer.model.named_parameters()):
            assert torch.equal(gen_p, p.detach().to(torch.bfloat16)), name
        fresh = fg.bf16_copy(trainer.model)
        ids, mask = _left_pad([trainer.processing_class(p)["input_ids"] for p in PROMPTS])
        config = copy.deepcopy(trainer.generation_config)  # TRL's: dynamic cache, no compilation
        config.do_sample = False
        out = fresh.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
        reference = [_until_eos(row.tolist()) for row in out]
        # bf16 compiled vs bf16 eager may part only at near ties (a logit gap within bf16 rounding)
        prompt_ids = [trainer.processing_class(p)["input_ids"] for p in PROMPTS]
        margins = fg.divergence_margins(fresh, prompt_ids, after, reference)
        assert all(m < BF16_TIE for m in margins), margins
    else:
        with fast_gen.bypassed():
            reference = _greedy(trainer)
        assert after == reference
    assert after != before  # the step moved the greedy output, so a stale generator would have been caught
    assert 1 <= fast_gen.stats["graphs_compiled"] <= 2  # the compiled path was taken, and did not recompile
