#!/usr/bin/env bash
# Every node and GPU of a hostfile (passwordless ssh between nodes, same paths on every node, a
# run_dir on a shared filesystem): launch/multi_node.sh HOSTFILE CONFIG [key=value ...]
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: $0 HOSTFILE CONFIG [key=value ...]" >&2; exit 2; fi
HOSTFILE=$1; CONFIG=$2; shift 2
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  --module moe_rec.train --config "$CONFIG" "$@"
