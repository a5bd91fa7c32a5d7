#!/usr/bin/env bash
# The test command: installs what it needs (tools/setup_env.sh), then runs the CPU test suite.
# Extra arguments go to pytest, e.g. `bash tools/test.sh -m "not slow"` or `bash tools/test.sh tests/data`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/setup_env.sh"
cd "$root"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
exec "${MOE_REC_VENV:-$root/.venv}/bin/python" -m pytest -q "$@"
