#!/usr/bin/env bash
# The one prepared GPU check: `python -m replication.bench` at the paper's shapes on one GPU, the eager fp32
# baseline and a fast path side by side in the same process, one benchmark process per plan entry:
#   lsun_churches_ldm8  (Table 1, LDM-8 KL, U-Net 294,966,916 params)  train batch 96
#   celebahq_ldm4       (Table 1, LDM-4 VQ, U-Net 274,056,163 params)  train batch 48
# with sampling at batch 256 (the batch of the original-code measurement in shared/ANCHORS.md), timed over
# 10 DDIM steps and quoted per image at 200 steps. The fast path is every lever (bf16 autocast + channels_last +
# torch.compile + fused AdamW) unless an entry names its own. After its timing, each path runs 2 more calls under
# torch.profiler (bench --profile 2; the sampling row one run): GPU kernel time per category and how busy the GPU
# is, for the low-MFU rows (Churches training ran at 21% MFU on the H200).
# Writes reports/benchmarks/<device>.json and <device>.md (device e.g. nvidia-h200) and prints the table.
#
# Plan (EXPERIMENTS): entries NAME:BATCH[@ROWS[@FAST]][=SECONDS]; the default (DEFAULT_PLAN below) measures what the
# H200 session of 2026-11-27 left open. Each entry is cut at its SECONDS (default PER_EXPERIMENT_S) and every entry
# stops RESERVE_S before DEADLINE_S (575 s after the script's start; a device call is cut at 600 s). Rows measured by
# then are kept, and so is the eager baseline of a row whose fast path was still compiling: the benchmark rewrites
# its JSON after each. Most of the time is torch.compile: a cold compile of the Churches training graph took over
# 3 minutes on an H200; a second compile on the same machine reuses inductor's caches.
#
# Usage (repository root):  bash replication/gpu_check.sh
#   on this project's device machines (no registry there, an image without Hydra): first, here,
#   `bash replication/gpu_wheels.sh`, then run `COPY_TO=$OUT bash replication/gpu_check.sh` with carry [".whl"]
#   env: OUT_DIR (default reports/benchmarks), PER_EXPERIMENT_S (default 205), COPY_TO (the log and each result
#   are copied there as they appear), PLAN_ONLY=1 (print the parsed plan and stop)
#   rehearsal on a machine without a GPU (tests/test_gpu_check.py runs it so): DEVICE=cpu EXPERIMENTS="smoke:4"
#   BENCH_ARGS="--steps 1 ..." replaces the paper-shape arguments below; MERGE_TAG names the merged files.
# After the benchmark, while the time allows (EXTRAS_BUDGET_S, default 560 s since the start, and DEADLINE_S), it
# runs the CUDA-only tests that are skipped elsewhere (pinned copies, extract() without a host sync, the loss
# read one step late through pinned memory, LDM and autoencoder training steps and an eta = 1 DDIM chain's
# per-sample noise without any host-device sync) and the smoke
# experiment through the real stages with trainer=default (bf16, compile, channels_last, fused AdamW,
# pinned memory, compiled sampling); logs go to OUT_DIR/<tag>-extras/. EXTRAS=0 skips them; SMOKE_OVERRIDES
# adds overrides (the CPU rehearsal switches compile off).
set -uo pipefail
cd "$(dirname "$0")/.."
script_start=$(date +%s)
# COPY_TO (the device call's $OUT) receives the whole log and every result as soon as it exists, so that a call cut at
# its limit still brings back what was measured (at most 8 files come back from $OUT: log, merged json/md, 4 extras)
if [ -n "${COPY_TO:-}" ]; then
  mkdir -p "$COPY_TO"
  exec > >(tee -a "$COPY_TO/gpu_check.log") 2>&1
fi

OUT_DIR=${OUT_DIR:-reports/benchmarks}
PER_EXPERIMENT_S=${PER_EXPERIMENT_S:-205}
DEVICE=${DEVICE:-cuda}
# What the H200 session of 2026-11-27 left unmeasured, most wanted first (its results: reports/benchmarks/nvidia-h200.md):
# CelebA-HQ compiled sampling (the fourth target row); the Churches training step compiled after the EMA sync fix
# (a cold compile of it took over 3 minutes there, so it gets 280 s; its profile says whether the GPU waits for
# the host); the same with CUDA graphs, which reuses most of that compile (inductor's caches) if time is left; the
# first-stage and FID-feature rows of both (no compile).
DEFAULT_PLAN="celebahq_ldm4:48@sample=170 lsun_churches_ldm8:96@train=280 \
lsun_churches_ldm8:96@train@bf16,channels_last,compile:reduce-overhead,fused_adam=120 \
lsun_churches_ldm8:96@decode,encode,features=60 celebahq_ldm4:48@decode,encode,features=60"
EXPERIMENTS=${EXPERIMENTS:-$DEFAULT_PLAN}
# the whole script ends by DEADLINE_S after its start (a device call is cut at 600 s); benchmark entries stop
# RESERVE_S before it, for the merge and the CUDA-only tests
DEADLINE_S=${DEADLINE_S:-575}
RESERVE_S=${RESERVE_S:-40}
PY=${PYTHON:-python3}  # the device machines have python3 (the one with PyTorch), maybe no `python`
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export HF_HUB_OFFLINE=1
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}

# EXPERIMENTS entries: NAME:BATCH[@ROWS[@FAST]][=SECONDS], e.g. celebahq_ldm4:48@sample=170 or
# lsun_churches_ldm8:96@train@bf16,channels_last,compile:reduce-overhead,fused_adam=120; all checked before any work
specs=()
for spec in $EXPERIMENTS; do
  body=${spec%%=*}
  limit=$PER_EXPERIMENT_S
  [ "$body" != "$spec" ] && limit=${spec#*=}
  head=${body%%@*}
  rest=""
  [ "$head" != "$body" ] && rest=${body#*@}
  rows=${rest%%@*}
  fast=""
  [ "$rows" != "$rest" ] && fast=${rest#*@}
  name=${head%%:*}
  batch=${head#*:}
  if [ "$name" = "$head" ] || ! [[ "$batch" =~ ^[0-9]+$ ]] || ! [[ "$limit" =~ ^[0-9]+$ ]] \
     || ! [[ "$rows" =~ ^[a-z,]*$ ]]; then
    echo "gpu_check: EXPERIMENTS entries are NAME:BATCH[@ROWS[@FAST]][=SECONDS], got '$spec'" >&2
    exit 2
  fi
  specs+=("$name|$batch|$rows|$fast|$limit")
done

if [ "${PLAN_ONLY:-0}" = 1 ]; then  # print the parsed plan and stop (tests/test_gpu_check.py checks the default)
  for entry in "${specs[@]}"; do echo "plan: $entry"; done
  exit 0
fi

# The device machines' image lacks Hydra/OmegaConf, torch-fidelity and lpips: install the wheels carried in .whl/
# (made here by replication/gpu_wheels.sh; name .whl in the device call's carry) when the imports fail.
if ! "$PY" -c "import hydra, omegaconf, torch_fidelity, lpips" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if ! "$PY" -c "import hydra, omegaconf, torch_fidelity, lpips"; then
    echo "gpu_check: Hydra/OmegaConf/torch-fidelity/lpips are missing; run bash replication/gpu_wheels.sh where pip" >&2
    echo "           reaches the registry and carry .whl to this machine" >&2
    exit 3
  fi
fi

if [ "$DEVICE" = cuda ]; then
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible; this script measures paper shapes on a GPU only" >&2
    echo "           (on the CPU run: python -m replication.bench experiment=smoke --device cpu," >&2
    echo "            or rehearse this script: DEVICE=cpu EXPERIMENTS=smoke:4 BENCH_ARGS='--steps 1 --warmup 1')" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
fi
start=$(date +%s)

if [ -n "${BENCH_ARGS:-}" ]; then
  read -r -a SHAPE_ARGS <<< "$BENCH_ARGS"
else
  SHAPE_ARGS=(--steps 5 --warmup 2 --sample-batch 256 --sample-steps 10 --ae-batch 16 --feature-batch 100 --fast all
              --profile 2)
fi
COMMON=(--device "$DEVICE" "${SHAPE_ARGS[@]}" --out "$TMP" --no-table)

# one benchmark process per entry, each cut at its limit and never past the deadline (what it measured is kept)
run_one() {
  local name=$1 batch=$2 rows=$3 fast=$4 limit=$5 tag=$6
  local left=$(( DEADLINE_S - RESERVE_S - ($(date +%s) - script_start) ))
  [ "$left" -lt "$limit" ] && limit=$left
  local extra=()
  [ -n "$rows" ] && extra+=(--rows "$rows")
  [ -n "$fast" ] && extra+=(--fast "$fast")
  if [ "$limit" -lt 30 ]; then
    echo "== $name${rows:+ ($rows)}: skipped, ${left}s left before the deadline"
    return
  fi
  echo "== $name, train batch $batch${rows:+, rows $rows}${fast:+, fast $fast} (limit ${limit}s)"
  timeout --signal=TERM --kill-after=15 "$limit" \
    "$PY" -m replication.bench "experiment=$name" --batch "$batch" "${COMMON[@]}" ${extra[@]+"${extra[@]}"} --tag "$tag"
  local rc=$?
  [ $rc -eq 124 ] && echo "   $name: cut at ${limit}s; keeping the rows (and baseline) measured so far"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && echo "   $name: exit status $rc"
  # the unmerged rows, until the merged files replace them
  [ -n "${COPY_TO:-}" ] && [ -f "$TMP/$tag.json" ] && cp "$TMP/$tag.json" "$COPY_TO/partial-$tag.json"
  echo "   elapsed so far: $(( $(date +%s) - start ))s"
}

names=()
i=0
for entry in "${specs[@]}"; do
  IFS='|' read -r name batch rows fast limit <<< "$entry"
  i=$(( i + 1 ))
  tag=$name
  [ ${#specs[@]} -gt 1 ] && tag="$i-$name"
  names+=("$tag")
  run_one "$name" "$batch" "$rows" "$fast" "$limit" "$tag"
done

files=()
for name in "${names[@]}"; do
  [ -f "$TMP/$name.json" ] && files+=("$TMP/$name.json")
done
if [ ${#files[@]} -eq 0 ]; then
  echo "gpu_check: no experiment produced results (see the errors above)" >&2
  exit 1
fi
mkdir -p "$OUT_DIR"
"$PY" -m replication.bench --merge "${files[@]}" --out "$OUT_DIR" ${MERGE_TAG:+--tag "$MERGE_TAG"} || exit 1
tag=${MERGE_TAG:-$(ls -t "$OUT_DIR"/*.json | head -1 | xargs -n1 basename | sed 's/\.json$//')}
if [ -n "${COPY_TO:-}" ]; then
  cp "$OUT_DIR/$tag.json" "$OUT_DIR/$tag.md" "$COPY_TO"/ && rm -f "$COPY_TO"/partial-*.json
fi
EXTRAS=${EXTRAS:-$([ "$DEVICE" = cuda ] && echo 1 || echo 0)}
EXTRAS_BUDGET_S=${EXTRAS_BUDGET_S:-560}
# the extras end by EXTRAS_BUDGET_S after the benchmark's start and by DEADLINE_S after the script's start
# (the wheel install and the CUDA probe come before the benchmark's start)
budget_left() {
  local a=$(( EXTRAS_BUDGET_S - ($(date +%s) - start) )) b=$(( DEADLINE_S - ($(date +%s) - script_start) ))
  echo $(( a < b ? a : b ))
}
if [ "$EXTRAS" = 1 ]; then
  extras="$OUT_DIR/$tag-extras"
  mkdir -p "$extras"
  left=$(budget_left)
  if [ "$left" -gt 20 ]; then
    echo "== CUDA-only tests (limit $(( left < 90 ? left : 90 ))s)"
    timeout --kill-after=10 $(( left < 90 ? left : 90 )) "$PY" -m pytest -q -p no:cacheprovider -k cuda \
      tests/test_schedule.py tests/test_accumulation.py tests/test_loss_reader.py tests/test_samplers.py \
      tests/test_ae_trainer.py \
      > "$extras/cuda-tests.log" 2>&1
    echo "   exit status $? (log: $extras/cuda-tests.log)"; tail -3 "$extras/cuda-tests.log"
    [ -n "${COPY_TO:-}" ] && cp -r "$extras" "$COPY_TO"/
  fi
  left=$(budget_left)
  if [ "$left" -gt 45 ]; then
    echo "== smoke experiment through the real stages, trainer=default (limit ${left}s)"
    read -r -a SMOKE_EXTRA <<< "${SMOKE_OVERRIDES:-}"
    timeout --kill-after=10 "$left" "$PY" -m replication.run experiment=smoke trainer=default \
      trainer.steps=40 trainer.batch_size=16 trainer.ckpt_every=20 trainer.log_every=5 trainer.eval_every=0 \
      autoencoder.train.steps=50 \
      sampler.num_samples=64 "curves.ddim_steps=[]" progress=false device="$DEVICE" \
      runs_root="$TMP/runs" reports_dir="$TMP/reports" data_root="$TMP/data" ${SMOKE_EXTRA[@]+"${SMOKE_EXTRA[@]}"} \
      > "$extras/smoke-default-trainer.log" 2>&1
    rc=$?
    echo "   exit status $rc (log: $extras/smoke-default-trainer.log)"
    grep -E "stage .* done in|Error" "$extras/smoke-default-trainer.log" | tail -9
    cp "$TMP/runs/smoke/train_ldm/stats.jsonl" "$extras/train_ldm-stats.jsonl" 2>/dev/null || true
    cp "$TMP/runs/smoke/metrics.json" "$extras/smoke-metrics.json" 2>/dev/null || true
    [ -n "${COPY_TO:-}" ] && cp -r "$extras" "$COPY_TO"/
  else
    echo "== smoke experiment skipped: ${left}s left of EXTRAS_BUDGET_S"
  fi
fi
echo "gpu_check: done in $(( $(date +%s) - start ))s; results in $OUT_DIR"
