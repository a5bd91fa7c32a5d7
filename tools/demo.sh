#!/usr/bin/env bash
# The main job end to end on data that needs nothing external (small synthetic, CPU, minutes).
# Installs what it needs first. Other configs/overrides: `bash tools/demo.sh --config configs/experiments/amazon2014.yaml`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/setup_env.sh"
cd "$root"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ $# -eq 0 ]; then set -- --config configs/experiments/demo.yaml; fi
exec "${MOE_REC_VENV:-$root/.venv}/bin/moe-rec" run "$@"
