#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install moe_rec into it.
#
# torch first, so that no other package pulls a build it chose: on a machine with an NVIDIA GPU
# plain `torch` (a CUDA build); elsewhere the CPU-tested release (override: MOE_REC_TORCH="torch==X").
# DeepSpeed is installed without build isolation (its setup imports torch) and without
# pre-built ops (DS_BUILD_OPS=0; we use torch's AdamW, nothing needs compiling).
# Re-running is cheap: a stamp of pyproject.toml skips the install when nothing changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MOE_REC_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip() { "$venv/bin/python" -m pip "$@"; }
stamp="$venv/.moe_rec_stamp"
want="$(cat "$root/pyproject.toml" "$root/tools/setup_env.sh" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "[setup] installing into $venv" >&2
pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${MOE_REC_TORCH:-}" ]; then spec="$MOE_REC_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1; then spec="torch"
  else spec="torch==2.13.0"; fi
  echo "[setup] $spec" >&2
  pip install -q "$spec" numpy 2>&1 | grep -v "is ignored" >&2 || true
fi
"$venv/bin/python" -c "import torch" || { echo "[setup] torch failed to install" >&2; exit 1; }
if ! "$venv/bin/python" -c "import deepspeed" 2>/dev/null; then
  echo "[setup] deepspeed" >&2
  DS_BUILD_OPS=0 pip install -q --no-build-isolation "deepspeed>=0.16" 2>&1 | grep -v "is ignored" >&2 || true
fi
echo "[setup] moe-rec and its dependencies" >&2
pip install -q -e "$root[dev]" 2>&1 | grep -v "is ignored" >&2 || true
check="import moe_rec, deepspeed, transformers, datasets, sentence_transformers"
if ! log="$("$venv/bin/python" -c "$check" 2>&1)"; then
  echo "$log" >&2; echo "[setup] install incomplete" >&2; exit 1
fi
echo "$want" > "$stamp"
