"""ConSPOTrainer with colocated vLLM rollouts, for real, on CPU (issue 17).

Run in .venv-vllm by ``python3 bootstrap.py test`` (``run_vllm_tests``); skipped where vLLM is not installed (the main
environment). Two CPU-only settings make the runs exact, both applied by the fixtures below:

* vLLM's CPU backend repacks linear weights for oneDNN, and TRL's weight sync then fails
  (``'Parameter' object has no attribute 'weight_loader'``); ``vllm._custom_ops._supports_onednn = False`` keeps
  plain weights, which the sync overwrites.
* TRL builds ``LLM(...)`` without a dtype and vLLM's ``"auto"`` runs a float32 checkpoint in bfloat16; the
  ``float32_vllm`` fixture adds ``dtype="float32"`` so that vLLM's log-probabilities are the trainer's. The
  importance-sampling test leaves vLLM in bfloat16 on purpose, to get ratios that are not 1.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (the vLLM tests run in .venv-vllm: python3 bootstrap.py test)",
                allow_module_level=True)
# vLLM reads these when it starts an engine. KV cache in GiB (an empty value raises); no hub on these machines.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
vllm = pytest.importorskip("vllm")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tiny import build_tokenizer, odd_digit_parity  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from vllm_tiny import save_vllm_tiny, trainer_next_token_logprobs, vllm_next_token_logprobs  # noqa: E402

from conspo import ConSPOConfig, ConSPOTrainer  # noqa: E402
from conspo import objectives as obj  # noqa: E402
from conspo.presets import preset_config  # noqa: E402

pytestmark = pytest.mark.vllm

VLLM = dict(use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=False, vllm_max_model_length=64)
BASE = dict(use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1,
            per_device_train_batch_size=8, num_generations=4, max_completion_length=6, max_steps=3,
            learning_rate=1e-2, seed=0, **VLLM)
PROMPT = "7+2="  # the next-token distribution after this prompt is compared between vLLM and the trainer


@pytest.fixture(autouse=True)
def plain_cpu_weights(monkeypatch):
    """Plain (not oneDNN-packed) linear weights in vLLM's CPU backend, so that TRL's weight sync can load them."""
    from vllm import _custom_ops

    monkeypatch.setattr(_custom_ops, "_supports_onednn", False)


_ENGINES: dict[str, object] = {}  # one vLLM engine per (checkpoint, settings), shared by the tests of this module


def _patch_llm(monkeypatch, **settings):
    """Build TRL's colocated ``LLM(...)`` (trl/generation/vllm_generation.py) with ``settings`` added, eagerly, and
    reuse one engine per checkpoint and settings across tests.

    ``enforce_eager``: vLLM's torch.compile warm-up costs about 30 s per engine on these CPUs and changes no number
    compared here. A reused engine holds the previous test's trained weights: TRL's weight sync before the first
    generation (``_last_loaded_step = -1``) must replace them, which the log-prob checks of every test then see.
    """
    from trl.generation import vllm_generation

    real = vllm_generation.LLM

    def llm(*args, **kwargs):
        kwargs = {**kwargs, "enforce_eager": True, **settings}
        key = json.dumps([args, kwargs], sort_keys=True, default=str)
        if key not in _ENGINES:
            _ENGINES[key] = real(*args, **kwargs)
        return _ENGINES[key]

    monkeypatch.setattr(vllm_generation, "LLM", llm)


@pytest.fixture
def float32_vllm(monkeypatch):
    """vLLM in float32, like the trainer: rollouts sampled from the trainer's own distribution."""
    _patch_llm(monkeypatch, dtype="float32")


@pytest.fixture
def default_dtype_vllm(monkeypatch):
    """vLLM with the dtype TRL asks for (none: vLLM's "auto", bfloat16 for this float32 checkpoint)."""
    _patch_llm(monkeypatch)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_vllm_tiny(tmp_path_factory.mktemp("vllm-tiny") / "model", seed=0)


def _dataset(n=64):
    return Dataset.from_dict({"prompt": [f"{i % 10}+{i // 10}=" for i in range(n)]})


def _trainer(model_dir, args, cls=ConSPOTrainer):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return cls(model=model, reward_funcs=odd_digit_parity, args=args, train_dataset=_dataset(),
               processing_class=build_tokenizer())


def _logged(trainer, prefix):
    return [h for h in trainer.state.log_history if any(k.startswith(prefix) for k in h)]


# ------------------------------------------------------------------------- every objective trains with vLLM rollouts


def _args(tmp_path, objective):
    if objective == "grpo":
        return preset_config("grpo", output_dir=str(tmp_path / "out"), **BASE)
    return ConSPOConfig(output_dir=str(tmp_path / "out"), objective=objective, **BASE)


@pytest.mark.parametrize("objective", ["conspo", "disco", "gmpo", "grpo"])
def test_trains_with_colocated_vllm_and_syncs_weights(tmp_path, model_dir, float32_vllm, objective):
    trainer = _trainer(model_dir, _args(tmp_path, objective))
    llm = trainer.vllm_generation.llm  # TRL 1.16: the colocated engine
    tokenizer = build_tokenizer()
    vocab, prompt = len(tokenizer), tokenizer(PROMPT)["input_ids"]
    assert len(prompt) == 4  # one id per character, no special tokens: what TRL sends vLLM
    initial = trainer_next_token_logprobs(trainer.model, prompt, vocab)

    trainer.train()
    assert trainer.state.global_step == 3

    # Diagnostics: conspo's on every step, and TRL's sampling/* from the vLLM rollouts.
    steps = _logged(trainer, "conspo/")
    assert len(steps) == 3
    for h in steps:
        assert 0.0 <= h["conspo/valid_frac"] <= 1.0 and 0.0 <= h["conspo/auc"] <= 1.0
        assert h["conspo/reward_mean"] == pytest.approx(h["reward"], abs=1e-6)
        assert torch.isfinite(torch.tensor(h["loss"]))
        # vLLM in float32 samples from the trainer's distribution (the weights synced before each generation,
        # including the first): log-prob gap ~1e-7, ratios 1.
        assert h["sampling/sampling_logp_difference/max"] < 1e-4
        assert 1 - 1e-4 < h["sampling/importance_sampling_ratio/min"] <= h["sampling/importance_sampling_ratio/max"] < 1 + 1e-4
    assert any(h["conspo/valid_frac"] > 0 for h in steps)  # some step had a mixed group: a gradient
    if objective == "gmpo":  # one optimizer step per generation: pi_old is the loss's policy, nothing clipped
        for h in steps:
            assert h["gmpo/clip_frac"] == 0.0 and abs(h["gmpo/log_ratio_mean"]) < 1e-5

    # The last optimizer step came after the last sync: vLLM still holds step 2's weights. Syncing (TRL's own
    # colocate path) must bring vLLM to the trained weights.
    trained = trainer_next_token_logprobs(trainer.model, prompt, vocab)
    assert (trained - initial).abs().max() > 1e-2, "training did not move the next-token distribution"
    stale = vllm_next_token_logprobs(llm, prompt, vocab)
    assert (stale - trained).abs().max() > 1e-3, "vLLM already held the final weights: the check has no power"
    trainer.vllm_generation.sync_weights()
    synced = vllm_next_token_logprobs(llm, prompt, vocab)
    gap = (synced - trained).abs().max().item()
    print(f"{objective}: next-token log-prob gap vLLM vs trainer after sync {gap:.2e} "
          f"(before sync {(stale - trained).abs().max().item():.2e})")
    assert gap < 1e-4


# ------------------------------------------------------------------------- the importance-sampling branch of the loss


class CapturingTrainer(ConSPOTrainer):
    """Keeps, for every micro-batch, its inputs, the token log-probabilities the loss saw and their gradient after
    backward (before clipping and the optimizer step), and the loss value returned."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.captured = []

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        result = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if result[0].requires_grad:
            result[0].retain_grad()
        return result

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        if self.model.training:
            self.captured.append({
                "inputs": {k: v.detach().clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)},
                "logps": self._last_logps,
                "logps_value": self._last_logps.detach().clone(),
                "loss": loss.detach().clone(),
                "margin": self._current_margin(),
            })
        return loss

    def training_step(self, *args, **kwargs):
        out = super().training_step(*args, **kwargs)
        step = self.captured[-1]
        step["grad"] = step.pop("logps").grad.detach().clone()
        return out


CLIP = 1.002  # below the largest bfloat16-vs-float32 ratios, so that TRL's truncation and masking are exercised


def _expected_ratio(x, mode):
    """TRL's importance-sampling ratio pi_train / pi_vllm, from the stored log-probabilities (grpo_trainer.py)."""
    diff = torch.nan_to_num((x["old_per_token_logps"] - x["sampling_per_token_logps"]) * x["completion_mask"])
    if mode == "token_truncate":  # per token, min(ratio, clip)
        raw = torch.exp(diff)
        return raw.clamp(max=CLIP), raw > CLIP
    raw = torch.exp(diff.sum(-1, keepdim=True))  # sequence_mask (TRL's default mode): per rollout, 0 above clip
    return torch.where(raw > CLIP, 0.0, raw), raw > CLIP


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_conspo_importance_sampling_weights_each_token_gradient(tmp_path, model_dir, default_dtype_vllm, mode):
    """vLLM left in bfloat16 (TRL passes no dtype) samples from a slightly different distribution than the float32
    trainer: TRL's ratios pi_train / pi_vllm are not 1. ConSPO's loss must weight each token's gradient by them
    (dL/dlogp_{i,t} = dL/ds_i / |o_i| * ratio_{i,t}, with s_i the masked mean of logp) and report the true
    objective, conspo_loss of the scores."""
    args = ConSPOConfig(output_dir=str(tmp_path / "out"), objective="conspo", tau=1.0, margin_schedule="constant",
                        margin_max=0.05, vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_max=CLIP,
                        **BASE)
    trainer = _trainer(model_dir, args, cls=CapturingTrainer)
    trainer.train()
    assert len(trainer.captured) == 3
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h}

    seen_ratios, clipped, strongest, signal, error = [], 0, 0.0, 0, 0.0
    for step, cap in enumerate(trainer.captured, start=1):
        x = cap["inputs"]
        mask = (x["completion_mask"] * x["conspo_keep"].unsqueeze(1)).bool()
        ratio = x["importance_sampling_ratio"]
        expected_ratio, over = _expected_ratio(x, mode)
        assert ratio.shape == expected_ratio.shape == ((8, 6) if mode == "token_truncate" else (8, 1))
        rows = mask.any(1)
        if mode == "token_truncate":
            torch.testing.assert_close(ratio[mask], expected_ratio[mask], rtol=1e-6, atol=1e-7)
            seen_ratios.append(ratio[mask])
            clipped += int(over[mask].sum())
        else:
            torch.testing.assert_close(ratio[rows], expected_ratio[rows], rtol=1e-6, atol=1e-7)
            seen_ratios.append(ratio[rows].flatten())
            clipped += int(over[rows].sum())
        # One optimizer step per generation: the loss runs at the parameters that scored the rollouts (pi_old).
        logps = cap["logps_value"]
        torch.testing.assert_close(logps[mask], x["old_per_token_logps"][mask], rtol=0, atol=1e-5)

        # The reference: the gradient of conspo_loss in the scores, spread over each rollout's tokens, times the ratio.
        scores = obj.sequence_scores(logps, mask).requires_grad_()
        gid = torch.where(x["conspo_keep"], x["conspo_group_ids"], -1 - torch.arange(mask.shape[0]))
        assert cap["margin"] == 0.05
        ref = obj.conspo_loss(scores, x["conspo_correct"], gid, tau=1.0, margin=0.05,
                              normalizer=x["conspo_normalizer"])
        (d_scores,) = torch.autograd.grad(ref.loss, scores)
        length = mask.sum(1, keepdim=True).clamp(min=1)
        unweighted = torch.where(mask, d_scores[:, None] / length, 0.0)
        expected = unweighted * expected_ratio
        torch.testing.assert_close(cap["grad"], expected, rtol=1e-4, atol=1e-9)
        if unweighted.abs().max() > 0:
            signal += 1
            error = max(error, float((cap["grad"] - expected).abs().max() / expected.abs().max()))
            strongest = max(strongest, float((expected - unweighted).abs().max() / unweighted.abs().max()))
            assert not torch.allclose(cap["grad"], unweighted, rtol=1e-4, atol=1e-9)  # the ratio made a difference

        # The loss reported is the objective's value, not a ratio-weighted surrogate.
        assert cap["loss"].item() == pytest.approx(ref.loss.item(), rel=1e-5, abs=1e-7)
        assert losses[step] == pytest.approx(ref.loss.item(), rel=1e-5, abs=1e-7)

    ratios = torch.cat(seen_ratios)
    unit = "tokens truncated" if mode == "token_truncate" else "rollouts masked (ratio 0)"
    print(f"{mode}: IS ratios in [{ratios.min().item():.6f}, {ratios.max().item():.6f}], {clipped} of "
          f"{ratios.numel()} {unit} at {CLIP}; largest |weighted - unweighted| gradient {strongest:.2e} of the "
          f"largest entry, over {signal} steps with a gradient; trainer vs reference {error:.1e}")
    assert signal >= 1, "no step had a mixed group: no gradient to compare"
    assert ((ratios - 1).abs() > 1e-3).any(), "ratios all 1: the importance-sampling branch was not exercised"
    assert clipped > 0, "no ratio reached the clip: TRL's truncation or masking was not exercised"


# ------------------------------------------------------------------------- the main job, end to end


def test_run_train_end_to_end_with_vllm_on_the_embedded_default(tmp_path, monkeypatch, float32_vllm):
    """``conspo.run.train`` with vLLM settings through ``**overrides``: the embedded default task and model (the
    embedded TinyModelSpec, hidden 128 and 4 heads: head size 32, which vLLM's CPU attention takes), a short warm
    start into a temporary cache, two optimizer steps from vLLM rollouts. (20 warm-start steps teach the model no
    answer, so the rewards are 0 and the steps carry no gradient: this checks the plumbing, the tests above the
    numbers; 100 steps still scored 0 and cost two minutes here.)"""
    from conspo import embedded as tiny_model
    from conspo import run

    spec = tiny_model.TinyModelSpec()
    assert spec.hidden_size // spec.num_attention_heads == 32  # a head size vLLM's CPU attention takes
    real_warm_start = tiny_model.warm_start

    def short_warm_start(task, **kwargs):
        return real_warm_start(task, cache_dir=tmp_path / "cache", steps=20, **kwargs)

    monkeypatch.setattr(tiny_model, "warm_start", short_warm_start)
    summary = run.train(method="conspo", max_steps=2, output_dir=tmp_path / "run", eval_limit=16, eval_every=0,
                        per_device_train_batch_size=32, num_generations=8, **VLLM)
    assert summary["steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / run.METRICS_FILE).read_text().splitlines()]
    train_steps = [r for r in records if "conspo/valid_frac" in r]
    assert [r["step"] for r in train_steps] == [1, 2]
    for r in train_steps:
        assert r["sampling/sampling_logp_difference/max"] < 1e-4  # vLLM's rollouts, in float32
        assert "sampling/importance_sampling_ratio/mean" in r and "conspo/score_gap" in r
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2


def test_the_trainer_keeps_vllm_cpu_weights_plain_by_itself(tmp_path, model_dir, float32_vllm, monkeypatch):
    """Without the tests' own fix (oneDNN packing on, as vllm-cpu starts), ConSPOTrainer turns the packing off before
    TRL builds the engine, so that ``conspo train --use-vllm`` works on a CPU: a fresh engine (its own max length)
    takes the weight sync and a step trains."""
    from vllm import _custom_ops

    monkeypatch.setattr(_custom_ops, "_supports_onednn", True)
    args = ConSPOConfig(output_dir=str(tmp_path / "out"), objective="conspo", **{**BASE, "vllm_max_model_length": 48,
                                                                                  "max_steps": 1})
    trainer = _trainer(model_dir, args)
    assert _custom_ops._supports_onednn is False
    trainer.train()  # the weight sync before the first generation would raise with packed weights
    assert trainer.state.global_step == 1


# ------------------------------------------------------------------------------ conspo eval's vLLM backend on a CPU


def test_eval_backend_vllm_on_cpu_matches_transformers_greedy(tmp_path, model_dir):
    """``--backend vllm`` runs on a CPU (vllm-cpu, float32, no per-request seeds): greedy completions and every
    metric equal the transformers backend's on the same problems, and sampling gives k samples per problem."""
    from conspo.evaluation import choose_backend, evaluate
    from conspo.loading import load_model
    from conspo.tasks.base import Task

    def last_digit_parity(completion: str, answer: str):
        from conspo.rewards.base import VerifyResult

        digits = [c for c in completion if c.isdigit()]
        ok = bool(digits) and int(digits[-1]) % 2 == int(answer)
        return VerifyResult(score=float(ok), extracted=digits[-1] if digits else None, reason="match" if ok else "x")

    problems = [{"question": f"{i % 10}+{i // 10}=", "answer": str(i % 2)} for i in range(12)]
    task = Task(name="parity", train=problems, test=problems, verifier=last_digit_parity, instruction="",
                max_completion_length=6)
    assert choose_backend("vllm") == "vllm"
    llm, tokenizer = load_model(str(model_dir), backend="vllm")
    reference, ref_tok = load_model(str(model_dir))
    records, summary = evaluate(llm, tokenizer, task, samples=1, ks=[1], temperature=0.0, progress=False)
    ref_records, ref_summary = evaluate(reference, ref_tok, task, samples=1, ks=[1], temperature=0.0, progress=False)
    assert [r["completion"] for r in records] == [r["completion"] for r in ref_records]
    assert summary["overall"] == ref_summary["overall"]
    sampled, result = evaluate(llm, tokenizer, task, samples=4, ks=[1, 4], temperature=1.0, progress=False)
    assert len(sampled) == 4 * len(problems) and result["overall"]["samples"] == 4 * len(problems)
    assert 0.0 <= result["overall"]["avg@1"] <= result["overall"]["pass@4"] <= 1.0
