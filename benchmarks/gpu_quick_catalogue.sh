#!/usr/bin/env bash
# The whole quick-profile claim catalogue on smollm2-135m on one GPU, wall time recorded.
#
#   benchmarks/gpu_quick_catalogue.sh [OUT_DIR]          # default OUT_DIR: reports/gpu-catalogue
#
# Runs twice, like CI and like a first run: (1) with the committed ranking cache (fixtures/rankings,
# so the time is spent on ablations), (2) with an empty ranking cache (every ranking identified on
# the GPU). Both compare each verdict with fixtures/expected/smollm2-135m.json, which was made on
# the CPU: a changed verdict shows up as a failed test and is recorded, not fatal. Writes
# OUT_DIR/catalogue.txt (hardware, wall times, pytest exit codes) and the HTML/JSON reports.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-reports/gpu-catalogue}
mkdir -p "$OUT"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
LOG="$OUT/catalogue.txt"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  .venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "cuda available", torch.cuda.is_available())'
} > "$LOG"

run() {  # $1 = label, rest = extra pytest options
  local label=$1; shift
  local t0 t1 rc ms
  t0=$(date +%s%N)
  .venv/bin/python -m pytest claims/ -p no:cacheprovider -q --model smollm2-135m --device cuda \
    --expected fixtures/expected/smollm2-135m.json --report-dir "$OUT/$label" "$@" > "$OUT/$label.log" 2>&1
  rc=$?
  t1=$(date +%s%N)
  ms=$(( (t1 - t0) / 1000000 ))
  printf '%s: wall %d.%01d s, pytest exit %d (%s)\n' "$label" $((ms / 1000)) $((ms % 1000 / 100)) "$rc" \
    "$(tail -n 1 "$OUT/$label.log")" | tee -a "$LOG"
}

run cached-rankings
CACHE=$(mktemp -d)
run fresh-rankings --ranking-cache "$CACHE"
rm -rf "$CACHE"
cat "$LOG"
