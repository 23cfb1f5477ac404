#!/usr/bin/env bash
# The GPU study (issue 7) on a lent GPU, in one call: installs the carried wheels, records the card, date and
# versions, runs benchmarks/gpu_study.py (a driver over conspo compare) with the given arguments under a time
# limit, and leaves log.txt, study.json, results.md/.csv and the runs in $OUT; the table is printed last.
# Run from the repository root with the wheels of trl, datasets, dill and multiprocess (py312) in .gpu_wheels/
# (docs/benchmarks.md, "GPU study"); the machine's own torch/transformers/accelerate are used.
#
#   bash benchmarks/gpu_study.sh                                   # on the GPU machine: the default comparison
#   bash benchmarks/gpu_study.sh --seeds 3 --methods conspo,grpo   # any gpu_study.py arguments
#   CPU_DRY_RUN=1 PY=.venv/bin/python bash benchmarks/gpu_study.sh # the same steps on CPU (--cpu-smoke)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_study_out}
PY=${PY:-python3}
source benchmarks/device_env.sh
export PYTHONWARNINGS=ignore
EXTRA=()
[ -n "${CPU_DRY_RUN:-}" ] && EXTRA=(--cpu-smoke --sft-seconds 3)
timeout "${STUDY_TIMEOUT:-560}" $PY benchmarks/gpu_study.py --out "$OUT" "${EXTRA[@]}" "$@" 2>&1 \
  | grep -v -i "warn\|Loading weights" | tee "$OUT/log.txt"
echo "gpu_study exit ${PIPESTATUS[0]}"
