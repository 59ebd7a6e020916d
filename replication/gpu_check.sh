#!/usr/bin/env bash
# Issue 7's one prepared GPU check: `python -m replication.bench` at the paper's shapes on one GPU, the eager fp32
# baseline and the fast path (bf16 autocast + channels_last + torch.compile + fused AdamW) side by side in the
# same process, for
#   lsun_churches_ldm8  (Table 1, LDM-8 KL, U-Net 294,966,916 params)  train batch 96
#   celebahq_ldm4       (Table 1, LDM-4 VQ, U-Net 274,056,163 params)  train batch 48
# with sampling at batch 256 (the batch of the original-code measurement in shared/ANCHORS.md), timed over
# 10 DDIM steps and quoted per image at 200 steps.
# Writes reports/benchmarks/<device>.json and <device>.md (device e.g. nvidia-h200) and prints the table.
#
# Budget: about 8 minutes on an H100/H200. Most of it is torch.compile (training graph, then sampling graph)
# per experiment; each experiment is cut at PER_EXPERIMENT_S seconds, and rows measured by then are kept
# (the benchmark rewrites its JSON after every row, in the order train, sample, decode, encode, features).
#
# Usage (repository root):  bash replication/gpu_check.sh
#   env: OUT_DIR (default reports/benchmarks), PER_EXPERIMENT_S (default 210), COPY_TO (also copy results there)
#   rehearsal on a machine without a GPU (tests/test_gpu_check.py runs it so): DEVICE=cpu EXPERIMENTS="smoke:4"
#   BENCH_ARGS="--steps 1 ..." replaces the paper-shape arguments below; MERGE_TAG names the merged files.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${OUT_DIR:-reports/benchmarks}
PER_EXPERIMENT_S=${PER_EXPERIMENT_S:-210}
DEVICE=${DEVICE:-cuda}
EXPERIMENTS=${EXPERIMENTS:-"lsun_churches_ldm8:96 celebahq_ldm4:48"}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export HF_HUB_OFFLINE=1
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}

if [ "$DEVICE" = cuda ]; then
  if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
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
  SHAPE_ARGS=(--steps 5 --warmup 2 --sample-batch 256 --sample-steps 10 --ae-batch 16 --feature-batch 100 --fast all)
fi
COMMON=(--device "$DEVICE" "${SHAPE_ARGS[@]}" --out "$TMP" --no-table)

run_one() {
  local name=$1 batch=$2
  echo "== $name, train batch $batch (limit ${PER_EXPERIMENT_S}s)"
  timeout --signal=TERM --kill-after=15 "$PER_EXPERIMENT_S" \
    python -m replication.bench "experiment=$name" --batch "$batch" "${COMMON[@]}" --tag "$name"
  local rc=$?
  [ $rc -eq 124 ] && echo "   $name: cut at ${PER_EXPERIMENT_S}s; keeping the rows measured so far"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && echo "   $name: exit status $rc"
  echo "   elapsed so far: $(( $(date +%s) - start ))s"
}

names=()
for spec in $EXPERIMENTS; do
  name=${spec%%:*}
  batch=${spec#*:}
  if [ "$name" = "$spec" ] || ! [[ "$batch" =~ ^[0-9]+$ ]]; then
    echo "gpu_check: EXPERIMENTS entries are NAME:BATCH, got '$spec'" >&2
    exit 2
  fi
  names+=("$name")
  run_one "$name" "$batch"
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
python -m replication.bench --merge "${files[@]}" --out "$OUT_DIR" ${MERGE_TAG:+--tag "$MERGE_TAG"} || exit 1
if [ -n "${COPY_TO:-}" ]; then
  cp "$OUT_DIR"/*.json "$OUT_DIR"/*.md "$COPY_TO"/ 2>/dev/null || true
fi
echo "gpu_check: done in $(( $(date +%s) - start ))s; results in $OUT_DIR"
