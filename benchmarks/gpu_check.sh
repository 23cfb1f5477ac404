#!/usr/bin/env bash
# Fast generation (issue 9) on a lent GPU, in one call: the trainer benchmark (TRL default generation, ConSPOTrainer
# default generation, ConSPOTrainer fast generation, vLLM when installed), then the GPU correctness check.
# Logs and JSON go to $OUT. Run from the repository root with the wheels of trl, datasets, dill and multiprocess
# (py312) in .gpu_wheels/ (see docs/benchmarks.md); the machine's own torch/transformers/accelerate are used.
#
#   bash benchmarks/gpu_check.sh                  # on the GPU machine
#   CPU_DRY_RUN=1 PY=.venv/bin/python bash benchmarks/gpu_check.sh   # the same steps on CPU, tiny sizes
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check_out}
PY=${PY:-python3}
mkdir -p "$OUT"
if [ -z "${CPU_DRY_RUN:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu_wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
  BENCH=(--gpu --rounds 1 --warmup 2 --steps 4)
  CHECK=()
else
  export PYTHONPATH=$PWD/src
  BENCH=(--rounds 1 --warmup 1 --steps 2 --variants grpo,conspo,conspo_fast --fast-compile '{"backend": "aot_eager", "mode": null}')
  CHECK=(--cpu)
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
date -u +"%Y-%m-%d %H:%M UTC" | tee -a "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee -a "$OUT/gpu.txt"
$PY -c "import torch, transformers, trl, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"

echo "== benchmark"
timeout "${BENCH_TIMEOUT:-270}" $PY benchmarks/trainer_overhead.py "${BENCH[@]}" --json-out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
echo "benchmark exit ${PIPESTATUS[0]}"

echo "== correctness check"
timeout "${CHECK_TIMEOUT:-135}" $PY benchmarks/fast_generation_check.py "${CHECK[@]}" --json-out "$OUT/check.json" 2>&1 \
  | grep -v -i "warn" | tee "$OUT/check.log"
echo "check exit ${PIPESTATUS[0]}"
