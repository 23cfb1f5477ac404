"""Fast rollouts without vLLM: bf16 weights, a static KV cache and compiled decoding in TRL's ``generate`` path.

On a GPU, TRL's default transformers path (dynamic cache, eager decoding, ``disable_compile=True``) spends
almost the whole RL step in ``generate``. This module switches that path to what transformers can do when it is
allowed to: a ``StaticCache`` whose shapes do not change from one token to the next, and a ``torch.compile``'d
decoding step (the prefill stays eager). ConSPOTrainer calls it from two places only: ``setup`` once at
construction, and ``FastGeneration.generating`` around each call of TRL's ``_generate_single_turn``.

Which weights generate:

* a bf16 policy generates itself: the compiled step reads the parameters the optimizer updates in place;
* an fp32 policy trained under bf16 mixed precision generates from a bf16 copy, refreshed in place (same
  storage, so the compiled graph stays valid) whenever ``state.global_step`` moved, as TRL refreshes vLLM.
  The policy is not cast: AdamW updates at RL learning rates (~1e-6) are below bf16's resolution for most
  weights and would round away. The copy keeps 2 bytes per parameter; while it is made (a deep copy, then a
  cast) it briefly holds an fp32 duplicate, 4 bytes per parameter. It is also refreshed when ``train()`` starts.

When it applies (``decide``): ``fast_generation='auto'`` falls back to TRL's default path, with the reason logged,
on CPU, when fp32 is requested (``bf16=False`` and fp32 weights), and wherever the path is unsupported (vLLM or
continuous batching in use, PEFT adapters, DeepSpeed/FSDP sharding, fp16, multimodal models, tool calling,
quantized weights, ``cast_lm_head_to_fp32``, model classes that do not declare static-cache compile support).
``'on'`` also runs on CPU and in fp32 (used by the CPU tests) and raises on the unsupported cases.

Recompilation is bounded: prompts are not re-padded (the training tensors are exactly TRL's), but the static cache
is sized ``prompt_bucket(longest prompt) + max_new_tokens`` with power-of-two prompt buckets, and transformers
never shrinks it. Decoding shapes then change only when the batch size, a bucket or train/eval mode changes,
so a run compiles a handful of times; every compiling call is logged and counted in ``FastGeneration.stats``.
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger("conspo.fast_generation")

MODES = ("auto", "on", "off")
COMPILE_KEYS = ("fullgraph", "dynamic", "backend", "mode", "options")  # transformers' CompileConfig fields
MIN_PROMPT_BUCKET = 32


@dataclass(frozen=True)
class Facts:
    """What decides whether the fast path applies; read off a trainer by ``facts_of``."""

    device_type: str
    bf16: bool
    fp16: bool
    policy_dtypes: frozenset[torch.dtype]
    use_vllm: bool = False
    continuous_batching: bool = False
    peft: bool = False
    sharded: bool = False
    multimodal: bool = False
    tools: bool = False
    quantized: bool = False
    cast_lm_head_to_fp32: bool = False
    model_class: str = "model"
    static_cache_compiles: bool = True


@dataclass(frozen=True)
class Plan:
    """``enabled``: use the fast path. ``generator``: 'policy' or 'bf16_copy' (or 'none'). ``reason``: why."""

    enabled: bool
    reason: str
    generator: str = "none"
    compile_all_devices: bool = False


def decide(mode: str, facts: Facts) -> Plan:
    """The fast path's applicability rules, as a pure function of the mode and the trainer's facts."""
    if mode not in MODES:
        raise ValueError(f"fast_generation={mode!r} is not supported; accepted values: {', '.join(map(repr, MODES))}")
    if mode == "off":
        return Plan(False, "fast_generation='off'")
    unsupported = [
        (facts.use_vllm, "vLLM generates the rollouts (use_vllm=True)"),
        (facts.continuous_batching, "use_transformers_continuous_batching=True"),
        (facts.peft, "the policy has PEFT adapters"),
        (facts.sharded, "DeepSpeed/FSDP shard the parameters"),
        (facts.fp16, "fp16 mixed precision (only bf16 is supported)"),
        (facts.multimodal, "multimodal models are not supported"),
        (facts.tools, "tool calling (multi-turn generation) is not supported"),
        (facts.quantized, "the quantization method is not compileable"),
        (facts.cast_lm_head_to_fp32, "cast_lm_head_to_fp32=True"),
        (not facts.static_cache_compiles,
         f"{facts.model_class} does not declare static-cache compile support (_can_compile_fullgraph=False)"),
    ]
    for blocked, reason in unsupported:
        if blocked:
            if mode == "on":
                raise ValueError(f"fast_generation='on' cannot apply: {reason}; use fast_generation='auto' or 'off'")
            return Plan(False, reason)
    fp32_requested = not facts.bf16 and facts.policy_dtypes != {torch.bfloat16}
    if mode == "auto":
        if facts.device_type != "cuda":
            return Plan(False, f"not on a CUDA device (device {facts.device_type!r})")
        if fp32_requested:
            return Plan(False, "fp32 requested (bf16=False and fp32 weights)")
    if facts.policy_dtypes == {torch.bfloat16} or not facts.bf16:
        generator, how = "policy", f"the policy ({_dtype_names(facts.policy_dtypes)}) generates"
    else:
        generator, how = "bf16_copy", "a bf16 copy of the fp32 policy generates, refreshed after each optimizer step"
    on_cpu = facts.device_type != "cuda"
    return Plan(True, f"static cache + compiled decoding; {how}", generator, compile_all_devices=on_cpu)


def facts_of(trainer: Any) -> Facts:
    from accelerate.utils import is_peft_model

    model = trainer.model
    args = trainer.args
    quantizer = getattr(model, "hf_quantizer", None)
    return Facts(
        device_type=trainer.accelerator.device.type,
        bf16=bool(args.bf16),
        fp16=bool(args.fp16),
        policy_dtypes=frozenset(p.dtype for p in model.parameters() if p.is_floating_point()),
        use_vllm=bool(trainer.use_vllm),
        continuous_batching=bool(getattr(trainer, "use_transformers_continuous_batching", False)),
        peft=is_peft_model(model),
        sharded=bool(trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled),
        multimodal=bool(getattr(trainer, "_is_vlm", False)),
        tools=bool(getattr(trainer, "tools", None)),
        quantized=quantizer is not None and not getattr(quantizer, "is_compileable", False),
        cast_lm_head_to_fp32=bool(getattr(args, "cast_lm_head_to_fp32", False)),
        model_class=type(model).__name__,
        static_cache_compiles=bool(getattr(model, "_can_compile_fullgraph", False))
        and not getattr(model.config, "is_encoder_decoder", False),
    )


def prompt_bucket(length: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
    """The smallest power of two >= ``length`` and >= ``minimum``: at most log2(max prompt) distinct values."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    bucket = max(minimum, 1)
    while bucket < length:
        bucket *= 2
    return bucket


def compile_config(options: dict | None = None, *, all_devices: bool = False):
    """transformers' ``CompileConfig`` from ``fast_generation_compile`` (its defaults: inductor, reduce-overhead)."""
    from transformers import CompileConfig

    config = CompileConfig(**(options or {}))
    if all_devices:
        config._compile_all_devices = True  # transformers' own switch to compile on CPU, meant for tests
    return config


def fast_generation_config(base, *, cache_len: int, compile_cfg):
    """A copy of TRL's generation config with a static cache of ``cache_len`` tokens and compilation allowed."""
    config = copy.deepcopy(base)
    config.cache_implementation = "static"
    config.max_cache_len = cache_len
    config.disable_compile = False  # TRL sets it True
    config.compile_config = compile_cfg
    return config


def graphs_compiled() -> int:
    """Graphs compiled by torch.compile in this process so far (dynamo's ``unique_graphs`` counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class FastGeneration:
    """One trainer's fast-generation state: the plan, the generator weights and the compile log."""

    def __init__(self, plan: Plan, model: torch.nn.Module | None = None, compile_options: dict | None = None):
        self.plan = plan
        self.compile_cfg = compile_config(compile_options, all_devices=plan.compile_all_devices) if plan.enabled else None
        self.generator: torch.nn.Module | None = None  # the bf16 copy, when the policy is fp32
        self._synced_step: int | None = None
        self._bypass = False
        self.stats: dict[str, Any] = {"generate_calls": 0, "graphs_compiled": 0, "compiling_calls": 0,
                                      "compiling_call_seconds": 0.0, "steady_call_seconds": [], "cache_lens": []}
        if plan.enabled and plan.generator == "bf16_copy":
            self.generator = bf16_copy(model)

    @property
    def enabled(self) -> bool:
        return self.plan.enabled and not self._bypass

    @contextmanager
    def bypassed(self):
        """Run TRL's default generation path inside this block (the reference for tests and benchmarks)."""
        saved, self._bypass = self._bypass, True
        try:
            yield
        finally:
            self._bypass = saved

    def invalidate(self) -> None:
        """Forget which step the copy holds: the next generation copies the policy's weights again. Needed when
        training starts (``train()`` resets ``global_step`` to 0, or a checkpoint's weights are loaded)."""
        self._synced_step = None

    def sync(self, policy: torch.nn.Module, step: int) -> bool:
        """Copy the policy's weights into the bf16 generator, in place, if the optimizer step moved."""
        if self.generator is None or step == self._synced_step:
            return False
        with torch.no_grad():
            for (name, dst), (src_name, src) in zip(self.generator.named_parameters(), policy.named_parameters(),
                                                    strict=True):
                if name != src_name:
                    raise RuntimeError(f"generator parameter {name} does not match policy parameter {src_name}")
                dst.copy_(src)
        self._synced_step = step
        return True

    @contextmanager
    def generating(self, trainer: Any, prompt_ids: list[list[int]]):
        """Around TRL's ``_generate_single_turn``: static-cache config, weight refresh, model swap, compile log."""
        if not self.enabled:
            yield
            return
        base = trainer.generation_config
        longest = max((len(p) for p in prompt_ids), default=0)
        cache_len = prompt_bucket(longest) + int(base.max_new_tokens)
        saved = trainer.generation_config, trainer.model_wrapped
        trainer.generation_config = fast_generation_config(base, cache_len=cache_len, compile_cfg=self.compile_cfg)
        if self.generator is not None:
            self.sync(trainer.model, trainer.state.global_step)
            trainer.model_wrapped = self.generator
        drop_stale_input_grad_hooks(self.generator if self.generator is not None else trainer.model)
        before, start = graphs_compiled(), time.perf_counter()
        try:
            yield
        finally:
            trainer.generation_config, trainer.model_wrapped = saved
            self._record(graphs_compiled() - before, time.perf_counter() - start, cache_len, len(prompt_ids))

    def _record(self, new_graphs: int, seconds: float, cache_len: int, batch: int) -> None:
        s = self.stats
        s["generate_calls"] += 1
        if cache_len not in s["cache_lens"]:
            s["cache_lens"].append(cache_len)
        if new_graphs:
            s["graphs_compiled"] += new_graphs
            s["compiling_calls"] += 1
            s["compiling_call_seconds"] += seconds
            logger.info("fast generation compiled %d graph(s) (%d in total) for batch %d, static cache %d tokens, "
                        "in a %.1f s generate call", new_graphs, s["graphs_compiled"], batch, cache_len, seconds)
        else:
            s["steady_call_seconds"].append(seconds)


def bf16_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``model`` with bf16 parameters (buffers such as RoPE frequencies keep their dtype),
    its class's own ``forward`` and no activation checkpointing, so TRL's generation wrapper never toggles it.

    ``deepcopy`` does not copy closures or weak references: a ``forward`` patched on the instance (TRL's fused
    LM-head wrapper) would still call the *policy's* forward, and the copied hook handles would remove the
    *policy's* hooks. Both are therefore dropped from the copy's own dictionaries, never through handles.
    """
    generator = copy.deepcopy(model)
    for p in generator.parameters():  # parameters() yields tied weights once
        p.data = p.data.to(torch.bfloat16)
        p.requires_grad_(False)
    for module in generator.modules():
        module.__dict__.pop("forward", None)
    if getattr(generator, "is_gradient_checkpointing", False):
        disable = getattr(generator, "activation_checkpointing_disable", None) or generator.gradient_checkpointing_disable
        disable()
    generator.__dict__.pop("_require_grads_hooks", None)
    generator.__dict__.pop("_require_grads_hook", None)
    drop_stale_input_grad_hooks(generator)  # with no current handles, this drops them all
    return generator


def drop_stale_input_grad_hooks(model: torch.nn.Module) -> int:
    """Remove the input-embedding hooks that earlier activation-checkpointing enables left behind.

    TRL turns activation checkpointing off around ``generate`` and back on after it; each enable registers another
    ``make_inputs_require_grads`` forward hook on the input embeddings (transformers 5.17-5.24 never remove the old
    one). The compiled decoding step guards on the number of hooks, so without this it recompiles at every step
    and, after ``torch._dynamo.config.cache_size_limit`` recompiles, silently runs eagerly. The hooks registered by
    the latest enable stay; they all do the same thing. Returns the number removed.
    """
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if get_embeddings is not None else None
    if embeddings is None:
        return 0
    current = {h.id for h in getattr(model, "_require_grads_hooks", None) or []}
    stale = [k for k, fn in embeddings._forward_hooks.items()
             if getattr(fn, "__name__", "") == "make_inputs_require_grads" and k not in current]
    for k in stale:
        del embeddings._forward_hooks[k]
        embeddings._forward_hooks_with_kwargs.pop(k, None)
        embeddings._forward_hooks_always_called.pop(k, None)
    return len(stale)


def setup(trainer: Any, mode: str, compile_options: dict | None = None) -> FastGeneration:
    """Decide, log and build the fast-generation state of ``trainer`` (called once, after TRL's constructor)."""
    facts = facts_of(trainer)
    plan = decide(mode, facts)
    if plan.enabled:
        logger.info("fast generation on: %s", plan.reason)
        if plan.compile_all_devices:
            logger.warning("fast generation on %s: compiling off CUDA is meant for tests", facts.device_type)
    else:
        # A GPU user who expected speed hears it; CPU runs and deliberate choices stay quiet.
        loud = facts.device_type == "cuda" and mode != "off" and not facts.use_vllm
        logger.log(logging.WARNING if loud else logging.INFO,
                   "fast generation off, TRL's default generate is used: %s", plan.reason)
    return FastGeneration(plan, trainer.model, compile_options)


@torch.no_grad()
def divergence_margins(model: torch.nn.Module, prompts: list[list[int]], a: list[list[int]],
                       b: list[list[int]]) -> list[float]:
    """For each row where greedy completions ``a`` and ``b`` differ: the logit gap between the two tokens chosen at
    the first differing position, from an eager full forward of ``model`` on the prompt and the shared prefix.

    In bf16, two correct implementations (static vs dynamic cache, compiled vs eager) round differently, so greedy
    outputs may part at a near tie: a gap within rounding noise. A gap far above it means the two paths compute
    different functions (stale weights, a wrong mask or position). Used by the tests and the GPU check.
    """
    margins = []
    for prompt, x, y in zip(prompts, a, b, strict=True):
        if x == y:
            continue
        t = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None)
        if t is None:  # one is a strict prefix of the other: no tie explains that
            margins.append(float("inf"))
            continue
        ids = torch.tensor([list(prompt) + list(x[:t])], device=model.device)
        logits = model(input_ids=ids).logits[0, -1].float()
        margins.append(abs(logits[x[t]] - logits[y[t]]).item())
    return margins


def _dtype_names(dtypes: frozenset[torch.dtype]) -> str:
    return "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes)) or "no floating-point parameters"
