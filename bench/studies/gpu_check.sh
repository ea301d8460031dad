#!/usr/bin/env bash
# The GPU check as one prepared script (H100/H200, under 8 minutes): installs what a bare
# GPU machine lacks, then runs kvant.bench.gpu_check into ${OUT:-out/gpu_check}.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-out/gpu_check}"
if ! python3 -c "import kvant" 2>/dev/null; then
  python3 -m pip install -q -e '.[gptq,bnb]'
fi
PYTHONUNBUFFERED=1 python3 -m kvant.bench.gpu_check --out "$out" "$@"
