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
source benchmarks/device_env.sh
if [ -z "${CPU_DRY_RUN:-}" ]; then
  BENCH=(--gpu --rounds 1 --warmup 2 --steps 4)
  CHECK=()
else
  BENCH=(--rounds 1 --warmup 1 --steps 2 --variants grpo,conspo,conspo_fast --fast-compile '{"backend": "aot_eager", "mode": null}')
  CHECK=(--cpu)
fi

echo "== benchmark"
timeout "${BENCH_TIMEOUT:-270}" $PY benchmarks/trainer_overhead.py "${BENCH[@]}" --json-out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
echo "benchmark exit ${PIPESTATUS[0]}"

echo "== correctness check"
timeout "${CHECK_TIMEOUT:-135}" $PY benchmarks/fast_generation_check.py "${CHECK[@]}" --json-out "$OUT/check.json" 2>&1 \
  | grep -v -i "warn" | tee "$OUT/check.log"
echo "check exit ${PIPESTATUS[0]}"
