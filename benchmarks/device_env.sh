# Sourced by the device scripts (gpu_check.sh, gpu_study.sh) after OUT and PY are set: on the GPU machine, installs
# the carried wheels of .gpu_wheels/ into /tmp/site and records the card in $OUT/gpu.txt; with CPU_DRY_RUN set, only
# points PYTHONPATH at src/. Then records the date, commit and versions, and sets quiet, unbuffered output.
mkdir -p "$OUT"
if [ -z "${CPU_DRY_RUN:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu_wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false
{ date -u +"%Y-%m-%d %H:%M UTC"; git rev-parse --short HEAD 2>/dev/null; } | tee -a "$OUT/gpu.txt"
$PY -c "import torch, transformers, trl, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
