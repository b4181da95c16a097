#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py): t5-base shapes in bf16 on one GPU, t5qa against the Trainer and generate;
# writes bench/GPU_RESULTS.md. `--dry-run` runs the same pipeline on the CPU with a tiny model (CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$python" bench/gpu.py "$@"
