#!/usr/bin/env bash
# The CPU learning-efficiency study (issue 7): every method at equal rollout budget and seeds on the
# embedded default, then ConSPO's ablations. Finished runs are reused, so rerunning resumes.
#   SEEDS=3 ABLATION_SEEDS=2 STEPS= OUT=runs/study bash scripts/study_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/study}
SEEDS=${SEEDS:-3}
ABLATION_SEEDS=${ABLATION_SEEDS:-2}
STEPS=${STEPS:+--max-steps $STEPS}
EVAL="--eval-samples 8 --k 1,4,8"

$PY -m conspo.cli compare --methods conspo,disco,grpo,dr_grpo,dapo,gspo,cispo --seeds "$SEEDS" $EVAL \
    $STEPS --output-dir "$OUT/methods"
for cfg in benchmarks/study/*.yaml; do
    name=$(basename "$cfg" .yaml)
    $PY -m conspo.cli compare --methods conspo --seeds "$ABLATION_SEEDS" $EVAL $STEPS --config "$cfg" \
        --output-dir "$OUT/ablation-$name"
done
