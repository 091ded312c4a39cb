#!/usr/bin/env bash
# The project's prepared GPU check (bench/gpu_check.py): run from the repository root on the lent
# GPU machine, which has torch, transformers, safetensors and huggingface_hub but not this package
# installed; nothing needs to be carried. `--cpu` runs it at toy sizes anywhere.
#   device run: bash bench/gpu_check.sh --json $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-$(command -v python3)}
[ -x .venv/bin/python ] && [ -z "${CUDA_VISIBLE_DEVICES+x}" ] && ! command -v nvidia-smi >/dev/null && PY=.venv/bin/python
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" bench/gpu_check.py "$@"
