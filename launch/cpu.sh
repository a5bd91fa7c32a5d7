#!/usr/bin/env bash
# N training processes on this machine's CPU, gloo backend: launch/cpu.sh NPROC CONFIG [key=value ...]
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: $0 NPROC CONFIG [key=value ...]" >&2; exit 2; fi
NPROC=$1; CONFIG=$2; shift 2
export DS_ACCELERATOR=cpu
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/moe_rec/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
exec torchrun --standalone --nproc_per_node="$NPROC" -m moe_rec.train --config "$CONFIG" "$@"
