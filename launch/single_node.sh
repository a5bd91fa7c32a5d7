#!/usr/bin/env bash
# NGPU training processes on this node's GPUs: launch/single_node.sh NGPU CONFIG [key=value ...]
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: $0 NGPU CONFIG [key=value ...]" >&2; exit 2; fi
NGPU=$1; CONFIG=$2; shift 2
exec deepspeed --num_gpus "$NGPU" --master_port "${MASTER_PORT:-29500}" \
  --module moe_rec.train --config "$CONFIG" "$@"
