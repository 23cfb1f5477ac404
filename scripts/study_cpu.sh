#!/usr/bin/env bash
# The CPU study of issue 19 on the embedded tiny model: every method at one budget of *generated* rollouts
# (max_rollouts, so DAPO's dynamic sampling pays for its extra generation), the paper's Table 6 ablations and a
# tau sweep, 3 seeds each, paired by seed; then the paper's sampling protocol (temperature 0.6, top-p 0.95,
# 32 samples) on every run's validation-chosen checkpoint. Finished runs are reused, so rerunning resumes.
#   TASK=arithmetic OUT=runs/study2/bare SEEDS=3 bash scripts/study_cpu.sh
# PARTS picks the parts (in order), METHODS the methods of the first part, BUDGET the generated rollouts per run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TASK=${TASK:-arithmetic}
OUT=${OUT:-runs/study2/$TASK}
SEEDS=${SEEDS:-3}
BUDGET=${BUDGET:-15360}            # 60 steps x 32 prompts x 8 rollouts
PARTS=${PARTS:-methods tau_auto ablations taus eval}
METHODS=${METHODS:-conspo,disco,grpo,dr_grpo,dapo,gspo,cispo,sapo,gmpo}
COMMON=(--task "$TASK" --seeds "$SEEDS" --eval-samples 0 --val-size 200 --max-rollouts "$BUDGET")

for part in $PARTS; do
  case $part in
    methods) $PY -m conspo.cli compare --methods "$METHODS" "${COMMON[@]}" \
                 --output-dir "$OUT/methods" ;;
    tau_auto) $PY -m conspo.cli compare --methods conspo --tau auto "${COMMON[@]}" --output-dir "$OUT/tau_auto" ;;
    ablations) $PY -m conspo.cli compare \
                 --methods conspo_linear_gap,conspo_clipped_ratio,conspo_no_margin,conspo_fixed_margin \
                 "${COMMON[@]}" --output-dir "$OUT/ablations" ;;
    taus) for tau in ${TAUS:-0.03 0.1 1}; do
            $PY -m conspo.cli compare --methods conspo --tau "$tau" "${COMMON[@]}" --output-dir "$OUT/tau_$tau"
          done ;;
    eval) # the paper's sampling on each run's best/ (validation-chosen) checkpoint, the task's own prompt
          for run in "$OUT"/*/*/seed*; do
            [ -d "$run/best" ] || continue
            [ -f "$run/eval_paper/eval_summary.json" ] && continue
            $PY -m conspo.cli eval --model "$run/best" --task "$TASK" --samples 32 --k 1,8,32 --temperature 0.6 \
                --top-p 0.95 --limit 200 --seed 0 --output-dir "$run/eval_paper" >/dev/null
          done ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
