#!/usr/bin/env bash
# The GPU check: on one H100 / H200, in under 10 minutes, run everything the docs say has not been
# run on a GPU, and print one summary table (docs/training.md, "The GPU check").
#
#   bash tools/gpu_check.sh                # on the GPU machine (a dry pass when no CUDA device is found)
#   bash tools/gpu_check.sh --dry-run      # CPU: checks this script with tiny sizes (70 s of CPU time)
#   bash tools/gpu_check.sh --wheels DIR   # packages to install when missing (default: shared/wheels)
#   bash tools/gpu_check.sh --budget 540   # seconds for all steps together (default 540; dry 300)
#   bash tools/gpu_check.sh --work DIR     # scratch space, wiped first (default ${TMPDIR:-/tmp}/moe_rec_gpu_check)
#   bash tools/gpu_check.sh --skip bench_moe,bench_decode   # steps left out (SKIP rows): a rerun of what failed
#   PYTHON=/path/to/python bash tools/gpu_check.sh ...   # default: .venv/bin/python, else python3
#
# Steps, in this order. Each has its own time limit, cut to what is left of the budget; a step that
# fails, hangs or finds no time left becomes a FAIL / TIMEOUT / SKIP row and the next one runs:
#   setup        python, torch and the GPU; installs missing packages from the wheels folder (below);
#                imports every module the steps need, finds every file they run, `moe-rec --help`
#   megablocks   importable, or installed from the wheels folder when it holds MegaBlocks files (an
#                sdist compiles CUDA code for minutes; patched for CUDA 13 as README says); else SKIP
#   pytest_gpu   pytest -m gpu over the test files that hold gpu tests (dry pass: collected only)
#   bench_moe    tools/bench_moe.py at docs/moe.md's shape: bf16, 32768x1024x2816x8x2, 5 + 20 steps,
#                with MegaBlocks rows when it imports
#   train_data   synthetic data (moe-rec data prepare), random semantic IDs (tools/random_sids.py: the
#                text encoder's model is too big to travel), moe-rec sequences build
#   train        moe-rec train: model.size=small, item-level, bf16, ZeRO-2, 60 steps on one GPU;
#                tokens/s, TFLOP/s and MFU as the trainer logs them (checkpoints/metrics.jsonl)
#   bench_decode tools/bench_decode.py as in docs/decoding.md (small, bf16, batches 1 and 256)
#   bench_topk   tools/bench_exact_topk.py at 10k / 100k / 1M items (docs/decoding.md)
#   bench_serve  tools/bench_serve.py --synthetic small --items 2000, 8 clients x 100 requests
#   launcher     launch/single_node.sh 1 (DeepSpeed's launcher, NCCL) for 10 steps on train_data's run
#
# Output: the table on stdout. With OUT set: $OUT/gpu_check_summary.md (the table and each step's
# last lines), $OUT/gpu_check_logs.txt (every step's whole output), $OUT/train_metrics.jsonl.
# Exit status 0 when no step failed (a SKIP is not a failure), 1 otherwise.
#
# The wheels folder. The GPU image has torch, transformers, sentence-transformers, pyarrow, pytest
# and more, but not DeepSpeed, HF datasets or the HTTP stack, and it reaches no package registry.
# Fill the folder where pip can (for the image's Python 3.12 on x86_64, at the versions of .venv)
# and put it at shared/wheels: a shared/ folder in the checkout travels to the GPU machine, and git
# ignores shared/wheels (6-7 MB):
#
#   pins=$(.venv/bin/python -m pip freeze | grep -iE '^(pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|hjson|datasets|dill|multiprocess|fastapi|starlette|uvicorn|fastapi[-_]offline|opentelemetry[-_]api)==')
#   pip download --no-deps --no-binary :all: -d shared/wheels "deepspeed==$(.venv/bin/python -c 'from importlib.metadata import version; print(version("deepspeed"))')"
#   pip download --no-deps --only-binary :all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d shared/wheels $pins
#
# MegaBlocks (optional; the megablocks step compiles it, minutes): add the megablocks==0.10.0 sdist
# (`pip download --no-deps --no-binary :all: --no-build-isolation megablocks==0.10.0`) and the
# stanford-stk==0.7.1 and grouped_gemm==0.3.0 sdists. Everything is installed with
# `DS_BUILD_OPS=0 pip install --no-index --no-deps --no-build-isolation --target <work>/site`
# (DeepSpeed without pre-built ops: the trainer uses torch's AdamW) and put on PYTHONPATH.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

dry=0 budget="" skip_steps="" wheels="$root/shared/wheels" work="${TMPDIR:-/tmp}/moe_rec_gpu_check"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --wheels) wheels="$2"; shift ;;
    --budget) budget="$2"; shift ;;
    --work) work="$2"; shift ;;
    --skip) skip_steps="$2"; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
all_steps=",setup,megablocks,pytest_gpu,bench_moe,train_data,train,bench_decode,bench_topk,bench_serve,launcher,"
for name in ${skip_steps//,/ }; do
  [[ "$all_steps" == *",$name,"* ]] || { echo "gpu_check: --skip $name: no such step (steps: $(echo ${all_steps//,/ }))" >&2; exit 2; }
done
left_out() { [[ ",$skip_steps," == *",$1,"* ]]; }  # left_out NAME: named by --skip
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
if [ "$dry" = 0 ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to $PYTHON: dry pass on the CPU instead" >&2
  dry=1
fi
[ -n "$budget" ] || budget=$([ "$dry" = 1 ] && echo 300 || echo 540)

if [ -e "$work" ] && [ ! -e "$work/.gpu_check" ]; then
  echo "gpu_check: $work exists and was not made by this script; not wiping it (choose --work)" >&2; exit 2
fi
rm -rf "$work"
mkdir -p "$work/logs" "$work/site" && touch "$work/.gpu_check"
site="$work/site" logs="$work/logs" run="$work/run"
python_bin=$(dirname "$(command -v "$PYTHON")")  # its environment's scripts (deepspeed) for the launcher
export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$python_bin:$PATH"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 MOE_REC_CACHE="$work/cache"
deadline=$((SECONDS + budget))
rows=()    # "name|status|seconds|result"
failed=0

# --- running a step -------------------------------------------------------------------------------

# step NAME LIMIT CMD...: run CMD with its output in $logs/NAME.log, at most LIMIT seconds and never
# past the budget. Sets $rc (124: timed out, 125: no time left, 126: left out by --skip) and $took;
# returns CMD's status.
step() {
  local name="$1" limit="$2"; shift 2
  local left=$((deadline - SECONDS))
  took=0 rc=0
  if left_out "$name"; then rc=126; echo "left out (--skip)" >"$logs/$name.log"; return "$rc"; fi
  if [ "$left" -lt 15 ]; then rc=125; echo "no time left in the ${budget}s budget" >"$logs/$name.log"; return "$rc"; fi
  [ "$limit" -le "$left" ] || limit="$left"
  echo "== $name (at most ${limit}s): $*" >&2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$logs/$name.log" 2>&1 || rc=$?
  took=$((SECONDS - t0))
  [ "$rc" != 137 ] || rc=124  # killed after the grace period: still a timeout
  return "$rc"
}

# row NAME RESULT [STATUS]: record the step that just ran (status from $rc unless given).
row() {
  local name="$1" result="$2" status="${3:-}"
  if [ -z "$status" ]; then
    case "$rc" in
      0) status=PASS ;;
      124) status=TIMEOUT; result="stopped after ${took}s; $result" ;;
      125) status=SKIP; result="no time left in the ${budget}s budget" ;;
      126) status=SKIP; result="left out (--skip)" ;;
      *) status=FAIL; result="exit $rc; $result" ;;
    esac
  fi
  case "$status" in FAIL|TIMEOUT) failed=1 ;; esac
  rows+=("$name|$status|$took|${result//|//}")
  echo "   $status  $result" >&2
}

last_line() { grep -v '^\s*$' "$logs/$1.log" 2>/dev/null | tail -n 1 | cut -c1-160; }
skip() { rc=0; took=0; row "$1" "$2" SKIP; }

# --- the steps ------------------------------------------------------------------------------------

check_setup() {  # versions, device, imports, files, CLI
  PYTHON="$PYTHON" bash "$root/tools/gpu_wheels.sh" "$wheels" "$site" || return 1
  "$PYTHON" - <<'EOF' || return 1
import contextlib, importlib, io, platform, sys
from pathlib import Path
import torch
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU {platform.machine()}"
versions = {}
for mod in ["deepspeed", "transformers", "datasets", "fastapi", "uvicorn", "fastapi_offline", "pytest",
            "moe_rec.cli", "moe_rec.train.trainer", "moe_rec.serve.http", "moe_rec.export"]:
    versions[mod] = getattr(importlib.import_module(mod), "__version__", "ok")
files = ["tools/bench_moe.py", "tools/bench_decode.py", "tools/bench_exact_topk.py", "tools/bench_serve.py",
         "tools/random_sids.py", "configs/experiments/demo.yaml", "configs/deepspeed/zero2.json",
         "launch/single_node.sh"]
if missing := [f for f in files if not Path(f).exists()]:
    sys.exit(f"missing files: {missing}")
from moe_rec.cli import main  # every subcommand a step runs parses its --help
for sub in ([], ["data", "prepare"], ["sequences", "build"], ["train"], ["serve"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main([*sub, "--help"])
        except SystemExit as e:
            if e.code:
                sys.exit(f"moe-rec {' '.join(sub)} --help: exit {e.code}")
print(f"python {platform.python_version()}, torch {torch.__version__}, {device}, "
      f"deepspeed {versions['deepspeed']}, transformers {versions['transformers']}, datasets {versions['datasets']}")
EOF
}

install_megablocks() {  # the MegaBlocks files of the wheels folder; sdists are patched for CUDA 13
  local files=() f d
  for f in "$wheels"/megablocks* "$wheels"/stanford[-_]stk* "$wheels"/grouped[-_]gemm*; do
    [ -e "$f" ] || continue
    case "$f" in
      *megablocks*.tar.gz)
        mkdir -p "$work/megablocks" && tar xzf "$f" -C "$work/megablocks"
        d=$(ls -d "$work"/megablocks/megablocks-*/ | head -n 1)
        # CUDA 13's CUB dropped the last argument of cub::DeviceScan::{Exclusive,Inclusive}Sum
        "$PYTHON" -c "import re, sys; p = sys.argv[1]; s = open(p).read(); open(p, 'w').write(re.sub(r'stream,\s*debug_synchronous\)\)', 'stream))', s))" "$d/csrc/cumsum.h"
        files+=("$d") ;;
      *) files+=("$f") ;;
    esac
  done
  echo "installing ${files[*]##*/}"
  MAX_JOBS="${MAX_JOBS:-16}" "$PYTHON" -m pip install --no-index --no-deps --no-build-isolation --target "$site" "${files[@]}" \
    && "$PYTHON" -c "import megablocks, stk, grouped_gemm; print('megablocks', megablocks.__version__)"
}

moe_result() {  # "grouped_mm 0.93x dense (480 TFLOP/s); ..." from bench_moe's table
  awk -F'|' '/^\| N=/ && $3 !~ /dense/ {gsub(/^ +| +$/, "", $3); gsub(/ /, "", $6); gsub(/ /, "", $7);
    printf "%s%s %sx dense (%s TFLOP/s)", (n++ ? "; " : ""), $3, $7, $6}' "$logs/bench_moe.log"
  grep -q "megablocks" "$logs/bench_moe.log" || printf "; no MegaBlocks rows (not importable)"
}

train_result() {  # the trainer's last throughput line from metrics.jsonl
  "$PYTHON" - "$run/checkpoints/metrics.jsonl" <<'EOF'
import json, sys
perf = [r for r in map(json.loads, open(sys.argv[1])) if "perf/tokens_per_s" in r]
if not perf:
    sys.exit("no perf/tokens_per_s in metrics.jsonl")
last = perf[-1]
mfu = f"MFU {100 * last['perf/mfu']:.2f} %" if "perf/mfu" in last else "MFU n/a (no peak FLOP/s known for this device)"
print(f"step {last['step']}: {last['perf/tokens_per_s']:,.0f} tokens/s, "
      f"{last['perf/tflops_per_device']:.2f} TFLOP/s, {mfu}; loss {last['train/loss']:.3f}")
EOF
}

# --- the run --------------------------------------------------------------------------------------

if [ "$dry" = 1 ]; then
  mode="dry pass (CPU, tiny sizes)"
  moe_args=(--device cpu --dtype float32 --sizes 256x32x64x4x2 --warmup 1 --iters 1 --threads 1)
  data_args=(data.synthetic.num_users=100 data.synthetic.items_per_service=50 data.num_shards=1)
  train_args=(model.size=tiny train.max_steps=3 train.log_every=1 train.warmup_steps=1
    train.micro_batch_size=8 train.max_eval_samples=16)
  decode_args=(--device cpu --size tiny --items 50 --batch-sizes 2 --iters 1 --check 2 --beams 4)
  topk_args=(--device cpu --items 1000 --batch 4 --iters 1)
  serve_args=(--synthetic tiny --items 30 --clients 2 --requests 3 --baseline-requests 3 --device cpu
    --torch-threads 1)
  limits=(setup=90 megablocks=20 pytest_gpu=90 bench_moe=60 train_data=90 train=90 bench_decode=60
    bench_topk=60 bench_serve=90 launcher=30)
else
  mode="GPU"
  moe_args=(--device cuda --dtype bfloat16 --sizes 32768x1024x2816x8x2 --warmup 5 --iters 20)
  data_args=(data.synthetic.num_users=20000 data.synthetic.items_per_service=2000 data.num_shards=4)
  train_args=(model.size=small train.max_steps=60 train.log_every=10 train.warmup_steps=10
    train.micro_batch_tokens=32768 train.max_eval_samples=512)
  decode_args=(--device cuda --size small --dtype bfloat16 --batch-sizes 1 256 --iters 50 20)
  topk_args=(--device cuda --items 10000 100000 1000000 --batch 64 --codes 17 --iters 5)
  serve_args=(--synthetic small --items 2000 --clients 8 --requests 100 --device cuda)
  limits=(setup=150 megablocks=180 pytest_gpu=120 bench_moe=120 train_data=120 train=180 bench_decode=120
    bench_topk=90 bench_serve=120 launcher=120)
fi
limit() { local kv; for kv in "${limits[@]}"; do [ "${kv%%=*}" != "$1" ] || echo "${kv#*=}"; done; }
# The item-level model (the default) on the demo's synthetic services: 16 random codes of 256 an
# item, every event a label; bf16 on a GPU; exact validation over every item of the asked service
# (on a few requests) and a checkpoint at the end. Random codes have no item text, so no text
# vector, no text prior and no critiques (text samples).
config=configs/experiments/demo.yaml
run_args=(run_dir="$run" sid.levels=16 sid.codebook_size=256 model.overrides.item_text=false
  model.overrides.item_text_prior=false critiques.enabled=false "${data_args[@]}")
fit_args=("${run_args[@]}" train.precision=auto train.eval_every=0 train.save_every=100000
  train.wandb.mode=disabled "${train_args[@]}")
export PYTHON root wheels site work dry config
export -f check_setup install_megablocks

started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
echo "gpu_check: $mode, budget ${budget}s, python $PYTHON, work $work" >&2

step setup "$(limit setup)" bash -c check_setup
installed=$(sed -n 's/^missing: //p' "$logs/setup.log")
row setup "$(last_line setup)${installed:+; installed $installed from $wheels}"

if left_out megablocks; then
  skip megablocks "left out (--skip)"
elif "$PYTHON" -c "import megablocks" 2>/dev/null; then
  rc=0 took=0; row megablocks "already importable"
elif ! ls "$wheels"/megablocks* >/dev/null 2>&1; then
  skip megablocks "not installed and no megablocks files in $wheels: bench_moe runs without its rows"
elif [ "$dry" = 1 ]; then
  skip megablocks "would build $(cd "$wheels" && echo megablocks* stanford* grouped*) (needs CUDA)"
else
  step megablocks "$(limit megablocks)" bash -c install_megablocks
  row megablocks "$(last_line megablocks)"
fi

gpu_files=$(grep -rl --include='*.py' "mark.gpu" tests | sort | tr '\n' ' ')
pytest_gpu() {  # pytest_gpu ARGS...: the marker must be registered, then pytest over the gpu test files
  "$PYTHON" -m pytest --markers -p no:cacheprovider | grep -q "@pytest.mark.gpu:" ||
    { echo "the gpu marker is not registered (pyproject.toml)"; return 1; }
  "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider "$@" $gpu_files
}
export gpu_files
export -f pytest_gpu
if [ "$dry" = 1 ]; then
  step pytest_gpu "$(limit pytest_gpu)" bash -c 'pytest_gpu --collect-only'
  row pytest_gpu "$(grep -E "collected|selected|registered" "$logs/pytest_gpu.log" | tail -n 1) (collected only: no CUDA)"
else
  step pytest_gpu "$(limit pytest_gpu)" bash -c 'pytest_gpu -rs'
  row pytest_gpu "$(last_line pytest_gpu)"
fi

step bench_moe "$(limit bench_moe)" "$PYTHON" tools/bench_moe.py "${moe_args[@]}"
row bench_moe "$(if [ "$rc" = 0 ]; then moe_result; else last_line bench_moe; fi)"

step train_data "$(limit train_data)" bash -c '"$PYTHON" -m moe_rec.cli data prepare --config "$config" "$@" &&
  "$PYTHON" tools/random_sids.py --config "$config" "$@" &&
  "$PYTHON" -m moe_rec.cli sequences build --config "$config" "$@"' train_data "${run_args[@]}"
row train_data "$(if [ "$rc" = 0 ]; then grep -h "^samples:" "$logs/train_data.log"; else last_line train_data; fi)"

trained=0
if [ "$rc" != 0 ]; then
  skip train "needs train_data"
else
  step train "$(limit train)" "$PYTHON" -m moe_rec.cli train --config "$config" "${fit_args[@]}"
  [ "$rc" != 0 ] || trained=1
  row train "$(if [ "$rc" = 0 ]; then train_result 2>&1; else last_line train; fi)"
fi

step bench_decode "$(limit bench_decode)" "$PYTHON" tools/bench_decode.py "${decode_args[@]}"
row bench_decode "$(if [ "$rc" = 0 ]; then grep -E "^ *[0-9]+ speed-up" "$logs/bench_decode.log" |
  awk '{printf "%sbatch %s: ours %s as fast as generate", (n++ ? "; " : ""), $1, $3}'; else last_line bench_decode; fi)"

step bench_topk "$(limit bench_topk)" "$PYTHON" tools/bench_exact_topk.py "${topk_args[@]}"
row bench_topk "$(if [ "$rc" = 0 ]; then grep -E "^\| [0-9]" "$logs/bench_topk.log" | tail -n 1 |
  awk -F'|' '{printf "%s items: ours %s ms / batch, plain %s ms, same top-k %s", $2, $3, $4, $7}' |
  tr -s ' ' | sed 's/^ //; s/ $//';
  else last_line bench_topk; fi)"

step bench_serve "$(limit bench_serve)" "$PYTHON" tools/bench_serve.py "${serve_args[@]}"
row bench_serve "$(if [ "$rc" = 0 ]; then awk '/^HTTP,/ {printf "HTTP p50 %s ms, p99 %s ms, %s req/s, mean batch %s; ", $6, $7, $8, $9}
  /^throughput:/ {sub(/^throughput: /, ""); print}' "$logs/bench_serve.log"; else last_line bench_serve; fi)"

if [ "$trained" = 0 ]; then
  skip launcher "needs the train step's run"
elif [ "$dry" = 1 ]; then
  step launcher "$(limit launcher)" bash -c 'bash -n launch/single_node.sh && command -v deepspeed'
  row launcher "launch/single_node.sh parses; deepspeed is $(last_line launcher) (not started: no GPU)"
else  # resumes the train step's last checkpoint under DeepSpeed's launcher: 10 more steps
  step launcher "$(limit launcher)" env MASTER_PORT=29512 bash launch/single_node.sh 1 "$config" \
    "${fit_args[@]}" train.max_steps=70
  row launcher "$(grep -h "resumed from" "$logs/launcher.log" | tail -n 1 | sed 's/.*resumed/resumed/'); $(last_line launcher)"
fi

# --- the summary ----------------------------------------------------------------------------------

summary="$work/summary.md"
{
  echo "# gpu_check: $mode"
  echo
  echo "$started, $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo "no git") on $(uname -n), budget ${budget}s, $((SECONDS))s in all"
  echo
  echo "| step | status | seconds | result |"
  echo "|---|---|---:|---|"
  for r in "${rows[@]}"; do IFS='|' read -r n s t x <<<"$r"; echo "| $n | $s | $t | $x |"; done
} >"$summary"
echo >&2
cat "$summary"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  {
    cat "$summary"
    for r in "${rows[@]}"; do
      n="${r%%|*}"
      [ -s "$logs/$n.log" ] || continue
      printf '\n## %s (last lines of %s.log)\n\n```\n' "$n" "$n"; tail -n 40 "$logs/$n.log"; printf '```\n'
    done
  } >"$OUT/gpu_check_summary.md"
  for r in "${rows[@]}"; do n="${r%%|*}"; [ -e "$logs/$n.log" ] && { echo "===== $n"; cat "$logs/$n.log"; }; done \
    >"$OUT/gpu_check_logs.txt"
  [ -e "$run/checkpoints/metrics.jsonl" ] && cp "$run/checkpoints/metrics.jsonl" "$OUT/train_metrics.jsonl"
  echo "written: $OUT/gpu_check_summary.md, $OUT/gpu_check_logs.txt" >&2
fi
exit "$failed"
