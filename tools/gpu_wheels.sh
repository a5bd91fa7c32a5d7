#!/usr/bin/env bash
# Install what moe-rec needs and a python lacks, from a folder of wheels and sdists (no registry):
# the GPU image has torch, transformers, pyarrow and pytest but not DeepSpeed, HF datasets or the
# HTTP stack. How to fill the folder: the header of tools/gpu_check.sh.
#
#   bash tools/gpu_wheels.sh WHEELS SITE     # then: export PYTHONPATH="$PWD:SITE"
#   PYTHON=/path/to/python bash tools/gpu_wheels.sh ...   # default: python3
#
# Packages go to SITE (pip --target, DeepSpeed without pre-built ops: the trainer uses torch's
# AdamW); MegaBlocks files in the folder are left to gpu_check's megablocks step. Exit 1 when
# something is missing and the folder holds nothing to install.
set -uo pipefail
[ $# -eq 2 ] || { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
wheels="$1" site="$2" PYTHON="${PYTHON:-python3}"
missing=$("$PYTHON" - <<'PY'
import importlib.util
mods = ["deepspeed", "datasets", "fastapi", "uvicorn", "fastapi_offline", "transformers", "pyarrow",
        "yaml", "rich", "safetensors", "prometheus_client", "pytest", "numpy"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
PY
)
if [ -z "$missing" ]; then echo "nothing to install"; exit 0; fi
echo "missing: $missing"
files=()
for f in "$wheels"/*.whl "$wheels"/*.tar.gz; do
  case "$(basename "$f")" in megablocks*|stanford[-_]stk*|grouped[-_]gemm*) continue ;; esac
  [ -e "$f" ] && files+=("$f")
done
if [ ${#files[@]} -eq 0 ]; then
  echo "no wheels in $wheels to install them from (see the header of tools/gpu_check.sh)"; exit 1
fi
mkdir -p "$site"
DS_BUILD_OPS=0 "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
  --target "$site" "${files[@]}" 2>&1 | grep -v "is ignored" || true
echo "installed from $wheels: ${files[*]##*/}"
